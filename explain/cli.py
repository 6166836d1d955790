"""``cbm audit``: batch audit reports from the command line, with CI gating by exit code; ``cbm tcav``:
TCAV with statistics at a backbone layer.

``add_commands(subparsers)`` adds the subcommands to the ``cbm`` parser. Each model's datasets are
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

from cbm.untrusted import for_terminal
from concepts.cavs import SOLVERS

logger = logging.getLogger(__name__)

EPILOG = """examples:
  cbm audit pcbm.cbm --data toy:images@test --out audit/
  cbm audit motif.cbm --data toy:videos@test --out audit/      # a temporal (video) model: timelines, attention
  cbm audit pcbm.cbm pcbm-h.cbm --data toy:spurious@val --train toy:spurious@train --shift toy:spurious@test \\
      --out audit/ --fail-under accuracy=0.8 --fail-under concept_auc=0.7

gate metrics (--fail-under METRIC=VALUE, repeatable): accuracy, balanced_accuracy, min_class_accuracy,
completeness, concept_auc, concept_accuracy, shift_accuracy, oracle_gain, probe_accuracy, localisation (videos)"""


TCAV_EPILOG = """examples:
  cbm tcav cnn-cavs.cbm --data toy:images@val --layer stage3 --target tomato --concept red --out tcav/
  cbm tcav pcbm.cbm --data cub:/data/CUB_200_2011@val --layer visual.layer4 --target "Cardinal" \\
      --concept "has_primary_color::red" --random folder:/data/random_images
  cbm tcav pcbm.cbm --data folder:/data/birds --concept-data folder:/data/concepts --layer visual.layer3 \\
      --target robin --concept striped dotted

A pair is "significant" when its TCAV score differs from the random concepts' scores (a t-test of the
score as one more random concept, Holm-corrected over all pairs). "not significant" pairs should not be
read as explanations."""


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

    def backbone(self, model: Any) -> Any:
        """The model's backbone, loaded once and checked against the one the model was fitted on."""
        from cbm.backbones import load_backbone

        if model.backbone_spec_ not in self.backbones:
            self.backbones[model.backbone_spec_] = load_backbone(model.backbone_spec_, device=self.device)
        backbone = self.backbones[model.backbone_spec_]
        if model.backbone_fingerprint_ and backbone.fingerprint != model.backbone_fingerprint_:
            raise ValueError(f"the backbone {model.backbone_spec_} loaded here differs from the one the model was "
                             "fitted on (weights or preprocessing changed); refit the model or restore those weights.")
        return backbone

    def __call__(self, spec: str, model: Any) -> Any:
        from cbm.embed import embed

        return embed(self.backbone(model), self.dataset(spec), cache_dir=self.cache_dir)


def cmd_audit(args: argparse.Namespace) -> int:
    """Audit models on datasets: one HTML + JSON report each, an index with a summary table."""
    from cbm.files import refuse_existing
    from cbm.models import load
    from explain.audit import parse_gates
    from explain.batch import audit_many, report_folder, summary_lines
    from explain.video import dataset_events

    gates = parse_gates(args.fail_under)
    paths: dict[str, str] = {}
    for path in args.models:
        paths[Path(path).stem if Path(path).stem not in paths else str(path)] = path
    out = Path(args.out)
    refuse_existing([out / "index.html", out / "summary.json",
                     *(out / report_folder(name, spec) for name in paths for spec in args.data)], args.force)
    models = {name: load(path) for name, path in paths.items()}
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
    print(f"\nreports: {for_terminal(batch.paths['html'].resolve())} (summary), "
          f"{for_terminal(batch.paths['json'].resolve())}")
    if batch.failures:
        print("\ngates FAILED:\n  " + "\n  ".join(map(for_terminal, batch.failures)))
        return 1
    if gates:
        print("all gates passed")
    return 0


