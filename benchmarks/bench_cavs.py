"""CAV learning speed and accuracy: batched torch solver vs per-concept scikit-learn SVC.

Workload (the issue's): 200 concepts x 200 examples (100 positive, 100 negative) x 512 dims,
half held out, C chosen on the held-out half from the same grid for both solvers. The reference
solver is ``sklearn.svm.SVC(kernel="linear", C)`` fit once per concept and C, as Post-hoc CBM
does. Rows: wall time and its ratio (goal >= 5x), mean validation accuracy of both (goal: within 1
point); the fastcav solver's figures are a note.

    python benchmarks/bench_cavs.py [--concepts 200] [--examples 200] [--dim 512] [--device cpu]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import BenchResult, accuracy_row, format_table, speedup_row
from concepts.cavs import learn_cavs


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
    args = parser.parse_args()
    print(format_table([measure(args.concepts, args.examples, args.dim, args.device, args.cs, args.threads)]))


if __name__ == "__main__":
    main()
