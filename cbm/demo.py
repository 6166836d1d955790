"""``cbm demo``: the toolkit end to end on the offline toy world, and the helpers it is built from.

The helpers (``toy_embeddings``, ``toy_text_bank``, ``label_cav_bank``) are also what the tests and
the editor's default model use, so every one of them shows the same, reproducible pipeline:
generate the world -> embed it through the cache -> build concept banks -> fit models.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbm.backbones import Backbone, load_backbone
from cbm.data.registry import load_dataset
from cbm.embed import Embeddings, embed
from concepts import ConceptBank, cavs_from_labels

logger = logging.getLogger(__name__)

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


def label_cav_bank(train: Embeddings, seed: int = 0) -> ConceptBank:
    """CAVs learned from embeddings with concept labels (toy world, CUB, manifests): the Post-hoc CBM way."""
    return cavs_from_labels(train.features, train.concept_labels, train.concept_names, seed=seed,
                            backbone=train.backbone_fingerprint)


def _probe_accuracy(splits: dict[str, Embeddings]) -> float:
    from cbm.toymodels.quality import linear_probe
    return linear_probe(*(value for split in SPLITS for value in (splits[split].features, splits[split].labels)))[
        "accuracy"]


def run_demo(out: str | Path = "cbm-output/demo", *, cache_dir: str | Path | None = None,
             sizes: dict[str, int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every capability the toolkit has on the toy world; write results under ``out``."""
    from cbm.models import PosthocCBM
    from cbm.toymodels.quality import concept_auc, zero_shot_accuracy
    from cbm.data.toy import CLASS_NAMES, CONCEPT_GROUPS, class_prompts

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[tuple[str, str, float]] = []
    results: dict[str, Any] = {}

    clip = load_backbone("toy:clip")
    cnn = load_backbone("toy:cnn")
    clip_data = toy_embeddings(clip, cache_dir=cache_dir, sizes=sizes, progress=progress)
    cnn_data = toy_embeddings(cnn, cache_dir=cache_dir, sizes=sizes, progress=progress)
    test = clip_data["test"]

    text_bank = toy_text_bank(clip)
    auc = concept_auc(test.features, text_bank.vectors, test.concept_labels, text_bank.names, CONCEPT_GROUPS)
    class_texts = torch.stack([torch.nn.functional.normalize(clip.encode_texts(class_prompts(name)), dim=1).mean(0)
                               for name in CLASS_NAMES])
    rows += [("toy:clip zero-shot concept detection (mean ROC-AUC)", "test", auc["mean"]),
             ("toy:clip zero-shot classification (accuracy)", "test",
              zero_shot_accuracy(test.features, class_texts, test.labels)),
             ("linear probe on toy:clip embeddings (accuracy)", "test", _probe_accuracy(clip_data)),
             ("linear probe on toy:cnn embeddings (accuracy)", "test", _probe_accuracy(cnn_data))]
    results["concept_auc_per_group"] = auc["per_group"]

    pcbm = PosthocCBM(text_bank).fit(clip_data["train"], validation=clip_data["val"])
    hybrid = PosthocCBM(text_bank, hybrid=True).fit(clip_data["train"], validation=clip_data["val"])
    cav_bank = label_cav_bank(cnn_data["train"])
    cav_pcbm = PosthocCBM(cav_bank).fit(cnn_data["train"], validation=cnn_data["val"])
    rows += [("PCBM, toy:clip text concepts (accuracy)", "test", pcbm.score(test)),
             ("PCBM-h, toy:clip text concepts (accuracy)", "test", hybrid.score(test)),
             ("PCBM, toy:cnn CAV concepts (accuracy)", "test", cav_pcbm.score(cnn_data["test"])),
             ("PCBM non-zero concept weights per class (mean)", "", float(np.mean(list(pcbm.sparsity().values()))))]
    text_bank.save(out / "toy_clip_text_bank")
    pcbm.save(out / "pcbm_toy_clip.cbm", metrics={"test_accuracy": rows[-4][2]})
    results["top_concepts"] = {name: pcbm.top_concepts(3)[name] for name in pcbm.class_names[:4]}

    results["rows"] = [{"measure": name, "split": split, "value": value} for name, split, value in rows]
    results["seconds"] = time.perf_counter() - started
    (out / "demo.json").write_text(json.dumps(results, indent=2))
    return results


def format_rows(results: dict[str, Any]) -> str:
    """The demo's results as a plain-text table."""
    width = max(len(row["measure"]) for row in results["rows"])
    lines = [f"{'what the toolkit did':<{width}}  {'split':<5}  value", "-" * (width + 15)]
    lines += [f"{row['measure']:<{width}}  {row['split']:<5}  {row['value']:.3f}" for row in results["rows"]]
    return "\n".join(lines)
