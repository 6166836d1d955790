"""The concept editor's responsiveness: after a slider moves, the editor recomputes the prediction from
the sample's cached embedding (only the head runs: ``app.session.intervention_outcome``). The baseline
recomputes from the image instead (the backbone forward, then the same head work). Goal: <= 100 ms for
200 concepts on CPU.

Run: ``python benchmarks/bench_editor.py [--concepts 200] [--changed 3] [--backbone torchvision:resnet18@random]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.session import intervention_outcome
from benchmarks.common import BenchResult, Row, best_of, format_table
from cbm.backbones import load_backbone
from cbm.models import PosthocCBM
from concepts import ConceptBank

GOAL_SECONDS = 0.1


def synthetic_model(dim: int, concepts: int, classes: int, n: int = 2000, seed: int = 0) -> PosthocCBM:
    """A PCBM over ``concepts`` random unit directions, fitted on synthetic features whose class depends on them."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(concepts, dim, generator=g), dim=1)
    present = (torch.rand(n, concepts, generator=g) < 0.3).float()
    features = present @ directions + 0.3 * torch.randn(n, dim, generator=g)
    labels = (present @ torch.randn(concepts, classes, generator=g)).argmax(1)
    bank = ConceptBank([f"concept {k}" for k in range(concepts)], directions)
    return PosthocCBM(bank, lam=1e-3).fit(features, labels, validation=(features[:200], labels[:200]))


def measure(concepts: int = 200, classes: int = 10, changed: int = 3, backbone: str = "torchvision:resnet18@random",
            repeats: int = 5, threads: int = 1) -> BenchResult:
    """Best-of-``repeats`` timing of one slider change: cached embedding vs recomputing from the image."""
    if threads:
        torch.set_num_threads(threads)
    encoder = load_backbone(backbone, device="cpu")
    model = synthetic_model(encoder.embed_dim, concepts, classes)
    image = Image.new("RGB", (320, 240), (180, 90, 40))
    features = encoder.embed_pil([image])
    current = model.concepts(features)[0]
    values = {model.concept_names[k]: float(current[k]) + 1.0 for k in range(changed)}

    ours = best_of(repeats, lambda: intervention_outcome(model, features, values))
    baseline = best_of(repeats, lambda: intervention_outcome(model, encoder.embed_pil([image]), values))
    rows = [Row(f"editor: slider change -> new prediction ({concepts} concepts)", ours, baseline, "s",
                baseline / max(ours, 1e-12), f"<= {GOAL_SECONDS * 1000:.0f} ms", ours <= GOAL_SECONDS)]
    setup = (f"PCBM with {concepts} concepts, {classes} classes, {changed} concepts changed; baseline re-embeds the "
             f"image with {backbone}; best of {repeats}, {torch.get_num_threads()} threads")
    notes = [f"ours {ours * 1000:.1f} ms (head only, cached embedding); recomputing from the image {baseline * 1000:.1f} ms"]
    return BenchResult("editor", setup, rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=int, default=200)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--changed", type=int, default=3, help="concepts moved at once")
    parser.add_argument("--backbone", default="torchvision:resnet18@random", help="backbone of the baseline")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice; default 1)")
    args = parser.parse_args()
    print(format_table([measure(args.concepts, args.classes, args.changed, args.backbone, threads=args.threads)]))


if __name__ == "__main__":
    main()
