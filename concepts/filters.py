"""Candidate filters (the Label-free CBM steps), each optional and each recorded in provenance.

Every filter takes ``Candidates`` and returns new ``Candidates`` whose ``provenance["filters"]``
gains one entry: the filter's name, its parameters, and every phrase it removed or replaced with
the reason (a measured value where there is one). A filter that would leave no candidate at all
raises instead of returning an empty set; classes left without candidates are listed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from concepts.bank import ConceptBank, TextEncoder, encode_concepts
from concepts.generate import Candidates, check_number
from concepts.text import clean_concept, merge_plurals, phrase_key


def _apply(candidates: Candidates, removed: Mapping[str, str], replaced: Mapping[str, str],
           step: dict[str, Any]) -> Candidates:
    """Drop ``removed`` phrases, rename ``replaced`` ones (keeping every class association), record it."""
    per_class = {}
    for name, phrases in candidates.per_class.items():
        kept = [replaced.get(p, p) for p in phrases if p not in removed]
        per_class[name] = list(dict.fromkeys(kept))
    if not any(per_class.values()):
        raise ValueError(f"filter {step['filter']!r} removed every candidate ({len(removed)} phrases); "
                         "loosen its threshold.")
    step = {**step, "removed": [{"concept": p, "reason": r} for p, r in removed.items()],
            "replaced": [{"concept": p, "by": b} for p, b in replaced.items()],
            "classes_left_empty": [n for n, v in per_class.items() if not v and candidates.per_class[n]]}
    return candidates.with_step(per_class, step)


def clean(candidates: Candidates, *, merge_plural_forms: bool = True) -> Candidates:
    """Remove control characters (ANSI escapes, bidi overrides, zero-width, NUL), lowercase, trim, strip
    one leading article (whole word only) and merge plural/singular forms. A phrase with nothing left
    (only punctuation or control characters) is removed."""
    cleaned = {p: clean_concept(p) for p in candidates.concepts()}
    removed = {p: "nothing left after cleaning" for p, c in cleaned.items() if not c}
    cleaned = {p: c for p, c in cleaned.items() if c}
    replaced = {p: c for p, c in cleaned.items() if c != p}
    if merge_plural_forms:
        _, merged = merge_plurals(dict.fromkeys(cleaned.values()))
        replaced.update({p: merged.get(c, c) for p, c in cleaned.items() if merged.get(c, c) != p})
    return _apply(candidates, removed, replaced, {"filter": "clean", "merge_plurals": merge_plural_forms})


def remove_too_long(candidates: Candidates, max_chars: int | None = 30, max_words: int | None = None) -> Candidates:
    """Drop phrases longer than ``max_chars`` characters or ``max_words`` words (None: no limit)."""
    for value, name in ((max_chars, "max_chars"), (max_words, "max_words")):
        if value is not None:
            check_number(value, name, at_least=1, integer=True)
    removed = {}
    for phrase in candidates.concepts():
        if max_chars is not None and len(phrase) > max_chars:
            removed[phrase] = f"{len(phrase)} characters > {max_chars}"
        elif max_words is not None and len(phrase.split()) > max_words:
            removed[phrase] = f"{len(phrase.split())} words > {max_words}"
    return _apply(candidates, removed, {}, {"filter": "too_long", "max_chars": max_chars, "max_words": max_words})


def remove_class_names(candidates: Candidates, class_names: Sequence[str] | None = None, *,
                       match: Literal["exact", "contains"] = "exact", encoder: TextEncoder | None = None,
                       threshold: float = 0.85) -> Candidates:
    """Drop phrases that name a class.

    String test: after cleaning and singularising, the phrase equals a class name (``"exact"``)
    or contains it as whole words (``"contains"``). With an ``encoder``, also phrases whose text
    embedding has cosine >= ``threshold`` with a class name's.
    """
    check_number(threshold, "threshold")
    if match not in ("exact", "contains"):
        raise ValueError(f"match must be 'exact' or 'contains', got {match!r}.")
    class_names = list(class_names or candidates.class_names)
    if not class_names:
        raise ValueError("no class names to compare with: pass class_names.")
    keys = {phrase_key(name): name for name in class_names}
    pool = candidates.concepts()
    removed = {}
    for phrase in pool:
        key = phrase_key(phrase)
        hit = keys.get(key) if match == "exact" else next(
            (name for k, name in keys.items() if f" {k} " in f" {key} "), None)
        if hit is not None:
            removed[phrase] = f"names the class {hit!r}"
    if encoder is not None:
        rest = [p for p in pool if p not in removed]
        if rest:
            similarity = encode_concepts(encoder, rest, ("{}",)) @ encode_concepts(encoder, class_names, ("{}",)).T
            best, which = similarity.max(dim=1)
            for i in torch.nonzero(best >= threshold).flatten().tolist():
                removed[rest[i]] = f"text cosine {best[i]:.3f} >= {threshold} with class {class_names[which[i]]!r}"
    step = {"filter": "class_names", "match": match, "embedding_threshold": threshold if encoder else None}
    return _apply(candidates, removed, {}, step)


def remove_near_duplicates(candidates: Candidates, encoder: TextEncoder, threshold: float = 0.9) -> Candidates:
    """Keep one phrase of each group of near-duplicates (text cosine >= ``threshold``).

    Phrases are visited in first-seen order; one too close to an already kept phrase is replaced
    by it, so its classes are re-associated with the kept phrase rather than lost.
    """
    check_number(threshold, "threshold")
    pool = candidates.concepts()
    similarity = encode_concepts(encoder, pool, ("{}",)) @ encode_concepts(encoder, pool, ("{}",)).T
    kept: list[int] = []
    replaced = {}
    for i in range(len(pool)):
        if kept:
            best = int(torch.argmax(similarity[i, kept]))
            if similarity[i, kept[best]] >= threshold:
                replaced[pool[i]] = pool[kept[best]]
                continue
        kept.append(i)
    return _apply(candidates, {}, replaced, {"filter": "near_duplicates", "threshold": threshold})


def remove_absent(candidates: Candidates, encoder: TextEncoder, features: torch.Tensor, *, top_k: int = 5,
                  cutoff: float = 0.25, backbone: str | None = None,
                  templates: Sequence[str] = ("{}",)) -> Candidates:
    """Drop phrases that no training image shows: mean of the top-``top_k`` cosine similarities
    between the phrase and the (L2-normalised) training image embeddings below ``cutoff``."""
    check_number(top_k, "top_k", at_least=1, integer=True)
    check_number(cutoff, "cutoff")
    pool = candidates.concepts()
    bank = ConceptBank.from_text(pool, encoder, templates=templates)
    scores = bank.scores(features, backbone=backbone)
    k = min(top_k, scores.shape[0])
    if k < 1:
        raise ValueError("remove_absent needs at least one training embedding.")
    activation = scores.topk(k, dim=0).values.mean(0)
    removed = {pool[i]: f"mean top-{k} activation {activation[i]:.3f} < {cutoff}"
               for i in torch.nonzero(activation < cutoff).flatten().tolist()}
    step = {"filter": "absent", "top_k": top_k, "cutoff": cutoff, "templates": list(templates),
            "samples": int(scores.shape[0])}
    return _apply(candidates, removed, {}, step)

