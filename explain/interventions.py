"""Intervention curves: accuracy against the number of concepts an expert corrects, per policy.

An expert sets concepts to their true values: the family's "high"/"low" reference (or data
percentiles) for samples with/without the concept when the data has concept labels, else the mean
activation of the sample's true class (a label-free proxy). An imperfect expert with competence
``p`` gives the true value with probability ``p`` and the wrong one otherwise (the opposite
reference; with the proxy, the mean of another class). Policies choose which concepts to correct
first, per sample:

- ``random``: a random order;
- ``uncertain``: activations closest to the midpoint between "low" and "high" first;
- ``contribution``: largest absolute contribution to the predicted class first;
- ``oracle`` (shown as "greedy oracle"): with access to the true class, at each step the single
  correction that most raises the true class's margin, with the values the expert gives; it may stop
  early (never makes a correct sample wrong). It is greedy, not the best set of corrections of each
  size (one that takes the largest single gain first can need more corrections than a better pair),
  so it is a reference, not an upper bound of what a policy can reach with the same expert;
  an exact best-subset search over 2000 samples and up to 20 corrections is not affordable.

With ``by="group"`` the expert corrects whole concept groups (the values of one attribute, such as CUB's
bill shape; every concept outside the groups is a group of its own) and the counts are groups: the
policies rank groups (random order; the group's most uncertain value; the sum of its values' absolute
contributions; the greedy oracle's best group correction).

Repeated over seeds (expert mistakes and random orders), with 95% intervals across seeds.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cbm.models.base import ConceptBottleneckModel
from concepts.bank import concept_groups
from explain.core import DataLike, EvalData, ModelView, ci95, concept_bounds, concept_view
from explain.explanations import view_of

logger = logging.getLogger(__name__)

POLICIES = ("random", "uncertain", "contribution", "oracle")
#: How each policy is shown in figures, tables and reports.
POLICY_LABELS = {"random": "random", "uncertain": "uncertain", "contribution": "contribution",
                 "oracle": "greedy oracle"}
#: What each policy does, one sentence each (in the curves' JSON and the audit report).
POLICY_DESCRIPTIONS = {
    "random": "corrects concepts in a random order",
    "uncertain": "corrects the activations closest to the midpoint between 'low' and 'high' first",
    "contribution": "corrects the concepts with the largest absolute contribution to the predicted class first",
    "oracle": "greedy oracle: knows the true class and takes, step by step, the single correction that most "
              "raises its margin (may stop early); greedy, so a reference, not an upper bound"}


@dataclass
class InterventionCurves:
    """Accuracy [seeds, len(counts)] per (policy, competence), with means and 95% intervals."""

    counts: list[int]
    accuracy: dict[tuple[str, float], np.ndarray]
    truth: str
    samples: int
    seeds: list[int] = field(default_factory=list)
    by: str = "concept"

    def rows(self) -> list[dict[str, Any]]:
        """One row per (policy, competence, count): mean accuracy and its interval."""
        rows = []
        for (policy, competence), values in self.accuracy.items():
            mean, low, high = ci95(values)
            for j, count in enumerate(self.counts):
                rows.append({"policy": policy, "competence": competence, "concepts": count,
                             "accuracy": float(mean[j]), "ci_low": float(low[j]), "ci_high": float(high[j])})
        return rows

    def curve(self, policy: str, competence: float = 1.0) -> np.ndarray:
        """Mean accuracy per count of one policy."""
        return self.accuracy[(policy, competence)].mean(axis=0)

    def to_dict(self) -> dict[str, Any]:
        policies = dict.fromkeys(policy for policy, _ in self.accuracy)
        return {"counts": self.counts, "by": self.by, "truth": self.truth, "samples": self.samples, "seeds": self.seeds,
                "policies": {policy: POLICY_DESCRIPTIONS[policy] for policy in policies}, "rows": self.rows()}

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        rows = self.rows()
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def plot(self):
        """A matplotlib Figure of the curves (see :func:`explain.plots.intervention_figure`)."""
        from explain.plots import intervention_figure
        return intervention_figure(self)


def _truth_values(view: ModelView, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    """True and wrong values [N, K] an expert could give, and which truth was used.

    With concept labels, the true values come from the model's learned label map
    (``concept_label_map``, PCBM fitted with concept labels) or else the "low"/"high" bounds; a
    wrong value is what the map gives when that one concept's label is flipped."""
    labels = view.data.concept_truth(view.concept_names)
    if labels is not None:
        fitted = view.model.concept_label_map()
        if fitted is None:
            low, high = concept_bounds(view)
            fitted = torch.diag(high - low), low
        weight, bias = fitted
        present = (labels > 0.5).float()
        true = present @ weight.T + bias
        return true, true + torch.diagonal(weight) * (1 - 2 * present), "concept labels"
    if view.data.labels is None:
        raise ValueError("intervention curves need class labels (and ideally concept labels) in the data.")
    y = view.data.labels
    n_classes = len(view.class_names)
    sums = torch.zeros(n_classes, view.concepts.shape[1]).index_add_(0, y, view.concepts)
    prototypes = sums / torch.bincount(y, minlength=n_classes).clamp_min(1)[:, None].float()
    other = (y + torch.randint(1, max(n_classes, 2), y.shape, generator=generator)) % n_classes
    return prototypes[y], prototypes[other], "class mean activations (no concept labels)"


