"""What every concept bottleneck model family shares: inputs, prediction, intervention, bundles.

Models work on embeddings (``x`` is ``[N, D]``, or an :class:`~cbm.embed.Embeddings`), follow
scikit-learn's conventions (``__init__`` stores hyperparameters, ``fit`` returns ``self``, fitted
state ends in ``_``) and return torch tensors, except ``predict`` and ``predict_proba`` which
return NumPy arrays like any scikit-learn classifier.

A family implements ``fit``, ``concepts`` and ``predict_from_concepts`` (and ``_logits`` when its
logits also depend on ``x`` directly, e.g. a residual), plus ``_state``/``_from_state`` for
bundles. Intervention, prediction, scoring and saving come from here.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import NotFittedError

from cbm.backbones import Backbone, load_backbone
from cbm.data.base import MAX_CLASSES
from cbm.embed import Embeddings
from cbm.models.bundle import BundleError, read_bundle, write_bundle
from concepts.bank import ConceptBank, NameIndex, nonfinite_rows, real_tensor, repeated

logger = logging.getLogger(__name__)

FAMILIES: dict[str, type[ConceptBottleneckModel]] = {}
ArrayLike = torch.Tensor | np.ndarray


def as_real_tensor(value: Any, name: str) -> torch.Tensor:
    """``value`` (an array or the features of an Embeddings) as a float32 tensor of real numbers, not yet
    checked for NaN; a ValueError naming the argument otherwise."""
    return real_tensor(value.features if isinstance(value, Embeddings) else value, name)


def check_finite(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` itself, or a ValueError saying how many of its rows hold NaN or infinite values."""
    bad = nonfinite_rows(tensor)
    if bad:
        raise ValueError(f"{name} contains NaN or infinite values in {bad} rows; clean or drop them first.")
    return tensor


def as_matrix(value: Any, name: str, columns: int | None = None) -> torch.Tensor:
    """``value`` as a finite float32 [N, columns] tensor with N >= 1, or a ValueError naming the argument."""
    tensor = as_real_tensor(value, name)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(tensor.shape)}.")
    if len(tensor) == 0:
        raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)}); pass at least one row.")
    if columns is not None and tensor.shape[1] != columns:
        raise ValueError(f"{name} has {tensor.shape[1]} columns but the model expects {columns}; "
                         "were these features made by another backbone?")
    return check_finite(tensor, name)


def as_labels(value: Any, n_samples: int, n_classes: int | None = None, name: str = "y") -> torch.Tensor:
    """Integer class labels [N] in range (below ``n_classes``, or ``MAX_CLASSES`` when the classes are not
    known yet), or a ValueError naming the argument."""
    try:
        array = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value)
    except ValueError as error:
        raise ValueError(f"{name} must be a 1-D array of {n_samples} integer class indices ({error}).") from None
    if array.ndim != 1 or len(array) != n_samples:
        raise ValueError(f"{name} must be a 1-D array of {n_samples} labels, got shape {array.shape}.")
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold integer class indices, got {array.dtype} values; map class names to "
                         "indices first.")
    labels = torch.as_tensor(array)
    if labels.dtype.is_floating_point and not (torch.isfinite(labels).all() and torch.equal(labels, labels.round())):
        raise ValueError(f"{name} must hold integer class indices, got fractional, NaN or infinite values.")
    limit = n_classes if n_classes is not None else MAX_CLASSES
    if len(labels) and (labels.min() < 0 or labels.max() >= limit):
        if n_classes is None:
            raise ValueError(f"{name} holds labels outside 0..{limit - 1}; labels are class indices (0, 1, ...), "
                             "map them to that range first.")
        raise ValueError(f"{name} holds labels outside 0..{n_classes - 1} (the model has {n_classes} classes); "
                         "check how the labels were mapped to class indices.")
    return labels.long()


Validation = tuple[Any, Any] | Embeddings | None


