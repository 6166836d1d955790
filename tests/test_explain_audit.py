"""Audit reports: JSON/HTML agreement, sections, batch mode, gates, the `cbm audit` command, a real browser."""

import argparse
import html
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_explain_core import one_thread, spurious_world  # noqa: F401 (an autouse fixture)

import explain
from cbm.models import PosthocCBM
from explain.audit import format_number, resolve
from explain.batch import report_folder
from explain.cli import add_commands

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    world = spurious_world(seed=1)
    x, y, concepts, _ = world["train"]
    model = PosthocCBM(world["bank"], c=0.5, max_iter=400).fit(x, y, validation=world["val"][:2],
                                                               concept_labels=concepts)
    model, _ = model.edit("prune", "concept 7", "class 3", validation=world["val"][:2], reason="review")
    out = tmp_path_factory.mktemp("audit")
    report = explain.audit(model, world["test"], name="pcbm", data_name="synthetic test", train=world["train"],
                           shift=world["test"], seeds=(0, 1), max_samples=300, gates={"accuracy": 0.99},
                           out=out, progress=False)
    return {"world": world, "model": model, "report": report, "out": out}


def _data_elements(page: str) -> list[tuple[str, str, str]]:
    return re.findall(r'<data value="([^"]*)" data-path="([^"]*)">([^<]*)</data>', page)


def _json_strings(value) -> set[str]:
    if isinstance(value, dict):
        return set().union(*(_json_strings(v) | {str(k)} for k, v in value.items())) if value else set()
    if isinstance(value, list):
        return set().union(*(_json_strings(v) for v in value)) if value else set()
    return {value} if isinstance(value, str) else set()


def assert_every_number_is_the_json(page: str, data: dict, elements: list, strip: str = " ,;()=p") -> None:
    """Each <data> element shows its JSON value; outside <data>, figures, images and styles, text with
    digits is a name or text of the JSON (``strip``: punctuation around such text)."""
    for value, path, text in elements:
        path = html.unescape(path)
        assert json.loads(html.unescape(value)) == resolve(data, path)
        assert text == format_number(resolve(data, path))
    visible = re.sub(r"<svg.*?</svg>|<style>.*?</style>|<data [^>]*>[^<]*</data>", " ", page, flags=re.DOTALL)
    allowed = _json_strings(data)
    for node in re.findall(r">([^<>]+)<", visible):
        node = html.unescape(node).strip(strip)
        if re.search(r"\d", node):
            assert any(node in s for s in allowed), node


def test_every_number_in_the_html_is_the_json(audited):
    report = audited["report"]
    page = (audited["out"] / "report.html").read_text()
    data = json.loads((audited["out"] / "report.json").read_text())
    assert data == report.data
    elements = _data_elements(page)
    assert len(elements) > 150
    assert_every_number_is_the_json(page, data, elements)


def test_report_sections_and_findings(audited):
    data = audited["report"].data
    page = audited["report"].html
    for heading in ("Model card", "Accuracy against baselines", "Confusion matrix", "Global concept importance",
                    "Explained samples", "Intervention curves", "Suspect concepts", "Concept quality", "Metrics",
                    "Edit history"):
        assert f">{heading}" in page
    assert {s["concept"] for s in data["suspects"][:3]} <= {f"background {i}" for i in range(4)}
    assert data["model"]["family_extras"]["bank_kind"] == "cav"
    assert data["edits"][0]["concept"] == "concept 7" and data["edits"][0]["reason"] == "review"
    assert any(s["true"] != s["predicted"] for s in data["samples"])
    assert data["gates"]["failures"] and audited["report"].failures
    assert set(data["summary"]) >= set(explain.GATE_METRICS)
    # Nothing to fetch: no remote src/href, no CSS url() or @import (namespace URIs of the SVGs are names, not requests).
    assert not re.search(r"(?:src|href)\s*=\s*[\"']?(?:https?:)?//", page)
    assert not re.search(r"url\(\s*[\"']?(?!#)", page) and "@import" not in page and "<script" not in page
    assert set(audited["report"].figures) >= {"confusion", "importance", "interventions", "accuracy"}
    # the oracle policy is shown as the greedy reference it is, and each counterfactual says which search found it
    assert "greedy" in data["interventions"]["policies"]["oracle"] and "<td>greedy oracle</td>" in page
    assert all(s["counterfactual"]["search"] in ("exact", "greedy") for s in data["samples"])
    assert "exact search" in page


