"""Dataset spec strings for the command line: ``scheme:PATH[@split]`` -> a ConceptDataset.

Built-in schemes: ``folder``, ``manifest``, ``cifar10``, ``cifar100``, ``cub``, ``frames``,
``videos`` and ``toy`` (the generated world: ``toy:images``, ``toy:spurious``, ``toy:videos``). A bare existing directory means ``folder:`` and a bare ``.csv``/``.jsonl`` file
means ``manifest:``. Other modules add schemes with ``register_dataset_scheme``.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cbm.data.base import ConceptDataset

logger = logging.getLogger(__name__)

DatasetFactory = Callable[[str, "str | None", dict[str, Any]], ConceptDataset]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9_+-]*):(.*)$", re.S)
_SPLIT = re.compile(r"^(.*)@([A-Za-z0-9_.-]+)$", re.S)
MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")


def construct(cls: Callable[..., ConceptDataset], scheme: str, *args: Any, **options: Any) -> ConceptDataset:
    """Call ``cls(*args, **options)``, turning an option it does not take into a clear ValueError."""
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return cls(*args, **options)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(options) - set(parameters))
        if unknown:
            accepted = [name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
            raise ValueError(
                f"dataset scheme {scheme!r} does not take option(s) {unknown}; it takes {accepted[len(args):]}."
            )
    return cls(*args, **options)


def _no_split(scheme: str, split: str | None) -> None:
    if split is not None:
        raise ValueError(f"dataset scheme {scheme!r} has no splits, but @{split} was given.")


def _folder(path: str, split: str | None, options: dict[str, Any]) -> ConceptDataset:
    from cbm.data.folders import ImageFolder

    _no_split("folder", split)
    return construct(ImageFolder, "folder", path, **options)


def _manifest(path: str, split: str | None, options: dict[str, Any]) -> ConceptDataset:
    from cbm.data.folders import ManifestDataset

    _no_split("manifest", split)
    return construct(ManifestDataset, "manifest", path, **options)


def _cifar(name: str) -> DatasetFactory:
    def factory(path: str, split: str | None, options: dict[str, Any]) -> ConceptDataset:
        from cbm.data.cifar import CIFAR

        return construct(CIFAR, name, path, name=name, split=split or "train", **options)

    return factory


def _cub(path: str, split: str | None, options: dict[str, Any]) -> ConceptDataset:
    from cbm.data.cub import CUB

    return construct(CUB, "cub", path, split=split or "train", **options)


def _frames(path: str, split: str | None, options: dict[str, Any]) -> ConceptDataset:
    from cbm.data.video import FrameFolderVideos

    _no_split("frames", split)
    return construct(FrameFolderVideos, "frames", path, **options)


def _videos(path: str, split: str | None, options: dict[str, Any]) -> ConceptDataset:
    from cbm.data.video import VideoFileDataset

    _no_split("videos", split)
    return construct(VideoFileDataset, "videos", path, **options)


TOY_IMAGES_PER_SPLIT = {"train": 3000, "val": 1000, "test": 1000}
TOY_VIDEOS_PER_SPLIT = {"train": 400, "val": 100, "test": 200}
TOY_SPURIOUS_STRENGTH = 0.95


def _toy(kind: str, split: str | None, options: dict[str, Any]) -> ConceptDataset:
    """``toy:images``, ``toy:spurious`` (background agrees with the class in train only) or ``toy:videos``."""
    from cbm.data.toy import ToyImages, ToyVideos

    split = split or "train"
    if split not in TOY_IMAGES_PER_SPLIT:
        raise ValueError(f"the toy world has splits {sorted(TOY_IMAGES_PER_SPLIT)}, not {split!r}.")
    options = {key: value for key, value in options.items() if key != "on_error"}  # generated: nothing unreadable
    if kind in ("images", "spurious"):
        if kind == "spurious":
            options.setdefault("spurious", TOY_SPURIOUS_STRENGTH)
        return construct(ToyImages, "toy", split, **{"n": TOY_IMAGES_PER_SPLIT[split], **options})
    if kind == "videos":
        return construct(ToyVideos, "toy", split, **{"n": TOY_VIDEOS_PER_SPLIT[split], **options})
    raise ValueError(f"unknown toy dataset {kind!r}; use toy:images, toy:spurious or toy:videos (with @train/@val/@test).")


DATASET_SCHEMES: dict[str, DatasetFactory] = {
    "folder": _folder,
    "manifest": _manifest,
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
    "cub": _cub,
    "frames": _frames,
    "videos": _videos,
    "toy": _toy,
}


def register_dataset_scheme(name: str, factory: DatasetFactory, replace: bool = False) -> None:
    """Make ``name:PATH[@split]`` specs build datasets with ``factory(path, split, options)``.

    Registering a taken name raises ValueError unless ``replace`` (re-registering the same
    factory, e.g. on module reload, is allowed).
    """
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_+-]*", name):
        raise ValueError(f"dataset scheme name {name!r} must be a word starting with a letter.")
    key = name.lower()
    existing = DATASET_SCHEMES.get(key)
    if existing is not None and existing is not factory and not replace:
        raise ValueError(f"dataset scheme {name!r} is already registered; pass replace=True to override it.")
    DATASET_SCHEMES[key] = factory


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """Split a spec into (scheme, path, split); bare paths get ``folder`` or ``manifest``.

    ``@split`` is taken off the end only when the whole remainder is not an existing path, so
    paths containing ``@`` still work.
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("empty dataset spec; " + _known_schemes_text())
    match = _SCHEME.match(spec)
    if match and not (len(match.group(1)) == 1 and Path(spec).exists()):  # not a Windows drive path
        scheme, rest = match.group(1).lower(), match.group(2)
        if scheme not in DATASET_SCHEMES:
            raise ValueError(f"unknown dataset scheme {scheme!r} in {spec!r}; " + _known_schemes_text())
        split = None
        split_match = _SPLIT.match(rest)
        if split_match and not Path(rest).expanduser().exists():
            rest, split = split_match.group(1), split_match.group(2)
        if not rest:
            raise ValueError(f"dataset spec {spec!r} has no path after '{scheme}:'.")
        return scheme, rest, split
    path = Path(spec).expanduser()
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return "manifest", spec, None
    if path.is_dir():
        return "folder", spec, None
    raise FileNotFoundError(
        f"dataset {spec!r} is neither an existing directory nor a .csv/.jsonl manifest; "
        "give an existing path or a scheme:PATH spec (" + _known_schemes_text() + ")."
    )


def _known_schemes_text() -> str:
    return "known schemes: " + ", ".join(f"{name}:" for name in sorted(DATASET_SCHEMES))


def load_dataset(spec: str, **options: Any) -> ConceptDataset:
    """Build the dataset a spec string names, passing ``options`` (window, on_error, ...) on.

    Options whose value is None are dropped, so a CLI can pass every flag it has.
    """
    scheme, path, split = parse_spec(spec)
    options = {key: value for key, value in options.items() if value is not None}
    dataset = DATASET_SCHEMES[scheme](path, split, options)
    logger.info("loaded %s from %s", dataset.describe(), spec)
    return dataset
