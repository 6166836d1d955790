"""ECBM gradient inference: batched (all samples optimised together, converged ones frozen) against
per-sample inference (one sample at a time, as a naive loop would do), on the same fitted model.

The model is fitted briefly on synthetic embeddings with CUB-like sizes by default (112 concepts,
200 classes, 512-d features); the weights only need to be realistic enough for inference to take
a realistic number of steps. Prints samples/s for both and their ratio, plus the mean steps.

Run: ``python benchmarks/bench_energy.py [--n 2048] [--per-sample 32] [--concepts 112] [--classes 200]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from cbm.backbones import resolve_device
from cbm.models.energy import EnergyCBM


def synthetic(n: int, dim: int, concepts: int, classes: int, seed: int = 0):
    """Class-specific concept profiles, features along random concept directions plus noise."""
    fixed = torch.Generator().manual_seed(1234)
    directions = torch.randn(concepts, dim, generator=fixed) / dim ** 0.5
    profiles = (torch.rand(classes, concepts, generator=fixed) < 0.3).float() * 0.8 + 0.1
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    c = (torch.rand(n, concepts, generator=g) < profiles[y]).float()
    return c @ directions + 0.3 * torch.randn(n, dim, generator=g), y, c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048, help="samples for batched inference")
    parser.add_argument("--per-sample", type=int, default=32, help="samples timed one at a time")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--concepts", type=int, default=112)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of the benchmark model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x, y, c = synthetic(4000, args.dim, args.concepts, args.classes)
    vx, vy, vc = synthetic(800, args.dim, args.concepts, args.classes, seed=1)
    tx, _, _ = synthetic(args.n, args.dim, args.concepts, args.classes, seed=2)
    device = str(resolve_device(args.device))
    started = time.perf_counter()
    model = EnergyCBM(hidden=args.hidden, max_epochs=args.epochs, batch_size=256, device=device,
                      inference_batch=args.n).fit(x, y, concept_labels=c, validation=(vx, vy), validation_concepts=vc)
    print(f"fitted on {len(x)} samples ({args.concepts} concepts, {args.classes} classes, hidden {args.hidden}) "
          f"in {time.perf_counter() - started:.1f} s on {device}")

    model.infer(tx[:8])  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    batched = model.infer(tx)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    batched_s = time.perf_counter() - started

    started = time.perf_counter()
    single = [model.infer(tx[i:i + 1]) for i in range(args.per_sample)]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    single_s = time.perf_counter() - started

    same = torch.cat([s.concept_probs for s in single])
    gap = float((same - batched.concept_probs[:args.per_sample]).abs().max())
    batched_rate, single_rate = args.n / batched_s, args.per_sample / single_s
    print(f"batched inference:    {batched_rate:10.1f} samples/s ({args.n} samples, {batched_s:.2f} s, "
          f"mean {batched.steps.float().mean():.0f} steps, max {int(batched.steps.max())})")
    print(f"per-sample inference: {single_rate:10.1f} samples/s ({args.per_sample} samples, {single_s:.2f} s)")
    print(f"ratio batched / per-sample: {batched_rate / single_rate:.1f}x; largest concept-probability gap "
          f"between the two on the same samples: {gap:.1e}")


if __name__ == "__main__":
    main()
