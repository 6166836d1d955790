"""Hostile servers and arguments for the LLM and ConceptNet clients: cross-origin redirects (is the API key
sent on?), replies that drip one byte at a time or never end, invalid numbers and URLs, malformed
candidate files, and control characters in generated concepts. Servers are tiny ``http.server``s on
127.0.0.1 in a thread; the case counts are in the README's Reliability table."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cbm.cli import main as cbm_main
from concepts import filters
from concepts.generate import (
    CANDIDATES_FORMAT,
    Candidates,
    ChatClient,
    HTTPClient,
    HTTPError,
    from_conceptnet,
    from_llm,
)
from concepts.text import CONTROL_CHARACTERS

KEY = "sk-network-test-key"
LIST_REPLY = json.dumps({"choices": [{"message": {"content": "1. red fur\n2. long tail"}}]}).encode()


class Server:
    """``respond(handler)`` answers every GET and POST; each request's path and ``Authorization`` are recorded."""

    def __init__(self, respond: Callable[[BaseHTTPRequestHandler], None]) -> None:
        self.seen: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self):
                server.seen.append((self.path, self.headers.get("Authorization")))
                try:
                    respond(self)
                except OSError:  # the client gave up, as it should
                    pass

            do_GET = do_POST = answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    started = []

    def start(respond):
        started.append(Server(respond))
        return started[-1]

    yield start
    for server in started:
        server.close()


def reply(handler: BaseHTTPRequestHandler, body: bytes = LIST_REPLY, status: int = 200, **headers: str) -> None:
    handler.send_response(status)
    for key, value in headers.items():
        handler.send_header(key.replace("_", "-"), value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def one_line(message: str, *mentions: str) -> None:
    assert "\n" not in message and message.rstrip().endswith("."), message
    assert all(m in message for m in mentions), (mentions, message)


# --------------------------------------------------------------------------------------------------------------
# Redirects
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["host", "port", "scheme"])
def test_a_redirect_to_another_origin_is_refused_and_the_key_stays_home(serve, monkeypatch, target):
    """urllib resends every header, the key's Authorization too, wherever a redirect points."""
    monkeypatch.setenv("NETWORK_KEY", KEY)
    elsewhere = serve(reply)
    where = {"host": f"http://localhost:{elsewhere.port}", "port": elsewhere.url}
    origin = serve(lambda h: reply(h, b"", 302, Location=where.get(target, f"https://127.0.0.1:{origin.port}")
                                   + "/v1/chat/completions"))
    chat = ChatClient(origin.url + "/v1", "tiny", api_key_env="NETWORK_KEY", retries=2, backoff=0.01, timeout=2)
    with pytest.raises(HTTPError) as refused:
        chat.complete("List parts of a car.")
    one_line(str(refused.value), "redirect was refused", "another scheme, host or port")
    assert origin.seen == [("/v1/chat/completions", f"Bearer {KEY}")]  # asked once: a refusal is not retried
    assert elsewhere.seen == []  # the other server never heard from us, so never saw the key
    # a redirect within the origin is still followed
    same = serve(lambda h: reply(h, b"", 301, Location="/final") if h.path == "/start" else reply(h, b'{"ok": 1}'))
    assert HTTPClient(timeout=2).request_json(same.url + "/start") == {"ok": 1}
    assert [path for path, _ in same.seen] == ["/start", "/final"]


# --------------------------------------------------------------------------------------------------------------
# One deadline per request; a cap on reply bytes
# --------------------------------------------------------------------------------------------------------------


def drip(handler: BaseHTTPRequestHandler, in_headers: bool) -> None:
    """One byte every 0.3 s (at most 3 s of them), in the status line or in the body."""
    head = b"HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\n"
    if not in_headers:
        handler.wfile.write(head)
        handler.wfile.flush()
    for byte in (head if in_headers else b"[" * 10):
        handler.wfile.write(bytes([byte]))
        handler.wfile.flush()
        time.sleep(0.3)
        if time.monotonic() - handler.started > 3:
            return


@pytest.mark.parametrize("in_headers", [False, True], ids=["body", "headers"])
def test_a_dripping_server_cannot_stretch_the_total_timeout(serve, in_headers):
    def respond(handler):
        handler.started = time.monotonic()
        drip(handler, in_headers)

    server = serve(respond)
    start = time.monotonic()
    with pytest.raises(HTTPError, match="timed out; gave up after 1 attempts"):
        HTTPClient(timeout=1.0, retries=0).request_json(server.url + "/query")
    assert time.monotonic() - start < 2.0


