"""explain on the toy world with the shipped models: the spurious-background audit and TCAV at CNN/CLIP layers."""

import pytest
import torch
from test_explain_core import one_thread  # noqa: F401 (an autouse fixture)

import explain
from cbm.backbones import TOY_SPECS
from cbm.data.registry import load_dataset
from cbm.data.toy import CLASS_NAMES, SPURIOUS_BACKGROUND, class_concept_matrix
from cbm.models import PosthocCBM
from cbm.toy import label_cav_bank, toy_text_bank

pytestmark = pytest.mark.skipif(not all(path.is_dir() for path in TOY_SPECS.values()),
                                reason="the shipped toy models are missing (python -m cbm.toymodels.train)")
SIZES = {"train": 800, "val": 200, "test": 400}
BACKGROUNDS = {f"{value} background" for value in SPURIOUS_BACKGROUND.values()}


@pytest.fixture(scope="module")
def fitted(toy_splits):
    """Per backbone spec (built on first use): the backbone, its toy:spurious embeddings and a PCBM
    (toy:clip: the world's text concepts; toy:cnn: CAVs from the concept labels)."""
    cache = {}

    def get(spec: str) -> dict:
        if spec not in cache:
            backbone, splits = toy_splits(spec, "toy:spurious", SIZES)
            bank = toy_text_bank(backbone) if spec == "toy:clip" else label_cav_bank(splits["train"])
            model = PosthocCBM(bank).fit(splits["train"], validation=splits["val"],
                                         concept_labels=splits["train"].concept_labels)
            cache[spec] = {"backbone": backbone, "splits": splits, "model": model}
        return cache[spec]

    return get


def test_audit_ranks_the_planted_backgrounds_among_the_top_suspects(fitted, tmp_path):
    spurious = fitted("toy:clip")
    splits = spurious["splits"]
    images = load_dataset("toy:spurious@test", n=SIZES["test"])
    report = explain.audit(spurious["model"], splits["test"], name="pcbm", data_name="toy:spurious@test",
                           train=splits["train"], shift=splits["test"], images=images, seeds=(0,),
                           competences=(1.0,), max_samples=300, out=tmp_path, progress=False)
    top = [s["concept"] for s in report.data["suspects"][:3]]
    assert top[0] in BACKGROUNDS and len(BACKGROUNDS & set(top)) >= 2, report.data["suspects"][:5]
    assert report.data["samples"][0]["thumbnail"].startswith("data:image/png")
    # the same verdict from the world's exact plausibility instead of the labels of the shifted split
    view = explain.ModelView(spurious["model"], explain.as_data(splits["test"]))
    exact = explain.suspect_concepts(explain.concept_effects(view), view.class_names, view.concept_names,
                                     plausibility=class_concept_matrix())
    assert exact[0]["concept"] in BACKGROUNDS


def _tcav_inputs(backbone, concept: str, target: str, n: int = 20):
    """Preprocessed images: the target class's images, images showing ``concept`` from other classes,
    and random images (no restriction), all from a split the model never saw."""
    data = load_dataset("toy:images@val", n=1000)
    has = data.concept_labels[:, data.concept_names.index(concept)] > 0.5
    target_index = CLASS_NAMES.index(target)

    def batch(indices):
        return torch.stack([backbone.preprocess(data.load(int(i))) for i in indices])

    class_rows = [i for i in range(len(data)) if data.labels[i] == target_index][:n]
    concept_rows = [i for i in range(len(data)) if has[i] and data.labels[i] != target_index][:n]
    taken = set(class_rows) | set(concept_rows)
    random_rows = [i for i in range(len(data)) if i not in taken][:n * 22]
    return {target: batch(class_rows)}, {concept: batch(concept_rows)}, batch(random_rows)


@pytest.mark.parametrize("spec, layer", [("toy:cnn", "stage3"), pytest.param("toy:clip", "visual.layer3", marks=(
    pytest.mark.xfail(strict=True, reason="known gap, a limit of TCAV's statistic on toy:clip: 'red' for 'tomato' has "
                      "p 0.37 here (a third of the random pool is red; the CAV flips in 2 of 8 runs). With 90 examples "
                      "'red' scores 0.95-1.0 but random concepts alone score 0.2-0.97 (17 classes: random sets differ "
                      "in class mix, and the tomato gradient is coherent), so p stays 0.11-0.26; see docs/families.md known gaps")))])
def test_tcav_finds_a_planted_concept_at_a_backbone_layer(spec, layer, fitted):
    backbone, model = fitted(spec)["backbone"], fitted(spec)["model"]
    classes, concepts, random = _tcav_inputs(backbone, "red", "tomato")
    report = explain.tcav_layer(backbone, layer, model, model.class_names, classes, concepts, random,
                                pooling="mean", runs=8)
    result = report.result("red", "tomato")
    assert result.significant and result.mean > result.random_mean, result.to_dict()


def test_cbm_tcav_command_on_a_saved_model(fitted, tmp_path, capsys):
    """The command gives the API's report (same seeded draws), prints every verdict and writes JSON + figure."""
    import argparse
    import json

    from cbm.data.registry import load_dataset
    from explain.cli import add_commands

    entry = fitted("toy:cnn")
    entry["model"].save(tmp_path / "cnn.cbm")
    parser = argparse.ArgumentParser(prog="cbm")
    add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["tcav", str(tmp_path / "cnn.cbm"), "--data", "toy:images@val", "--layer", "stage3",
                              "--target", "tomato", "--concept", "red", "--runs", "8", "--out", str(tmp_path / "tcav"),
                              "--cache-dir", str(tmp_path / "cache"), "--quiet"])
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "tcav" / "tcav.json").read_text())["results"][0]
    api = explain.tcav_datasets(entry["backbone"], "stage3", entry["model"], entry["model"].class_names,
                                load_dataset("toy:images@val"), ["tomato"], ["red"], runs=8).results[0]
    assert (saved["concept"], saved["target"], saved["layer"]) == ("red", "tomato", "stage3")
    assert saved["scores"] == api.scores and saved["p_adjusted"] == api.p_adjusted
    assert saved["mean"] > 0.9 > saved["random_mean"], saved
    verdict = "significant" if saved["significant"] else "not significant"
    assert f"{saved['p_adjusted']:.3g}  {verdict}" in printed
    assert (tmp_path / "tcav" / "tcav.png").stat().st_size > 10_000
    unknown = parser.parse_args(["tcav", str(tmp_path / "cnn.cbm"), "--data", "toy:images@val", "--layer", "stage3",
                                 "--target", "tomato", "--concept", "sparkly", "--cache-dir", str(tmp_path / "cache")])
    with pytest.raises(KeyError, match="no examples of concept 'sparkly'"):
        unknown.run(unknown)
