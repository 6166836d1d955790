"""The ``cbm`` command line: one subcommand per job, each with its own ``--help``."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from cbm.untrusted import TerminalLogFormatter, for_terminal

logger = logging.getLogger("cbm")

DESCRIPTION = """Concept bottleneck models on frozen CLIP and CNN backbones.

Start with `cbm demo` (offline, a few minutes on a laptop CPU)."""

EMBED_EPILOG = """examples:
  cbm embed toy:clip toy:images@test
  cbm embed openclip:ViT-B-32@laion2b_s34b_b79k folder:/data/birds --batch-size 128 --dtype float16
  cbm embed torchvision:resnet50@IMAGENET1K_V2 cub:/data/CUB_200_2011@train --out cub_train.safetensors
  torchrun --nproc_per_node 4 -m cbm.cli embed openclip:ViT-B-32@laion2b_s34b_b79k folder:/data/birds
      (each rank embeds its share of the missing shards into the shared cache; rank 0 reports)

backbones: openclip:ARCH@TAG, openclip:hf-hub:ORG/REPO, openclip:local-dir:PATH,
           torchvision:ARCH@WEIGHTS, timm:NAME, toy:clip, toy:cnn
datasets:  folder:PATH, manifest:FILE.csv|.jsonl, cifar10:ROOT@split, cifar100:ROOT@split,
           cub:ROOT@split, frames:PATH, videos:PATH, toy:images@split, toy:spurious@split,
           toy:videos@split"""

FIT_EPILOG = """examples:
  cbm fit posthoc --backbone toy:clip --data toy:images@train --val toy:images@val --concepts toy --out pcbm.cbm
  cbm fit posthoc --backbone toy:cnn --data toy:images@train --concepts labels --hybrid --out pcbm-h.cbm
  cbm fit posthoc --backbone openclip:RN50@openai --data cifar10:/data/cifar@train --concepts bank/ --out c10.cbm
  cbm fit labo --backbone toy:clip --data toy:images@train --val toy:images@val --concepts toy --shots 1 --out labo.cbm
  cbm fit sparse --backbone toy:clip --data toy:images@train --val toy:images@val --concepts toy --out sparse.cbm
  cbm fit energy --backbone toy:cnn --data toy:images@train --val toy:images@val --concepts labels --out ecbm.cbm
  cbm fit cbm --backbone toy:cnn --data toy:images@train --val toy:images@val --training joint --out cbm.cbm
  cbm fit cem --backbone toy:cnn --data toy:images@train --val toy:images@val --out cem.cbm
  cbm fit temporal --backbone toy:clip --data toy:videos@train --val toy:videos@val --concepts toy --out motif.cbm"""


def _directory_size(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def cmd_info(args: argparse.Namespace) -> int:
    """Versions, devices and cache locations with their sizes; or what a model bundle holds."""
    if args.model:
        print(describe_model(args.model))
        return 0
    import open_clip
    import timm
    import torch
    import torchvision
    from huggingface_hub import constants

    import cbm
    from cbm.embed import cache_entries, default_cache_dir

    print(f"cbm {cbm.__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"torchvision {torchvision.__version__}  open_clip {open_clip.__version__}  timm {timm.__version__}")
    print(f"CPU threads: {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            print(f"cuda:{index}: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                  f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        print("CUDA: not available (models run on the CPU)")
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    locations = {
        "embedding cache (CBM_CACHE_DIR)": cache / "embeddings",
        "Hugging Face hub cache (HF_HOME)": Path(constants.HF_HUB_CACHE),
        "torch hub cache (TORCH_HOME)": Path(torch.hub.get_dir()),
        "OpenAI CLIP URL cache": Path("~/.cache/clip").expanduser(),
    }
    for name, path in locations.items():
        state = _human(_directory_size(path)) if path.is_dir() else "empty"
        print(f"{name}: {path} ({state})")
    entries = cache_entries(cache)
    for entry in entries:
        what = "incomplete" if entry.get("incomplete") else (
            f"{entry['backbone']} on {entry['dataset']} [{entry['dtype']}]")
        print(for_terminal(f"  {entry['key']}  {_human(entry['bytes']):>9}  {what}"))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed a dataset with a backbone into the cache (and optionally export the features)."""
    import torch
    from safetensors.torch import save_file

    from cbm.backbones import load_backbone
    from cbm.data.registry import load_dataset
    from cbm.embed import DEFAULT_SHARD_SIZE, embed
    from cbm.files import atomic_path, atomic_write_text, refuse_existing

    outputs = _embed_outputs(args.out) if args.out else ()
    refuse_existing(outputs, args.force)
    options = {"on_error": args.on_error}
    if args.window:
        options["window"] = args.window
    dataset = load_dataset(args.data, **options)
    backbone = load_backbone(args.backbone, device=args.device, layer=args.layer)
    result = embed(backbone, dataset, batch_size=args.batch_size, cache_dir=args.cache_dir,
                   num_workers=args.workers, dtype=args.dtype, shard_size=args.shard_size or DEFAULT_SHARD_SIZE)
    if torch.distributed.is_available() and torch.distributed.is_initialized():  # torchrun: every rank holds the same result; rank 0 reports
        rank = torch.distributed.get_rank()
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
    print(f"embedded {len(result)} samples of {for_terminal(dataset.describe())} with {for_terminal(backbone.spec)}: "
          f"features {tuple(result.features.shape)}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable samples (listed in the log above)")
    if outputs:
        features, ids = outputs
        with atomic_path(features) as tmp:
            save_file({"features": result.features.contiguous(), "labels": result.labels}, str(tmp),
                      metadata={"backbone": backbone.spec, "backbone_fingerprint": backbone.fingerprint})
        atomic_write_text(ids, json.dumps({"ids": result.ids, "class_names": result.class_names,
                                           "skipped": result.skipped}, indent=1))
        print(f"wrote {for_terminal(features)} and {for_terminal(ids)}")
    return 0


