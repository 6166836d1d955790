"""``cbm audit``: batch audit reports from the command line, with CI gating by exit code.

``add_commands(subparsers)`` adds the subcommand to the ``cbm`` parser. Each model's datasets are
embedded with the model's own backbone through the embedding cache (after checking that the
backbone loaded here is the one the model was fitted on). Exit codes: 0 all audits passed their
gates, 1 a gate failed (the failures are printed), 2 an error (reported by ``cbm``'s main).
"""

from __future__ import annotations

import argparse
import functools
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EPILOG = """examples:
  cbm audit pcbm.cbm --data toy:images@test --out audit/
  cbm audit motif.cbm --data toy:videos@test --out audit/      # a temporal (video) model: timelines, attention
  cbm audit pcbm.cbm pcbm-h.cbm --data toy:spurious@val --train toy:spurious@train --shift toy:spurious@test \\
      --out audit/ --fail-under accuracy=0.8 --fail-under concept_auc=0.7

gate metrics (--fail-under METRIC=VALUE, repeatable): accuracy, balanced_accuracy, min_class_accuracy,
completeness, concept_auc, concept_accuracy, shift_accuracy, oracle_gain, probe_accuracy, localisation (videos)"""


class _Embedder:
    """Loads each backbone and dataset once and embeds datasets for models through the cache."""

    def __init__(self, cache_dir: str | None, device: str) -> None:
        self.cache_dir, self.device = cache_dir, device
        self.backbones: dict[str, Any] = {}
        self.datasets: dict[str, Any] = {}

    def dataset(self, spec: str) -> Any:
        from cbm.data.registry import load_dataset

        if spec not in self.datasets:
            self.datasets[spec] = load_dataset(spec)
        return self.datasets[spec]

    def __call__(self, spec: str, model: Any) -> Any:
        from cbm.backbones import load_backbone
        from cbm.embed import embed

        if model.backbone_spec_ not in self.backbones:
            self.backbones[model.backbone_spec_] = load_backbone(model.backbone_spec_, device=self.device)
        backbone = self.backbones[model.backbone_spec_]
        if model.backbone_fingerprint_ and backbone.fingerprint != model.backbone_fingerprint_:
            raise ValueError(f"the backbone {model.backbone_spec_} loaded here differs from the one the model was "
                             "fitted on (weights or preprocessing changed); refit the model or restore those weights.")
        return embed(backbone, self.dataset(spec), cache_dir=self.cache_dir)


def cmd_audit(args: argparse.Namespace) -> int:
    """Audit models on datasets: one HTML + JSON report each, an index with a summary table."""
    from cbm.models import load
    from explain.audit import parse_gates
    from explain.batch import audit_many, summary_lines
    from explain.video import dataset_events

    gates = parse_gates(args.fail_under)
    models = {}
    for path in args.models:
        name = Path(path).stem if Path(path).stem not in models else str(path)
        models[name] = load(path)
    embedder = _Embedder(args.cache_dir, args.device)

    def source(spec: str | None) -> Any:
        return None if spec is None else functools.partial(embedder, spec)

    batch = audit_many(models, {spec: source(spec) for spec in args.data}, args.out, train=source(args.train),
                       shift=source(args.shift),
                       images=None if args.no_thumbnails else {spec: embedder.dataset(spec) for spec in args.data},
                       events={spec: dataset_events(embedder.dataset(spec)) for spec in args.data},
                       gates=gates, seeds=tuple(range(args.seeds)), competences=tuple(args.competence),
                       max_samples=args.max_samples, progress=not args.quiet)
    print("\n".join(summary_lines(batch)))
    print(f"\nreports: {batch.paths['html'].resolve()} (summary), {batch.paths['json'].resolve()}")
    if batch.failures:
        print("\ngates FAILED:\n  " + "\n  ".join(batch.failures))
        return 1
    if gates:
        print("all gates passed")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``audit`` to the ``cbm`` command line."""
    audit = subparsers.add_parser("audit", help="audit reports (HTML + JSON) of models on datasets; CI gates",
                                  description=cmd_audit.__doc__, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    audit.add_argument("models", nargs="+", metavar="MODEL", help="model bundles (cbm fit ... --out MODEL)")
    audit.add_argument("--data", nargs="+", required=True, metavar="DATASET",
                       help="labelled dataset specs to audit on, e.g. toy:images@test")
    audit.add_argument("--out", required=True, help="output folder (index.html, summary.json, one folder per audit)")
    audit.add_argument("--train", metavar="DATASET", help="training split: probes for completeness and leakage, and "
                                                          "the in-distribution side of the shift test")
    audit.add_argument("--shift", metavar="DATASET", help="a shifted split: its accuracy, and suspect concepts whose "
                                                          "removal costs accuracy on train but not there")
    audit.add_argument("--fail-under", action="append", default=[], metavar="METRIC=VALUE",
                       help="exit with status 1 when a metric is below VALUE (repeatable), e.g. accuracy=0.8")
    audit.add_argument("--seeds", type=int, default=3, help="seeds of the intervention curves (default 3)")
    audit.add_argument("--competence", type=float, nargs="+", default=[1.0, 0.8],
                       help="expert competences of the intervention curves (default 1.0 0.8)")
    audit.add_argument("--max-samples", type=int, default=2000, help="samples for the intervention curves (default 2000)")
    audit.add_argument("--no-thumbnails", action="store_true", help="leave sample images out of the reports")
    audit.add_argument("--device", default="auto", help="device of the backbones (auto, cpu, cuda)")
    audit.add_argument("--cache-dir", help="cache root (default: $CBM_CACHE_DIR or ~/.cache/cbm)")
    audit.add_argument("--quiet", action="store_true", help="no progress bars")
    audit.set_defaults(run=cmd_audit)
