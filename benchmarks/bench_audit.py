"""Audit report speed: 10,000 samples x 200 concepts x 10 classes on cached embeddings (goal <= 30 s).

The embeddings are synthetic (what the embedding cache hands back: features, labels, concept
labels) for a train split, the audited split and a shifted split of ``--samples`` each; a PCBM is
fitted on train outside the timing. The audit is the full report: accuracy against a linear probe
on the embeddings, confusion, importance, explained samples with counterfactuals, intervention
curves (4 policies x 2 expert competences x 3 seeds on at most 2,000 samples), suspect concepts
with ablations on train and the shifted split, concept quality, leakage, figures and the HTML.
Rows: the audit's time and the share spent in plotting; the time per section is a note.

    python benchmarks/bench_audit.py [--samples 10000] [--concepts 200] [--classes 10] [--dim 512]
        [--threads 1] [--out /tmp/bench-audit]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import BenchResult, Row, format_table
from cbm.embed import Embeddings
from cbm.models import PosthocCBM
from concepts.bank import ConceptBank
from explain import audit


def synthetic_splits(samples: int, concepts: int, classes: int, dim: int, seed: int = 0) -> tuple[ConceptBank, dict]:
    """Embeddings built from binary concepts along random directions; each class favours a few concepts;
    in train the last concept follows the class (a spurious cue), in the shifted split it does not."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(concepts, dim, generator=generator), dim=1)
    profile = (torch.rand(classes, concepts, generator=generator) < 0.05).float() * 3.0
    names = [f"concept {k}" for k in range(concepts)]

    def split(name: str, spurious: bool) -> Embeddings:
        present = (torch.rand(samples, concepts, generator=generator) < 0.2).float()
        labels = (present @ profile.T + torch.randn(samples, classes, generator=generator)).argmax(1)
        if spurious:
            present[:, -1] = (labels % 2).float()
        features = present @ directions * 2.0 + 0.5 * torch.randn(samples, dim, generator=generator)
        return Embeddings(features, labels, [f"{name}-{i}" for i in range(samples)], [f"class {c}" for c in range(classes)],
                          "synthetic", "synthetic", names, present)

    bank = ConceptBank(names, directions, kind="cav", provenance={"generator": "bench_audit synthetic"})
    return bank, {"train": split("train", True), "test": split("test", True), "shift": split("shift", False)}


def measure(samples: int = 10_000, concepts: int = 200, classes: int = 10, dim: int = 512, threads: int = 1,
            out: str | None = None) -> BenchResult:
    """Time of the full audit report (goal <= 30 s) and the share of it spent plotting."""
    torch.set_num_threads(threads)
    bank, splits = synthetic_splits(samples, concepts, classes, dim)
    started = time.perf_counter()
    model = PosthocCBM(bank, max_iter=500).fit(splits["train"], validation=splits["test"])
    fit_s = time.perf_counter() - started
    out = out or tempfile.mkdtemp(prefix="bench-audit-")
    started = time.perf_counter()
    report = audit(model, splits["test"], name="pcbm", data_name="synthetic", train=splits["train"],
                   shift=splits["shift"], out=out, progress=False)
    total = time.perf_counter() - started
    timings = report.data["timings_seconds"]
    rows = [Row(f"audit report: {samples} x {concepts} concepts x {classes} classes", total, None, "s", None,
                "<= 30 s", total <= 30),
            Row("audit report: share spent plotting", 100 * timings["plots"] / total, None, "%", None, "", None)]
    sections = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items() if name != "total")
    suspects = report.data["suspects"]
    notes = [f"sections: {sections}",
             f"PCBM fit (not timed): {fit_s:.1f} s; top suspect: {suspects[0]['concept'] if suspects else None}; "
             f"report in {out}"]
    return BenchResult("audit", f"{samples} samples x {concepts} concepts x {classes} classes, D={dim}, "
                                f"{threads} thread(s)", rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--concepts", type=int, default=200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on shared or busy cores more threads oversubscribe)")
    parser.add_argument("--out", default=None, help="where to write the report (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(format_table([measure(args.samples, args.concepts, args.classes, args.dim, args.threads, args.out)]))


if __name__ == "__main__":
    main()
