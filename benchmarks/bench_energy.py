"""ECBM gradient inference: batched (all samples optimised together, converged ones frozen) against
per-sample inference (one sample at a time, as a naive loop would do), on the same fitted model, and
``predict``'s throughput in samples/s (the row to compare across commits: the same file runs on older code),
and the training loop's optimiser steps per second (validation losses included, inference-weight selection not).

The model is fitted briefly on synthetic embeddings with CUB-like sizes by default (112 concepts,
200 classes, 512-d features); the weights only need to be realistic enough for inference to take
a realistic number of steps. Prints samples/s for both and their ratio, plus the mean steps.

Run: ``python benchmarks/bench_energy.py [--n 2048] [--per-sample 32] [--concepts 112] [--classes 200]
[--train 4000] [--val 800] [--threads 0]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import BenchResult, Row, format_table, time_calls
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


def measure(n: int = 2048, per_sample: int = 32, dim: int = 512, concepts: int = 112, classes: int = 200,
            hidden: int = 256, epochs: int = 5, train: int = 4000, val: int = 800, device: str = "auto",
            threads: int = 0) -> BenchResult:
    """Batched against per-sample gradient inference on one briefly fitted model."""
    if threads:
        torch.set_num_threads(threads)
    x, y, c = synthetic(train, dim, concepts, classes)
    vx, vy, vc = synthetic(val, dim, concepts, classes, seed=1)
    tx, _, _ = synthetic(n, dim, concepts, classes, seed=2)
    device = str(resolve_device(device))
    started = time.perf_counter()
    model = EnergyCBM(hidden=hidden, max_epochs=epochs, batch_size=256, device=device, inference_batch=n)
    training_s = time_calls(model, "_train")
    model.fit(x, y, concept_labels=c, validation=(vx, vy), validation_concepts=vc)
    fit_s = time.perf_counter() - started
    steps = model.training_["epochs"] * -(-model.training_["samples"] // model.batch_size)

    def timed(work):
        started = time.perf_counter()
        result = work()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return result, time.perf_counter() - started

    model.infer(tx[:8])  # warm-up
    cpu_started = time.process_time()
    _, predict_s = timed(lambda: model.predict(tx))
    predict_cpu_s = time.process_time() - cpu_started
    batched, batched_s = timed(lambda: model.infer(tx))
    single, single_s = timed(lambda: [model.infer(tx[i:i + 1]) for i in range(per_sample)])
    gap = float((torch.cat([s.concept_probs for s in single]) - batched.concept_probs[:per_sample]).abs().max())
    batched_rate, single_rate = n / batched_s, per_sample / single_s
    rows = [Row(f"ECBM predict: {n} samples", n / predict_s, None, "samples/s", None, "", None),
            Row("ECBM inference: batched vs per-sample", batched_rate, single_rate, "samples/s",
                batched_rate / single_rate, "> 1x (none set)", batched_rate > single_rate),
            Row(f"ECBM training: steps/s (batch {model.batch_size})", steps / training_s[0], None, "steps/s", None, "",
                None)]
    notes = [f"model fitted on {train} samples in {fit_s:.1f} s; batched: mean {batched.steps.float().mean():.0f} "
             f"steps (max {int(batched.steps.max())}); largest concept-probability gap batched vs per-sample on the "
             f"same samples: {gap:.1e}",
             f"predict: {predict_s:.2f} s wall, {predict_cpu_s:.2f} s CPU time of this process "
             f"({n / predict_cpu_s:.1f} samples per CPU second: the figure to compare runs on a busy machine)"]
    setup = (f"{n} samples batched, {per_sample} one at a time; {concepts} concepts, {classes} classes, D={dim}, "
             f"hidden {hidden}, {device}, {torch.get_num_threads()} threads")
    return BenchResult("energy", setup, rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048, help="samples for batched inference")
    parser.add_argument("--per-sample", type=int, default=32, help="samples timed one at a time")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--concepts", type=int, default=112)
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of the benchmark model")
    parser.add_argument("--train", type=int, default=4000, help="training samples of the benchmark model")
    parser.add_argument("--val", type=int, default=800, help="its validation samples")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args()
    print(format_table([measure(args.n, args.per_sample, args.dim, args.concepts, args.classes, args.hidden,
                                args.epochs, args.train, args.val, args.device, args.threads)]))


if __name__ == "__main__":
    main()
