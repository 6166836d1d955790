"""MoTIF, Concepts in Motion (Knab et al. 2025): a temporal concept bottleneck model for videos.

A video is a sequence of windows (a fixed number of frames each, embedded through the cache and
averaged per window). The model works on per-window embeddings ``[B, T, D]`` with a validity mask
(or a list of ``[T_i, D]``, or window :class:`~cbm.embed.Embeddings` regrouped by
:func:`sequences_from_windows`):

1. per-window concept activations ``max(0, cos(window, concept))``, standardised per concept with
   the training windows' mean and std;
2. a sinusoidal encoding of time (by default inside each concept's attention; the reference adds
   it to the activations, ``positional="input"``, see below);
3. one block of attention over time *separately for every concept* (queries, keys and values of a
   concept come from that concept's channel alone, so concepts never mix) with a learnable
   per-concept temperature, then a per-concept feed-forward layer, both with residuals;
4. a non-negative per-concept affine output: the per-window concepts
   ``c_t = max(0, softplus(a_k x + b_k) - log 2)``, the bottleneck;
5. a per-window linear classifier with non-negative weights, ``z_t = W c_t + b``;
6. log-sum-exp pooling over the valid windows, ``logits = logsumexp_t(tau z_t) / tau``.

``attention="mixing"`` replaces step 3's attention by ordinary multi-head attention across
concepts, for comparison. Training minimises class-weighted cross-entropy with label smoothing +
``l1`` on the classifier + ``sparsity`` on the per-window concepts (AdamW, gradient clipping,
weights clamped to be non-negative after every step) and keeps the epoch with the best
*validation* accuracy.

Explanations follow the paper: the time importance ``alpha_t = softmax_t(tau z_t[class])`` (the
weights the LSE pooling gives each window), per-window contributions ``c_t[k] W[class, k]``, the
global time-weighted contributions ``sum_t alpha_t c_t[k] W[class, k]`` (exact up to the pooling's
entropy term, returned alongside) and the per-concept ``T x T`` attention maps. Interventions act on
the bottleneck ``c_t``, as the reference's do: dropping a concept sets it to 0 (absent) in every
window, noise perturbs it, dropping a window zeroes it and takes it out of the pooling; attention
can be replaced by identity, uniform, reversed or shuffled weights.

Defaults that differ from the reference (``REFERENCE_ARCHITECTURE`` sets the reference's values:
``TemporalCBM(bank, **REFERENCE_ARCHITECTURE)``):
- ``positional="attention"``: each concept's queries and keys get their own projection of a shared
  sinusoidal encoding of time (width ``position_dim`` = 8). The reference (``"input"``) adds a
  width-K sinusoidal encoding to the standardised activations, so concept k's input carries the
  k-th sinusoid, a different clock per concept, and the high channels barely change over time;
- ``norm="concept"``: a learned per-concept scale and shift (no statistics: normalising one value
  per channel would make it constant). The reference's LayerNorm over the concept axis
  (``"layer"``) lets one concept's value change another's output, which breaks "concepts never
  mix" and single-concept interventions;
- ``head_dim=2`` (the reference's per-concept query/key/value width is 1);
- ``hidden=4``: per-concept feed-forward width (the reference's grouped 1x1 convolutions have width 1);
- ``lr=1e-2`` (the reference's AdamW uses 1e-3);
- dropout sits on the encoding and on each residual branch (the reference also drops inside the
  feed-forward layer); parameters are initialised near identity (query/key/value weights around 1,
  classifier weights uniform in [0, 1/sqrt(K)]) rather than with PyTorch's defaults.

Other departures, on purpose:
- model selection and early stopping use the validation split (the reference selects on test);
  with no validation data a seeded 10% of the training videos is held out;
- a dropped window is left out of the log-sum-exp pooling; the reference only zeroes its concepts,
  so its bias-only logit ``b`` still enters the pooling and the decision;
- ``noise_concepts`` adds seeded Gaussian noise to the bottleneck and clips at 0 (the reference's
  noise insertion replaces the channel by noise);
- ``attention="mixing"`` is this module's block with multi-head attention in place of the
  per-concept one (pre-norm, per-concept feed-forward, ``heads`` default 1), not the reference's
  ``FullAttentionTemporalBlock`` (post-norm, 4K-wide feed-forward that mixes concepts);
- cosines use the bank vectors' directions for any bank kind (CAV intercepts are ignored).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cbm.backbones import resolve_device
from cbm.embed import Embeddings
from cbm.models.base import (
    ConceptBottleneckModel,
    EditRecord,
    _restore_common,
    as_labels,
    as_real_tensor,
    bank_from_state,
    bank_state,
    check_finite,
    check_intervention,
    finite_output,
    holdout_split,
    intervention_pair,
)
from cbm.models.streaming import Rows, Stream, evaluate, should_stream
from concepts.bank import ConceptBank

logger = logging.getLogger(__name__)

ATTENTION_MODES = ("identity", "uniform", "reversed", "shuffled")

#: The reference implementation's architecture and learning rate, where this module's defaults
#: differ (see the module docstring): ``TemporalCBM(bank, **REFERENCE_ARCHITECTURE)``.
REFERENCE_ARCHITECTURE: dict[str, Any] = {"positional": "input", "norm": "layer", "head_dim": 1, "hidden": 1,
                                          "lr": 1e-3}


# ---------------------------------------------------------------------------------------------
# Sequences of windows
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------

def sinusoidal_encoding(length: int, width: int, base: float = 10000.0) -> torch.Tensor:
    """[length, width] sinusoidal positional encoding (sin on even, cos on odd channels)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(base) / max(width, 1)))
    encoding = torch.zeros(length, width)
    encoding[:, 0::2] = torch.sin(position * rate)
    encoding[:, 1::2] = torch.cos(position * rate[: width // 2])
    return encoding


class ConceptNorm(nn.Module):
    """A learned scale and shift per concept channel: the per-concept stand-in for LayerNorm (no
    statistics, none shared across concepts)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(k))
        self.bias = nn.Parameter(torch.zeros(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def _mode_weights(weights: torch.Tensor, valid: torch.Tensor, mode: str | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Replace attention weights [B, H, T, T] (softmax over the last axis) by an intervention mode."""
    if mode is None:
        return weights
    b, _, t, _ = weights.shape
    lengths = valid.sum(1)
    if mode == "identity":
        eye = torch.eye(t, dtype=weights.dtype)
        return eye.expand_as(weights).clone()
    if mode == "uniform":
        row = valid.to(weights.dtype) / lengths[:, None].to(weights.dtype)
        return row[:, None, None, :].expand_as(weights).clone()
    steps = torch.arange(t)
    if mode == "reversed":  # window t reads the values of the mirrored windows: key u -> L-1-u
        source = torch.where(valid, lengths[:, None] - 1 - steps[None], steps[None])
    elif mode == "shuffled":  # keys permuted at random inside each video's valid windows
        source = steps.repeat(b, 1)
        for i, n in enumerate(lengths.tolist()):
            source[i, :n] = torch.randperm(n, generator=generator)
    else:
        raise ValueError(f"unknown attention mode {mode!r}; use one of {', '.join(ATTENTION_MODES)}.")
    index = source[:, None, None, :].expand_as(weights)
    return weights.gather(3, index)


class TemporalNet(nn.Module):
    """The MoTIF network on standardised concept activations [B, T, K] (see the module docstring)."""

    def __init__(self, k: int, c: int, *, attention: str = "per_concept", heads: int = 1, head_dim: int = 1,
                 hidden: int = 4, norm: str = "concept", dropout: float = 0.1, positional: str = "attention",
                 position_dim: int = 8) -> None:
        super().__init__()
        self.k, self.c, self.attention, self.heads, self.head_dim = k, c, attention, heads, head_dim
        if positional not in ("input", "attention"):
            raise ValueError(f"positional must be 'input' or 'attention', got {positional!r}.")
        self.positional, self.position_dim = positional, position_dim
        make_norm = (lambda: nn.LayerNorm(k)) if norm == "layer" else (lambda: ConceptNorm(k))
        self.norm1, self.norm2, self.norm_out = make_norm(), make_norm(), make_norm()
        self.drop = nn.Dropout(dropout)
        if attention == "per_concept":  # grouped 1x1 convolutions: one small projection per concept
            scale = 1.0 / math.sqrt(head_dim)
            self.q_weight = nn.Parameter(torch.randn(k, head_dim) * scale + 1.0)
            self.k_weight = nn.Parameter(torch.randn(k, head_dim) * scale + 1.0)
            self.v_weight = nn.Parameter(torch.randn(k, head_dim) * scale + 1.0)
            self.q_bias = nn.Parameter(torch.zeros(k, head_dim))
            self.k_bias = nn.Parameter(torch.zeros(k, head_dim))
            self.v_bias = nn.Parameter(torch.zeros(k, head_dim))
            self.log_temperature = nn.Parameter(torch.zeros(k))
            if positional == "attention":  # each concept's own projection of a shared encoding of time
                self.q_position = nn.Parameter(torch.randn(k, position_dim, head_dim) / math.sqrt(position_dim))
                self.k_position = nn.Parameter(torch.randn(k, position_dim, head_dim) / math.sqrt(position_dim))
        elif attention == "mixing":
            if k % heads:
                raise ValueError(f"mixing attention needs heads dividing the {k} concepts, got heads={heads}.")
            self.qkv = nn.Linear(k, 3 * k)
            self.out = nn.Linear(k, k)
        else:
            raise ValueError(f"attention must be 'per_concept' or 'mixing', got {attention!r}.")
        self.ffn_w1 = nn.Parameter(torch.randn(k, hidden) / math.sqrt(1.0))
        self.ffn_b1 = nn.Parameter(torch.zeros(k, hidden))
        self.ffn_w2 = nn.Parameter(torch.randn(k, hidden) / math.sqrt(hidden))
        self.ffn_b2 = nn.Parameter(torch.zeros(k))
        self.affine_weight = nn.Parameter(torch.ones(k))
        self.affine_bias = nn.Parameter(torch.zeros(k))
        self.classifier = nn.Linear(k, c)
        with torch.no_grad():
            self.classifier.weight.uniform_(0.0, 1.0 / math.sqrt(k))

    def _attend(self, x: torch.Tensor, valid: torch.Tensor, mode: str | None,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        pad = ~valid
        if self.attention == "per_concept":
            q = x[..., None] * self.q_weight + self.q_bias  # [B, T, K, d]
            key = x[..., None] * self.k_weight + self.k_bias
            if self.positional == "attention":
                encoding = sinusoidal_encoding(x.shape[1], self.position_dim, base=100.0).to(x)
                q = q + torch.einsum("tp,kpd->tkd", encoding, self.q_position)[None]
                key = key + torch.einsum("tp,kpd->tkd", encoding, self.k_position)[None]
            v = x[..., None] * self.v_weight + self.v_bias
            temperature = torch.exp(self.log_temperature.clamp(-5.0, 5.0))
            scores = torch.einsum("btkd,bukd->bktu", q, key) / math.sqrt(self.head_dim)
            scores = scores * temperature[None, :, None, None]
            weights = torch.softmax(scores.masked_fill(pad[:, None, None, :], float("-inf")), dim=-1)
            weights = _mode_weights(weights, valid, mode, generator)
            out = torch.einsum("bktu,bukd->btkd", weights, v).mean(-1)
            return out, weights
        b, t, k = x.shape
        q, key, v = self.qkv(x).view(b, t, 3, self.heads, k // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ key.transpose(-1, -2) / math.sqrt(k // self.heads)
        weights = torch.softmax(scores.masked_fill(pad[:, None, None, :], float("-inf")), dim=-1)
        weights = _mode_weights(weights, valid, mode, generator)
        out = (weights @ v).transpose(1, 2).reshape(b, t, k)
        return self.out(out), weights

    def bottleneck(self, x: torch.Tensor, valid: torch.Tensor, mode: str | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-window concepts [B, T, K] (zero at padding) and the attention weights [B, H, T, T]."""
        if self.positional == "input" or self.attention == "mixing":
            x = x + sinusoidal_encoding(x.shape[1], self.k).to(x)[None]
        h = self.drop(x)
        attended, weights = self._attend(self.norm1(h), valid, mode, generator)
        h = h + self.drop(attended)
        g = self.norm2(h)
        hidden = F.gelu(g[..., None] * self.ffn_w1 + self.ffn_b1)
        h = h + self.drop((hidden * self.ffn_w2).sum(-1) + self.ffn_b2)
        concepts = F.relu(F.softplus(self.affine_weight * self.norm_out(h) + self.affine_bias) - math.log(2.0))
        return concepts * valid[..., None], weights

    def head(self, concepts: torch.Tensor, valid: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled logits [B, C], per-window logits [B, T, C]) from per-window concepts."""
        window_logits = self.classifier(concepts)
        masked = (tau * window_logits).masked_fill(~valid[..., None], float("-inf"))
        return torch.logsumexp(masked, dim=1) / tau, window_logits


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------

@dataclass
class TemporalExplanation:
    """Everything one forward pass explains, for every video of a batch.

    ``logits`` [B, C]; ``window_logits`` [B, T, C]; ``concepts`` [B, T, K] (the bottleneck);
    ``activations`` [B, T, K] (standardised input concept activations); ``valid`` [B, T];
    ``prediction`` [B]; ``time_importance`` [B, T] (alpha_t of the predicted class, zero at
    padding); ``window_contributions`` [B, T, K] (``c_t[k] W[pred, k]``);
    ``concept_importance`` [B, K] (``sum_t alpha_t c_t[k] W[pred, k]``); ``entropy_term`` [B]
    (so that ``logit[pred] = concept_importance.sum(-1) + bias[pred] + entropy_term``);
    ``attention`` [B, K, T, T] per concept (``[B, heads, T, T]`` for mixing attention);
    ``kept`` [B, T] (the windows in the decision: ``valid`` minus any dropped windows).
    """

    logits: torch.Tensor
    window_logits: torch.Tensor
    concepts: torch.Tensor
    activations: torch.Tensor
    valid: torch.Tensor
    prediction: torch.Tensor
    time_importance: torch.Tensor
    window_contributions: torch.Tensor
    concept_importance: torch.Tensor
    entropy_term: torch.Tensor
    attention: torch.Tensor
    kept: torch.Tensor

    def most_important_window(self) -> torch.Tensor:
        """Index of the window with the largest time importance, per video [B]."""
        return self.time_importance.argmax(dim=1)


SequenceInput = Any  # VideoSequences | Embeddings (windows) | (x [B,T,D], valid [B,T]) | [B,T,D] | list of [T_i,D]


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

def _length_batches(lengths: torch.Tensor, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled mini-batches of videos of similar length: a random order, sorted by length inside
    pools of 8 batches, cut into batches whose order is shuffled again (less padding to run)."""
    order = torch.randperm(len(lengths), generator=generator)
    batches = []
    for pool in order.split(8 * size):
        pool = pool[lengths[pool].argsort(stable=True)]
        batches.extend(pool.split(size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class TemporalCBM(ConceptBottleneckModel):
    """MoTIF temporal concept bottleneck over a concept bank (see the module docstring).

    Inputs (``x`` below) are video sequences: :class:`VideoSequences`, window-level
    ``Embeddings`` (regrouped per video), ``(features [B,T,D], valid [B,T])`` with ``valid`` True
    for real windows, a ``[B,T,D]`` tensor (every window valid) or a list of ``[T_i,D]``.
    ``concepts(x)`` is the per-window bottleneck ``[B,T,K]`` (zero at padding).

    Parameters
    ----------
    bank: the ConceptBank whose directions define the concepts.
    attention: "per_concept" (MoTIF: concepts never mix) or "mixing" (multi-head, for comparison).
    heads, head_dim: heads of mixing attention; width of each concept's query/key/value.
    hidden: per-concept feed-forward width. norm: "concept" (per channel) or "layer" (reference).
    tau: log-sum-exp pooling temperature. dropout: on the encoding and residual branches.
    label_smoothing, l1 (classifier), sparsity (mean per-window concept): the loss.
    lr, weight_decay, epochs, batch_size, patience, clip: AdamW training; the epoch with the best
        validation accuracy is kept.
    stream: keep the training data on the device (False), stream it from host memory in batches and
        chunks (True), or decide by free device memory ("auto"); see ``cbm.models.streaming``.
    """

    family = "temporal"

    def __init__(self, bank: ConceptBank, *, attention: Literal["per_concept", "mixing"] = "per_concept",
                 heads: int = 1, head_dim: int = 2, hidden: int = 4, norm: Literal["concept", "layer"] = "concept",
                 positional: Literal["attention", "input"] = "attention", position_dim: int = 8, tau: float = 1.0, dropout: float = 0.1, label_smoothing: float = 0.1, l1: float = 1e-3,
                 sparsity: float = 1e-3, lr: float = 1e-2, weight_decay: float = 1e-2, epochs: int = 100,
                 batch_size: int = 32, patience: int = 50, clip: float = 1.0, seed: int = 0,
                 device: str = "auto", stream: Stream = "auto") -> None:
        self.bank = bank
        self.attention = attention
        self.heads = heads
        self.head_dim = head_dim
        self.hidden = hidden
        self.norm = norm
        self.positional = positional
        self.position_dim = position_dim
        self.tau = tau
        self.dropout = dropout
        self.label_smoothing = label_smoothing
        self.l1 = l1
        self.sparsity = sparsity
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.patience = patience
        self.clip = clip
        self.seed = seed
        self.device = device
        self.stream = stream

    # ------------------------------------------------------------------ inputs
    def _sequences(self, x: SequenceInput, name: str = "x", check_width: bool = True) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(features [B,T,D], valid [B,T], labels [B] or None), checked against the fitted model."""
        features, valid, labels, fingerprint = as_sequences(x, name)
        if check_width:
            self._check_fitted()
            if fingerprint and self.backbone_fingerprint_ and fingerprint != self.backbone_fingerprint_:
                raise ValueError(f"{name} was embedded with another backbone (fingerprint {fingerprint[:12]}) than this "
                                 f"model was fitted on ({self.backbone_spec_}, {self.backbone_fingerprint_[:12]}); "
                                 "embed the videos with that backbone.")
            if features.shape[2] != self.n_features_in_:
                raise ValueError(f"{name} has width {features.shape[2]} but the model expects {self.n_features_in_}; "
                                 "were these features made by another backbone?")
        return features, valid, labels

    def _cosines(self, features: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return concept_cosines(self.bank, features, valid)

    def activations(self, x: SequenceInput) -> torch.Tensor:
        """Standardised input concept activations [B, T, K] (zero at padding)."""
        features, valid, _ = self._sequences(x)
        return self._standardise(self._cosines(features, valid), valid)

    def _standardise(self, cosines: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return (cosines - self.mean_) / self.std_ * valid[..., None]

    # ------------------------------------------------------------------ forward
    def _net(self) -> TemporalNet:
        net = TemporalNet(len(self.concept_names_), len(self.class_names_), attention=self.attention,
                          heads=self.heads, head_dim=self.head_dim, hidden=self.hidden, norm=self.norm,
                          dropout=self.dropout, positional=self.positional, position_dim=self.position_dim)
        net.load_state_dict(self.net_state_)
        return net.eval()

    def _network(self) -> TemporalNet:
        if getattr(self, "_cached_net", None) is None or self._cached_net_version != id(self.net_state_):
            self._cached_net, self._cached_net_version = self._net(), id(self.net_state_)
        return self._cached_net

    def explain(self, x: SequenceInput, *, attention_mode: str | None = None, drop_concepts: Sequence[str] = (),
                noise_concepts: Sequence[str] = (), noise_std: float = 1.0, drop_windows: Any = None,
                values: Mapping[str, Any] | tuple[Any, Any] | None = None, seed: int = 0,
                return_attention: bool = True, chunk: int = 16) -> TemporalExplanation:
        """One forward pass with every explanation, optionally under interventions.

        Videos are run in chunks of ``chunk`` of similar length (sorted by length, each chunk
        trimmed to its longest video), so padding costs little; results do not depend on the
        batch. ``return_attention=False`` leaves ``attention`` empty (it is [B, K, T, T]).

        Bottleneck interventions (after the temporal block, where the reference applies them):
        ``drop_concepts`` sets those per-window concepts to 0 (absent), so their contribution is
        exactly zero; ``noise_concepts`` adds Gaussian noise (``noise_std``, seeded) to those
        concepts, clipped at 0 as the bottleneck is non-negative; ``drop_windows`` (a [B,T] bool
        mask, or window indices for every video) zeroes whole windows and leaves them out of the
        pooling and the time importance (``kept`` of the result), so the logits are those of the
        other windows alone (the other windows' concepts were computed with the dropped ones in
        view, as in the reference; for the video without a window pass the shorter sequence).
        ``values`` then sets bottleneck concepts (``{name: value}`` for every window, or
        ``(mask [B,T,K], values [B,T,K])``). ``attention_mode`` replaces the attention weights
        (identity, uniform, reversed: window t reads the values of window L-1-t's keys, shuffled:
        keys permuted at random).
        """
        features, valid, _ = self._sequences(x)
        generator = torch.Generator().manual_seed(seed)
        drop_columns = [self.concept_index(name) for name in drop_concepts]
        noise_columns = [self.concept_index(name) for name in noise_concepts]
        kept = valid if drop_windows is None else valid & ~self._window_mask(drop_windows, valid)
        emptied = (~kept.any(1)).nonzero().flatten().tolist()
        if emptied:
            raise ValueError(f"drop_windows removes every window of video(s) {emptied[:5]}; keep at least one "
                             "window per video (a video with no window has no prediction).")
        activations = self._standardise(self._cosines(features, valid), valid)
        net = self._network()
        b, t = valid.shape
        with torch.no_grad():
            concepts = torch.zeros_like(activations)
            heads = len(self.concept_names_) if self.attention == "per_concept" else self.heads
            attention = torch.zeros(b, heads, t, t) if return_attention else torch.zeros(0)
            order = valid.sum(1).argsort(stable=True)
            for rows in order.split(max(1, int(chunk))):
                width = int(valid[rows].sum(1).max())
                part, weights = net.bottleneck(activations[rows, :width], valid[rows, :width], attention_mode, generator)
                concepts[rows, :width] = part
                if return_attention:
                    attention[rows, :, :width, :width] = weights
            concepts[..., drop_columns] = 0.0
            for column in noise_columns:
                noise = torch.randn(valid.shape, generator=generator) * float(noise_std)
                concepts[..., column] = (concepts[..., column] + noise).clamp_min(0.0) * valid
            concepts = concepts * kept[..., None]
            if values is not None:
                concepts = self._set_concepts(concepts, kept, values)
            logits, window_logits = net.head(concepts, kept, self.tau)
        prediction = logits.argmax(1)
        chosen = window_logits.gather(2, prediction[:, None, None].expand(-1, window_logits.shape[1], 1))[..., 0]
        alpha = torch.softmax((self.tau * chosen).masked_fill(~kept, float("-inf")), dim=1)
        weights = net.classifier.weight.detach()[prediction]  # [B, K]
        per_window = concepts * weights[:, None, :]
        importance = (alpha[..., None] * per_window).sum(1)
        entropy = -(alpha * torch.log(alpha.clamp_min(1e-30))).sum(1) / self.tau
        return TemporalExplanation(logits, window_logits, concepts, activations, valid, prediction, alpha,
                                   per_window, importance, entropy, attention, kept)

    @staticmethod
    def _window_mask(windows: Any, valid: torch.Tensor) -> torch.Tensor:
        mask = torch.as_tensor(np.asarray(windows))
        if mask.dtype == torch.bool:
            if mask.shape != valid.shape:
                raise ValueError(f"drop_windows mask must be {tuple(valid.shape)}, got {tuple(mask.shape)}.")
            return mask & valid
        out = torch.zeros_like(valid)
        index = mask.long().flatten()
        if len(index) and (index.min() < -valid.shape[1] or index.max() >= valid.shape[1]):
            raise ValueError(f"drop_windows indices must be below the sequence length {valid.shape[1]}.")
        out[:, index] = True
        return out & valid

    def _set_concepts(self, concepts: torch.Tensor, valid: torch.Tensor,
                      values: Mapping[str, Any] | tuple[Any, Any]) -> torch.Tensor:
        check_intervention(values)
        changed = concepts.clone()
        if isinstance(values, tuple):
            mask, given = intervention_pair(values, tuple(changed.shape))
            changed[mask] = given[mask]
        else:
            for name, value in values.items():
                column, value = self.intervention_value(name, value, len(changed))
                changed[..., column] = value.reshape(-1, 1) if value.ndim == 1 else value
        return changed * valid[..., None]

    # ------------------------------------------------------------------ the shared interface
    def concepts(self, x: SequenceInput) -> torch.Tensor:
        """Per-window bottleneck concepts [B, T, K] (non-negative, zero at padding)."""
        return self.explain(x, return_attention=False).concepts

    def pooled_concepts(self, x: SequenceInput) -> torch.Tensor:
        """Video-level concepts [B, K]: log-sum-exp of the per-window concepts over valid windows."""
        e = self.explain(x, return_attention=False)
        masked = (self.tau * e.concepts).masked_fill(~e.valid[..., None], float("-inf"))
        return torch.logsumexp(masked, dim=1) / self.tau

    def predict_from_concepts(self, c: Any, valid: Any = None) -> torch.Tensor:
        """Pooled logits [B, C] from per-window concepts [B, T, K] (``valid`` [B, T], default all)
        or from one concept vector per video [N, K] (a one-window video)."""
        self._check_fitted()
        concepts = check_finite(as_real_tensor(c, "concepts"), "concepts")
        if concepts.ndim == 2:
            concepts = concepts[:, None]
        if concepts.ndim != 3 or concepts.shape[-1] != len(self.concept_names_) or 0 in concepts.shape[:2]:
            raise ValueError(f"concepts must be [B, T, {len(self.concept_names_)}] with B, T >= 1, "
                             f"got {tuple(concepts.shape)}.")
        mask = (torch.ones(concepts.shape[:2], dtype=torch.bool) if valid is None
                else torch.as_tensor(np.asarray(valid)).bool())
        if mask.shape != concepts.shape[:2] or not mask.any(1).all():
            raise ValueError(f"valid must be {tuple(concepts.shape[:2])} with a real window in every video.")
        with torch.no_grad():
            return self._network().head(concepts * mask[..., None], mask, self.tau)[0]

    def decision_function(self, x: SequenceInput) -> torch.Tensor:
        """Class logits [B, C], one row per video."""
        return finite_output(self.explain(x, return_attention=False).logits)

    def score(self, x: SequenceInput, y: Any = None, sample_weight: Any = None) -> float:
        """Video accuracy; ``y`` defaults to the video labels of Embeddings / VideoSequences."""
        if y is None:
            _, _, y = self._sequences(x, check_width=False)
            if y is None:
                raise ValueError("y is required for plain sequences.")
        predicted = self.predict(x)
        y = as_labels(y, len(predicted), len(self.class_names_)).numpy()
        return float(np.average(predicted == y, weights=sample_weight))

    def intervene(self, x: SequenceInput, values: Mapping[str, Any] | tuple[Any, Any] | None = None,
                  **options: Any) -> torch.Tensor:
        """Logits [B, C] after interventions: ``values`` on the bottleneck concepts and any option
        of :meth:`explain` (``drop_concepts``, ``noise_concepts``, ``drop_windows``,
        ``attention_mode``, ``seed``)."""
        return self.explain(x, values=values, **{"return_attention": False, **options}).logits

    def intervention_values(self, x: SequenceInput, values: Mapping[str, Any] | tuple[Any, Any]) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features [B,T,D], concepts [B,T,K], concepts after setting ``values``)."""
        features, valid, _ = self._sequences(x)
        original = self.explain((features, valid)).concepts
        return features, original, self._set_concepts(original, valid, values)

    def contributions(self, x: SequenceInput) -> torch.Tensor:
        """Time-weighted contributions [B, C, K]: ``sum_t alpha_t[c] c_t[k] W[c, k]`` with
        ``alpha[c] = softmax_t(tau z_t[c])``; ``logit[c] = sum_k (.) + b[c] + H(alpha[c]) / tau``."""
        e = self.explain(x, return_attention=False)
        weight = self._network().classifier.weight.detach()  # [C, K]
        alpha = torch.softmax((self.tau * e.window_logits).masked_fill(~e.valid[..., None], float("-inf")), dim=1)
        return torch.einsum("btc,btk,ck->bck", alpha, e.concepts, weight)

    def window_contributions(self, x: SequenceInput, target: Any = None) -> torch.Tensor:
        """Per-window contributions [B, T, K] to ``target`` (class indices [B]; default: predicted)."""
        e = self.explain(x, return_attention=False)
        target = e.prediction if target is None else torch.as_tensor(np.asarray(target)).long().reshape(-1)
        return e.concepts * self._network().classifier.weight.detach()[target][:, None, :]

    def evidence_over_time(self, x: SequenceInput, target: Any = None) -> torch.Tensor:
        """The ``target`` class's pooled logit as the video unfolds [B, T]: entry ``t`` is what the model
        says having seen windows ``0..t`` only (NaN at padding); ``target``: class indices [B], default
        the prediction on the whole video (its last prefix). ``T`` forward passes over the batch."""
        features, valid, _ = self._sequences(x)
        steps = torch.arange(valid.shape[1])
        logits = torch.full((*valid.shape, len(self.class_names_)), float("nan"))
        for t in range(valid.shape[1]):
            seen = valid & (steps <= t)
            rows = seen[:, t]
            if rows.any():
                logits[rows, t] = self.explain((features[rows, :t + 1], seen[rows, :t + 1]),
                                               return_attention=False).logits
        if target is None:
            target = logits[torch.arange(len(valid)), valid.sum(1) - 1].argmax(1)
        target = torch.as_tensor(np.asarray(target)).long().reshape(-1, 1, 1)
        return logits.gather(2, target.expand(-1, valid.shape[1], 1))[..., 0]

    def decisive_windows(self, x: SequenceInput) -> torch.Tensor:
        """Per video, the window where the evidence for the predicted class rises most [B]
        (:func:`decisive_windows` of :meth:`evidence_over_time`)."""
        return decisive_windows(self.evidence_over_time(x))

    def attention_maps(self, x: SequenceInput) -> torch.Tensor:
        """Per-concept attention over time [B, K, T, T] (rows: query window; [B, heads, T, T] when mixing)."""
        return self.explain(x).attention

    def global_importance(self, x: SequenceInput) -> dict[str, list[tuple[str, float]]]:
        """Per class, concepts ranked by their mean time-weighted contribution over the videos
        predicted as that class (non-zero ones only)."""
        e = self.explain(x, return_attention=False)
        result = {}
        for c, name in enumerate(self.class_names_):
            rows = e.prediction == c
            if not rows.any():
                continue
            mean = e.concept_importance[rows].mean(0)
            order = mean.argsort(descending=True)
            result[name] = [(self.concept_names_[i], float(mean[i])) for i in order if mean[i] > 0]
        return result

    @property
    def weight_(self) -> torch.Tensor:
        """The per-window classifier's non-negative weights [C, K]."""
        return self.net_state_["classifier.weight"]

    @property
    def bias_(self) -> torch.Tensor:
        return self.net_state_["classifier.bias"]

    def temperatures(self) -> dict[str, float]:
        """Each concept's learned attention temperature exp(clamp(l, -5, 5))."""
        if self.attention != "per_concept":
            return {}
        values = torch.exp(self.net_state_["log_temperature"].clamp(-5, 5))
        return dict(zip(self.concept_names_, values.tolist()))

    # ------------------------------------------------------------------ fitting
    def fit(self, x: SequenceInput, y: Any = None, *, validation: Any = None, class_names: list[str] | None = None,
            concept_labels: Any = None) -> TemporalCBM:
        """Train on videos; ``validation`` (videos in any accepted form, with labels) selects the
        epoch; without it a seeded 10% of the training videos is held out. Concept labels are not
        used."""
        features, valid, labels = self._sequences(x, check_width=False)
        if y is not None:
            labels = as_labels(y, len(features))
        if labels is None or (labels < 0).any():
            raise ValueError("y is required (or pass labelled window Embeddings / VideoSequences as x).")
        labels = labels.long()
        fingerprint = getattr(x, "backbone_fingerprint", None) or None
        self.bank.check_features(features[valid][:1] if valid.any() else features[:1, 0], fingerprint)
        n_classes = max(int(labels.max()) + 1, len(class_names or getattr(x, "class_names", None) or []))
        identity = x if isinstance(x, Embeddings) else None
        backbone = (x.backbone_spec, x.backbone_fingerprint) if isinstance(x, VideoSequences) else None
        self._set_data_identity(identity, class_names or getattr(x, "class_names", None), n_classes, backbone)
        n_classes = len(self.class_names_)
        self.concept_names_ = list(self.bank.names)
        self.n_features_in_ = features.shape[2]
        self._cached_net = None

        if validation is None:
            train, held = holdout_split(len(features), self.seed)
            val_f, val_v, val_y = features[held], valid[held], labels[held]
            features, valid, labels = features[train], valid[train], labels[train]
            source = f"held out 10% of train (seed {self.seed})"
        else:
            val_f, val_v, val_y = labelled_sequences(validation)
            if (val_y >= n_classes).any():
                raise ValueError(f"validation labels go beyond the {n_classes} classes.")
            source = "given"
        if val_f.shape[2] != self.n_features_in_:
            raise ValueError("validation features have another width than the training features.")

        cosines = self._cosines(features, valid)
        flat = cosines[valid]
        self.mean_ = flat.mean(0)
        self.std_ = flat.std(0).clamp_min(1e-6) if len(flat) > 1 else torch.ones(flat.shape[1])
        train_a = self._standardise(cosines, valid)
        val_a = self._standardise(self._cosines(val_f, val_v), val_v)
        self._train(train_a, valid, labels, val_a, val_v, val_y, n_classes)
        self.training_ = {**self.training_, "videos": len(features), "windows": int(valid.sum()),
                          "validation": source, "validation_videos": len(val_f)}
        logger.info("TemporalCBM: best epoch %d, validation accuracy %.3f", self.training_["best_epoch"],
                    self.metrics_["val_accuracy"])
        return self

    def _train(self, train_a: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor, val_a: torch.Tensor,
               val_v: torch.Tensor, val_y: torch.Tensor, n_classes: int) -> None:
        device = resolve_device(self.device)
        streamed = should_stream(self.stream, (train_a, valid, labels, val_a, val_v, val_y), device)
        train, val = Rows((train_a, valid, labels), device, streamed), Rows((val_a, val_v, val_y), device, streamed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = TemporalNet(len(self.concept_names_), n_classes, attention=self.attention, heads=self.heads,
                              head_dim=self.head_dim, hidden=self.hidden, norm=self.norm,
                              dropout=self.dropout, positional=self.positional,
                              position_dim=self.position_dim).to(device)
            counts = torch.bincount(labels, minlength=n_classes).float()
            class_weight = torch.where(counts > 0, counts.max() / counts.clamp_min(1), torch.zeros_like(counts))
            optimiser = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            generator = torch.Generator().manual_seed(self.seed)
            class_weight = class_weight.to(device)
            best = (-1.0, float("inf"), copy.deepcopy(net.state_dict()), 0)
            history, stale = [], 0
            lengths = valid.sum(1)

            def logits_of(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return net.head(net.bottleneck(a, v)[0], v, self.tau)[0]

            for epoch in range(1, self.epochs + 1):
                net.train()
                total = 0.0
                for batch in _length_batches(lengths, self.batch_size, generator):
                    width = int(lengths[batch].max())
                    a, v, y = train.batch(batch)
                    a, v = a[:, :width], v[:, :width]
                    concepts, _ = net.bottleneck(a, v)
                    logits, _ = net.head(concepts, v, self.tau)
                    loss = F.cross_entropy(logits, y, weight=class_weight,
                                           label_smoothing=self.label_smoothing)
                    loss = loss + self.l1 * net.classifier.weight.abs().sum()
                    loss = loss + self.sparsity * concepts[v].abs().mean()
                    optimiser.zero_grad()
                    loss.backward()
                    if self.clip:
                        nn.utils.clip_grad_norm_(net.parameters(), self.clip)
                    optimiser.step()
                    with torch.no_grad():
                        net.classifier.weight.clamp_(min=0.0)
                    total += float(loss.detach()) * len(batch)
                net.eval()
                val_acc, val_loss = evaluate(val, logits_of)
                history.append({"epoch": epoch, "train_loss": total / len(train), "val_loss": val_loss,
                                "val_accuracy": val_acc})
                if (val_acc, -val_loss) > (best[0], -best[1]):
                    best, stale = (val_acc, val_loss, copy.deepcopy(net.state_dict()), epoch), 0
                else:
                    stale += 1
                    if stale >= self.patience:
                        break
            net.load_state_dict(best[2])
            net.eval()
            train_acc = evaluate(train, logits_of)[0]
        self.net_state_ = {name: tensor.detach().cpu().clone() for name, tensor in net.state_dict().items()}
        self._cached_net = None
        self.history_ = history
        self.metrics_ = {"train_accuracy": train_acc, "val_accuracy": best[0], "val_loss": best[1]}
        self.training_ = {"best_epoch": best[3], "epochs_run": len(history), "streamed": streamed}

    # ------------------------------------------------------------------ global edits
    def edit(self, action: Literal["prune", "set_weight"], concept: str, classes: str | list[str] | None = None, *,
             value: float = 0.0, validation: Any = None, reason: str = "") -> tuple[TemporalCBM, EditRecord]:
        """An edited copy and its record: ``prune`` zeroes the concept's classifier weight for
        ``classes`` (all when None); ``set_weight`` sets it to ``value`` (>= 0: the weights stay
        non-negative). With labelled ``validation`` videos the record holds accuracy before/after."""
        self._check_fitted()
        if action not in ("prune", "set_weight"):
            raise ValueError(f"unknown edit {action!r}; use 'prune' or 'set_weight'.")
        if action == "set_weight" and not (np.isfinite(value) and value >= 0):
            raise ValueError(f"temporal CBM weights are non-negative; cannot set {value!r}.")
        column = self.concept_index(concept)
        names = self.class_names_ if classes is None else ([classes] if isinstance(classes, str) else list(classes))
        rows = [self.class_index(name) for name in names]
        edited = self.copy()
        edited.net_state_ = {k: v.clone() for k, v in self.net_state_.items()}
        edited._cached_net = None
        weight = edited.net_state_["classifier.weight"]
        previous = {self.class_names_[r]: float(weight[r, column]) for r in rows}
        for row in rows:
            weight[row, column] = value if action == "set_weight" else 0.0
        record = EditRecord(action=action, concept=concept, classes=names, reason=reason,
                            details={"previous": previous, "value": value})
        if validation is not None:
            record.before = {"val_accuracy": self.score(validation)}
            record.after = {"val_accuracy": edited.score(validation)}
        edited.edits_ = [*self.edits_, record]
        return edited, record

    def undo(self) -> TemporalCBM:
        """A copy with the most recent edit reverted."""
        self._check_fitted()
        if not self.edits_:
            raise ValueError("this model has no edits to undo.")
        reverted = self.copy()
        reverted.net_state_ = {k: v.clone() for k, v in self.net_state_.items()}
        reverted._cached_net = None
        last = reverted.edits_.pop()
        column = self.concept_index(last.concept)
        for name, old in last.details["previous"].items():
            reverted.net_state_["classifier.weight"][self.class_index(name), column] = float(old)
        return reverted

    def __deepcopy__(self, memo: dict) -> TemporalCBM:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            setattr(clone, key, None if key == "_cached_net" else copy.deepcopy(value, memo))
        return clone

    # ------------------------------------------------------------------ bundles
    def _state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {f"net.{name}": tensor for name, tensor in self.net_state_.items()}
        tensors.update({"mean": self.mean_, "std": self.std_})
        bank_manifest, bank_tensors = bank_state(self.bank)
        return ({"network": sorted(self.net_state_), "history": getattr(self, "history_", []), "bank": bank_manifest},
                {**tensors, **bank_tensors})

    @classmethod
    def _from_manifest(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> TemporalCBM:
        state = manifest["state"]
        model = cls(bank_from_state(state["bank"], tensors), **manifest["params"])
        _restore_common(model, manifest)
        k, d = len(model.concept_names_), model.n_features_in_
        if model.bank.names != model.concept_names_ or model.bank.dim != d:
            raise ValueError("the concept bank does not match the model's concepts or input width")
        for name in ("mean", "std"):
            if name not in tensors or tuple(tensors[name].shape) != (k,):
                raise ValueError(f"tensor {name!r} must have shape {(k,)}")
        if not (torch.isfinite(tensors["std"]).all() and (tensors["std"] > 0).all()):
            raise ValueError("tensor 'std' must be positive and finite")
        template = TemporalNet(k, len(model.class_names_), attention=model.attention, heads=model.heads,
                               head_dim=model.head_dim, hidden=model.hidden, norm=model.norm,
                               positional=model.positional, position_dim=model.position_dim).state_dict()
        declared = {name[4:]: tensor for name, tensor in tensors.items() if name.startswith("net.")}
        if set(declared) != set(template) or sorted(state["network"]) != sorted(template):
            missing, extra = sorted(set(template) - set(declared)), sorted(set(declared) - set(template))
            raise ValueError(f"network tensors do not match the architecture (missing {missing}, unexpected {extra})")
        for name, tensor in declared.items():
            if tensor.shape != template[name].shape:
                raise ValueError(f"tensor 'net.{name}' must have shape {tuple(template[name].shape)}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"tensor 'net.{name}' holds NaN or infinite values")
        if (declared["classifier.weight"] < 0).any():
            raise ValueError("classifier weights must be non-negative")
        model.net_state_ = {name: tensor.float() for name, tensor in declared.items()}
        model.mean_, model.std_ = tensors["mean"].float(), tensors["std"].float()
        model.history_ = list(state.get("history") or [])
        model._cached_net = None
        return model


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------

class TimeAveragedCBM:
    """The "global CBM" baseline: a linear classifier on the time-averaged standardised concept
    activations (the same ``max(0, cos)`` activations and training statistics as TemporalCBM), an
    L2 logistic regression whose strength is chosen on validation accuracy. Averaging over time
    discards order by construction."""

    def __init__(self, bank: ConceptBank, *, cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0), seed: int = 0):
        self.bank, self.cs, self.seed = bank, tuple(cs), seed

    def _averaged(self, x: SequenceInput) -> torch.Tensor:
        features, valid, _, _ = as_sequences(x)
        a = (concept_cosines(self.bank, features, valid) - self.mean_) / self.std_ * valid[..., None]
        return a.sum(1) / valid.sum(1, keepdim=True)

    def fit(self, x: SequenceInput, y: Any = None, *, validation: Any) -> TimeAveragedCBM:
        from sklearn.linear_model import LogisticRegression

        features, valid, labels = labelled_sequences(x if y is None else (x, y), "x")
        flat = concept_cosines(self.bank, features, valid)[valid]
        self.mean_, self.std_ = flat.mean(0), flat.std(0).clamp_min(1e-6)
        train = self._averaged((features, valid)).numpy()
        val_f, val_v, val_y = labelled_sequences(validation)
        val = self._averaged((val_f, val_v)).numpy()
        best = None
        for c in self.cs:
            clf = LogisticRegression(C=c, max_iter=3000).fit(train, labels.numpy())
            acc = clf.score(val, val_y.numpy())
            if best is None or acc > best[0]:
                best = (acc, c, clf)
        self.val_accuracy_, self.c_, self.classifier_ = best
        return self

    def decision_function(self, x: SequenceInput) -> torch.Tensor:
        return torch.as_tensor(self.classifier_.decision_function(self._averaged(x).numpy()), dtype=torch.float32)

    def predict(self, x: SequenceInput) -> np.ndarray:
        return self.classifier_.classes_[self.decision_function(x).argmax(1).numpy()]

    def score(self, x: SequenceInput, y: Any = None) -> float:
        if y is None:
            y = as_sequences(x)[2]
        return float((self.predict(x) == np.asarray(y)).mean())


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


__all__ = [
    "ATTENTION_MODES",
    "REFERENCE_ARCHITECTURE",
    "TemporalCBM",
    "TemporalExplanation",
    "TemporalNet",
    "TimeAveragedCBM",
    "VideoSequences",
    "as_sequences",
    "concept_cosines",
    "decisive_windows",
    "labelled_sequences",
    "localisation_hits",
    "pad_sequences",
    "reverse_time",
    "sequences_from_windows",
    "sinusoidal_encoding",
    "zero_shot_video",
]
