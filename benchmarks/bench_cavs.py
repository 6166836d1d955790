"""CAV learning speed and accuracy: our batched torch solvers vs scikit-learn, per concept.

Two workloads, each with the same C grid, split and cross-validated choice of C for both sides:

- Examples per concept (``measure``; the Post-hoc CBM recipe): 200 concepts x 200 examples (100
  positive, 100 negative) x 512 dims. ``learn_cavs(solver="torch")`` (SVC's hinge loss) vs
  ``sklearn.svm.SVC(kernel="linear")`` per concept and C, as Post-hoc CBM does. Goal >= 5x, mean
  held-out accuracy within 1 point; the fastcav solver's figures are a note.
- Concepts labelled on one dataset (``measure_labels``): 16 and 200 concepts on 6,000 samples x 1,280
  dims as hard as real features (non-negative after a ReLU, correlated through 64 shared factors, 15%
  of the concept labels flipped), every positive used. ``cavs_from_labels`` (its default ``newton``
  solver, LinearSVC's objective) vs ``solver="liblinear"`` (``sklearn.svm.LinearSVC`` per concept and
  C). Goal >= 20x, mean held-out accuracy within 1 point. LinearSVC on 200 concepts would take hours:
  it runs on the first ``baseline_concepts`` of them and its time is scaled by the concept count (its
  cost is a sum over concepts), which the row says.

    python benchmarks/bench_cavs.py [--concepts 200] [--examples 200] [--dim 512] [--device cpu]
        [--threads 1] [--labels-concepts 16 200] [--labels-n 6000] [--labels-dim 1280]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import BenchResult, accuracy_row, format_table, speedup_row
from concepts.cavs import cavs_from_labels, learn_cavs


def synthetic_concepts(n_concepts: int, n_examples: int, dim: int, seed: int = 0):
    """Embedding-like data: a shared anisotropic cloud; each concept shifts its positives along a direction."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.linspace(2.0, 0.2, dim)
    positives, negatives = {}, {}
    for k in range(n_concepts):
        direction = torch.nn.functional.normalize(torch.randn(dim, generator=generator), dim=0)
        strength = 0.6 + 1.4 * torch.rand((), generator=generator)
        half = n_examples // 2
        neg = torch.randn(half, dim, generator=generator) * scales
        shift = 3 * strength * direction * scales.norm() / dim ** 0.5
        pos = torch.randn(n_examples - half, dim, generator=generator) * scales + shift
        positives[f"concept {k}"], negatives[f"concept {k}"] = pos, neg
    return positives, negatives


def measure(concepts: int = 200, examples: int = 200, dim: int = 512, device: str = "cpu",
            cs: Sequence[float] = (0.001, 0.01, 0.1, 1.0), threads: int = 1) -> BenchResult:
    """Fit time and mean validation accuracy of the torch solver and scikit-learn's SVC (fastcav as a note)."""
    torch.set_num_threads(threads)
    positives, negatives = synthetic_concepts(concepts, examples, dim)
    results = {}
    for solver, on in (("torch", device), ("sklearn", "cpu"), ("fastcav", device)):
        learn_cavs(dict(list(positives.items())[:2]), dict(list(negatives.items())[:2]), solver=solver,
                   cs=list(cs), device=on)  # warm-up (imports, kernels)
        started = time.perf_counter()
        bank = learn_cavs(positives, negatives, solver=solver, cs=list(cs), device=on)
        results[solver] = (time.perf_counter() - started, float(bank.stats["val_accuracy"].mean()))
    (ours_s, ours_acc), (svc_s, svc_acc) = results["torch"], results["sklearn"]
    rows = [speedup_row("CAVs: fit time, torch vs sklearn SVC", ours_s, svc_s, 5),
            accuracy_row("CAVs: mean validation accuracy", ours_acc, svc_acc, within=1)]
    notes = [f"fastcav (mean-difference directions): {results['fastcav'][0]:.2f} s, "
             f"mean validation accuracy {results['fastcav'][1]:.4f}"]
    setup = (f"{concepts} concepts x {examples} examples x {dim} dims, C grid {list(cs)}, {device}, "
             f"{torch.get_num_threads()} threads")
    return BenchResult("cavs", setup, rows, notes)


