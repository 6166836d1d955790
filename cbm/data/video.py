"""Video datasets cut into windows of frames: folders of frame images, or video files (PyAV).

Both produce one sample per window (see ``VideoWindowDataset``): window ids look like
``<class>/<video>#w0003`` and ``load(i)`` returns the window's sampled frames as PIL RGB
images. Frame counts are found once at construction.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cbm.data.base import (
    ImageReadError,
    OnError,
    VideoWindowDataset,
    digest,
    files_fingerprint,
    read_image,
    require_dir,
    window_spans,
)
from cbm.data.folders import class_directories, check_on_error, is_image_file, natural_key

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg")


class _WindowedVideos(VideoWindowDataset):
    """Shared window bookkeeping for the two video datasets."""

    def _init_options(self, window: int, stride: int | None, frames_per_window: int, on_error: str) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1 frame, got {window}.")
        if stride is not None and stride < 1:
            raise ValueError(f"stride must be at least 1 frame, got {stride}.")
        if frames_per_window < 1:
            raise ValueError(f"frames_per_window must be at least 1, got {frames_per_window}.")
        self.window = int(window)
        self.stride = int(stride) if stride is not None else self.window
        self.frames_per_window = int(frames_per_window)
        self.on_error = check_on_error(on_error)

    def _problem(self, error: Exception) -> None:
        """Raise ``error``, or with on_error="skip" log it and carry on without that video."""
        if self.on_error == "raise":
            raise error
        logger.warning("skipping video: %s", error)

    def _set_windows(self, videos: Sequence[tuple[str, int, int]]) -> None:
        """Build the per-window arrays from (video id, label, frame count) triples."""
        if not videos:
            raise ValueError(f"{self.root} holds no usable videos.")
        self.video_ids = [video_id for video_id, _, _ in videos]
        self.video_labels = np.asarray([label for _, label, _ in videos], dtype=np.int64)
        self.video_frame_counts = np.asarray([count for _, _, count in videos], dtype=np.int64)
        ids, labels, owners, spans = [], [], [], []
        for video_index, (video_id, label, count) in enumerate(videos):
            for k, span in enumerate(window_spans(count, self.window, self.stride)):
                ids.append(f"{video_id}#w{k:04d}")
                labels.append(label)
                owners.append(video_index)
                spans.append(span)
        self.ids = ids
        self.labels = np.asarray(labels, dtype=np.int64)
        self.window_video = np.asarray(owners, dtype=np.int64)
        self.window_spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
        for class_index, name in enumerate(self.class_names):
            if not np.any(self.video_labels == class_index):
                logger.warning("class %r of %s has no usable video.", name, self.root)

    def _options_digest(self) -> str:
        return digest(self.window, self.stride, self.frames_per_window, self.ids, self.class_names)


class FrameFolderVideos(_WindowedVideos):
    """Videos stored as folders of frame images: ``root/<class>/<video>/frame*.jpg|png``.

    Frames are ordered naturally (``frame2`` before ``frame10``). A video folder without
    frames raises ValueError, or with ``on_error="skip"`` is logged and left out.
    """

    def __init__(
        self,
        root: str | Path,
        window: int = 8,
        stride: int | None = None,
        frames_per_window: int = 1,
        on_error: OnError = "raise",
    ) -> None:
        self.root = require_dir(root, "frame-folder videos")
        self._init_options(window, stride, frames_per_window, on_error)
        self.class_names = []
        self.frame_paths: list[list[Path]] = []
        videos: list[tuple[str, int, int]] = []
        for label, class_dir in enumerate(class_directories(self.root)):
            self.class_names.append(class_dir.name)
            video_dirs = sorted(
                (p for p in class_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                key=lambda p: natural_key(p.name),
            )
            if not video_dirs:
                raise ValueError(
                    f"class folder {class_dir} has no video subfolders; lay frames out as "
                    f"{class_dir}/<video>/frame0001.jpg."
                )
            for video_dir in video_dirs:
                frames = sorted((p for p in video_dir.iterdir() if is_image_file(p)), key=lambda p: natural_key(p.name))
                if not frames:
                    self._problem(ValueError(f"video folder {video_dir} holds no frame images."))
                    continue
                self.frame_paths.append(frames)
                videos.append((f"{class_dir.name}/{video_dir.name}", label, len(frames)))
        self._set_windows(videos)

    def load(self, index: int) -> list[Image.Image]:
        """The window's sampled frames as RGB images."""
        frames = self.frame_paths[int(self.window_video[index])]
        return [read_image(frames[i]) for i in self.sampled_frames(index)]

    def fingerprint(self) -> str:
        """Every frame file (size, mtime) plus window, stride and frames per window."""
        paths = [path for frames in self.frame_paths for path in frames]
        return digest("FrameFolderVideos", self._options_digest(), files_fingerprint(paths))


