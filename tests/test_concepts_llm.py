"""LLM and ConceptNet generators against real HTTP servers on 127.0.0.1 (http.server in a thread)."""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from concepts.generate import (
    ChatClient,
    HTTPClient,
    HTTPError,
    LLMReplyError,
    from_conceptnet,
    from_llm,
    parse_list,
)

SECRET = "sk-test-never-write-me"


class FakeServer:
    """Chat-completions (POST /v1/chat/completions) and ConceptNet (GET /query) behaviours by class name."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.headers: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def reply(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = payload["messages"][0]["content"]
                server.headers.append(dict(self.headers))
                cls = next(name for name in ("ok", "ratelimited", "broken", "slow", "chatty", "garbage", "empty")
                           if f" {name}" in prompt)
                server.requests[cls] += 1
                if cls == "ratelimited" and server.requests[cls] == 1:
                    return self.reply(429, b'{"error": "slow down"}', {"Retry-After": "0"})
                if cls == "broken":
                    return self.reply(500, b'{"error": "boom"}')
                if cls == "slow":
                    time.sleep(0.6)
                if cls == "garbage":
                    return self.reply(200, b"<html>not json</html>")
                if cls == "empty":
                    return self.reply(200, json.dumps({"choices": []}).encode())
                text = {"chatty": "I'm sorry, I would rather talk about the weather today."}.get(
                    cls, "Here you go:\n1. Red stripes\n2) **long tail** - it is long\n- whiskers\n* soft fur.\n")
                body = {"choices": [{"message": {"role": "assistant", "content": text}}]}
                self.reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

            def do_GET(self):
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                relation = query["rel"][0].rsplit("/", 1)[-1]
                server.requests[f"conceptnet {relation}"] += 1
                node = (query.get("start") or query.get("end"))[0]
                if relation == "PartOf":
                    edges = [{"start": {"label": "wheel", "language": "en"}, "end": {"label": "car"}, "weight": 2.0}]
                else:
                    edges = [{"start": {"label": node}, "end": {"label": f"{relation.lower()} thing", "language": "en"},
                              "weight": 1.5},
                             {"start": {"label": node}, "end": {"label": "weak edge", "language": "en"}, "weight": 0.5},
                             {"start": {"label": node}, "end": {"label": "borderline", "language": "en"}, "weight": 1.0},
                             {"start": {"label": node}, "end": {"label": "voiture", "language": "fr"}, "weight": 3.0}]
                self.reply(200, json.dumps({"edges": edges}).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with FakeServer() as fake:
        yield fake


def client(server, tmp_path, **options) -> ChatClient:
    # a timeout long enough that a reply slowed by a loaded machine is not retried (the tests count requests);
    # the "slow" class's test sets a short one
    defaults = {"cache_dir": tmp_path / "cache", "timeout": 3.0, "retries": 2, "backoff": 0.01,
                "api_key_env": "TEST_LLM_KEY"}
    return ChatClient(server.url + "/v1", "tiny-llm", **{**defaults, **options})


def test_parse_list_formats_and_non_lists():
    assert parse_list("1. Red\n2) blue wings\n- tail\n• fur\n(5) beak\na) legs") == \
        ["Red", "blue wings", "tail", "fur", "beak", "legs"]
    assert parse_list("stripes, dots, checks") == ["stripes", "dots", "checks"]
    for bad in ("I cannot answer that.", "", None):
        with pytest.raises(LLMReplyError):
            parse_list(bad)


def test_llm_end_to_end_with_cache_and_secret_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_LLM_KEY", SECRET)
    result = from_llm(["ok"], client(server, tmp_path), prompts="labo", progress=False)
    assert result.per_class["ok"] == ["Red stripes", "long tail", "whiskers", "soft fur"]
    assert server.requests["ok"] == 5 and all(h["Authorization"] == f"Bearer {SECRET}" for h in server.headers)
    assert set(result.provenance["prompts"]) == {"looks", "appearance", "colour", "pattern", "shape"}
    # rerun: served from the cache, no request at all
    again = from_llm(["ok"], client(server, tmp_path), prompts="labo", progress=False)
    assert again.per_class == result.per_class and server.requests["ok"] == 5
    # the key is nowhere on disk or in provenance
    written = "".join(p.read_text() for p in (tmp_path / "cache").iterdir())
    assert SECRET not in written and SECRET not in json.dumps(result.provenance)
    # another temperature is another cache entry
    from_llm(["ok"], client(server, tmp_path, temperature=0.7), prompts="lfcbm", progress=False)
    assert server.requests["ok"] == 8


def test_retry_after_429_then_success(server, tmp_path):
    result = from_llm(["ratelimited"], client(server, tmp_path), prompts={"f": "List features of a {cls}."},
                      progress=False)
    assert server.requests["ratelimited"] == 2 and result.per_class["ratelimited"]


@pytest.mark.parametrize("name, error, attempts", [
    ("broken", "HTTP 500; gave up after 3 attempts", 3),
    ("slow", "timed out; gave up after 3 attempts", 3),
    ("chatty", "not a list", 1),
    ("garbage", "not JSON", 1),
    ("empty", "without choices", 1),
])
def test_failures_raise_or_are_recorded_as_skips(server, tmp_path, name, error, attempts):
    prompts = {"f": "List features of a {cls}."}
    timeout = 0.3 if name == "slow" else 3.0  # the slow class answers after 0.6 s
    with pytest.raises((HTTPError, LLMReplyError), match=error):
        from_llm([name], client(server, tmp_path, timeout=timeout), prompts=prompts, progress=False)
    assert server.requests[name] == attempts
    result = from_llm(["ok", name], client(server, tmp_path, timeout=timeout), prompts=prompts, on_error="skip",
                      progress=False)
    assert result.per_class[name] == [] and result.per_class["ok"]
    (skip,) = result.provenance["skipped"]
    assert skip["class"] == name and skip["prompt"] == "f" and error in skip["reason"]


def test_rate_limit_spaces_requests(server, tmp_path):
    chat = client(server, tmp_path, cache_dir=None, requests_per_minute=600)  # 0.1 s apart
    start = time.monotonic()
    from_llm(["ok"], chat, prompts="lfcbm", progress=False)
    assert time.monotonic() - start >= 0.2 and server.requests["ok"] == 3


def test_conceptnet_relations_weights_and_languages(server, tmp_path):
    """The default is Post-hoc CBM's filter: IsA edges must weigh more than 1 (strictly: the 1.0 edge
    goes), the other relations keep every edge; English labels only."""
    result = from_conceptnet(["car"], relations=["HasA", "PartOf", "IsA"], base_url=server.url,
                             cache_dir=tmp_path / "cn", http=HTTPClient(timeout=2), progress=False)
    assert result.per_class["car"] == ["hasa thing", "weak edge", "borderline", "wheel", "isa thing"]
    assert result.provenance["relations"] == ["HasA", "PartOf", "IsA"]
    assert result.provenance["weight_above"] == {"HasA": None, "PartOf": None, "IsA": 1.0}
    everywhere = from_conceptnet(["car"], relations=["HasA", "PartOf", "IsA"], base_url=server.url, weight_above=1.0,
                                 cache_dir=tmp_path / "cn", progress=False)
    assert everywhere.per_class["car"] == ["hasa thing", "wheel", "isa thing"]
    assert sum(v for k, v in server.requests.items() if k.startswith("conceptnet")) == 3  # the rest from the cache
    unfiltered = from_conceptnet(["car"], relations=["IsA"], base_url=server.url, weight_above=None,
                                 cache_dir=tmp_path / "cn", progress=False)
    assert unfiltered.per_class["car"] == ["isa thing", "weak edge", "borderline"]
    with pytest.raises(ValueError, match="unsupported"):
        from_conceptnet(["car"], relations=["Synonym"], base_url=server.url)
    with pytest.raises(ValueError, match="unsupported ConceptNet relations"):
        from_conceptnet(["car"], relations=["IsA"], weight_above={"Synonym": 1.0}, base_url=server.url)
    with pytest.raises(ValueError, match="finite number"):
        from_conceptnet(["car"], relations=["IsA"], weight_above=float("nan"), base_url=server.url)


def test_cli_conceptnet_runs_the_reference_filter(server, tmp_path):
    import argparse

    from concepts.cli import add_commands

    parser = argparse.ArgumentParser(prog="cbm")
    add_commands(parser.add_subparsers(dest="command"), load_encoder=None, load_embeddings=None)

    def generate(*options):
        out = tmp_path / f"c{len(list(tmp_path.iterdir()))}.json"
        args = parser.parse_args(["concepts", "generate", "conceptnet", "--classes", "car", "--relations", "HasA",
                                  "IsA", "--base-url", server.url, "--cache-dir", str(tmp_path / "cn"), *options,
                                  "--out", str(out)])
        assert args.run(args) == 0
        return json.loads(out.read_text())

    assert generate()["classes"]["car"] == ["hasa thing", "weak edge", "borderline", "isa thing"]
    assert generate("--weight-above", "1")["classes"]["car"] == ["hasa thing", "isa thing"]
    assert generate("--weight-above", "HasA=0.7")["classes"]["car"] == [
        "hasa thing", "borderline", "isa thing", "weak edge"]
    with pytest.raises(ValueError, match="expects a number"):
        generate("--weight-above", "IsA=high")
