"""Datasets: image folders, manifests, CIFAR, CUB, videos and the generated toy world."""

from cbm.data.base import (
    ConceptDataset,
    ImageReadError,
    VideoWindowDataset,
    read_image,
    window_spans,
)

__all__ = [
    "ConceptDataset",
    "ImageReadError",
    "VideoWindowDataset",
    "read_image",
    "window_spans",
]
