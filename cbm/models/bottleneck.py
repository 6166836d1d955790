"""Concept-supervised families on frozen embeddings: the concept bottleneck model of Koh et al. (ICML 2020),
``ConceptBottleneck``, and the Concept Embedding Model of Espinosa Zarlenga et al. (NeurIPS 2022),
``ConceptEmbeddingModel``.

Both learn their concepts from binary concept labels (given as ``concept_labels``, or carried by an
Embeddings: the toy world, CUB, a manifest with concept columns) on standardised embeddings, with Adam,
and keep the epoch with the lowest validation loss of each training stage; ``patience`` epochs without
a better one stop it. Validation data never comes from test data: a seeded 10% of train is held out
when none is given. ``concept_class_weights="balanced"`` weighs each concept's positive examples by
n_negative / n_positive (clamped to [0.01, 100]) in the concept loss, for rare concepts such as most of
CUB's attributes (Koh et al. weigh them so).

ConceptBottleneck. A concept predictor (linear, or an MLP with one ReLU hidden layer) gives concept
logits ``z`` [N, K]; a task head (linear, or an MLP with one ReLU hidden layer) reads the bottleneck and
gives class logits. ``training``:

- ``"independent"``: the predictor on the concept loss alone; the head on the true concepts;
- ``"sequential"``: the predictor as above, then the head on the predictor's (frozen) concepts;
- ``"joint"``: both together on ``cross-entropy + concept_weight * concept loss``.

The bottleneck (what ``concepts`` returns, interventions set and contributions decompose) is the concept
probability ``sigmoid(z)`` with ``head_input="probabilities"`` (the default). With ``"logits"`` the head
reads the logits, and the bottleneck is the logit on the scale of Koh et al.'s intervention values:
``(z - low) / (high - low)`` with ``low``/``high`` the 5th/95th percentiles of the concept's training
logits (an affine map folded into the head's first layer, so the model computes the same logits). In
both modes 0 means absent and 1 present: ground-truth 0/1 labels are intervention values as they are,
never raw logits. ``concept_probabilities`` gives ``sigmoid(z)`` in both modes.

ConceptEmbeddingModel. Per concept k, a context generator (a linear layer, after one shared ReLU hidden
layer with ``predictor="mlp"``, then a leaky ReLU, as in the reference) gives a positive and a negative
embedding ``e_k+``, ``e_k-`` of ``embedding_size`` (16); a scoring layer shared by all concepts gives the
concept probability ``p_k = sigmoid(s([e_k+, e_k-]))``; the head reads the mixed embeddings
``p_k e_k+ + (1 - p_k) e_k-``, concatenated. The bottleneck is ``p``; an intervention sets ``p_k`` and
mixes the sample's own two embeddings with it. RandInt: while training, each concept of each sample is
replaced by its true label with probability ``training_intervention_prob`` (0.25), so the head learns to
use corrected concepts. Departure: the reference draws one mask per batch and tiles it over the batch's
samples; here every sample draws its own (the same probability per concept, as the paper describes).
The reference's defaults are kept otherwise (embedding size 16, weight decay 4e-5, a linear head, concept
loss weight 1), except the learning rate: 1e-3 instead of 0.01, which on frozen embeddings overfits the
context generators within a few epochs (toy:cnn, 6,000 images: best epoch 4, test accuracy 0.879 against
0.909 at 1e-3). ``predict_from_concepts(c)`` mixes the training means of each concept's
two embeddings (a CEM's logits depend on x through the embeddings, so a head of the concepts alone is
this population version; ``decision_function`` and ``intervene`` use each sample's own embeddings).

Contributions are exact decompositions of the logits: with a linear head, ``concept value x weight``
(for a CEM, the mixed embedding times its block of weights), with the bias as the rest; with an MLP head,
integrated gradients of the head from the baseline (the training mean of the head's input) to the
sample, in closed form for one ReLU hidden layer (the path crosses each hidden unit's kink at most once),
with ``head(baseline)`` as the rest. ``contribution_rest(x)`` gives the rest, so
``contributions(x).sum(-1) + contribution_rest(x) == decision_function(x)``.

Edits: with a linear ConceptBottleneck head, the linear-head edits of the other families (prune,
prune-and-normalise, set a weight); a CEM with a linear head prunes a concept's block of weights for some
classes; an MLP head mixes every concept into every class, so a concept is pruned for all classes at
once and the head then reads it at its training mean.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from cbm.backbones import resolve_device
from cbm.embed import Embeddings
from cbm.models.base import (ConceptBottleneckModel, EditRecord, LinearHeadEdits, ProbabilityReferences, Validation,
                             _restore_common,
                             accuracy, as_labels, as_matrix, check_tensors, finite_output, holdout_split,
                             labels_of,
                             split_validation)
from cbm.models.streaming import Rows, Stream, should_stream
from concepts.bank import GROUP_SEPARATOR, concept_groups

logger = logging.getLogger(__name__)

Training = Literal["independent", "sequential", "joint"]
Net = Literal["linear", "mlp"]
Tensors = dict[str, torch.Tensor]

#: Percentiles of the training logits that 0 ("absent") and 1 ("present") stand for with head_input="logits".
LOGIT_REFERENCES = (0.05, 0.95)
#: Bounds of the "balanced" positive-example weights of the concept loss.
POSITIVE_WEIGHT_BOUNDS = (0.01, 100.0)


# ----------------------------------------------------------------------------------------------- networks
def _net(sizes: list[int]) -> nn.Sequential:
    """Linear layers of ``sizes`` with ReLU between them."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def _export(prefix: str, net: nn.Module) -> Tensors:
    """The linear layers of ``net`` as ``{prefix.i.weight, prefix.i.bias}`` CPU tensors, in order."""
    linear = [m for m in net.modules() if isinstance(m, nn.Linear)]
    return {f"{prefix}.{i}.{name}": getattr(layer, name).detach().cpu().clone()
            for i, layer in enumerate(linear) for name in ("weight", "bias")}


