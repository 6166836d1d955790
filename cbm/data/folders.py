"""Image datasets laid out as class folders or listed in a CSV/JSONL manifest.

``ImageFolder`` reads ``root/<class>/**/<image>``; ``ManifestDataset`` reads a table of
``path``, ``label`` and optional 0/1 concept columns, which is how users bring their own
concept annotations.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cbm.data.base import (
    IMAGE_SUFFIXES,
    MAX_CLASSES,
    ConceptDataset,
    OnError,
    digest,
    files_fingerprint,
    read_image,
    require_dir,
)

logger = logging.getLogger(__name__)

_DIGITS = re.compile(r"(\d+)")
_INT = re.compile(r"^[+-]?\d+$")


def natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded numbers by value: ``frame2`` before ``frame10``."""
    return [int(part) if part.isdigit() else part.lower() for part in _DIGITS.split(text)]


def check_on_error(on_error: str) -> OnError:
    """Validate an ``on_error`` argument ("raise" or "skip")."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f'on_error must be "raise" or "skip", got {on_error!r}.')
    return on_error  # type: ignore[return-value]


def class_directories(root: Path) -> list[Path]:
    """The class subfolders of ``root``, sorted by name (hidden folders ignored)."""
    classes = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if not classes:
        raise FileNotFoundError(
            f"{root} has no class subfolders; lay the data out as {root}/<class>/<files>."
        )
    return classes


def is_image_file(path: Path) -> bool:
    """An image by suffix, ignoring hidden files such as macOS ``._name.jpg`` forks."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def arrays_digest(*arrays: np.ndarray | None) -> str:
    """Hash of array contents (labels, concept labels) for fingerprints."""
    parts = []
    for array in arrays:
        if array is None:
            parts.append(None)
        else:
            array = np.ascontiguousarray(array)
            parts.append([str(array.dtype), list(array.shape), hashlib.sha256(array.tobytes()).hexdigest()])
    return digest(parts)


class ImageFolder(ConceptDataset):
    """Images in ``root/<class>/...`` (any depth below the class folder); classes sorted by name.

    Ids are the images' paths relative to ``root`` (POSIX style), so they survive moving the
    folder. There are no concept labels.
    """

    def __init__(self, root: str | Path, on_error: OnError = "raise") -> None:
        self.root = require_dir(root, "image folder")
        self.on_error = check_on_error(on_error)
        self.class_names = []
        self.paths: list[Path] = []
        labels: list[int] = []
        for class_dir in class_directories(self.root):
            images = sorted((p for p in class_dir.rglob("*") if is_image_file(p)), key=lambda p: natural_key(str(p)))
            if not images:
                raise ValueError(
                    f"class folder {class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                    "add images or remove the folder."
                )
            label = len(self.class_names)
            self.class_names.append(class_dir.name)
            self.paths.extend(images)
            labels.extend([label] * len(images))
        self.ids = [p.relative_to(self.root).as_posix() for p in self.paths]
        self.labels = np.asarray(labels, dtype=np.int64)

    def load(self, index: int) -> Image.Image:
        """The image as RGB; ImageReadError naming the file when it cannot be decoded."""
        return read_image(self.paths[index])

    def fingerprint(self) -> str:
        """Ids, classes and every file's size and mtime."""
        return digest("ImageFolder", self.ids, self.class_names, files_fingerprint(self.paths))