def holdout_split(n: int, seed: int, fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train rows, held-out validation rows) of ``n`` samples; at least one of each."""
    if n < 2:
        raise ValueError(f"x has {n} sample(s); fitting needs at least 2 when no validation data is given "
                         "(a share is held out for validation), so pass more data or validation=.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = max(1, round(fraction * n))
    logger.info("no validation data given: holding out %d training samples (seed %d)", held, seed)
    return order[held:], order[:held]


def split_validation(x: torch.Tensor, y: torch.Tensor, validation: Validation, seed: int,
                     fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """(train x, train y, val x, val y, where the validation data came from); given validation data is
    checked for shape, values and label form (its label range is the caller's to check)."""
    if validation is None:
        train, val = holdout_split(len(x), seed, fraction)
        return x[train], y[train], x[val], y[val], f"held out {fraction:.0%} of train (seed {seed})"
    if isinstance(validation, Embeddings):
        val_x, val_y = validation.features, validation.labels
    elif isinstance(validation, tuple) and len(validation) == 2:
        val_x, val_y = validation
    else:
        raise TypeError(f"validation must be an Embeddings or a pair (x, y), got {type(validation).__name__}"
                        f"{f' of length {len(validation)}' if isinstance(validation, tuple) else ''}.")
    val_x = as_matrix(val_x, "validation x", x.shape[1])
    return x, y, val_x, as_labels(val_y, len(val_x), name="validation y"), "given"


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean()) if len(y) else float("nan")


