"""Untrusted strings in every renderer and outputs that never clobber: hostile names (mathtext, terminal control
characters, undecodable file-name bytes) through the audit, its figures and the CLI; reports written atomically
into one folder per (model, data) pair; no command replacing a file without --force; `cbm edit` concept names
with colons; weight files that are not tensor files."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import write_tiny_clip_dir

import explain
from cbm import cli
from cbm.backbones import load_backbone
from cbm.data.folders import ImageFolder
from cbm.data.registry import register_dataset_scheme
from cbm.embed import embed
from cbm.models import PosthocCBM, load
from cbm.untrusted import TerminalLogFormatter, for_markdown, for_terminal
from concepts import ConceptBank
from explain.audit import Report
from explain.batch import summary_lines

CLASSES = (b"caf\xe9", b"$5 or $6")  # a Latin-1 folder name (undecodable as UTF-8) and a mathtext trap
FILES = [bytes([0xFF - i]) + b".png" for i in range(6)]  # undecodable file names (os.fsdecode: surrogates)
CONCEPTS = ["$\\frac{$", "$5 or $6", "\x1b[31mred\u202e", "has_bill_shape::dagger", "plain"]
ESCAPES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder dataset with undecodable and mathtext names, a tiny CLIP, a PCBM with hostile concept names."""
    root = tmp_path_factory.mktemp("outputs")
    data = os.path.join(os.fsencode(root), b"data")
    for label, name in enumerate(CLASSES):
        os.makedirs(os.path.join(data, name))
        for i, file in enumerate(FILES):
            colour = (200 - 150 * label, 40 + 10 * i, 30 + 150 * label)
            Image.new("RGB", (8, 8), colour).save(os.fsdecode(os.path.join(data, name, file)))
    dataset = ImageFolder(os.fsdecode(data))
    register_dataset_scheme("hostilenames", lambda path, split, options: ImageFolder(os.fsdecode(data)),
                            replace=True)
    clip = f"openclip:local-dir:{write_tiny_clip_dir(root / 'clip')}"
    backbone = load_backbone(clip, device="cpu")
    embeddings = embed(backbone, dataset, cache_dir=root / "cache", progress=False, num_workers=0)
    vectors = torch.randn(len(CONCEPTS), backbone.embed_dim, generator=torch.Generator().manual_seed(0))
    bank = ConceptBank(CONCEPTS, vectors, kind="cav", backbone=backbone.fingerprint)
    model = PosthocCBM(bank, lam=1e-3).fit(embeddings)
    model.save(root / "model.cbm")
    return {"root": root, "data": dataset, "embeddings": embeddings, "model": model, "clip": clip}


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_audit_of_hostile_names_is_complete_in_one_folder_per_pair(world, tmp_path):
    model, data = world["model"], world["embeddings"]
    edited, _ = model.edit("prune", "plain", reason="\x1b[2Jwiped")
    batch = explain.audit_many({"a+b": model, "a_b": edited}, {"folder": data}, tmp_path,
                               images={"folder": world["data"]}, seeds=(0,), competences=(1.0,), max_samples=50,
                               examples=1, progress=False)
    # names that slug alike get their own folders, and the index links each row to its own report
    folders = {row["model"]: row["report"] for row in batch.summary["rows"]}
    assert len(set(folders.values())) == 2
    for name, link in folders.items():
        report = json.loads((tmp_path / link).with_name("report.json").read_text(encoding="utf-8"))
        assert report["name"] == name
        page = (tmp_path / link).read_text(encoding="utf-8")
        assert page.endswith("</body></html>")
        # undecodable bytes of file and folder names shown as escapes, in the page and in the JSON
        assert "caf\\xe9" in page and "caf\\xe9" in report["classification"]["per_class_accuracy"]
        assert report["samples"] and all(re.search(r"/\\xf[a-f]\.png$", s["id"]) for s in report["samples"])
        # figures draw names literally: no mathtext parsed from them (SVG text is kept as text)
        texts = set(re.findall(r"<text[^>]*>([^<]*)</text>", page))
        assert {"$5 or $6", "$\\frac{$"} <= {t.replace("&#36;", "$") for t in texts}
    assert not ESCAPES.search("\n".join(summary_lines(batch)))