def _parse_concept_value(value: Any, where: str, name: str) -> float:
    """A 0/1 concept value from CSV text or JSON (bool, 0/1 number, "0"/"1"/"true"/"false")."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("1", "1.0", "true", "yes"):
            return 1.0
        if text in ("0", "0.0", "false", "no"):
            return 0.0
    raise ValueError(f"{where}: concept {name!r} must be 0 or 1, got {value!r}.")


class ManifestDataset(ConceptDataset):
    """Images listed in a CSV or JSONL manifest, with optional per-image concept labels.

    Columns: ``path`` (relative paths resolve against ``root``, default the manifest's
    folder), ``label`` (a class name, or an integer class index below ``MAX_CLASSES``) and any
    number of 0/1 concept columns. A JSONL row may instead carry a ``concepts`` object mapping
    concept name to 0/1. ``class_names`` fixes the class order (otherwise names are sorted, or
    integer labels become "0", "1", ...). A listed file that does not exist raises
    FileNotFoundError, or with ``on_error="skip"`` is logged and dropped.

    A manifest is a file someone else may have written, so every path must lie inside ``root``
    (checked on the path as written: ``..`` and absolute paths that leave it are refused, so a
    manifest cannot make the toolkit read files elsewhere); ``allow_outside_root=True`` lifts
    this for a manifest you trust. One file listed twice under different spellings (``a.png``,
    ``./x/../a.png``, its absolute path) is refused.
    """

    def __init__(
        self,
        path: str | Path,
        root: str | Path | None = None,
        on_error: OnError = "raise",
        class_names: Sequence[str] | None = None,
        allow_outside_root: bool = False,
    ) -> None:
        self.path = Path(path).expanduser()
        self.allow_outside_root = bool(allow_outside_root)
        if not self.path.is_file():
            raise FileNotFoundError(f"manifest file {self.path} does not exist; check the path.")
        self.on_error = check_on_error(on_error)
        self.root = require_dir(root, "manifest image root") if root is not None else self.path.parent
        suffix = self.path.suffix.lower()
        if suffix == ".csv":
            rows = self._read_csv()
        elif suffix in (".jsonl", ".ndjson"):
            rows = self._read_jsonl()
        else:
            raise ValueError(f"manifest {self.path} must be a .csv or .jsonl file.")
        if not rows:
            raise ValueError(f"manifest {self.path} lists no images.")
        self._build(rows, class_names)

    # -- reading -------------------------------------------------------------------------

    def _read_csv(self) -> list[tuple[int, str, Any, dict[str, Any]]]:
        """Rows as (line number, path, raw label, concept dict)."""
        with self.path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            if "path" not in header or "label" not in header:
                raise ValueError(
                    f"{self.path}:1: the header must have 'path' and 'label' columns, got {header}."
                )
            if len(set(header)) != len(header):
                raise ValueError(f"{self.path}:1: duplicate column names in {header}.")
            reader.fieldnames = header
            rows = []
            for record in reader:
                line = reader.line_num
                if None in record or any(value is None for value in record.values()):
                    raise ValueError(f"{self.path}:{line}: expected {len(header)} fields.")
                values = {key: value.strip() for key, value in record.items()}
                if not values["path"]:
                    raise ValueError(f"{self.path}:{line}: empty path.")
                concepts = {key: value for key, value in values.items() if key not in ("path", "label")}
                rows.append((line, values["path"], values["label"], concepts))
        return rows

    def _read_jsonl(self) -> list[tuple[int, str, Any, dict[str, Any]]]:
        rows = []
        with self.path.open(encoding="utf-8") as handle:
            for line, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except ValueError as error:  # also an integer of more than 4300 digits
                    raise ValueError(f"{self.path}:{line}: not valid JSON ({getattr(error, 'msg', error)}).") from None
                if not isinstance(record, dict) or "path" not in record or "label" not in record:
                    raise ValueError(f"{self.path}:{line}: each line must be an object with 'path' and 'label'.")
                if not isinstance(record["path"], str) or not record["path"]:
                    raise ValueError(f"{self.path}:{line}: 'path' must be a non-empty string.")
                if "concepts" in record:
                    concepts = record["concepts"]
                    if not isinstance(concepts, dict):
                        raise ValueError(f"{self.path}:{line}: 'concepts' must be an object of name -> 0/1.")
                    extra = set(record) - {"path", "label", "concepts"}
                    if extra:
                        raise ValueError(
                            f"{self.path}:{line}: with a 'concepts' object, other keys are not allowed: {sorted(extra)}."
                        )
                else:
                    concepts = {k: v for k, v in record.items() if k not in ("path", "label")}
                rows.append((line, record["path"], record["label"], concepts))
        return rows

    # -- building ------------------------------------------------------------------------

    def _build(self, rows: list[tuple[int, str, Any, dict[str, Any]]], class_names: Sequence[str] | None) -> None:
        concept_names = list(rows[0][3])
        concept_set = set(concept_names)
        kept: list[tuple[int, str, Path, Any, list[float]]] = []
        seen: dict[str, tuple[int, str]] = {}
        root = os.path.abspath(self.root)
        for line, raw_path, raw_label, concepts in rows:
            where = f"{self.path}:{line}"
            if set(concepts) != concept_set:
                raise ValueError(
                    f"{where}: concepts {sorted(concepts)} differ from those of the first row {sorted(concept_set)}."
                )
            sample_id = Path(raw_path).as_posix()
            file_path = Path(os.path.normpath(os.path.join(root, os.path.expanduser(raw_path))))
            if not self.allow_outside_root and os.path.commonpath([root, file_path]) != root:
                raise ValueError(f"{where}: path {raw_path!r} leads outside the image root {root}; list files inside "
                                 "it, pass root=, or allow_outside_root=True for a manifest you trust.")
            if str(file_path) in seen:
                first, spelled = seen[str(file_path)]
                raise ValueError(f"{where}: path {raw_path!r} is the file already listed on line {first} as "
                                 f"{spelled!r}; list each image once.")
            seen[str(file_path)] = (line, raw_path)
            values = [_parse_concept_value(concepts[name], where, name) for name in concept_names]
            if not file_path.is_file():
                message = f"{where}: image {file_path} does not exist; fix the path or the root."
                if self.on_error == "raise":
                    raise FileNotFoundError(message)
                logger.warning("skipping missing image: %s", message)
                continue
            kept.append((line, sample_id, file_path, raw_label, values))
        if not kept:
            raise FileNotFoundError(f"none of the images listed in {self.path} exist under {self.root}.")

        self.class_names, labels = self._resolve_labels([(line, label) for line, _, _, label, _ in kept], class_names)
        self.ids = [sample_id for _, sample_id, _, _, _ in kept]
        self.paths = [file_path for _, _, file_path, _, _ in kept]
        self.labels = np.asarray(labels, dtype=np.int64)
        if concept_names:
            self.concept_names = concept_names
            self.concept_labels = np.asarray([values for *_, values in kept], dtype=np.float32)

    def _resolve_labels(
        self, labels: list[tuple[int, Any]], class_names: Sequence[str] | None
    ) -> tuple[list[str], list[int]]:
        """Map raw labels to indices: names via ``class_names`` (or sorted), else integers."""
        for line, label in labels:
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise ValueError(f"{self.path}:{line}: label must be a class name or an integer, got {label!r}.")
        if class_names is not None:
            names = [str(name) for name in class_names]
            if len(set(names)) != len(names):
                raise ValueError(f"class_names has duplicates: {names}.")
            index = {name: i for i, name in enumerate(names)}
            result = []
            for line, label in labels:
                if isinstance(label, str) and label in index:
                    result.append(index[label])
                    continue
                integer = isinstance(label, int) or (_INT.match(label) and len(label) < 20)  # no 5000-digit int()
                if not (integer and 0 <= int(label) < len(names)):
                    raise ValueError(f"{self.path}:{line}: label {label!r:.40} is not one of class_names "
                                     f"{names[:10]}{' ...' if len(names) > 10 else ''}.")
                result.append(int(label))
            return names, result
        as_int = [isinstance(label, int) or bool(_INT.match(label)) for _, label in labels]
        if all(as_int):
            values = [self._class_number(line, label) for line, label in labels]
            return [str(i) for i in range(max(values) + 1)], values
        for line, label in labels:
            if not isinstance(label, str):
                raise ValueError(
                    f"{self.path}:{line}: integer label {label!r} mixed with class-name labels; use one kind."
                )
            if not label:
                raise ValueError(f"{self.path}:{line}: empty label.")
        names = sorted({label for _, label in labels})
        index = {name: i for i, name in enumerate(names)}
        return names, [index[label] for _, label in labels]

    def _class_number(self, line: int, label: int | str) -> int:
        """An integer label as a class index, checked before anything is sized by it (a label of 10^12 would
        otherwise make 10^12 class names)."""
        text = str(label).strip()
        short = len(text.lstrip("+-").lstrip("0")) <= len(str(MAX_CLASSES))
        value = int(text) if short else -1 if text.startswith("-") else MAX_CLASSES
        if value < 0:
            raise ValueError(f"{self.path}:{line}: integer label {text[:30]} is negative.")
        if value >= MAX_CLASSES:
            raise ValueError(f"{self.path}:{line}: integer label {str(label)[:30]} is too large: labels are class "
                             f"indices, at most {MAX_CLASSES - 1:,}; map the labels to 0, 1, ... first.")
        return value

    def load(self, index: int) -> Image.Image:
        """The image as RGB; ImageReadError naming the file when it cannot be decoded."""
        return read_image(self.paths[index])

    def fingerprint(self) -> str:
        """Ids, labels, concepts and every file's size and mtime."""
        return digest(
            "ManifestDataset",
            self.ids,
            self.class_names,
            self.concept_names,
            arrays_digest(self.labels, self.concept_labels),
            files_fingerprint(self.paths),
        )
