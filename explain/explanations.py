"""Per-sample and global explanations, and greedy counterfactuals, for any model family.

Every function takes a fitted model and data (an Embeddings, or ``(x, y[, concept_labels])``), or
a :class:`~explain.core.ModelView` that already holds both, so a report computes the model's
outputs once. Contributions come from ``model.contributions`` (exact decompositions for linear
heads); what they do not explain (bias, residual, non-linear parts) is reported as ``rest``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cbm.models.base import ConceptBottleneckModel
from explain.core import DataLike, EvalData, ModelView, VideoView, concept_bounds, make_view


def view_of(model: ConceptBottleneckModel | ModelView | VideoView,
            data: DataLike | EvalData | None = None) -> ModelView | VideoView:
    """``model`` itself when it is a view, else a view of ``model`` on ``data`` (a VideoView for temporal models)."""
    if isinstance(model, (ModelView, VideoView)):
        return model
    if data is None:
        raise ValueError("data is required with a model (or pass a ModelView).")
    return make_view(model, data)


@dataclass
class Change:
    """One concept set from ``before`` to ``after`` in a counterfactual."""

    concept: str
    before: float
    after: float


@dataclass
class Counterfactual:
    """The concept changes (in the order found) that move a prediction to another class."""

    original: str
    new: str
    flipped: bool
    changes: list[Change] = field(default_factory=list)

    def describe(self) -> str:
        if not self.changes:
            return "no counterfactual found"
        steps = "; ".join(f"{c.concept} {c.before:.2f} -> {c.after:.2f}" for c in self.changes)
        return f"{steps} => {self.new}" + ("" if self.flipped else " (not flipped)")


@dataclass
class SampleExplanation:
    """Why one sample got its prediction: the top concept contributions to the predicted class."""

    index: int
    id: str
    true: str | None
    predicted: str
    probability: float
    top: list[tuple[str, float, float]]  # (concept, activation, contribution)
    other: float  # sum of the contributions of the remaining concepts
    rest: float  # logit minus all contributions: bias, residual, non-linear parts
    counterfactual: Counterfactual | None = None

    @property
    def correct(self) -> bool:
        return self.true == self.predicted

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result["top"] = [{"concept": c, "activation": a, "contribution": v} for c, a, v in self.top]
        return result


def explain_samples(model: ConceptBottleneckModel | ModelView, data: DataLike | EvalData | None = None,
                    rows: list[int] | None = None, k: int = 5, counterfactuals: bool = True) -> list[SampleExplanation]:
    """Top-``k`` contributions to the predicted class for the samples ``rows`` (default: the first 8)."""
    view = view_of(model, data)
    rows = list(range(min(8, len(view.data)))) if rows is None else view.check_rows(rows)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (concepts shown per sample) must be a positive integer, got {k!r}.")
    index = torch.tensor(rows, dtype=torch.long)
    contributions = view.contributions(index)
    probabilities = torch.softmax(view.logits[index], dim=1)
    result = []
    for j, row in enumerate(rows):
        predicted = int(view.predictions[row])
        values = contributions[j, predicted]
        order = values.abs().argsort(descending=True)
        top = [(view.concept_names[i], float(view.concepts[row, i]), float(values[i])) for i in order[:k]]
        labels = view.data.labels
        result.append(SampleExplanation(
            index=row, id=view.data.ids[row] if view.data.ids else str(row),
            true=None if labels is None else view.class_names[int(labels[row])],
            predicted=view.class_names[predicted], probability=float(probabilities[j, predicted]), top=top,
            other=float(values[order[k:]].sum()), rest=float(view.logits[row, predicted] - values.sum()),
            counterfactual=counterfactual(view, row=row) if counterfactuals else None))
    return result


@dataclass
class Importance:
    """Global concept importance per class [C, K]: the mean contribution of each concept to a class's
    logit on that class's samples, minus its mean over all samples (signed; offsets cancel).
    ``magnitude`` is the mean absolute contribution on the class's samples (for sparsity)."""

    values: torch.Tensor
    magnitude: torch.Tensor
    class_names: list[str]
    concept_names: list[str]

    def top(self, k: int = 5) -> dict[str, list[tuple[str, float]]]:
        """The ``k`` largest-magnitude concepts of every class."""
        result = {}
        for name, row in zip(self.class_names, self.values):
            order = row.abs().argsort(descending=True)[:k]
            result[name] = [(self.concept_names[i], float(row[i])) for i in order if row[i] != 0]
        return result

    def share(self) -> torch.Tensor:
        """Each entry over its class's total absolute importance [C, K]."""
        return self.values / self.values.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)


