"""CIFAR-10 and CIFAR-100 through torchvision (python-pickle version, no concept labels)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from cbm.data.base import ConceptDataset, OnError, digest, files_fingerprint
from cbm.data.folders import check_on_error

logger = logging.getLogger(__name__)

CIFAR_NAMES = ("cifar10", "cifar100")
CIFAR_SPLITS = ("train", "test")


def _torchvision_class(name: str) -> type:
    """The torchvision dataset class for ``name`` (looked up on use, so it can be patched in tests)."""
    from torchvision import datasets

    return datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100


class CIFAR(ConceptDataset):
    """CIFAR-10 or CIFAR-100 (one split), loaded with torchvision's CIFAR10/CIFAR100.

    ``root`` is the folder that holds ``cifar-10-batches-py/`` (or ``cifar-100-python/``).
    Files are fetched only when ``download=True``; torchvision verifies their MD5 sums either
    way. Ids look like ``cifar10/train/00042``; all images are in memory, so ``load`` never
    fails and ``on_error`` is kept only for the common interface.
    """

    def __init__(
        self,
        root: str | Path,
        name: Literal["cifar10", "cifar100"] = "cifar10",
        split: Literal["train", "test"] = "train",
        download: bool = False,
        on_error: OnError = "raise",
    ) -> None:
        if name not in CIFAR_NAMES:
            raise ValueError(f"CIFAR name must be one of {CIFAR_NAMES}, got {name!r}.")
        if split not in CIFAR_SPLITS:
            raise ValueError(f"{name} split must be one of {CIFAR_SPLITS}, got {split!r}.")
        self.root = Path(root).expanduser()
        self.name = name
        self.split = split
        self.on_error = check_on_error(on_error)
        tv_class = _torchvision_class(name)
        folder = self.root / tv_class.base_folder
        file_names = [entry[0] for entry in tv_class.train_list + tv_class.test_list] + [tv_class.meta["filename"]]
        missing = [file_name for file_name in file_names if not (folder / file_name).is_file()]
        if missing and not download:
            raise FileNotFoundError(
                f"{name} files {missing} are missing from {folder}; extract {tv_class.url} into "
                f"{self.root} (so that {folder} exists) or pass download=True to fetch them."
            )
        if download:
            self.root.mkdir(parents=True, exist_ok=True)
        try:
            dataset = tv_class(root=str(self.root), train=split == "train", download=download)
        except RuntimeError as error:
            raise RuntimeError(
                f"{name} files in {folder} failed torchvision's integrity check ({error}); they are "
                "corrupt or incomplete: delete the folder and fetch them again (download=True)."
            ) from error
        except OSError as error:  # network failures (URLError is an OSError)
            raise OSError(
                f"could not download {name} from {tv_class.url} into {self.root} ({error}); download "
                f"and extract the archive there by hand."
            ) from error
        self.images: np.ndarray = np.asarray(dataset.data)  # [N, 32, 32, 3] uint8
        self.labels = np.asarray(dataset.targets, dtype=np.int64)
        self.class_names = [str(c) for c in dataset.classes]
        self.ids = [f"{name}/{split}/{i:05d}" for i in range(len(self.labels))]
        split_files = tv_class.train_list if split == "train" else tv_class.test_list
        self.files = [folder / entry[0] for entry in split_files] + [folder / tv_class.meta["filename"]]

    def load(self, index: int) -> Image.Image:
        """The 32x32 RGB image."""
        return Image.fromarray(self.images[index]).convert("RGB")

    def fingerprint(self) -> str:
        """The split's batch files and the meta file (size and mtime), plus name and split."""
        return digest("CIFAR", self.name, self.split, len(self.ids), files_fingerprint(self.files))