def _uncertainty_distance(view: ModelView, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """How far each activation is from the midpoint of "low" and "high", relative to their gap [N, K]."""
    return (view.concepts - (low + high) / 2).abs() / (high - low).abs().clamp_min(1e-6)


def _contribution_sizes(view: ModelView) -> torch.Tensor:
    """Absolute contribution of each concept to the predicted class [N, K]."""
    predicted = view.predictions
    return torch.cat([view.contributions(index)[torch.arange(len(index)), predicted[index]].abs()
                      for index in torch.arange(len(view.concepts)).split(1024)])


def _orders(view: ModelView, policy: str, generator: torch.Generator, low: torch.Tensor,
            high: torch.Tensor) -> torch.Tensor:
    """Per-sample concept order [N, K] (first = corrected first) of a non-oracle policy."""
    n, k = view.concepts.shape
    if policy == "random":
        return torch.rand(n, k, generator=generator).argsort(dim=1)
    if policy == "uncertain":
        return _uncertainty_distance(view, low, high).argsort(dim=1)
    if policy == "contribution":
        return _contribution_sizes(view).argsort(dim=1, descending=True)
    raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}.")


def _group_orders(view: ModelView, policy: str, generator: torch.Generator, low: torch.Tensor, high: torch.Tensor,
                  units: list[list[int]]) -> torch.Tensor:
    """Per-sample group order [N, G] of a non-oracle policy (see the module docstring)."""
    if policy == "random":
        return torch.rand(len(view.concepts), len(units), generator=generator).argsort(dim=1)
    if policy == "uncertain":
        distance = _uncertainty_distance(view, low, high)
        return torch.stack([distance[:, unit].min(dim=1).values for unit in units], dim=1).argsort(dim=1)
    if policy == "contribution":
        sizes = _contribution_sizes(view)
        return torch.stack([sizes[:, unit].sum(dim=1) for unit in units], dim=1).argsort(dim=1, descending=True)
    raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}.")


def _correction_units(view: ModelView, groups: Mapping[str, Sequence[str]] | None) -> list[list[int]]:
    """Concept indices of what ``by="group"`` corrects at once: each group (``groups``, else the model's
    ``concept_groups_``), then every concept outside them alone; a ValueError when there are no groups."""
    groups = groups if groups is not None else getattr(view.model, "concept_groups_", None)
    if not groups:
        raise ValueError(f"by='group' needs concept groups, and {type(view.model).__name__} has none; pass groups= "
                         "({group: [concept, ...]}) or fit a model with concept_groups=.")
    groups = concept_groups(view.concept_names, groups)
    index = {name: i for i, name in enumerate(view.concept_names)}
    grouped = {name for members in groups.values() for name in members}
    units = [[index[m] for m in members] for members in groups.values()]
    return units + [[index[name]] for name in view.concept_names if name not in grouped]


