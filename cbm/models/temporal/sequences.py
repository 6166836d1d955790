"""Videos as sequences of window embeddings: padding, regrouping windows by video, label handling and the
per-window concept activations every temporal model starts from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from cbm.embed import Embeddings
from cbm.models.base import (
    as_labels,
    as_real_tensor,
)
from concepts.bank import ConceptBank

SequenceInput = Any  # VideoSequences | Embeddings (windows) | (x [B,T,D], valid [B,T]) | [B,T,D] | list of [T_i,D]


@dataclass
class VideoSequences:
    """Window embeddings regrouped per video and padded.

    ``features`` [B, T, D]; ``valid`` [B, T] (True for a real window, windows first, padding
    after); ``labels`` [B] (the video labels, -1 when unknown); ``window_index`` [B, T] (row of
    each window in the window-level data, -1 for padding); ``window_spans`` [B, T, 2] (start/stop
    frame, -1 for padding); ``video_ids``; plus the class names and backbone identity.
    """

    features: torch.Tensor
    valid: torch.Tensor
    labels: torch.Tensor
    video_ids: list[str]
    window_index: torch.Tensor
    window_spans: torch.Tensor
    class_names: list[str] | None = None
    backbone_spec: str = ""
    backbone_fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.features)

    @property
    def lengths(self) -> torch.Tensor:
        return self.valid.sum(1)

    def subset(self, rows: Any) -> VideoSequences:
        """The videos at ``rows`` (indices or a boolean mask), trimmed to their longest length."""
        rows = torch.as_tensor(np.asarray(rows))
        if rows.dtype == torch.bool:
            rows = rows.nonzero().flatten()
        width = max(1, int(self.valid[rows].sum(1).max())) if len(rows) else 1
        return VideoSequences(self.features[rows, :width], self.valid[rows, :width], self.labels[rows],
                              [self.video_ids[int(i)] for i in rows], self.window_index[rows, :width],
                              self.window_spans[rows, :width], self.class_names, self.backbone_spec,
                              self.backbone_fingerprint)


def pad_sequences(sequences: Sequence[Any], name: str = "x") -> tuple[torch.Tensor, torch.Tensor]:
    """A list of ``[T_i, D]`` arrays as a padded ``[B, T_max, D]`` tensor and its validity mask."""
    if len(sequences) == 0:
        raise ValueError(f"{name} is an empty list of sequences.")
    tensors = []
    for i, seq in enumerate(sequences):
        t = as_real_tensor(seq, f"{name}[{i}]")
        if t.ndim != 2 or len(t) == 0:
            raise ValueError(f"{name}[{i}] must be a non-empty [T, D] array, got shape {tuple(t.shape)}.")
        tensors.append(t)
    widths = {t.shape[1] for t in tensors}
    if len(widths) > 1:
        raise ValueError(f"the sequences in {name} have different widths {sorted(widths)}.")
    longest = max(len(t) for t in tensors)
    features = torch.zeros(len(tensors), longest, tensors[0].shape[1])
    valid = torch.zeros(len(tensors), longest, dtype=torch.bool)
    for i, t in enumerate(tensors):
        features[i, :len(t)] = t
        valid[i, :len(t)] = True
    return features, valid


def sequences_from_windows(windows: Embeddings, video_ids: Sequence[str] | None = None) -> VideoSequences:
    """Regroup window-level Embeddings (``meta["window_video"]``, ``meta["window_spans"]``) into
    per-video padded sequences, windows in time order; the video label is its windows' label."""
    if "window_video" not in windows.meta:
        raise ValueError("these embeddings have no meta['window_video']: embed a video window dataset "
                         "(e.g. toy:videos or videos:PATH), not images.")
    owner = np.asarray(windows.meta["window_video"]).astype(np.int64)
    spans = np.asarray(windows.meta.get("window_spans", np.stack([np.arange(len(owner))] * 2, 1)))
    spans = spans.astype(np.int64).reshape(-1, 2)
    if len(owner) != len(windows.features) or len(spans) != len(owner):
        raise ValueError("meta['window_video'] / meta['window_spans'] do not match the number of windows.")
    videos = list(dict.fromkeys(owner.tolist()))  # first-appearance order
    order = {v: np.flatnonzero(owner == v) for v in videos}
    order = {v: rows[np.argsort(spans[rows, 0], kind="stable")] for v, rows in order.items()}
    longest = max((len(rows) for rows in order.values()), default=0)
    b, d = len(videos), windows.features.shape[1]
    features = torch.zeros(b, max(longest, 1), d)
    valid = torch.zeros(b, max(longest, 1), dtype=torch.bool)
    index = torch.full((b, max(longest, 1)), -1, dtype=torch.long)
    span_t = torch.full((b, max(longest, 1), 2), -1, dtype=torch.long)
    labels = torch.full((b,), -1, dtype=torch.long)
    window_labels = torch.as_tensor(np.asarray(windows.labels)).long()
    names = []
    for i, v in enumerate(videos):
        rows = torch.as_tensor(order[v])
        n = len(rows)
        features[i, :n] = windows.features[rows]
        valid[i, :n] = True
        index[i, :n] = rows
        span_t[i, :n] = torch.as_tensor(spans[order[v]])
        if len(window_labels):
            own = window_labels[rows].unique()
            if len(own) > 1:
                raise ValueError(f"the windows of video {v} carry different labels {own.tolist()}.")
            labels[i] = own[0]
        first = windows.ids[int(rows[0])]
        names.append(first.rsplit("/", 1)[0] if "/" in first else f"video {v}")
    if video_ids is not None:
        if len(video_ids) != b:
            raise ValueError(f"{len(video_ids)} video ids given for {b} videos.")
        names = list(video_ids)
    return VideoSequences(features, valid, labels, names, index, span_t, list(windows.class_names or []) or None,
                          windows.backbone_spec, windows.backbone_fingerprint)


