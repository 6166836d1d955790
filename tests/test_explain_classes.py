"""Evaluation matches classes by name: ``cbm eval``, ``explain.audit`` and ``cbm audit`` on a folder dataset
that holds only some of the model's classes (``cbm.embed.match_classes``)."""

import argparse
import json
import shutil

import pytest
import torch
from PIL import Image
from test_explain_core import one_thread  # noqa: F401 (an autouse fixture)
from tiny_models import write_tiny_clip_dir

import explain
from cbm import cli
from cbm.backbones import load_backbone
from cbm.data.folders import ImageFolder
from cbm.embed import embed, match_classes
from cbm.models import PosthocCBM
from concepts import ConceptBank
from explain.cli import add_commands

SHADES = {"blue": (40, 60, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A PCBM fitted on blue/green/red squares (6 each) and saved; folders with only blue and red, and with
    a class it does not know."""
    root = tmp_path_factory.mktemp("classes")
    for name, colour in SHADES.items():
        (root / "all" / name).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (24, 24), tuple(min(255, c + 6 * i) for c in colour)).save(root / "all" / name / f"{i}.png")
    for kept in ("blue", "red"):
        shutil.copytree(root / "all" / kept, root / "some" / kept)
    shutil.copytree(root / "some", root / "unknown")
    shutil.copytree(root / "all" / "green", root / "unknown" / "purple")
    backbone = load_backbone(f"openclip:local-dir:{write_tiny_clip_dir(root / 'clip')}", device="cpu")
    train = embed(backbone, ImageFolder(root / "all"), cache_dir=root / "cache", progress=False, num_workers=0)
    bank = ConceptBank.from_text(["reddish", "greenish", "bluish", "bright", "square"], backbone)
    model = PosthocCBM(bank, lam=1e-4).fit(train)
    assert model.class_names == ["blue", "green", "red"] and model.score(train) == 1.0
    model.save(root / "model.cbm")
    some = embed(backbone, ImageFolder(root / "some"), cache_dir=root / "cache", progress=False, num_workers=0)
    return {"root": root, "model": model, "some": some, "backbone": backbone}


def test_match_classes_renumbers_labels_by_name_and_names_unknown_classes(folders):
    some = folders["some"]
    assert some.class_names == ["blue", "red"] and set(some.labels.tolist()) == {0, 1}
    assert folders["model"].score(some) == 0.5  # positional: "red" (1) read as the model's "green"
    matched = match_classes(some, folders["model"].class_names)
    assert matched.class_names == ["blue", "green", "red"]
    assert matched.labels.tolist() == [0 if label == 0 else 2 for label in some.labels.tolist()]
    assert folders["model"].score(matched) == 1.0
    assert match_classes(matched, folders["model"].class_names) is matched
    purple = embed(folders["backbone"], ImageFolder(folders["root"] / "unknown"), cache_dir=folders["root"] / "cache",
                   progress=False, num_workers=0)
    with pytest.raises(ValueError, match="classes the model does not know: purple"):
        match_classes(purple, folders["model"].class_names)


def test_cbm_eval_and_audit_match_classes_by_name(folders, tmp_path, capsys):
    root = folders["root"]
    common = ["--cache-dir", str(root / "cache")]
    assert cli.main(["eval", str(root / "model.cbm"), "--data", f"folder:{root / 'some'}", "--json", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == 1.0 and result["samples"] == 12
    assert cli.main(["eval", str(root / "model.cbm"), "--data", f"folder:{root / 'unknown'}", *common]) == 2
    assert "classes the model does not know: purple" in capsys.readouterr().err

    report = explain.audit(folders["model"], folders["some"], seeds=(0,), competences=(1.0,), max_samples=50,
                           examples=1, progress=False)
    assert report.summary["accuracy"] == 1.0
    confusion = torch.tensor(report.data["classification"]["confusion"])
    assert confusion.shape == (3, 3) and confusion[1].sum() == 0 and torch.equal(confusion.diag(), torch.tensor([6, 0, 6]))

    parser = argparse.ArgumentParser(prog="cbm")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["audit", str(root / "model.cbm"), "--data", f"folder:{root / 'some'}", "--out",
                              str(tmp_path), "--seeds", "1", "--competence", "1.0", "--no-thumbnails", "--quiet",
                              "--fail-under", "accuracy=1.0", *common])
    assert args.run(args) == 0
