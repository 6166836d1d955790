"""Energy-Based Concept Bottleneck Models (Xu et al., ICLR 2024): ``EnergyCBM``.

Three energy networks over frozen, standardised embeddings ``f(x)`` (hidden width ``hidden``):

- class energy ``E_xy(x, y) = w . ReLU(h + h * u_y)`` with ``h = W_xy f(x)`` and unit class embeddings ``u``;
- concept energy ``E_xc(x, c_k = j) = w_k . ReLU(g + g * v_kj)`` with ``g = W_xc f(x)`` and two learned
  embeddings per concept (``v_k0`` absent, ``v_k1`` present);
- global energy ``E_cy(c, y) = w . ReLU(e + e * u_y)`` with ``e = P [v_{1,c_1}; ...; v_{K,c_K}]``.

Each is trained with the negative log-likelihood of its Boltzmann distribution (classes given x, each
concept given x, classes given concepts), weighted ``loss_weights`` = (class, concept, global), real
valued, default (3, 1, 1). The global energy sees ground-truth concepts with random flips
(``flip_samples`` of a batch get ``flip_concepts`` of their concepts flipped). Training stops early
on the validation loss (a seeded 10% of train when no validation data is given, never test data)
and keeps the best epoch.

Inference relaxes the class to ``softmax(a)`` and each concept to ``sigmoid(b_k)`` and minimises the
weighted total energy ``E = l_xy E_xy + l_xc E_xc + l_cy E_cy`` (``inference_weights``) with Adam, per
sample, batched, until the relative change of each sample's energy stays under ``tol`` for ``patience``
steps (a converged sample is frozen, so a sample's result does not depend on the batch it is in). Soft
concepts enter every energy by mixing their two embeddings, ``(1 - p) v_k0 + p v_k1``; the class likewise
mixes the class embeddings. The class is then read out exactly at the inferred concepts ``c``: the logit
of class y is minus the total energy of (x, y, c),
``logits[y] = -(l_xy E_xy(x, y) + l_xc sum_k E_xc(x, c_k) + l_cy E_cy(c, y))``, whose softmax is the
Boltzmann distribution over the discrete class given x and c (the concept term is the same for every
class; it makes the logit the minimised energy, see gradients below).

One inference configuration serves prediction and every intervention: an intervention fixes concepts
and continues the optimisation from the unintervened solution (class and concept variables) under the
same weights, so a null intervention (an empty mask, or fixed values equal to the inferred ones) returns
the prediction exactly, and every move of the other concepts is caused by the correction. With every
concept fixed, the read-out alone gives the logits (no optimisation).

Gradients w.r.t. the input (TCAV at the embedding): when ``x`` requires grad, ``decision_function``
recomputes the read-out at the inferred, detached concepts, so its gradient is the partial derivative
``-d/dx (l_xy E_xy + l_xc E_xc)`` at the optimum. By the envelope theorem this is the gradient of minus
the minimised energy ``-min_c E(x, y, c)`` for the class the relaxed optimum settled on (the concepts'
own response to x drops out at a minimum); for the other classes it is the same partial derivative at
the shared optimum, a first-order approximation.

The reference setting (``REFERENCE_SETTING``, ``EnergyCBM.reference()``): the reference objective
(``global_concept_weight=0``), inference weights (1, 1, 0.01), the reference's network width, loss
weights and augmentation, and the exact class read-out above.

Departures from the reference code, on purpose (see docs/recipes/energy_cub.md):

- the global energy mixes the concept embeddings by the soft probabilities, so it passes gradients to
  the concept variables (the reference thresholds them at 0.5, so a corrected concept never moves
  the others);
- one convention for "present" (``v_k1``) in both the concept and the global energy;
- loss weights are real numbers (the reference truncates them to integers);
- ``global_concept_weight`` adds the pseudo-likelihood of each concept given the others and the
  class under ``exp(-E_cy)``. The reference only trains ``E_cy`` to rank classes, which leaves
  ``exp(-E_cy(., y))`` over concepts (what Propositions 3.2-3.5 normalise) unconstrained; this term
  makes the conditional probabilities read off the energy identifiable. Set it to 0 for the
  reference's objective.
- Adam (lr 1e-3) on frozen embeddings instead of SGD on a fine-tuned ResNet; the relative
  convergence test replaces the reference's absolute ``delta=1``.
- interventions use the inference weights and continue from the unintervened solution; the reference
  resets the class variables and re-optimises with the global energy alone (weights 0/0/3), so its
  "nothing corrected" point is not its prediction.
- the class is read out exactly from the discrete class energies at the inferred concepts rather than
  as the argmax of the relaxed class variable (kept as ``relaxed_class_probs``).

Conditional probabilities (Propositions 3.2-3.5) are expectations under ``p(c | y) ~ exp(-E_cy(c, y))``:
exact by enumeration up to ``exact_max_concepts`` concepts, else by batched Gibbs sampling with
Rao-Blackwellised marginals; ``p(c_k | c_j)`` mixes the classes by their training frequency.
``empirical_conditionals`` gives the reference's estimates from predictions, for comparison.

Explanations (``contributions``): the global energy is affine in the concepts before its ReLU, so
integrated gradients of the concepts' part of the logits, ``-l_cy E_cy(c, y)`` (``predict_from_concepts``),
from the training concept frequencies to ``c`` have a closed form. They decompose the logits exactly:
``contributions(x).sum(-1) + contribution_baseline() + contribution_rest(x) == decision_function(x)``,
where the rest ``-(l_xy E_xy(x, y) + l_xc sum_k E_xc(x, c_k))`` is the part that does not pass through
the global energy (and ``contributions.sum(-1) + contribution_baseline() == predict_from_concepts(c)``).

Edits cut a concept's link into the global energy for some classes: for those classes ``E_cy`` sees
the concept at a fixed value (``prune``: its training frequency; ``set_value``: a given value).

Concepts come from concept labels (given, or carried by an ``Embeddings``) or, when the data has
none, from a concept bank as pseudo-labels: a concept is "present" where the bank's score exceeds a
per-concept threshold (``pseudo_threshold``: "auto" = margin > 0 for CAV banks and the top 20% of
training scores, i.e. above the 0.8 quantile, for text banks; a number in (0, 1) is a quantile;
``("value", t)`` an absolute threshold). The rule and thresholds are recorded in ``training_``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cbm.backbones import resolve_device
from cbm.embed import Embeddings
from cbm.models.base import (ConceptBottleneckModel, EditRecord, Validation, _restore_common, accuracy, as_labels,
                             as_matrix, bank_from_state, bank_state, check_intervention, finite_output, holdout_split,
                             intervention_pair, split_validation)
from cbm.models.streaming import Rows, Stream, should_stream
from concepts.bank import ConceptBank

logger = logging.getLogger(__name__)

#: Global-energy weights tried at inference when ``inference_weights="auto"``.
AUTO_GLOBAL_WEIGHTS = (0.01, 0.1, 1.0)

#: The reference setting (Xu et al.'s code): its objective (no pseudo-likelihood term), its inference
#: weights, network width, loss weights, augmentation and optimiser settings; see ``EnergyCBM.reference``.
REFERENCE_SETTING: dict[str, Any] = {
    "global_concept_weight": 0.0, "inference_weights": (1.0, 1.0, 0.01), "hidden": 512,
    "loss_weights": (3.0, 1.0, 1.0), "flip_samples": 0.2, "flip_concepts": 0.2, "weight_decay": 4e-5,
    "batch_size": 64, "max_epochs": 300, "inference_lr": 0.1, "inference_patience": 10}


# ---------------------------------------------------------------------------------------------------- networks
class EnergyNetworks(nn.Module):
    """The three energy networks; every energy is returned per sample (lower = more compatible)."""

    def __init__(self, n_features: int, n_concepts: int, n_classes: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.k, self.m, self.hidden = n_concepts, n_classes, hidden
        self.x_to_y = nn.Linear(n_features, hidden)
        self.x_to_c = nn.Linear(n_features, hidden)
        self.class_embedding = nn.Parameter(torch.randn(n_classes, hidden) / math.sqrt(hidden))
        self.concept_embedding = nn.Parameter(torch.randn(n_concepts, 2, hidden) / math.sqrt(hidden))
        self.class_out = nn.Linear(hidden, 1)
        self.concept_out_weight = nn.Parameter(torch.randn(n_concepts, hidden) / math.sqrt(hidden))
        self.concept_out_bias = nn.Parameter(torch.zeros(n_concepts))
        self.concept_proj = nn.Linear(n_concepts * hidden, hidden)
        self.global_out = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)

    # -- pieces
    def units(self) -> torch.Tensor:
        """Unit class embeddings [M, H]."""
        return F.normalize(self.class_embedding, dim=1)

    def global_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``e(c) = base + c @ slope``: the projection of the mixed concept embeddings is affine in c."""
        weight = self.concept_proj.weight.view(self.hidden, self.k, self.hidden)  # [out, K, in]
        projected = torch.einsum("okh,kjh->kjo", weight, self.concept_embedding)  # [K, 2, out]
        base = projected[:, 0].sum(0) + self.concept_proj.bias
        return base, projected[:, 1] - projected[:, 0]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dropout(self.x_to_y(x)), self.dropout(self.x_to_c(x))

    # -- class energy
    def class_energy_all(self, h: torch.Tensor) -> torch.Tensor:
        """E_xy for every class [B, M]."""
        return self.class_out(F.relu(h[:, None] * (1 + self.units()[None]))).squeeze(-1)

    def class_energy_soft(self, h: torch.Tensor, p_y: torch.Tensor) -> torch.Tensor:
        """E_xy at relaxed classes p_y [B, M]: the class embedding is the normalised mixture [B]."""
        u = F.normalize(p_y @ self.units(), dim=1)
        return self.class_out(F.relu(h * (1 + u))).squeeze(-1)

    # -- concept energy
    def concept_energy_both(self, g: torch.Tensor) -> torch.Tensor:
        """E_xc for both values of every concept [B, K, 2]."""
        z = F.relu(g[:, None, None] * (1 + self.concept_embedding[None]))  # [B, K, 2, H]
        return torch.einsum("bkjh,kh->bkj", z, self.concept_out_weight) + self.concept_out_bias[:, None]

    def concept_energy_soft(self, g: torch.Tensor, p_c: torch.Tensor) -> torch.Tensor:
        """E_xc at relaxed concepts p_c [B, K] (mixed embeddings) [B, K]."""
        v0, v1 = self.concept_embedding[:, 0], self.concept_embedding[:, 1]
        v = v0[None] + p_c[..., None] * (v1 - v0)[None]
        z = F.relu(g[:, None] * (1 + v))
        return torch.einsum("bkh,kh->bk", z, self.concept_out_weight) + self.concept_out_bias

    def concept_energy_parts(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-batch constants of ``concept_energy_soft``: its pre-activation is ``z0 + p * dz``."""
        v0, v1 = self.concept_embedding[:, 0], self.concept_embedding[:, 1]
        return g[:, None] * (1 + v0)[None], g[:, None] * (v1 - v0)[None]

    def concept_energy_from_parts(self, parts: tuple[torch.Tensor, torch.Tensor], p_c: torch.Tensor) -> torch.Tensor:
        z = F.relu(parts[0] + p_c[..., None] * parts[1])
        return torch.einsum("bkh,kh->bk", z, self.concept_out_weight) + self.concept_out_bias

    # -- global energy
    def global_from_e(self, e: torch.Tensor) -> torch.Tensor:
        """E_cy for every class from pre-activations e [B, H] (shared by the classes) or [B, M, H] -> [B, M].

        Decided by the number of dimensions, not the shape: a batch of B == M rows is still a batch."""
        u = self.units()
        if e.ndim == 2:
            e = e.unsqueeze(1)
        return self.global_out(F.relu(e * (1 + u))).squeeze(-1)

    def global_e(self, p_c: torch.Tensor, links: LinkEdits | None = None) -> torch.Tensor:
        """Pre-activations [B, H], or [B, M, H] when some links are edited."""
        base, slope = self.global_affine()
        e = base + p_c @ slope
        if links is None or links.is_identity:
            return e
        mask, value = links.mask.to(e.device), links.value.to(e.device)
        # for class m, concept k sees value[m, k] instead of p_c[:, k] where mask[m, k] is False
        delta = torch.einsum("mk,bmk,kh->bmh", (~mask).float(), value[None] - p_c[:, None], slope)
        return e[:, None] + delta

    def global_energy_all(self, p_c: torch.Tensor, links: LinkEdits | None = None) -> torch.Tensor:
        """E_cy(c, y) for every class [B, M]."""
        return self.global_from_e(self.global_e(p_c, links))

    def global_energy_soft(self, p_c: torch.Tensor, p_y: torch.Tensor, links: LinkEdits | None = None) -> torch.Tensor:
        """E_cy at relaxed concepts and class [B]."""
        e = self.global_e(p_c, links)
        if e.ndim == 3:
            e = (p_y[..., None] * e).sum(1)
        u = F.normalize(p_y @ self.units(), dim=1)
        return self.global_out(F.relu(e * (1 + u))).squeeze(-1)


@contextmanager
def _frozen(net: nn.Module) -> Iterator[None]:
    """The network's weights out of autograd while the block runs (inference and read-outs never train)."""
    for p in net.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in net.parameters():
            p.requires_grad_(True)


@dataclass
class LinkEdits:
    """Which concepts feed the global energy of which class (``mask`` [M, K]) and what the cut ones see."""

    mask: torch.Tensor
    value: torch.Tensor

    @property
    def is_identity(self) -> bool:
        return bool(self.mask.all())


# ---------------------------------------------------------------------------------------------------- results
@dataclass
class Inference:
    """Result of gradient inference per sample: class logits (the exact read-out, see ``infer``),
    concept probabilities, the relaxed class variable, the final total energy, the optimisation steps
    taken (in all, when an intervention continued it), and the optimiser's state from which an
    intervention continues: for the class [N, 3, C] and the concepts [N, 3, K], the pre-activations and
    Adam's first and second moments."""

    logits: torch.Tensor
    concept_probs: torch.Tensor
    relaxed_class_probs: torch.Tensor
    energy: torch.Tensor
    steps: torch.Tensor
    class_state: torch.Tensor
    concept_state: torch.Tensor

    @property
    def class_probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=1)

    def take(self, rows: torch.Tensor) -> Inference:
        """The results of samples ``rows`` (an index tensor; repeats allowed), copied."""
        return Inference(*(getattr(self, f.name)[rows] for f in fields(self)))

    def to(self, device: torch.device) -> Inference:
        return Inference(*(getattr(self, f.name).to(device) for f in fields(self)))

    def put(self, rows: torch.Tensor, other: Inference) -> None:
        """Overwrite the results of samples ``rows`` with ``other``'s (one row of it per index)."""
        for f in fields(self):
            getattr(self, f.name)[rows] = getattr(other, f.name)


