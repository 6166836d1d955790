"""Concept selection (LaBo): per-class submodular selection, plus top-k and random baselines.

For each class y the K concepts are chosen among that class's OWN candidates to maximise

    F(S) = sum_{c in S} d(c)  +  beta / |V| * sum_{v in V} max_{c in S} s(v, c)

- ``d(c)`` (discriminability) is, as in LaBo's released code (``select_algo.mi_score``), concept
  c's contribution to the mutual information between concepts and classes,
  ``sum_y p(c, y) log(p(c, y) / (p(c) p(y)))``. With ``m(c, y)`` the mean cosine similarity
  between c's text vector and the training images of class y, ``p(c, y) = (1 + m(c, y)) /
  (C sum_c' (1 + m(c', y)))`` over ALL candidates c', so p(y) = 1/C (the reference uses raw CLIP
  dot products, which it relies on being positive; ``1 + m`` is the cosine made non-negative).
  Normalising per class cancels how strongly a class's images respond to text in general, so
  phrases that describe nothing in the data score near zero whatever class they resemble. The score
  equals ``p(c) KL(p(y|c) || uniform) >= 0``; it does not depend on the class being selected for.
  It is divided by its largest value among the class's candidates (so each concept adds at most
  1), and the coverage term is a mean over V (so all of S adds at most ``beta``): coverage breaks
  near-ties between discriminative concepts towards diverse ones, whatever the backbone's
  similarity scale. (The reference weights ``1e7 * MI`` against an unnormalised sum, so its beta
  values are on another scale.)
- the second term is facility location over the class's candidates V with ``s`` the clipped
  (>= 0) cosine similarity of concept text vectors: it rewards covering every kind of
  candidate rather than many paraphrases of one.

F is monotone submodular (modular + facility location), so greedy selection is within
(1 - 1/e) of the optimum; ``greedy`` evaluates lazily (stale upper bounds in a heap).
A concept proposed by several classes stays associated with all of them (``associations`` in
the bank's provenance), and ``class_concepts`` records class -> selected concepts.

Candidate files written elsewhere (LaBo's ``class2concepts.json``: 'black footed albatross',
'aquarium fish') name classes their own way: ``match_class_names`` maps them onto the data's
class names after normalising case, spaces and underscores, and lists any that still do not match.
"""

from __future__ import annotations

import heapq
import logging
import math
import numbers
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from concepts.bank import DEFAULT_TEMPLATES, ConceptBank, TextEncoder, real_tensor
from concepts.generate import SHARED, Candidates

logger = logging.getLogger(__name__)

Method = Literal["submodular", "top", "random"]


def normalise_class_name(name: str) -> str:
    """Case-, space- and underscore-insensitive key of a class name ('Black_footed  Albatross' ->
    'black footed albatross')."""
    return " ".join(name.replace("_", " ").split()).casefold()


def match_class_names(names: Sequence[str], class_names: Sequence[str], what: str = "candidates", *,
                      strict: bool = True) -> dict[str, str]:
    """``name -> data class name`` for each of ``names``: exact, else equal after ``normalise_class_name``.

    Names matching no class (or several after normalising) raise one ValueError that lists them; with
    ``strict=False`` they are left out of the result instead."""
    by_key: dict[str, list[str]] = {}
    for name in class_names:
        by_key.setdefault(normalise_class_name(name), []).append(name)
    matched, unmatched = {}, []
    for name in names:
        options = [name] if name in class_names else by_key.get(normalise_class_name(name), [])
        if len(options) == 1:
            matched[name] = options[0]
        else:
            unmatched.append(name)
    if unmatched and strict:
        raise ValueError(f"{what} name {len(unmatched)} classes that match no class of the data even ignoring case, "
                         f"spaces and underscores: {unmatched[:20]} (data classes: {list(class_names)[:10]}"
                         f"{' ...' if len(class_names) > 10 else ''}).")
    return matched