def labelled_features(n: int, dim: int, concepts: int, noise: float = 0.15,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [n, dim] as hard as real ones (non-negative after a ReLU, correlated through 64 shared factors)
    and binary concept labels [n, concepts] (prevalence 10-50%), ``noise`` of them flipped."""
    generator = torch.Generator().manual_seed(seed)
    prevalence = 0.1 + 0.4 * torch.rand(concepts, generator=generator)
    truth = (torch.rand(n, concepts, generator=generator) < prevalence).float()
    directions = 0.3 * torch.randn(concepts, dim, generator=generator)
    factors = torch.randn(n, 64, generator=generator) @ (torch.randn(64, dim, generator=generator) / 8)
    features = torch.relu(factors + truth @ directions + 0.5 * torch.randn(n, dim, generator=generator) + 0.3)
    flipped = torch.rand(n, concepts, generator=generator) < noise
    return features, torch.where(flipped, 1 - truth, truth)


def measure_labels(concepts: Sequence[int] = (16, 200), n: int = 6000, dim: int = 1280, baseline_concepts: int = 16,
                   cs: Sequence[float] = (0.001, 0.01, 0.1, 1.0), threads: int = 1) -> BenchResult:
    """Fit time and mean held-out accuracy of cavs_from_labels: the newton solver vs LinearSVC per concept."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    rows, notes = [], []
    for count in concepts:
        features, labels = labelled_features(n, dim, count)
        names = [f"concept {k}" for k in range(count)]
        cavs_from_labels(features[:200], labels[:200, :2], names[:2], cs=list(cs))  # warm-up (imports, kernels)
        started = time.perf_counter()
        ours = cavs_from_labels(features, labels, names, cs=list(cs))
        ours_s = time.perf_counter() - started
        subset = min(count, baseline_concepts)
        with warnings.catch_warnings(), threadpool_limits(threads):
            warnings.simplefilter("ignore")  # LinearSVC's ConvergenceWarning at large C, as users see it
            started = time.perf_counter()
            theirs = cavs_from_labels(features, labels[:, :subset], names[:subset], solver="liblinear", cs=list(cs))
            theirs_s = (time.perf_counter() - started) * count / subset
        scaled = "" if subset == count else f" (LinearSVC on {subset}, time x{count / subset:g})"
        rows += [speedup_row(f"CAVs from labels, {count} concepts: newton vs LinearSVC{scaled}", ours_s, theirs_s, 20),
                 accuracy_row(f"CAVs from labels, {count} concepts: mean held-out accuracy{scaled}",
                              float(ours.stats["val_accuracy"][:subset].mean()),
                              float(theirs.stats["val_accuracy"].mean()), within=1)]
        chosen = {round(c, 6): n for c, n in zip(*(v.tolist() for v in ours.stats["C"].unique(return_counts=True)))}
        notes.append(f"{count} concepts: C chosen (ours, C: concepts) {chosen}; newton {ours_s:.1f} s")
    setup = (f"{list(concepts)} concepts x {n} samples x {dim} dims, every positive, 15% labels flipped, C grid "
             f"{list(cs)}, cpu, {torch.get_num_threads()} threads")
    return BenchResult("cavs_labels", setup, rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=int, default=200)
    parser.add_argument("--examples", type=int, default=200, help="examples per concept (half positive)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cs", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a busy machine, more threads spin and slow the "
                             "many small tensor operations of both the solver and the bookkeeping)")
    parser.add_argument("--labels-concepts", type=int, nargs="+", default=[16, 200])
    parser.add_argument("--labels-n", type=int, default=6000, help="labelled samples")
    parser.add_argument("--labels-dim", type=int, default=1280)
    args = parser.parse_args()
    print(format_table([measure(args.concepts, args.examples, args.dim, args.device, args.cs, args.threads),
                        measure_labels(args.labels_concepts, args.labels_n, args.labels_dim, cs=args.cs,
                                       threads=args.threads)]))


if __name__ == "__main__":
    main()