def test_report_writes_are_atomic(tmp_path):
    (tmp_path / "report.html").write_text("the previous report")
    report = Report("m", {"name": "m"}, html="<p>\udcff</p>")  # text no UTF-8 file can hold
    with pytest.raises(UnicodeEncodeError):
        report.write(tmp_path)
    assert (tmp_path / "report.html").read_text() == "the previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json"]


def test_terminal_output_escapes_control_characters(world, tmp_path, capsys):
    bundle = tmp_path / "edited.cbm"
    code, out, _ = _main(capsys, "edit", str(world["root"] / "model.cbm"), "--prune", CONCEPTS[2],
                         "--reason", "\x1b]8;;http://x\x07link\u202e", "--out", str(bundle))
    assert code == 0 and "\\x1b[31mred\\u202e" in out and not ESCAPES.search(out)
    code, out, _ = _main(capsys, "info", str(bundle))
    assert code == 0 and "\\x1b]8;;http://x\\x07link\\u202e" in out and not ESCAPES.search(out)
    world["model"].bank.save(tmp_path / "bank")
    code, out, _ = _main(capsys, "concepts", "show", str(tmp_path / "bank"))
    assert code == 0 and "\\x1b[31mred\\u202e" in out and not ESCAPES.search(out)
    record = logging.LogRecord("cbm", logging.WARNING, __file__, 1, "skipped %s", ("caf\udce9/\x1b[2J.png",), None)
    assert TerminalLogFormatter("%(message)s").format(record) == "skipped caf\\xe9/\\x1b[2J.png"
    assert for_terminal("a\u200bb\x00") == "a\\u200bb\\x00"


def test_cbm_edit_prunes_concept_names_with_colons(world, tmp_path, capsys):
    names = world["model"].concept_names
    column, plain = names.index("has_bill_shape::dagger"), names.index("plain")
    first, second = world["model"].class_names
    code, _, err = _main(capsys, "edit", str(world["root"] / "model.cbm"), "--set-weight", "has_bill_shape::dagger=0.7",
                         "--out", str(tmp_path / "set.cbm"))
    assert code == 0, err
    assert (load(tmp_path / "set.cbm").weight_[:, column] == 0.7).all()
    code, _, err = _main(capsys, "edit", str(tmp_path / "set.cbm"), "--prune", "has_bill_shape::dagger",
                         "--out", str(tmp_path / "all.cbm"))
    assert code == 0, err
    assert (load(tmp_path / "all.cbm").weight_[:, column] == 0).all()
    code, _, err = _main(capsys, "edit", str(tmp_path / "set.cbm"), "--prune", f"has_bill_shape::dagger:{second}",
                         "--set-weight", f"plain:{first}=0.5", "--out", str(tmp_path / "one.cbm"))
    assert code == 0, err
    edited = load(tmp_path / "one.cbm")
    assert edited.weight_[1, column] == 0 and edited.weight_[0, column] == 0.7 and edited.weight_[0, plain] == 0.5
    code, _, err = _main(capsys, "edit", str(tmp_path / "set.cbm"), "--prune", "plain:nosuchclass",
                         "--out", str(tmp_path / "x.cbm"))
    assert code == 2 and "unknown class 'nosuchclass'" in err


