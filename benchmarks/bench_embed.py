"""Embedding extraction: ``cbm.embed`` against a bare ``encode_images`` loop, the cache's speed-up, and
peak memory as the data grows.

Throughput: both sides see the same images (noise generated at the model's input size, so
preprocessing is the minimum: to-tensor and normalise), the same batch size and threads, in one
process; the bare loop gets its batches preprocessed in advance. With ``--image-format jpeg|png`` the
images are held encoded and both sides decode them: ``cbm.embed`` in its loader, the bare loop inline.
Memory: each size runs in a fresh process (``workers=0``, so everything is in that process) that
embeds N images into a new cache; the peak resident memory above the start is split into the
returned features (N x D float32, which must grow linearly) and the rest, the extraction's working
memory, which must stay flat because shards stream to disk. Memory rows need Linux (``/proc/self/status``).

    python benchmarks/bench_embed.py [--backbone SPEC] [--n 512] [--batch-size 64] [--repeats 2]
        [--image-format jpeg] [--memory-backbone toy:cnn] [--memory-sizes 10000 100000] [--memory-shard-size 4096]
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import BenchResult, Row, best_of, format_table, in_fresh_process
from cbm.backbones import load_backbone
from cbm.data.base import ConceptDataset, digest
from cbm.embed import DEFAULT_SHARD_SIZE, embed

MB = 2 ** 20


class NoiseImages(ConceptDataset):
    """Random RGB images at a given size, drawn on demand from per-index seeds (nothing held in memory); with
    ``image_format`` ("jpeg", "png") they are encoded once, held as bytes, and decoded on every load."""

    def __init__(self, n: int, size: int, seed: int = 0, image_format: str | None = None) -> None:
        self.ids = [f"noise/{i}" for i in range(n)]
        self.labels = np.zeros(n, dtype=np.int64)
        self.class_names = ["noise"]
        self.size, self.seed, self.image_format = size, seed, image_format
        self.encoded = [self._encode(self._draw(i)) for i in range(n)] if image_format else None

    def _draw(self, index: int) -> Image.Image:
        rng = np.random.default_rng((self.seed, index))
        return Image.fromarray(rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8))

    def _encode(self, image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=self.image_format)
        return buffer.getvalue()

    def load(self, index: int) -> Image.Image:
        if self.encoded is None:
            return self._draw(index)
        return Image.open(io.BytesIO(self.encoded[index])).convert("RGB")

    def fingerprint(self) -> str:
        return digest("noise", len(self), self.seed, self.size, self.image_format)


def _memory_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _extraction_memory(spec: str, n: int, batch_size: int, shard_size: int, threads: int) -> tuple[float, float]:
    """In a fresh process: (peak resident MB above the start while embedding ``n`` images, MB of features)."""
    torch.set_num_threads(threads)
    backbone = load_backbone(spec, device="cpu")
    embed(backbone, NoiseImages(batch_size, backbone.input_size, seed=1), batch_size=batch_size, cache=False,
          num_workers=0, progress=False)  # warm-up: lazy initialisation and allocator pools
    data = NoiseImages(n, backbone.input_size)  # its ids are the dataset's memory, not the extraction's
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
    start = _memory_kb("VmRSS")
    with tempfile.TemporaryDirectory() as cache_dir:
        result = embed(backbone, data, batch_size=batch_size, cache_dir=cache_dir, num_workers=0, progress=False,
                       shard_size=shard_size)
        peak = _memory_kb("VmHWM")
    return (peak - start) / 1024, result.features.numel() * result.features.element_size() / MB


def memory_rows(spec: str, sizes: Sequence[int], batch_size: int, shard_size: int, threads: int) -> list[Row]:
    """Peak memory of extraction at each size against the smallest: working memory flat, features linear."""
    measured = {n: in_fresh_process(_extraction_memory, spec, n, batch_size, shard_size, threads) for n in sizes}
    small = min(sizes)
    (peak_small, features_small) = measured[small]
    rows = []
    for n in sorted(sizes)[1:]:
        peak, features = measured[n]
        working, working_small = peak - features, peak_small - features_small
        growth = working / max(working_small, 1e-9)
        rows.append(Row(f"extraction working memory, {n} vs {small} images", working, working_small, "MB", growth,
                        "<= 1.5x (flat)", growth <= 1.5))
        rows.append(Row(f"peak memory with the returned features, {n} vs {small}", peak, peak_small, "MB",
                        peak / max(peak_small, 1e-9), f"linear: features {features:.0f} MB", None))
    return rows


def measure(backbone: str = "torchvision:resnet18@random", n: int = 512, batch_size: int = 64,
            workers: int | None = None, repeats: int = 2, memory_backbone: str = "toy:cnn",
            memory_sizes: Sequence[int] = (10_000, 100_000), memory_shard_size: int = DEFAULT_SHARD_SIZE,
            threads: int = 0, image_format: str | None = None) -> BenchResult:
    """Throughput against the bare loop, the cached re-run's speed-up, and extraction memory at each size
    (none without ``memory_sizes``)."""
    if threads:
        torch.set_num_threads(threads)
    model = load_backbone(backbone)
    data = NoiseImages(n, model.input_size, image_format=image_format)

    def batch(start: int) -> torch.Tensor:
        return torch.stack([model.preprocess(data.load(i)) for i in range(start, min(start + batch_size, n))])

    model.encode_images(batch(0))  # warm-up
    if image_format:  # the bare loop decodes and preprocesses as it goes, as cbm.embed does
        bare = best_of(repeats, lambda: [model.encode_images(batch(start)) for start in range(0, n, batch_size)])
    else:
        batches = [batch(start) for start in range(0, n, batch_size)]
        bare = best_of(repeats, lambda: [model.encode_images(images) for images in batches])
    ours = best_of(repeats, lambda: embed(model, data, batch_size=batch_size, cache=False, num_workers=workers,
                                          progress=False))
    with tempfile.TemporaryDirectory() as cache_dir:
        first = best_of(1, lambda: embed(model, data, batch_size=batch_size, cache_dir=cache_dir,
                                         num_workers=workers, progress=False))
        cached = best_of(max(repeats, 3), lambda: embed(model, data, batch_size=batch_size, cache_dir=cache_dir,
                                                        progress=False))
    share_goal = 0.95 if model.device.type == "cuda" else 0.9
    rows = [
        Row("cbm.embed throughput / bare encode_images loop", n / ours, n / bare, "img/s", bare / ours,
            f">= {share_goal:g}x", bare / ours >= share_goal),
        Row("cached re-run: time, speed-up over first run", cached, first, "s", first / cached, ">= 50x faster",
            first / cached >= 50),
    ]
    if memory_sizes and Path("/proc/self/clear_refs").exists():
        rows += memory_rows(memory_backbone, memory_sizes, batch_size, memory_shard_size,
                            threads or torch.get_num_threads())
    decoded = f", {image_format} decoded in both" if image_format else ""
    setup = (f"{backbone} on {model.device}, {n} images at {model.input_size} px{decoded}, batch {batch_size}, "
             f"{torch.get_num_threads()} threads")
    if memory_sizes:
        setup += (f"; memory: {memory_backbone}, {' / '.join(str(size) for size in memory_sizes)} images, "
                  f"shards of {memory_shard_size}")
    return BenchResult("embed", setup, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="torchvision:resnet18@random")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-backbone", default="toy:cnn")
    parser.add_argument("--image-format", choices=["jpeg", "png"], default=None,
                        help="hold the images encoded; both sides decode them (default: raw pixels)")
    parser.add_argument("--memory-sizes", type=int, nargs="*", default=[10_000, 100_000],
                        help="sizes whose extraction memory is compared with the smallest's (none: skip)")
    parser.add_argument("--memory-shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                        help="working memory is bounded by one shard: sizes should exceed it")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    args = parser.parse_args()
    print(format_table([measure(args.backbone, args.n, args.batch_size, args.workers, args.repeats,
                                args.memory_backbone, args.memory_sizes, args.memory_shard_size, args.threads,
                                args.image_format)]))


if __name__ == "__main__":
    main()
