"""The ``cbm`` command line: one subcommand per job, each with its own ``--help``."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("cbm")

DESCRIPTION = """Concept bottleneck models on frozen CLIP and CNN backbones.

Start with `cbm demo` (offline, a few minutes on a laptop CPU)."""

EMBED_EPILOG = """examples:
  cbm embed toy:clip toy:images@test
  cbm embed openclip:ViT-B-32@laion2b_s34b_b79k folder:/data/birds --batch-size 128 --dtype float16
  cbm embed torchvision:resnet50@IMAGENET1K_V2 cub:/data/CUB_200_2011@train --out cub_train.safetensors

backbones: openclip:ARCH@TAG, openclip:hf-hub:ORG/REPO, openclip:local-dir:PATH,
           torchvision:ARCH@WEIGHTS, timm:NAME, toy:clip, toy:cnn
datasets:  folder:PATH, manifest:FILE.csv|.jsonl, cifar10:ROOT@split, cifar100:ROOT@split,
           cub:ROOT@split, frames:PATH, videos:PATH, toy:images@split, toy:videos@split"""


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
    """Versions, devices and cache locations with their sizes."""
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
        print(f"  {entry['key']}  {_human(entry['bytes']):>9}  {what}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Embed a dataset with a backbone into the cache (and optionally export the features)."""
    from safetensors.torch import save_file

    from cbm.backbones import load_backbone
    from cbm.data.registry import load_dataset
    from cbm.embed import embed

    options = {"on_error": args.on_error}
    if args.window:
        options["window"] = args.window
    dataset = load_dataset(args.data, **options)
    backbone = load_backbone(args.backbone, device=args.device, layer=args.layer)
    result = embed(backbone, dataset, batch_size=args.batch_size, cache_dir=args.cache_dir,
                   num_workers=args.workers, dtype=args.dtype)
    print(f"embedded {len(result)} samples of {dataset.describe()} with {backbone.spec}: "
          f"features {tuple(result.features.shape)}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable samples (listed in the log above)")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({"features": result.features.contiguous(), "labels": result.labels}, str(out),
                  metadata={"backbone": backbone.spec, "backbone_fingerprint": backbone.fingerprint})
        out.with_suffix(".json").write_text(json.dumps(
            {"ids": result.ids, "class_names": result.class_names, "skipped": result.skipped}, indent=1))
        print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbm", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = commands.add_parser("info", help="versions, devices, cache locations and sizes",
                               description=cmd_info.__doc__)
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
    emb.add_argument("--out", help="also write features + labels to this .safetensors file (ids in a .json beside)")
    emb.set_defaults(run=cmd_embed)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        if args.verbose:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