def test_no_command_replaces_an_output_without_force(world, tmp_path, capsys):
    common = ["--cache-dir", str(world["root"] / "cache"), "--workers", "0", "--device", "cpu"]
    features = tmp_path / "features.safetensors"
    features.write_bytes(b"a model bundle")
    code, _, err = _main(capsys, "embed", world["clip"], "hostilenames:x", "--out", str(features), *common)
    assert code == 2 and "--force" in err and features.read_bytes() == b"a model bundle"
    code, _, err = _main(capsys, "embed", world["clip"], "hostilenames:x", "--out", str(tmp_path / "x.json"), *common)
    assert code == 2 and "one file" in err and not (tmp_path / "x.json").exists()
    code, _, err = _main(capsys, "embed", world["clip"], "hostilenames:x", "--out", str(features), "--force", *common)
    assert code == 0, err
    assert json.loads(features.with_suffix(".json").read_text())["ids"] == world["embeddings"].ids
    listing = tmp_path / "list.txt"
    listing.write_text("stripes\n")
    candidates = tmp_path / "candidates.json"
    candidates.write_text("mine")
    code, _, err = _main(capsys, "concepts", "generate", "list", str(listing), "--out", str(candidates))
    assert code == 2 and "--force" in err and candidates.read_text() == "mine"
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "index.html").write_text("an earlier run")
    code, _, err = _main(capsys, "audit", str(world["root"] / "model.cbm"), "--data", "hostilenames:x",
                         "--out", str(tmp_path / "audit"), "--quiet")
    assert code == 2 and "--force" in err and (tmp_path / "audit" / "index.html").read_text() == "an earlier run"


def test_weight_files_that_are_not_tensor_files_fail_in_one_sentence(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    files = {"junk.pth": b"not a tensor file at all", "empty.pt": b"", "junk.safetensors": b"\x00" * 64,
             "evil.pth": pickle.dumps({"fc.weight": Payload()}, protocol=2)}
    messages = {}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError) as info:
            load_backbone(f"torchvision:resnet18@{tmp_path / name}", device="cpu")
        messages[name] = str(info.value)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_backbone(f"torchvision:resnet18@{tmp_path / 'tensor.pth'}", device="cpu")
    clip = write_tiny_clip_dir(tmp_path / "clip")  # an openclip:local-dir: folder: damaged, then without weights
    (clip / "open_clip_model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError) as info:
        load_backbone(f"openclip:local-dir:{clip}", device="cpu")
    messages["local-dir"] = str(info.value)
    (clip / "open_clip_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights file"):  # open_clip would build a random model
        load_backbone(f"openclip:local-dir:{clip}", device="cpu")
    assert not marker.exists()
    assert "could run code when loaded, so it is refused" in messages["evil.pth"]
    for message in messages.values():
        assert "weights_only" not in message and "\n" not in message and message.replace("e.g. ", "").count(". ") == 0


@pytest.mark.parametrize("text, shown", [
    ("**bold**", r"\*\*bold\*\*"),
    ("[link](http://x)", r"\[link\]\(http\://x\)"),
    ("$x$", r"\$x\$"),
    (":red[x]", r"\:red\[x\]"),
    ("<b>x</b>", r"\<b\>x\</b\>"),
    ("# heading", r"\# heading"),
    ("> quote", r"\> quote"),
    ("- item", r"\- item"),
    ("1. item", r"1\. item"),
    ("a_b ~c~ `d` {e} |f| !g &amp;", r"a\_b \~c\~ \`d\` \{e\} \|f\| \!g \&amp;"),
    ("back\\slash", r"back\\slash"),
    ("plain words 42", "plain words 42"),
])
def test_markdown_escaping_shows_the_text_literally(text, shown):
    assert for_markdown(text) == shown


def test_markdown_escaping_keeps_one_line_without_controls_or_indentation():
    shown = for_markdown("    code\nnext\x1b[31m\u202e")
    assert "\n" not in shown and "\x1b" not in shown and "\u202e" not in shown
    assert shown.startswith("\u00a0" * 4 + "code")
    assert r"\\nnext" in shown and r"\\x1b\[31m" in shown and r"\\u202e" in shown
