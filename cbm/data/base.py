"""The dataset contract shared by every loader, the embedding cache and the models.

A dataset is an indexable collection of samples. Each sample is one image (a PIL image) or,
for video windows, a list of frames whose embeddings are averaged. Every dataset exposes
stable sample ids, integer labels, class names and, where known, concept names and
per-sample binary concept labels. ``fingerprint()`` changes whenever what the samples
contain may have changed; the embedding cache keys on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

OnError = Literal["raise", "skip"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_CLASSES = 100_000  # labels are class indices below this; a larger one is refused, never allocated


class ImageReadError(OSError):
    """An image or video file could not be decoded; the message names the file."""


MAX_FILE_PIXELS = 100_000_000
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_UPLOAD_PIXELS = 40_000_000
UPLOAD_FORMATS = ("PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(image: Image.Image) -> Image.Image:
    """A decoded image upright (its EXIF orientation applied) in 8-bit RGB.

    Transparent pixels are composited on white (RGBA, LA, palette or colour-key transparency);
    16- and 32-bit integer greyscale is read on the 16-bit scale (0..65535 -> 0..255, clipped) and
    float greyscale on 0..1; CMYK and every other mode go through Pillow's conversion.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64) / 257, 0, 255).round().astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.nan_to_num(np.asarray(image, dtype=np.float64)) * 255, 0, 255)
                                .round().astype(np.uint8))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _decode(source: str | Path | io.BytesIO, what: str, max_pixels: int,
            formats: tuple[str, ...] | None = None) -> Image.Image:
    """Open, size-check (before any pixel is decoded), decode and convert one image; ImageReadError naming
    ``what`` on any failure."""
    try:
        with Image.open(source, formats=formats) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageReadError(f"{what} is {width}x{height} pixels; at most {max_pixels:,} pixels are accepted "
                                     "(this also refuses decompression bombs).")
            image.load()
            return to_rgb(image)
    except ImageReadError:
        raise
    except Image.DecompressionBombError:
        raise ImageReadError(f"{what} declares more than {max_pixels:,} pixels, far beyond what is accepted "
                             "(a decompression bomb?); it was not decoded.") from None
    except UnidentifiedImageError:
        allowed = f" ({', '.join(formats)})" if formats else ""
        raise ImageReadError(f"{what} is not an image in a format this toolkit reads{allowed}.") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as error:  # what Pillow's decoders raise
        raise ImageReadError(f"{what} is truncated or corrupt ({type(error).__name__}: {error}).") from None


def read_image(path: str | Path, *, max_pixels: int = MAX_FILE_PIXELS) -> Image.Image:
    """Decode an image file fully into upright RGB (see ``to_rgb``), raising ImageReadError naming the path on
    failure or when it has more than ``max_pixels`` pixels."""
    return _decode(path, f"image {path}", max_pixels)


def read_image_bytes(data: bytes, *, max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS,
                     formats: tuple[str, ...] = UPLOAD_FORMATS) -> Image.Image:
    """Decode untrusted image bytes (an upload) into upright RGB, refusing oversized files, decompression
    bombs and formats outside ``formats`` (so no exotic decoder, e.g. EPS through Ghostscript, ever runs).

    The pixel count is checked from the header before any pixel is decoded; EXIF rotation is applied.
    """
    if len(data) > max_bytes:
        raise ImageReadError(f"the file is {len(data) / 2**20:.1f} MB; images up to {max_bytes / 2**20:.0f} MB "
                             "are accepted.")
    return _decode(io.BytesIO(data), "the image", max_pixels, formats)


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
