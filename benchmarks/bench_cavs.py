"""CAV learning speed and accuracy: batched torch solver vs per-concept scikit-learn SVC.

Workload (the issue's): 200 concepts x 200 examples (100 positive, 100 negative) x 512 dims,
half held out, C chosen on the held-out half from the same grid for both solvers. The reference
solver is ``sklearn.svm.SVC(kernel="linear", C)`` fit once per concept and C, as Post-hoc CBM
does. Prints wall time, the speed ratio and the mean validation accuracy of both.

    PYTHONPATH=. python benchmarks/bench_cavs.py [--concepts 200] [--examples 200] [--dim 512] [--device cpu]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

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
    torch.set_num_threads(args.threads)
    positives, negatives = synthetic_concepts(args.concepts, args.examples, args.dim)
    print(f"{args.concepts} concepts x {args.examples} examples x {args.dim} dims, C grid {args.cs}, "
          f"torch threads {torch.get_num_threads()}")
    results = {}
    for solver, device in (("torch", args.device), ("sklearn", "cpu"), ("fastcav", args.device)):
        learn_cavs(dict(list(positives.items())[:2]), dict(list(negatives.items())[:2]), solver=solver,
                   cs=args.cs, device=device)  # warm-up (imports, kernels)
        start = time.perf_counter()
        bank = learn_cavs(positives, negatives, solver=solver, cs=args.cs, device=device)
        seconds = time.perf_counter() - start
        stats = bank.stats
        results[solver] = (seconds, float(stats["val_accuracy"].mean()), float(stats["train_accuracy"].mean()))
        print(f"{solver:>8}: {seconds:7.2f} s   mean val accuracy {results[solver][1]:.4f}   "
              f"train {results[solver][2]:.4f}")
    ratio = results["sklearn"][0] / results["torch"][0]
    gap = 100 * (results["torch"][1] - results["sklearn"][1])
    print(f"speed-up torch vs sklearn SVC: {ratio:.1f}x (goal >= 5x); "
          f"val accuracy difference {gap:+.2f} points (goal within 1)")


if __name__ == "__main__":
    main()