# -- video files ------------------------------------------------------------------------------

_FRAME_COUNTS: dict[tuple[str, int, int, bool], int] = {}
_FORK_INHERITED: list[Any] = []  # decoders copied into a forked child: never freed there


def _av_errors() -> tuple[type[BaseException], ...]:
    import av

    ffmpeg_error = getattr(av, "FFmpegError", None) or av.error.FFmpegError
    return (ffmpeg_error, OSError, ValueError, StopIteration)


def count_video_frames(path: Path, exact: bool = False) -> int:
    """Number of frames of the first video stream of ``path`` (cached per file identity).

    Uses the container's frame count when it has one, unless ``exact``; otherwise decodes
    the stream once to count. ImageReadError naming the file when it cannot be opened.
    """
    import av

    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns, exact)
    if key in _FRAME_COUNTS:
        return _FRAME_COUNTS[key]
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ImageReadError(f"cannot read video {path}: it has no video stream")
            stream = container.streams.video[0]
            count = int(stream.frames or 0)
            if exact or count <= 0:
                stream.thread_type = "AUTO"
                count = sum(1 for _ in container.decode(stream))
    except ImageReadError:
        raise
    except _av_errors() as error:
        raise ImageReadError(f"cannot read video {path}: {error}") from error
    _FRAME_COUNTS[key] = count
    return count


class _SequentialDecoder:
    """Decodes one video forward, keeping the last ``cache_size`` frames.

    Windows are usually read in order, so each next window continues where the previous one
    stopped instead of decoding the file from its start; overlapping windows are served from
    the cache. Going backwards reopens the file.
    """

    def __init__(self, path: Path, cache_size: int) -> None:
        self.path = path
        self.cache_size = max(int(cache_size), 1)
        self.pid = os.getpid()
        self.container: Any = None
        self.frames: Iterator[Any] | None = None
        self.next_index = 0
        self.exhausted = False
        self.cache: OrderedDict[int, Any] = OrderedDict()

    def _reopen(self) -> None:
        import av

        self.close()
        self.container = av.open(str(self.path))
        stream = self.container.streams.video[0]
        stream.thread_type = "AUTO"
        self.frames = iter(self.container.decode(stream))
        self.next_index = 0
        self.exhausted = False
        self.cache.clear()

    def close(self) -> None:
        if self.container is not None:
            try:
                self.container.close()
            finally:
                self.container = None
                self.frames = None

    def _advance_to(self, index: int) -> None:
        """Decode forward until frame ``index`` is cached or the stream ends."""
        while self.next_index <= index and not self.exhausted:
            assert self.frames is not None
            frame = next(self.frames, None)
            if frame is None:
                self.exhausted = True
                break
            self.cache[self.next_index] = frame
            self.next_index += 1
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)

    def get(self, indices: Sequence[int]) -> list[Image.Image]:
        """Frames ``indices`` as RGB images (an index past the real end gives the last frame)."""
        found: dict[int, Any] = {}
        try:
            for index in sorted(set(indices)):
                if index in self.cache:
                    found[index] = self.cache[index]
                    continue
                if self.container is None or index < self.next_index:
                    self._reopen()
                self._advance_to(index)
                if index in self.cache:
                    found[index] = self.cache[index]
                elif self.exhausted and self.next_index > 0 and (self.next_index - 1) in self.cache:
                    logger.warning(
                        "video %s has only %d frames, fewer than its header said; using the last one for frame %d.",
                        self.path,
                        self.next_index,
                        index,
                    )
                    found[index] = self.cache[self.next_index - 1]
                else:
                    raise ImageReadError(f"cannot read video {self.path}: frame {index} could not be decoded")
            return [found[index].to_image().convert("RGB") for index in indices]
        except ImageReadError:
            self.close()
            raise
        except _av_errors() as error:
            self.close()
            raise ImageReadError(f"cannot read video {self.path}: {error}") from error


