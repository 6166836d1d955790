"""Model-agnostic evaluation: accuracy, concept quality, sparsity, completeness, leakage, stability.

- ``classification``: accuracy, balanced accuracy, per-class accuracy and the confusion matrix.
- ``concept_quality``: ROC-AUC and accuracy of each concept activation against concept labels
  (accuracy thresholds at the midpoint of the concept's "low" and "high" values).
- ``effective_concepts``: how many concepts carry 90% of a class's mean absolute contribution.
- ``completeness``: (CBM accuracy - chance) / (black-box probe accuracy - chance), where the probe
  is a softmax regression on the embeddings (Yeh et al. 2020's normalisation).
- ``leakage``: accuracy of a probe on the soft concept activations minus one on their binarised
  values: class information that flows through the activations' magnitudes, not the concepts.
- ``stability``: agreement of models fitted with different seeds (accuracy spread, rank
  correlation of their importance matrices, overlap of their top concepts per class).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from cbm.models.base import ConceptBottleneckModel
from cbm.models.solvers import elastic_net_softmax
from explain.core import DataLike, EvalData, ModelView, concept_bounds
from explain.explanations import Importance, global_importance, view_of

logger = logging.getLogger(__name__)


def classification(view: ModelView) -> dict[str, Any]:
    """Accuracy, balanced accuracy, per-class accuracy and confusion matrix (rows: true class)."""
    y, predicted = view.labels("classification metrics"), view.predictions
    n_classes = len(view.class_names)
    confusion = torch.bincount(y * n_classes + predicted, minlength=n_classes * n_classes).reshape(n_classes, -1)
    support = confusion.sum(dim=1)
    per_class = confusion.diagonal().float() / support.clamp_min(1)
    present = support > 0
    return {"accuracy": float((predicted == y).float().mean()),
            "balanced_accuracy": float(per_class[present].mean()),
            "per_class_accuracy": {name: float(per_class[i]) if present[i] else None
                                   for i, name in enumerate(view.class_names)},
            "confusion": confusion.tolist(), "samples": len(y)}


def concept_quality(view: ModelView) -> dict[str, Any]:
    """Per concept: activation mean and spread; with concept labels also ROC-AUC and accuracy."""
    low, high = concept_bounds(view)
    activations = view.concepts
    truth = view.data.concept_truth(view.concept_names)
    rows = []
    for k, name in enumerate(view.concept_names):
        row: dict[str, Any] = {"concept": name, "mean": float(activations[:, k].mean()),
                               "std": float(activations[:, k].std()), "low": float(low[k]), "high": float(high[k])}
        if truth is not None:
            labels = truth[:, k].numpy() > 0.5
            scores = activations[:, k].numpy() * (1.0 if high[k] >= low[k] else -1.0)
            row["positives"] = float(labels.mean())
            row["auc"] = float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else None
            predicted = (activations[:, k] > (low[k] + high[k]) / 2).numpy() == bool(high[k] >= low[k])
            row["accuracy"] = float((predicted == labels).mean())
        rows.append(row)
    aucs = [row["auc"] for row in rows if row.get("auc") is not None]
    return {"labelled": truth is not None, "concepts": rows,
            "mean_auc": float(np.mean(aucs)) if aucs else None,
            "mean_accuracy": float(np.mean([row["accuracy"] for row in rows])) if truth is not None else None}


def effective_concepts(importance: Importance, mass: float = 0.9) -> dict[str, int]:
    """Per class, the fewest concepts whose mean absolute contributions reach ``mass`` of the total."""
    result = {}
    for name, row in zip(importance.class_names, importance.magnitude):
        total = float(row.sum())
        if total <= 0:
            result[name] = 0
            continue
        cumulative = row.sort(descending=True).values.cumsum(0) / total
        result[name] = int((cumulative < mass - 1e-9).sum()) + 1
    return result


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   n_classes: int, lam: float = 1e-4) -> float:
    """Test accuracy of a standardised, lightly L2-regularised softmax regression fitted on train."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    solution = elastic_net_softmax((train_x - mean) / std, train_y, n_classes, lam, l1_ratio=0.0, max_iter=300,
                                   tol=1e-5)
    logits = ((test_x - mean) / std) @ solution.weight.T + solution.bias
    return float((logits.argmax(dim=1) == test_y).float().mean())