def class_means(scores: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean concept score per class [C,K]; labels outside 0..C-1 or a class without samples raise."""
    labels = real_tensor(labels, "labels")
    if labels.shape != (len(scores),) or not torch.equal(labels, labels.round()):
        raise ValueError(f"labels must be {len(scores)} integer class indices, one per feature row, got shape "
                         f"{tuple(labels.shape)}{'' if torch.equal(labels, labels.round()) else ' with fractional values'}.")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must index the {n_classes} classes (0..{n_classes - 1}), got values from "
                         f"{int(labels.min())} to {int(labels.max())}.")
    labels = labels.long().to(scores.device)
    counts = torch.bincount(labels, minlength=n_classes)[:n_classes]
    if (counts == 0).any():
        missing = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"classes {missing[:10]} have no training sample; selection needs images of every class.")
    sums = torch.zeros(n_classes, scores.shape[1]).index_add_(0, labels, scores.float())
    return sums / counts[:, None]


def discriminability(means: torch.Tensor) -> torch.Tensor:
    """Each concept's contribution to I(concept; class) [K] from class means [C,K] of cosine similarity.

    ``p(c, y)`` is ``1 + means`` normalised per class over the concepts (p(y) uniform).
    """
    n_classes = means.shape[0]
    positive = (1 + means.double()).clamp(min=0)  # cosines are >= -1; clamp rounding below it
    joint = positive / (n_classes * positive.sum(dim=1, keepdim=True))
    marginal = joint.sum(dim=0, keepdim=True)
    return torch.xlogy(joint, n_classes * joint / marginal.clamp(min=1e-300)).sum(dim=0)


class SelectionObjective:
    """``F(S) = sum_{c in S} gains[c] + weight * sum_v max_{c in S} similarity[v, c]`` (similarity >= 0)."""

    def __init__(self, gains: torch.Tensor, similarity: torch.Tensor, weight: float) -> None:
        self.gains = torch.as_tensor(gains, dtype=torch.float64)
        self.similarity = torch.as_tensor(similarity, dtype=torch.float64).clamp(min=0)
        self.weight = float(weight)
        if not (torch.isfinite(self.gains).all() and torch.isfinite(self.similarity).all() and math.isfinite(self.weight)):
            raise ValueError("the selection objective has NaN or infinite gains, similarities or weight; check the "
                             "features, the temperature and beta.")

    def value(self, subset: Sequence[int]) -> float:
        if not subset:
            return 0.0
        index = torch.as_tensor(list(subset))
        cover = self.similarity[:, index].max(dim=1).values.sum()
        return float(self.gains[index].sum() + self.weight * cover)

    def gain(self, cover: torch.Tensor, c: int) -> float:
        """Marginal gain of adding c given the current best cover of every element."""
        return float(self.gains[c] + self.weight * (self.similarity[:, c] - cover).clamp(min=0).sum())


def greedy(objective: SelectionObjective, k: int) -> list[int]:
    """Lazy greedy maximisation of a monotone submodular objective: k indices in selection order."""
    n = objective.gains.shape[0]
    cover = torch.zeros(n, dtype=torch.float64)
    heap = [(-objective.gain(cover, c), c) for c in range(n)]
    heapq.heapify(heap)
    chosen: list[int] = []
    while heap and len(chosen) < k:
        _, c = heapq.heappop(heap)
        fresh = objective.gain(cover, c)
        if not heap or fresh >= -heap[0][0] - 1e-12:  # still the best: bounds only shrink
            chosen.append(c)
            cover = torch.maximum(cover, objective.similarity[:, c])
        else:
            heapq.heappush(heap, (-fresh, c))
    return chosen


def select_concepts(candidates: Candidates, encoder: TextEncoder, features: torch.Tensor, labels: torch.Tensor,
                    class_names: Sequence[str] | None = None, *, k: int = 10, method: Method = "submodular",
                    beta: float = 1.0, seed: int = 0,
                    templates: Sequence[str] = DEFAULT_TEMPLATES, backbone: str | None = None) -> ConceptBank:
    """Choose ``k`` concepts per class from ``candidates`` using training embeddings; a text bank.

    ``labels`` index ``class_names`` (default: the candidates' classes); the candidates' class names are
    matched to them by ``match_class_names``. Classes with ``k`` or
    fewer candidates keep them all (recorded). The bank's provenance holds ``class_concepts``
    (class -> selected concepts), ``associations`` (concept -> every class that proposed it) and
    the selection parameters, with the number of training samples it saw.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an integer of at least 1, got {k!r}.")
    if not 0 <= beta < math.inf:
        raise ValueError(f"beta must be a non-negative finite number, got {beta!r}.")
    if method not in ("submodular", "top", "random"):
        raise ValueError(f"method must be 'submodular', 'top' or 'random', got {method!r}.")
    class_names = list(class_names or candidates.class_names)
    renamed = match_class_names(candidates.class_names, class_names)
    if any(old != new for old, new in renamed.items()):
        per_class: dict[str, list[str]] = {}
        for name, phrases in candidates.per_class.items():
            per_class.setdefault(renamed.get(name, name), []).extend(phrases)
        candidates = Candidates(per_class, {**candidates.provenance,
                                            "renamed_classes": {o: n for o, n in renamed.items() if o != n}})
    pool = candidates.concepts()
    if not pool:
        raise ValueError("no candidates to select from.")
    full = ConceptBank.from_text(pool, encoder, templates=templates)
    means = class_means(full.scores(features, backbone=backbone), labels, len(class_names))
    scores = discriminability(means)
    text_similarity = full.vectors @ full.vectors.T
    position = {phrase: i for i, phrase in enumerate(pool)}
    rng = np.random.default_rng(seed)
    chosen: dict[str, list[str]] = {}
    short = []
    for name in class_names:
        own = [position[p] for p in candidates.for_class(name)]
        if not own:
            continue
        if len(own) <= k:
            picked = own
            short.append(name)
        elif method == "random":
            picked = rng.choice(own, size=k, replace=False).tolist()
        else:
            gains = scores[own]
            gains = gains / gains.max().clamp(min=1e-300)
            if method == "top":
                picked = [own[i] for i in torch.argsort(gains, descending=True, stable=True)[:k].tolist()]
            else:
                objective = SelectionObjective(gains, text_similarity[own][:, own], beta / len(own))
                picked = [own[i] for i in greedy(objective, k)]
        chosen[name] = [pool[i] for i in picked]
    if short:
        logger.info("%d classes have at most k=%d candidates and keep them all: %s", len(short), k, short[:5])
    names = list(dict.fromkeys(p for picked in chosen.values() for p in picked))
    owners = candidates.classes_of()
    associations = {p: [c for c in owners[p] if c != SHARED] or list(class_names) for p in names}
    bank = full.subset(names)
    bank.provenance = {**full.provenance, "candidates": candidates.provenance,
                       "selection": {"method": method, "k": k, "beta": beta, "seed": seed,
                                     "classes_with_at_most_k": short, "samples": len(labels)},
                       "class_concepts": chosen, "associations": associations}
    return bank
