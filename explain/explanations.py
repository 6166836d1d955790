"""Per-sample and global explanations, and smallest counterfactuals, for any model family.

Every function takes a fitted model and data (an Embeddings, or ``(x, y[, concept_labels])``), or
a :class:`~explain.core.ModelView` that already holds both, so a report computes the model's
outputs once. Contributions come from ``model.contributions`` (exact decompositions for linear
heads); what they do not explain (bias, residual, non-linear parts) is reported as ``rest``.
Counterfactuals are exact (the smallest set of concept changes) up to 3 changes where the number of
candidate sets fits a budget, and greedy beyond; each result says which search produced it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cbm.models.base import ConceptBottleneckModel
from explain.core import DataLike, EvalData, ModelView, VideoView, concept_bounds, concept_view, make_view

BATCH_CELLS = 4_000_000  # concept values per batch of candidate sets in the exact counterfactual search


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
    """The concept changes that move a prediction to another class, and how they were found.

    ``search`` is "exact" when no smaller set of changes flips the prediction (or, with no changes, when
    no set of up to ``max_changes`` does), "greedy" when the set was grown one change at a time and a
    smaller one may exist; sets of up to ``exact_up_to`` changes were searched exhaustively either way.
    """

    original: str
    new: str
    flipped: bool
    changes: list[Change] = field(default_factory=list)
    search: str = "greedy"
    exact_up_to: int = 0
    max_changes: int = 8

    def describe(self) -> str:
        if not self.changes:
            if self.search == "exact":
                return f"no set of up to {self.max_changes} concept changes flips it (exact search)"
            return "no counterfactual found"
        steps = "; ".join(f"{c.concept} {c.before:.2f} -> {c.after:.2f}" for c in self.changes)
        if self.search == "exact":
            how = "exact search: no smaller set flips it"
        else:
            searched = f"no set of up to {self.exact_up_to} flips it, " if self.exact_up_to else ""
            how = f"greedy search: {searched}a smaller set may exist"
        return f"{steps} => {self.new}" + ("" if self.flipped else " (not flipped)") + f" ({how})"


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
    """Top-``k`` contributions to the predicted class for the samples ``rows`` (default: the first 8), with a
    counterfactual each where the family supports concept-level interventions (not video models)."""
    view = view_of(model, data)
    counterfactuals = counterfactuals and isinstance(view, ModelView)
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
    view = concept_view(view_of(model, data), "concept effects")
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


#: Most changes the exact counterfactual search tries (sets of 1..3 concepts, each at its "low" or "high").
EXACT_MAX_CHANGES = 3
#: Default most candidate change sets the exact search evaluates per sample (about 33 concepts at 3 changes)
#: where interventions only re-evaluate the head (linear heads, with or without a residual).
EXACT_BUDGET = 50_000
#: The same where every set is a full ``model.intervene`` call (e.g. ECBM re-infers the other concepts):
#: 2 changes for up to 15 concepts, 1 change for up to 250.
EXACT_BUDGET_INTERVENE = 500


def exact_search_depth(n_concepts: int, max_changes: int, budget: int) -> int:
    """The largest set size ``s <= min(3, max_changes)`` whose exhaustive search, all sets of 1..s concepts
    each at one of its two values (sum of C(K, i) 2^i), costs at most ``budget`` evaluations (0: none fits)."""
    depth, cost = 0, 0
    for size in range(1, min(EXACT_MAX_CHANGES, max_changes) + 1):
        cost += math.comb(n_concepts, size) * 2 ** size
        if cost > budget:
            break
        depth = size
    return depth


def _flip_margin(logits: torch.Tensor, original: int, goal: int | None) -> torch.Tensor:
    """> 0 where the prediction has left ``original`` (``goal`` None) or become ``goal``; [M, C] -> [M]."""
    others = logits.clone()
    if goal is None:
        others[:, original] = -torch.inf
        return others.max(dim=1).values - logits[:, original]
    others[:, goal] = -torch.inf
    return logits[:, goal] - others.max(dim=1).values


def _exact_counterfactual(view: ModelView, row: int, options: torch.Tensor, original: int, goal: int | None,
                          depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The smallest set of at most ``depth`` changes that flips sample ``row`` (the largest margin among the
    smallest), as (columns, values, logits), or None. Every set of each size is evaluated in batches through
    ``view.intervened_logits``; ``options`` [2, K] are each concept's "low" and "high" values."""
    current = view.concepts[row]
    n_concepts = len(current)
    for size in range(1, depth + 1):
        combos = torch.combinations(torch.arange(n_concepts), size) if size > 1 else torch.arange(n_concepts)[:, None]
        choices = torch.cartesian_prod(*[torch.arange(2)] * size).view(-1, size)  # which of the two values, per slot
        best: tuple[float, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        for chunk in combos.split(max(1, BATCH_CELLS // (n_concepts * len(choices)))):
            columns = chunk.repeat_interleave(len(choices), dim=0)  # [M, size]
            values = options[choices.repeat(len(chunk), 1), columns]
            changed = current.expand(len(columns), n_concepts).clone().scatter_(1, columns, values)
            logits = view.intervened_logits(torch.full((len(columns),), row), changed)
            margin = _flip_margin(logits, original, goal)
            margin[((values - current[columns]).abs() < 1e-9).any(dim=1)] = -torch.inf  # a "change" to its own value
            pick = int(margin.argmax())
            if margin[pick] > 0 and (best is None or float(margin[pick]) > best[0]):
                best = (float(margin[pick]), columns[pick], values[pick], logits[pick])
        if best is not None:
            return best[1], best[2], best[3]
    return None


def _greedy_counterfactual(view: ModelView, row: int, options: torch.Tensor, original: int, goal: int | None,
                           max_changes: int) -> tuple[list[tuple[int, float]], torch.Tensor]:
    """Greedy changes (column, value) and the final logits: each step keeps the single change that most
    raises the margin, and it stops as soon as the prediction flips."""
    current = view.concepts[row].clone()
    free = torch.ones(len(current), dtype=torch.bool)
    candidates = options.reshape(-1)
    columns = torch.arange(len(current)).repeat(2)
    index = torch.tensor([row])
    changes: list[tuple[int, float]] = []
    logits = view.logits[row]
    for _ in range(max_changes):
        logits_all = torch.cat([view.single_change_logits(index, current[None], bound[None])[0] for bound in options])
        margin = _flip_margin(logits_all, original, goal)
        margin[~free.repeat(2) | ((candidates - current[columns]).abs() < 1e-9)] = -torch.inf
        best = int(margin.argmax())
        if not torch.isfinite(margin[best]):
            break
        column = int(columns[best])
        changes.append((column, float(candidates[best])))
        current[column] = candidates[best]
        free[column] = False
        logits = logits_all[best]
        if margin[best] > 0:
            break
    return changes, logits


def counterfactual(model: ConceptBottleneckModel | ModelView, data: DataLike | EvalData | None = None, *,
                   row: int = 0, target: str | None = None, max_changes: int = 8,
                   exact_budget: int | None = None) -> Counterfactual:
    """A smallest set of concept changes that flips the prediction of sample ``row`` (to ``target``, default:
    to any other class); each changed concept goes to its "low" or "high" value (the family's
    references, else data percentiles).

    Exact where affordable: every set of 1, 2, then 3 changes (at most ``max_changes``) is tried, in batches,
    as long as the number of sets stays within ``exact_budget`` per sample (default ``EXACT_BUDGET``, 50,000:
    with two values per concept 3 changes fit for up to 33 concepts, 2 changes for up to 158; for families
    whose interventions re-run the model, ``EXACT_BUDGET_INTERVENE``, 500); the flip with the largest margin among
    the smallest sets is returned (``search="exact"``). When no set that small flips it, or the budget
    allows no exact search, a greedy search follows (``search="greedy"``): each step keeps the change
    that most raises the target class over the rest, until the prediction flips or ``max_changes``.
    ``exact_up_to`` says up to which size no smaller set was missed.
    """
    if isinstance(max_changes, bool) or not isinstance(max_changes, int) or max_changes < 1:
        raise ValueError(f"max_changes must be a positive integer, got {max_changes!r}.")
    if exact_budget is not None and (isinstance(exact_budget, bool) or not isinstance(exact_budget, int)
                                     or exact_budget < 0):
        raise ValueError(f"exact_budget must be a non-negative integer (0: greedy only), got {exact_budget!r}.")
    view = concept_view(view_of(model, data), "counterfactual")
    if exact_budget is None:
        exact_budget = EXACT_BUDGET if view.additive else EXACT_BUDGET_INTERVENE
    (row,) = view.check_rows([row])
    options = torch.stack(concept_bounds(view))  # [2, K]: "low", "high"
    original = int(view.predictions[row])
    goal = None if target is None else view.model.class_index(target)
    if goal == original:
        raise ValueError(f"sample {row} is already predicted as {target!r}; choose another target class.")
    depth = exact_search_depth(len(view.concept_names), max_changes, exact_budget)
    found = _exact_counterfactual(view, row, options, original, goal, depth) if depth else None
    if found is not None:
        columns, values, logits = found
        changes, search = list(zip(columns.tolist(), values.tolist())), "exact"
    elif depth == max_changes:
        changes, logits, search = [], view.logits[row], "exact"  # proven: no set of up to max_changes flips it
    else:
        changes, logits = _greedy_counterfactual(view, row, options, original, goal, max_changes)
        search = "greedy"
    current = view.concepts[row]
    new = int(logits.argmax())
    flipped = new != original if goal is None else new == goal
    return Counterfactual(view.class_names[original], view.class_names[new], flipped,
                          [Change(view.concept_names[c], float(current[c]), value) for c, value in changes],
                          search=search, exact_up_to=depth, max_changes=max_changes)