def _group_oracle(view: ModelView, given: torch.Tensor, counts: Sequence[int], units: list[list[int]]) -> np.ndarray:
    """The greedy oracle over whole groups: each step, the group correction that most raises the margin."""
    y = view.data.labels
    rows = torch.arange(len(y))
    current = view.concepts.clone()
    best = _margin(view.logits, y)
    free = torch.ones(len(y), len(units), dtype=torch.bool)
    accuracy = {0: float((best > 0).float().mean())}
    for step in range(1, max(counts) + 1):
        margins = torch.empty(len(y), len(units))
        for u, unit in enumerate(units):
            trial = current.clone()
            trial[:, unit] = given[:, unit]
            margins[:, u] = _margin(view.intervened_logits(rows, trial), y)
        margins[~free] = -torch.inf
        pick = margins.argmax(dim=1)
        for u, unit in enumerate(units):
            members = torch.zeros(current.shape[1], dtype=torch.bool)
            members[unit] = True
            current = torch.where((pick == u)[:, None] & members[None], given, current)
        free[rows, pick] = False
        best = torch.maximum(best, margins[rows, pick])
        accuracy[step] = float((best > 0).float().mean())
    return np.array([accuracy[c] for c in counts])


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True-class logit minus the largest other logit (> 0: correct); works on [..., C] with y [N]."""
    true = logits.gather(-1, y.view(-1, *([1] * (logits.ndim - 1))).expand(*logits.shape[:-1], 1)).squeeze(-1)
    others = logits.scatter(-1, y.view(-1, *([1] * (logits.ndim - 1))).expand(*logits.shape[:-1], 1), -torch.inf)
    return true - others.max(dim=-1).values


def _oracle(view: ModelView, given: torch.Tensor, counts: Sequence[int]) -> np.ndarray:
    """Accuracy per count of the greedy oracle that may stop early (greedy: not the best subset of each size)."""
    y = view.data.labels
    rows = torch.arange(len(y))
    current = view.concepts.clone()
    best = _margin(view.logits, y)
    free = torch.ones_like(current, dtype=torch.bool)
    accuracy = {0: float((best > 0).float().mean())}
    for step in range(1, max(counts) + 1):
        margins = _margin(view.single_change_logits(rows, current, given), y)  # [N, K]
        margins[~free] = -torch.inf
        pick = margins.argmax(dim=1)
        current[rows, pick] = given[rows, pick]
        free[rows, pick] = False
        best = torch.maximum(best, margins[rows, pick])
        accuracy[step] = float((best > 0).float().mean())
    return np.array([accuracy[c] for c in counts])


def intervention_curves(model: ConceptBottleneckModel | ModelView, data: DataLike | EvalData | None = None, *,
                        policies: Sequence[str] = POLICIES, competences: Sequence[float] = (1.0,),
                        max_concepts: int | None = None, seeds: Sequence[int] = (0, 1, 2),
                        max_samples: int | None = 2000, progress: bool = False, by: str = "concept",
                        groups: Mapping[str, Sequence[str]] | None = None) -> InterventionCurves:
    """Accuracy after correcting 0..``max_concepts`` concepts (default: min(K, 20)) per policy and
    expert competence, over ``seeds``; at most ``max_samples`` samples (seeded subsample). ``by="group"``
    corrects whole concept groups (``groups``, else the model's own) and counts groups."""
    view = concept_view(view_of(model, data), "intervention curves")
    view.labels("intervention curves")
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed, e.g. seeds=(0,).")
    if max_concepts is not None and max_concepts < 1:
        raise ValueError(f"max_concepts must be at least 1 (or None for min(K, 20)), got {max_concepts!r}.")
    if len(view.data) > (max_samples or len(view.data)):
        chosen = torch.randperm(len(view.data), generator=torch.Generator().manual_seed(0))[:max_samples]
        view = ModelView(view.model, view.data.subset(chosen.sort().values))
    for policy in policies:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}.")
    for competence in competences:
        if not 0.0 <= competence <= 1.0:
            raise ValueError(f"competence is a probability in [0, 1], got {competence}.")
    if by not in ("concept", "group"):
        raise ValueError(f"by must be 'concept' or 'group', got {by!r}.")
    units = _correction_units(view, groups) if by == "group" else None
    n_units = view.concepts.shape[1] if units is None else len(units)
    counts = list(range(min(n_units, max_concepts or 20) + 1))
    low, high = concept_bounds(view)
    y = view.data.labels
    accuracy: dict[tuple[str, float], np.ndarray] = {
        (policy, float(c)): np.zeros((len(seeds), len(counts))) for policy in policies for c in competences}
    truth_name = ""
    jobs = [(s, seed, c) for s, seed in enumerate(seeds) for c in competences]
    for s, seed, competence in tqdm(jobs, desc="intervention curves", disable=not progress, leave=False):
        generator = torch.Generator().manual_seed(int(seed))
        true, wrong, truth_name = _truth_values(view, generator)
        right = torch.rand(true.shape, generator=generator) < competence
        given = torch.where(right, true, wrong)
        for policy in policies:
            if policy == "oracle":
                accuracy[(policy, float(competence))][s] = (_oracle(view, given, counts) if units is None
                                                            else _group_oracle(view, given, counts, units))
                continue
            if units is None:
                rank = _orders(view, policy, generator, low, high).argsort(dim=1)  # rank of each concept
            else:  # each concept takes its group's rank
                unit_of = torch.empty(view.concepts.shape[1], dtype=torch.long)
                for u, unit in enumerate(units):
                    unit_of[unit] = u
                rank = _group_orders(view, policy, generator, low, high, units).argsort(dim=1)[:, unit_of]
            for j, count in enumerate(counts):
                changed = torch.where(rank < count, given, view.concepts)
                logits = view.intervened_logits(torch.arange(len(y)), changed)
                accuracy[(policy, float(competence))][s, j] = float((logits.argmax(dim=1) == y).float().mean())
    logger.info("intervention curves on %d samples, %d seeds, truth: %s", len(y), len(seeds), truth_name)
    return InterventionCurves(counts, accuracy, truth_name, len(y), [int(s) for s in seeds], by)
