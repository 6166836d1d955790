"""``cbm demo``: the toolkit end to end on the offline toy world, built from the pieces in ``cbm.toy``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbm.backbones import load_backbone
from cbm.data.registry import load_dataset
from cbm.embed import Embeddings
from cbm.toy import (
    SPLITS,
    label_cav_bank,
    toy_embeddings,
    toy_language_prior,
    toy_text_bank,
)

logger = logging.getLogger(__name__)

def _probe_accuracy(splits: dict[str, Embeddings]) -> float:
    from cbm.toymodels.quality import linear_probe
    return linear_probe(*(value for split in SPLITS for value in (splits[split].features, splits[split].labels)))[
        "accuracy"]


class _Demo:
    """The demo's shared state: the world's embeddings, banks, output folder and the rows of its table."""

    def __init__(self, out: Path, cache_dir: str | Path | None, sizes: dict[str, int] | None, progress: bool) -> None:
        from cbm.data.toy import CLASS_NAMES, class_prompts

        self.out, self.cache_dir, self.progress = out, cache_dir, progress
        self.rows: list[tuple[str, str, float]] = []
        self.written: list[Path] = []
        self.results: dict[str, Any] = {}
        self.clip = load_backbone("toy:clip")
        self.cnn = load_backbone("toy:cnn")
        self.clip_data = toy_embeddings(self.clip, cache_dir=cache_dir, sizes=sizes, progress=progress)
        self.cnn_data = toy_embeddings(self.cnn, cache_dir=cache_dir, sizes=sizes, progress=progress)
        self.text_bank = toy_text_bank(self.clip)
        self.class_texts = torch.stack([torch.nn.functional.normalize(self.clip.encode_texts(class_prompts(name)),
                                                                      dim=1).mean(0) for name in CLASS_NAMES])

    def wrote(self, path: Path) -> Path:
        """Note a file or folder the demo wrote (listed at the end, for a newcomer to open)."""
        self.written.append(Path(path))
        return Path(path)

    def row(self, measure: str, value: float, split: str = "test") -> float:
        self.rows.append((measure, split, float(value)))
        return float(value)

    def backbones(self) -> None:
        from cbm.data.toy import CONCEPT_GROUPS
        from cbm.toymodels.quality import concept_auc, zero_shot_accuracy

        test = self.clip_data["test"]
        auc = concept_auc(test.features, self.text_bank.vectors, test.concept_labels, self.text_bank.names,
                          CONCEPT_GROUPS)
        self.row("toy:clip zero-shot concept detection (mean ROC-AUC)", auc["mean"])
        self.row("toy:clip zero-shot classification (accuracy)",
                 zero_shot_accuracy(test.features, self.class_texts, test.labels))
        self.row("linear probe on toy:clip embeddings (accuracy)", _probe_accuracy(self.clip_data))
        self.row("linear probe on toy:cnn embeddings (accuracy)", _probe_accuracy(self.cnn_data))
        self.results["concept_auc_per_group"] = auc["per_group"]

    def posthoc(self) -> None:
        from cbm.models import PosthocCBM

        train, val, test = (self.clip_data[split] for split in SPLITS)
        pcbm = PosthocCBM(self.text_bank).fit(train, validation=val)
        accuracy = self.row("PCBM, toy:clip text concepts (accuracy)", pcbm.score(test))
        self.row("PCBM-h, toy:clip text concepts (accuracy)",
                 PosthocCBM(self.text_bank, hybrid=True).fit(train, validation=val).score(test))
        cnn_train = self.cnn_data["train"]
        cav_pcbm = PosthocCBM(label_cav_bank(cnn_train)).fit(cnn_train, validation=self.cnn_data["val"])
        self.row("PCBM, toy:cnn CAV concepts (accuracy)", cav_pcbm.score(self.cnn_data["test"]))
        self.row("PCBM non-zero concept weights per class (mean)", np.mean(list(pcbm.sparsity().values())), "")
        self.text_bank.save(self.wrote(self.out / "toy_clip_text_bank"))
        pcbm.save(self.wrote(self.out / "pcbm_toy_clip.cbm"), metrics={"test_accuracy": accuracy})
        self.results["pcbm_top_concepts"] = {name: pcbm.top_concepts(3)[name] for name in pcbm.class_names[:4]}
        self._audit(pcbm, test)

    def _audit(self, pcbm: Any, test: Embeddings) -> None:
        """The audit report of the PCBM (explain is imported lazily: cbm never depends on it)."""
        try:
            from explain import audit
        except ImportError:  # the toolkit installed without the explain package
            return
        images = load_dataset("toy:images@test", n=len(test))
        report = audit(pcbm, test, name="PCBM (toy:clip text concepts)", data_name="toy:images@test",
                       train=self.clip_data["train"], images=images, out=self.out / "audit", progress=self.progress)
        self.row("PCBM greedy-oracle intervention gain, 20 concepts (accuracy)", report.summary["oracle_gain"])
        self.wrote(self.out / "audit")
        self.results["audit"] = {"html": str(report.paths["html"]),
                                 "top_suspects": [s["concept"] for s in report.data["suspects"][:3]]}

    def language(self) -> None:
        from cbm.data.toy import CLASS_NAMES
        from cbm.models import (
            ConceptMatrixSearch,
            LaBoCBM,
            LinearProbe,
            SparseCBM,
            few_shot,
        )

        train, val, test = (self.clip_data[split] for split in SPLITS)
        one_shot = few_shot(train, 1, seed=1)
        labo = LaBoCBM(self.text_bank, prior=toy_language_prior()).fit(one_shot, validation=val)
        self.row("LaBo, 1 shot per class (accuracy)", labo.score(test))
        self.row("linear probe, 1 shot per class (accuracy)", LinearProbe().fit(one_shot, validation=val).score(test))
        labo.save(self.wrote(self.out / "labo_1shot_toy_clip.cbm"))
        sparse = SparseCBM(self.text_bank, loss="gumbel").fit(train, validation=val)
        self.row("Sparse-CBM (Gumbel), toy:clip text concepts (accuracy)", sparse.score(test))
        self.row("Sparse-CBM top-5 share of concept activation mass", sparse.sparsity(test)["top5_abs_share"])
        sparse.save(self.wrote(self.out / "sparse_toy_clip.cbm"))
        search = ConceptMatrixSearch(self.text_bank, self.class_texts, CLASS_NAMES)
        self.row("Concept Matrix Search, training-free (accuracy)", search.score(test))

    def energy(self, samples: int = 300) -> None:
        from cbm.models import EnergyCBM

        train, val, test = (self.cnn_data[split] for split in SPLITS)
        ecbm = EnergyCBM(hidden=128, batch_size=128, max_epochs=30, seed=0).fit(train, validation=val)
        inference = ecbm.infer(test.features[:samples])  # gradient inference per sample: a subset keeps it quick
        labels, concepts = test.labels[:samples], test.concept_labels[:samples]
        self.row("ECBM, toy:cnn concept labels (accuracy)", (inference.logits.argmax(1) == labels).float().mean())
        self.row("ECBM concept accuracy", ((inference.concept_probs > 0.5).float() == concepts).float().mean())
        ecbm.save(self.wrote(self.out / "ecbm_toy_cnn.cbm"))

    def temporal(self) -> None:
        from cbm.models import TemporalCBM, TimeAveragedCBM

        videos = toy_embeddings(self.clip, "toy:videos", cache_dir=self.cache_dir, progress=self.progress,
                                frames_per_window=4)
        train, val, test = (videos[split] for split in SPLITS)
        motif = TemporalCBM(self.text_bank).fit(train, validation=val)
        self.row("MoTIF temporal CBM, toy videos (video accuracy)", motif.score(test))
        self.row("time-averaged CBM, toy videos (video accuracy)",
                 TimeAveragedCBM(self.text_bank).fit(train, validation=val).score(test))
        motif.save(self.wrote(self.out / "motif_toy_clip.cbm"))


def run_demo(out: str | Path = "cbm-output/demo", *, cache_dir: str | Path | None = None,
             sizes: dict[str, int] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every capability the toolkit has on the toy world; write results under ``out``. ``results["files"]``
    lists every file and folder written (model bundles, concept bank, audit folder, demo.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    demo = _Demo(out, cache_dir, sizes, progress)
    for section in (demo.backbones, demo.posthoc, demo.language, demo.energy, demo.temporal):
        logger.info("demo: %s", section.__name__)
        section()
    results = demo.results
    results["rows"] = [{"measure": name, "split": split, "value": value} for name, split, value in demo.rows]
    results["seconds"] = time.perf_counter() - started
    results["files"] = [str(path) for path in [*demo.written, out / "demo.json"]]
    (out / "demo.json").write_text(json.dumps(results, indent=2))
    return results


def size_on_disk(path: str | Path) -> int:
    """Bytes of a file, or of all the files under a folder."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def format_files(results: dict[str, Any]) -> str:
    """The files the demo wrote with their sizes, then the commands that open its models in the editor."""
    from cbm.untrusted import for_terminal

    files = [Path(name) for name in results["files"]]
    lines = ["files written:"]
    lines += [f"  {for_terminal(path)}{'/' if path.is_dir() else ''}  ({size_on_disk(path) / 2**10:,.0f} KiB)"
              for path in files]
    editor = {path.name: path for path in files}
    lines.append("open a model in the concept editor:")
    if "pcbm_toy_clip.cbm" in editor:
        lines.append(f"  cbm app {for_terminal(editor['pcbm_toy_clip.cbm'])}")
    if "motif_toy_clip.cbm" in editor:
        lines.append(f"  cbm app {for_terminal(editor['motif_toy_clip.cbm'])} --data toy:videos@val")
    return "\n".join(lines)


def format_rows(results: dict[str, Any]) -> str:
    """The demo's results as a plain-text table."""
    width = max(len(row["measure"]) for row in results["rows"])
    lines = [f"{'what the toolkit did':<{width}}  {'split':<5}  value", "-" * (width + 15)]
    lines += [f"{row['measure']:<{width}}  {row['split']:<5}  {row['value']:.3f}" for row in results["rows"]]
    return "\n".join(lines)
