"""Concept-supervised families against the best peer, PyC (``pytorch-concepts`` 1.0.0a7, the ``peers``
extra): our joint and independent ConceptBottleneck, ConceptEmbeddingModel and EnergyCBM beside PyC's
ConceptBottleneckModel and ConceptEmbeddingModel, on the same toy-world embeddings (both shipped
backbones), concept labels from the world, in one process with the same threads.

Each library runs with its documented defaults plus the same small validation grid (the learning rates
``LRS``, the one with the best validation accuracy kept). PyC: the model classes' defaults (no latent
backbone, CEM embedding size 8), trained as its guide's manual PyTorch loop with Conceptarium's training
defaults (AdamW, batch 512, at most 200 epochs, early stopping on the validation loss with patience 20,
the validation loss being BCE over the concepts + cross-entropy over the classes), on features
standardised with the training statistics (Conceptarium's input scaler). EnergyCBM runs at its defaults
(no grid: it is the slowest to fit). Measured per model: test accuracy, concept accuracy, accuracy after
setting 4 random concepts per sample and after setting all of them to their ground-truth labels (PyC:
the labels as evidence, the other concepts at their predicted probabilities), fit time of the chosen
setting, and the time to predict the test split.

Goals: our joint CBM and CEM at least as accurate as PyC's (within 0.5 points) and at least as fast to
fit; EnergyCBM's fit and predict times within 3x of our joint CBM's. Without PyC installed its rows are
skipped with the reason (nothing is installed at run time).

Run: ``python benchmarks/bench_peers.py [--train 6000] [--val 1000] [--test 2000] [--backbones toy:cnn
toy:clip] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import BenchResult, Row, accuracy_row, format_table, speedup_row
from cbm.models import ConceptBottleneck, ConceptEmbeddingModel, EnergyCBM

LRS = (1e-3, 1e-2)
PYC_REQUIREMENT = "pytorch-concepts==1.0.0a7"
#: Conceptarium's training defaults (conceptarium/conf/_default.yaml, dataset/_commons.yaml).
PYC_TRAINING = {"batch_size": 512, "max_epochs": 200, "patience": 20}
OURS: dict[str, Callable[[float], Any]] = {
    "joint CBM": lambda lr: ConceptBottleneck(training="joint", lr=lr),
    "independent CBM": lambda lr: ConceptBottleneck(training="independent", lr=lr),
    "CEM": lambda lr: ConceptEmbeddingModel(lr=lr),
}


def random_mask(shape: tuple[int, int], count: int, seed: int = 0) -> torch.Tensor:
    """``count`` random concepts per sample (the same draw for every model)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    order = torch.rand(shape, generator=torch.Generator().manual_seed(seed)).argsort(1)
    return mask.scatter_(1, order[:, :count], True)


def summary(predict: Callable[[], torch.Tensor], probabilities: torch.Tensor,
            intervened: Callable[[torch.Tensor], torch.Tensor], truth: torch.Tensor, labels: torch.Tensor,
            fit_s: float, lr: float | None) -> dict[str, float]:
    """The measures of one fitted model on the test split; ``intervened(mask)`` gives logits with the masked
    concepts set to their labels."""
    started = time.perf_counter()
    logits = predict()
    predict_s = time.perf_counter() - started
    correct = lambda scores: float((scores.argmax(1) == labels).float().mean())  # noqa: E731
    return {"accuracy": correct(logits), "concept_accuracy": float(((probabilities > 0.5).float() == truth)
                                                                   .float().mean()),
            "after_4": correct(intervened(random_mask(tuple(truth.shape), 4))),
            "after_all": correct(intervened(torch.ones_like(truth, dtype=torch.bool))),
            "fit_s": fit_s, "predict_s": predict_s, "lr": lr}


def run_ours(make: Callable[[float], Any], splits: dict, lrs: tuple[float, ...] | None) -> dict[str, float]:
    """Fit over the grid (or once, ``lrs=None``), keep the best validation accuracy, measure it."""
    best, best_val = None, -1.0
    for lr in lrs or (None,):
        started = time.perf_counter()
        model = make(lr).fit(splits["train"], validation=splits["val"])
        fit_s = time.perf_counter() - started
        val = model.score(splits["val"])
        if val > best_val:
            best, best_val = (model, fit_s, lr), val
    model, fit_s, lr = best
    test = splits["test"]
    truth = torch.as_tensor(test.concept_labels).float()
    labels = torch.as_tensor(test.labels).long()
    probabilities = (model.concept_probabilities(test) if hasattr(model, "concept_probabilities")
                     else model.concepts(test))
    return summary(lambda: model.decision_function(test), probabilities,
                   lambda mask: model.intervene(test, (mask, truth)), truth, labels, fit_s, lr)