def test_batch_index_and_stability(audited, tmp_path):
    world = audited["world"]
    x, y, _, _ = world["train"]
    models = {"seed0": audited["model"], "seed1": PosthocCBM(world["bank"], c=0.5, max_iter=400, seed=1).fit(x, y)}
    batch = explain.audit_many(models, {"test": world["test"]}, tmp_path, train=world["train"], seeds=(0,),
                               max_samples=200, competences=(1.0,), examples=1, progress=False, gates={"accuracy": 0.0})
    assert not batch.failures and len(batch.reports) == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["model"] for r in summary["rows"]] == ["seed0", "seed1"]
    assert summary["stability"][0]["models"] == ["seed0", "seed1"]
    index = (tmp_path / "index.html").read_text()
    assert f"{report_folder('seed0', 'test')}/report.html" in index
    assert (tmp_path / report_folder("seed1", "test") / "report.json").exists()
    for value, path, text in _data_elements(index):
        assert text == format_number(resolve(summary, html.unescape(path)))


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A PCBM over a tiny random CLIP on colour squares, saved as a bundle; its dataset scheme registered."""
    from tiny_models import ColourSquares, write_tiny_clip_dir

    from cbm.backbones import load_backbone
    from cbm.data.registry import register_dataset_scheme
    from cbm.embed import embed
    from cbm.toy import label_cav_bank

    root = tmp_path_factory.mktemp("tiny")
    register_dataset_scheme("explainsquares", lambda path, split, options: ColourSquares(n=60, tag=split or "a"),
                            replace=True)
    backbone = load_backbone(f"openclip:local-dir:{write_tiny_clip_dir(root / 'clip')}")
    train = embed(backbone, ColourSquares(n=60, tag="train"), cache_dir=root / "cache", progress=False)
    model = PosthocCBM(label_cav_bank(train), lam=1e-3).fit(train)
    model.save(root / "model.cbm")
    return root


def test_cbm_audit_command_gates_the_exit_code(tiny_bundle, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="cbm")
    add_commands(parser.add_subparsers(dest="command"))
    common = [str(tiny_bundle / "model.cbm"), "--data", "explainsquares:x@test", "--out", str(tmp_path),
              "--cache-dir", str(tiny_bundle / "cache"), "--quiet"]
    args = parser.parse_args(["audit", *common, "--shift", "explainsquares:x@val", "--seeds", "1", "--competence",
                              "1.0", "--fail-under", "accuracy=1.01", "--fail-under", "concept_auc=0.0"])
    assert args.run(args) == 1
    out = capsys.readouterr().out
    assert "gates FAILED" in out and "accuracy = " in out and "concept_auc" not in out.split("gates FAILED")[1]
    report = json.loads((tmp_path / report_folder("model", "explainsquares:x@test") / "report.json").read_text())
    assert report["samples"][0]["thumbnail"].startswith("data:image/png;base64,")
    assert report["summary"]["shift_accuracy"] is not None
    assert (tmp_path / "index.html").exists() and (tmp_path / "summary.json").exists()
    bad = parser.parse_args(["audit", *common, "--fail-under", "accuracy"])
    with pytest.raises(ValueError, match="METRIC=VALUE"):
        bad.run(bad)


def _page_requests(netlog: Path) -> list[str]:
    """URLs the page asked for (browser-internal requests have the initiator "not an origin")."""
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"]["url"] for e in log["events"] if e["type"] == start and "url" in e.get("params", {})
            and e["params"].get("initiator") != "not an origin" and not e["params"]["url"].startswith(("file:", "data:"))]


def _chromium(page: Path, work: Path) -> tuple[Path, list[str]]:
    env = {**os.environ, "HOME": str(work), "XDG_CONFIG_HOME": str(work / "config")}
    shot, netlog = work / f"{page.stem}.png", work / f"{page.stem}-net.json"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", f"--user-data-dir={work / ('profile-' + page.stem)}", "--window-size=1200,2400",
                    f"--log-net-log={netlog}", f"--screenshot={shot}", page.as_uri()],
                   env=env, capture_output=True, timeout=90, check=True)
    return shot, _page_requests(netlog)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless browser test: /usr/bin/chromium is absent "
                                                   "(install the Debian package: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium_without_requests(audited, tmp_path):
    control = tmp_path / "control.html"  # proves the request detector sees what a page loads
    control.write_text("<html><body><img src='http://127.0.0.1:9/x.png'>control</body></html>")
    assert _chromium(control, tmp_path)[1] == ["http://127.0.0.1:9/x.png"]
    shot, requests = _chromium(audited["out"] / "report.html", tmp_path)
    assert requests == []
    from PIL import Image
    image = Image.open(shot)
    assert image.size == (1200, 2400)
    assert len(set(np.asarray(image.convert("L").resize((60, 120))).flatten().tolist())) > 20  # rendered content, not a blank page