def _embed_outputs(out: str) -> tuple[Path, Path]:
    """``cbm embed --out``'s two files: the features (safetensors) and, beside them, the ids (.json)."""
    features = Path(out)
    ids = features.with_suffix(".json")
    if ids == features:
        raise ValueError(f"--out {out} would put the features and the ids in one file; give a .safetensors path "
                         "(the ids are written beside it as .json).")
    return features, ids


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the toolkit end to end on the offline toy world and print what it did."""
    from cbm.demo import format_files, format_rows, run_demo

    results = run_demo(args.out, cache_dir=args.cache_dir)
    print(format_rows(results))
    print(f"\ndone in {results['seconds']:.0f} s; everything is in {for_terminal(Path(args.out).resolve())}")
    print(format_files(results))
    return 0


def _embed_for(backbone_spec: str, data: str, args: argparse.Namespace, fingerprint: str | None = None):
    """Embed a dataset spec with a backbone spec through the cache, checking the fingerprint if given."""
    from cbm.backbones import load_backbone
    from cbm.data.registry import load_dataset
    from cbm.embed import embed

    backbone = load_backbone(backbone_spec, device=getattr(args, "device", "auto"))
    if fingerprint and backbone.fingerprint != fingerprint:
        raise ValueError(f"the backbone {backbone_spec} loaded here differs from the one the model was fitted on "
                         "(weights or preprocessing changed); refit the model or restore those weights.")
    dataset = load_dataset(data, on_error=getattr(args, "on_error", None), window=getattr(args, "window", None),
                           frames_per_window=getattr(args, "frames_per_window", None))
    return backbone, embed(backbone, dataset, cache_dir=args.cache_dir, batch_size=getattr(args, "batch_size", 64))


def _bank_for(source: str, backbone, train, templates: Sequence[str] | None = None):
    """A concept bank from a folder, the training data's concept labels (CAVs) or the toy vocabulary; or,
    from a candidates file (a class -> concepts JSON such as LaBo's class2concepts.json, a YAML or a .txt
    list), the Candidates themselves: labo selects from them on its own training rows, the other
    families encode all of them with ``templates``."""
    from cbm.toy import label_cav_bank, toy_text_bank
    from concepts import ConceptBank, from_list

    if source == "labels":
        if train.concept_labels is None:
            raise ValueError("--concepts labels needs a dataset with concept labels (e.g. CUB, a manifest with "
                             "concept columns, or the toy world).")
        return label_cav_bank(train)
    if source == "toy":
        if not backbone.is_vision_language:
            raise ValueError("--concepts toy builds a text bank and needs a vision-language backbone such as toy:clip.")
        return toy_text_bank(backbone)
    if Path(source).is_file():
        return from_list(source)
    return ConceptBank.load(source)


STREAM_CHOICES = {"auto": "auto", "on": True, "off": False}


def _head_options(args: argparse.Namespace) -> dict:
    """Where the head trains (``--device``) and whether its data stream from host memory (``--stream``)."""
    return {"device": args.device, "stream": STREAM_CHOICES[args.stream]}


def _fit_posthoc(args: argparse.Namespace, bank, train, validation):
    from cbm.models import PosthocCBM

    lam = args.lam if args.lam in ("rule", "path") else float(args.lam)
    model = PosthocCBM(bank, lam=lam, c=args.c, hybrid=args.hybrid, seed=args.seed, **_head_options(args))
    model.fit(train, validation=validation, concept_labels=train.concept_labels if args.concepts != "labels" else None)
    return model, (f"{'PCBM-h' if args.hybrid else 'PCBM'} on {len(train)} samples: validation accuracy "
                   f"{model.metrics_['val_accuracy']:.3f}, {model.metrics_['nonzero_weights']} non-zero concept "
                   f"weights (lam {model.lam_:.3g})")


def _require_text_bank(args: argparse.Namespace, bank) -> None:
    if bank.kind != "text":
        raise ValueError(f"cbm fit {args.family} needs a text concept bank (--concepts toy or a folder written by "
                         "`cbm concepts select`); CAVs (--concepts labels) are for posthoc.")


def _fit_labo(args: argparse.Namespace, bank, train, validation, backbone=None):
    from cbm.models import LaBoCBM, few_shot
    from cbm.toy import toy_language_prior
    from concepts import Candidates, select_concepts

    shots = args.shots if args.shots == "all" else int(args.shots)
    subset = few_shot(train, shots, seed=args.seed)
    if isinstance(bank, Candidates):  # the few-shot model's concepts are chosen on its few-shot rows only
        bank = select_concepts(bank, backbone, subset.features, subset.labels, subset.class_names, k=args.k,
                               templates=args.templates, backbone=subset.backbone_fingerprint)
    _require_text_bank(args, bank)
    selected_on = bank.provenance.get("selection", {}).get("samples")
    if selected_on is not None and selected_on > len(subset):
        logger.warning("the bank's concepts were selected on %d training samples but LaBo trains on %d (%s shots): "
                       "the selection saw labels the few-shot model must not; pass the candidates file as --concepts "
                       "so that they are selected on the few-shot rows.", selected_on, len(subset), args.shots)
    options = {key: value for key, value in (("epochs", args.epochs), ("lr", args.lr)) if value is not None}
    prior = toy_language_prior() if args.concepts == "toy" else None
    model = LaBoCBM(bank, prior=prior, normalize=not args.raw_features, seed=args.seed, **options,
                    **_head_options(args))
    model.fit(subset, validation=validation)
    return model, (f"LaBo on {len(subset)} samples ({args.shots} shots per class): validation accuracy "
                   f"{model.metrics_['val_accuracy']:.3f} (language prior alone "
                   f"{model.metrics_['prior_val_accuracy']:.3f}), best epoch {model.training_['best_epoch']}")


def _fit_sparse(args: argparse.Namespace, bank, train, validation):
    from cbm.models import SparseCBM

    _require_text_bank(args, bank)
    options = {key: value for key, value in (("epochs", args.epochs), ("lr", args.lr)) if value is not None}
    model = SparseCBM(bank, loss=args.loss, seed=args.seed, **options, **_head_options(args))
    model.fit(train, validation=validation)
    return model, (f"Sparse-CBM ({args.loss}) on {len(train)} samples: validation accuracy "
                   f"{model.metrics_['val_accuracy']:.3f}, top-5 share of concept activation mass "
                   f"{model.metrics_['val_top5_abs_share']:.3f} (uniform {model.metrics_['val_uniform_share']:.3f})")


def _fit_energy(args: argparse.Namespace, bank, train, validation):
    from cbm.models import EnergyCBM

    if args.concepts == "labels" and train.concept_labels is None:
        raise ValueError("this dataset has no concept labels; give --concepts BANK_FOLDER (or toy) for pseudo-labels.")
    options = {"max_epochs": args.epochs} if args.epochs else {}
    model = EnergyCBM(hidden=args.hidden, loss_weights=tuple(args.loss_weights), seed=args.seed,
                      bank=None if args.concepts == "labels" else bank, **options, **_head_options(args))
    model.fit(train, validation=validation)
    return model, (f"ECBM on {len(train)} samples ({model.training_['concepts']['source']}): validation accuracy "
                   f"{model.metrics_['val_accuracy']:.3f}, concept accuracy {model.metrics_['val_concept_accuracy']:.3f}")


def _fit_temporal(args: argparse.Namespace, bank, train, validation):
    from cbm.models import TemporalCBM

    _require_text_bank(args, bank)
    if "window_video" not in train.meta:
        raise ValueError(f"cbm fit temporal needs a video dataset (toy:videos@train, videos:PATH), not {args.data}.")
    options = {key: value for key, value in (("epochs", args.epochs), ("lr", args.lr)) if value is not None}
    model = TemporalCBM(bank, attention=args.attention, seed=args.seed, **options, **_head_options(args))
    model.fit(train, validation=validation)
    return model, (f"MoTIF temporal CBM on {model.training_['videos']} videos ({model.training_['windows']} windows): "
                   f"validation accuracy {model.metrics_['val_accuracy']:.3f} (epoch {model.training_['best_epoch']})")


def _fit_supervised(args: argparse.Namespace, bank, train, validation):
    """cbm (Koh et al.'s concept bottleneck) and cem (concept embeddings): concepts from the data's labels."""
    from cbm.models import ConceptBottleneck, ConceptEmbeddingModel

    if train.concept_labels is None:
        raise ValueError(f"cbm fit {args.family} learns its concepts from concept labels, and {args.data} has none; "
                         "use a dataset that carries them (toy:images, cub:ROOT, a manifest with concept columns).")
    options = {key: value for key, value in (("max_epochs", args.epochs), ("lr", args.lr),
                                             ("concept_weight", args.concept_weight)) if value is not None}
    common = {"predictor": args.predictor, "head": args.head, "hidden": args.hidden, "seed": args.seed,
              "concept_class_weights": "balanced" if args.balanced else None, **options, **_head_options(args)}
    if args.family == "cbm":
        model = ConceptBottleneck(training=args.training, head_input=args.head_input, **common)
        name = f"concept bottleneck ({args.training})"
    else:
        model = ConceptEmbeddingModel(embedding_size=args.embedding_size, training_intervention_prob=args.p_int,
                                      **common)
        name = f"CEM (RandInt {args.p_int:g})"
    model.fit(train, validation=validation)
    metrics = model.metrics_
    return model, (f"{name} on {len(train)} samples: validation accuracy {metrics['val_accuracy']:.3f}, concept "
                   f"accuracy {metrics['val_concept_accuracy']:.3f}, {metrics['val_accuracy_all_true_concepts']:.3f} "
                   "with every concept set to its label")


FIT_FAMILIES = {"posthoc": _fit_posthoc, "labo": _fit_labo, "sparse": _fit_sparse, "energy": _fit_energy,
                "temporal": _fit_temporal, "cbm": _fit_supervised, "cem": _fit_supervised}
#: Families whose concepts are the data's concept labels: they take no concept bank.
LABEL_FAMILIES = ("cbm", "cem")


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit a concept bottleneck model on embeddings of a dataset and save it as a bundle."""
    from concepts import ConceptBank

    out = Path(args.out)
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; choose another --out or pass --force to replace it.")
    if args.family in LABEL_FAMILIES and args.concepts not in (None, "labels"):
        raise ValueError(f"cbm fit {args.family} learns its concepts from the data's concept labels; drop --concepts "
                         "(or give --concepts labels).")
    if args.family not in LABEL_FAMILIES and args.concepts is None:
        raise ValueError(f"cbm fit {args.family} needs --concepts: a bank folder, a candidates file, 'labels' or "
                         "'toy'.")
    backbone, train = _embed_for(args.backbone, args.data, args)
    validation = _embed_for(args.backbone, args.val, args)[1] if args.val else None
    bank = None if args.family in LABEL_FAMILIES else _bank_for(args.concepts, backbone, train, args.templates)
    if args.family == "labo":
        model, summary = _fit_labo(args, bank, train, validation, backbone)
    else:
        if bank is not None and not isinstance(bank, ConceptBank):  # candidates: all of them, encoded with --templates
            bank = ConceptBank.from_text(bank.concepts(), backbone, templates=args.templates)
        model, summary = FIT_FAMILIES[args.family](args, bank, train, validation)
    model.save(out)
    print(f"fitted {summary}; saved {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Accuracy of a saved model on a dataset (embedded with the model's own backbone); the data's classes
    are matched to the model's by name."""
    from cbm.embed import match_classes
    from cbm.models import load

    model = load(args.model)
    _, data = _embed_for(model.backbone_spec_, args.data, args, model.backbone_fingerprint_)
    data = match_classes(data, model.class_names)
    result = {"model": args.model, "data": args.data, "samples": len(data), "accuracy": model.score(data)}
    print(json.dumps(result, indent=2) if args.json else
          f"{args.model} on {args.data}: accuracy {result['accuracy']:.4f} over {len(data)} samples")
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    """Prune concepts (for one class or all) or set weights; write the edited model to a new file."""
    from cbm.files import refuse_existing
    from cbm.models import load

    out = Path(args.out)
    refuse_existing([out], args.force)
    model = load(args.model)
    validation = None
    if args.val:
        validation = _embed_for(model.backbone_spec_, args.val, args, model.backbone_fingerprint_)[1]
    action = "prune_normalize" if args.normalize else "prune"
    for target in args.prune:
        concept, class_name = _edit_target(model, target)
        model, record = model.edit(action, concept, class_name, validation=validation, reason=args.reason)
        change = (f" (validation accuracy {record.before['val_accuracy']:.3f} -> {record.after['val_accuracy']:.3f})"
                  if record.before else "")
        print(f"pruned {for_terminal(repr(concept))} for {for_terminal(class_name or 'all classes')}{change}")
    for target in args.set_weight:
        where, sep, value = target.rpartition("=")
        if not sep:
            raise ValueError(f"--set-weight takes CONCEPT[:CLASS]=VALUE, got {target!r}.")
        concept, class_name = _edit_target(model, where)
        model, _ = model.edit("set_weight", concept, class_name, value=float(value), reason=args.reason)
        print(f"set weight of {for_terminal(repr(concept))} for {for_terminal(class_name or 'all classes')} "
              f"to {float(value)}")
    model.save(out)
    print(f"saved the edited model to {for_terminal(out)}")
    return 0


def _edit_target(model, target: str) -> tuple[str, str | None]:
    """``CONCEPT[:CLASS]`` of ``cbm edit``: the class follows the last colon, so concept names may hold colons
    (CUB's ``has_bill_shape::dagger``, alone or as ``has_bill_shape::dagger:Cardinal``); ``CONCEPT:`` means
    every class (for a concept whose own name ends in ``:<a class>``)."""
    concept, sep, class_name = target.rpartition(":")
    if not sep or concept not in model.concept_names:
        return target, None
    if not class_name:
        return concept, None
    if target in model.concept_names and class_name not in model.class_names:
        return target, None
    return concept, class_name  # an unknown class is model.edit's error, naming the classes


def describe_model(path: str) -> str:
    """A few lines about a model bundle, read without running anything from it."""
    from cbm.models.bundle import read_bundle

    manifest, tensors = read_bundle(path)
    lines = [f"{path}: {manifest['family']} model, bundle format {manifest['format_version']}",
             f"  backbone: {manifest['backbone']['spec']} (fingerprint {manifest['backbone']['fingerprint'][:12]})",
             f"  {len(manifest['class_names'])} classes, {len(manifest['concept_names'])} concepts, "
             f"input width {manifest['n_features_in']}",
             f"  parameters: {json.dumps(manifest['params'])}",
             f"  metrics: {json.dumps(manifest['metrics'])}",
             f"  tensors: {', '.join(f'{k} {v}' for k, v in manifest['tensors'].items())}"]
    for edit in manifest.get("edits", []):
        lines.append(f"  edit: {edit['action']} {edit['concept']!r} for {', '.join(edit['classes'][:5])}"
                     f"{' ...' if len(edit['classes']) > 5 else ''} {edit['reason']}")
    return "\n".join(map(for_terminal, lines))  # each line escaped: names in a bundle are untrusted


def _load_encoder(spec: str):
    from cbm.backbones import load_backbone
    return load_backbone(spec)


def _load_labelled_embeddings(backbone_spec: str, data_spec: str):
    """(features, labels, class names) of a dataset under a backbone, through the cache."""
    from cbm.backbones import load_backbone
    from cbm.data.registry import load_dataset
    from cbm.embed import embed

    result = embed(load_backbone(backbone_spec), load_dataset(data_spec))
    return result.features, result.labels, result.class_names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbm", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help="run the toolkit end to end on the offline toy world",
                               description=cmd_demo.__doc__)
    demo.add_argument("--out", default="cbm-output/demo", help="output folder (default: cbm-output/demo)")
    demo.add_argument("--cache-dir", help="cache root (default: $CBM_CACHE_DIR or ~/.cache/cbm)")
    demo.set_defaults(run=cmd_demo)

    info = commands.add_parser("info", help="versions, devices, caches; or describe a model file",
                               description="Without MODEL: versions, devices, cache locations and sizes. "
                                           "With MODEL: what a model bundle holds.")
    info.add_argument("model", nargs="?", help="a model bundle to describe")
    info.add_argument("--cache-dir", help="cache root to describe (default: $CBM_CACHE_DIR or ~/.cache/cbm)")
    info.set_defaults(run=cmd_info)

    emb = commands.add_parser("embed", help="embed a dataset with a backbone into the cache",
                              description=cmd_embed.__doc__, epilog=EMBED_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    emb.add_argument("backbone", help="backbone spec, e.g. toy:clip or openclip:ViT-B-32@laion2b_s34b_b79k")
    emb.add_argument("data", help="dataset spec, e.g. folder:PATH or toy:images@test")
    emb.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    emb.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores - 1, at most 4)")
    emb.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    emb.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage precision")
    emb.add_argument("--layer", help="CNN backbones: take this named layer (global-average-pooled)")
    emb.add_argument("--window", type=int, help="video datasets: frames per window")
    emb.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                     help="unreadable images: stop (default) or skip them, logging each path")
    emb.add_argument("--cache-dir", help="cache root (default: $CBM_CACHE_DIR or ~/.cache/cbm)")
    emb.add_argument("--shard-size", type=int,
                     help="samples per cache shard, the unit of work shared between torchrun ranks "
                          "(part of the cache key; default 4096)")
    emb.add_argument("--out", help="also write features + labels to this .safetensors file (ids in a .json beside)")
    emb.add_argument("--force", action="store_true", help="replace --out (and its .json) if they exist")
    emb.set_defaults(run=cmd_embed)

    from concepts.bank import DEFAULT_TEMPLATES
    from concepts.cli import add_commands as add_concept_commands
    add_concept_commands(commands, load_encoder=_load_encoder, load_embeddings=_load_labelled_embeddings,
                         printable=for_terminal)

    fit = commands.add_parser("fit", help="fit a concept bottleneck model and save it", description=cmd_fit.__doc__,
                              epilog=FIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    fit.add_argument("family", choices=sorted(FIT_FAMILIES), help="model family")
    fit.add_argument("--backbone", required=True, help="backbone spec, e.g. toy:clip")
    fit.add_argument("--data", required=True, help="training dataset spec, e.g. toy:images@train")
    fit.add_argument("--val", help="validation dataset spec (default: hold out 10%% of the training data)")
    fit.add_argument("--concepts",
                     help="a concept bank folder; a candidates file (class -> concepts JSON such as LaBo's "
                          "class2concepts.json, YAML or a .txt list: labo selects --k per class on its --shots "
                          "training rows, the others use them all); 'labels' for CAVs from the data's concept "
                          "labels; 'toy' for the toy world's vocabulary as a text bank (required except for cbm "
                          "and cem, which learn the data's concept labels)")
    fit.add_argument("--templates", nargs="+", default=list(DEFAULT_TEMPLATES), metavar="TEMPLATE",
                     help="prompt templates with {} that candidate concepts are encoded with, averaged "
                          f"(default: {' | '.join(DEFAULT_TEMPLATES)})")
    fit.add_argument("--out", required=True, help="the model bundle to write (e.g. model.cbm)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--window", type=int, help="video datasets: frames per window")
    fit.add_argument("--frames-per-window", type=int, help="video datasets: frames sampled (and averaged) per window")
    posthoc = fit.add_argument_group("posthoc")
    posthoc.add_argument("--hybrid", action="store_true", help="PCBM-h: add a residual on the embedding")
    posthoc.add_argument("--lam", default="rule", help="'rule' (c / (classes x concepts)), 'path' (chosen on "
                                                        "validation) or a number (default: rule)")
    posthoc.add_argument("--c", type=float, default=2.0, help="constant of the lambda rule (default 2)")
    trained = fit.add_argument_group("labo, sparse, energy, temporal, cbm, cem")
    trained.add_argument("--epochs", type=int, help="most training epochs (each family keeps its best validation "
                                                    "epoch and stops early)")
    trained.add_argument("--lr", type=float, help="learning rate (labo 0.05, sparse 1e-3, temporal 1e-2, cbm 1e-2, "
                                                    "cem 1e-3)")
    trained.add_argument("--shots", default="all", help="labo: N training samples per class drawn with --seed "
                                                        "(1, 2, 4, 8, 16 or all); validation stays full; concepts "
                                                        "from a candidates file are selected on these rows only")
    trained.add_argument("--k", type=int, default=10, help="labo with a candidates file: concepts selected per "
                                                           "class (default 10)")
    trained.add_argument("--raw-features", action="store_true",
                         help="labo: the paper's raw (unnormalised) features x100; needs --lr 1e-4 and thousands of "
                              "--epochs")
    trained.add_argument("--loss", choices=["gumbel", "contrastive", "l1"], default="gumbel",
                         help="sparse: the bottleneck layer's loss (default gumbel, the paper's)")
    trained.add_argument("--hidden", type=int, default=256, help="energy: width of the energy networks; cbm, cem: "
                                                                 "of the MLP concept predictor (--predictor mlp)")
    trained.add_argument("--loss-weights", type=float, nargs=3, default=[3.0, 1.0, 1.0],
                         metavar=("CLASS", "CONCEPT", "GLOBAL"), help="energy: weights of the three losses")
    trained.add_argument("--attention", choices=["per_concept", "mixing"], default="per_concept",
                         help="temporal: attention over time per concept (MoTIF) or mixing concepts")
    supervised = fit.add_argument_group("cbm, cem (concepts from the data's concept labels)")
    supervised.add_argument("--training", choices=["independent", "sequential", "joint"], default="joint",
                            help="cbm: Koh et al.'s training (default joint)")
    supervised.add_argument("--predictor", choices=["linear", "mlp"], default="linear",
                            help="the concept predictor (cem: the context generators' input layer)")
    supervised.add_argument("--head", choices=["linear", "mlp"], default="linear", help="the task head")
    supervised.add_argument("--head-input", choices=["probabilities", "logits"], default="probabilities",
                            help="cbm: the head reads concept probabilities or logits")
    supervised.add_argument("--concept-weight", type=float,
                            help="weight of the concept loss beside the class loss (cbm 10, cem 1)")
    supervised.add_argument("--balanced", action="store_true",
                            help="weigh each concept's positive examples by negatives / positives (rare concepts)")
    supervised.add_argument("--embedding-size", type=int, default=16, help="cem: width of each concept embedding")
    supervised.add_argument("--p-int", type=float, default=0.25,
                            help="cem: RandInt, the chance that a training concept is set to its label (0: off)")
    fit.add_argument("--device", default="auto",
                     help="where to embed and train: auto (CUDA when present), cpu, cuda, cuda:1, ...")
    fit.add_argument("--stream", choices=sorted(STREAM_CHOICES), default="auto",
                     help="on: keep the training data in host memory and copy it to the device batch by batch; "
                          "off: move it all at once; auto (default): stream only when it would take more than "
                          "half the free GPU memory")
    fit.add_argument("--force", action="store_true", help="replace --out if it exists")
    fit.add_argument("--cache-dir", help="cache root (default: $CBM_CACHE_DIR or ~/.cache/cbm)")
    fit.set_defaults(run=cmd_fit)

    ev = commands.add_parser("eval", help="accuracy of a saved model on a dataset", description=cmd_eval.__doc__)
    ev.add_argument("model", help="model bundle")
    ev.add_argument("--data", required=True, help="dataset spec, e.g. toy:images@test")
    ev.add_argument("--json", action="store_true", help="print JSON")
    ev.add_argument("--cache-dir", help="cache root (default: $CBM_CACHE_DIR or ~/.cache/cbm)")
    ev.set_defaults(run=cmd_eval)

    ed = commands.add_parser("edit", help="globally edit a saved model into a new file", description=cmd_edit.__doc__,
                             epilog="example: cbm edit model.cbm --prune 'dark background' --prune 'red:tomato' "
                                    "--val toy:images@val --out model-edited.cbm",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    ed.add_argument("model", help="model bundle to edit (never modified)")
    ed.add_argument("--prune", action="append", default=[], metavar="CONCEPT[:CLASS]",
                    help="zero a concept's weight for one class or, without :CLASS, for all (repeatable); the class "
                         "follows the last colon, so names with colons work: 'has_bill_shape::dagger:Cardinal'")
    ed.add_argument("--set-weight", action="append", default=[], metavar="CONCEPT[:CLASS]=VALUE",
                    help="set a concept's weight (repeatable)")
    ed.add_argument("--normalize", action="store_true", help="prune-and-normalise: keep each row's L1 norm")
    ed.add_argument("--val", help="validation dataset spec: report accuracy before/after each edit")
    ed.add_argument("--reason", default="", help="why (kept in the edit history)")
    ed.add_argument("--out", required=True, help="where to write the edited model")
    ed.add_argument("--force", action="store_true", help="replace --out if it exists")
    ed.add_argument("--cache-dir", help="cache root (default: $CBM_CACHE_DIR or ~/.cache/cbm)")
    ed.set_defaults(run=cmd_edit)

    for plugin in entry_points(group="cbm.commands"):  # `cbm audit` (explain) and `cbm app` (app) plug in here
        plugin.load()(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(TerminalLogFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    try:
        return args.run(args)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        if args.verbose:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {for_terminal(message)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
