"""TemporalCBM inference: padded batches of mixed-length videos against one video at a time (what a
per-video loop, like the reference's explanation code, does), same model, same threads, one process.
Also checks that both give the same logits, and times one training epoch.

Run: ``python benchmarks/bench_temporal.py [--videos 256] [--concepts 100] [--dim 512] [--batch 64]
[--min-len 4] [--max-len 64] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cbm.models.temporal import TemporalCBM, VideoSequences, pad_sequences
from concepts.bank import ConceptBank


def videos(n: int, dim: int, min_len: int, max_len: int, classes: int, seed: int = 0) -> VideoSequences:
    rng = np.random.default_rng(seed)
    sequences = [torch.tensor(rng.normal(size=(int(rng.integers(min_len, max_len + 1)), dim)), dtype=torch.float32)
                 for _ in range(n)]
    x, valid = pad_sequences(sequences)
    spans = torch.zeros(*valid.shape, 2, dtype=torch.long)
    return VideoSequences(x, valid, torch.as_tensor(rng.integers(classes, size=n)), [str(i) for i in range(n)],
                          torch.full(valid.shape, -1), spans, [f"class {c}" for c in range(classes)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=256)
    parser.add_argument("--concepts", type=int, default=100)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(1)
    bank = ConceptBank([f"concept {k}" for k in range(args.concepts)],
                       torch.tensor(rng.normal(size=(args.concepts, args.dim)), dtype=torch.float32), kind="cav")
    data = videos(args.videos, args.dim, args.min_len, args.max_len, args.classes)
    val = videos(32, args.dim, args.min_len, args.max_len, args.classes, seed=2)
    started = time.perf_counter()
    model = TemporalCBM(bank, epochs=1, batch_size=32, device="cpu").fit(data, validation=val)
    epoch = time.perf_counter() - started

    model.decision_function(data.subset(range(4)))  # warm-up
    started = time.perf_counter()
    batched = torch.cat([model.decision_function(data.subset(range(i, min(i + args.batch, len(data)))))
                         for i in range(0, len(data), args.batch)])
    t_batched = time.perf_counter() - started
    lengths = data.valid.sum(1).tolist()
    started = time.perf_counter()
    single = torch.cat([model.decision_function(data.features[i:i + 1, :n]) for i, n in enumerate(lengths)])
    t_single = time.perf_counter() - started
    windows = int(sum(lengths))
    print(f"{args.videos} videos of {args.min_len}-{args.max_len} windows ({windows} windows), "
          f"{args.concepts} concepts, D={args.dim}, {args.threads} thread(s)")
    print(f"  one training epoch (batch 32, incl. standardisation and validation): {epoch:.2f} s")
    print(f"  padded batches of {args.batch}: {t_batched:.3f} s  ({args.videos / t_batched:,.0f} videos/s, "
          f"{windows / t_batched:,.0f} windows/s)")
    print(f"  one by one:              {t_single:.3f} s  ({args.videos / t_single:,.0f} videos/s)")
    print(f"  throughput ratio batched / one-by-one: {t_single / t_batched:.1f}x; "
          f"max |logit difference| {float((batched - single).abs().max()):.2e}")


if __name__ == "__main__":
    main()
