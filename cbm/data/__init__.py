"""Datasets: image folders, manifests, CIFAR, CUB, videos and the generated toy world."""

from cbm.data.base import (
    ConceptDataset,
    ImageReadError,
    VideoWindowDataset,
    read_image,
    window_spans,
)
from cbm.data.cifar import CIFAR
from cbm.data.cub import CUB
from cbm.data.folders import ImageFolder, ManifestDataset
from cbm.data.registry import DATASET_SCHEMES, load_dataset, register_dataset_scheme
from cbm.data.video import FrameFolderVideos, VideoFileDataset

__all__ = [
    "CIFAR",
    "CUB",
    "DATASET_SCHEMES",
    "ConceptDataset",
    "FrameFolderVideos",
    "ImageFolder",
    "ImageReadError",
    "ManifestDataset",
    "VideoFileDataset",
    "VideoWindowDataset",
    "load_dataset",
    "read_image",
    "register_dataset_scheme",
    "window_spans",
]