@dataclass
class Propagation:
    """An intervention: what was fixed, and how the other concepts and the class moved."""

    mask: torch.Tensor  # [N, K] the intervened concepts
    concepts_before: torch.Tensor  # [N, K] probabilities before
    concepts_after: torch.Tensor  # [N, K] after (intervened ones hold the given values)
    logits_before: torch.Tensor  # [N, C]
    logits_after: torch.Tensor  # [N, C]
    concept_names: list[str]
    class_names: list[str]

    @property
    def concept_shift(self) -> torch.Tensor:
        """Change of every non-intervened concept's probability [N, K] (0 on intervened ones)."""
        return torch.where(self.mask, torch.zeros(()), self.concepts_after - self.concepts_before)

    @property
    def flipped(self) -> torch.Tensor:
        """Non-intervened concepts whose predicted value (p > 0.5) changed [N, K]."""
        return ~self.mask & ((self.concepts_after > 0.5) != (self.concepts_before > 0.5))

    @property
    def class_changed(self) -> torch.Tensor:
        return self.logits_before.argmax(1) != self.logits_after.argmax(1)

    def describe(self, i: int = 0, top: int = 5) -> str:
        """One sample's intervention in words."""
        fixed = [self.concept_names[k] for k in torch.nonzero(self.mask[i]).flatten().tolist()]
        shift = self.concept_shift[i]
        order = shift.abs().argsort(descending=True)[:top]
        moved = [f"{self.concept_names[k]} {float(self.concepts_before[i, k]):.2f}->{float(self.concepts_after[i, k]):.2f}"
                 for k in order.tolist() if abs(float(shift[k])) > 1e-3]
        before, after = int(self.logits_before[i].argmax()), int(self.logits_after[i].argmax())
        return (f"fixed {', '.join(fixed) or 'nothing'}; class {self.class_names[before]} -> {self.class_names[after]}; "
                f"moved: {', '.join(moved) or 'nothing'}")


