"""The dataset contract shared by every loader, the embedding cache and the models.

A dataset is an indexable collection of samples. Each sample is one image (a PIL image) or,
for video windows, a list of frames whose embeddings are averaged. Every dataset exposes
stable sample ids, integer labels, class names and, where known, concept names and
per-sample binary concept labels. ``fingerprint()`` changes whenever what the samples
contain may have changed; the embedding cache keys on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class ImageReadError(OSError):
    """An image or video file could not be decoded; the message names the file."""


def read_image(path: str | Path) -> Image.Image:
    """Decode an image file fully into RGB, raising ImageReadError naming the path on failure."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"cannot read image {path}: {error}") from error


MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOAD_PIXELS = 40_000_000


def read_image_bytes(data: bytes, *, max_bytes: int = MAX_UPLOAD_BYTES,
                     max_pixels: int = MAX_UPLOAD_PIXELS) -> Image.Image:
    """Decode untrusted image bytes (an upload) into RGB, refusing oversized files and decompression bombs.

    The pixel count is checked from the header before any pixel is decoded; EXIF rotation is applied.
    """
    import io

    from PIL import ImageOps, UnidentifiedImageError

    if len(data) > max_bytes:
        raise ImageReadError(f"the file is {len(data) / 2**20:.1f} MB; images up to {max_bytes / 2**20:.0f} MB "
                             "are accepted.")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageReadError(f"the image is {width}x{height} pixels; at most {max_pixels:,} pixels are "
                                     "accepted (this also refuses decompression bombs).")
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise ImageReadError(f"the file is not an image this toolkit can read ({error}).") from None
    except (OSError, ValueError, SyntaxError) as error:
        if isinstance(error, ImageReadError):
            raise
        raise ImageReadError(f"the image is truncated or corrupt ({error}).") from None


def require_dir(path: str | Path, what: str) -> Path:
    """Return ``path`` as a Path, or raise FileNotFoundError naming it and what it should hold."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{what} directory {path} does not exist; check the path.")
    return path


def digest(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (used for fingerprints and cache keys)."""
    payload = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:32]


def files_fingerprint(paths: Sequence[Path]) -> str:
    """Fingerprint files by path, size and modification time (cheap, catches edits)."""
    stats = []
    for path in paths:
        stat = Path(path).stat()
        stats.append((str(path), stat.st_size, stat.st_mtime_ns))
    return digest(stats)


class ConceptDataset:
    """Base class of every dataset: ids, labels, class names, optional concepts.

    Subclasses set ``ids``, ``labels``, ``class_names`` (and optionally ``concept_names`` and
    ``concept_labels``) and implement ``load(i)`` and ``fingerprint()``. ``on_error="skip"``
    lets the embedding step skip unreadable samples (each one logged with its path);
    the default ``"raise"`` stops at the first one.
    """

    ids: list[str]
    labels: np.ndarray
    class_names: list[str]
    concept_names: list[str] | None = None
    concept_labels: np.ndarray | None = None
    on_error: OnError = "raise"

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Image.Image | list[Image.Image], int]:
        return self.load(index), int(self.labels[index])

    def load(self, index: int) -> Image.Image | list[Image.Image]:
        """The sample's image, or for a video window its list of frames."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A hash that changes whenever the samples' content may have changed."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for logs and the CLI."""
        concepts = f", {len(self.concept_names)} concepts" if self.concept_names else ""
        return f"{type(self).__name__}: {len(self)} samples, {len(self.class_names)} classes{concepts}"


def window_spans(n_frames: int, window: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Cut ``n_frames`` into [start, stop) spans of ``window`` frames, ``stride`` apart.

    A trailing part shorter than a window gets its own (shorter) span so no frame is lost;
    a video shorter than one window is one span. Zero frames give no span.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1 frame, got {window}.")
    stride = stride or window
    if stride < 1:
        raise ValueError(f"stride must be at least 1 frame, got {stride}.")
    if n_frames <= 0:
        return []
    spans = [(start, min(start + window, n_frames)) for start in range(0, max(n_frames - window, 0) + 1, stride)]
    next_start = spans[-1][0] + stride
    if spans[-1][1] < n_frames and next_start < n_frames:
        # The frames after the last full window (when stride > window, frames between windows
        # are skipped by design; only a tail that a window would start in gets a span).
        spans.append((next_start, n_frames))
    return spans


class VideoWindowDataset(ConceptDataset):
    """Videos cut into fixed-size windows of frames: one sample per window.

    Each sample is the list of frames of one window (``frames_per_window`` of them sampled
    evenly inside the window); the embedding step averages their embeddings. Besides the
    per-window ``ids`` and ``labels`` (the video's label), subclasses set ``video_ids``,
    ``video_labels``, ``window_video`` (index of the video of each window) and
    ``window_spans`` ([N, 2] start/stop frame of each window), which the temporal models use
    to regroup windows into sequences.
    """

    video_ids: list[str]
    video_labels: np.ndarray
    window_video: np.ndarray
    window_spans: np.ndarray
    frames_per_window: int = 1

    def sampled_frames(self, index: int) -> list[int]:
        """Frame indices sampled evenly inside window ``index``."""
        start, stop = (int(v) for v in self.window_spans[index])
        count = min(self.frames_per_window, stop - start)
        return [int(v) for v in np.linspace(start, stop - 1, count).round()]
