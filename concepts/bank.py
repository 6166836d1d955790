"""``ConceptBank``: named concept vectors in a backbone's embedding space, with their provenance.

Two kinds, two scoring rules (fixed here once, because papers differ and it changes everything
downstream):

- ``kind="text"``: unit text vectors ``t_k`` (the normalised mean of the prompt-template
  embeddings). ``scores(f)[n,k] = (f_n / ||f_n||) . t_k``, the cosine similarity between the
  image embedding and the concept text, in [-1, 1]. Intercepts are zero.
- ``kind="cav"``: a linear classifier ``(v_k, b_k)`` per concept. ``scores(f)[n,k] =
  (v_k . f_n + b_k) / ||v_k||``, the signed distance of the RAW feature to the hyperplane (the
  Post-hoc CBM margin); positive means "concept present".

Per-concept statistics (CAV train/validation accuracy, margin means, stds and quantiles of the
positive and negative examples) live in ``stats``: name -> float tensor [K].

On disk a bank is a folder ``PATH/`` holding ``bank.json`` (format version, names, kind,
backbone fingerprint, provenance) and ``vectors.safetensors`` (``vectors`` [K,D], ``intercepts``
[K] and ``stats.<name>`` [K]). Nothing is pickled; a malformed folder raises ``BankFormatError``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from concepts.text import validate_concept

FORMAT = "concepts.bank/1"
BANK_JSON = "bank.json"
VECTORS_FILE = "vectors.safetensors"
KINDS = ("text", "cav")
DEFAULT_TEMPLATES = ("{}", "a photo of {}", "a photo of something {}")


class TextEncoder(Protocol):
    """Anything that embeds texts; ``fingerprint`` (optional) names its embedding space."""

    def encode_texts(self, texts: list[str]) -> torch.Tensor: ...


class BankFormatError(ValueError):
    """A bank folder that is missing, malformed or inconsistent."""


class BackboneMismatchError(ValueError):
    """Features from another embedding space than the bank's."""


def real_tensor(value: Any, name: str) -> torch.Tensor:
    """``value`` as a float32 tensor of real numbers on its device (not yet checked for NaN), or a ValueError
    naming it."""
    if not isinstance(value, torch.Tensor):
        try:
            array = np.asarray(value)
        except ValueError:
            raise ValueError(f"{name} must be a numeric array of one shape, got nested sequences of different "
                             "lengths.") from None
        if array.dtype.kind not in "biufc":
            raise ValueError(f"{name} must be a numeric array, got {array.dtype} values.")
        value = torch.as_tensor(array)
    tensor = value
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"{name} must hold real numbers, got dtype {tensor.dtype}; convert it to float first.")
    return tensor.to(torch.float32)  # no detach: gradients flow through the models (TCAV)


FINITE_CHUNK = 2**22  # elements checked at a time by nonfinite_rows (a 4 MiB mask, whatever the data's size)


