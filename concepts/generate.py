"""Concept candidates per class, from an LLM, ConceptNet, attribute files, lists or a matrix.

Every generator returns ``Candidates``: class name -> concept phrases (a phrase may belong to
several classes, and all its classes are kept), plus a provenance record of how they were made
(source, prompts, model, thresholds, and every skip with its reason). The special class
``SHARED`` ("*") holds phrases that belong to no class in particular (a global list).

HTTP (LLM and ConceptNet) uses only ``urllib``: timeouts, retries with exponential backoff on
timeouts, connection errors, 429 and 5xx (honouring ``Retry-After``), a minimum interval
between requests, and an on-disk response cache so reruns are free and reproducible. API keys
are read from an environment variable at request time and never logged, cached or recorded.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from concepts.text import clean_concept, validate_concept

logger = logging.getLogger(__name__)

SHARED = "*"
CANDIDATES_FORMAT = "concepts.candidates/1"

# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


@dataclass
class Candidates:
    """Concept phrases per class, with provenance. ``per_class[SHARED]`` applies to every class."""

    per_class: dict[str, list[str]]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cleaned = {}
        for name, phrases in self.per_class.items():
            validate_concept(name)
            if isinstance(phrases, str) or not isinstance(phrases, Iterable):
                raise TypeError(f"concepts of class {name!r} must be a list of strings, got {type(phrases).__name__}.")
            cleaned[name] = list(dict.fromkeys(validate_concept(p).strip() for p in phrases))
        self.per_class = cleaned

    @property
    def class_names(self) -> list[str]:
        return [name for name in self.per_class if name != SHARED]

    def for_class(self, name: str) -> list[str]:
        """Candidates of one class, shared ones included."""
        return list(dict.fromkeys(self.per_class.get(name, []) + self.per_class.get(SHARED, [])))

    def concepts(self) -> list[str]:
        """Every distinct phrase, in first-seen order."""
        return list(dict.fromkeys(p for phrases in self.per_class.values() for p in phrases))

    def classes_of(self) -> dict[str, list[str]]:
        """Phrase -> every class that proposed it (``SHARED`` for global phrases)."""
        owners: dict[str, list[str]] = {}
        for name, phrases in self.per_class.items():
            for phrase in phrases:
                owners.setdefault(phrase, []).append(name)
        return owners

    def __len__(self) -> int:
        return len(self.concepts())

    def with_step(self, per_class: Mapping[str, list[str]], step: Mapping[str, Any]) -> Candidates:
        """New candidates with ``step`` appended to ``provenance["filters"]``."""
        provenance = copy.deepcopy(self.provenance)
        provenance.setdefault("filters", []).append(dict(step))
        return Candidates({k: list(v) for k, v in per_class.items()}, provenance)

    @staticmethod
    def merge(parts: Sequence[Candidates]) -> Candidates:
        """Union of several candidate sets (per class); provenances kept in ``sources``."""
        per_class: dict[str, list[str]] = {}
        for part in parts:
            for name, phrases in part.per_class.items():
                per_class.setdefault(name, []).extend(phrases)
        return Candidates(per_class, {"generator": "merge", "sources": [p.provenance for p in parts]})

    def save(self, path: str | os.PathLike) -> Path:
        """Write a JSON file: ``{"format", "classes": {class: [concepts]}, "provenance"}``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": CANDIDATES_FORMAT, "classes": self.per_class, "provenance": self.provenance}
        _atomic_write(path, json.dumps(payload, indent=1, ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Candidates:
        """Read a file written by ``save`` (a clear ``ValueError`` if it is something else)."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a JSON candidates file ({error}).") from None
        if not isinstance(payload, dict) or payload.get("format") != CANDIDATES_FORMAT:
            raise ValueError(f"{path} is not a {CANDIDATES_FORMAT} file.")
        return cls(payload["classes"], payload.get("provenance") or {})


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, encoding="utf-8") as handle:
        handle.write(text)
    os.replace(handle.name, path)


# --------------------------------------------------------------------------------------------
# HTTP with retries, rate limit and cache
# --------------------------------------------------------------------------------------------


class HTTPError(RuntimeError):
    """A request that failed for good (after retries, or with a status that retrying cannot fix)."""


RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class ResponseCache:
    """JSON responses on disk, one file per SHA-256 of the request's identifying fields."""

    def __init__(self, directory: str | os.PathLike | None) -> None:
        self.directory = Path(directory) if directory is not None else None

    def _path(self, key: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.directory / f"{digest}.json"

    def get(self, key: Mapping[str, Any]) -> Any | None:
        if self.directory is None or not self._path(key).is_file():
            return None
        try:
            entry = json.loads(self._path(key).read_text(encoding="utf-8"))
            return entry["response"] if entry.get("key") == key else None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            logger.warning("ignoring corrupt cache entry %s", self._path(key))
            return None

    def put(self, key: Mapping[str, Any], response: Any) -> None:
        if self.directory is not None:
            _atomic_write(self._path(key), json.dumps({"key": key, "response": response}, ensure_ascii=False))


def redact_url(url: str) -> str:
    """``url`` without its query and without user credentials (``user:key@``): fit for logs, errors and provenance."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=host, query="", fragment="").geturl()


class HTTPClient:
    """JSON over HTTP with a timeout, retries with exponential backoff and a minimum interval."""

    def __init__(self, *, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 min_interval: float = 0.0) -> None:
        self.timeout, self.retries, self.backoff, self.min_interval = timeout, retries, backoff, min_interval
        self._last = 0.0
        self._lock = threading.Lock()
        self.requests_sent = 0

    def _wait_turn(self) -> None:
        with self._lock:
            delay = self._last + self.min_interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._last = time.monotonic()

    def request_json(self, url: str, body: Mapping[str, Any] | None = None,
                     headers: Mapping[str, str] | None = None) -> Any:
        """GET (or POST ``body`` as JSON) and decode the JSON answer; raise ``HTTPError`` on failure."""
        data = json.dumps(body).encode() if body is not None else None
        request_headers = {"Accept": "application/json", **({"Content-Type": "application/json"} if data else {}),
                           **dict(headers or {})}
        where = redact_url(url)
        for attempt in range(self.retries + 1):
            self._wait_turn()
            self.requests_sent += 1
            retry_after = None
            try:
                request = urllib.request.Request(url, data=data, headers=request_headers)
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = response.read()
                try:
                    return json.loads(payload)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise HTTPError(f"{where} answered with something that is not JSON: {payload[:80]!r}.") from None
            except urllib.error.HTTPError as error:
                if error.code not in RETRYABLE_STATUS:
                    raise HTTPError(f"{where} answered HTTP {error.code} ({error.reason}).") from None
                problem = f"HTTP {error.code}"
                retry_after = error.headers.get("Retry-After") if error.headers else None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                reason = getattr(error, "reason", error)
                problem = "timed out" if isinstance(reason, TimeoutError) else f"failed ({reason})"
            if attempt == self.retries:
                raise HTTPError(f"{where} {problem}; gave up after {self.retries + 1} attempts.")
            delay = self.backoff * 2 ** attempt
            if retry_after and retry_after.strip().isdigit():
                delay = max(delay, float(retry_after))
            logger.warning("%s %s; retrying in %.1f s (attempt %d of %d)", where, problem, delay, attempt + 2,
                           self.retries + 1)
            time.sleep(delay)
        raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# LLM over an OpenAI-compatible chat-completions endpoint
# --------------------------------------------------------------------------------------------

PROMPT_SETS: dict[str, dict[str, str]] = {
    # Label-free CBM's three questions.
    "lfcbm": {
        "features": "List the most important visual features for recognizing something as a {cls}.",
        "superclasses": "List the superclasses (more general categories) of the word {cls}.",
        "around": "List the things most commonly seen around a {cls}.",
    },
    # LaBo's descriptive questions.
    "labo": {
        "looks": "Describe what a {cls} looks like.",
        "appearance": "Describe the appearance of a {cls}.",
        "colour": "Describe the colour of a {cls}.",
        "pattern": "Describe the pattern of a {cls}.",
        "shape": "Describe the shape of a {cls}.",
    },
}
LIST_INSTRUCTION = ("Answer with a numbered list of short noun phrases (one to four words each), "
                    "one per line, and nothing else.")

_ITEM = re.compile(r"^\s*(?:\(?\d{1,3}[.)\]:]|[-*•·+–—]|\(?[a-z][.)])\s+(.+?)\s*$", re.IGNORECASE)


class LLMReplyError(ValueError):
    """An LLM answer from which no list of concepts can be read."""


def parse_list(text: str) -> list[str]:
    """Items of a numbered or bulleted list (or of a one-line comma-separated list).

    Strips markdown emphasis, trailing explanations after ':' or ' - ', and surrounding
    punctuation. Raises ``LLMReplyError`` when the text holds no list.
    """
    if not isinstance(text, str):
        raise LLMReplyError(f"the reply is not text but {type(text).__name__}.")
    lines = [line for line in text.replace("\r", "").split("\n") if line.strip()]
    items = [m.group(1) for m in map(_ITEM.match, lines) if m]
    if not items and len(lines) == 1 and lines[0].count(",") >= 2:
        items = lines[0].split(",")
    phrases = []
    for item in items:
        item = re.sub(r"[*_`]+", "", item)
        item = re.split(r":\s| - | – | — |\(", item, maxsplit=1)[0]
        item = item.strip(" .;,!\"'")
        if item and len(item) <= 80:
            phrases.append(item)
    if not phrases:
        preview = text.strip().replace("\n", " ")[:80]
        raise LLMReplyError(f"the reply is not a list: {preview!r}.")
    return list(dict.fromkeys(phrases))


class ChatClient:
    """An OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, Ollama, vLLM, llama.cpp, ...).

    ``base_url`` is the API root (e.g. ``http://localhost:11434/v1``). The key is read from
    ``api_key_env`` at request time (none needed for most local servers). Replies are cached in
    ``cache_dir`` under (endpoint, model, prompt, temperature).
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 temperature: float = 0.0, max_tokens: int = 256, cache_dir: str | os.PathLike | None = None,
                 timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 requests_per_minute: float | None = None) -> None:
        self.endpoint = base_url.rstrip("/") + "/chat/completions"
        self.public_endpoint = redact_url(self.endpoint)  # what logs, errors, the cache and provenance see
        self.model, self.temperature, self.max_tokens = model, float(temperature), int(max_tokens)
        self.api_key_env = api_key_env
        self.cache = ResponseCache(cache_dir)
        self.http = HTTPClient(timeout=timeout, retries=retries, backoff=backoff,
                               min_interval=60.0 / requests_per_minute if requests_per_minute else 0.0)

    def describe(self) -> dict[str, Any]:
        """What to record in provenance (never the key)."""
        return {"endpoint": self.public_endpoint, "model": self.model, "temperature": self.temperature,
                "max_tokens": self.max_tokens}

    def complete(self, prompt: str) -> str:
        """The assistant's reply to one user message (from the cache when possible)."""
        key = {"endpoint": self.public_endpoint, "model": self.model, "prompt": prompt, "temperature": self.temperature}
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        headers = {}
        api_key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": self.temperature, "max_tokens": self.max_tokens}
        answer = self.http.request_json(self.endpoint, body, headers)
        try:
            content = answer["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise LLMReplyError(f"{self.public_endpoint} answered without choices[0].message.content: "
                                f"{json.dumps(answer)[:80]}.") from None
        if not isinstance(content, str):
            raise LLMReplyError(f"{self.public_endpoint} answered with non-text content {content!r:.80}.")
        self.cache.put(key, content)
        return content


def from_llm(class_names: Sequence[str], client: ChatClient, *, prompts: str | Mapping[str, str] = "lfcbm",
             on_error: Literal["raise", "skip"] = "raise", progress: bool = True) -> Candidates:
    """Ask the LLM each prompt (``{cls}`` = class name) for each class and parse the lists.

    ``prompts`` names a built-in set (``"lfcbm"``, ``"labo"``) or maps prompt names to templates.
    A failed request or unparsable reply raises, or with ``on_error="skip"`` is recorded in
    ``provenance["skipped"]`` with its reason.
    """
    if isinstance(prompts, str) and prompts not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompts!r}; built-in sets: {sorted(PROMPT_SETS)}.")
    templates = PROMPT_SETS[prompts] if isinstance(prompts, str) else dict(prompts)
    if not class_names or not templates or any("{cls}" not in t for t in templates.values()):
        raise ValueError("need at least one class and prompt templates that each contain '{cls}'.")
    per_class: dict[str, list[str]] = {name: [] for name in class_names}
    skipped = []
    jobs = [(name, key, template) for name in class_names for key, template in templates.items()]
    for name, key, template in tqdm(jobs, desc="LLM concepts", disable=not progress):
        prompt = f"{template.format(cls=name)} {LIST_INSTRUCTION}"
        try:
            per_class[name].extend(parse_list(client.complete(prompt)))
        except (HTTPError, LLMReplyError) as error:
            if on_error == "raise":
                raise type(error)(f"class {name!r}, prompt {key!r}: {error}") from None
            logger.warning("skipped class %r prompt %r: %s", name, key, error)
            skipped.append({"class": name, "prompt": key, "reason": str(error)})
    provenance = {"generator": "llm", **client.describe(), "prompts": templates, "instruction": LIST_INSTRUCTION,
                  "skipped": skipped}
    return Candidates(per_class, provenance)


# --------------------------------------------------------------------------------------------
# ConceptNet
# --------------------------------------------------------------------------------------------

CONCEPTNET_RELATIONS = ("HasA", "IsA", "PartOf", "HasProperty", "MadeOf", "AtLocation")
#: Post-hoc CBM's ConceptNet filter (``learn_concepts_multimodal.py``): IsA edges must weigh more
#: than 1; HasA, MadeOf, HasProperty and PartOf edges are all kept.
REFERENCE_WEIGHT_ABOVE: dict[str, float] = {"IsA": 1.0}


def _weight_thresholds(weight_above: float | Mapping[str, float] | None,
                       relations: Sequence[str]) -> dict[str, float | None]:
    """Per relation, the weight an edge must exceed (None: every edge is kept)."""
    if weight_above is None:
        return dict.fromkeys(relations)
    if isinstance(weight_above, Mapping):
        unknown = set(weight_above) - set(CONCEPTNET_RELATIONS)
        if unknown:
            raise ValueError(f"weight_above names unsupported ConceptNet relations {sorted(unknown)}; "
                             f"use {CONCEPTNET_RELATIONS}.")
        thresholds = {relation: weight_above.get(relation) for relation in relations}
    else:
        thresholds = dict.fromkeys(relations, weight_above)
    for relation, value in thresholds.items():
        if value is not None and not (isinstance(value, (int, float)) and np.isfinite(value)):
            raise ValueError(f"the weight threshold for {relation} must be a finite number, got {value!r}.")
    return {relation: None if value is None else float(value) for relation, value in thresholds.items()}


def from_conceptnet(class_names: Sequence[str], *, relations: Sequence[str] = CONCEPTNET_RELATIONS,
                    weight_above: float | Mapping[str, float] | None = REFERENCE_WEIGHT_ABOVE,
                    base_url: str = "https://api.conceptnet.io", limit: int = 200,
                    cache_dir: str | os.PathLike | None = None, http: HTTPClient | None = None,
                    on_error: Literal["raise", "skip"] = "raise", progress: bool = True) -> Candidates:
    """Neighbours of each class in ConceptNet over ``relations`` (at most ``limit`` edges per query).

    An edge is kept when its weight is strictly above ``weight_above``: one number for every
    relation, or relation -> number (relations not named keep every edge), or None (no weight
    filter). The default is Post-hoc CBM's filter, ``REFERENCE_WEIGHT_ABOVE``: IsA edges with
    weight > 1, every edge of the other relations. For PartOf the concept is the part (the edge's
    start, "wheel PartOf car"); for the other relations it is the edge's end ("car HasA wheel").
    English labels only. The provenance records the threshold used for each relation.
    """
    unknown = set(relations) - set(CONCEPTNET_RELATIONS)
    if unknown:
        raise ValueError(f"unsupported ConceptNet relations {sorted(unknown)}; use {CONCEPTNET_RELATIONS}.")
    thresholds = _weight_thresholds(weight_above, relations)
    http = http or HTTPClient(timeout=30.0, min_interval=1.0)
    cache = ResponseCache(cache_dir)
    per_class: dict[str, list[str]] = {name: [] for name in class_names}
    skipped = []
    for name in tqdm(class_names, desc="ConceptNet", disable=not progress):
        node = "/c/en/" + clean_concept(name).replace(" ", "_")
        for relation in relations:
            side = "end" if relation == "PartOf" else "start"
            query = urllib.parse.urlencode({side: node, "rel": f"/r/{relation}", "limit": limit})
            url = f"{base_url.rstrip('/')}/query?{query}"
            try:
                answer = cache.get({"url": url})
                if answer is None:
                    answer = http.request_json(url)
                    cache.put({"url": url}, answer)
                edges = answer["edges"]
            except (HTTPError, KeyError, TypeError) as error:
                reason = str(error) if isinstance(error, HTTPError) else "the answer has no 'edges' list"
                if on_error == "raise":
                    raise HTTPError(f"ConceptNet {relation} for {name!r}: {reason}") from None
                skipped.append({"class": name, "relation": relation, "reason": reason})
                continue
            other = "start" if relation == "PartOf" else "end"
            for edge in edges:
                target = edge.get(other) or {}
                above = thresholds[relation] is None or edge.get("weight", 0) > thresholds[relation]
                if above and target.get("language", "en") == "en" and target.get("label"):
                    per_class[name].append(target["label"])
    provenance = {"generator": "conceptnet", "base_url": base_url, "relations": list(relations),
                  "weight_above": thresholds, "limit": limit, "skipped": skipped}
    return Candidates(per_class, provenance)


# --------------------------------------------------------------------------------------------
# Class x concept matrices and attribute files
# --------------------------------------------------------------------------------------------


def from_class_concept_matrix(class_names: Sequence[str], concept_names: Sequence[str], matrix: Any,
                              threshold: float = 0.5, *, source: str = "class-concept matrix") -> Candidates:
    """Class c gets concept k when ``matrix[c, k] >= threshold`` (probabilities, percentages, 0/1)."""
    values = np.asarray(matrix, dtype=float)
    if values.shape != (len(class_names), len(concept_names)):
        raise ValueError(f"matrix must be [classes={len(class_names)}, concepts={len(concept_names)}], "
                         f"got {values.shape}.")
    per_class = {name: [concept_names[k] for k in np.flatnonzero(values[c] >= threshold)]
                 for c, name in enumerate(class_names)}
    empty = [name for name, phrases in per_class.items() if not phrases]
    if empty:
        logger.warning("%d classes get no concept at threshold %g: %s", len(empty), threshold, empty[:5])
    return Candidates(per_class, {"generator": source, "threshold": threshold, "classes_without_concepts": empty})


def _numbered_lines(path: Path) -> list[str]:
    """Names from lines such as ``12 has_bill_shape::dagger`` or ``3\\tantelope`` (the number dropped)."""
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            parts = line.strip().split(maxsplit=1)
            names.append(parts[1] if len(parts) == 2 and parts[0].isdigit() else line.strip())
    return names


def _matrix_file(path: Path) -> np.ndarray:
    try:
        return np.loadtxt(path, ndmin=2)
    except ValueError as error:
        raise ValueError(f"{path} is not a whitespace-separated numeric matrix ({error}).") from None


def cub_attribute_phrase(attribute: str) -> str:
    """``has_bill_shape::curved_(up_or_down)`` -> ``curved (up or down) bill shape``."""
    part, _, value = attribute.partition("::")
    part = re.sub(r"^has_", "", part).replace("_", " ")
    return f"{value.replace('_', ' ')} {part}".strip()


def _find(root: Path, candidates: Sequence[str]) -> Path:
    for relative in candidates:
        if (root / relative).is_file():
            return root / relative
    raise FileNotFoundError(f"none of {list(candidates)} exists under {root}.")


def from_cub(root: str | os.PathLike, threshold: float = 50.0) -> Candidates:
    """CUB-200-2011 attributes per class: continuous class-attribute percentages >= ``threshold``.

    ``root`` is the folder holding ``CUB_200_2011/`` (``attributes.txt`` may sit beside it, as in
    the archive, or inside ``CUB_200_2011/attributes/``).
    """
    root = Path(root)
    attributes = _find(root, ["attributes.txt", "CUB_200_2011/attributes/attributes.txt", "attributes/attributes.txt",
                              "../attributes.txt"])
    matrix = _find(root, ["CUB_200_2011/attributes/class_attribute_labels_continuous.txt",
                          "attributes/class_attribute_labels_continuous.txt"])
    classes = _find(root, ["CUB_200_2011/classes.txt", "classes.txt"])
    class_names = [re.sub(r"^\d+\.", "", name).replace("_", " ") for name in _numbered_lines(classes)]
    phrases = [cub_attribute_phrase(a) for a in _numbered_lines(attributes)]
    result = from_class_concept_matrix(class_names, phrases, _matrix_file(matrix), threshold, source="cub attributes")
    result.provenance["files"] = [str(attributes), str(matrix), str(classes)]
    return result


def from_awa(root: str | os.PathLike, *, binary: bool = True, threshold: float | None = None) -> Candidates:
    """Animals-with-Attributes predicates: ``classes.txt``, ``predicates.txt`` and
    ``predicate-matrix-binary.txt`` (or, with ``binary=False``, the continuous matrix thresholded
    at ``threshold``, default 50)."""
    root = Path(root)
    classes, predicates = _find(root, ["classes.txt"]), _find(root, ["predicates.txt"])
    name = "predicate-matrix-binary.txt" if binary else "predicate-matrix-continuous.txt"
    matrix = _find(root, [name])
    threshold = (0.5 if binary else 50.0) if threshold is None else threshold
    class_names = [c.replace("+", " ") for c in _numbered_lines(classes)]
    phrases = [p.replace("+", " ") for p in _numbered_lines(predicates)]
    result = from_class_concept_matrix(class_names, phrases, _matrix_file(matrix), threshold, source="awa predicates")
    result.provenance["files"] = [str(classes), str(predicates), str(matrix)]
    return result


def from_csv(path: str | os.PathLike, threshold: float = 0.5) -> Candidates:
    """A class x attribute CSV: header ``class,attr1,attr2,...``, one row per class, numeric cells."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if len(rows) < 2 or len(rows[0]) < 2:
        raise ValueError(f"{path} needs a header row (class, attributes...) and at least one class row.")
    header, body = rows[0], rows[1:]
    try:
        matrix = [[float(cell) for cell in row[1:]] for row in body]
    except ValueError as error:
        raise ValueError(f"{path} has a non-numeric attribute cell ({error}).") from None
    if any(len(row) != len(header) - 1 for row in matrix):
        raise ValueError(f"{path}: every row must have {len(header) - 1} attribute values.")
    result = from_class_concept_matrix([row[0] for row in body], header[1:], matrix, threshold, source="csv")
    result.provenance["files"] = [str(path)]
    return result


# --------------------------------------------------------------------------------------------
# Lists and starter banks
# --------------------------------------------------------------------------------------------


def from_list(source: str | os.PathLike | Sequence[str] | Mapping[str, Sequence[str]]) -> Candidates:
    """Concepts from a Python list/dict or a file: ``.txt`` (one per line, ``#`` comments),
    ``.json`` or ``.yaml``/``.yml`` holding a list (shared by all classes) or a class -> list map."""
    origin = "python"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        origin = str(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            try:
                source = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not valid JSON ({error}).") from None
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ImportError("reading YAML concept lists needs PyYAML: pip install pyyaml") from None
            try:
                source = yaml.safe_load(text)
            except yaml.YAMLError as error:
                raise ValueError(f"{path} is not valid YAML ({str(error).splitlines()[0]}).") from None
        else:
            source = [line.split("#", 1)[0].strip() for line in text.splitlines()]
            source = [line for line in source if line]
    if isinstance(source, Mapping):
        if isinstance(source.get("classes"), Mapping) and source.get("format") == CANDIDATES_FORMAT:
            source = source["classes"]
        per_class = {str(k): v for k, v in source.items()}
    elif isinstance(source, Sequence) and not isinstance(source, str):
        per_class = {SHARED: list(source)}
    else:
        raise ValueError(f"a concept list must be a list or a class -> list mapping, got {type(source).__name__}.")
    result = Candidates(per_class, {"generator": "list", "source": origin})
    if not len(result):
        raise ValueError(f"the concept list from {origin} is empty.")
    return result


STARTERS = ("cifar10", "cifar100")


def from_starter(name: str) -> Candidates:
    """A starter bank shipped with the package (``cifar10``, ``cifar100``): class -> concepts."""
    if name not in STARTERS:
        raise ValueError(f"unknown starter bank {name!r}; available: {STARTERS}.")
    text = resources.files("concepts").joinpath("starter", f"{name}.json").read_text(encoding="utf-8")
    result = from_list(json.loads(text))
    result.provenance = {"generator": "starter", "name": name}
    return result
