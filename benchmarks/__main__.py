"""Run every benchmark and print one table: what was measured, our figure, the baseline's figure from the
same run, their ratio and the goal. Sizes are reduced (see ``RUNNER_SIZES``) so that the whole table takes
at most 10 minutes on 2 CPU cores; each benchmark's own command line runs its full sizes.

    python -m benchmarks [--only embed cavs ...] [--threads 1] [--json results.json]
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import sys
import time

import torch

from benchmarks.common import BenchResult, format_table

logger = logging.getLogger("benchmarks")

# Reduced but meaningful: the CAV, LaBo, temporal and audit workloads are the benchmarks' own defaults (the
# issues' workloads); extraction, the PCBM head and its scale curve (no 1M rows) and ECBM inference are smaller
# (each table header says what ran).
RUNNER_SIZES: dict[str, dict] = {
    "embed": {"n": 96, "batch_size": 32, "repeats": 1, "memory_sizes": (1000, 10000), "memory_shard_size": 256},
    "cavs": {},
    # cavs_from_labels: 16 concepts on 2,000 x 512 (the full 16 and 200 concepts on 6,000 x 1,280 take ~25 min)
    "cavs_labels": {"module": "cavs", "measure": "measure_labels", "concepts": (16,), "n": 2000, "dim": 512},
    "probe": {"n": 2000, "dim": 512},
    "pcbm": {"n": 10_000, "scale_sizes": (10_000, 100_000)},
    "labo": {},
    "energy": {"n": 128, "per_sample": 8, "train": 1000, "val": 64, "epochs": 2},
    "temporal": {},
    "audit": {},
    "editor": {},
    # the served editor in headless Chromium (bench_editor.measure_browser): 3 actions per median, PCBM only
    "editor_browser": {"module": "editor", "measure": "measure_browser", "repeats": 3, "families": ("PCBM",)},
    "peers": {"train": 3000, "val": 1000, "test": 1000, "backbones": ("toy:cnn",)},
}


def run(names: list[str], threads: int) -> list[BenchResult]:
    """Each named benchmark at its runner sizes; a failing one becomes a row with its error, the rest still run."""
    results = []
    for name in names:
        started = time.perf_counter()
        try:
            sizes = dict(RUNNER_SIZES[name])  # "module"/"measure": a second entry of one benchmark module
            module = importlib.import_module(f"benchmarks.bench_{sizes.pop('module', name)}")
            result = getattr(module, sizes.pop("measure", "measure"))(**sizes, threads=threads)
        except Exception as error:  # reported in the table and the exit code
            logger.exception("benchmark %s failed", name)
            result = BenchResult(name, str(RUNNER_SIZES[name]), [], error=f"{type(error).__name__}: {error}")
        result.seconds = time.perf_counter() - started
        logger.info("%s done in %.0f s", name, result.seconds)
        results.append(result)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(RUNNER_SIZES), default=list(RUNNER_SIZES),
                        help="run only these benchmarks")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for every benchmark, ours and baseline alike (default 1)")
    parser.add_argument("--json", metavar="PATH", help="also write every row as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logger.setLevel(logging.INFO)  # progress lines; the libraries' own INFO logs stay quiet

    started = time.perf_counter()
    results = run(args.only, args.threads)
    total = time.perf_counter() - started
    rows = [row for result in results for row in result.rows]
    judged = [row for row in rows if row.goal_met is not None]
    print(format_table(results))
    print(f"\n{sum(row.goal_met for row in judged)} of {len(judged)} goals met; {len(rows)} rows in {total:.0f} s "
          f"({os.cpu_count()} CPUs, {args.threads} torch thread(s), torch {torch.__version__})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"command": " ".join(["python -m benchmarks", *sys.argv[1:]]), "seconds": total,
                       "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                                   "cuda": torch.cuda.is_available(), "threads": args.threads},
                       "results": [result.to_json() for result in results]}, handle, indent=2)
        print(f"wrote {args.json}")
    return 1 if any(result.error for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