def nonfinite_rows(tensor: torch.Tensor) -> int:
    """How many rows (first-dimension slices) of ``tensor`` hold NaN or infinite values, checked a few rows at
    a time so that no mask the size of the data is made (a 0-d tensor is one row)."""
    if tensor.ndim == 0:
        return int(not torch.isfinite(tensor))
    rows = max(1, FINITE_CHUNK // max(tensor[:1].numel(), 1))
    bad = 0
    for part in tensor.split(rows):
        finite = torch.isfinite(part)
        if not finite.all():
            bad += int((~finite).reshape(len(part), -1).any(dim=1).sum())
    return bad


def repeated(names: Iterable[str]) -> list[str]:
    """The names that occur more than once, sorted (one pass: linear in the number of names)."""
    return sorted(name for name, count in Counter(names).items() if count > 1)


class NameIndex:
    """Positions of the unique names of a list, for constant-time lookups in long lists.

    The mapping is rebuilt whenever the list it was built from is replaced or changed (a found position
    is checked against the list), so it never answers for a list it does not reflect.
    """

    def __init__(self) -> None:
        self._names: list[str] | None = None
        self._positions: dict[str, int] = {}

    def find(self, names: list[str], name: str) -> int | None:
        """The position of ``name`` in ``names``, or None when it is absent."""
        position = self._positions.get(name) if self._names is names else None
        if position is None or position >= len(names) or names[position] != name:
            self._names, self._positions = names, {known: i for i, known in enumerate(names)}
            position = self._positions.get(name)
        return position


#: Separates an attribute from its value in grouped concept names ("has_bill_shape::dagger", CUB's form).
GROUP_SEPARATOR = "::"


def group_label(attribute: str) -> str:
    """A readable group name for an attribute: "has_bill_shape" -> "bill shape"."""
    words = attribute.strip().replace("_", " ").split()
    return " ".join(words[1:] if len(words) > 1 and words[0] == "has" else words)


def concept_groups(names: Sequence[str], groups: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """Groups of mutually exclusive concepts (the values of one categorical attribute), checked against
    ``names``: ``groups`` as given, or, when None, the attributes of names of the form "attribute::value"
    (CUB's attribute names; a group of at least two). A ValueError names an unknown concept, a concept in
    two groups, or a group name that is also a concept name."""
    known = set(names)
    if groups is None:
        derived: dict[str, list[str]] = {}
        for name in names:
            attribute, separator, value = name.partition(GROUP_SEPARATOR)
            if separator and attribute.strip() and value.strip():
                derived.setdefault(group_label(attribute), []).append(name)
        return {group: members for group, members in derived.items() if len(members) > 1}
    result, seen = {}, {}
    for group, members in groups.items():
        members = list(members)
        if not isinstance(group, str) or not group.strip() or group in known:
            raise ValueError(f"concept group names must be non-blank strings that are not concept names, got {group!r}.")
        unknown = [m for m in members if m not in known]
        if unknown or not members:
            raise ValueError(f"concept group {group!r} lists {unknown[:3] or 'no concepts'}, which are not concepts "
                             "of the model; give groups of its concept names.")
        twice = [m for m in members if m in seen]
        if twice:
            raise ValueError(f"concept {twice[0]!r} is in both groups {seen[twice[0]]!r} and {group!r}; a concept "
                             "belongs to one group.")
        seen.update(dict.fromkeys(members, group))
        result[group] = members
    return result


def encode_concepts(encoder: TextEncoder, names: Sequence[str],
                    templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """Unit text vectors [K,D]: each template embedding normalised, averaged, renormalised.

    All K x T prompts go through ``encoder.encode_texts`` in one call.
    """
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every prompt template must contain '{{}}', got {list(templates)!r}.")
    prompts = [template.format(name) for name in names for template in templates]
    embeddings = torch.as_tensor(encoder.encode_texts(prompts)).float()
    if embeddings.ndim != 2 or embeddings.shape[0] != len(prompts):
        raise ValueError(f"encode_texts returned shape {tuple(embeddings.shape)} for {len(prompts)} texts; "
                         "expected [texts, dim].")
    per_template = torch.nn.functional.normalize(embeddings, dim=-1).view(len(names), len(templates), -1)
    return torch.nn.functional.normalize(per_template.mean(dim=1), dim=-1)


def encoder_fingerprint(encoder: object) -> str | None:
    """The encoder's ``fingerprint`` attribute when it has one."""
    fingerprint = getattr(encoder, "fingerprint", None)
    return str(fingerprint) if fingerprint is not None else None


class ConceptBank:
    """Named concept vectors [K,D] with intercepts [K], a kind, a backbone fingerprint and provenance."""

    def __init__(self, names: Sequence[str], vectors: torch.Tensor, intercepts: torch.Tensor | None = None, *,
                 kind: Literal["text", "cav"] = "text", backbone: str | None = None,
                 provenance: Mapping[str, Any] | None = None,
                 stats: Mapping[str, torch.Tensor] | None = None) -> None:
        names = [validate_concept(name) for name in names]
        if not names:
            raise ValueError("a concept bank needs at least one concept; got an empty list.")
        duplicates = repeated(names)
        if duplicates:
            raise ValueError(f"concept names must be unique; repeated: {duplicates[:10]}.")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
        if backbone is not None and not isinstance(backbone, str):
            raise TypeError(f"backbone must be the fingerprint string of the embedding space or None, "
                            f"got {type(backbone).__name__}.")
        vectors = real_tensor(vectors, "vectors").cpu()
        if vectors.ndim != 2 or vectors.shape[0] != len(names):
            raise ValueError(f"vectors must be [K={len(names)}, D], got shape {tuple(vectors.shape)}.")
        if not torch.isfinite(vectors).all():
            raise ValueError("concept vectors contain NaN or infinite values.")
        norms = vectors.norm(dim=1)
        if (norms == 0).any():
            zero = [names[i] for i in torch.nonzero(norms == 0).flatten().tolist()]
            raise ValueError(f"concept vectors must be non-zero; zero for {zero[:10]}.")
        intercepts = torch.zeros(len(names)) if intercepts is None else real_tensor(intercepts, "intercepts").cpu().reshape(-1)
        if intercepts.shape[0] != len(names):
            raise ValueError(f"intercepts must be [K={len(names)}], got shape {tuple(intercepts.shape)}.")
        if not torch.isfinite(intercepts).all():
            raise ValueError("intercepts contain NaN or infinite values.")
        if kind == "text":
            if intercepts.abs().max() > 0:
                raise ValueError("text banks have zero intercepts.")
            if (norms - 1).abs().max() > 1e-6:  # keep already-unit vectors bit for bit (bundle round trips)
                vectors = torch.nn.functional.normalize(vectors, dim=1)
        self.names = names
        self._name_index = NameIndex()
        self.vectors = vectors
        self.intercepts = intercepts
        self.kind = kind
        self.backbone = backbone
        self.provenance: dict[str, Any] = copy.deepcopy(dict(provenance or {}))
        self.stats: dict[str, torch.Tensor] = {}
        for key, values in (stats or {}).items():
            values = real_tensor(values, f"stats[{key!r}]").cpu().reshape(-1)
            if values.shape[0] != len(names):
                raise ValueError(f"stats[{key!r}] must have one value per concept ({len(names)}), "
                                 f"got {values.shape[0]}.")
            self.stats[key] = values

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def from_text(cls, names: Sequence[str], encoder: TextEncoder, *,
                  templates: Sequence[str] = DEFAULT_TEMPLATES,
                  provenance: Mapping[str, Any] | None = None) -> ConceptBank:
        """A text bank: each concept is the normalised mean of its prompt-template embeddings."""
        names = [validate_concept(name) for name in names]
        if not names:
            raise ValueError("cannot build a text bank from an empty list of concepts.")
        vectors = encode_concepts(encoder, names, templates)
        record = {"kind": "text", "templates": list(templates),
                  "encoder": getattr(encoder, "spec", type(encoder).__name__)}
        return cls(names, vectors, kind="text", backbone=encoder_fingerprint(encoder),
                   provenance={**record, **dict(provenance or {})})

    # ----------------------------------------------------------------------------- basics

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        backbone = self.backbone[:12] if self.backbone else None
        return f"ConceptBank(kind={self.kind!r}, concepts={len(self)}, dim={self.dim}, backbone={backbone!r})"

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def index(self, name: str) -> int:
        """Position of a concept; a clear ``KeyError`` naming close matches otherwise."""
        if not isinstance(name, str):
            raise TypeError(f"concepts are named by strings, got {type(name).__name__} {name!r}.")
        position = self._name_index.find(self.names, name)
        if position is None:
            close = [n for n in self.names if name.lower() in n.lower() or n.lower() in name.lower()]
            raise KeyError(f"no concept {name!r} in this bank" + (f"; did you mean {close[:5]}?" if close else "."))
        return position

    # ----------------------------------------------------------------------------- scoring

    def check_features(self, features: torch.Tensor, backbone: str | None = None) -> torch.Tensor:
        """Validate that features [N,D] (N >= 1, finite) come from this bank's embedding space; return them as
        float32 on their device."""
        if backbone is not None and self.backbone is not None and backbone != self.backbone:
            raise BackboneMismatchError(
                f"these features come from backbone {backbone[:16]}... but the concept bank belongs to "
                f"{self.backbone[:16]}...; build or load a bank for that backbone.")
        features = real_tensor(features, "features")
        if features.ndim != 2 or len(features) == 0:
            raise ValueError(f"features must be [N,D] with N >= 1, got shape {tuple(features.shape)}.")
        if features.shape[1] != self.dim:
            raise BackboneMismatchError(
                f"features have dimension {features.shape[1]} but the concept bank has dimension {self.dim}; "
                "they come from another backbone.")
        if nonfinite_rows(features):
            raise ValueError("features contain NaN or infinite values; clean or drop those rows first.")
        return features

    def scores(self, features: torch.Tensor, backbone: str | None = None) -> torch.Tensor:
        """Concept activations [N,K] (cosine for text banks, hyperplane margin for CAV banks).

        Pass ``backbone=<fingerprint of the features>`` to have a mismatch refused.
        """
        features = self.check_features(features, backbone)
        vectors = self.vectors.to(features.device)
        if self.kind == "text":
            return torch.nn.functional.normalize(features, dim=1) @ vectors.T
        return (features @ vectors.T + self.intercepts.to(features.device)) / vectors.norm(dim=1)

    # ----------------------------------------------------------------------------- editing

    def subset(self, concepts: Sequence[str] | Sequence[int]) -> ConceptBank:
        """A bank with only these concepts (names or positions), in the order given."""
        indices = [c if isinstance(c, int) and not isinstance(c, bool) else self.index(c) for c in concepts]
        if not indices:
            raise ValueError("a subset must keep at least one concept.")
        outside = [i for i in indices if not 0 <= i < len(self)]
        if outside:
            raise ValueError(f"concept positions {outside[:5]} are outside 0..{len(self) - 1}.")
        return self._take(indices, {"op": "subset", "kept": len(indices)})

    def drop(self, names: Iterable[str]) -> ConceptBank:
        """A bank without these concepts (each must exist)."""
        dropped = {self.names[self.index(name)] for name in names}
        keep = [i for i, name in enumerate(self.names) if name not in dropped]
        if not keep:
            raise ValueError("dropping these concepts would leave an empty bank.")
        return self._take(keep, {"op": "drop", "dropped": sorted(dropped)})

    def rename(self, mapping: Mapping[str, str]) -> ConceptBank:
        """A bank with some concepts renamed (old -> new); names must stay unique."""
        for old in mapping:
            self.index(old)
        names = [mapping.get(name, name) for name in self.names]
        bank = ConceptBank(names, self.vectors, self.intercepts, kind=self.kind, backbone=self.backbone,
                           provenance=self.provenance, stats=self.stats)
        bank.provenance.setdefault("edits", []).append({"op": "rename", "mapping": dict(mapping)})
        return bank

    def _take(self, indices: list[int], edit: dict) -> ConceptBank:
        index = torch.tensor(indices, dtype=torch.long)
        bank = ConceptBank([self.names[i] for i in indices], self.vectors[index], self.intercepts[index],
                           kind=self.kind, backbone=self.backbone, provenance=self.provenance,
                           stats={k: v[index] for k, v in self.stats.items()})
        bank.provenance.setdefault("edits", []).append(edit)
        return bank

    @staticmethod
    def concatenate(banks: Sequence[ConceptBank]) -> ConceptBank:
        """One bank from several of the same kind, backbone and dimension (names must not repeat).

        Statistics missing from some banks are filled with NaN; provenances are kept in ``parts``.
        """
        if not banks:
            raise ValueError("nothing to concatenate: no banks given.")
        first = banks[0]
        for bank in banks[1:]:
            if bank.kind != first.kind:
                raise ValueError(f"cannot concatenate a {first.kind!r} bank with a {bank.kind!r} bank: "
                                 "their scores are on different scales.")
            if bank.dim != first.dim or (bank.backbone and first.backbone and bank.backbone != first.backbone):
                raise BackboneMismatchError("cannot concatenate banks of different backbones.")
        keys = sorted({key for bank in banks for key in bank.stats})
        stats = {key: torch.cat([bank.stats.get(key, torch.full((len(bank),), math.nan)) for bank in banks])
                 for key in keys}
        backbone = next((bank.backbone for bank in banks if bank.backbone), None)
        return ConceptBank([n for bank in banks for n in bank.names], torch.cat([b.vectors for b in banks]),
                           torch.cat([b.intercepts for b in banks]), kind=first.kind, backbone=backbone,
                           provenance={"op": "concatenate", "parts": [bank.provenance for bank in banks]},
                           stats=stats)

    # ----------------------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write the folder ``path`` (``bank.json`` + ``vectors.safetensors``), atomically per file."""
        manifest = {"format": FORMAT, "kind": self.kind, "backbone": self.backbone, "names": self.names,
                    "dim": self.dim, "stats": sorted(self.stats), "provenance": self.provenance}
        try:
            text = json.dumps(manifest, indent=1, ensure_ascii=False)
        except (TypeError, ValueError) as error:
            raise TypeError(f"the bank's provenance must hold only JSON values (str, numbers, lists, dicts) to be "
                            f"saved ({error}); convert the others first.") from None
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"vectors": self.vectors.contiguous(), "intercepts": self.intercepts.contiguous()}
        tensors.update({f"stats.{key}": value.contiguous() for key, value in self.stats.items()})
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".tmp", delete=False) as handle:
            tmp_vectors = handle.name
        save_file(tensors, tmp_vectors)
        os.replace(tmp_vectors, folder / VECTORS_FILE)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False, encoding="utf-8") as handle:
            handle.write(text)
        os.replace(handle.name, folder / BANK_JSON)
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConceptBank:
        """Read a bank folder written by ``save``; any defect raises ``BankFormatError`` (one sentence)."""
        folder = Path(path)
        if not (folder / BANK_JSON).is_file() or not (folder / VECTORS_FILE).is_file():
            raise BankFormatError(f"{folder} is not a concept bank folder (it needs {BANK_JSON} and {VECTORS_FILE}).")
        try:
            manifest = json.loads((folder / BANK_JSON).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BankFormatError(f"{folder / BANK_JSON} is not valid JSON ({error}).") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise BankFormatError(f"{folder / BANK_JSON} is not a {FORMAT} manifest (format: {found!r}).")
        try:
            tensors = load_file(str(folder / VECTORS_FILE))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise BankFormatError(f"{folder / VECTORS_FILE} is not a readable safetensors file ({error}).") from None
        missing = {"vectors", "intercepts"} - set(tensors)
        if missing:
            raise BankFormatError(f"{folder / VECTORS_FILE} lacks the tensors {sorted(missing)}.")
        names = manifest.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BankFormatError(f"{folder / BANK_JSON} has no list of concept names.")
        stats = {key[len("stats."):]: value for key, value in tensors.items() if key.startswith("stats.")}
        try:
            return cls(names, tensors["vectors"], tensors["intercepts"], kind=manifest.get("kind"),
                       backbone=manifest.get("backbone"), provenance=manifest.get("provenance") or {}, stats=stats)
        except (ValueError, TypeError) as error:
            raise BankFormatError(f"{folder} holds an inconsistent concept bank: {error}") from None
