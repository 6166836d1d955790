"""What every benchmark returns (rows of ours vs a baseline measured in the same run) and how it is shown."""

from __future__ import annotations

import multiprocessing
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field


@dataclass
class Row:
    """One measurement: our figure, the baseline's (same run, same data, same threads), their ratio, the goal.

    ``ratio`` is what the goal is stated in: a speed-up (``ratio_unit="x"``), a share or growth factor
    (``"x"`` too), or an accuracy difference in points (``"pt"``). ``goal_met`` is None where the row
    only informs.
    """

    name: str
    ours: float
    baseline: float | None
    unit: str
    ratio: float | None
    goal: str
    goal_met: bool | None
    ratio_unit: str = "x"


@dataclass
class BenchResult:
    """The rows of one benchmark, with the sizes it ran at and free-form notes."""

    bench: str
    setup: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def best_of(repeats: int, work: Callable[[], object]) -> float:
    """The fastest of ``repeats`` timed calls, in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def time_calls(obj: object, method: str) -> list[float]:
    """Wrap ``obj.method`` so that the wall time of each later call is appended to the returned list."""
    seconds: list[float] = []
    original = getattr(obj, method)

    def timed(*args: object, **kwargs: object) -> object:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    setattr(obj, method, timed)
    return seconds


def in_fresh_process(function: Callable, *args: object) -> object:
    """``function(*args)`` in a new (spawned) Python process, so that its peak memory is its own."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (``ru_maxrss``), in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, kB elsewhere


def speedup_row(name: str, ours_s: float, baseline_s: float, goal: float) -> Row:
    """A wall-time row whose ratio is the baseline's time over ours (goal: at least ``goal`` times faster)."""
    ratio = baseline_s / max(ours_s, 1e-12)
    return Row(name, ours_s, baseline_s, "s", ratio, f">= {goal:g}x faster", ratio >= goal)


def accuracy_row(name: str, ours: float, baseline: float, within: float | None) -> Row:
    """An accuracy row whose ratio is our lead in points (goal: no more than ``within`` points behind)."""
    gap = 100 * (ours - baseline)
    goal = f"within {within:g} pt" if within is not None else ""
    return Row(name, ours, baseline, "acc", gap, goal, None if within is None else gap >= -within, "pt")


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "acc":
        return f"{value:.4f}"
    if unit == "s":
        return f"{value:.3f} s" if value < 1 else f"{value:.2f} s"
    if not unit:
        return f"{value:.1e}"
    return f"{value:,.1f} {unit}"


def _ratio(row: Row) -> str:
    if row.ratio is None:
        return "-"
    return f"{row.ratio:+.2f} pt" if row.ratio_unit == "pt" else f"{row.ratio:.2f}x"


def format_table(results: list[BenchResult], notes: bool = True) -> str:
    """One text table: a header line per benchmark (with its sizes), then its rows."""
    header = f"{'measure':<52} {'ours':>16} {'baseline':>16} {'ratio':>10}  {'goal':<22} met"
    lines = [header, "-" * len(header)]
    for result in results:
        lines.append(f"[{result.bench}] {result.setup}" + (f"  ({result.seconds:.0f} s)" if result.seconds else ""))
        if result.error:
            lines.append(f"  FAILED: {result.error}")
        for row in result.rows:
            met = {True: "yes", False: "NO", None: ""}[row.goal_met]
            lines.append(f"  {row.name:<50} {_value(row.ours, row.unit):>16} {_value(row.baseline, row.unit):>16} "
                         f"{_ratio(row):>10}  {row.goal:<22} {met}")
        if notes:
            lines.extend(f"    {note}" for note in result.notes)
    return "\n".join(lines)
