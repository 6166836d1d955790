"""Video evaluation helpers: zero-shot video scores from class texts, the decisive windows of a decision and
whether they fall in annotated spans."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch.nn import functional as F

from cbm.models.temporal.sequences import SequenceInput, as_sequences


def zero_shot_video(class_vectors: torch.Tensor, x: SequenceInput,
                    method: Literal["pooled", "soft", "majority"] = "pooled") -> torch.Tensor:
    """Zero-shot video scores [B, C] from class text vectors [C, D] (e.g. "a video of {class}"):
    ``pooled`` compares the mean window embedding, ``soft`` averages per-window softmaxes of the
    cosines (x100), ``majority`` counts per-window votes."""
    features, valid, _, _ = as_sequences(x)
    texts = F.normalize(torch.as_tensor(class_vectors, dtype=torch.float32), dim=1)
    if method == "pooled":
        mean = (features * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        return F.normalize(mean, dim=1) @ texts.T
    cos = F.normalize(features, dim=-1) @ texts.T  # [B, T, C]
    if method == "soft":
        return (torch.softmax(100 * cos, dim=-1) * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
    if method == "majority":
        votes = F.one_hot(cos.argmax(-1), texts.shape[0]).float() * valid[..., None]
        return votes.sum(1) + 1e-3 * cos.mean(1)  # ties broken by the mean cosine
    raise ValueError(f"method must be 'pooled', 'soft' or 'majority', got {method!r}.")


def decisive_windows(evidence: torch.Tensor) -> torch.Tensor:
    """Per video, the window whose arrival raises the evidence the most [B], from the evidence as the
    videos unfold [B, T] (:meth:`TemporalCBM.evidence_over_time`, NaN at padding): the moment the
    action becomes recognisable. Window 0 has no earlier evidence to rise from; it is chosen only in
    one-window videos.

    The time importance of :meth:`TemporalCBM.explain` (MoTIF's pooling weights) answers another
    question, where the evidence is highest: after a change of state it stays high for the rest of
    the video, so its peak often lies after the event that decided the class."""
    if evidence.shape[1] == 1:
        return torch.zeros(len(evidence), dtype=torch.long)
    rise = evidence.diff(dim=1).nan_to_num(nan=float("-inf"))  # column t-1: the arrival of window t
    return torch.where(evidence[:, 1].isnan(), 0, rise.argmax(dim=1) + 1)


def localisation_hits(windows: torch.Tensor, spans: torch.Tensor,
                      events: Sequence[Sequence[tuple[int, int]]]) -> torch.Tensor:
    """Whether each video's chosen window (``windows`` [B], e.g. :meth:`TemporalCBM.decisive_windows`)
    overlaps one of its event spans [B] (bool): ``spans`` [B, T, 2] window start/stop frames,
    ``events`` per video a list of (start, stop) frames."""
    hits = []
    for i, window in enumerate(torch.as_tensor(windows).tolist()):
        start, stop = (int(v) for v in spans[i, window])
        hits.append(any(start < e_stop and e_start < stop for e_start, e_stop in events[i]))
    return torch.tensor(hits, dtype=torch.bool)
