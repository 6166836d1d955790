"""``TemporalCBM`` (MoTIF): fitting, the shared interface, explanations, interventions and edits (see the
package docstring)."""

from __future__ import annotations

import copy
import logging
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
from cbm.models.temporal.evaluation import decisive_windows
from cbm.models.temporal.networks import TemporalNet
from cbm.models.temporal.sequences import (
    SequenceInput,
    VideoSequences,
    as_sequences,
    concept_cosines,
    labelled_sequences,
)
from concepts.bank import ConceptBank

logger = logging.getLogger(__name__)

#: The reference implementation's architecture and learning rate, where this module's defaults
#: differ (see the module docstring): ``TemporalCBM(bank, **REFERENCE_ARCHITECTURE)``.
REFERENCE_ARCHITECTURE: dict[str, Any] = {"positional": "input", "norm": "layer", "head_dim": 1, "hidden": 1,
                                          "lr": 1e-3}


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

    def intervention(self, x: SequenceInput, values: Mapping[str, Any] | tuple[Any, Any]) -> tuple[
            torch.Tensor, torch.Tensor]:
        """Not offered: a video's concepts are per window and pooled per class, so there is no one concept vector
        that the logits are read from; use ``intervene`` (logits) and ``explain`` (per-window concepts)."""
        raise TypeError(f"{type(self).__name__} has per-window concepts: use intervene(x, values) for the logits and "
                        "explain(x) for the concepts of each window.")

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
