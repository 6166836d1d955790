"""CUB-200-2011 birds with its 312 binary attributes, or the 112-attribute CBM subset.

The 112-attribute subset follows Koh et al. (2020, "Concept Bottleneck Models"): per-image
attribute labels are replaced by class-level labels obtained by majority vote over the
class's training images, and only attributes present in at least ``min_classes`` (10)
classes are kept. Both steps use the training images only (never validation or test).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from cbm.data.base import ConceptDataset, OnError, digest, files_fingerprint, read_image, require_dir
from cbm.data.folders import arrays_digest, check_on_error
from concepts.bank import concept_groups

logger = logging.getLogger(__name__)

CUB_SPLITS = ("train", "val", "test")
CUB_ATTRIBUTE_SETS = ("cbm112", "all312")
NOT_VISIBLE = 1  # certainty_id 1 = "not visible" in certainties.txt


def _read_id_table(path: Path, n_fields: int) -> list[list[str]]:
    """Rows of a whitespace-separated CUB table whose first field is a 1-based integer id.

    The last field may contain spaces (none do in the official files, but be lenient), so each
    line is split into at most ``n_fields`` parts.
    """
    if not path.is_file():
        raise FileNotFoundError(f"CUB file {path} does not exist; is the root the extracted CUB_200_2011 folder?")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            parts = text.split(maxsplit=n_fields - 1)
            if len(parts) != n_fields or not parts[0].isdigit():
                raise ValueError(f"{path}:{line}: expected '<id> <value>' with {n_fields} fields, got {text.strip()!r}.")
            rows.append(parts)
    ids = [int(row[0]) for row in rows]
    if ids != list(range(1, len(ids) + 1)):
        raise ValueError(f"{path}: ids must run 1, 2, ... in order.")
    return rows


@functools.lru_cache(maxsize=2)
def _read_attribute_labels(
    path: str, size: int, mtime_ns: int, n_images: int, n_attributes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Parse image_attribute_labels.txt into is_present [I, A] uint8 and certainty [I, A] uint8.

    Cached by file identity so building train, val and test in one process parses the
    3.7-million-line file once. Only the first four fields are used: some lines of the
    official file carry an extra field before the time. A fast numpy parse is tried first;
    if it fails, a line-by-line parse finds and reports the bad line.
    """
    try:
        table = np.loadtxt(path, usecols=(0, 1, 2, 3), dtype=np.int64, ndmin=2)
    except ValueError:
        table = None
    if table is None or not _table_in_range(table, n_images, n_attributes):
        table = _parse_attribute_lines(path, n_images, n_attributes)
    present = np.zeros((n_images, n_attributes), dtype=np.uint8)
    certainty = np.zeros((n_images, n_attributes), dtype=np.uint8)
    rows, cols = table[:, 0] - 1, table[:, 1] - 1
    present[rows, cols] = table[:, 2]
    certainty[rows, cols] = table[:, 3]
    covered = np.zeros((n_images, n_attributes), dtype=bool)
    covered[rows, cols] = True
    if not covered.all():
        logger.warning(
            "%s has entries for %d of %d (image, attribute) pairs; missing ones count as absent.",
            path,
            int(covered.sum()),
            n_images * n_attributes,
        )
    return present, certainty


def _table_in_range(table: np.ndarray, n_images: int, n_attributes: int) -> bool:
    return bool(
        len(table)
        and np.all((table[:, 0] >= 1) & (table[:, 0] <= n_images))
        and np.all((table[:, 1] >= 1) & (table[:, 1] <= n_attributes))
        and np.all((table[:, 2] == 0) | (table[:, 2] == 1))
    )