def reverse_time(features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``features`` [B, T, ...] with each sequence's valid windows in reverse order (padding stays)."""
    lengths = valid.sum(1)
    t = torch.arange(valid.shape[1])
    source = torch.where(valid, lengths[:, None] - 1 - t[None], t[None])
    return features.gather(1, source.view(*source.shape, *([1] * (features.ndim - 2))).expand_as(features))


def as_sequences(x: Any, name: str = "x") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, str | None]:
    """(features [B,T,D], valid [B,T], labels [B] or None, backbone fingerprint or None) from
    VideoSequences, window Embeddings, ``(features [B,T,D], valid [B,T])``, a [B,T,D] array or a
    list of [T_i,D]; a ValueError naming ``name`` otherwise."""
    labels, fingerprint = None, None
    if isinstance(x, Embeddings):
        fingerprint, x = x.backbone_fingerprint, sequences_from_windows(x)
    if isinstance(x, VideoSequences):
        fingerprint = x.backbone_fingerprint or None
        features, valid, labels = x.features, x.valid, x.labels
    elif isinstance(x, tuple) and len(x) == 2 and np.ndim(x[0]) == 3:
        features, valid = as_real_tensor(x[0], name), torch.as_tensor(np.asarray(x[1])).bool()
    elif isinstance(x, (list, tuple)):
        features, valid = pad_sequences(x, name)
    else:
        features = as_real_tensor(x, name)
        if features.ndim == 2:
            raise ValueError(f"{name} is 2-D {tuple(features.shape)}; a temporal model takes [B, T, D] sequences "
                             "with a validity mask, a list of [T_i, D], or window Embeddings of a video dataset.")
        valid = torch.ones(features.shape[:2], dtype=torch.bool)
    if features.ndim != 3:
        raise ValueError(f"{name} must be [B, T, D] sequences, got shape {tuple(features.shape)}.")
    if valid.shape != features.shape[:2]:
        raise ValueError(f"the mask of {name} must be {tuple(features.shape[:2])}, got {tuple(valid.shape)}.")
    if len(valid) and ((valid.int().diff(dim=1) > 0).any() or not valid[:, 0].all()):
        raise ValueError(f"the mask of {name} must be True for real windows, first, then False for padding "
                         "(every video needs at least one window); was a padding mask (True = pad) given?")
    if not torch.isfinite(features[valid]).all():
        raise ValueError(f"{name} contains NaN or infinite values in real windows.")
    return features, valid, labels, fingerprint


def _is_label_vector(value: Any) -> bool:
    """Whether ``value`` is a flat sequence of numbers (labels), not sequences of windows."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):  # ragged: a list of sequences
        return False
    return array.ndim == 1 and array.dtype.kind in "iuf"


def labelled_sequences(data: Any, name: str = "validation") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, valid, labels) from labelled VideoSequences / window Embeddings or ``(sequences, y)``."""
    if isinstance(data, tuple) and len(data) == 2 and _is_label_vector(data[1]) and not _is_label_vector(data[0]):
        features, valid, _, _ = as_sequences(data[0], name)
        return features, valid, as_labels(data[1], len(features), name=f"{name} y")
    features, valid, labels, _ = as_sequences(data, name)
    if labels is None or (labels < 0).any():
        raise ValueError(f"{name} needs labels: pass (sequences, y), labelled window Embeddings or VideoSequences.")
    return features, valid, labels


def concept_cosines(bank: ConceptBank, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """max(0, cos(window, concept direction)) [B, T, K], zero at padding."""
    directions = F.normalize(bank.vectors.float(), dim=1)
    return F.relu(F.normalize(features, dim=-1) @ directions.T) * valid[..., None]