def endless(handler: BaseHTTPRequestHandler) -> None:
    handler.send_response(200)
    handler.end_headers()
    block = b" " * 65536
    while True:
        handler.wfile.write(block)


def test_an_endless_or_oversized_reply_stops_at_the_byte_cap(serve):
    server = serve(endless)
    start = time.monotonic()
    with pytest.raises(HTTPError) as capped:
        HTTPClient(timeout=5, retries=2, max_bytes=2**20).request_json(server.url + "/query")
    one_line(str(capped.value), "longer than the 1048576-byte limit", "max_bytes")
    assert time.monotonic() - start < 2 and len(server.seen) == 1  # not retried: the next reply is as long
    # a declared length over the cap is refused before any byte of the body is read
    huge = serve(lambda h: (h.send_response(200), h.send_header("Content-Length", str(10**12)), h.end_headers()))
    chat = ChatClient(huge.url, "tiny", api_key_env=None, retries=0, timeout=5, max_reply_bytes=1000)
    with pytest.raises(HTTPError, match="longer than the 1000-byte limit"):
        chat.complete("List parts of a car.")
    assert time.monotonic() - start < 3


def test_a_retry_after_of_days_is_refused_instead_of_slept(serve):
    server = serve(lambda h: reply(h, b"{}", 429, Retry_After=str(10**9)))
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(
        pytest.raises(HTTPError, HTTPClient(timeout=2, retries=3).request_json, server.url + "/query")), daemon=True)
    worker.start()
    worker.join(2)
    assert outcome, "the client slept on a Retry-After of 10^9 s"
    one_line(str(outcome[0].value), "asked to wait 1000000000 s", "try again later")
    assert len(server.seen) == 1


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD_ARGUMENTS = [
    *[(HTTPClient, {"timeout": v}, "timeout") for v in (0, -1, NAN, INF, "5")],
    *[(HTTPClient, {"retries": v}, "retries") for v in (-1, 1.5, True)],
    (HTTPClient, {"backoff": NAN}, "backoff"), (HTTPClient, {"backoff": -1}, "backoff"),
    (HTTPClient, {"min_interval": -1}, "min_interval"), (HTTPClient, {"max_bytes": 0}, "max_bytes"),
    *[(ChatClient, {"temperature": v}, "temperature") for v in (NAN, INF, -0.5)],
    (ChatClient, {"max_tokens": 0}, "max_tokens"), (ChatClient, {"timeout": NAN}, "timeout"),
    (ChatClient, {"requests_per_minute": 0}, "requests_per_minute"),
    (ChatClient, {"requests_per_minute": NAN}, "requests_per_minute"),
    *[(ChatClient, {"base_url": v}, "base_url") for v in ("file:///etc", "ftp://host/v1", "localhost:8000", "")],
    (ChatClient, {"model": ""}, "model"),
    (from_conceptnet, {"limit": 0}, "limit"), (from_conceptnet, {"base_url": "file:///etc"}, "base_url"),
    (from_conceptnet, {"on_error": "ignore"}, "on_error"), (from_conceptnet, {"class_names": "car"}, "class_names"),
    (from_llm, {"class_names": "car"}, "class_names"), (from_llm, {"class_names": [1]}, "class_names"),
    (from_llm, {"class_names": []}, "class_names"), (from_llm, {"on_error": "ignore"}, "on_error"),
]


@pytest.mark.parametrize("function, arguments, name", BAD_ARGUMENTS,
                         ids=[f"{f.__name__}-{next(iter(a.values()))!r}" for f, a, _ in BAD_ARGUMENTS])
def test_the_api_refuses_invalid_arguments_up_front(function, arguments, name):
    nowhere = "http://127.0.0.1:9"  # nothing listens there: an unchecked argument fails fast, not by a refusal
    defaults = {HTTPClient: {}, ChatClient: {"base_url": nowhere + "/v1", "model": "tiny"},
                from_conceptnet: {"class_names": ["car"], "base_url": nowhere, "progress": False},
                from_llm: {"class_names": ["car"], "progress": False,
                           "client": ChatClient(nowhere + "/v1", "tiny", api_key_env=None, retries=0)}}[function]
    with pytest.raises((ValueError, TypeError)) as refused:
        function(**{**defaults, **arguments})
    one_line(str(refused.value), name)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


