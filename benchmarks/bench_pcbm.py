"""PCBM head fitting: our torch FISTA elastic-net solver against scikit-learn's SGDClassifier as the
Post-hoc CBM reference code uses it (``loss="log_loss", penalty="elasticnet", l1_ratio=0.99``), on the
same concept scores, penalty and threads, in one process. Goals: >= 5x faster, test accuracy within
0.5 point.

Scale curve: a whole ``PosthocCBM`` fit (margins to a 200-concept bank, then the head) on 10k, 100k and 1M
embeddings of 512 dims, each size in a fresh process, which reports the fit's time (wall and CPU) and its
peak resident memory (``ru_maxrss``, reset after the data are made where Linux allows, so that it is the
fit's peak with the data in memory) above the process's start, next to the size of the data (training +
validation features, generated chunk by chunk into one array, so the benchmark holds nothing else of that
size). Goals: time linear in rows, memory flat beyond the data. ``--scale-stream on off`` fits each size
resident and streamed (on a GPU).

Run: ``python benchmarks/bench_pcbm.py [--n 50000] [--concepts 200] [--classes 10] [--threads 1]
[--scale-sizes 10000 100000 1000000] [--scale-dim 512] [--scale-stream auto]``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import SGDClassifier

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (BenchResult, Row, accuracy_row, format_table, in_fresh_process, peak_rss_mb,
                               speedup_row)
from cbm.backbones import resolve_device
from cbm.models.posthoc import PosthocCBM
from cbm.models.solvers import elastic_net_softmax
from concepts.bank import ConceptBank

MB = 2 ** 20
STREAMS = {"auto": "auto", "on": True, "off": False}  # --scale-stream choices -> PosthocCBM(stream=...)


def concept_scores(n: int, concepts: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Margins of binary concepts (+ noise); classes defined by sparse concept weights."""
    rng = np.random.default_rng(seed)
    present = rng.random((n, concepts)) < 0.3
    scores = np.where(present, 1.0, -1.0) + rng.normal(0, 0.8, (n, concepts))
    truth = np.zeros((classes, concepts))
    for c in range(classes):
        truth[c, rng.choice(concepts, 8, replace=False)] = rng.normal(0, 2, 8)
    labels = (present @ truth.T + rng.gumbel(size=(n, classes))).argmax(1)
    return scores.astype(np.float32), labels


def concept_bank(dim: int, concepts: int) -> ConceptBank:
    """A CAV bank of ``concepts`` random unit directions (the same for every seed of :func:`embeddings`)."""
    vectors = torch.randn(concepts, dim, generator=torch.Generator().manual_seed(1234))
    return ConceptBank([f"concept {k}" for k in range(concepts)], vectors / vectors.norm(dim=1, keepdim=True),
                       kind="cav")


