"""Embedding extraction: ``cbm.embed`` against a bare ``encode_images`` loop, and the cache's speed-up.

Both sides see the same images (already at the model's input size, so preprocessing is the
minimum: to-tensor and normalise), the same batch size and the same torch threads, in one
process. Run: ``python benchmarks/bench_embed.py [--backbone SPEC] [--n 512] [--batch-size 64]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from cbm.backbones import load_backbone
from cbm.data.base import ConceptDataset, digest
from cbm.embed import embed


class NoiseImages(ConceptDataset):
    """Random RGB images held in memory at the backbone's input size."""

    def __init__(self, n: int, size: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
        self.ids = [f"noise/{i}" for i in range(n)]
        self.labels = np.zeros(n, dtype=np.int64)
        self.class_names = ["noise"]
        self.seed = seed

    def load(self, index: int) -> Image.Image:
        return self.images[index]

    def fingerprint(self) -> str:
        return digest("noise", len(self), self.seed, self.images[0].size)


def best_of(repeats: int, work) -> float:
    """The fastest of ``repeats`` timed calls (seconds)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="torchvision:resnet18@random")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    backbone = load_backbone(args.backbone)
    data = NoiseImages(args.n, backbone.input_size)
    batches = [torch.stack([backbone.preprocess(data.load(i)) for i in range(start, min(start + args.batch_size, args.n))])
               for start in range(0, args.n, args.batch_size)]
    backbone.encode_images(batches[0])  # warm-up

    bare = best_of(args.repeats, lambda: [backbone.encode_images(batch) for batch in batches])
    ours = best_of(args.repeats, lambda: embed(backbone, data, batch_size=args.batch_size, cache=False,
                                               num_workers=args.workers, progress=False))
    with tempfile.TemporaryDirectory() as cache_dir:
        first = best_of(1, lambda: embed(backbone, data, batch_size=args.batch_size, cache_dir=cache_dir,
                                         num_workers=args.workers, progress=False))
        cached = best_of(max(args.repeats, 3), lambda: embed(backbone, data, batch_size=args.batch_size,
                                                             cache_dir=cache_dir, progress=False))

    print(f"backbone {backbone.spec} on {backbone.device}, {args.n} images, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch threads")
    rows = [
        ("cbm.embed throughput / bare encode_images loop", f"{args.n / ours:.1f} img/s",
         f"{args.n / bare:.1f} img/s", bare / ours, ">= 0.90"),
        ("cached re-run speed-up over first run", f"{cached * 1000:.1f} ms", f"{first * 1000:.0f} ms",
         first / cached, ">= 50x"),
    ]
    print(f"{'measure':<48} {'ours':>14} {'baseline':>14} {'ratio':>8}  goal")
    for name, value, baseline, ratio, goal in rows:
        print(f"{name:<48} {value:>14} {baseline:>14} {ratio:>8.2f}  {goal}")


if __name__ == "__main__":
    main()
