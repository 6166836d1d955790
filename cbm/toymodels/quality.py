"""Quality of an embedding space on labelled data: zero-shot concepts, zero-shot classes, linear probe.

Everything here works on embeddings (tensors or arrays), never on model objects, so the
same numbers can be computed from any backbone loader:

- ``concept_auc``: ROC-AUC of cos(image, concept text embedding) against binary concept truth;
- ``zero_shot_accuracy``: accuracy of the nearest class-name text embedding;
- ``linear_probe``: logistic regression on image embeddings, C chosen on a validation split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

logger = logging.getLogger(__name__)

DEFAULT_CS = (0.01, 0.1, 1.0, 10.0)


def _array(x: Any) -> np.ndarray:
    """A float64 numpy copy of a tensor or array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_scores(image_embeddings: Any, text_embeddings: Any) -> np.ndarray:
    """Cosine similarity [N, K] between image embeddings [N, D] and text embeddings [K, D]."""
    return _normalise(_array(image_embeddings)) @ _normalise(_array(text_embeddings)).T


def concept_auc(
    image_embeddings: Any,
    concept_text_embeddings: Any,
    concept_labels: Any,
    concept_names: Sequence[str] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Zero-shot concept detection: ROC-AUC per concept of cos(image, concept text).

    ``concept_text_embeddings`` [K, D] (one row per concept, e.g. the mean of several prompt
    embeddings), ``concept_labels`` [N, K] binary truth. Concepts whose truth is constant in
    the data get NaN and are left out of the means. Returns ``mean``, ``per_concept`` and,
    with ``groups`` (group -> concept names), ``per_group`` means.
    """
    scores = cosine_scores(image_embeddings, concept_text_embeddings)
    truth = _array(concept_labels) > 0.5
    if scores.shape != truth.shape:
        raise ValueError(f"scores {scores.shape} and concept labels {truth.shape} disagree in shape.")
    names = list(concept_names) if concept_names is not None else [str(k) for k in range(truth.shape[1])]
    per_concept: dict[str, float] = {}
    for k, name in enumerate(names):
        column = truth[:, k]
        per_concept[name] = float(roc_auc_score(column, scores[:, k])) if 0 < column.sum() < len(column) else math.nan
    valid = [v for v in per_concept.values() if not math.isnan(v)]
    result: dict[str, Any] = {
        "mean": float(np.mean(valid)) if valid else math.nan,
        "min": float(np.min(valid)) if valid else math.nan,
        "per_concept": per_concept,
    }
    if groups is not None:
        per_group = {}
        for group, members in groups.items():
            values = [per_concept[m] for m in members if m in per_concept and not math.isnan(per_concept[m])]
            per_group[group] = float(np.mean(values)) if values else math.nan
        result["per_group"] = per_group
    return result


def zero_shot_accuracy(image_embeddings: Any, class_text_embeddings: Any, labels: Any) -> float:
    """Accuracy of predicting the class whose text embedding [C, D] is most similar to the image."""
    predictions = cosine_scores(image_embeddings, class_text_embeddings).argmax(axis=1)
    return float(np.mean(predictions == np.asarray(labels)))


def linear_probe(
    train_x: Any,
    train_y: Any,
    val_x: Any,
    val_y: Any,
    test_x: Any,
    test_y: Any,
    cs: Sequence[float] = DEFAULT_CS,
    max_iter: int = 300,
) -> dict[str, Any]:
    """Logistic regression on standardised embeddings; C chosen by validation accuracy.

    The Cs are fitted from the strongest regularisation up, each warm-started from the previous
    solution (several times faster than cold starts, the same choice of C). Returns ``accuracy``
    (test, of the chosen C), ``C``, ``val_accuracy`` and the validation accuracy of every C tried.
    """
    if not cs:
        raise ValueError("cs must not be empty.")
    train_y, val_y, test_y = (np.asarray(y) for y in (train_y, val_y, test_y))
    scaler = StandardScaler().fit(_array(train_x))
    train_x, val_x, test_x = (scaler.transform(_array(x)) for x in (train_x, val_x, test_x))
    model = LogisticRegression(max_iter=max_iter, tol=1e-3, warm_start=True)
    tried: dict[str, float] = {}
    best: tuple[float, float, float] | None = None
    for c in sorted(cs):
        model.set_params(C=c).fit(train_x, train_y)
        score = float(model.score(val_x, val_y))
        tried[str(c)] = score
        logger.debug("linear probe C=%s: val accuracy %.4f", c, score)
        if best is None or score > best[0]:
            best = (score, c, float(model.score(test_x, test_y)))
    val_accuracy, c, accuracy = best
    return {"accuracy": accuracy, "C": float(c), "val_accuracy": val_accuracy, "val_accuracy_per_C": tried}


def evaluate(
    *,
    train: tuple[Any, Any],
    val: tuple[Any, Any],
    test: tuple[Any, Any],
    test_concepts: Any | None = None,
    concept_text_embeddings: Any | None = None,
    concept_names: Sequence[str] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    class_text_embeddings: Any | None = None,
    cs: Sequence[float] = DEFAULT_CS,
) -> dict[str, Any]:
    """All quality numbers of one embedding space.

    ``train``/``val``/``test`` are (embeddings, labels) pairs for the linear probe. Zero-shot
    concept AUC needs ``test_concepts`` and ``concept_text_embeddings``; zero-shot class
    accuracy needs ``class_text_embeddings`` (vision-language backbones only).
    """
    out: dict[str, Any] = {"linear_probe": linear_probe(*train, *val, *test, cs=cs)}
    if concept_text_embeddings is not None and test_concepts is not None:
        out["concept_auc"] = concept_auc(test[0], concept_text_embeddings, test_concepts, concept_names, groups)
    if class_text_embeddings is not None:
        out["zero_shot_accuracy"] = zero_shot_accuracy(test[0], class_text_embeddings, test[1])
    return out


def format_report(name: str, metrics: Mapping[str, Any]) -> str:
    """A short plain-text table of ``evaluate`` output."""
    lines = [f"== {name}"]
    probe = metrics.get("linear_probe")
    if probe:
        lines.append(f"linear probe accuracy (test)      {probe['accuracy']:.4f}  (C={probe['C']:g})")
    if "zero_shot_accuracy" in metrics:
        lines.append(f"zero-shot class accuracy (test)   {metrics['zero_shot_accuracy']:.4f}")
    auc = metrics.get("concept_auc")
    if auc:
        lines.append(f"zero-shot concept ROC-AUC mean    {auc['mean']:.4f}  (min {auc['min']:.4f})")
        for group, value in auc.get("per_group", {}).items():
            lines.append(f"  group {group:<12s}              {value:.4f}")
        for concept, value in auc["per_concept"].items():
            lines.append(f"    {concept:<28s}    {value:.4f}")
    return "\n".join(lines)


__all__ = ["concept_auc", "cosine_scores", "evaluate", "format_report", "linear_probe", "zero_shot_accuracy"]
