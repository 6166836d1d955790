"""Linear probe speed and accuracy: ``LinearProbe`` (torch L-BFGS, warm-started along the C grid) vs
scikit-learn ``LogisticRegression(solver="lbfgs")`` fit once per C.

Workload: 6,000 training samples x 1,280 dims of data as hard as real features (non-negative after a ReLU,
correlated through 64 shared factors), 10 classes, 1,000 validation and 2,000 test samples. Both fit the
same objective (``C * sum of cross-entropies + ||W||^2 / 2``, stopping when the largest gradient entry of
the mean-scaled objective is below 1e-4) on the same preprocessed float32 features (L2-normalised,
standardised; scikit-learn then solves in float32 too) at the same values of C: the ones ``LinearProbe`` tried (its grid and its
refinement around the best); each picks its C on validation accuracy. Rows: wall time and its ratio
(goal >= 3x), test accuracy of both (goal: within 1 point).

    python benchmarks/bench_probe.py [--n 6000] [--dim 1280] [--classes 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import BenchResult, accuracy_row, format_table, speedup_row
from cbm.models.baselines import LinearProbe


def realistic_features(n: int, dim: int = 1280, classes: int = 10, concepts: int = 16,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [n, dim] as hard as real ones (non-negative after a ReLU, correlated through 64 shared factors)
    and class labels [n]: each class is a profile of binary concepts that its samples follow with 80%
    probability per concept, and each concept adds a direction to the features."""
    generator = torch.Generator().manual_seed(seed)
    profiles = torch.rand(classes, concepts, generator=generator) < 0.35
    directions = 0.2 * torch.randn(concepts, dim, generator=generator)
    mixing = torch.randn(64, dim, generator=generator) / 8
    generator.manual_seed(seed + 1)  # the samples: one seed per split, the same classes and directions
    labels = torch.randint(classes, (n,), generator=generator)
    keep = torch.rand(n, concepts, generator=generator) < 0.8
    truth = torch.where(keep, profiles[labels], torch.rand(n, concepts, generator=generator) < 0.3).float()
    factors = torch.randn(n, 64, generator=generator) @ mixing
    return torch.relu(factors + truth @ directions + 0.5 * torch.randn(n, dim, generator=generator) + 0.3), labels


def _splits(n: int, dim: int, classes: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Train, validation and test samples of one world (same classes, fresh samples)."""
    world = realistic_features(n + 3000, dim, classes, seed=seed)
    return [(world[0][a:b], world[1][a:b]) for a, b in ((0, n), (n, n + 1000), (n + 1000, n + 3000))]


def sklearn_probe(probe: LinearProbe, train, val, cs: list[float]) -> tuple[float, object]:
    """scikit-learn's lbfgs at each C on the probe's preprocessing; the best on validation accuracy (ties: C
    nearest 1, as LinearProbe breaks them). Returns (C, classifier)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    def prepared(x: torch.Tensor) -> np.ndarray:
        return ((probe._prepare(x) - probe.mean_) / probe.std_).numpy()

    train_x, val_x = prepared(train[0]), prepared(val[0])
    fitted = {}
    with warnings.catch_warnings(), threadpool_limits(torch.get_num_threads()):  # the same threads as ours
        warnings.simplefilter("ignore")  # ConvergenceWarning at large C, as users see it
        for c in cs:
            model = LogisticRegression(C=c, solver="lbfgs", max_iter=probe.max_iter).fit(train_x, train[1].numpy())
            fitted[c] = (model.score(val_x, val[1].numpy()), model)
    best = max(fitted, key=lambda c: (fitted[c][0], -abs(math.log10(c))))
    return best, fitted[best][1]


def measure(n: int = 6000, dim: int = 1280, classes: int = 10, threads: int = 1) -> BenchResult:
    """Fit time (C chosen on validation) and test accuracy of LinearProbe and scikit-learn's lbfgs."""
    torch.set_num_threads(threads)
    train, val, test = _splits(n, dim, classes)
    LinearProbe(cs=(1.0,), refine=0).fit(*_splits(200, dim, classes, seed=1)[0], validation=val)  # warm-up
    started = time.perf_counter()
    probe = LinearProbe().fit(*train, validation=val)
    ours_s = time.perf_counter() - started
    cs = list(probe.tried_)
    started = time.perf_counter()
    sk_c, sk_model = sklearn_probe(probe, train, val, cs)
    sk_s = time.perf_counter() - started
    sk_acc = float(sk_model.score(((probe._prepare(test[0]) - probe.mean_) / probe.std_).numpy(), test[1].numpy()))
    rows = [speedup_row("linear probe: fit time, torch vs sklearn lbfgs", ours_s, sk_s, 3),
            accuracy_row("linear probe: test accuracy", probe.score(*test), sk_acc, within=1)]
    notes = [f"C chosen: ours {probe.C_:.3g}, sklearn {sk_c:.3g}; {len(cs)} values of C each: "
             + ", ".join(f"{c:.3g}" for c in cs)]
    setup = f"{n} x {dim} features, {classes} classes, 1000 val / 2000 test, cpu, {torch.get_num_threads()} threads"
    return BenchResult("probe", setup, rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=6000, help="training samples")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="threads for both (torch and BLAS)")
    args = parser.parse_args()
    print(format_table([measure(args.n, args.dim, args.classes, args.threads)]))


if __name__ == "__main__":
    main()
