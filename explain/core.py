"""What every explanation needs from a fitted model and its data, computed once and in batches.

``EvalData`` normalises the data arguments (an :class:`~cbm.embed.Embeddings`, or a tuple
``(x, y)`` / ``(x, y, concept_labels)``). ``ModelView`` wraps any
:class:`~cbm.models.base.ConceptBottleneckModel` and offers batched concepts, contributions and
intervened logits. Intervened logits go through ``model.intervene`` unless the model's logits are
``predict_from_concepts(c) + offset(x)`` (true for every linear head, with or without a residual):
that is checked numerically once per model and data, and then interventions evaluate only the head,
which makes intervention curves and ablations cheap even for hundreds of concepts.
``VideoView`` is the counterpart for temporal models (one row per video); ``make_view`` picks the
view that fits a model.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cbm.embed import Embeddings, match_classes
from cbm.models.base import ConceptBottleneckModel, as_labels, as_matrix, as_real_tensor
from cbm.models.temporal import TemporalCBM, VideoSequences, decisive_windows, sequences_from_windows

logger = logging.getLogger(__name__)

BATCH_ROWS = 4096
#: Random edits that decide whether a view's intervened logits are head(concepts) + offset (rows repeat when fewer).
ADDITIVITY_TRIALS = 16
DataLike = Embeddings | tuple[Any, ...]


@dataclass
class EvalData:
    """Features, labels and (optional) binary concept labels of one split, plus a display name."""

    features: torch.Tensor
    labels: torch.Tensor | None
    concept_labels: torch.Tensor | None = None
    concept_names: list[str] | None = None
    ids: list[str] = field(default_factory=list)
    name: str = "data"
    source: Any = None  # the Embeddings it came from, kept for the model's fingerprint check

    def __len__(self) -> int:
        return len(self.features)

    def subset(self, index: torch.Tensor) -> EvalData:
        """The rows ``index`` (a 1-D index tensor)."""
        pick = index.tolist()
        return EvalData(self.features[index], None if self.labels is None else self.labels[index],
                        None if self.concept_labels is None else self.concept_labels[index], self.concept_names,
                        [self.ids[i] for i in pick] if self.ids else [], self.name)

    def concept_truth(self, concept_names: Sequence[str]) -> torch.Tensor | None:
        """Binary concept labels [N, K] in the order of ``concept_names`` (None unless all are labelled)."""
        if self.concept_labels is None or self.concept_names is None:
            return None
        index = {name: i for i, name in enumerate(self.concept_names)}
        if not all(name in index for name in concept_names):
            return None
        return self.concept_labels[:, [index[name] for name in concept_names]].float()


def as_data(data: DataLike | EvalData, name: str | None = None) -> EvalData:
    """An :class:`EvalData` from an Embeddings, an EvalData or a tuple ``(x, y[, concept_labels[, names]])``."""
    if isinstance(data, EvalData):
        return data
    if isinstance(data, Embeddings):
        return EvalData(data.features.float(), torch.as_tensor(data.labels).long(),
                        None if data.concept_labels is None else torch.as_tensor(data.concept_labels).float(),
                        data.concept_names, list(data.ids), name or "data", source=data)
    if isinstance(data, tuple) and 1 <= len(data) <= 4:
        x = as_matrix(data[0], f"x of {name or 'data'}")
        y = None if len(data) < 2 or data[1] is None else as_labels(data[1], len(x), name=f"y of {name or 'data'}")
        concepts = None if len(data) < 3 or data[2] is None else as_real_tensor(data[2], "concept labels")
        names = list(data[3]) if len(data) > 3 and data[3] is not None else None
        return EvalData(x, y, concepts, names, [str(i) for i in range(len(x))], name or "data")
    raise TypeError(f"data must be an Embeddings or a tuple (x, y[, concept_labels]), got {type(data).__name__}.")


def check_data(data: EvalData, n_classes: int) -> None:
    """Refuse empty data, labels that are not class indices of the model, and concept labels that do not fit
    the features or their names (one ValueError naming the part); labels become a long tensor."""
    if len(data) == 0:
        raise ValueError(f"{data.name} is empty; explanations need at least one sample.")
    if data.labels is not None:
        data.labels = as_labels(data.labels, len(data), n_classes, f"y of {data.name}")
    if data.concept_labels is not None:
        concepts = data.concept_labels
        columns = len(data.concept_names) if data.concept_names is not None else concepts.shape[-1]
        if concepts.ndim != 2 or concepts.shape != (len(data), columns):
            raise ValueError(f"the concept labels of {data.name} must be [{len(data)}, {columns}] (one row per sample, "
                             f"one column per concept name), got {tuple(concepts.shape)}.")
        if not torch.isfinite(concepts).all():
            raise ValueError(f"the concept labels of {data.name} contain NaN or infinite values; use 0/1.")


class RowView:
    """What both views share: ``data`` (an EvalData, one row per sample or video) and ``logits``."""

    data: EvalData
    logits: torch.Tensor

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)

    def check_rows(self, rows: Sequence[int]) -> list[int]:
        """``rows`` as a list of sample positions, or a ValueError naming those outside the data."""
        rows = [int(row) for row in rows]
        outside = [row for row in rows if not 0 <= row < len(self.data)]
        if outside:
            raise ValueError(f"rows {outside[:5]} are outside {self.data.name}, which has samples 0..{len(self.data) - 1}.")
        return rows


class ModelView(RowView):
    """Batched, cached access to one fitted model's outputs on one split (see the module docstring)."""

    def __init__(self, model: ConceptBottleneckModel, data: EvalData) -> None:
        self.model = model
        self.data = data
        self.concept_names = model.concept_names
        self.class_names = model.class_names
        check_data(data, len(self.class_names))
        source = data.source
        if (isinstance(source, Embeddings) and model.backbone_fingerprint_
                and source.backbone_fingerprint != model.backbone_fingerprint_):
            raise ValueError(f"{data.name} was embedded with {source.backbone_spec} but the model was fitted on "
                             f"{model.backbone_spec_} features (fingerprints differ); embed it with that backbone.")
        self.logits, self.concepts = self._outputs()
        head = self._head(self.concepts)
        self.offset = self.logits - head

    def _outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, concepts) of every row from one pass of the model (``intervention(x, {})``, which equals the
        prediction): an energy model infers once instead of once for the concepts and again for the logits."""
        rows = self.data.features
        parts = [self.model.intervention(chunk, {}) for chunk in (rows.split(BATCH_ROWS) if len(rows) else [rows])]
        return tuple(torch.cat([part[i].detach().float() for part in parts]) for i in (0, 1))

    def _batched(self, fn: Any, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.data.features if rows is None else rows
        if len(rows) == 0:
            return fn(rows)
        return torch.cat([fn(chunk).detach().float() for chunk in rows.split(BATCH_ROWS)])

    def _head(self, concepts: torch.Tensor) -> torch.Tensor:
        return self._batched(lambda rows: self.model.predict_from_concepts(rows), concepts)

    @functools.cached_property
    def _box(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per concept, the span of the observed activations and the family's "low"/"high" values [K] (valid for
        every family, e.g. probabilities stay in [0, 1]; wide even for a one-sample view, whose activations alone
        span nothing and would make the checks below vacuous)."""
        low, high = concept_bounds(self)
        return (torch.minimum(self.concepts.min(dim=0).values, torch.minimum(low, high)),
                torch.maximum(self.concepts.max(dim=0).values, torch.maximum(low, high)))

    def _random_concepts(self, n: int, seed: int) -> torch.Tensor:
        """``n`` random concept vectors inside ``_box``."""
        low, high = self._box
        return low + torch.rand(n, len(low), generator=torch.Generator().manual_seed(seed)) * (high - low)

    @functools.cached_property
    def additive(self) -> bool:
        """Whether intervened logits equal head(changed concepts) + offset, checked on a few random edits when
        first asked (an energy model re-infers its concepts for the check: explanations alone do not need it)."""
        if len(self.data) == 0:
            return True
        low, high = self._box
        if not (high > low).any():  # e.g. one sample of a family without low/high values: nothing to check with,
            return False            # so every intervention runs model.intervene
        rows = torch.arange(ADDITIVITY_TRIALS) % len(self.data)  # a small view gets several edits per row
        mask = torch.rand(len(rows), self.concepts.shape[1], generator=torch.Generator().manual_seed(0)) < 0.5
        values = self._random_concepts(len(rows), seed=1)
        exact = self.model.intervene(self.data.features[rows], (mask, values)).detach().float()
        fast = self._head(torch.where(mask, values, self.concepts[rows])) + self.offset[rows]
        additive = bool(torch.allclose(exact, fast, atol=1e-3, rtol=1e-3))
        if not additive:
            logger.info("%s: logits are not head(concepts) + offset; interventions use model.intervene",
                        type(self.model).__name__)
        return additive

    @functools.cached_property
    def weight(self) -> torch.Tensor | None:
        """The head's weight [C, K] when the model is additive and ``predict_from_concepts`` is affine (checked
        numerically), else None."""
        if not self.additive:
            return None
        low, high = self._box
        span = (high - low).clamp_min(1e-3)
        base = self._head(low[None])
        weight = ((self._head(low + torch.diag(span)) - base) / span[:, None]).T
        probe = self._random_concepts(8, seed=2)
        if not torch.allclose(self._head(probe), base + (probe - low) @ weight.T, atol=1e-3, rtol=1e-3):
            return None
        return weight

    def single_change_logits(self, rows: torch.Tensor, current: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Logits [n, K, C] of samples ``rows`` when concept k alone goes from ``current`` [n, K] to ``values`` [n, K]."""
        n, k = current.shape
        if self.weight is not None:
            base = self._head(current) + self.offset[rows]
            return base[:, None, :] + (values - current)[:, :, None] * self.weight.T[None]
        out = []
        for start in range(0, n, max(1, BATCH_ROWS // k)):
            part = slice(start, start + max(1, BATCH_ROWS // k))
            trial = current[part].repeat_interleave(k, dim=0)
            columns = torch.arange(k).repeat(len(trial) // k)
            trial[torch.arange(len(trial)), columns] = values[part].reshape(-1)
            logits = self.intervened_logits(rows[part].repeat_interleave(k), trial)
            out.append(logits.reshape(-1, k, logits.shape[1]))
        return torch.cat(out)

    def labels(self, purpose: str) -> torch.Tensor:
        """The data's class labels, or a ValueError saying that ``purpose`` needs them."""
        if self.data.labels is None:
            raise ValueError(f"{purpose} needs class labels, and {self.data.name} has none; pass (x, y) or "
                             "labelled Embeddings.")
        return self.data.labels

    def contributions(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``model.contributions`` [N, C, K] for the rows ``rows`` (all when None), at the concepts the view
        already holds (the model's own: an energy model does not infer them again)."""
        rows = torch.arange(len(self.data)) if rows is None else torch.as_tensor(rows)
        return self._batched(lambda chunk: self.model.contributions(self.data.features[chunk], self.concepts[chunk]),
                             rows)

    def intervened_logits(self, rows: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        """Logits of samples ``rows`` (indices, repeats allowed) with concepts replaced by ``changed`` [R, K]."""
        if self.additive:
            return self._head(changed) + self.offset[rows]
        # fix only the concepts that differ from the model's own: families whose other concepts respond
        # (ECBM) re-infer those, and a row with nothing changed is the model's prediction itself
        mask = changed != self.concepts[rows]
        return torch.cat([self.model.intervene(self.data.features[index], (mask[start:start + len(index)],
                                                                           changed[start:start + len(index)])).detach()
                          for start, index in zip(range(0, len(rows), BATCH_ROWS), rows.split(BATCH_ROWS))]).float()


class VideoView(RowView):
    """A temporal model's outputs on whole videos, computed once: the video counterpart of ModelView.

    It offers the part of ModelView that read-only explanations and metrics use, one row per video:
    ``data`` (an EvalData of the time-averaged window embeddings, for probes; the video labels; and,
    where the windows carry concept labels, "present in some window" labels), ``concepts`` (video
    level, the model's log-sum-exp pooling), ``logits``, ``predictions``, ``labels`` and
    ``contributions`` (time-weighted, [N, C, K]). Concept-level interventions and counterfactuals are
    not offered. ``sequences`` and ``explanation`` (the model's TemporalExplanation, without attention
    maps) hold the per-window detail; ``window_ids`` the window sample ids of every video when the
    data were window Embeddings (else None).
    """

    def __init__(self, model: TemporalCBM, data: Embeddings | VideoSequences, name: str = "data") -> None:
        if not isinstance(data, (Embeddings, VideoSequences)):
            raise TypeError(f"a temporal model is audited on window Embeddings of a video dataset or VideoSequences, "
                            f"got {type(data).__name__}.")
        self.model = model
        self.concept_names = model.concept_names
        self.class_names = model.class_names
        self.sequences = sequences_from_windows(data) if isinstance(data, Embeddings) else data
        sequences = self.sequences
        self.explanation = model.explain(sequences, return_attention=False)
        self.logits = self.explanation.logits
        self.concepts = model.pooled_concepts(sequences)
        valid = sequences.valid
        averaged = (sequences.features * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
        labels = None if (sequences.labels < 0).any() else sequences.labels
        self.window_ids = None
        concept_labels = None
        if isinstance(data, Embeddings):
            self.window_ids = [[data.ids[int(i)] for i in row if i >= 0] for row in sequences.window_index]
            if data.concept_labels is not None:
                windows = torch.as_tensor(data.concept_labels).float()
                concept_labels = torch.stack([windows[row[row >= 0]].amax(0) for row in sequences.window_index])
        names = data.concept_names if concept_labels is not None else None
        self.data = EvalData(averaged, labels, concept_labels, names, list(sequences.video_ids), name)
        check_data(self.data, len(self.class_names))

    @functools.cached_property
    def evidence(self) -> torch.Tensor:
        """The predicted class's evidence as each video unfolds [N, T] (:meth:`TemporalCBM.evidence_over_time`,
        computed once)."""
        return self.model.evidence_over_time(self.sequences)

    @property
    def decisive_windows(self) -> torch.Tensor:
        """Per video, the window where the evidence for its predicted class rises most [N]."""
        return decisive_windows(self.evidence)

    def labels(self, purpose: str) -> torch.Tensor:
        """The video labels, or a ValueError saying that ``purpose`` needs them."""
        if self.data.labels is None:
            raise ValueError(f"{purpose} needs video labels, and {self.data.name} has none.")
        return self.data.labels

    def contributions(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Time-weighted ``model.contributions`` [N, C, K] of the videos ``rows`` (all when None)."""
        sequences = self.sequences if rows is None else self.sequences.subset(rows)
        return self.model.contributions(sequences)


def make_view(model: ConceptBottleneckModel, data: DataLike | EvalData | VideoSequences,
              name: str | None = None) -> ModelView | VideoView:
    """A VideoView for a temporal model (window Embeddings or VideoSequences), else a ModelView; a TypeError
    naming the object when it is not a concept bottleneck model (e.g. a baseline without concepts). The classes
    of Embeddings are matched to the model's by name (:func:`cbm.embed.match_classes`)."""
    if not isinstance(model, ConceptBottleneckModel):
        raise TypeError(f"{type(model).__name__} is not a concept bottleneck model (it has no concepts to explain); "
                        "explain works on the families of cbm.models (PosthocCBM, LaBoCBM, SparseCBM, EnergyCBM, "
                        "TemporalCBM, ConceptBottleneck, ConceptEmbeddingModel).")
    if isinstance(data, Embeddings):
        data = match_classes(data, model.class_names)
    if isinstance(model, TemporalCBM):
        return VideoView(model, data, name or "data")
    return ModelView(model, as_data(data, name))


def concept_view(view: ModelView | VideoView, purpose: str) -> ModelView:
    """``view`` itself when it supports concept-level interventions (every image family), else a TypeError
    naming the family and saying what to use instead."""
    if isinstance(view, VideoView):
        raise TypeError(f"{purpose} is not available for {type(view.model).__name__} (video) models: their concepts are "
                        "per window, so a video-level concept change is not defined; use model.intervene(x, values, "
                        "drop_concepts=..., drop_windows=...) or the audit's attention and zeroed-concept sections.")
    return view


def concept_bounds(view: ModelView) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-concept "low"/"high" values [K]: the family's references where it has them, else the
    5th/95th percentiles of the activations on the data (so any family gets sensible targets)."""
    names = view.concept_names
    try:
        low = torch.tensor([view.model.concept_reference(name, "low") for name in names], dtype=torch.float32)
        high = torch.tensor([view.model.concept_reference(name, "high") for name in names], dtype=torch.float32)
        if torch.isfinite(low).all() and torch.isfinite(high).all():
            return low, high
    except (ValueError, KeyError, AttributeError):
        pass
    return torch.quantile(view.concepts, 0.05, dim=0), torch.quantile(view.concepts, 0.95, dim=0)


def ci95(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and a 95% Student-t interval along ``axis`` (zero width with a single value)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    n = values.shape[axis]
    mean = values.mean(axis=axis)
    if n < 2:
        return mean, mean.copy(), mean.copy()
    half = stats.t.ppf(0.975, n - 1) * values.std(axis=axis, ddof=1) / np.sqrt(n)
    return mean, mean - half, mean + half