def _parse_attribute_lines(path: str, n_images: int, n_attributes: int) -> np.ndarray:
    """Slow, strict parse of image_attribute_labels.txt that names the first bad line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            parts = text.split()
            if not parts:
                continue
            try:
                image_id, attribute_id, is_present, certainty_id = (int(v) for v in parts[:4])
                if len(parts) < 4:
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"{path}:{line}: expected 'image_id attribute_id is_present certainty_id time', got {text.strip()!r}."
                ) from None
            if not (1 <= image_id <= n_images and 1 <= attribute_id <= n_attributes and is_present in (0, 1)):
                raise ValueError(
                    f"{path}:{line}: image {image_id} / attribute {attribute_id} / is_present {is_present} "
                    f"out of range ({n_images} images, {n_attributes} attributes, is_present 0 or 1)."
                )
            rows.append((image_id, attribute_id, is_present, certainty_id))
    if not rows:
        raise ValueError(f"{path} holds no attribute labels.")
    return np.asarray(rows, dtype=np.int64)


def class_level_attributes(
    present: np.ndarray, certainty: np.ndarray, labels: np.ndarray, n_classes: int
) -> np.ndarray:
    """Majority vote per class: [C, A] 0/1, 1 where >= half of the class's votes say present.

    As in Koh et al., an "absent" vote whose certainty is "not visible" is not counted, and a
    tie (including no counted votes at all) counts as present. A class without any training
    image gets all zeros.
    """
    counted_absent = (present == 0) & (certainty != NOT_VISIBLE)
    positive = np.zeros((n_classes, present.shape[1]), dtype=np.int64)
    negative = np.zeros_like(positive)
    np.add.at(positive, labels, present.astype(np.int64))
    np.add.at(negative, labels, counted_absent.astype(np.int64))
    result = (positive >= negative).astype(np.uint8)
    empty = np.bincount(labels, minlength=n_classes) == 0
    if empty.any():
        logger.warning("%d classes have no training images; their class-level attributes are all 0.", empty.sum())
        result[empty] = 0
    return result


def select_attributes(class_attributes: np.ndarray, min_classes: int) -> np.ndarray:
    """Indices of attributes present (at class level) in at least ``min_classes`` classes."""
    return np.flatnonzero(class_attributes.sum(axis=0) >= min_classes)


def stratified_val_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over ``labels`` choosing about ``val_fraction`` of each class for validation.

    Deterministic for a seed; every class with at least two images keeps one for training.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(len(members) * val_fraction))
        count = min(count, len(members) - 1)
        if count > 0:
            mask[rng.permutation(members)[:count]] = True
    return mask


def _readable_class_name(folder_name: str) -> str:
    """``001.Black_footed_Albatross`` -> ``Black footed Albatross``."""
    name = folder_name.split(".", 1)[1] if "." in folder_name and folder_name.split(".", 1)[0].isdigit() else folder_name
    return name.replace("_", " ")


class CUB(ConceptDataset):
    """CUB-200-2011 in its original layout, one split, with attribute concepts.

    ``root`` is the extracted ``CUB_200_2011`` folder. Splits: the official train/test split,
    with ``val`` carved from the official train images (``val_fraction`` of each class, chosen
    by ``seed``). ``attributes="all312"`` gives every image its own 312 labels (and
    ``concept_certainty``, 1-4); ``"cbm112"`` gives the class-level labels of the attributes
    kept by the Koh et al. rule, computed on the ``train`` split only. Ids are the paths
    in ``images.txt``; class names are readable ("Black footed Albatross") and
    ``class_folders`` keeps the original folder names. ``concept_groups`` holds the attribute groups of the
    chosen attributes ({"bill shape": ["has_bill_shape::dagger", ...], ...}, 28 for all312), which the
    concept-supervised models derive from the same names.
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "val", "test"] = "train",
        val_fraction: float = 0.1,
        seed: int = 0,
        attributes: Literal["cbm112", "all312"] = "cbm112",
        on_error: OnError = "raise",
        min_classes: int = 10,
    ) -> None:
        if split not in CUB_SPLITS:
            raise ValueError(f"CUB split must be one of {CUB_SPLITS}, got {split!r}.")
        if attributes not in CUB_ATTRIBUTE_SETS:
            raise ValueError(f"CUB attributes must be one of {CUB_ATTRIBUTE_SETS}, got {attributes!r}.")
        self.root = require_dir(root, "CUB-200-2011")
        self.split = split
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.attributes = attributes
        self.min_classes = int(min_classes)
        self.on_error = check_on_error(on_error)

        images = _read_id_table(self.root / "images.txt", 2)
        image_labels = _read_id_table(self.root / "image_class_labels.txt", 2)
        is_train_rows = _read_id_table(self.root / "train_test_split.txt", 2)
        classes = _read_id_table(self.root / "classes.txt", 2)
        n_images = len(images)
        if len(image_labels) != n_images or len(is_train_rows) != n_images:
            raise ValueError(
                f"{self.root}: images.txt, image_class_labels.txt and train_test_split.txt must list the "
                f"same images ({n_images}, {len(image_labels)}, {len(is_train_rows)} lines)."
            )
        self.class_folders = [row[1].strip() for row in classes]
        self.class_names = [_readable_class_name(folder) for folder in self.class_folders]
        all_labels = np.asarray([int(row[1]) - 1 for row in image_labels], dtype=np.int64)
        if all_labels.min() < 0 or all_labels.max() >= len(classes):
            raise ValueError(f"{self.root / 'image_class_labels.txt'}: class ids outside 1..{len(classes)}.")
        flags = [row[1].strip() for row in is_train_rows]
        if any(flag not in ("0", "1") for flag in flags):
            raise ValueError(f"{self.root / 'train_test_split.txt'}: the flag must be 1 (train) or 0 (test).")
        official_train = np.asarray([flag == "1" for flag in flags])
        val_mask = np.zeros(n_images, dtype=bool)
        train_index = np.flatnonzero(official_train)
        val_mask[train_index[stratified_val_split(all_labels[train_index], self.val_fraction, self.seed)]] = True
        split_masks = {"train": official_train & ~val_mask, "val": val_mask, "test": ~official_train}
        chosen = np.flatnonzero(split_masks[split])
        self._train_mask = split_masks["train"]

        self.image_dir = require_dir(self.root / "images", "CUB images")
        self.ids = [images[i][1].strip() for i in chosen]
        self.paths = [self.image_dir / sample_id for sample_id in self.ids]
        self.labels = all_labels[chosen]

        attribute_file = self._find_attribute_names()
        attribute_rows = _read_id_table(attribute_file, 2)
        all_names = [row[1].strip() for row in attribute_rows]
        labels_file = self.root / "attributes" / "image_attribute_labels.txt"
        if not labels_file.is_file():
            raise FileNotFoundError(
                f"CUB attribute labels {labels_file} do not exist; they come with CUB_200_2011.tgz."
            )
        stat = labels_file.stat()
        present, certainty = _read_attribute_labels(
            str(labels_file), stat.st_size, stat.st_mtime_ns, n_images, len(all_names)
        )
        self._metadata_files = [
            self.root / name for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
        ] + [attribute_file, labels_file]

        if attributes == "all312":
            self.attribute_ids = np.arange(len(all_names))
            self.concept_labels = present[chosen].astype(np.float32)
            self.instance_concept_labels = self.concept_labels
        else:
            train = self._train_mask
            self.class_attributes = class_level_attributes(
                present[train], certainty[train], all_labels[train], len(classes)
            )
            self.attribute_ids = select_attributes(self.class_attributes, self.min_classes)
            if len(self.attribute_ids) == 0:
                raise ValueError(
                    f"no CUB attribute is present in at least {self.min_classes} classes; lower min_classes."
                )
            self.concept_labels = self.class_attributes[self.labels][:, self.attribute_ids].astype(np.float32)
            self.instance_concept_labels = present[chosen][:, self.attribute_ids].astype(np.float32)
        self.concept_names = [all_names[a] for a in self.attribute_ids]
        self.concept_groups = concept_groups(self.concept_names)
        self.concept_certainty = certainty[chosen][:, self.attribute_ids].astype(np.int64)

    def _find_attribute_names(self) -> Path:
        """attributes.txt: in the root, in attributes/, or next to the root (where the tarball puts it)."""
        candidates = [
            self.root / "attributes.txt",
            self.root / "attributes" / "attributes.txt",
            self.root.parent / "attributes.txt",
        ]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"CUB attribute names (attributes.txt) not found in {self.root} or {self.root / 'attributes'}; "
            "copy attributes.txt from the CUB_200_2011.tgz archive (it sits next to the CUB_200_2011 folder)."
        )

    def load(self, index: int) -> Image.Image:
        """The bird image as RGB; ImageReadError naming the file when it cannot be decoded."""
        return read_image(self.paths[index])

    def fingerprint(self) -> str:
        """Images and metadata files (size, mtime) plus every option that changes the samples."""
        return digest(
            "CUB",
            self.split,
            self.val_fraction,
            self.seed,
            self.attributes,
            self.min_classes,
            self.ids,
            arrays_digest(self.labels, self.concept_labels),
            files_fingerprint(self._metadata_files),
            files_fingerprint(self.paths),
        )
