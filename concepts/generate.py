"""Concept candidates per class, from an LLM, ConceptNet, attribute files, lists or a matrix.

Every generator returns ``Candidates``: class name -> concept phrases (a phrase may belong to
several classes, and all its classes are kept), plus a provenance record of how they were made
(source, prompts, model, thresholds, and every skip with its reason). The special class
``SHARED`` ("*") holds phrases that belong to no class in particular (a global list).

HTTP (LLM and ConceptNet) uses only ``urllib``: one deadline per request (connect, headers and
body together, so a server that drips bytes cannot hold a request open), a cap on reply bytes,
redirects followed only within the same scheme, host and port (so headers such as the API key never
reach another server), retries with exponential backoff on timeouts, connection errors, 429 and 5xx
(honouring ``Retry-After`` up to ``MAX_RETRY_AFTER``), a minimum interval between requests, and an
on-disk response cache so reruns are free and reproducible. API keys are read from an environment
variable at request time and never logged, cached or recorded.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import http.client
import io
import json
import logging
import math
import numbers
import os
import re
import socket
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


def check_number(value: Any, name: str, *, above: float | None = None, at_least: float | None = None,
                 integer: bool = False) -> Any:
    """``value`` if it is a finite number (a whole one with ``integer``) within the bound, else a
    one-sentence ``ValueError`` naming ``name``: NaN, inf and negative counts are refused up front rather
    than misbehaving later (a NaN timeout never times out, -1 retries sends nothing)."""
    kind = numbers.Integral if integer else numbers.Real
    valid = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    valid = valid and (above is None or value > above) and (at_least is None or value >= at_least)
    if not valid:
        what = "a whole number" if integer else "a finite number"
        bound = (f" above {above:g}" if above is not None else
                 f" of at least {at_least:g}" if at_least is not None else "")
        raise ValueError(f"{name} must be {what}{bound}, got {value!r}.")
    return value


def _class_list(class_names: Any) -> list[str]:
    """``class_names`` as a list of non-blank strings (a lone string is refused: it would be read letter by letter)."""
    if isinstance(class_names, str) or not isinstance(class_names, Iterable):
        raise TypeError(f"class_names must be a list of class names, got {type(class_names).__name__}.")
    names = list(class_names)
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"class_names must all be strings, got {names!r:.80}.")
    if not names or not all(n.strip() for n in names):
        raise ValueError(f"class_names must be a non-empty list of non-blank names, got {names!r:.80}.")
    return names


def _check_on_error(on_error: Any) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")

# --------------------------------------------------------------------------------------------
# Candidates
# --------------------------------------------------------------------------------------------


@dataclass
class Candidates:
    """Concept phrases per class, with provenance. ``per_class[SHARED]`` applies to every class."""

    per_class: dict[str, list[str]]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.per_class, Mapping):
            raise TypeError("per_class must map class names to lists of concepts, "
                            f"got {type(self.per_class).__name__}.")
        if not isinstance(self.provenance, Mapping):
            raise TypeError(f"provenance must be a mapping, got {type(self.provenance).__name__}.")
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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise ValueError(f"{path} is not a JSON candidates file ({error}).") from None
        if not isinstance(payload, dict) or payload.get("format") != CANDIDATES_FORMAT:
            raise ValueError(f"{path} is not a {CANDIDATES_FORMAT} file.")
        if "classes" not in payload:
            raise ValueError(f"{path} has no 'classes' field (class -> list of concepts); regenerate it.")
        try:
            return cls(payload["classes"], payload.get("provenance") or {})
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path} is not a valid candidates file: {error}") from None


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
#: Largest reply body read (bytes); a longer reply is refused without reading the rest.
MAX_REPLY_BYTES = 16 * 2**20
#: Longest ``Retry-After`` (seconds) honoured; a server asking for more gets an error instead of a hung client.
MAX_RETRY_AFTER = 300
_CHUNK_BYTES = 64 * 2**10
_DEFAULT_PORTS = {"http": 80, "https": 443}


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


def check_url(url: Any, name: str = "base_url") -> str:
    """``url`` if it is an ``http://`` or ``https://`` address with a host, else a one-sentence ``ValueError``
    (urllib would otherwise also open ``file://`` and ``ftp://`` addresses)."""
    parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname:
        shown = redact_url(url) if isinstance(url, str) else repr(url)
        raise ValueError(f"{name} must be an http:// or https:// address with a host, got {shown}.")
    return url


def _origin(url: str) -> tuple[str, str | None, int | None]:
    """(scheme, host, port) of ``url``, the port filled in from the scheme when absent."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname, parts.port or _DEFAULT_PORTS.get(scheme)


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the request ran past its deadline")
    return left


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes with every receive limited to the time left before ``deadline``: a per-receive
    timeout alone lets a server that sends one byte a second hold a request open forever."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock, self._deadline = sock, deadline
        self._raw = sock.makefile("rb", buffering=0)  # keeps the socket open until this reader closes

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(_time_left(self._deadline))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """An ``HTTPResponse`` whose status line, headers and body are read within one deadline."""

    def __init__(self, sock: socket.socket, *args: Any, deadline: float, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.fp.close()
        self.fp = io.BufferedReader(_DeadlineReader(sock, deadline))


class _DeadlineConnection:
    """Mixin for ``http.client`` connections: connect within the time left, read the reply by the deadline."""

    def __init__(self, *args: Any, deadline: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        self.timeout = _time_left(self.deadline)
        super().connect()

    def response_class(self, sock: socket.socket, *args: Any, **kwargs: Any) -> _DeadlineResponse:
        return _DeadlineResponse(sock, *args, deadline=self.deadline, **kwargs)


class _DeadlineHTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_DeadlineHTTPConnection, req, deadline=req.deadline)


class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_DeadlineHTTPSConnection, req, context=self._context, deadline=req.deadline)


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only within the request's scheme, host and port: urllib resends every header,
    ``Authorization`` included, to whatever address a redirect names."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        try:
            same = _origin(newurl) == _origin(req.full_url)
        except ValueError:  # an unparsable port
            same = False
        if not same:
            fp.close()
            raise HTTPError(f"{redact_url(req.full_url)} redirected (HTTP {code}) to another scheme, host or port, "
                            f"{redact_url(newurl)}, and the redirect was refused so that the request's headers "
                            "(the API key) reach no other server; use the final address as the base URL.")
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.deadline = req.deadline  # one deadline for the request and its redirects
        return new


class HTTPClient:
    """JSON over HTTP with a total deadline per request, a cap on reply bytes, same-origin redirects only,
    retries with exponential backoff and a minimum interval between requests.

    ``timeout`` bounds each attempt as a whole (connect, headers and body); ``max_bytes`` bounds the reply
    body, so memory stays bounded whatever the server sends.
    """

    def __init__(self, *, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 min_interval: float = 0.0, max_bytes: int = MAX_REPLY_BYTES) -> None:
        self.timeout = float(check_number(timeout, "timeout", above=0))
        self.retries = int(check_number(retries, "retries", at_least=0, integer=True))
        self.backoff = float(check_number(backoff, "backoff", at_least=0))
        self.min_interval = float(check_number(min_interval, "min_interval", at_least=0))
        self.max_bytes = int(check_number(max_bytes, "max_bytes", at_least=1, integer=True))
        self._opener = urllib.request.build_opener(_SameOriginRedirects, _DeadlineHTTPHandler, _DeadlineHTTPSHandler)
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
        check_url(url, "url")
        data = json.dumps(body).encode() if body is not None else None
        request_headers = {"Accept": "application/json", **({"Content-Type": "application/json"} if data else {}),
                           **dict(headers or {})}
        where = redact_url(url)
        for attempt in range(self.retries + 1):
            self._wait_turn()
            self.requests_sent += 1
            retry_after = None
            try:
                payload = self._fetch(urllib.request.Request(url, data=data, headers=request_headers), where)
                try:
                    return json.loads(payload)
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                    raise HTTPError(f"{where} answered with something that is not JSON: {payload[:80]!r}.") from None
            except urllib.error.HTTPError as error:
                if error.code not in RETRYABLE_STATUS:
                    raise HTTPError(f"{where} answered HTTP {error.code} ({error.reason}).") from None
                problem = f"HTTP {error.code}"
                retry_after = error.headers.get("Retry-After") if error.headers else None
            except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, resets, broken replies
                reason = getattr(error, "reason", error)
                problem = "timed out" if isinstance(reason, TimeoutError) else f"failed ({reason})"
            if attempt == self.retries:
                raise HTTPError(f"{where} {problem}; gave up after {self.retries + 1} attempts.")
            delay = self.backoff * 2 ** attempt
            if retry_after and retry_after.strip().isdigit():
                if int(retry_after) > MAX_RETRY_AFTER:
                    raise HTTPError(f"{where} {problem} and asked to wait {int(retry_after)} s before retrying, longer "
                                    f"than the {MAX_RETRY_AFTER} s this client waits; try again later.")
                delay = max(delay, float(retry_after))
            logger.warning("%s %s; retrying in %.1f s (attempt %d of %d)", where, problem, delay, attempt + 2,
                           self.retries + 1)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _fetch(self, request: urllib.request.Request, where: str) -> bytes:
        """The reply body of one attempt, read in chunks by one deadline and refused past ``max_bytes``."""
        request.deadline = deadline = time.monotonic() + self.timeout
        too_long = (f"{where} sent a reply longer than the {self.max_bytes}-byte limit; it was not read further "
                    "(raise max_bytes if such replies are expected).")
        with self._opener.open(request, timeout=self.timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.strip().isdigit() and int(declared) > self.max_bytes:
                raise HTTPError(too_long)
            chunks, size = [], 0
            while chunk := response.read(min(_CHUNK_BYTES, self.max_bytes + 1 - size)):
                _time_left(deadline)
                size += len(chunk)
                if size > self.max_bytes:
                    raise HTTPError(too_long)
                chunks.append(chunk)
        return b"".join(chunks)


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
                 requests_per_minute: float | None = None, max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self.endpoint = check_url(base_url).rstrip("/") + "/chat/completions"
        self.public_endpoint = redact_url(self.endpoint)  # what logs, errors, the cache and provenance see
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"model must be the non-blank name of a model the server knows, got {model!r}.")
        self.model = model
        self.temperature = float(check_number(temperature, "temperature", at_least=0))
        self.max_tokens = int(check_number(max_tokens, "max_tokens", at_least=1, integer=True))
        if requests_per_minute is not None:
            check_number(requests_per_minute, "requests_per_minute", above=0)
        self.api_key_env = api_key_env
        self.cache = ResponseCache(cache_dir)
        self.http = HTTPClient(timeout=timeout, retries=retries, backoff=backoff, max_bytes=max_reply_bytes,
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
    class_names = _class_list(class_names)
    _check_on_error(on_error)
    if isinstance(prompts, str) and prompts not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {prompts!r}; built-in sets: {sorted(PROMPT_SETS)}.")
    if not isinstance(prompts, (str, Mapping)):
        raise TypeError(f"prompts must be a prompt set name or a name -> template mapping, "
                        f"got {type(prompts).__name__}.")
    templates = PROMPT_SETS[prompts] if isinstance(prompts, str) else dict(prompts)
    if not templates or any(not isinstance(t, str) or "{cls}" not in t for t in templates.values()):
        raise ValueError("need prompt templates that are strings each containing '{cls}'.")
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
    class_names = _class_list(class_names)
    _check_on_error(on_error)
    check_url(base_url)
    check_number(limit, "limit", at_least=1, integer=True)
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
    check_number(threshold, "threshold")
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
            except (json.JSONDecodeError, RecursionError) as error:
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
    try:
        result = Candidates(per_class, {"generator": "list", "source": origin})
    except TypeError as error:
        if origin == "python":
            raise
        raise ValueError(f"{origin} is not a valid concept list: {error}") from None
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