def embeddings(n: int, bank: ConceptBank, classes: int, seed: int = 0,
               chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 embeddings (+1/-1 along each concept's direction as the concept is present or not, plus
    noise) and labels from sparse class-concept weights; written chunk by chunk into one array, so making
    them needs the data plus one chunk."""
    directions = bank.vectors.numpy()
    truth = np.zeros((classes, len(directions)), dtype=np.float32)
    pick = np.random.default_rng(1234)
    for c in range(classes):
        truth[c, pick.choice(len(directions), 8, replace=False)] = pick.normal(0, 2, 8)
    x, y = np.empty((n, directions.shape[1]), dtype=np.float32), np.empty(n, dtype=np.int64)
    for start in range(0, n, chunk):
        rng = np.random.default_rng((seed, start))
        present = (rng.random((min(chunk, n - start), len(directions)), dtype=np.float32) < 0.3).astype(np.float32)
        rows = slice(start, start + len(present))
        x[rows] = (2 * present - 1) @ directions
        x[rows] += rng.standard_normal((len(present), directions.shape[1]), np.float32) / 2
        y[rows] = (present @ truth.T + rng.gumbel(size=(len(present), classes))).argmax(1)
    return x, y


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident memory to the current one (Linux ``clear_refs``); False where that
    is not possible (then the peak includes whatever came before)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _scale_point(n: int, dim: int, concepts: int, classes: int, stream: str, threads: int) -> dict:
    """In a fresh process: one PosthocCBM fit on ``n`` embeddings (+ ``n // 10`` for validation); its time,
    peak resident memory above the process's start (the fit's own, with the data in memory, where the peak
    can be reset after making the data) and the data's size, in MB."""
    torch.set_num_threads(threads)
    start = peak_rss_mb()
    bank = concept_bank(dim, concepts)
    x, y = embeddings(n, bank, classes)
    val_x, val_y = embeddings(max(n // 10, 1000), bank, classes, seed=1)
    device = resolve_device("auto")
    fit_only = _reset_peak_rss()
    started, cpu_started = time.perf_counter(), time.process_time()
    model = PosthocCBM(bank, stream=STREAMS[stream]).fit(x, y, validation=(val_x, val_y))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "fit_only": fit_only,
            "peak_mb": peak_rss_mb() - start, "data_mb": (x.nbytes + val_x.nbytes) / MB,
            "device": str(device), "streamed": model.training_["streamed"],
            "iterations": model.training_["solver_iterations"], "val_accuracy": model.metrics_["val_accuracy"],
            "device_peak_mb": torch.cuda.max_memory_allocated() / MB if device.type == "cuda" else None}


def scale_curve(sizes: Sequence[int], dim: int = 512, concepts: int = 200, classes: int = 10,
                streams: Sequence[str] = ("auto",), threads: int = 1) -> tuple[list[Row], list[str]]:
    """Rows (time, peak memory vs data per size; time per row of the largest size vs the smallest) and notes."""
    rows, notes = [], []
    for stream in streams:
        points = {n: in_fresh_process(_scale_point, n, dim, concepts, classes, stream, threads) for n in sizes}
        for n, point in points.items():
            how = "streamed" if point["streamed"] else "resident"
            rows.append(Row(f"PCBM fit, {n:,} x {dim} ({how}): time", point["seconds"], None, "s", None, "", None))
            rows.append(Row(f"PCBM fit, {n:,} x {dim}: peak memory vs data", point["peak_mb"], point["data_mb"], "MB",
                            point["peak_mb"] / point["data_mb"], "", None))
            device_peak = f", device peak {point['device_peak_mb']:.0f} MB" if point["device_peak_mb"] else ""
            whose = "the fit's peak" if point["fit_only"] else "peak (data generation included)"
            notes.append(f"{n:,} rows ({how} on {point['device']}): {point['seconds']:.2f} s "
                         f"({point['cpu_seconds']:.1f} CPU s), {point['iterations']} FISTA iterations, "
                         f"validation accuracy {point['val_accuracy']:.3f}, {whose} {point['peak_mb']:.0f} MB above "
                         f"the start for {point['data_mb']:.0f} MB of data{device_peak}")
        small, large = min(points), max(points)
        if large > small:
            per_row = {n: points[n]["seconds"] / n * 1e6 for n in (small, large)}
            growth = per_row[large] / per_row[small]
            rows.append(Row(f"PCBM fit time per row, {large:,} vs {small:,} rows", per_row[large], per_row[small],
                            "us/row", growth, "<= 1.5x (linear)", growth <= 1.5))
    return rows, notes


def measure(n: int = 50_000, concepts: int = 200, classes: int = 10, c: float = 2.0, threads: int = 1,
            scale_sizes: Sequence[int] = (10_000, 100_000, 1_000_000), scale_dim: int = 512,
            scale_streams: Sequence[str] = ("auto",)) -> BenchResult:
    """Fit time and test accuracy of our FISTA head and of the reference's SGDClassifier on the same scores;
    then the scale curve of a whole PosthocCBM fit (no ``scale_sizes``: none)."""
    if threads:
        torch.set_num_threads(threads)
    x, y = concept_scores(int(n * 1.2), concepts, classes)
    train_x, train_y, test_x, test_y = x[:n], y[:n], x[n:], y[n:]
    lam = c / (classes * concepts)
    device = resolve_device("auto")

    started = time.perf_counter()
    solution = elastic_net_softmax(torch.from_numpy(train_x).to(device), torch.from_numpy(train_y).to(device),
                                   classes, lam, 0.99)
    ours = time.perf_counter() - started
    logits = torch.from_numpy(test_x).to(device) @ solution.weight.T + solution.bias
    ours_accuracy = float((logits.argmax(1).cpu().numpy() == test_y).mean())

    reference = SGDClassifier(loss="log_loss", penalty="elasticnet", alpha=lam, l1_ratio=0.99, max_iter=10000,
                              random_state=42)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.fit(train_x, train_y)
    theirs = time.perf_counter() - started
    rows = [speedup_row("PCBM head: fit time, FISTA vs sklearn SGD", ours, theirs, 5),
            accuracy_row("PCBM head: test accuracy", ours_accuracy, float(reference.score(test_x, test_y)), 0.5)]
    notes = [f"non-zero weights: ours {int((solution.weight != 0).sum())} ({solution.iterations} FISTA iterations, "
             f"converged: {solution.converged}), sklearn {int((reference.coef_ != 0).sum())}"]
    setup = (f"{n} x {concepts} concept scores, {classes} classes, lam {lam:.2g}, {device}, "
             f"{torch.get_num_threads()} threads")
    if scale_sizes:
        scale_rows, scale_notes = scale_curve(scale_sizes, scale_dim, concepts, classes, scale_streams,
                                              torch.get_num_threads())
        rows, notes = rows + scale_rows, notes + scale_notes
        setup += f"; scale curve: {' / '.join(f'{size:,}' for size in scale_sizes)} x {scale_dim} embeddings"
    return BenchResult("pcbm", setup, rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--concepts", type=int, default=200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--c", type=float, default=2.0, help="lambda rule constant: lam = c / (classes x concepts)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice; default 1)")
    parser.add_argument("--scale-sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000],
                        help="rows of each scale-curve fit (none: skip the curve)")
    parser.add_argument("--scale-dim", type=int, default=512, help="embedding width of the scale curve")
    parser.add_argument("--scale-stream", nargs="+", choices=list(STREAMS), default=["auto"],
                        help="PosthocCBM(stream=...) of the scale curve: auto, on (True), off (False); several: each")
    args = parser.parse_args()
    print(format_table([measure(args.n, args.concepts, args.classes, args.c, args.threads, args.scale_sizes,
                                args.scale_dim, args.scale_stream)]))


if __name__ == "__main__":
    main()