class VideoFileDataset(_WindowedVideos):
    """Video files decoded with PyAV: ``root/<class>/*.mp4|avi|mkv|webm|mov``.

    Each video's frame count is read once (the container's count, or by decoding when the
    container has none or ``exact_frame_count``). A video that cannot be opened or has no
    frames raises ImageReadError / ValueError naming it, or with ``on_error="skip"`` is
    logged and left out. Ids are the files' paths relative to ``root`` plus ``#wNNNN``.
    """

    def __init__(
        self,
        root: str | Path,
        window: int = 8,
        stride: int | None = None,
        frames_per_window: int = 1,
        on_error: OnError = "raise",
        exact_frame_count: bool = False,
    ) -> None:
        self.root = require_dir(root, "video files")
        self._init_options(window, stride, frames_per_window, on_error)
        self.exact_frame_count = bool(exact_frame_count)
        self.class_names = []
        self.video_paths: list[Path] = []
        videos: list[tuple[str, int, int]] = []
        for label, class_dir in enumerate(class_directories(self.root)):
            self.class_names.append(class_dir.name)
            files = sorted(
                (
                    p
                    for p in class_dir.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in VIDEO_SUFFIXES
                ),
                key=lambda p: natural_key(p.name),
            )
            if not files:
                raise ValueError(
                    f"class folder {class_dir} holds no video files ({', '.join(VIDEO_SUFFIXES)})."
                )
            for path in files:
                try:
                    count = count_video_frames(path, exact=self.exact_frame_count)
                except ImageReadError as error:
                    self._problem(error)
                    continue
                if count == 0:
                    self._problem(ValueError(f"video {path} has no frames."))
                    continue
                self.video_paths.append(path)
                videos.append((path.relative_to(self.root).as_posix(), label, count))
        self._set_windows(videos)
        self._decoder: _SequentialDecoder | None = None

    def _decoder_for(self, path: Path) -> _SequentialDecoder:
        decoder = self._decoder
        if decoder is not None and decoder.pid != os.getpid():
            # Inherited through fork (DataLoader workers): its FFmpeg decoding threads do not
            # exist in this process, so closing or even freeing it would wait for them forever.
            # Keep it alive, untouched, and open a fresh decoder.
            _FORK_INHERITED.append(decoder)
            decoder = None
        if decoder is None or decoder.path != path:
            if decoder is not None:
                decoder.close()
            decoder = _SequentialDecoder(path, cache_size=self.window)
            self._decoder = decoder
        return decoder

    def load(self, index: int) -> list[Image.Image]:
        """The window's sampled frames as RGB images, decoded with PyAV."""
        path = self.video_paths[int(self.window_video[index])]
        return self._decoder_for(path).get(self.sampled_frames(index))

    def close(self) -> None:
        """Close the open video file, if any."""
        if self._decoder is not None:
            if self._decoder.pid == os.getpid():
                self._decoder.close()
            else:
                _FORK_INHERITED.append(self._decoder)
        self._decoder = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_decoder"] = None  # open decoders do not pickle (DataLoader workers reopen)
        return state

    def fingerprint(self) -> str:
        """Every video file (size, mtime) plus window, stride and frames per window."""
        return digest("VideoFileDataset", self._options_digest(), files_fingerprint(self.video_paths))
