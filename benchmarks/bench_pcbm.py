"""PCBM head fitting: our torch FISTA elastic-net solver against scikit-learn's SGDClassifier as the
Post-hoc CBM reference code uses it (``loss="log_loss", penalty="elasticnet", l1_ratio=0.99``), on the
same concept scores, penalty and threads, in one process.

Run: ``python benchmarks/bench_pcbm.py [--n 50000] [--concepts 200] [--classes 10]``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.linear_model import SGDClassifier

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--concepts", type=int, default=200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--c", type=float, default=2.0, help="lambda rule constant: lam = c / (classes x concepts)")
    args = parser.parse_args()

    x, y = concept_scores(int(args.n * 1.2), args.concepts, args.classes)
    train_x, train_y, test_x, test_y = x[:args.n], y[:args.n], x[args.n:], y[args.n:]
    lam = args.c / (args.classes * args.concepts)
    device = resolve_device("auto")

    started = time.perf_counter()
    solution = elastic_net_softmax(torch.from_numpy(train_x).to(device), torch.from_numpy(train_y).to(device),
                                   args.classes, lam, 0.99)
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
    theirs_accuracy = float(reference.score(test_x, test_y))

    print(f"PCBM head: {args.n} x {args.concepts} concept scores, {args.classes} classes, lam {lam:.2g}, "
          f"device {device}, {torch.get_num_threads()} torch threads")
    print(f"{'measure':<34} {'ours':>10} {'sklearn SGD':>12} {'ratio':>8}  goal")
    print(f"{'fit time (s)':<34} {ours:>10.2f} {theirs:>12.2f} {theirs / ours:>7.1f}x  >= 5x faster")
    print(f"{'test accuracy':<34} {ours_accuracy:>10.4f} {theirs_accuracy:>12.4f} "
          f"{(ours_accuracy - theirs_accuracy) * 100:>+7.2f}pt  within 0.5 point")
    print(f"{'non-zero weights':<34} {int((solution.weight != 0).sum()):>10d} {int((reference.coef_ != 0).sum()):>12d}"
          f"  ({solution.iterations} FISTA iterations, converged: {solution.converged})")


if __name__ == "__main__":
    main()
