"""The toy world's ready-made pieces: its embeddings through the cache, its text and label-CAV concept banks,
and its language prior. The demo, the editor's default model, the tests and the benchmarks all build on these,
so each shows the same, reproducible pipeline (generate the world -> embed it -> build banks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbm.backbones import Backbone
from cbm.data.registry import load_dataset
from cbm.embed import Embeddings, embed
from concepts import ConceptBank, cavs_from_labels

SPLITS = ("train", "val", "test")


def toy_embeddings(backbone: Backbone, dataset: str = "toy:images", *, sizes: dict[str, int] | None = None,
                   cache_dir: str | Path | None = None, progress: bool = True, **options: Any) -> dict[str, Embeddings]:
    """Embeddings of the toy world's train/val/test splits (``dataset`` is a ``toy:`` spec without split).

    ``options`` go to the dataset (e.g. ``frames_per_window=4`` for ``toy:videos``).
    """
    result = {}
    for split in SPLITS:
        size = {"n": sizes[split]} if sizes else {}
        data = load_dataset(f"{dataset}@{split}", **size, **options)
        result[split] = embed(backbone, data, cache_dir=cache_dir, progress=progress, num_workers=0)
    return result


def toy_text_bank(backbone: Backbone) -> ConceptBank:
    """A text bank of the world's 30 concepts, each the mean of the world's prompts for it."""
    from cbm.data.toy import CONCEPTS, concept_prompts

    vectors = []
    for concept in CONCEPTS:
        texts = backbone.encode_texts(concept_prompts(concept))
        vectors.append(torch.nn.functional.normalize(texts, dim=1).mean(0))
    return ConceptBank(CONCEPTS, torch.stack(vectors), kind="text", backbone=backbone.fingerprint,
                       provenance={"generator": "toy world vocabulary", "prompts": "cbm.data.toy.concept_prompts",
                                   "encoder": backbone.spec})


def toy_language_prior(threshold: float = 0.5) -> dict[str, list[str]]:
    """The toy world's class -> concepts language prior: the concepts a class has with probability >= threshold."""
    from cbm.data.toy import CLASS_NAMES, CONCEPTS, class_concept_matrix

    matrix = class_concept_matrix()
    return {name: [CONCEPTS[k] for k in np.flatnonzero(matrix[c] >= threshold)] for c, name in enumerate(CLASS_NAMES)}


#: Positive examples per concept for label CAVs (and as many negatives), sampled like Post-hoc CBM's
#: fixed number per concept: the SVM's cost grows with the square of the examples while the CAV
#: hardly moves (toy:cnn, 3000 images: 56 s -> 4.7 s, held-out CAV accuracy 0.911 -> 0.906).
LABEL_CAV_POSITIVES = 500


def label_cav_bank(train: Embeddings, seed: int = 0, max_positives: int | None = LABEL_CAV_POSITIVES) -> ConceptBank:
    """CAVs learned from embeddings with concept labels (toy world, CUB, manifests): the Post-hoc CBM way (SVC's
    hinge loss), with at most ``max_positives`` positive examples per concept (None: all)."""
    return cavs_from_labels(train.features, train.concept_labels, train.concept_names, max_positives=max_positives,
                            solver="torch", seed=seed, backbone=train.backbone_fingerprint)