def cmd_tcav(args: argparse.Namespace) -> int:
    """TCAV: which concepts a class's logit is sensitive to at a backbone layer, with t-tests and Holm."""
    import json

    import numpy as np

    from cbm.files import atomic_path, atomic_write_text, refuse_existing
    from cbm.models import load
    from explain.tcav import tcav_datasets

    outputs = [Path(args.out) / "tcav.json", Path(args.out) / "tcav.png"] if args.out else []
    refuse_existing(outputs, args.force)
    model = load(args.model)
    if model.family == "temporal":
        raise ValueError("TCAV takes image models; a temporal model's logits come from whole videos.")
    embedder = _Embedder(args.cache_dir, args.device)
    report = tcav_datasets(
        embedder.backbone(model), None if args.layer == "embedding" else args.layer, model, model.class_names,
        embedder.dataset(args.data), args.target, args.concept,
        concept_data=embedder.dataset(args.concept_data) if args.concept_data else None,
        random_data=embedder.dataset(args.random) if args.random else None, examples=args.examples,
        random_concepts=args.random_concepts, runs=args.runs, pooling=args.pooling, solver=args.solver,
        negatives=args.negatives, alpha=args.alpha, seed=args.seed, progress=not args.quiet)
    print(f"TCAV at {report.settings['layer']} ({args.runs} CAVs per concept, solver {report.settings['solver']}, "
          f"{report.settings['negatives']} negatives, {args.random_concepts} random concepts, alpha {args.alpha}, "
          f"Holm over {len(report.results)} pairs)")
    print(f"{'concept':<24} {'class':<20} {'score':>6} {'random':>13} {'CAV acc':>8} {'p (Holm)':>9}  verdict")
    for r in report.results:
        spread = f"{r.random_mean:.2f} ± {float(np.std(r.random_scores)):.2f}"
        print(f"{for_terminal(r.concept)[:24]:<24} {for_terminal(r.target)[:20]:<20} {r.mean:>6.2f} {spread:>13} "
              f"{r.cav_accuracy:>8.2f} {r.p_adjusted:>9.3g}  {'significant' if r.significant else 'not significant'}")
    if args.out:
        figure = report.plot()
        atomic_write_text(outputs[0], json.dumps(report.to_dict(), indent=2))
        with atomic_path(outputs[1]) as tmp:
            figure.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
        print(f"\nwrote {for_terminal(outputs[0].resolve())} and {for_terminal(outputs[1].resolve())}")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``audit`` and ``tcav`` to the ``cbm`` command line."""
    audit = subparsers.add_parser("audit", help="audit reports (HTML + JSON) of models on datasets; CI gates",
                                  description=cmd_audit.__doc__, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    audit.add_argument("models", nargs="+", metavar="MODEL", help="model bundles (cbm fit ... --out MODEL)")
    audit.add_argument("--data", nargs="+", required=True, metavar="DATASET",
                       help="labelled dataset specs to audit on, e.g. toy:images@test")
    audit.add_argument("--out", required=True, help="output folder (index.html, summary.json, one folder per audit)")
    audit.add_argument("--force", action="store_true", help="replace the reports of an earlier run in --out")
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

    tcav = subparsers.add_parser("tcav", help="TCAV with statistics: is a class sensitive to a concept at a layer?",
                                 description=cmd_tcav.__doc__, epilog=TCAV_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    tcav.add_argument("model", help="model bundle (an image model; its backbone gives the layers)")
    tcav.add_argument("--data", required=True, metavar="DATASET",
                      help="labelled image dataset: the classes' examples, concept examples from its concept labels, "
                           "and random examples from the rest")
    tcav.add_argument("--layer", required=True, help="backbone module, e.g. stage3 or visual.layer3; 'embedding' for "
                                                     "the backbone's output (an unknown name lists some layers)")
    tcav.add_argument("--target", nargs="+", required=True, metavar="CLASS", help="classes to test")
    tcav.add_argument("--concept", nargs="+", required=True, metavar="CONCEPT", help="concepts to test")
    tcav.add_argument("--concept-data", metavar="DATASET",
                      help="concept examples, one class folder per concept (e.g. folder:/data/concepts)")
    tcav.add_argument("--random", metavar="DATASET", help="random examples (default: the rest of --data); "
                      "(--runs + --random-concepts) x --examples of them with independent negatives")
    tcav.add_argument("--examples", type=int, default=20, help="examples per class and per concept (default 20)")
    tcav.add_argument("--random-concepts", type=int, default=20, help="random concepts of the baseline (default 20)")
    tcav.add_argument("--runs", type=int, default=10, help="CAVs per concept, each against fresh negatives (default 10)")
    tcav.add_argument("--pooling", choices=["mean", "flatten"], default="mean",
                      help="conv activations: mean over positions (default) or flattened as in the TCAV paper")
    tcav.add_argument("--solver", choices=SOLVERS, default="fastcav",
                      help="CAV learner: fastcav (mean-difference direction, default); a linear SVM with SVC's hinge "
                           "loss (torch, or scikit-learn's SVC: sklearn) or LinearSVC's squared hinge (newton, or "
                           "scikit-learn's LinearSVC: liblinear). The TCAV paper used a linear classifier too")
    tcav.add_argument("--negatives", choices=["independent", "shared"], default="independent",
                      help="independent (default, as Kim et al.): a fresh set of random negatives per run; shared: "
                           "each run's negatives drawn from one pool of 2 x --examples (fewer random images)")
    tcav.add_argument("--alpha", type=float, default=0.05, help="significance level after Holm (default 0.05)")
    tcav.add_argument("--seed", type=int, default=0, help="seed of the example draws and CAVs (default 0)")
    tcav.add_argument("--out", help="folder for tcav.json and tcav.png")
    tcav.add_argument("--force", action="store_true", help="replace tcav.json and tcav.png if --out holds them")
    tcav.add_argument("--device", default="auto", help="device of the backbone (auto, cpu, cuda)")
    tcav.add_argument("--cache-dir", help="cache root (default: $CBM_CACHE_DIR or ~/.cache/cbm)")
    tcav.add_argument("--quiet", action="store_true", help="no progress bars")
    tcav.set_defaults(run=cmd_tcav)