# ---------------------------------------------------------------------------------------------------- PyC
def pyc_available() -> bool:
    return importlib.util.find_spec("torch_concepts") is not None


class PyCModel:
    """A PyC high-level model on standardised embeddings with its manual training loop (see the docstring)."""

    def __init__(self, kind: str, splits: dict, lr: float, seed: int = 0) -> None:
        import torch_concepts as pyc
        from torch_concepts.nn import ConceptBottleneckModel, ConceptEmbeddingModel

        train = splits["train"]
        self.mean, self.std = train.features.mean(0), train.features.std(0).clamp_min(1e-6)
        self.k = torch.as_tensor(train.concept_labels).shape[1]
        self.names = [f"concept {i}" for i in range(self.k)]
        classes = len(train.class_names)
        annotations = pyc.Annotations(labels=[*self.names, "class"], cardinalities=[1] * self.k + [classes],
                                      types=["binary"] * self.k + ["categorical"])
        cls = ConceptBottleneckModel if kind == "CBM" else ConceptEmbeddingModel
        torch.manual_seed(seed)
        self.model = cls(input_size=train.features.shape[1], annotations=annotations, task_names=["class"])
        self.lr, self.seed = lr, seed

    def inputs(self, data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ((data.features - self.mean) / self.std, torch.as_tensor(data.concept_labels).float(),
                torch.as_tensor(data.labels).long())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[N, K + C]: concept logits then class logits."""
        return self.model(input=x, query=[*self.names, "class"]).logits.tensor

    def loss(self, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = self.logits(x)
        return F.binary_cross_entropy_with_logits(z[:, :self.k], c) + F.cross_entropy(z[:, self.k:], y)

    def fit(self, splits: dict) -> PyCModel:
        x, c, y = self.inputs(splits["train"])
        val = self.inputs(splits["val"])
        optimiser = torch.optim.AdamW(self.model.parameters(), lr=self.lr)
        generator = torch.Generator().manual_seed(self.seed)
        best, state, stale = math.inf, None, 0
        for _ in range(PYC_TRAINING["max_epochs"]):
            self.model.train()
            for index in torch.randperm(len(x), generator=generator).split(PYC_TRAINING["batch_size"]):
                loss = self.loss(x[index], c[index], y[index])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            self.model.eval()
            with torch.no_grad():
                current = float(self.loss(*val))
            if state is None or current < best:
                best, stale = current, 0
                state = {name: tensor.clone() for name, tensor in self.model.state_dict().items()}
            else:
                stale += 1
                if stale >= PYC_TRAINING["patience"]:
                    break
        self.model.load_state_dict(state)
        self.model.eval()
        return self

    def intervened(self, x: torch.Tensor, mask: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """Class logits with the masked concepts given as evidence (their labels) and the others at the
        model's own probabilities."""
        with torch.no_grad():
            probabilities = torch.sigmoid(self.logits(x)[:, :self.k])
            values = torch.where(mask, truth, probabilities)
            evidence = {name: values[:, i:i + 1] for i, name in enumerate(self.names)}
            return self.model(input=x, query=["class"], evidence=evidence).logits.tensor


def run_pyc(kind: str, splits: dict, lrs: tuple[float, ...]) -> dict[str, float]:
    best, best_val = None, -1.0
    for lr in lrs:
        started = time.perf_counter()
        model = PyCModel(kind, splits, lr).fit(splits)
        fit_s = time.perf_counter() - started
        x, _, y = model.inputs(splits["val"])
        with torch.no_grad():
            val = float((model.logits(x)[:, model.k:].argmax(1) == y).float().mean())
        if val > best_val:
            best, best_val = (model, fit_s, lr), val
    model, fit_s, lr = best
    x, truth, labels = model.inputs(splits["test"])

    def predict() -> torch.Tensor:
        with torch.no_grad():
            return model.logits(x)[:, model.k:]

    with torch.no_grad():
        probabilities = torch.sigmoid(model.logits(x)[:, :model.k])
    return summary(predict, probabilities, lambda mask: model.intervened(x, mask, truth), truth, labels, fit_s, lr)


# ---------------------------------------------------------------------------------------------------- rows
def informative(name: str, value: float, unit: str = "acc") -> Row:
    return Row(name, value, None, unit, None, "", None)


def within_row(name: str, ours_s: float, reference_s: float, limit: float) -> Row:
    """A time row whose ratio is ours over the reference (goal: at most ``limit`` times the reference)."""
    ratio = ours_s / max(reference_s, 1e-12)
    return Row(name, ours_s, reference_s, "s", ratio, f"<= {limit:g}x the joint CBM", ratio <= limit)


def measure(train: int = 6000, val: int = 1000, test: int = 2000, backbones: tuple[str, ...] = ("toy:cnn", "toy:clip"),
            lrs: tuple[float, ...] = LRS, energy: bool = True, cache_dir: str | None = None,
            threads: int = 0) -> BenchResult:
    """Ours against PyC on the toy world embedded with each backbone (see the module docstring)."""
    from cbm.backbones import load_backbone
    from cbm.toy import toy_embeddings

    if threads:
        torch.set_num_threads(threads)
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # warm-up: the first optimiser imports torch._dynamo
    peers = pyc_available()
    rows, notes = [], []
    if not peers:
        notes.append(f"PyC rows skipped: pytorch-concepts is not installed (pip install '.[peers]', which pins "
                     f"{PYC_REQUIREMENT}); this benchmark installs nothing at run time.")
    for spec in backbones:
        splits = toy_embeddings(load_backbone(spec, device="cpu"), "toy:images",
                                sizes={"train": train, "val": val, "test": test}, cache_dir=cache_dir, progress=False)
        results = {name: run_ours(make, splits, lrs) for name, make in OURS.items()}
        if energy:
            results["EnergyCBM"] = run_ours(lambda lr: EnergyCBM(), splits, None)
        if peers:
            results.update({f"PyC {kind}": run_pyc(kind, splits, lrs) for kind in ("CBM", "CEM")})
        for ours, peer in (("joint CBM", "PyC CBM"), ("CEM", "PyC CEM")):
            if peer in results:
                rows.append(accuracy_row(f"{spec} {ours}: test accuracy vs {peer}", results[ours]["accuracy"],
                                         results[peer]["accuracy"], within=0.5))
                rows.append(speedup_row(f"{spec} {ours}: fit time vs {peer}", results[ours]["fit_s"],
                                        results[peer]["fit_s"], 1))
        if "EnergyCBM" in results:
            for measure_name in ("fit_s", "predict_s"):
                what = "fit" if measure_name == "fit_s" else "predict"
                rows.append(within_row(f"{spec} EnergyCBM: {what} time", results["EnergyCBM"][measure_name],
                                       results["joint CBM"][measure_name], 3))
            rows.append(accuracy_row(f"{spec} EnergyCBM: test accuracy vs joint CBM", results["EnergyCBM"]["accuracy"],
                                     results["joint CBM"]["accuracy"], within=None))
        for name, result in results.items():
            rows.append(informative(f"{spec} {name}: accuracy, all concepts true", result["after_all"]))
            notes.append(f"{spec} {name}: accuracy {result['accuracy']:.4f}, concept accuracy "
                         f"{result['concept_accuracy']:.4f}, after 4 true concepts {result['after_4']:.4f}, after all "
                         f"{result['after_all']:.4f}, fit {result['fit_s']:.2f} s, predict {result['predict_s']:.3f} s"
                         + (f" (lr {result['lr']:g})" if result["lr"] is not None else " (defaults)"))
    setup = (f"toy world ({', '.join(backbones)}), {train} train / {val} val / {test} test, 30 concept labels, "
             f"lr grid {', '.join(f'{lr:g}' for lr in lrs)}, {torch.get_num_threads()} threads")
    return BenchResult("peers", setup, rows, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--backbones", nargs="+", default=["toy:cnn", "toy:clip"])
    parser.add_argument("--no-energy", action="store_true", help="leave EnergyCBM out")
    parser.add_argument("--cache-dir", help="embedding cache (default: $CBM_CACHE_DIR or ~/.cache/cbm)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    print(format_table([measure(args.train, args.val, args.test, tuple(args.backbones), energy=not args.no_energy,
                                cache_dir=args.cache_dir, threads=args.threads)]))


if __name__ == "__main__":
    main()