# ---------------------------------------------------------------------------------------------------- model
class EnergyCBM(ConceptBottleneckModel):
    """Energy-based CBM over frozen embeddings; see the module docstring.

    Parameters
    ----------
    hidden: width of the energy networks (reference: 512).
    loss_weights: (class, concept, global) weights of the training losses, real numbers (reference 3/1/1).
    global_concept_weight: weight of the pseudo-likelihood of the concepts given the class under the
        global energy (0 = the reference's objective); see the module docstring.
    flip_samples, flip_concepts: concept augmentation of the global energy (reference 0.2/0.2).
    dropout, lr, weight_decay, batch_size, max_epochs, patience: training (Adam; early stopping on the
        validation loss with ``patience`` epochs).
    inference_weights: (class, concept, global) energy weights of inference, for prediction and every
        intervention alike, or "auto": 1/1/g with the global weight g chosen among
        ``AUTO_GLOBAL_WEIGHTS`` (0.01 as in the reference, 0.1, 1 = the joint Boltzmann of the three
        energies) by validation class + concept accuracy. The same weights serve interventions: a small
        g (0.01) keeps the class close to the class energy's, so corrections move it little; pass
        (1, 1, 1) when interventions matter most. The class or the global weight must be
        positive (the class is read out from those energies). A larger global weight lets a
        corrected concept move the others more.
    inference_lr, inference_steps, tol, inference_patience: Adam on the relaxed variables and the relative
        convergence test; ``inference_batch`` samples are optimised together.
    bank, pseudo_threshold: a concept bank for pseudo-labels when the data has no concept labels.
    exact_max_concepts, gibbs_chains, gibbs_sweeps: conditional probabilities (exact or Gibbs).
    stream: keep the training data on the device (False), stream it from host memory in batches and
        chunks (True), or decide by free device memory ("auto"); see ``cbm.models.streaming``.
        Inference always goes ``inference_batch`` samples at a time.
    """

    family = "energy"

    def __init__(self, *, hidden: int = 256, loss_weights: Sequence[float] = (3.0, 1.0, 1.0),
                 global_concept_weight: float = 1.0, flip_samples: float = 0.2, flip_concepts: float = 0.2,
                 dropout: float = 0.2, lr: float = 1e-3, weight_decay: float = 4e-5, batch_size: int = 64,
                 max_epochs: int = 100, patience: int = 8,
                 inference_weights: Sequence[float] | Literal["auto"] = "auto", inference_lr: float = 0.1,
                 inference_steps: int = 300, tol: float = 1e-4, inference_patience: int = 10,
                 inference_batch: int = 2048, bank: ConceptBank | None = None,
                 pseudo_threshold: str | float | tuple[str, float] = "auto", exact_max_concepts: int = 14,
                 gibbs_chains: int = 256, gibbs_sweeps: int = 200, seed: int = 0, device: str = "auto",
                 stream: Stream = "auto") -> None:
        self.hidden = hidden
        self.loss_weights = loss_weights
        self.global_concept_weight = global_concept_weight
        self.flip_samples = flip_samples
        self.flip_concepts = flip_concepts
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.inference_weights = inference_weights
        self.inference_lr = inference_lr
        self.inference_steps = inference_steps
        self.tol = tol
        self.inference_patience = inference_patience
        self.inference_batch = inference_batch
        self.bank = bank
        self.pseudo_threshold = pseudo_threshold
        self.exact_max_concepts = exact_max_concepts
        self.gibbs_chains = gibbs_chains
        self.gibbs_sweeps = gibbs_sweeps
        self.seed = seed
        self.device = device
        self.stream = stream

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _weights(value: Sequence[float], name: str) -> tuple[float, float, float]:
        try:
            weights = tuple(float(w) for w in value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be three numbers (class, concept, global), got {value!r}.") from None
        if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
            raise ValueError(f"{name} must be three non-negative numbers, not all zero, got {value!r}.")
        return weights  # type: ignore[return-value]

    @classmethod
    def _inference_weights(cls, value: Sequence[float]) -> tuple[float, float, float]:
        weights = cls._weights(value, "inference_weights")
        if not (weights[0] or weights[2]):
            raise ValueError(f"inference_weights {value!r} leave the class out of the energy; give the class or the "
                             "global energy a positive weight.")
        return weights

    @classmethod
    def reference(cls, **overrides: Any) -> EnergyCBM:
        """An unfitted model in the reference setting (``REFERENCE_SETTING``: global_concept_weight 0,
        inference weights (1, 1, 0.01), hidden 512, loss weights 3/1/1, ...), with ``overrides`` on top."""
        return cls(**{**REFERENCE_SETTING, **overrides})

    def _standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean_) / self.feature_scale_

    def _links(self) -> LinkEdits:
        return LinkEdits(self.link_mask_, self.link_value_)

    def _net_on(self, device: torch.device) -> EnergyNetworks:
        return self.net_.to(device).eval()

    # ------------------------------------------------------------------ concept labels
    def _concept_targets(self, x: Any, features: torch.Tensor, concept_labels: Any,
                         fingerprint: str | None) -> tuple[torch.Tensor, list[str], dict[str, Any]]:
        if concept_labels is None and self.bank is None and isinstance(x, Embeddings) and x.concept_labels is not None:
            concept_labels = x.concept_labels
            names = list(x.concept_names or [])
            source: dict[str, Any] = {"source": "dataset concept labels"}
        elif concept_labels is not None:
            names = list(self.bank.names) if self.bank is not None else []
            source = {"source": "given concept labels"}
        else:
            names = []
            source = {}
        if concept_labels is not None:
            labels = as_matrix(concept_labels, "concept_labels")
            if len(labels) != len(features):
                raise ValueError(f"concept_labels has {len(labels)} rows but x has {len(features)}.")
            if ((labels != 0) & (labels != 1)).any():
                raise ValueError("concept_labels must be binary (0/1); threshold soft labels first.")
            if len(names) != labels.shape[1]:
                names = [f"concept {i}" for i in range(labels.shape[1])]
            return labels, names, source
        if self.bank is None:
            raise ValueError("EnergyCBM needs concept labels: pass concept_labels=, data that carries them "
                             "(toy world, CUB, a manifest with concept columns), or bank= for pseudo-labels.")
        scores = self.bank.scores(features, fingerprint)
        thresholds, rule = self._pseudo_thresholds(scores)
        labels = (scores > thresholds).float()
        source = {"source": "pseudo-labels from a concept bank", "rule": rule, "thresholds": thresholds.tolist(),
                  "bank_kind": self.bank.kind, "positive_rate": labels.mean(0).tolist()}
        return labels, list(self.bank.names), source

    def _pseudo_thresholds(self, scores: torch.Tensor) -> tuple[torch.Tensor, str]:
        rule = self.pseudo_threshold
        if isinstance(rule, (tuple, list)) and len(rule) == 2 and rule[0] == "value":
            return torch.full((scores.shape[1],), float(rule[1])), f"score > {float(rule[1])}"
        if rule == "auto":
            if self.bank is not None and self.bank.kind == "cav":
                return torch.zeros(scores.shape[1]), "CAV margin > 0"
            rule = 0.8
        if isinstance(rule, (int, float)) and 0 < float(rule) < 1:
            return torch.quantile(scores, float(rule), dim=0), f"score above the per-concept {float(rule):.2f} quantile"
        raise ValueError(f"pseudo_threshold must be 'auto', a quantile in (0, 1) or ('value', t), got {rule!r}.")

    # ------------------------------------------------------------------ fitting
    def fit(self, x: Any, y: Any = None, *, concept_labels: Any = None, validation: Validation = None,
            validation_concepts: Any = None, class_names: list[str] | None = None) -> EnergyCBM:
        """Train the three energies. Concept labels come, in this order, from ``concept_labels``, as
        pseudo-labels from ``bank`` when one was given, or from an Embeddings ``x`` that carries them;
        the validation split's from ``validation_concepts``, the same pseudo-labelling, or an
        Embeddings ``validation``."""
        if y is None and isinstance(x, Embeddings):
            y = x.labels
        if y is None:
            raise ValueError("y is required (or pass an Embeddings with labels as x).")
        weights = self._weights(self.loss_weights, "loss_weights")
        if self.inference_weights != "auto":
            self._inference_weights(self.inference_weights)
        fingerprint = x.backbone_fingerprint if isinstance(x, Embeddings) else None
        features = as_matrix(x, "x")
        labels = as_labels(y, len(features))
        concepts, names, source = self._concept_targets(x, features, concept_labels, fingerprint)
        n_classes = max(int(labels.max()) + 1, len(class_names or getattr(x, "class_names", None) or []))
        self._set_data_identity(x, class_names, n_classes)
        n_classes = len(self.class_names_)
        self.concept_names_ = names
        self.n_features_in_ = features.shape[1]

        # validation: features, labels and concepts; never test data
        if validation is None:
            train_idx, val_idx = holdout_split(len(features), self.seed)
            train_x, train_y, train_c = features[train_idx], labels[train_idx], concepts[train_idx]
            val_x, val_y, val_c = features[val_idx], labels[val_idx], concepts[val_idx]
            val_source = f"held out 10% of train (seed {self.seed})"
        else:
            train_x, train_y, train_c = features, labels, concepts
            _, _, val_x, val_y, val_source = split_validation(features, labels, validation, self.seed)
            val_y = as_labels(val_y, len(val_x), n_classes, "validation y")
            if validation_concepts is None and isinstance(validation, Embeddings) and source["source"] != \
                    "pseudo-labels from a concept bank":
                validation_concepts = validation.concept_labels
            if validation_concepts is not None:
                val_c = as_matrix(validation_concepts, "validation_concepts", len(names))
            elif source["source"] == "pseudo-labels from a concept bank":
                val_c = (self.bank.scores(val_x) > torch.tensor(source["thresholds"])).float()
            else:
                raise ValueError("validation data needs concept labels too: pass validation_concepts= or an "
                                 "Embeddings with concept labels.")
            if len(val_c) != len(val_x):
                raise ValueError(f"validation concepts have {len(val_c)} rows but validation x has {len(val_x)}.")

        self.feature_mean_ = train_x.mean(0)
        self.feature_scale_ = train_x.std(0).clamp_min(1e-6) if len(train_x) > 1 else torch.ones(train_x.shape[1])
        self.concept_prior_ = train_c.mean(0)
        self.class_prior_ = torch.bincount(train_y, minlength=n_classes).float() / len(train_y)
        k = len(names)
        self.link_mask_ = torch.ones(n_classes, k, dtype=torch.bool)
        self.link_value_ = self.concept_prior_.expand(n_classes, k).clone()

        device = resolve_device(self.device)
        train = (self._standardise(train_x), train_y, train_c)
        val = (self._standardise(val_x), val_y, val_c)
        streamed = should_stream(self.stream, train + val, device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            net = EnergyNetworks(self.n_features_in_, k, n_classes, self.hidden, self.dropout).to(device)
            history = self._train(net, weights, Rows(train, device, streamed), Rows(val, device, streamed))
        self.net_ = net.cpu().eval()
        self.metrics_ = {"val_loss": history["best_val_loss"]}
        if self.inference_weights == "auto":
            scores = {}
            for weight in AUTO_GLOBAL_WEIGHTS:
                self.inference_weights_ = (1.0, 1.0, weight)
                trial = self.infer(val_x)
                scores[weight] = (accuracy(trial.logits, val_y)
                                  + float(((trial.concept_probs > 0.5).float() == val_c).float().mean()))
            best = max(AUTO_GLOBAL_WEIGHTS, key=lambda w: (round(scores[w], 4), w))
            self.inference_weights_ = (1.0, 1.0, best)
            self.training_selection_ = {str(w): v for w, v in scores.items()}
        else:
            self.inference_weights_ = self._inference_weights(self.inference_weights)
            self.training_selection_ = {}
        val_inference = self.infer(val_x)
        self.metrics_.update({
            "val_accuracy": accuracy(val_inference.logits, val_y),
            "val_concept_accuracy": float(((val_inference.concept_probs > 0.5).float() == val_c).float().mean()),
            "val_overall_concept_accuracy": float(((val_inference.concept_probs > 0.5).float() == val_c)
                                                  .all(1).float().mean())})
        self.training_ = {"samples": len(train_x), "validation": val_source, "validation_samples": len(val_x),
                          "concepts": source, "epochs": history["epochs"], "best_epoch": history["best_epoch"],
                          "streamed": streamed,
                          "loss_weights": list(weights), "stopped_early": history["stopped_early"],
                          "inference_weights": list(self.inference_weights_),
                          "inference_weight_selection": self.training_selection_}
        logger.info("ECBM: best epoch %d of %d, validation accuracy %.3f, concept accuracy %.3f",
                    history["best_epoch"], history["epochs"], self.metrics_["val_accuracy"],
                    self.metrics_["val_concept_accuracy"])
        return self

    def _losses(self, net: EnergyNetworks, x: torch.Tensor, y: torch.Tensor, c: torch.Tensor,
                weights: tuple[float, float, float], generator: torch.Generator | None) -> torch.Tensor:
        h, g = net.encode(x)
        class_loss = F.cross_entropy(-net.class_energy_all(h), y)
        concept_energy = net.concept_energy_both(g)  # [B, K, 2]
        concept_loss = F.cross_entropy(-concept_energy.reshape(-1, 2), c.long().reshape(-1),
                                       reduction="sum") / len(x)
        flipped = c
        if generator is not None and self.flip_samples > 0 and self.flip_concepts > 0:
            rows = torch.rand(len(c), 1, generator=generator) < self.flip_samples
            cells = torch.rand(c.shape, generator=generator) < self.flip_concepts
            flipped = torch.where((rows & cells).to(c.device), 1 - c, c)
        global_loss = F.cross_entropy(-net.global_energy_all(flipped), y)
        total = weights[0] * class_loss + weights[1] * concept_loss + weights[2] * global_loss
        if self.global_concept_weight > 0:
            total = total + self.global_concept_weight * self._pseudo_likelihood(net, c, y)
        return total

    @staticmethod
    def _pseudo_likelihood(net: EnergyNetworks, c: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """- sum_k log p(c_k | c_-k, y) under exp(-E_cy(., y)), averaged over samples."""
        base, slope = net.global_affine()
        e = base + c @ slope  # [B, H]
        u = net.units()[y]  # [B, H]
        e_on = e[:, None] + (1 - c)[..., None] * slope[None]  # concept k set to 1
        e_off = e[:, None] - c[..., None] * slope[None]  # concept k set to 0
        energy = lambda z: net.global_out(F.relu(z * (1 + u[:, None]))).squeeze(-1)  # noqa: E731
        delta = energy(e_on) - energy(e_off)  # [B, K]: E(c_k=1) - E(c_k=0)
        return F.binary_cross_entropy_with_logits(-delta, c, reduction="sum") / len(c)

    def _train(self, net: EnergyNetworks, weights: tuple[float, float, float], train: Rows,
               val: Rows) -> dict[str, Any]:
        """Adam on (standardised features, labels, concepts) ``train``; early stopping on the loss over ``val``."""
        generator = torch.Generator().manual_seed(self.seed)
        optimiser = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best_loss, best_state, best_epoch, stale, epoch = float("inf"), None, 0, 0, 0
        for epoch in range(1, self.max_epochs + 1):
            net.train()
            for batch in torch.randperm(len(train), generator=generator).split(self.batch_size):
                loss = self._losses(net, *train.batch(batch), weights, generator)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            net.eval()
            with torch.no_grad():  # the per-sample mean loss, summed chunk by chunk
                val_loss = float(val.sum(lambda x, y, c: self._losses(net, x, y, c, weights, None) * len(x))) / len(val)
            if best_state is None or val_loss < best_loss - 1e-4 * abs(best_loss):
                best_loss, best_epoch, stale = val_loss, epoch, 0
                best_state = {name: t.detach().clone() for name, t in net.state_dict().items()}
            else:
                stale += 1
                if stale >= self.patience:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        optimiser.zero_grad(set_to_none=True)  # a fitted model holds no gradient buffers
        return {"best_val_loss": best_loss, "best_epoch": best_epoch, "epochs": epoch,
                "stopped_early": epoch < self.max_epochs}

    # ------------------------------------------------------------------ inference
    def infer(self, x: Any, mask: Any = None, values: Any = None, *, weights: Sequence[float] | None = None,
              init: Inference | None = None, device: str | None = None) -> Inference:
        """Gradient inference of the class and concepts, batched; ``mask``/``values`` [N, K] fix concepts.

        The class and concepts are relaxed and optimised together, as in the reference, under
        ``weights`` (default: the model's inference weights); the class is then read out exactly at the
        optimised concepts: ``logits[y]`` is minus the total energy of (x, y, c), i.e. the Boltzmann
        distribution over the discrete class given x and the concepts (the relaxed class variable is
        kept as ``relaxed_class_probs``).

        ``init`` (an earlier ``infer(x)`` of the same x under the same weights) makes this a continuation:
        rows whose fixed concepts already hold ``init``'s values (an empty mask included) keep ``init``'s
        result exactly, and the other rows resume ``init``'s optimisation (variables and Adam's moments,
        so that only the change itself moves them; a fresh optimiser would take full-size steps from the
        optimum). Without ``init``, the variables start uniform, as in the reference, and identical
        unconstrained rows are inferred once.
        """
        features = self._features(x).detach()
        n, k = len(features), len(self.concept_names_)
        lam = self._weights(weights if weights is not None else self.inference_weights_, "weights")
        fixed = torch.zeros(n, k, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
        given = torch.zeros(n, k) if values is None else torch.as_tensor(values, dtype=torch.float32)
        if fixed.shape != (n, k) or given.shape != (n, k):
            raise ValueError(f"mask and values must be [{n}, {k}].")
        if ((given[fixed] < 0) | (given[fixed] > 1)).any():
            raise ValueError("intervened concept values are probabilities and must lie in [0, 1].")
        if init is None:
            if mask is None:
                unique, inverse = torch.unique(features, dim=0, return_inverse=True)
                if len(unique) < n:
                    return self.infer(unique, weights=lam, device=device).take(inverse)
            return self._optimise(features, fixed, given, lam, None, device)
        if len(init.logits) != n:
            raise ValueError(f"init must be an inference of the same {n} samples, got {len(init.logits)} rows.")
        todo = torch.nonzero((fixed & (given != init.concept_probs)).any(1)).flatten()
        result = init.take(torch.arange(n))
        if len(todo):
            result.put(todo, self._optimise(features[todo], fixed[todo], given[todo], lam, init.take(todo), device))
        return result

    def _optimise(self, features: torch.Tensor, fixed: torch.Tensor, given: torch.Tensor,
                  lam: tuple[float, float, float], start: Inference | None, device: str | None) -> Inference:
        """``infer``'s optimisation of every row, ``inference_batch`` rows at a time."""
        run_on = resolve_device(device or self.device)
        net = self._net_on(run_on)
        links = self._links()
        outs = []
        for rows in torch.arange(len(features)).split(self.inference_batch):
            outs.append(self._infer_batch(net, self._standardise(features[rows]).to(run_on), fixed[rows].to(run_on),
                                          given[rows].to(run_on), lam, links,
                                          None if start is None else start.take(rows).to(run_on)))
        self.net_.cpu()
        return Inference(*(torch.cat([o[i] for o in outs]).cpu() for i in range(len(outs[0]))))

    def _infer_batch(self, net: EnergyNetworks, x: torch.Tensor, fixed: torch.Tensor, given: torch.Tensor,
                     lam: tuple[float, float, float], links: LinkEdits,
                     start: Inference | None) -> tuple[torch.Tensor, ...]:
        b, m, k = len(x), net.m, net.k
        with torch.no_grad():
            h, g = net.encode(x)
            g = net.concept_energy_parts(g)
        with _frozen(net), torch.enable_grad():  # the relaxed variables are optimised by gradient, even under no_grad
            class_state = torch.zeros(b, 3, m, device=x.device) if start is None else start.class_state.clone()
            concept_state = torch.zeros(b, 3, k, device=x.device) if start is None else start.concept_state.clone()
            a, s = class_state[:, 0].clone(), concept_state[:, 0].clone()
            params = [a, s]
            moments = [(class_state[:, 1], class_state[:, 2]), (concept_state[:, 1], concept_state[:, 2])]
            settled = fixed.all(dim=1)  # nothing left to infer: the read-out below is exact without steps
            active = ~settled
            stale = torch.zeros(b, dtype=torch.long, device=x.device)
            steps = torch.zeros(b, dtype=torch.long, device=x.device) if start is None else start.steps.clone()
            previous = None
            beta1, beta2, eps = 0.9, 0.999, 1e-8
            for _ in range(self.inference_steps):
                if not active.any():
                    break
                a.requires_grad_(True)
                s.requires_grad_(True)
                energy = self._total_energy(net, h, g, a, s, fixed, given, lam, links)
                # a zero weight can leave the class or the concept variables out of the energy
                grads = torch.autograd.grad(energy.sum(), params, allow_unused=True, materialize_grads=True)
                a, s = a.detach(), s.detach()
                energy = energy.detach()
                if previous is not None:
                    small = (previous - energy).abs() <= self.tol * energy.abs().clamp_min(1e-3)
                    stale = torch.where(small, stale + 1, torch.zeros_like(stale))
                    active = active & (stale < self.inference_patience)
                    if not active.any():
                        break
                previous = energy
                steps += active.long()
                rows = active[:, None].float()
                updated = []
                for t, grad, (m1, m2) in zip((a, s), grads, moments):
                    m1.mul_(1 - (1 - beta1) * rows).add_((1 - beta1) * rows * grad)
                    m2.mul_(1 - (1 - beta2) * rows).add_((1 - beta2) * rows * grad * grad)
                    count = steps[:, None].clamp_min(1).float()
                    m_hat = m1 / (1 - beta1 ** count)
                    v_hat = m2 / (1 - beta2 ** count)
                    updated.append(t - rows * self.inference_lr * m_hat / (v_hat.sqrt() + eps))
                a, s = updated
                params = [a, s]
            with torch.no_grad():
                p_c = torch.where(fixed, given, torch.sigmoid(s))
                if lam[0] or lam[2]:  # exact minimisation over the discrete class given the concepts
                    logits = self._readout(net, h, g, p_c, lam, links)
                    a = torch.where(settled[:, None], logits, a)
                else:
                    logits = torch.log_softmax(a, dim=1)
                energy = self._total_energy(net, h, g, a, s, fixed, given, lam, links)
            class_state[:, 0], concept_state[:, 0] = a, s
            return logits, p_c, torch.softmax(a, dim=1), energy, steps, class_state, concept_state

    @staticmethod
    def _total_energy(net: EnergyNetworks, h, g, a, s, fixed, given, lam, links) -> torch.Tensor:
        p_y = torch.softmax(a, dim=1)
        p_c = torch.where(fixed, given, torch.sigmoid(s))
        total = torch.zeros(len(h), device=h.device)
        if lam[0]:
            total = total + lam[0] * net.class_energy_soft(h, p_y)
        if lam[1]:
            total = total + lam[1] * net.concept_energy_from_parts(g, p_c).sum(1)
        if lam[2]:
            total = total + lam[2] * net.global_energy_soft(p_c, p_y, links)
        return total

    # ------------------------------------------------------------------ the read-out
    @staticmethod
    def _concept_part(net: EnergyNetworks, p_c: torch.Tensor, links: LinkEdits,
                      lam: tuple[float, float, float]) -> torch.Tensor:
        """The concepts' part of the logits, ``-l_cy E_cy(c, y)`` [B, M]."""
        return -lam[2] * net.global_energy_all(p_c, links)

    @staticmethod
    def _input_part(net: EnergyNetworks, h: torch.Tensor, g_parts: tuple[torch.Tensor, torch.Tensor],
                    p_c: torch.Tensor, lam: tuple[float, float, float]) -> torch.Tensor:
        """The rest of the logits, ``-(l_xy E_xy(x, y) + l_xc sum_k E_xc(x, c_k))`` [B, M] (the concept
        energy is the same for every class)."""
        rest = -lam[0] * net.class_energy_all(h)
        return rest - lam[1] * net.concept_energy_from_parts(g_parts, p_c).sum(1, keepdim=True)

    @classmethod
    def _readout(cls, net: EnergyNetworks, h: torch.Tensor, g_parts: tuple[torch.Tensor, torch.Tensor],
                 p_c: torch.Tensor, lam: tuple[float, float, float], links: LinkEdits) -> torch.Tensor:
        """Exact class logits at concepts ``p_c``: minus the total energy of (x, y, c) for every class y."""
        return cls._input_part(net, h, g_parts, p_c, lam) + cls._concept_part(net, p_c, links, lam)

    def _parts(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input part, concept part) of the logits [N, C] at features ``x`` and concepts ``c``, on the CPU;
        differentiable w.r.t. ``x`` (not w.r.t. the network's weights)."""
        net, lam = self.net_.eval(), self.inference_weights_
        c = c.detach().cpu().clamp(0, 1)
        with _frozen(net):
            h, g = net.encode(self._standardise(x.cpu()))
            rest = self._input_part(net, h, net.concept_energy_parts(g), c, lam)
            return rest, self._concept_part(net, c, self._links(), lam)

    # ------------------------------------------------------------------ the shared interface
    def concepts(self, x: Any) -> torch.Tensor:
        """Concept probabilities [N, K] from gradient inference."""
        return self.infer(x).concept_probs

    def decision_function(self, x: Any) -> torch.Tensor:
        """Class logits [N, C] after gradient inference (see ``infer``). When ``x`` requires grad they are
        differentiable w.r.t. it: the read-out at the inferred, detached concepts, whose gradient is that
        of the minimised energy (envelope theorem; see the module docstring)."""
        features = self._features(x)
        inference = self.infer(features)
        if not (features.requires_grad and torch.is_grad_enabled()):
            return finite_output(inference.logits)
        return finite_output(self._logits(features, inference.concept_probs))

    def predict_from_concepts(self, c: Any) -> torch.Tensor:
        """The concepts' part of the logits, ``-l_cy E_cy(c, y)`` [N, C] with the inference weight ``l_cy``
        (its softmax over classes is the global energy's Boltzmann distribution at temperature 1 / l_cy);
        ``decision_function(x) == predict_from_concepts(concepts(x)) + contribution_rest(x) -
        contribution_baseline()``."""
        c = as_matrix(c, "concepts", len(self.concept_names_)).clamp(0, 1)
        with torch.no_grad():
            return self._concept_part(self.net_.eval(), c, self._links(), self.inference_weights_)

    def _logits(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Exact class logits with every concept fixed at ``c`` (the read-out, no optimisation)."""
        rest, concept_part = self._parts(x, c)
        return rest + concept_part

    def concept_reference(self, name: str, which: str) -> float:
        """"high"/"present" = 1, "low"/"absent" = 0."""
        self.concept_index(name)
        if which in ("high", "present"):
            return 1.0
        if which in ("low", "absent"):
            return 0.0
        raise ValueError(f"reference value must be 'high'/'present' or 'low'/'absent', got {which!r}.")

    def _intervention_mask(self, n: int, values: Mapping[str, Any] | tuple[Any, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        check_intervention(values)
        k = len(self.concept_names_)
        if isinstance(values, tuple):
            mask, given = intervention_pair(values, (n, k))
            return mask, torch.where(mask, given, torch.zeros(()))
        mask, given = torch.zeros(n, k, dtype=torch.bool), torch.zeros(n, k)
        for name, value in values.items():
            column, value = self.intervention_value(name, value, n)
            mask[:, column] = True
            given[:, column] = value
        return mask, given

    def propagate(self, x: Any, values: Mapping[str, Any] | tuple[Any, Any], *,
                  before: Inference | None = None) -> Propagation:
        """Fix concepts (``{name: value}`` or ``(mask, values)``, values in [0, 1]), let the other concepts and
        the class respond, and report how they moved. ``before`` is the model's own inference (its
        prediction); the optimisation continues from it under the same inference weights, so an empty
        intervention, or concepts fixed at their inferred values, move nothing, and every shift is
        caused by the correction. Pass ``before`` (``model.infer(x)`` for the same x) to skip re-running it."""
        features = self._features(x)
        mask, given = self._intervention_mask(len(features), values)
        before = before if before is not None else self.infer(features)
        after = self.infer(features, mask, given, init=before)
        return Propagation(mask, before.concept_probs, after.concept_probs, before.logits, after.logits,
                           list(self.concept_names_), list(self.class_names_))

    def intervene(self, x: Any, values: Mapping[str, Any] | tuple[Any, Any]) -> torch.Tensor:
        """Class logits [N, C] after fixing concepts and letting the rest respond (see ``propagate``): an
        empty intervention gives ``decision_function(x)`` exactly; rows with every concept fixed get the
        exact read-out at the given concepts (no inference)."""
        features = self._features(x)
        mask, given = self._intervention_mask(len(features), values)
        if mask.all():
            return finite_output(self.infer(features, mask, given).logits)
        return finite_output(self.propagate(features, (mask, given)).logits_after)

    # ------------------------------------------------------------------ explanations
    def contribution_baseline(self) -> torch.Tensor:
        """``predict_from_concepts`` [C] at the training concept frequencies, the start of the attribution path."""
        return self.predict_from_concepts(self.concept_prior_[None])[0]

    def contribution_rest(self, x: Any, concepts: Any = None) -> torch.Tensor:
        """The part of the logits [N, C] not attributed to concepts: ``contribution_baseline()`` plus
        ``-(l_xy E_xy(x, y) + l_xc sum_k E_xc(x, c_k))`` at the inferred concepts (or ``concepts``), so that
        ``contributions(x).sum(-1) + contribution_rest(x) == decision_function(x)`` (to float rounding)."""
        features = self._features(x).detach()
        c = self.concepts(features) if concepts is None else as_matrix(concepts, "concepts", len(self.concept_names_))
        with torch.no_grad():
            return self._parts(features, c)[0] + self.contribution_baseline()

    def contributions(self, x: Any, concepts: Any = None) -> torch.Tensor:
        """Exact integrated gradients of the concepts' part of the logits, ``-l_cy E_cy(c, y)`` [N, C, K], from
        the training concept frequencies to ``c`` (the inferred concepts, or ``concepts``):
        ``contributions.sum(-1) + contribution_baseline() == predict_from_concepts(c)`` and
        ``contributions(x).sum(-1) + contribution_rest(x) == decision_function(x)``."""
        c = self.concepts(x) if concepts is None else as_matrix(concepts, "concepts", len(self.concept_names_))
        net = self.net_.eval()
        links = self._links()
        with torch.no_grad():
            base, slope = net.global_affine()
            u = net.units()  # [M, H]
            c0 = self.concept_prior_[None].expand_as(c)
            scale = (1 + u)[None]  # [1, M, H]
            # effective concepts per class (cut links see a fixed value on both ends of the path)
            mask = links.mask.float()[None]  # [1, M, K]
            c_end = mask * c[:, None] + (1 - mask) * links.value[None]
            c_start = mask * c0[:, None] + (1 - mask) * links.value[None]
            z0 = (base + c_start @ slope) * scale  # [N, M, H]
            dz = ((c_end - c_start) @ slope) * scale
            # fraction of the path t in [0, 1] on which unit z0 + t dz is positive
            with np.errstate(all="ignore"):
                root = -z0 / dz
            pos_start = (z0 > 0).float()
            fraction = torch.where(dz > 0, (1 - root.clamp(0, 1)), root.clamp(0, 1))
            fraction = torch.where(dz == 0, pos_start, fraction)
            w = net.global_out.weight[0]  # [H]
            # dE/dc_k along the path = sum_h w_h 1[z_h > 0] scale_h slope_kh
            per_unit = fraction * scale * w  # [N, M, H]
            grad_integral = per_unit @ slope.T  # [N, M, K]
            return -self.inference_weights_[2] * (grad_integral * (c_end - c_start))

    # ------------------------------------------------------------------ conditional probabilities
    def _global_terms(self, links: LinkEdits | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class: ``e(c) = base_m + c @ slope_m`` with cut links folded in ([M, H], [M, K, H])."""
        links = links or self._links()
        base, slope = self.net_.global_affine()
        mask = links.mask.float()
        base_m = base[None] + ((1 - mask) * links.value) @ slope
        slope_m = mask[..., None] * slope[None]
        return base_m, slope_m

    def _class_energy_of_states(self, states: torch.Tensor) -> torch.Tensor:
        """E_cy(c, y) [M, S] for binary states [S, K] under every class."""
        base_m, slope_m = self._global_terms()
        e = base_m[:, None] + torch.einsum("sk,mkh->msh", states, slope_m)
        u = self.net_.units()[:, None]
        return self.net_.global_out(F.relu(e * (1 + u))).squeeze(-1)

    def _exact_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = len(self.concept_names_)
        states = torch.tensor(list(itertools.product((0.0, 1.0), repeat=k)))  # [2^K, K]
        with torch.no_grad():
            energy = self._class_energy_of_states(states)
        return states, torch.softmax(-energy, dim=1)  # p(c | y) [M, 2^K]

    def _gibbs(self, chains: int, sweeps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples [M, S, K] of p(c | y) ~ exp(-E_cy(c, y)) per class and Rao-Blackwellised marginals [M, K]."""
        generator = torch.Generator().manual_seed(seed)
        m, k = len(self.class_names_), len(self.concept_names_)
        base_m, slope_m = self._global_terms()
        u = self.net_.units()[:, None]  # [M, 1, H]
        w, b = self.net_.global_out.weight[0], self.net_.global_out.bias[0]
        energy = lambda z: F.relu(z * (1 + u)) @ w + b  # noqa: E731
        state = (torch.rand(m, chains, k, generator=generator) < self.concept_prior_).float()
        e = base_m[:, None] + torch.einsum("msk,mkh->msh", state, slope_m)
        burn = max(1, sweeps // 4)
        kept, marginal, count = [], torch.zeros(m, k), 0
        with torch.no_grad():
            for sweep in range(sweeps):
                for j in range(k):
                    column = state[..., j:j + 1]
                    e_on = e + (1 - column) * slope_m[:, None, j]
                    e_off = e - column * slope_m[:, None, j]
                    p_on = torch.sigmoid(energy(e_off) - energy(e_on))  # [M, S]
                    if sweep >= burn:
                        marginal[:, j] += p_on.mean(1)
                    new = (torch.rand(m, chains, generator=generator) < p_on).float()
                    e = torch.where(new[..., None] > 0, e_on, e_off)
                    state[..., j] = new
                if sweep >= burn:
                    kept.append(state.clone())
                    count += 1
        return torch.cat(kept, dim=1), marginal / count

    def conditionals(self, subset: Sequence[str] | None = None, *, exact: bool | None = None,
                     chains: int | None = None, sweeps: int | None = None, seed: int | None = None) -> dict[str, Any]:
        """Conditional probabilities read off the global energy, ``p(c | y) ~ exp(-E_cy(c, y))``:

        - ``p_c_given_y`` [C, K]: p(c_k = 1 | y) (Proposition 3.2);
        - ``p_c_given_y_c`` [C, K, K]: [y, j, k] = p(c_k = 1 | y, c_j = 1) (NaN where p(c_j = 1 | y) = 0);
        - ``p_c_given_c`` [K, K]: [j, k] = p(c_k = 1 | c_j = 1), classes mixed by their training frequency;
        - ``joint_given_y`` [C, 2^s] for ``subset`` (s concept names): p(c_subset = bits | y), the bits of
          column i are ``i``'s binary digits, first concept most significant; with ``subset_states``.

        Exact by enumeration when there are at most ``exact_max_concepts`` concepts, else Gibbs sampling.
        """
        self._check_fitted()
        k = len(self.concept_names_)
        exact = k <= self.exact_max_concepts if exact is None else exact
        with torch.no_grad():
            if exact:
                if k > 20:
                    raise ValueError(f"exact enumeration of {k} concepts is too large; use Gibbs sampling.")
                states, weights = self._exact_states()  # [S, K], [M, S]
                marginal = weights @ states
                pair = torch.einsum("ms,sj,sk->mjk", weights, states, states)
                method = "exact enumeration"
            else:
                samples, marginal = self._gibbs(chains or self.gibbs_chains, sweeps or self.gibbs_sweeps,
                                                self.seed if seed is None else seed)
                weights = None
                pair = torch.einsum("msj,msk->mjk", samples, samples) / samples.shape[1]
                # use the Rao-Blackwellised marginals on the diagonal (lower variance)
                pair = pair.clone()
                pair.diagonal(dim1=1, dim2=2).copy_(marginal)
                method = f"Gibbs sampling ({samples.shape[1]} kept samples per class)"
        result = _tables(marginal.double(), pair.double(), self.class_prior_.double())
        result["method"] = method
        if subset is not None:
            columns = [self.concept_index(name) for name in subset]
            if exact:
                codes = _codes(states[:, columns])
                joint = torch.zeros(len(self.class_names_), 2 ** len(columns), dtype=torch.float64)
                joint.index_add_(1, codes, weights.double())
            else:
                codes = _codes(samples[..., columns].reshape(-1, len(columns))).view(samples.shape[:2])
                joint = torch.stack([torch.bincount(row, minlength=2 ** len(columns)) for row in codes]).double()
                joint /= samples.shape[1]
            result["joint_given_y"] = joint
            result["subset"] = list(subset)
            result["subset_states"] = list(itertools.product((0, 1), repeat=len(columns)))
        return result

    def empirical_conditionals(self, x: Any, subset: Sequence[str] | None = None,
                               inference: Inference | None = None) -> dict[str, Any]:
        """The same tables estimated from predictions on ``x`` (the reference's ``CalcImportanceScore`` way):
        frequencies of predicted concepts (p > 0.5) among samples predicted as each class."""
        inference = inference or self.infer(x)
        columns = None if subset is None else [self.concept_index(name) for name in subset]
        return conditional_table((inference.concept_probs > 0.5).float(), inference.class_probs.argmax(1),
                                 len(self.class_names_), columns)

    def compare_conditionals(self, x: Any, subset: Sequence[str] | None = None, **options: Any) -> dict[str, Any]:
        """Energy-derived and empirical tables side by side, with the Pearson correlation of each."""
        energy = self.conditionals(subset, **options)
        empirical = self.empirical_conditionals(x, subset)
        pearson = {}
        for key in ("p_c_given_y", "p_c_given_c", "p_c_given_y_c", "joint_given_y"):
            if key in energy and key in empirical:
                pearson[key] = pearson_r(energy[key], empirical[key])
        return {"energy": energy, "empirical": empirical, "pearson": pearson}

    # ------------------------------------------------------------------ global edits
    def edit(self, action: Literal["prune", "set_value", "restore"], concept: str,
             classes: str | list[str] | None = None, *, value: float = 0.0, validation: Validation = None,
             reason: str = "") -> tuple[EnergyCBM, EditRecord]:
        """An edited copy and its record. ``prune`` cuts the concept's link into the global energy of
        ``classes`` (all when None): those classes see the concept at its training frequency, so it no
        longer sways them either way; ``set_value`` makes them see it at ``value`` in [0, 1];
        ``restore`` reconnects it. With ``validation`` data the record holds accuracy before and after."""
        self._check_fitted()
        if action not in ("prune", "set_value", "restore"):
            raise ValueError(f"unknown edit {action!r}; use 'prune', 'set_value' or 'restore'.")
        if action == "set_value" and not 0 <= value <= 1:
            raise ValueError(f"set_value needs a value in [0, 1] (a concept probability), got {value}.")
        column = self.concept_index(concept)
        names = self.class_names_ if classes is None else ([classes] if isinstance(classes, str) else list(classes))
        rows = [self.class_index(name) for name in names]
        edited = self.copy()
        previous = {self.class_names_[r]: [bool(self.link_mask_[r, column]), float(self.link_value_[r, column])]
                    for r in rows}
        for row in rows:
            edited.link_mask_[row, column] = action == "restore"
            edited.link_value_[row, column] = value if action == "set_value" else float(self.concept_prior_[column])
        record = EditRecord(action=action, concept=concept, classes=names, reason=reason,
                            details={"previous": previous, "value": value, "column": column})
        return self._record_edit(edited, record, validation)

    def undo(self) -> EnergyCBM:
        """A copy with the most recent edit reverted (its record removed from the history)."""
        self._check_fitted()
        if not self.edits_:
            raise ValueError("this model has no edits to undo.")
        reverted = self.copy()
        last = reverted.edits_.pop()
        column = int(last.details["column"])
        for name, (linked, value) in last.details["previous"].items():
            row = self.class_index(name)
            reverted.link_mask_[row, column] = bool(linked)
            reverted.link_value_[row, column] = float(value)
        return reverted

    # ------------------------------------------------------------------ bundles
    def _state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {f"net.{name}": t for name, t in self.net_.state_dict().items()}
        tensors.update(feature_mean=self.feature_mean_, feature_scale=self.feature_scale_,
                       concept_prior=self.concept_prior_, class_prior=self.class_prior_,
                       link_mask=self.link_mask_.to(torch.uint8), link_value=self.link_value_)
        state: dict[str, Any] = {"bank": None}
        if self.bank is not None:
            bank_manifest, bank_tensors = bank_state(self.bank)
            state["bank"] = bank_manifest
            tensors.update(bank_tensors)
        return state, tensors

    @classmethod
    def _from_manifest(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> EnergyCBM:
        state = manifest["state"]
        params = dict(manifest["params"])
        if "intervention_weights" in params:  # older bundles; interventions now share the inference weights
            logger.info("this bundle's intervention_weights %s are no longer used: interventions use the "
                        "inference weights", params.pop("intervention_weights"))
        for key in ("loss_weights", "inference_weights"):
            if params[key] != "auto":
                params[key] = tuple(params[key])
        if isinstance(params.get("pseudo_threshold"), list):
            params["pseudo_threshold"] = tuple(params["pseudo_threshold"])
        bank = bank_from_state(state["bank"], tensors) if state.get("bank") else None
        model = cls(bank=bank, **params)
        _restore_common(model, manifest)
        k, m, d = len(model.concept_names_), len(model.class_names_), model.n_features_in_
        hidden = int(model.hidden)
        if hidden < 1 or hidden * k * hidden > 2**31:
            raise ValueError(f"hidden width {hidden} is out of range")
        net = EnergyNetworks(d, k, m, hidden, float(model.dropout))
        expected = {f"net.{name}": tuple(t.shape) for name, t in net.state_dict().items()}
        expected.update(feature_mean=(d,), feature_scale=(d,), concept_prior=(k,), class_prior=(m,),
                        link_mask=(m, k), link_value=(m, k))
        for name, shape in expected.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                raise ValueError(f"tensor {name!r} must have shape {shape}")
        net.load_state_dict({name[4:]: tensors[name].float() for name in expected if name.startswith("net.")})
        model.net_ = net.eval()
        model.feature_mean_, model.feature_scale_ = tensors["feature_mean"].float(), tensors["feature_scale"].float()
        if not (model.feature_scale_ > 0).all():
            raise ValueError("feature_scale must be positive")
        model.concept_prior_, model.class_prior_ = tensors["concept_prior"].float(), tensors["class_prior"].float()
        model.link_mask_ = tensors["link_mask"].bool()
        model.link_value_ = tensors["link_value"].float()
        model.inference_weights_ = model._inference_weights(model.training_.get("inference_weights", (1.0, 1.0, 1.0)))
        if bank is not None and (bank.names != model.concept_names_ or bank.dim != d):
            raise ValueError("the concept bank does not match the model's concepts or input width")
        return model


# ---------------------------------------------------------------------------------------------------- tables
def _codes(bits: torch.Tensor) -> torch.Tensor:
    """Integer code of binary rows, first column most significant."""
    s = bits.shape[-1]
    powers = 2 ** torch.arange(s - 1, -1, -1)
    return (bits.long() * powers).sum(-1)


def _tables(marginal: torch.Tensor, pair: torch.Tensor, prior: torch.Tensor) -> dict[str, Any]:
    """Conditional tables from p(c_k | y) [M, K] and p(c_j, c_k | y) [M, K, K]."""
    with np.errstate(all="ignore"):
        given_y_c = pair / marginal[..., None]
        given_y_c = torch.where(marginal[..., None] > 0, given_y_c, torch.full_like(given_y_c, float("nan")))
        pair_all = torch.einsum("m,mjk->jk", prior, pair)
        single = prior @ marginal
        given_c = torch.where(single[:, None] > 0, pair_all / single[:, None], torch.full_like(pair_all, float("nan")))
    return {"p_c_given_y": marginal, "p_c_given_y_c": given_y_c, "p_c_given_c": given_c}


def conditional_table(concepts: Any, labels: Any, n_classes: int, subset: Sequence[int] | None = None) -> dict[str, Any]:
    """Empirical conditional tables from binary concepts [N, K] and class labels [N] (predicted or true):
    the same keys as ``EnergyCBM.conditionals`` (classes never seen get NaN rows)."""
    c = as_matrix(concepts, "concepts").double()
    y = as_labels(labels, len(c), n_classes)
    one_hot = F.one_hot(y, n_classes).double()  # [N, M]
    counts = one_hot.sum(0)
    with np.errstate(all="ignore"):
        marginal = (one_hot.T @ c) / counts[:, None]
        pair = torch.einsum("nm,nj,nk->mjk", one_hot, c, c) / counts[:, None, None]
        given_c = (c.T @ c) / c.sum(0)[:, None]
    result = _tables(marginal, pair, counts / counts.sum())
    result["p_c_given_c"] = torch.where(c.sum(0)[:, None] > 0, given_c, torch.full_like(given_c, float("nan")))
    if subset is not None:
        codes = _codes(c[:, list(subset)])
        joint = (one_hot.T @ F.one_hot(codes, 2 ** len(subset)).double()) / counts[:, None]
        result["joint_given_y"] = joint
        result["subset_states"] = list(itertools.product((0, 1), repeat=len(subset)))
    result["method"] = "empirical frequencies"
    return result


def pearson_r(a: Any, b: Any) -> float:
    """Pearson correlation over the entries finite in both."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    keep = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------- baseline
class JointCBMBaseline:
    """The baseline of the ECBM paper's tables: a joint CBM (Koh et al. 2020) on the same embeddings.

    A linear concept predictor ``sigmoid(W f(x) + b)`` and a linear head on the concept probabilities,
    trained together on ``cross-entropy(y) + concept_weight * BCE(c)`` with Adam and early stopping on
    the validation loss. Intervening replaces concept probabilities by the given values; the other
    concepts cannot move (they depend on x only), which is what the ECBM comparison tests.
    """

    def __init__(self, *, concept_weight: float = 1.0, lr: float = 1e-2, weight_decay: float = 1e-5,
                 batch_size: int = 64, max_epochs: int = 100, patience: int = 8, seed: int = 0) -> None:
        self.concept_weight, self.lr, self.weight_decay = concept_weight, lr, weight_decay
        self.batch_size, self.max_epochs, self.patience, self.seed = batch_size, max_epochs, patience, seed

    def fit(self, x: Any, y: Any, concepts: Any, validation: tuple[Any, Any, Any]) -> JointCBMBaseline:
        x, c = as_matrix(x, "x"), as_matrix(concepts, "concepts")
        y = as_labels(y, len(x))
        vx, vc = as_matrix(validation[0], "validation x", x.shape[1]), as_matrix(validation[2], "validation concepts")
        vy = as_labels(validation[1], len(vx))
        self.mean_, self.scale_ = x.mean(0), x.std(0).clamp_min(1e-6)
        x, vx = (x - self.mean_) / self.scale_, (vx - self.mean_) / self.scale_
        n_classes = int(max(y.max(), vy.max())) + 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.concept_layer_ = nn.Linear(x.shape[1], c.shape[1])
            self.head_ = nn.Linear(c.shape[1], n_classes)
        params = [*self.concept_layer_.parameters(), *self.head_.parameters()]
        optimiser = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        generator = torch.Generator().manual_seed(self.seed)

        def loss_of(bx, by, bc):
            s = self.concept_layer_(bx)
            return (F.cross_entropy(self.head_(torch.sigmoid(s)), by)
                    + self.concept_weight * F.binary_cross_entropy_with_logits(s, bc))

        best, best_state, stale = float("inf"), None, 0
        for _ in range(self.max_epochs):
            for batch in torch.randperm(len(x), generator=generator).split(self.batch_size):
                loss = loss_of(x[batch], y[batch], c[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            with torch.no_grad():
                val = float(loss_of(vx, vy, vc))
            if best_state is None or val < best - 1e-4 * abs(best):
                best, stale = val, 0
                best_state = [p.detach().clone() for p in params]
            else:
                stale += 1
                if stale >= self.patience:
                    break
        with torch.no_grad():
            for p, saved in zip(params, best_state or []):
                p.copy_(saved)
        return self

    def concepts(self, x: Any) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(self.concept_layer_((as_matrix(x, "x") - self.mean_) / self.scale_))

    def predict_from_concepts(self, c: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.head_(as_matrix(c, "concepts"))

    def decision_function(self, x: Any) -> torch.Tensor:
        return self.predict_from_concepts(self.concepts(x))

    def intervene(self, x: Any, mask: Any, values: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(concepts after, logits after): intervened concepts replaced, the others unchanged."""
        c = self.concepts(x)
        c = torch.where(torch.as_tensor(mask, dtype=torch.bool), as_matrix(values, "values", c.shape[1]), c)
        return c, self.predict_from_concepts(c)
