"""API keys never leak: a concept generation against a local fake chat server with a distinctive key (through
the Python API and the command line, with retries, failures and credentials in the URL), then a bank and a
model bundle built from it; the key must appear in no log record, no output and no byte of any file written."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from cbm.cli import main as cbm_main
from cbm.models import PosthocCBM
from concepts import ChatClient, ConceptBank, from_llm, select_concepts
from concepts.generate import Candidates, HTTPError

KEY = "sk-RELIABILITY-7f3a9c-never-store-me"
D = 8


class ChatServer:
    """POST /v1/chat/completions: a list for "ok", 429 once for "busy", 500 for "down", non-JSON for "junk"."""

    def __init__(self) -> None:
        self.authorization: list[str] = []
        self.busy_seen = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][0]["content"]
                server.authorization.append(self.headers.get("Authorization", ""))
                status, body = 200, {"choices": [{"message": {"content": "1. red fur\n2. long tail\n3. whiskers"}}]}
                if " busy" in prompt and not server.busy_seen:
                    server.busy_seen, status, body = True, 429, {"error": "slow down"}
                elif " down" in prompt:
                    status, body = 500, {"error": f"upstream said: bad key {self.headers.get('Authorization')}"}
                payload = b"<html>junk</html>" if " junk" in prompt else json.dumps(body).encode()
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    fake = ChatServer()
    yield fake
    fake.close()


class Encoder:
    fingerprint = "fp-secret-test"

    def encode_texts(self, texts):
        return torch.randn(len(texts), D, generator=torch.Generator().manual_seed(len(texts)))


def test_the_api_key_is_never_logged_cached_or_written(server, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("RELIABILITY_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    client = ChatClient(server.url, "tiny", api_key_env="RELIABILITY_KEY", cache_dir=tmp_path / "cache", timeout=2,
                        retries=1, backoff=0.01)
    classes = ["ok", "busy", "down", "junk"]
    candidates = from_llm(classes, client, prompts={"f": "List features of a {cls}."}, on_error="skip",
                          progress=False)
    assert server.authorization and all(h == f"Bearer {KEY}" for h in server.authorization)  # the key was used
    assert candidates.per_class["ok"] and len(candidates.provenance["skipped"]) == 2  # down and junk
    with pytest.raises(HTTPError) as failure:  # the raising path too
        from_llm(["down"], client, prompts={"f": "List features of a {cls}."}, progress=False)
    # credentials written into the URL itself are redacted from what is shown and kept
    leaky = ChatClient(server.url.replace("http://", f"http://user:{KEY}@"), "tiny", api_key_env=None,
                       cache_dir=tmp_path / "cache", timeout=2, retries=0)
    from_url = from_llm(["ok"], leaky, prompts={"f": "Name parts of a {cls}."}, on_error="skip", progress=False)
    candidates.save(tmp_path / "candidates.json")
    Candidates.merge([candidates, from_url]).save(tmp_path / "merged.json")
    assert cbm_main(["concepts", "generate", "llm", "--classes", "ok,busy", "--base-url", server.url, "--model",
                     "tiny", "--api-key-env", "RELIABILITY_KEY", "--cache-dir", str(tmp_path / "cli-cache"),
                     "--timeout", "2", "--out", str(tmp_path / "cli.json")]) == 0
    x, y = torch.randn(30, D), torch.arange(30) % len(classes)
    bank = select_concepts(candidates, Encoder(), x, y, classes, k=2)
    bank.save(tmp_path / "bank")
    assert ConceptBank.load(tmp_path / "bank").provenance["candidates"]["generator"] == "llm"
    PosthocCBM(bank, device="cpu").fit(x, y, class_names=classes).save(tmp_path / "model.cbm")

    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len(written) >= 8  # response caches, candidate files, bank folder, model bundle
    for path in written:
        assert KEY.encode() not in path.read_bytes(), path
    output = capsys.readouterr()
    for text in (caplog.text, output.out, output.err, str(failure.value), json.dumps(candidates.provenance),
                 json.dumps(from_url.provenance), repr(client.__dict__), repr(leaky.__dict__.get("public_endpoint"))):
        assert KEY not in text
    assert "retrying" in caplog.text and "127.0.0.1" in caplog.text  # the log did record the events, keyless