def _depth(net: Tensors, prefix: str) -> int:
    return sum(1 for key in net if key.startswith(f"{prefix}.") and key.endswith(".weight"))


def _run(net: Tensors, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """The exported network ``prefix`` applied to ``x`` (ReLU between layers)."""
    for i in range(_depth(net, prefix)):
        if i:
            x = F.relu(x)
        x = x @ net[f"{prefix}.{i}.weight"].T + net[f"{prefix}.{i}.bias"]
    return x


def relu_mlp_attributions(net: Tensors, prefix: str, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Integrated gradients [N, C, F] of a one-hidden-layer ReLU network from ``start`` ([F] or [N, F]) to
    ``end`` [N, F], exactly: along the straight path each hidden unit's pre-activation is affine in t, so its
    gradient is on for a share of the path computed in closed form. They sum over F to
    ``net(end) - net(start)``."""
    w1, b1, w2 = net[f"{prefix}.0.weight"], net[f"{prefix}.0.bias"], net[f"{prefix}.1.weight"]
    start = start.expand_as(end)
    a0, a1 = start @ w1.T + b1, end @ w1.T + b1  # [N, H]
    crossing = (a0 / (a0 - a1).where(a0 != a1, torch.ones(()))).clamp(0, 1)
    share = torch.where((a0 > 0) & (a1 > 0), 1.0, torch.where((a0 <= 0) & (a1 <= 0), 0.0,
                                                            torch.where(a0 > 0, crossing, 1 - crossing)))
    gradient = (w2[None] * share[:, None, :]) @ w1  # [N, C, F]
    return gradient * (end - start)[:, None, :]


def logit_references(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-concept logits [K] that 0 ("absent") and 1 ("present") stand for: the ``LOGIT_REFERENCES``
    percentiles of the training logits [N, K] (kept at least 1e-3 apart)."""
    low, high = (torch.quantile(logits.cpu(), q, dim=0).to(logits.device) for q in LOGIT_REFERENCES)
    return low, torch.maximum(high, low + 1e-3)


# ------------------------------------------------------------------------------------------- supervision
def binary_concepts(value: Any, name: str, rows: int, columns: int | None = None) -> torch.Tensor:
    """0/1 concept labels [rows, columns] as float32, or a ValueError saying what is wrong with them."""
    labels = as_matrix(value, name, columns)
    if len(labels) != rows:
        raise ValueError(f"{name} has {len(labels)} rows but the data has {rows}; give one row of concept labels "
                         "per sample.")
    if ((labels != 0) & (labels != 1)).any():
        raise ValueError(f"{name} must be binary (0 = absent, 1 = present); threshold soft labels first.")
    return labels


def _named(names: Any, k: int) -> list[str]:
    names = [f"concept {i}" for i in range(k)] if names is None else list(names)
    if len(names) != k or not all(isinstance(n, str) and n.strip() for n in names) or len(set(names)) != k:
        raise ValueError(f"concept names must be {k} unique, non-blank strings (one per column of the concept "
                         "labels).")
    return names


class SupervisedConcepts(ProbabilityReferences, ConceptBottleneckModel):
    """What the concept-supervised families share: concept labels in, standardised embeddings, staged Adam
    training with early stopping, 0/1 references, exact contributions, edits and bundles."""

    def _block(self) -> int:
        """Width of the input block one concept feeds the head (1 for a CBM, the embedding size for a CEM)."""
        return 1

    # ------------------------------------------------------------------ data
    def _supervision(self, x: Any, y: Any, concept_labels: Any, validation: Validation, validation_concepts: Any,
                     class_names: list[str] | None, concept_names: list[str] | None,
                     groups: Mapping[str, list[str]] | None) -> tuple[tuple, tuple, str]:
        """Checked (train x, y, c), (validation x, y, c) and where the validation data came from; records
        classes, concepts (and their groups), input width and backbone."""
        y = labels_of(x, y)
        features = as_matrix(x, "x")
        labels = as_labels(y, len(features))
        if concept_labels is None and isinstance(x, Embeddings) and x.concept_labels is not None:
            concept_labels, concept_names = x.concept_labels, concept_names or x.concept_names
        if concept_labels is None:
            raise ValueError(f"{type(self).__name__} learns its concepts from concept labels: pass concept_labels= "
                             "(an [N, K] array of 0/1) or data that carries them (toy world, CUB, a manifest with "
                             "concept columns).")
        concepts = binary_concepts(concept_labels, "concept_labels", len(features))
        names = _named(concept_names, concepts.shape[1])
        n_classes = max(int(labels.max()) + 1, len(class_names or getattr(x, "class_names", None) or []))
        self._set_data_identity(x, class_names, n_classes)
        self.concept_names_, self.n_features_in_ = names, features.shape[1]
        self.concept_groups_ = concept_groups(names, groups)
        if validation is None:
            train, val = holdout_split(len(features), self.seed)
            return ((features[train], labels[train], concepts[train]), (features[val], labels[val], concepts[val]),
                    f"held out 10% of train (seed {self.seed})")
        if isinstance(validation, Embeddings):
            if self.backbone_fingerprint_ and validation.backbone_fingerprint != self.backbone_fingerprint_:
                raise ValueError(f"the validation data were embedded with {validation.backbone_spec}, the training "
                                 f"data with {self.backbone_spec_}; embed both with the same backbone.")
            if validation_concepts is None and validation.concept_labels is not None:
                if validation.concept_names and list(validation.concept_names) != names:
                    raise ValueError("the validation data's concepts differ from the training concepts (names or "
                                     "order); use splits of the same dataset.")
                validation_concepts = validation.concept_labels
        _, _, val_x, val_y, source = split_validation(features, labels, validation, self.seed)
        val_y = as_labels(val_y, len(val_x), len(self.class_names_), "validation y")
        if validation_concepts is None:
            raise ValueError("the validation data need concept labels too: pass validation_concepts= or an Embeddings "
                             "that carries them.")
        val_c = binary_concepts(validation_concepts, "validation_concepts", len(val_x), len(names))
        return (features, labels, concepts), (val_x, val_y, val_c), source

    def _positive_weight(self, concepts: torch.Tensor) -> torch.Tensor | None:
        """BCE weights of the positive examples [K] (``concept_class_weights``), or None for unweighted."""
        weights = self.concept_class_weights
        if weights is None:
            return None
        if isinstance(weights, str):
            if weights != "balanced":
                raise ValueError(f"concept_class_weights must be None, 'balanced' or one positive weight per concept, "
                                 f"got {weights!r}.")
            positives = concepts.sum(0)
            return ((len(concepts) - positives) / positives.clamp_min(1)).clamp(*POSITIVE_WEIGHT_BOUNDS)
        weights = as_matrix([list(weights)], "concept_class_weights", concepts.shape[1])[0]
        if (weights <= 0).any():
            raise ValueError("concept_class_weights must be positive numbers.")
        return weights

    def _standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.net_["mean"]) / self.net_["scale"]

    def _begin_training(self, train: tuple, val: tuple) -> tuple[list[Rows], bool, torch.device]:
        """Standardisation statistics of the training features (``net_`` starts with them), the positive-example
        weights, and the (standardised x, c, y) rows of both splits on the device."""
        train_x = train[0]
        self.net_ = {"mean": train_x.mean(0),
                     "scale": train_x.std(0).clamp_min(1e-6) if len(train_x) > 1 else torch.ones(train_x.shape[1])}
        self.positive_weight_ = self._positive_weight(train[2])
        device = resolve_device(self.device)
        tensors = [(self._standardise(x), c, y) for x, y, c in (train, val)]
        streamed = should_stream(self.stream, tensors[0] + tensors[1], device)
        return [Rows(part, device, streamed) for part in tensors], streamed, device

    def _check_params(self) -> None:
        for name in ("lr", "batch_size", "max_epochs"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}.")
        for name, allowed in (("predictor", ("linear", "mlp")), ("head", ("linear", "mlp"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be 'linear' or 'mlp', got {getattr(self, name)!r}.")
        if not (0 <= self.concept_weight < math.inf and 0 <= self.weight_decay < math.inf):
            raise ValueError("concept_weight and weight_decay must be non-negative finite numbers.")

    # ------------------------------------------------------------------ training
    def _optimise(self, modules: list[nn.Module], loss_of: Callable[..., torch.Tensor], train: Rows, val: Rows,
                  stage: str, generator: torch.Generator) -> dict[str, Any]:
        """Adam on ``loss_of(*batch, training)`` (a mean over the batch), keeping the epoch with the lowest
        validation loss; the modules end with their best weights. Returns the stage's record."""
        params = [p for module in modules for p in module.parameters()]
        optimiser = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        best, best_state, best_epoch, stale, epoch = math.inf, None, 0, 0, 0
        started = time.perf_counter()
        for epoch in range(1, int(self.max_epochs) + 1):
            for module in modules:
                module.train()
            for index in torch.randperm(len(train), generator=generator).split(int(self.batch_size)):
                loss = loss_of(*train.batch(index), True)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            for module in modules:
                module.eval()
            with torch.no_grad():
                val_loss = float(val.sum(lambda *rows: loss_of(*rows, False) * len(rows[0]))) / len(val)
            if val_loss < best - 1e-4 * abs(best) or best_state is None:
                best, best_epoch, stale = val_loss, epoch, 0
                best_state = [p.detach().clone() for p in params]
            else:
                stale += 1
                if self.patience is not None and stale >= self.patience:
                    break
        with torch.no_grad():
            for param, saved in zip(params, best_state):
                param.copy_(saved)
        return {"stage": stage, "epochs": epoch, "best_epoch": best_epoch, "val_loss": best,
                "seconds": time.perf_counter() - started}

    def _concept_loss(self, logits: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
        weight = self.positive_weight_
        return F.binary_cross_entropy_with_logits(logits, concepts, pos_weight=None if weight is None
                                                  else weight.to(logits.device))

    def _finish_fit(self, train: tuple, val: tuple, source: str, stages: list[dict], streamed: bool,
                    started: float) -> None:
        (train_x, train_y, _), (val_x, val_y, val_c) = train, val
        val_p = self.concept_probabilities(val_x)
        self.metrics_ = {"train_accuracy": accuracy(self.decision_function(train_x), train_y),
                         "val_accuracy": accuracy(self.decision_function(val_x), val_y),
                         "val_concept_accuracy": float(((val_p > 0.5).float() == val_c).float().mean()),
                         "val_accuracy_all_true_concepts": accuracy(self.intervene(val_x, (
                             torch.ones_like(val_c, dtype=torch.bool), val_c)), val_y)}
        self.training_ = {"samples": len(train_x), "validation": source, "validation_samples": len(val_x),
                          "concepts": "concept labels", "stages": stages, "streamed": streamed,
                          "seconds": time.perf_counter() - started,
                          "positive_weight": None if self.positive_weight_ is None else self.positive_weight_.tolist()}
        logger.info("%s: validation accuracy %.3f, concept accuracy %.3f (%.1f s)", type(self).__name__,
                    self.metrics_["val_accuracy"], self.metrics_["val_concept_accuracy"], self.training_["seconds"])

    # ------------------------------------------------------------------ concepts and head
    def _head_input(self, features: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The head's input [N, K * block] at concepts ``c``."""
        raise NotImplementedError

    def _head(self, u: torch.Tensor) -> torch.Tensor:
        """Class logits of the head's input ``u``; pruned concepts (MLP heads) read their training mean."""
        if self.net_["pruned"].any():
            block = self._block()
            fixed = self.net_["pruned"].repeat_interleave(block)
            u = torch.where(fixed, self.net_["baseline"], u)
        return _run(self.net_, "head", u)

    def _logits(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self._head(self._head_input(x, c))

    def _input_attributions(self, u: torch.Tensor) -> torch.Tensor:
        """Exact attributions [N, C, F] of the head at input ``u`` (see the module docstring)."""
        if self.head == "linear":
            return u[:, None, :] * self.net_["head.0.weight"][None]
        pruned = self.net_["pruned"].repeat_interleave(self._block())
        u = torch.where(pruned, self.net_["baseline"], u)
        return relu_mlp_attributions(self.net_, "head", self.net_["baseline"], u)

    def contributions(self, x: Any, concepts: Any = None) -> torch.Tensor:
        """Exact per-concept contributions [N, C, K] (at ``concepts`` when given):
        ``contributions(x).sum(-1) + contribution_rest(x)`` is ``decision_function(x)``."""
        features = self._features(x)
        u = self._head_input(features, self._concepts_or(features, concepts))
        attributions = self._input_attributions(u)
        return attributions.reshape(*attributions.shape[:2], len(self.concept_names_), -1).sum(-1)

    def contribution_rest(self, x: Any) -> torch.Tensor:
        """The part of the logits [N, C] no concept carries: the head's bias (linear head) or the head at the
        baseline input (MLP head)."""
        n = len(self._features(x))
        rest = self.net_["head.0.bias"] if self.head == "linear" else _run(self.net_, "head", self.net_["baseline"])
        return rest.expand(n, -1).clone()

    # ------------------------------------------------------------------ groups
    def intervention_values(self, x: Any, values: Mapping[str, Any] | tuple[Any, Any]) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor]:
        """As for every family, and ``{group: value}`` sets a group's named value present and its other values
        absent (``intervene(x, {"colour": "red"})``, ``{"bill shape": "dagger"}``)."""
        if isinstance(values, Mapping) and self.concept_groups_:
            expanded: dict[str, Any] = {}
            for key, value in values.items():
                if key in self.concept_groups_:
                    chosen = self.group_member(key, value)
                    expanded.update({name: float(name == chosen) for name in self.concept_groups_[key]})
                else:
                    expanded[key] = value
            values = expanded
        return super().intervention_values(x, values)

    def group_member(self, group: str, value: Any) -> str:
        """The concept of ``group`` that ``value`` names: the concept's name, or its value part after "::"."""
        members = self.concept_groups_[group]
        for name in members:
            if value == name or (isinstance(value, str) and name.partition(GROUP_SEPARATOR)[2] == value):
                return name
        shown = [name.partition(GROUP_SEPARATOR)[2] or name for name in members]
        raise KeyError(f"{value!r} is not a value of the concept group {group!r}; its values are "
                       f"{', '.join(map(repr, shown[:12]))}{' ...' if len(shown) > 12 else ''}.")

    # ------------------------------------------------------------------ edits
    @property
    def weight_(self) -> torch.Tensor:
        """The linear head's weight [C, K * block] (the linear-head edits act on it)."""
        if self.head != "linear":
            raise AttributeError(f"this {type(self).__name__} has an MLP head, which has no class x concept weight.")
        return self.net_["head.0.weight"]

    def edit(self, action: str, concept: str, classes: str | list[str] | None = None, *, value: float = 0.0,
             validation: Validation = None, reason: str = "") -> tuple[Any, EditRecord]:
        """A globally edited copy and the record of the edit (see the module docstring for what each head
        allows); with ``validation`` data the record holds validation accuracy before and after."""
        self._check_fitted()
        if self.head == "linear" and self._block() == 1:
            return LinearHeadEdits.edit(self, action, concept, classes, value=value, validation=validation,
                                        reason=reason)
        if action != "prune":
            kind = "an MLP head" if self.head == "mlp" else "concept embeddings"
            raise ValueError(f"a {type(self).__name__} with {kind} supports only the 'prune' edit, not {action!r}.")
        column = self.concept_index(concept)
        names = self.class_names_ if classes is None else ([classes] if isinstance(classes, str) else list(classes))
        rows = [self.class_index(name) for name in names]
        edited = self.copy()
        if self.head == "linear":
            block = self._block()
            details: dict[str, Any] = {"previous_rows": {self.class_names_[r]: self.weight_[r].tolist() for r in rows}}
            edited.net_["head.0.weight"][rows, column * block:(column + 1) * block] = 0.0
        else:
            if set(rows) != set(range(len(self.class_names_))):
                raise ValueError("an MLP head mixes every concept into every class, so a concept is pruned for all "
                                 "classes at once (classes=None); or fit the model with head='linear'.")
            details = {"pruned_before": self.net_["pruned"].tolist()}
            edited.net_["pruned"][column] = True
        record = EditRecord(action="prune", concept=concept, classes=names, reason=reason, details=details)
        return self._record_edit(edited, record, validation)

    def undo(self) -> Any:
        """A copy with the most recent edit reverted (its record removed from the history)."""
        self._check_fitted()
        if self.edits_ and "pruned_before" in self.edits_[-1].details:
            reverted = self.copy()
            last = reverted.edits_.pop()
            reverted.net_["pruned"] = torch.tensor(last.details["pruned_before"], dtype=torch.bool)
            return reverted
        return LinearHeadEdits.undo(self)

    def top_concepts(self, k: int = 5) -> dict[str, list[tuple[str, float]]]:
        """The ``k`` concepts with the largest weight (a CBM's linear head) of every class."""
        if self._block() != 1:
            raise TypeError(f"{type(self).__name__} weighs concept embeddings, not concepts; use contributions(x).")
        return LinearHeadEdits.top_concepts(self, k)

    # ------------------------------------------------------------------ bundles
    def _state(self) -> tuple[dict[str, Any], Tensors]:
        return {"concept_groups": self.concept_groups_}, dict(self.net_)

    @classmethod
    def _from_manifest(cls, manifest: dict[str, Any], tensors: Tensors) -> SupervisedConcepts:
        model = cls(**manifest["params"])
        _restore_common(model, manifest)
        model.net_ = {name: (tensor.bool() if name == "pruned" else tensor.float()) for name, tensor in tensors.items()}
        model.concept_groups_ = concept_groups(model.concept_names_, manifest["state"].get("concept_groups") or {})
        model._check_state()
        weight = manifest.get("training", {}).get("positive_weight")
        model.positive_weight_ = None if weight is None else torch.tensor(weight, dtype=torch.float32)
        return model

    def _check_state(self) -> None:
        """A ValueError when the bundle's tensors do not fit the model's sizes."""
        d, k = self.n_features_in_, len(self.concept_names_)
        head_in = k * self._block()
        check_tensors(self.net_, {"mean": (d,), "scale": (d,), "pruned": (k,), "baseline": (head_in,)})
        if _depth(self.net_, "head") != (1 if self.head == "linear" else 2):
            raise ValueError(f"the head's layers do not match head={self.head!r}")
        if self.net_["head.0.weight"].shape[1] != head_in or _run(
                self.net_, "head", torch.zeros(1, head_in)).shape[1] != len(self.class_names_):
            raise ValueError("the head does not map the concepts to the classes")


class ConceptBottleneck(SupervisedConcepts):
    """The concept bottleneck model of Koh et al. (ICML 2020) on embeddings; see the module docstring.

    Parameters
    ----------
    training: "independent", "sequential" or "joint" (Koh et al.'s three ways to train).
    predictor, head: "linear" or "mlp" (one ReLU hidden layer of ``hidden`` / ``head_hidden`` units).
    head_input: "probabilities" (the head reads sigmoid(z)) or "logits" (it reads z; see the module docstring).
    concept_weight: weight of the concept loss in joint training (Koh et al. tune it). 10 by default: at 1 the
        head learns from the uncalibrated middle of the probabilities, so setting every concept to its true
        0/1 label lowers accuracy (toy:cnn, 2,000 images: 0.897 -> 0.760), while at 10 accuracy stays (0.899)
        and the same intervention raises it to 0.981.
    concept_class_weights: None, "balanced" or one positive-example weight per concept.
    lr, weight_decay, batch_size, max_epochs, patience: Adam and early stopping on the validation loss.
    stream: keep the training data on the device (False), stream them from host memory (True), or decide by
        free device memory ("auto"); see ``cbm.models.streaming``.
    """

    family = "cbm"

    def __init__(self, *, training: Training = "joint", predictor: Net = "linear", head: Net = "linear",
                 hidden: int = 256, head_hidden: int = 64,
                 head_input: Literal["probabilities", "logits"] = "probabilities", concept_weight: float = 10.0,
                 concept_class_weights: str | list[float] | None = None, lr: float = 1e-2, weight_decay: float = 4e-5,
                 batch_size: int = 256, max_epochs: int = 200, patience: int | None = 10, seed: int = 0,
                 device: str = "auto", stream: Stream = "auto") -> None:
        self.training = training
        self.predictor = predictor
        self.head = head
        self.hidden = hidden
        self.head_hidden = head_hidden
        self.head_input = head_input
        self.concept_weight = concept_weight
        self.concept_class_weights = concept_class_weights
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.seed = seed
        self.device = device
        self.stream = stream

    # ------------------------------------------------------------------ the bottleneck
    def _concept_logits(self, features: torch.Tensor) -> torch.Tensor:
        return _run(self.net_, "predictor", self._standardise(features))

    def _from_logits(self, z: torch.Tensor) -> torch.Tensor:
        if self.head_input == "probabilities":
            return torch.sigmoid(z)
        return (z - self.net_["logit_low"]) / (self.net_["logit_high"] - self.net_["logit_low"])

    def concepts(self, x: Any) -> torch.Tensor:
        """The bottleneck [N, K]: concept probabilities, or the rescaled logits with head_input="logits"
        (0 absent, 1 present in both)."""
        return self._from_logits(self._concept_logits(self._features(x)))

    def concept_probabilities(self, x: Any) -> torch.Tensor:
        """sigmoid of the concept logits [N, K] (the concept predictor's probabilities)."""
        return torch.sigmoid(self._concept_logits(self._features(x)))

    def _head_input(self, features: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return c

    def predict_from_concepts(self, c: Any) -> torch.Tensor:
        """Class logits [N, C] of the head at bottleneck values ``c`` [N, K]."""
        return self._head(as_matrix(c, "concepts", len(self.concept_names_)))

    # ------------------------------------------------------------------ fitting
    def fit(self, x: Any, y: Any = None, *, concept_labels: Any = None, validation: Validation = None,
            validation_concepts: Any = None, class_names: list[str] | None = None,
            concept_names: list[str] | None = None,
            concept_groups: Mapping[str, list[str]] | None = None) -> ConceptBottleneck:
        """Train the concept predictor and the head (``training``). Concept labels come from ``concept_labels``
        or an Embeddings ``x`` that carries them; the validation split's from ``validation_concepts`` or an
        Embeddings ``validation``. ``concept_groups`` ({group: [concept, ...]}, mutually exclusive values of one
        attribute, e.g. ``cbm.data.toy.CONCEPT_GROUPS``) default to the attributes of "attribute::value" names
        (CUB's); interventions and intervention curves can then act per group."""
        self._check_params()
        if self.training not in ("independent", "sequential", "joint"):
            raise ValueError(f"training must be 'independent', 'sequential' or 'joint', got {self.training!r}.")
        if self.head_input not in ("probabilities", "logits"):
            raise ValueError(f"head_input must be 'probabilities' or 'logits', got {self.head_input!r}.")
        started = time.perf_counter()
        train, val, source = self._supervision(x, y, concept_labels, validation, validation_concepts, class_names,
                                               concept_names, concept_groups)
        train_x, k, n_classes = train[0], train[2].shape[1], len(self.class_names_)
        rows, streamed, device = self._begin_training(train, val)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            predictor = _net([self.n_features_in_, *([self.hidden] if self.predictor == "mlp" else []), k]).to(device)
            head = _net([k, *([self.head_hidden] if self.head == "mlp" else []), n_classes]).to(device)
            stages = self._train(predictor, head, rows, generator)
        self.net_.update(_export("predictor", predictor))
        logits = self._concept_logits(train_x)
        self.net_["logit_low"], self.net_["logit_high"] = logit_references(logits)
        self.net_.update(_export("head", head))
        if self.training == "joint" and self.head_input == "logits":  # the head read z: fold z = low + c * span in
            span = self.net_["logit_high"] - self.net_["logit_low"]
            weight = self.net_["head.0.weight"]
            self.net_["head.0.bias"] = self.net_["head.0.bias"] + weight @ self.net_["logit_low"]
            self.net_["head.0.weight"] = weight * span
        self.net_["pruned"] = torch.zeros(k, dtype=torch.bool)
        self.net_["baseline"] = self._from_logits(logits).mean(0)
        self._finish_fit(train, val, source, stages, streamed, started)
        return self

    def _train(self, predictor: nn.Module, head: nn.Module, rows: list[Rows], generator: torch.Generator) -> list[dict]:
        """The stages of ``training``; the head of a staged training reads bottleneck values (0/1 = absent/present)."""
        train, val = rows
        concept_weight = self.concept_weight

        def joint(x, c, y, training):
            z = predictor(x)
            u = torch.sigmoid(z) if self.head_input == "probabilities" else z
            return F.cross_entropy(head(u), y) + concept_weight * self._concept_loss(z, c)

        if self.training == "joint":
            return [self._optimise([predictor, head], joint, train, val, "joint", generator)]
        stages = [self._optimise([predictor], lambda x, c, y, training: self._concept_loss(predictor(x), c),
                                 train, val, "concept predictor", generator)]
        if self.training == "independent":
            inputs = lambda x, c: c  # noqa: E731 - the true concepts
        else:
            with torch.no_grad():
                low_high = logit_references(torch.cat([predictor(chunk[0]) for chunk in train.chunks()]))

            def inputs(x, c):
                with torch.no_grad():
                    z = predictor(x)
                    return torch.sigmoid(z) if self.head_input == "probabilities" else (
                        (z - low_high[0]) / (low_high[1] - low_high[0]))
        stages.append(self._optimise([head], lambda x, c, y, training: F.cross_entropy(head(inputs(x, c)), y),
                                     train, val, f"head ({self.training})", generator))
        return stages

    def _check_state(self) -> None:
        super()._check_state()
        k = len(self.concept_names_)
        check_tensors(self.net_, {"logit_low": (k,), "logit_high": (k,)})
        if _depth(self.net_, "predictor") != (1 if self.predictor == "linear" else 2) or _run(
                self.net_, "predictor", torch.zeros(1, self.n_features_in_)).shape[1] != k:
            raise ValueError("the concept predictor does not match the model's sizes")


class ConceptEmbeddingModel(SupervisedConcepts):
    """The Concept Embedding Model of Espinosa Zarlenga et al. (NeurIPS 2022) on embeddings; see the module
    docstring.

    Parameters
    ----------
    embedding_size: width of each concept's positive and negative embedding (reference: 16).
    training_intervention_prob: RandInt, the probability that a concept is replaced by its true label while
        training (reference: 0.25; 0 turns it off).
    predictor: "linear" (context generators on the embedding) or "mlp" (after one shared ReLU layer of
        ``hidden`` units).
    head: "linear" (reference) or "mlp" (one ReLU hidden layer of ``head_hidden`` units).
    concept_weight, concept_class_weights, lr, weight_decay, batch_size, max_epochs, patience, stream: as for
        ConceptBottleneck (reference: weight 1, weight decay 4e-5; lr 1e-3 here, 0.01 in the reference).
    """

    family = "cem"

    def __init__(self, *, embedding_size: int = 16, training_intervention_prob: float = 0.25,
                 predictor: Net = "linear", head: Net = "linear", hidden: int = 256, head_hidden: int = 64,
                 concept_weight: float = 1.0, concept_class_weights: str | list[float] | None = None,
                 lr: float = 1e-3, weight_decay: float = 4e-5, batch_size: int = 256, max_epochs: int = 200,
                 patience: int | None = 10, seed: int = 0, device: str = "auto", stream: Stream = "auto") -> None:
        self.embedding_size = embedding_size
        self.training_intervention_prob = training_intervention_prob
        self.predictor = predictor
        self.head = head
        self.hidden = hidden
        self.head_hidden = head_hidden
        self.concept_weight = concept_weight
        self.concept_class_weights = concept_class_weights
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.seed = seed
        self.device = device
        self.stream = stream

    def _block(self) -> int:
        return int(self.embedding_size)

    # ------------------------------------------------------------------ the bottleneck
    def _contexts(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive [N, K, m], negative [N, K, m]) embeddings of standardised features."""
        h = self._standardise(features)
        if self.predictor == "mlp":
            h = F.relu(_run(self.net_, "encoder", h))
        m = self._block()
        contexts = F.leaky_relu(_run(self.net_, "context", h)).reshape(len(h), -1, 2 * m)
        return contexts[..., :m], contexts[..., m:]

    def _probabilities(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(_run(self.net_, "score", torch.cat([positive, negative], -1)).squeeze(-1))

    def concepts(self, x: Any) -> torch.Tensor:
        """Concept probabilities [N, K] from the shared scoring layer."""
        return self._probabilities(*self._contexts(self._features(x)))

    def concept_probabilities(self, x: Any) -> torch.Tensor:
        """The concept probabilities [N, K] (the bottleneck itself)."""
        return self.concepts(x)

    @staticmethod
    def _mix(positive: torch.Tensor, negative: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The head's input [N, K * m]: each concept's embeddings mixed by its probability."""
        return (positive * c[..., None] + negative * (1 - c[..., None])).flatten(1)

    def _head_input(self, features: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self._mix(*self._contexts(features), c)

    def decision_function(self, x: Any) -> torch.Tensor:
        """Class logits [N, C] (the embeddings computed once for the probabilities and the mixture)."""
        positive, negative = self._contexts(self._features(x))
        concepts = finite_output(self._probabilities(positive, negative), "concept activations")
        return finite_output(self._head(self._mix(positive, negative, concepts)))

    def predict_from_concepts(self, c: Any) -> torch.Tensor:
        """Class logits [N, C] at concept probabilities ``c`` with the training means of every concept's two
        embeddings (a population head; a sample's own logits also depend on its embeddings)."""
        c = as_matrix(c, "concepts", len(self.concept_names_))
        return self._head(self._mix(self.net_["mean_positive"], self.net_["mean_negative"], c))

    def embeddings(self, x: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Each concept's (positive, negative) embeddings [N, K, embedding_size] for ``x``."""
        return self._contexts(self._features(x))

    # ------------------------------------------------------------------ fitting
    def fit(self, x: Any, y: Any = None, *, concept_labels: Any = None, validation: Validation = None,
            validation_concepts: Any = None, class_names: list[str] | None = None,
            concept_names: list[str] | None = None,
            concept_groups: Mapping[str, list[str]] | None = None) -> ConceptEmbeddingModel:
        """Train the embeddings, the scoring layer and the head jointly, with RandInt; concept labels as for
        ConceptBottleneck.fit."""
        self._check_params()
        if not (isinstance(self.embedding_size, int) and self.embedding_size >= 1):
            raise ValueError(f"embedding_size must be a positive integer, got {self.embedding_size!r}.")
        if not 0 <= self.training_intervention_prob <= 1:
            raise ValueError(f"training_intervention_prob is a probability in [0, 1], got "
                             f"{self.training_intervention_prob!r}.")
        started = time.perf_counter()
        train, val, source = self._supervision(x, y, concept_labels, validation, validation_concepts, class_names,
                                               concept_names, concept_groups)
        train_x, k, n_classes, m = train[0], train[2].shape[1], len(self.class_names_), self._block()
        (train_rows, val_rows), streamed, device = self._begin_training(train, val)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            width = self.hidden if self.predictor == "mlp" else self.n_features_in_
            encoder = _net([self.n_features_in_, self.hidden]).to(device) if self.predictor == "mlp" else nn.Identity()
            context = nn.Linear(width, k * 2 * m).to(device)
            score = nn.Linear(2 * m, 1).to(device)
            head = _net([k * m, *([self.head_hidden] if self.head == "mlp" else []), n_classes]).to(device)
            masks = torch.Generator(device=device).manual_seed(self.seed)
            p_int, concept_weight = float(self.training_intervention_prob), self.concept_weight

            def loss_of(x, c, y, training):
                h = F.relu(encoder(x)) if self.predictor == "mlp" else x
                contexts = F.leaky_relu(context(h)).reshape(len(x), k, 2 * m)
                logits = score(contexts).squeeze(-1)
                p = torch.sigmoid(logits)
                if training and p_int > 0:
                    p = torch.where(torch.rand(p.shape, generator=masks, device=p.device) < p_int, c, p)
                mixed = contexts[..., :m] * p[..., None] + contexts[..., m:] * (1 - p[..., None])
                return F.cross_entropy(head(mixed.flatten(1)), y) + concept_weight * self._concept_loss(logits, c)

            modules = [module for module in (encoder, context, score, head) if isinstance(module, nn.Module)]
            stages = [self._optimise(modules, loss_of, train_rows, val_rows, "joint (RandInt)", generator)]
        if self.predictor == "mlp":
            self.net_.update(_export("encoder", encoder))
        self.net_.update({**_export("context", context), **_export("score", score), **_export("head", head)})
        positive, negative = self._contexts(train_x)
        mixed = self._mix(positive, negative, self._probabilities(positive, negative))
        self.net_.update({"mean_positive": positive.mean(0), "mean_negative": negative.mean(0),
                          "pruned": torch.zeros(k, dtype=torch.bool), "baseline": mixed.mean(0)})
        self._finish_fit(train, val, source, stages, streamed, started)
        return self

    def _check_state(self) -> None:
        super()._check_state()
        k, m = len(self.concept_names_), self._block()
        width = self.hidden if self.predictor == "mlp" else self.n_features_in_
        expected = {"context.0.weight": (k * 2 * m, width), "context.0.bias": (k * 2 * m,),
                    "score.0.weight": (1, 2 * m), "score.0.bias": (1,), "mean_positive": (k, m),
                    "mean_negative": (k, m)}
        if self.predictor == "mlp":
            expected.update({"encoder.0.weight": (self.hidden, self.n_features_in_), "encoder.0.bias": (self.hidden,)})
        check_tensors(self.net_, expected)