def _fit_and_test(train: torch.Tensor | None, train_y: torch.Tensor | None, test: torch.Tensor,
                  test_y: torch.Tensor, n_classes: int) -> float:
    """Probe accuracy on test; without a train split, the mean of a seeded two-fold cross-fit on test."""
    if train is not None:
        return probe_accuracy(train, train_y, test, test_y, n_classes)
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    a, b = order[: len(order) // 2], order[len(order) // 2:]
    return (probe_accuracy(test[a], test_y[a], test[b], test_y[b], n_classes)
            + probe_accuracy(test[b], test_y[b], test[a], test_y[a], n_classes)) / 2


def completeness(view: ModelView, train: ModelView | None = None) -> dict[str, float]:
    """How much of a black-box linear probe's accuracy (over chance) the model's concepts carry."""
    y, n_classes = view.labels("completeness"), len(view.class_names)
    probe = _fit_and_test(None if train is None else train.data.features, None if train is None else train.labels("completeness (training split)"),
                          view.data.features, y, n_classes)
    chance = float(torch.bincount(y, minlength=n_classes).max()) / len(y)
    accuracy = float((view.predictions == y).float().mean())
    score = (accuracy - chance) / (probe - chance) if probe > chance else float("nan")
    return {"probe_accuracy": probe, "chance": chance, "completeness": score}


def leakage(view: ModelView, train: ModelView | None = None) -> dict[str, float]:
    """Probe accuracy on soft concept activations minus on their binarised values (> 0: leakage)."""
    low, high = concept_bounds(view)
    middle, sign = (low + high) / 2, torch.where(high >= low, 1.0, -1.0)

    def hard(v: ModelView) -> torch.Tensor:
        return ((v.concepts - middle) * sign > 0).float()

    n_classes = len(view.class_names)
    y, train_y = view.labels("leakage"), None if train is None else train.labels("leakage (training split)")
    soft = _fit_and_test(None if train is None else train.concepts, train_y, view.concepts, y, n_classes)
    binary = _fit_and_test(None if train is None else hard(train), train_y, hard(view), y, n_classes)
    return {"soft_probe_accuracy": soft, "hard_probe_accuracy": binary, "leakage": soft - binary}


def stability(models: Sequence[ConceptBottleneckModel], data: DataLike | EvalData, k: int = 5) -> dict[str, float]:
    """Agreement of several models of the same concepts and classes (e.g. fitted with different seeds)."""
    if len(models) < 2:
        raise ValueError("stability needs at least two models.")
    views = [view_of(model, data) for model in models]
    if any(v.concept_names != views[0].concept_names or v.class_names != views[0].class_names for v in views):
        raise ValueError("stability compares models with the same concepts and classes.")
    accuracies = [float((v.predictions == v.labels("stability")).float().mean()) for v in views]
    importances = [global_importance(v) for v in views]
    correlations, overlaps = [], []
    for a, b in combinations(importances, 2):
        correlations.append(float(spearmanr(a.values.flatten(), b.values.flatten()).statistic))
        for top_a, top_b in zip(a.top(k).values(), b.top(k).values()):
            names_a, names_b = {c for c, _ in top_a}, {c for c, _ in top_b}
            overlaps.append(len(names_a & names_b) / max(len(names_a | names_b), 1))
    return {"models": len(models), "accuracy_mean": float(np.mean(accuracies)),
            "accuracy_std": float(np.std(accuracies, ddof=1)), "importance_spearman": float(np.mean(correlations)),
            "top_concept_overlap": float(np.mean(overlaps))}


def ablation_drop(view: ModelView, values: torch.Tensor) -> np.ndarray:
    """Accuracy lost [K] when each concept alone is replaced by ``values`` [K] (e.g. its mean): how
    much the predictions rely on it."""
    y = view.labels("ablation")
    base = (view.predictions == y).float().mean()
    correct = torch.zeros(view.concepts.shape[1])
    per_chunk = max(1, 4_000_000 // (view.concepts.shape[1] * len(view.class_names)))  # [n, K, C] stays ~16 MB
    for rows in torch.arange(len(y)).split(per_chunk):
        current = view.concepts[rows]
        logits = view.single_change_logits(rows, current, values.expand_as(current))  # [n, K, C]
        correct += (logits.argmax(dim=2) == y[rows, None]).float().sum(0)
    return (base - correct / len(y)).numpy()


def plausibility_lift(probabilities: Any) -> np.ndarray:
    """P(concept | class) [C, K] minus its mean over classes: > 0 where a concept is typical of a class."""
    p = np.asarray(probabilities, dtype=np.float64)
    return p - p.mean(axis=0, keepdims=True)


def class_concept_rates(view: ModelView) -> np.ndarray | None:
    """P(concept | class) [C, K] estimated from the data's concept labels (None without them)."""
    truth = view.data.concept_truth(view.concept_names)
    if truth is None or view.data.labels is None:
        return None
    n_classes = len(view.class_names)
    sums = torch.zeros(n_classes, truth.shape[1]).index_add_(0, view.data.labels, truth)
    counts = torch.bincount(view.data.labels, minlength=n_classes).clamp_min(1)[:, None]
    return (sums / counts).numpy()


def suspect_concepts(effects: torch.Tensor, class_names: Sequence[str], concept_names: Sequence[str], *,
                     plausibility: Any = None, drop_in: np.ndarray | None = None, drop_shift: np.ndarray | None = None,
                     lift_below: float = 0.1, top: int = 10) -> list[dict[str, Any]]:
    """Concepts a reviewer should look at, most suspect first.

    Two criteria, each scaled to [0, 1] by its largest value and summed:
    ``implausible weight``: the largest share of a class's total concept effect (``effects`` [C, K],
    see :func:`explain.explanations.concept_effects`) that the concept carries towards a class
    where it is not typical (plausibility lift below ``lift_below``, from ``plausibility`` =
    P(concept | class) [C, K]); ``shift gap``: accuracy lost by ablating it in distribution
    (``drop_in``) minus on the shifted split (``drop_shift``).
    """
    effects = torch.as_tensor(effects, dtype=torch.float32)
    share = (effects / effects.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)).clamp_min(0).numpy()
    criteria: dict[str, np.ndarray] = {}
    lift = None
    if plausibility is not None:
        lift = plausibility_lift(plausibility)
        weighted = share * (lift < lift_below)
        criteria["implausible_weight"] = weighted.max(axis=0)
        worst_class = weighted.argmax(axis=0)
    if drop_in is not None and drop_shift is not None:
        criteria["shift_gap"] = np.maximum(np.asarray(drop_in) - np.asarray(drop_shift), 0.0)
    if not criteria:
        return []
    score = sum(values / values.max() if values.max() > 0 else values for values in criteria.values())
    rows = []
    for k in np.argsort(-score, kind="stable")[:top]:
        if score[k] <= 0:
            break
        row: dict[str, Any] = {"concept": concept_names[k], "score": float(score[k])}
        reasons = []
        if "implausible_weight" in criteria and criteria["implausible_weight"][k] > 0:
            c = int(worst_class[k])
            row.update({"class": class_names[c], "effect_share": float(share[c, k]),
                        "plausibility_lift": float(lift[c, k])})
            reasons.append("heavy weight for a class it is not typical of")
        if "shift_gap" in criteria:
            row.update({"drop_in_distribution": float(drop_in[k]), "drop_shifted": float(drop_shift[k])})
            if criteria["shift_gap"][k] > 0:
                reasons.append("removing it costs accuracy in distribution, not on the shifted split")
        row["reasons"] = reasons
        rows.append(row)
    return rows