def global_importance(model: ConceptBottleneckModel | ModelView, data: DataLike | EvalData | None = None,
                      by: str = "label") -> Importance:
    """Per-class concept importance on ``data``; samples are grouped by their ``label`` (or
    ``prediction`` when the data has no labels or ``by="prediction"``)."""
    if by not in ("label", "prediction"):
        raise ValueError(f"by must be 'label' or 'prediction', got {by!r}.")
    view = view_of(model, data)
    groups = view.predictions if by == "prediction" or view.data.labels is None else view.data.labels
    n_classes, n_concepts = len(view.class_names), len(view.concept_names)
    class_sum = torch.zeros(n_classes, n_concepts)
    overall = torch.zeros(n_classes, n_concepts)
    magnitude = torch.zeros(n_classes, n_concepts)
    for index in torch.arange(len(view.data)).split(2048):
        contributions = view.contributions(index)  # [n, C, K]
        overall += contributions.sum(0)
        own = contributions[torch.arange(len(index)), groups[index]]  # [n, K]
        class_sum.index_add_(0, groups[index], own)
        magnitude.index_add_(0, groups[index], own.abs())
    counts = torch.bincount(groups, minlength=n_classes).float()
    values = class_sum / counts.clamp_min(1)[:, None] - overall / max(len(view.data), 1)
    values[counts == 0] = 0.0
    return Importance(values, magnitude / counts.clamp_min(1)[:, None], view.class_names, view.concept_names)


def concept_effects(model: ConceptBottleneckModel | ModelView, data: DataLike | EvalData | None = None,
                    max_samples: int | None = 2000) -> torch.Tensor:
    """Interventional importance [C, K]: how much setting concept k from its "low" to its "high" value
    raises class c's logit, averaged over the class's samples (at most ``max_samples``, seeded).

    Unlike :func:`global_importance` this does not depend on how concepts and classes co-occur in the
    data, so a spurious weight shows even on data where the spurious correlation is gone.
    """
    view = view_of(model, data)
    rows = torch.arange(len(view.data))
    if max_samples is not None and len(rows) > max_samples:
        rows = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:max_samples].sort().values
    groups = view.predictions if view.data.labels is None else view.data.labels
    low, high = concept_bounds(view)
    n_classes, n_concepts = len(view.class_names), len(view.concept_names)
    sums = torch.zeros(n_classes, n_concepts)
    for chunk in rows.split(max(1, 4_000_000 // (n_concepts * n_classes))):
        current = view.concepts[chunk]
        change = (view.single_change_logits(chunk, current, high.expand_as(current))
                  - view.single_change_logits(chunk, current, low.expand_as(current)))  # [n, K, C]
        own = groups[chunk].view(-1, 1, 1).expand(len(chunk), n_concepts, 1)
        sums.index_add_(0, groups[chunk], change.gather(2, own).squeeze(2))
    return sums / torch.bincount(groups[rows], minlength=n_classes).clamp_min(1)[:, None].float()


def counterfactual(model: ConceptBottleneckModel | ModelView, data: DataLike | EvalData | None = None, *,
                   row: int = 0, target: str | None = None, max_changes: int = 8) -> Counterfactual:
    """Greedy smallest set of concept changes that flips the prediction of sample ``row``.

    Each step tries every unchanged concept at its "low" and its "high" value (the family's
    references, else data percentiles) and keeps the change that most raises the target class
    (default: any other class) over the rest; it stops as soon as the prediction flips.
    """
    view = view_of(model, data)
    (row,) = view.check_rows([row])
    low, high = concept_bounds(view)
    original = int(view.predictions[row])
    goal = None if target is None else view.model.class_index(target)
    current = view.concepts[row].clone()
    free = torch.ones(len(current), dtype=torch.bool)
    candidates = torch.cat([low, high])
    columns = torch.arange(len(current)).repeat(2)
    index = torch.tensor([row])
    changes: list[Change] = []
    logits = view.logits[row]
    for _ in range(max_changes):
        logits_all = torch.cat([view.single_change_logits(index, current[None], bound[None])[0] for bound in (low, high)])
        others = logits_all.clone()
        if goal is None:
            others[:, original] = -torch.inf
            margin = others.max(dim=1).values - logits_all[:, original]
        else:
            others[:, goal] = -torch.inf
            margin = logits_all[:, goal] - others.max(dim=1).values
        margin[~free.repeat(2) | ((candidates - current[columns]).abs() < 1e-9)] = -torch.inf
        best = int(margin.argmax())
        if not torch.isfinite(margin[best]):
            break
        column = int(columns[best])
        changes.append(Change(view.concept_names[column], float(current[column]), float(candidates[best])))
        current[column] = candidates[best]
        free[column] = False
        logits = logits_all[best]
        if margin[best] > 0:
            break
    new = int(logits.argmax())
    flipped = new != original if goal is None else new == goal
    return Counterfactual(view.class_names[original], view.class_names[new], flipped, changes)
