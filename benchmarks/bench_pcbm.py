"""PCBM head fitting: our torch FISTA elastic-net solver against scikit-learn's SGDClassifier as the
Post-hoc CBM reference code uses it (``loss="log_loss", penalty="elasticnet", l1_ratio=0.99``), on the
same concept scores, penalty and threads, in one process. Goals: >= 5x faster, test accuracy within
0.5 point.

Run: ``python benchmarks/bench_pcbm.py [--n 50000] [--concepts 200] [--classes 10] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import SGDClassifier

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import BenchResult, accuracy_row, format_table, speedup_row
from cbm.backbones import resolve_device
from cbm.models.solvers import elastic_net_softmax


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


def measure(n: int = 50_000, concepts: int = 200, classes: int = 10, c: float = 2.0, threads: int = 1) -> BenchResult:
    """Fit time and test accuracy of our FISTA head and of the reference's SGDClassifier on the same scores."""
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
    return BenchResult("pcbm", setup, rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--concepts", type=int, default=200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--c", type=float, default=2.0, help="lambda rule constant: lam = c / (classes x concepts)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice; default 1)")
    args = parser.parse_args()
    print(format_table([measure(args.n, args.concepts, args.classes, args.c, args.threads)]))


if __name__ == "__main__":
    main()
