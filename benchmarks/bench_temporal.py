"""TemporalCBM inference: padded batches of mixed-length videos against one video at a time (what a
per-video loop, like the reference's explanation code, does), same model, same threads, one process.
Also checks that both give the same logits, and times one training epoch (optimiser steps per second).

Run: ``python benchmarks/bench_temporal.py [--videos 256] [--concepts 100] [--dim 512] [--batch 64]
[--min-len 4] [--max-len 64] [--threads 1] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import BenchResult, Row, format_table, time_calls
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


def measure(n_videos: int = 256, concepts: int = 100, dim: int = 512, classes: int = 10, batch: int = 64,
            min_len: int = 4, max_len: int = 64, threads: int = 1, device: str = "cpu") -> BenchResult:
    """Inference time in padded batches against one video at a time, their largest logit gap, one epoch's time."""
    torch.set_num_threads(threads)
    rng = np.random.default_rng(1)
    bank = ConceptBank([f"concept {k}" for k in range(concepts)],
                       torch.tensor(rng.normal(size=(concepts, dim)), dtype=torch.float32), kind="cav")
    data = videos(n_videos, dim, min_len, max_len, classes)
    val = videos(32, dim, min_len, max_len, classes, seed=2)
    started = time.perf_counter()
    model = TemporalCBM(bank, epochs=1, batch_size=32, device=device)
    training_s = time_calls(model, "_train")
    model.fit(data, validation=val)
    epoch = time.perf_counter() - started
    steps = -(-len(data) // model.batch_size)  # one epoch of length-sorted batches

    model.decision_function(data.subset(range(4)))  # warm-up
    started = time.perf_counter()
    batched = torch.cat([model.decision_function(data.subset(range(i, min(i + batch, len(data)))))
                         for i in range(0, len(data), batch)])
    t_batched = time.perf_counter() - started
    lengths = data.valid.sum(1).tolist()
    started = time.perf_counter()
    single = torch.cat([model.decision_function(data.features[i:i + 1, :n]) for i, n in enumerate(lengths)])
    t_single = time.perf_counter() - started
    gap = float((batched - single).abs().max())
    rows = [Row("MoTIF inference: padded batches vs one by one", n_videos / t_batched, n_videos / t_single,
                "videos/s", t_single / t_batched, "> 1x (none set)", t_single > t_batched),
            Row("MoTIF: max |logit difference| batched vs single", gap, None, "", None, "<= 1e-4", gap <= 1e-4),
            Row(f"MoTIF training: steps/s (batch {model.batch_size})", steps / training_s[0], None, "steps/s", None,
                "", None)]
    notes = [f"one training epoch (batch 32, incl. standardisation and validation): {epoch:.2f} s; "
             f"{int(sum(lengths))} windows in all"]
    setup = (f"{n_videos} videos of {min_len}-{max_len} windows, {concepts} concepts, D={dim}, batch {batch}, "
             f"{model.device}, {threads} thread(s)")
    return BenchResult("temporal", setup, rows, notes)


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
    parser.add_argument("--device", default="cpu", help="where the model trains and infers (cpu, cuda, auto)")
    args = parser.parse_args()
    print(format_table([measure(args.videos, args.concepts, args.dim, args.classes, args.batch, args.min_len,
                                args.max_len, args.threads, args.device)]))


if __name__ == "__main__":
    main()
