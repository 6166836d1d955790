"""Post-hoc CBM acceptance on the toy world with the shipped models (toy:clip text banks, toy:cnn CAVs)."""

import pytest
import torch

from cbm.backbones import TOY_SPECS
from cbm.data.toy import CONCEPT_GROUPS
from cbm.models import PosthocCBM
from cbm.toy import label_cav_bank, toy_text_bank
from cbm.toymodels.quality import linear_probe

pytestmark = pytest.mark.skipif(not all(path.is_dir() for path in TOY_SPECS.values()),
                                reason="the shipped toy models are missing (python -m cbm.toymodels.train)")
SIZES = {"train": 2000, "val": 500, "test": 1000}


@pytest.fixture(scope="module")
def clip(toy_splits):
    return toy_splits("toy:clip", sizes=SIZES)[0]


@pytest.fixture(scope="module")
def clip_data(toy_splits):
    return toy_splits("toy:clip", sizes=SIZES)[1]


@pytest.fixture(scope="module")
def cnn_data(toy_splits):
    return toy_splits("toy:cnn", sizes=SIZES)[1]


def probe(splits):
    return linear_probe(*(v for s in ("train", "val", "test") for v in (splits[s].features, splits[s].labels)))[
        "accuracy"]


@pytest.mark.parametrize("backbone", ["clip", "cnn"])
def test_pcbm_and_pcbm_h_against_the_linear_probe(backbone, clip, clip_data, cnn_data):
    splits = clip_data if backbone == "clip" else cnn_data
    bank = toy_text_bank(clip) if backbone == "clip" else label_cav_bank(splits["train"])
    reference = probe(splits)
    pcbm = PosthocCBM(bank, lam="path").fit(splits["train"], validation=splits["val"])
    hybrid = PosthocCBM(bank, lam="path", hybrid=True).fit(splits["train"], validation=splits["val"])
    assert pcbm.score(splits["test"]) >= reference - 0.05
    assert hybrid.score(splits["test"]) >= reference - 0.01


@pytest.mark.parametrize("backbone", ["clip", "cnn"])
def test_ground_truth_interventions_raise_accuracy(backbone, clip, clip_data, cnn_data):
    """Every concept set to what its true label stands for (the label map fitted on training data) beats
    no intervention; per-concept class-conditional means do not (toy:cnn 0.891 -> 0.815), which is why
    the map exists. toy:clip text concepts start at 0.985, so its margin is small (0.985 -> 0.994)."""
    splits = clip_data if backbone == "clip" else cnn_data
    train, test = splits["train"], splits["test"]
    bank = toy_text_bank(clip) if backbone == "clip" else label_cav_bank(train)
    model = PosthocCBM(bank).fit(train, validation=splits["val"], concept_labels=train.concept_labels)
    values = model.expected_concepts(test.concept_labels)
    mask = torch.ones_like(values, dtype=torch.bool)
    intervened = float((model.intervene(test, (mask, values)).argmax(1) == test.labels).float().mean())
    assert intervened > model.score(test) + (0.005 if backbone == "clip" else 0.03), (model.score(test), intervened)


def test_pruning_the_spurious_background_fixes_the_shifted_split(toy_splits):
    """The paper's editing claim: prune what the weights lean on, no retraining, no target data.

    On toy:cnn CAVs (probe 0.91) the head leans on the background. A toy:clip text-concept head
    hardly does (background ranks 10-12 of 30, shifted-test accuracy already 0.95), so there the
    claim has nothing to fix."""
    splits = toy_splits("toy:cnn", "toy:spurious", SIZES)[1]
    model = PosthocCBM(label_cav_bank(splits["train"])).fit(splits["train"], validation=splits["val"])
    weight_per_concept = model.weight_.abs().sum(0)
    rank = {model.concept_names[k]: r for r, k in enumerate(weight_per_concept.argsort(descending=True).tolist())}
    suspects = [c for c in CONCEPT_GROUPS["background"] if rank[c] < len(rank) // 3]
    assert suspects, f"the head does not lean on the background: ranks {[rank[c] for c in CONCEPT_GROUPS['background']]}"
    edited = model
    for concept in suspects:
        edited, _ = edited.edit("prune", concept, reason="spurious background")
    before, after = model.score(splits["test"]), edited.score(splits["test"])
    assert after >= before + 0.05, (before, after, suspects)
