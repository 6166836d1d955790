"""Acceptance of the concepts package on the toy world with the shipped toy:clip and toy:cnn models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cbm.backbones import TOY_SPECS
from cbm.data.toy import CLASS_NAMES, CONCEPTS, class_concept_matrix
from concepts import Candidates, ConceptBank, cavs_from_labels, from_class_concept_matrix, select_concepts

pytestmark = pytest.mark.skipif(
    not (TOY_SPECS["toy:clip"].is_dir() and TOY_SPECS["toy:cnn"].is_dir()),
    reason="the shipped toy models (cbm/assets/toy_clip, cbm/assets/toy_cnn) are missing; "
           "build them with `python -m cbm.toymodels.train`")

SIZES = {"train": 600, "test": 300}  # CAV validation is a held-out part of train

# Phrases that describe nothing in the toy world (no shapes, colours, patterns or layout words).
_THINGS = ["violin", "tax form", "glacier", "opera house", "submarine", "keyboard", "sandwich", "giraffe",
           "microscope", "bicycle", "cathedral", "lawn mower", "parrot", "newspaper", "teapot", "volcano",
           "saxophone", "umbrella", "tractor", "library", "penguin", "wristwatch", "harbour", "skateboard",
           "telescope", "bakery"]
_HOW = ["an old {}", "a {} at night", "someone holding a {}", "a {} in the rain"]
DISTRACTORS = [how.format(thing) for thing in _THINGS for how in _HOW]


@pytest.fixture(scope="module")
def toy_embeddings(toy_splits):
    """Small toy splits under both shipped models."""
    return {spec: toy_splits(spec, sizes=SIZES) for spec in ("toy:clip", "toy:cnn")}


def mean_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    aucs = [roc_auc_score(labels[:, k].numpy(), scores[:, k].numpy()) for k in range(labels.shape[1])
            if 0 < labels[:, k].sum() < len(labels)]
    return float(np.mean(aucs))


def test_text_bank_of_the_world_vocabulary_detects_concepts(toy_embeddings):
    clip, splits = toy_embeddings["toy:clip"]
    bank = ConceptBank.from_text(CONCEPTS, clip)
    test = splits["test"]
    scores = bank.scores(test.features, backbone=test.backbone_fingerprint)
    auc = mean_auc(scores, test.concept_labels)
    print(f"toy:clip text bank mean concept ROC-AUC on test: {auc:.3f}")
    assert auc >= 0.90


def test_cavs_on_cnn_embeddings_from_concept_labels(toy_embeddings):
    cnn, splits = toy_embeddings["toy:cnn"]
    train = splits["train"]
    bank = cavs_from_labels(train.features, train.concept_labels, train.concept_names, seed=0,
                            backbone=train.backbone_fingerprint)
    accuracy = float(bank.stats["val_accuracy"].mean())
    print(f"toy:cnn CAVs mean validation accuracy: {accuracy:.3f}")
    assert accuracy >= 0.85
    test = splits["test"]
    assert mean_auc(bank.scores(test.features, backbone=cnn.fingerprint), test.concept_labels) >= 0.85
    with pytest.raises(ValueError, match="backbone"):
        bank.scores(test.features, backbone=toy_embeddings["toy:clip"][0].fingerprint)


def test_selection_keeps_real_concepts_among_distractors(toy_embeddings):
    clip, splits = toy_embeddings["toy:clip"]
    real = from_class_concept_matrix(CLASS_NAMES, CONCEPTS, class_concept_matrix(), threshold=0.5)
    k = 3
    assert min(len(v) for v in real.per_class.values()) >= k
    mixed = Candidates({name: phrases + DISTRACTORS for name, phrases in real.per_class.items()})
    train = splits["train"]
    bank = select_concepts(mixed, clip, train.features, train.labels, CLASS_NAMES, k=k,
                           backbone=train.backbone_fingerprint)
    chosen = [p for phrases in bank.provenance["class_concepts"].values() for p in phrases]
    share = np.mean([p in CONCEPTS for p in chosen])
    print(f"selection: {share:.1%} of {len(chosen)} selected (class, concept) pairs are real concepts")
    assert share >= 0.9
    for name in CLASS_NAMES:  # each real concept selected for a class is one the class really has
        assert set(bank.provenance["class_concepts"][name]) - set(DISTRACTORS) <= set(real.per_class[name])