@dataclass
class EditRecord:
    """One global edit: what changed, why, and the validation metrics before and after."""

    action: str
    concept: str | None = None
    classes: list[str] = field(default_factory=list)
    reason: str = ""
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class ConceptBottleneckModel(ClassifierMixin, BaseEstimator):
    """Base class of the five families; see the module docstring."""

    family: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.family:
            FAMILIES[cls.family] = cls

    # ------------------------------------------------------------------ fitted state
    def _check_fitted(self) -> None:
        if not hasattr(self, "class_names_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(x, y) first.")

    @property
    def concept_names(self) -> list[str]:
        self._check_fitted()
        return list(self.concept_names_)

    @property
    def class_names(self) -> list[str]:
        self._check_fitted()
        return list(self.class_names_)

    def _features(self, x: Any, name: str = "x") -> torch.Tensor:
        self._check_fitted()
        if isinstance(x, Embeddings) and x.backbone_fingerprint != self.backbone_fingerprint_:
            raise ValueError(f"{name} was embedded with {x.backbone_spec} (fingerprint {x.backbone_fingerprint[:12]}) "
                             f"but this model was fitted on {self.backbone_spec_} "
                             f"(fingerprint {self.backbone_fingerprint_[:12]}); embed the data with that backbone.")
        return as_matrix(x, name, self.n_features_in_)

    def _set_data_identity(self, x: Any, class_names: list[str] | None, n_classes: int,
                           backbone: tuple[str, str] | None = None) -> None:
        """Record class names, input width and the backbone the training features came from."""
        if isinstance(x, Embeddings):
            class_names = class_names or x.class_names
            backbone = (x.backbone_spec, x.backbone_fingerprint)
        self.class_names_ = list(class_names) if class_names else [f"class {i}" for i in range(n_classes)]
        if not all(isinstance(name, str) and name.strip() for name in self.class_names_):
            raise ValueError("class_names must be non-blank strings; pass them as a list of str.")
        duplicates = repeated(self.class_names_)
        if duplicates:
            raise ValueError(f"class_names must be unique; repeated: {duplicates[:5]}.")
        if len(self.class_names_) < n_classes:
            raise ValueError(f"{len(self.class_names_)} class names given but labels go up to {n_classes - 1}.")
        self.backbone_spec_, self.backbone_fingerprint_ = backbone or ("", "")
        self.edits_: list[EditRecord] = []

    def _begin_bank_fit(self, x: Any, y: Any, class_names: list[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Check ``x``/``y`` against the family's concept bank and record classes, concepts, input width and
        backbone; returns the features and labels (families built on ``self.bank``)."""
        y = labels_of(x, y)
        fingerprint = x.backbone_fingerprint if isinstance(x, Embeddings) else None
        features = as_matrix(x, "x")
        self.bank.check_features(features, fingerprint)
        labels = as_labels(y, len(features))
        n_classes = max(int(labels.max()) + 1, len(class_names or getattr(x, "class_names", None) or []))
        self._set_data_identity(x, class_names, n_classes)
        self.concept_names_ = list(self.bank.names)
        self.n_features_in_ = features.shape[1]
        return features, labels

    # ------------------------------------------------------------------ the family's part
    def concepts(self, x: Any) -> torch.Tensor:
        """Concept activations [N, K]."""
        raise NotImplementedError

    def predict_from_concepts(self, c: Any) -> torch.Tensor:
        """Class logits [N, C] from concept activations [N, K] (the head alone)."""
        raise NotImplementedError

    def _logits(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Logits from checked features and (possibly intervened) concepts; residual families add to it."""
        return self.predict_from_concepts(c)

    def contributions(self, x: Any, concepts: Any = None) -> torch.Tensor:
        """Per-concept contributions to every logit [N, C, K], at the model's concepts of ``x`` or at the given
        ``concepts`` [N, K] (e.g. ``intervened_concepts``: the decomposition after an intervention)."""
        raise NotImplementedError

    def _concepts_or(self, x: Any, concepts: Any) -> torch.Tensor:
        """The model's concepts of ``x``, or the given ``concepts`` checked as [N, K] for the N rows of ``x``."""
        if concepts is None:
            return self.concepts(x)
        given = as_matrix(concepts, "concepts", len(self.concept_names_))
        if len(given) != len(self._features(x)):
            raise ValueError(f"concepts has {len(given)} rows but x has {len(self._features(x))}; give one row of "
                             "concepts per sample.")
        return given

    def _state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The family's JSON-able fitted state and tensors, for bundles."""
        raise NotImplementedError

    def _load_state(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared behaviour
    def decision_function(self, x: Any) -> torch.Tensor:
        """Class logits [N, C]."""
        features = self._features(x)
        concepts = finite_output(self.concepts(features), "concept activations")
        return finite_output(self._logits(features, concepts))

    def predict_proba(self, x: Any) -> np.ndarray:
        return torch.softmax(self.decision_function(x), dim=1).numpy()

    def predict(self, x: Any) -> np.ndarray:
        return self.decision_function(x).argmax(dim=1).numpy()

    def score(self, x: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Accuracy; ``y`` defaults to the labels of an Embeddings ``x``."""
        predicted = self.predict(x)
        y = as_labels(labels_of(x, y), len(predicted), len(self.class_names_))
        return float(np.average(predicted == y.numpy(), weights=sample_weight))

    def _name_position(self, kind: str, names: list[str], name: str) -> int | None:
        """Position of ``name`` in the fitted ``names`` (class or concept names) in constant time."""
        indexes = self.__dict__.setdefault("_name_indexes", {})
        return indexes.setdefault(kind, NameIndex()).find(names, name)

    def concept_index(self, name: str) -> int:
        """Index of a concept by name, or a KeyError listing close names."""
        self._check_fitted()
        names = self.concept_names_
        if not isinstance(name, str):
            raise TypeError(f"concepts are named by strings, got {type(name).__name__} {name!r}.")
        position = self._name_position("concept", names, name)
        if position is not None:
            return position
        close = [n for n in names if name.lower() in n.lower()][:5]
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else "."
        raise KeyError(f"unknown concept {name!r}{hint}")

    def class_index(self, name: str) -> int:
        """Index of a class by name, or a KeyError listing the classes."""
        self._check_fitted()
        if not isinstance(name, str):
            raise TypeError(f"classes are named by strings, got {type(name).__name__} {name!r}.")
        position = self._name_position("class", self.class_names_, name)
        if position is None:
            raise KeyError(f"unknown class {name!r}; the classes are {', '.join(self.class_names_[:10])}"
                           f"{', ...' if len(self.class_names_) > 10 else ''}.")
        return position

    def concept_reference(self, name: str, which: str) -> float:
        """A named reference value of a concept (e.g. "high"/"low") for interventions, where the family has one."""
        raise ValueError(f"{type(self).__name__} has no reference value {which!r}; give a number instead.")

    def concept_label_map(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight [K, K], bias [K]) of an affine map from binary concept labels to the activations
        they should produce, where the family learned one from training labels; None otherwise."""
        return None

    def expected_concepts(self, concept_labels: Any) -> torch.Tensor:
        """Activations [N, K] that ground-truth binary concept labels [N, K] stand for: the values
        to intervene with. The family's learned map (``concept_label_map``) where it has one, else
        each concept's "high" or "low" reference."""
        labels = as_matrix(concept_labels, "concept labels", len(self.concept_names)).float()
        fitted = self.concept_label_map()
        if fitted is None:
            high, low = ([self.concept_reference(name, which) for name in self.concept_names] for which in ("high", "low"))
            return torch.where(labels > 0.5, torch.tensor(high), torch.tensor(low))
        weight, bias = fitted
        return labels @ weight.T + bias

    def intervention_values(self, x: Any, values: Mapping[str, Any] | tuple[Any, Any]) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor]:
        """Checked features, their concepts, and the concepts after the intervention."""
        check_intervention(values)
        features = self._features(x)
        original = self.concepts(features)
        changed = original.clone()
        if isinstance(values, tuple):
            mask, given = intervention_pair(values, tuple(changed.shape))
            changed[mask] = given[mask]
        else:
            for name, value in values.items():
                column, value = self.intervention_value(name, value, len(changed))
                changed[:, column] = value
        return features, original, changed

    def intervention_value(self, name: str, value: Any, n: int) -> tuple[int, torch.Tensor]:
        """(column, value) of one ``{name: value}`` intervention: a finite number, one per sample (``n``), or a
        reference name such as "high"; a KeyError for an unknown concept, a ValueError for a bad value."""
        column = self.concept_index(name)
        if isinstance(value, str):
            value = self.concept_reference(name, value)
        try:
            value = check_finite(real_tensor(value, f"the value for {name!r}"), f"the value for {name!r}")
        except ValueError:
            raise ValueError(f"the value for {name!r} must be a finite number or one per sample ({n}), "
                             f"got {value!r:.60}.") from None
        if value.ndim > 1 or (value.ndim == 1 and len(value) != n):
            raise ValueError(f"the value for {name!r} must be a number or one number per sample ({n}), "
                             f"got shape {tuple(value.shape)}.")
        return column, value

    def intervention(self, x: Any, values: Mapping[str, Any] | tuple[Any, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, C], concepts [N, K]) after the intervention ``values`` (as for ``intervene``), in one pass:
        the logits and the concepts the head read them from (the given values where set, the model's own
        elsewhere; families whose other concepts respond re-infer them), so that ``contributions(x, concepts)``
        decomposes the logits. ``intervention(x, {})`` is ``(decision_function(x), concepts(x))``."""
        features, _, changed = self.intervention_values(x, values)
        return self._logits(features, changed), changed

    def intervened_concepts(self, x: Any, values: Mapping[str, Any] | tuple[Any, Any]) -> torch.Tensor:
        """The concepts [N, K] the head reads after the intervention ``values`` (see ``intervention``)."""
        return self.intervention(x, values)[1]

    def intervene(self, x: Any, values: Mapping[str, Any] | tuple[Any, Any]) -> torch.Tensor:
        """Logits after setting concepts: ``{name: value}`` (a number, one per sample, or a reference
        name such as "high") or ``(mask [N,K], values [N,K])`` for per-sample batched edits."""
        return self.intervention(x, values)[0]

    # ------------------------------------------------------------------ bundles
    def save(self, path: str | Path, *, metrics: dict[str, float] | None = None) -> Path:
        """Write one self-describing bundle (JSON manifest + safetensors); see ``cbm.load``."""
        self._check_fitted()
        state, tensors = self._state()
        params = {k: v for k, v in self.get_params(deep=False).items() if k != "bank"}
        manifest = {
            "family": self.family,
            "params": params,
            "backbone": {"spec": self.backbone_spec_, "fingerprint": self.backbone_fingerprint_},
            "class_names": self.class_names_,
            "concept_names": self.concept_names_,
            "n_features_in": self.n_features_in_,
            "training": getattr(self, "training_", {}),
            "metrics": {**getattr(self, "metrics_", {}), **(metrics or {})},
            "edits": [asdict(edit) for edit in self.edits_],
            "state": state,
        }
        return write_bundle(path, manifest, tensors)

    def _record_edit(self, edited: ConceptBottleneckModel, record: EditRecord,
                     validation: Validation) -> tuple[ConceptBottleneckModel, EditRecord]:
        """Fill in validation accuracy before/after (when data is given) and extend the edited copy's history."""
        if validation is not None:
            val_x, val_y = (validation.features, validation.labels) if isinstance(validation, Embeddings) else validation
            record.before = {"val_accuracy": self.score(val_x, val_y)}
            record.after = {"val_accuracy": edited.score(val_x, val_y)}
        edited.edits_ = [*self.edits_, record]
        return edited, record

    def load_backbone(self, device: str = "auto") -> Backbone:
        """The backbone the model was fitted on, checked by fingerprint (for images the user brings)."""
        self._check_fitted()
        if not self.backbone_spec_:
            raise ValueError("this model was fitted on bare features, so it does not know its backbone; "
                             "fit it on an Embeddings object to record one.")
        backbone = load_backbone(self.backbone_spec_, device=device)
        if backbone.fingerprint != self.backbone_fingerprint_:
            raise ValueError(f"the backbone {self.backbone_spec_} available here differs from the one this model was "
                             "fitted on (weights or preprocessing changed); refit or restore those weights.")
        return backbone

    def copy(self) -> ConceptBottleneckModel:
        """A deep copy (edits return one)."""
        return copy.deepcopy(self)


# ---------------------------------------------------------------------------------------------
# Shared by the linear-head families (PCBM, LaBo, Sparse-CBM): global edits of ``weight_`` [C, K] with undo
# ---------------------------------------------------------------------------------------------


class LinearHeadEdits:
    """Global edits of a class x concept head ``weight_`` (prune, prune and renormalise, set) with undo."""

    def edit(self, action: Literal["prune", "prune_normalize", "set_weight"], concept: str,
             classes: str | list[str] | None = None, *, value: float = 0.0, validation: Validation = None,
             reason: str = "") -> tuple[Any, EditRecord]:
        """A globally edited copy and the record of the edit.

        ``prune`` zeroes the concept's weight for ``classes`` (all when None); ``prune_normalize``
        also rescales each edited row so its L1 norm is kept (for LaBo: the row stays a convex
        combination); ``set_weight`` sets it to ``value``. With ``validation`` data the record
        holds validation accuracy before and after.
        """
        self._check_fitted()
        if action not in ("prune", "prune_normalize", "set_weight"):
            raise ValueError(f"unknown edit {action!r}; use 'prune', 'prune_normalize' or 'set_weight'.")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"the weight must be a finite number, got {value!r}.")
        column = self.concept_index(concept)
        names = self.class_names_ if classes is None else ([classes] if isinstance(classes, str) else list(classes))
        rows = [self.class_index(name) for name in names]
        edited = self.copy()
        previous = {self.class_names_[r]: self.weight_[r].tolist() for r in rows}
        for row in rows:
            weights = edited.weight_[row]
            old_norm = float(weights.abs().sum())
            weights[column] = value if action == "set_weight" else 0.0
            if action == "prune_normalize":
                new_norm = float(weights.abs().sum())
                if new_norm > 0:
                    weights *= old_norm / new_norm
        record = EditRecord(action=action, concept=concept, classes=names, reason=reason,
                            details={"previous_rows": previous, "value": value})
        return self._record_edit(edited, record, validation)

    def undo(self) -> Any:
        """A copy with the most recent edit reverted (its record removed from the history)."""
        self._check_fitted()
        if not self.edits_:
            raise ValueError("this model has no edits to undo.")
        reverted = self.copy()
        last = reverted.edits_.pop()
        for name, row in last.details["previous_rows"].items():
            reverted.weight_[self.class_index(name)] = torch.tensor(row, dtype=torch.float32)
        return reverted

    def top_concepts(self, k: int = 5) -> dict[str, list[tuple[str, float]]]:
        """The ``k`` largest-magnitude concept weights of every class (non-zero ones only)."""
        self._check_fitted()
        result = {}
        for row, name in zip(self.weight_, self.class_names_):
            order = row.abs().argsort(descending=True)[:k]
            result[name] = [(self.concept_names_[i], float(row[i])) for i in order.tolist() if row[i] != 0]
        return result

    def concept_reference(self, name: str, which: str) -> float:
        """"high"/"low": the concept's typical activation when present/absent (``reference_high_``/``reference_low_``,
        set by the family's ``fit``)."""
        column = self.concept_index(name)
        if which not in ("high", "low"):
            raise ValueError(f"reference value must be 'high' or 'low', got {which!r}.")
        return float(self.reference_high_[column] if which == "high" else self.reference_low_[column])


class ProbabilityReferences:
    """``concept_reference`` for families whose bottleneck holds probabilities (or is scaled to them):
    "high"/"present" = 1, "low"/"absent" = 0."""

    def concept_reference(self, name: str, which: str) -> float:
        self.concept_index(name)
        if which in ("high", "present"):
            return 1.0
        if which in ("low", "absent"):
            return 0.0
        raise ValueError(f"reference value must be 'high'/'present' or 'low'/'absent', got {which!r}.")


def check_intervention(values: Any) -> None:
    """A TypeError unless ``values`` is a ``{concept name: value}`` mapping or a ``(mask, values)`` pair."""
    if not (isinstance(values, Mapping) or (isinstance(values, tuple) and len(values) == 2)):
        raise TypeError(f"intervention values must be a {{concept name: value}} mapping or a (mask, values) pair, "
                        f"got {type(values).__name__}.")


def intervention_pair(values: tuple[Any, Any], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, values) of a batched intervention, both checked to have ``shape``; values need to be finite only
    where the mask is set (NaN elsewhere is fine)."""
    mask = np.asarray(values[0])
    if mask.dtype.kind not in "biu":
        raise TypeError(f"the intervention mask must be a boolean (or 0/1) array, got {mask.dtype} values.")
    mask = torch.as_tensor(mask).bool()
    given = real_tensor(values[1], "intervention values")
    if mask.shape != shape or given.shape != shape:
        raise ValueError(f"intervention mask and values must both be {shape}, got {tuple(mask.shape)} and "
                         f"{tuple(given.shape)}.")
    if not torch.isfinite(given[mask]).all():
        raise ValueError("intervention values are NaN or infinite where the mask is set; give finite numbers there.")
    return mask, given


def finite_output(values: torch.Tensor, what: str = "logits") -> torch.Tensor:
    """``values`` itself, or a ValueError when x overflowed float32 arithmetic on its way through the model."""
    if not torch.isfinite(values).all():
        raise ValueError(f"the model's {what} overflowed to NaN or infinity: the values of x are far too large for "
                         "float32; check their scale (embeddings are usually well below 1e3).")
    return values


def check_tensors(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    for name, shape in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} must have shape {tuple(shape)}")
        if not torch.isfinite(tensors[name].float()).all():
            raise ValueError(f"tensor {name!r} holds NaN or infinite values")


def labels_of(x: Any, y: Any) -> Any:
    if y is None and isinstance(x, Embeddings):
        y = x.labels
    if y is None:
        raise ValueError("y is required (or pass an Embeddings with labels as x).")
    return y


def prepare_validation(model: ConceptBottleneckModel, features: torch.Tensor, labels: torch.Tensor,
                       validation: Validation, seed: int, bank: ConceptBank):
    """Train/validation tensors: the given validation data (checked) or a seeded 10% of train."""
    if isinstance(validation, Embeddings):
        bank.check_features(validation.features, validation.backbone_fingerprint)
    train_x, train_y, val_x, val_y, source = split_validation(features, labels, validation, seed)
    return train_x, train_y, val_x, as_labels(val_y, len(val_x), len(model.class_names_), "validation y"), source


def load(path: str | Path) -> ConceptBottleneckModel:
    """Load any family's bundle written by ``model.save``; nothing in the file is executed."""
    manifest, tensors = read_bundle(path)
    family = manifest.get("family")
    if not isinstance(family, str) or family not in FAMILIES:
        raise BundleError(f"{path} holds an unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}.")
    cls = FAMILIES[family]
    try:
        model = cls._from_manifest(manifest, tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        if isinstance(error, BundleError):
            raise
        raise BundleError(f"{path} is an inconsistent {family} bundle ({type(error).__name__}: {error}).") from None
    bank = getattr(model, "bank", None)
    if bank is not None and bank.backbone and model.backbone_fingerprint_ and bank.backbone != model.backbone_fingerprint_:
        raise BundleError(f"{path} is an inconsistent {family} bundle: its concept bank belongs to another backbone "
                          "than the model; refit the model with a bank of its backbone.")
    return model


def _restore_common(model: ConceptBottleneckModel, manifest: dict[str, Any]) -> None:
    """Set the fitted attributes every family shares from a manifest (types checked: a ValueError otherwise)."""
    for key in ("class_names", "concept_names"):
        names = manifest[key]
        if not (isinstance(names, list) and names and all(isinstance(n, str) and n.strip() for n in names)
                and len(set(names)) == len(names)):
            raise ValueError(f"{key} must be a non-empty list of unique, non-blank strings")
    width, backbone = manifest["n_features_in"], manifest["backbone"]
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError("n_features_in must be a positive integer")
    if not (isinstance(backbone, dict) and all(isinstance(backbone.get(k), str) for k in ("spec", "fingerprint"))):
        raise ValueError("backbone must hold a spec and a fingerprint string")
    model.class_names_ = list(manifest["class_names"])
    model.concept_names_ = list(manifest["concept_names"])
    model.n_features_in_ = width
    model.backbone_spec_ = backbone["spec"]
    model.backbone_fingerprint_ = backbone["fingerprint"]
    model.training_ = dict(manifest.get("training") or {})
    model.metrics_ = dict(manifest.get("metrics") or {})
    model.edits_ = [EditRecord(**edit) for edit in manifest.get("edits") or []]


def bank_state(bank: ConceptBank) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A concept bank as JSON + tensors with a ``bank.`` prefix, for embedding in a model bundle."""
    tensors = {"bank.vectors": bank.vectors, "bank.intercepts": bank.intercepts}
    tensors.update({f"bank.stats.{key}": value for key, value in bank.stats.items()})
    return {"names": bank.names, "kind": bank.kind, "backbone": bank.backbone, "provenance": bank.provenance,
            "stats": sorted(bank.stats)}, tensors


def bank_from_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ConceptBank:
    return ConceptBank(state["names"], tensors["bank.vectors"], tensors["bank.intercepts"], kind=state["kind"],
                       backbone=state["backbone"], provenance=state.get("provenance") or {},
                       stats={key: tensors[f"bank.stats.{key}"] for key in state.get("stats", [])})