BAD_OPTIONS = [
    (["llm", "--retries", "-1"], "retries"), (["llm", "--timeout", "0"], "timeout"),
    (["llm", "--timeout", "-1"], "timeout"), (["llm", "--timeout", "nan"], "timeout"),
    (["llm", "--temperature", "nan"], "temperature"), (["llm", "--temperature", "inf"], "temperature"),
    (["llm", "--temperature", "-1"], "temperature"), (["llm", "--rpm", "-5"], "requests_per_minute"),
    (["conceptnet", "--base-url", "file:///etc/passwd"], "base_url"),
]


@pytest.mark.parametrize("options, name", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_the_cli_refuses_invalid_options_with_one_sentence(tmp_path, capsys, options, name):
    source, *rest = options
    base = ["--model", "tiny", "--api-key-env", "", "--retries", "0"] if source == "llm" else []
    argv = ["concepts", "generate", source, "--classes", "car", "--out", str(tmp_path / "c.json"),
            "--base-url", f"http://127.0.0.1:{closed_port()}/v1", *base, *rest]
    assert cbm_main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "Traceback" not in error
    one_line(error.strip(), name)
    assert not (tmp_path / "c.json").exists()


FORMAT = {"format": CANDIDATES_FORMAT}
BAD_FILES = {
    "classes a list": {**FORMAT, "classes": ["fur"]},
    "no classes": dict(FORMAT),
    "number as concept": {**FORMAT, "classes": {"cat": [1]}},
    "string as concept list": {**FORMAT, "classes": {"cat": "fur"}},
    "blank concept": {**FORMAT, "classes": {"cat": [" "]}},
    "null class list": {**FORMAT, "classes": {"cat": None}},
    "provenance a list": {**FORMAT, "classes": {"cat": ["fur"]}, "provenance": [1]},
    "nested 100000 deep": f'{{"format": "{CANDIDATES_FORMAT}", "classes": {"[" * 100000}{"]" * 100000}}}',
}


@pytest.mark.parametrize("content", BAD_FILES.values(), ids=BAD_FILES)
def test_malformed_candidate_files_give_one_sentence(tmp_path, capsys, content):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError) as refused:
        Candidates.load(path)
    one_line(str(refused.value), str(path))
    assert cbm_main(["concepts", "filter", str(path), "--clean", "--out", str(tmp_path / "out.json")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and str(path) in error and "Traceback" not in error


@pytest.mark.parametrize("content", [{"cat": [1]}, {"cat": "fur"}, [None]], ids=["number", "string", "null"])
def test_malformed_concept_lists_give_one_sentence(tmp_path, capsys, content):
    path = tmp_path / "list.json"
    path.write_text(json.dumps(content))
    assert cbm_main(["concepts", "generate", "list", str(path), "--out", str(tmp_path / "out.json")]) == 2
    error = capsys.readouterr().err
    assert str(path) in error and "Traceback" not in error
    one_line(error.strip(), "not a valid concept list")


# --------------------------------------------------------------------------------------------------------------
# Control characters in generated concepts
# --------------------------------------------------------------------------------------------------------------


def test_clean_removes_control_characters_from_generated_concepts():
    hostile = {"\x1b[31mRed\x1b[0m Stripes": "red stripes", "\u202eevil\u202c tail": "evil tail",
               "zero\u200bwidth": "zerowidth", "nul\x00l": "null", "tab\tbed": "tab bed",
               "\x1b]8;;http://x.example\x1b\\link\x1b]8;;\x1b\\": "link", "\ufeffbom": "bom"}
    candidates = Candidates({"cat": [*hostile, "\u200b\u200f", "fur"], "dog": ["cat\u200b", "fur"]})
    cleaned = filters.clean(candidates, merge_plural_forms=False)
    assert cleaned.per_class["cat"] == [*hostile.values(), "fur"]
    assert not any(CONTROL_CHARACTERS.search(p) for p in cleaned.concepts())
    step = cleaned.provenance["filters"][0]
    assert step["removed"] == [{"concept": "\u200b\u200f", "reason": "nothing left after cleaning"}]
    # a class name hidden behind a zero-width space is still a class name
    assert filters.remove_class_names(candidates).per_class["dog"] == ["fur"]
