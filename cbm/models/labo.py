"""LaBo, Language in a Bottle (Yang et al., CVPR 2023), its few-shot protocol and the linear-probe baseline.

The bottleneck is the similarity of an image to M concept texts, ``D = x . E^T`` [N, M], with E the
unit text vectors of a concept bank (normally chosen per class by ``concepts.select_concepts``).
A class-concept association matrix ``W`` [C, M] starts from the language prior (``init_value``
where class y proposed concept c, zero elsewhere; a concept proposed by several classes counts for
every one of them) and is trained with cross-entropy and Adam on

    logits = scale * D . softmax(W, dim=concepts)^T

so each class score is a convex combination of concept similarities. The epoch with the best
validation accuracy is kept (model selection on the validation split, never on test data).
Optional terms (the reference's two switched-off ones): ``l1`` times the largest row L1 norm of W,
and ``diversity`` times ``diversity_term``, the reference's ``-var(sim, dim=0).mean()``: minus the
(unbiased) variance over the batch of each class's score ``D . softmax(W)^T`` (before the scale),
averaged over classes. With a full batch streamed in chunks it is summed exactly from per-chunk
parts around the batch mean of the scores.

Feature scaling, the one deliberate departure from the paper's defaults:

- ``normalize=True`` (ours, default): image features are L2-normalised, so D holds cosines in
  [-1, 1] whatever the backbone; with ``scale=100`` (CLIP's logit scale) the logits have CLIP's
  zero-shot range and W can be trained full-batch at lr 0.05 in tens to hundreds of epochs.
- ``normalize=False`` (the paper's code: raw ``encode_image`` features, x100): the logit range,
  and so the effective learning rate, depends on the backbone's raw feature norms, which is why
  the paper needs lr 1e-5..1e-4 and thousands of epochs (``LaBoCBM.paper_recipe``). The bank's
  text vectors are unit vectors either way (the paper also leaves text features raw; a bank keeps
  only their direction).

After fitting, ``weight_`` [C, M] holds the softmaxed W (rows sum to 1): it is the head used for
prediction, explanations and edits; ``association_`` keeps the raw W.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from cbm.backbones import resolve_device
from cbm.embed import Embeddings
from cbm.models.base import (
    ConceptBottleneckModel,
    LinearHeadEdits,
    Validation,
    _restore_common,
    accuracy,
    as_matrix,
    bank_from_state,
    bank_state,
    check_tensors,
    prepare_validation,
)
from cbm.models.baselines import LinearProbe
from cbm.models.streaming import Rows, Stream, evaluate, should_stream
from concepts.bank import ConceptBank
from concepts.select import match_class_names

logger = logging.getLogger(__name__)

FEW_SHOTS: tuple[int | str, ...] = (1, 2, 4, 8, 16, "all")


# ---------------------------------------------------------------------------------------------
# LaBo
# ---------------------------------------------------------------------------------------------


def diversity_term(class_scores: torch.Tensor, centre: torch.Tensor | None = None, n: int | None = None) -> torch.Tensor:
    """The reference's diversity term ``-var(class_scores, dim=0).mean()``: minus each class's variance over
    the batch (unbiased), averaged over classes, rewarding class scores that differ between images.

    Given the batch mean ``centre`` [C] and the batch size ``n``, the share of one part of the batch: the
    parts' shares add up to the whole batch's value and gradient."""
    if centre is None:
        centre, n = class_scores.mean(dim=0), len(class_scores)
    if n < 2:
        return class_scores.sum() * 0.0
    return -(class_scores - centre).pow(2).sum() / ((n - 1) * class_scores.shape[1])


class LaBoCBM(LinearHeadEdits, ConceptBottleneckModel):
    """LaBo over a text concept bank; see the module docstring.

    Parameters
    ----------
    bank: a text ConceptBank (unit text vectors), normally from ``concepts.select_concepts``.
    prior: class name -> concepts proposed for it; default (None) reads the bank's provenance
        (``associations``: concept -> every class that proposed it, else ``class_concepts``);
        "none" starts from W = 0 (uniform weights, no language prior).
    init_value: the prior's value in W (1.0 in the paper; 0.01-0.1 for HAM10000 few-shot).
    normalize: L2-normalise image features (default) or use them raw as the paper does.
    scale: the logit scale (100 in the paper).
    lr, epochs, batch_size: Adam on W; ``batch_size=None`` is full batch.
    eval_every: epochs between validation checks (the paper: 10).
    patience: stop after this many checks without a better validation accuracy (None: run all epochs).
    l1, diversity: weights of the optional terms (0 = off, as in the paper's configs).
    stream: keep the training data on the device (False), stream it from host memory in batches and
        chunks (True; a full batch then adds up its gradient chunk by chunk), or decide by free device
        memory ("auto"); see ``cbm.models.streaming``.
    """

    family = "labo"

    def __init__(self, bank: ConceptBank, *, prior: Mapping[str, Sequence[str]] | Literal["none"] | None = None,
                 init_value: float = 1.0, normalize: bool = True, scale: float = 100.0, lr: float = 0.05,
                 epochs: int = 1000, batch_size: int | None = None, eval_every: int = 1, patience: int | None = 50,
                 l1: float = 0.0, diversity: float = 0.0, seed: int = 0, device: str = "auto",
                 stream: Stream = "auto") -> None:
        self.bank = bank
        self.prior = prior
        self.init_value = init_value
        self.normalize = normalize
        self.scale = scale
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.eval_every = eval_every
        self.patience = patience
        self.l1 = l1
        self.diversity = diversity
        self.seed = seed
        self.device = device
        self.stream = stream

    @classmethod
    def paper_recipe(cls, bank: ConceptBank, **overrides: Any) -> LaBoCBM:
        """The reference code's setting: raw features x100, Adam lr 1e-4, 5,000 epochs, validation every
        10 epochs, batch 256, no early stopping (CIFAR-10 uses lr 1e-4 and 15,000 epochs, CUB 5e-5)."""
        params = dict(normalize=False, scale=100.0, lr=1e-4, epochs=5000, batch_size=256, eval_every=10,
                      patience=None)
        return cls(bank, **{**params, **overrides})

    # ------------------------------------------------------------------ concepts and head
    def _similarities(self, features: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            features = nn.functional.normalize(features, dim=1)
        return features @ self.bank.vectors.to(features.device).T

    def concepts(self, x: Any) -> torch.Tensor:
        """Image-concept similarities [N, M] (cosines by default, raw dot products with normalize=False)."""
        return self._similarities(self._features(x))

    def predict_from_concepts(self, c: Any) -> torch.Tensor:
        scores = as_matrix(c, "concept scores", len(self.concept_names_))
        return self.scale * scores @ self.weight_.T

    def contributions(self, x: Any, concepts: Any = None) -> torch.Tensor:
        """Exact per-concept contributions [N, C, M] (at ``concepts`` when given): logit = sum over concepts."""
        return self.scale * self._concepts_or(x, concepts)[:, None, :] * self.weight_[None]

    def class_concept_weights(self) -> torch.Tensor:
        """The softmaxed association matrix [C, M] (rows sum to 1 unless edited): LaBo's explanation."""
        self._check_fitted()
        return self.weight_.clone()

    def prior_matrix(self, class_names: Sequence[str] | None = None) -> torch.Tensor:
        """The language prior [C, M]: 1 where the class proposed the concept, 0 elsewhere (the prior's class
        names match the data's ignoring case, spaces and underscores)."""
        class_names = list(class_names or self.class_names_)
        names = list(self.bank.names)
        matrix = torch.zeros(len(class_names), len(names))
        if isinstance(self.prior, str):
            if self.prior != "none":
                raise ValueError(f"prior must be a class -> concepts mapping, None or 'none', got {self.prior!r}.")
            return matrix
        mapping = self.prior if self.prior is not None else _prior_from_provenance(self.bank.provenance)
        if mapping is None:
            raise ValueError("the bank records no class-concept associations (it was not made by "
                             "concepts.select_concepts); pass prior={class: [concepts]} or prior='none'.")
        column = {name: i for i, name in enumerate(names)}
        row = {name: i for i, name in enumerate(class_names)}
        matched = match_class_names(list(mapping), class_names, strict=False)
        unknown = [name for name in mapping if name not in matched]
        if not matched:
            raise ValueError(f"none of the prior's classes ({list(mapping)[:5]}) is a class of the data "
                             f"({class_names[:5]}).")
        if unknown:
            logger.warning("the prior names %d classes the data lacks (ignored): %s", len(unknown), unknown[:5])
        for name, class_name in matched.items():
            for concept in mapping[name]:
                if concept in column:
                    matrix[row[class_name], column[concept]] = 1.0
        return matrix

    # ------------------------------------------------------------------ fitting
    def fit(self, x: Any, y: Any = None, *, validation: Validation = None, class_names: list[str] | None = None,
            concept_labels: Any = None) -> LaBoCBM:
        """Train the association matrix; concept labels are not used (LaBo needs none)."""
        if self.bank.kind != "text":
            raise ValueError(f"LaBo needs a text concept bank, got a {self.bank.kind!r} bank.")
        features, labels = self._begin_bank_fit(x, y, class_names)
        for name, value in (("lr", self.lr), ("scale", self.scale), ("epochs", self.epochs),
                            ("eval_every", self.eval_every)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}.")
        prior = self.prior_matrix()
        train_x, train_y, val_x, val_y, source = prepare_validation(self, features, labels, validation, self.seed,
                                                                    self.bank)
        device = resolve_device(self.device)
        train_s, val_s = self._similarities(train_x), self._similarities(val_x)
        streamed = should_stream(self.stream, (train_s, train_y, val_s, val_y), device)
        train, val = Rows((train_s, train_y), device, streamed), Rows((val_s, val_y), device, streamed)
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        association = nn.Parameter((self.init_value * prior).to(device))
        optimiser = torch.optim.Adam([association], lr=self.lr)

        def logits_of(scores: torch.Tensor) -> torch.Tensor:
            return self.scale * scores @ torch.softmax(association, dim=1).T

        def step(parts: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], n: int) -> float:
            """One Adam step on the mean loss over ``n`` rows given in ``parts()`` (a batch, or the chunks of a
            full batch): each part's share of the gradient is added up before the step. The diversity term
            is a variance over all n rows: each part adds its squared deviations from the batch mean of the
            class scores (one extra pass without gradients), which sums to the exact value and gradient."""
            optimiser.zero_grad()
            total = 0.0
            if self.diversity:
                with torch.no_grad():
                    centre = sum(logits_of(scores).sum(dim=0) for scores, _ in parts()) / (n * self.scale)
            for scores, labels in parts():
                logits = logits_of(scores)
                loss = nn.functional.cross_entropy(logits, labels, reduction="sum") / n
                if self.diversity:
                    loss = loss + self.diversity * diversity_term(logits / self.scale, centre, n)
                loss.backward()
                total += float(loss.detach())
            if self.l1:
                penalty = self.l1 * association.abs().sum(dim=1).max()
                penalty.backward()
                total += float(penalty.detach())
            optimiser.step()
            return total

        initial_val = evaluate(val, logits_of)[0]
        best = {"val_accuracy": initial_val, "val_loss": math.inf, "epoch": 0, "seconds": 0.0,
                "w": association.detach().clone()}
        history = [{"epoch": 0, "seconds": 0.0, "val_accuracy": initial_val}]
        started, stale, lowest = time.perf_counter(), 0, math.inf
        batch = self.batch_size or len(train)
        epoch = 0
        for epoch in range(1, int(self.epochs) + 1):
            if batch < len(train):
                for index in torch.randperm(len(train), generator=generator).split(batch):
                    rows = train.batch(index)
                    train_loss = step(lambda: [rows], len(index))
            else:
                train_loss = step(train.chunks, len(train))
            if epoch % self.eval_every and epoch != self.epochs:
                continue
            val_acc, val_loss = evaluate(val, logits_of)
            seconds = time.perf_counter() - started
            history.append({"epoch": epoch, "seconds": seconds, "val_accuracy": val_acc, "val_loss": val_loss,
                            "train_loss": train_loss})
            progressed = val_acc > best["val_accuracy"] or val_loss < lowest - 1e-4
            lowest = min(lowest, val_loss)
            stale = 0 if progressed else stale + 1
            if (val_acc, -val_loss) > (best["val_accuracy"], -best["val_loss"]):
                best = {"val_accuracy": val_acc, "val_loss": val_loss, "epoch": epoch, "seconds": seconds,
                        "w": association.detach().clone()}
            if self.patience is not None and stale >= self.patience:
                break
        self.association_ = best["w"].cpu()
        self.weight_ = torch.softmax(self.association_, dim=1)
        self.prior_ = prior
        self.reference_high_ = torch.quantile(train_s, 0.95, dim=0)
        self.reference_low_ = torch.quantile(train_s, 0.05, dim=0)
        self.history_ = history
        self.metrics_ = {"train_accuracy": accuracy(self.predict_from_concepts(train_s), train_y),
                         "val_accuracy": best["val_accuracy"], "prior_val_accuracy": initial_val}
        self.training_ = {"samples": len(train_x), "validation": source, "validation_samples": len(val_x),
                          "epochs_run": epoch, "best_epoch": best["epoch"], "seconds": time.perf_counter() - started,
                          "seconds_to_best": best["seconds"], "prior_pairs": int(prior.sum()), "streamed": streamed}
        logger.info("LaBo: best validation accuracy %.3f at epoch %d of %d (prior alone: %.3f)",
                    best["val_accuracy"], best["epoch"], epoch, initial_val)
        return self

    # ------------------------------------------------------------------ bundles
    def _state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {"weight": self.weight_, "association": self.association_, "prior": self.prior_,
                   "reference_high": self.reference_high_, "reference_low": self.reference_low_}
        bank_manifest, bank_tensors = bank_state(self.bank)
        return {"bank": bank_manifest, "history": self.history_}, {**tensors, **bank_tensors}

    @classmethod
    def _from_manifest(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LaBoCBM:
        state = manifest["state"]
        model = cls(bank_from_state(state["bank"], tensors), **manifest["params"])
        _restore_common(model, manifest)
        k, c = len(model.concept_names_), len(model.class_names_)
        check_tensors(tensors, {"weight": (c, k), "association": (c, k), "prior": (c, k), "reference_high": (k,),
                                "reference_low": (k,)})
        if model.bank.names != model.concept_names_ or model.bank.dim != model.n_features_in_:
            raise ValueError("the concept bank does not match the model's concepts or input width")
        model.weight_, model.association_ = tensors["weight"].float(), tensors["association"].float()
        model.prior_ = tensors["prior"].float()
        model.reference_high_, model.reference_low_ = tensors["reference_high"].float(), tensors["reference_low"].float()
        model.history_ = list(state.get("history") or [])
        return model


def _prior_from_provenance(provenance: Mapping[str, Any]) -> dict[str, list[str]] | None:
    """class -> concepts from a selected bank's provenance (every class that proposed a concept)."""
    associations = provenance.get("associations")
    if isinstance(associations, Mapping) and associations:
        mapping: dict[str, list[str]] = {}
        for concept, classes in associations.items():
            for name in classes:
                mapping.setdefault(name, []).append(concept)
        for name, concepts in (provenance.get("class_concepts") or {}).items():
            mapping.setdefault(name, []).extend(c for c in concepts if c not in mapping[name])
        return mapping
    chosen = provenance.get("class_concepts")
    return {name: list(concepts) for name, concepts in chosen.items()} if isinstance(chosen, Mapping) else None


# ---------------------------------------------------------------------------------------------
# Few-shot protocol and the linear-probe baseline
# ---------------------------------------------------------------------------------------------


def few_shot_indices(labels: Any, shots: int | str, seed: int = 1) -> np.ndarray:
    """Indices of ``shots`` samples per class drawn with ``seed`` ("all": every sample), sorted.

    A class with fewer samples than ``shots`` keeps all of them (logged).
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if shots == "all":
        return np.arange(len(labels))
    if not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be a positive integer or 'all', got {shots!r}.")
    rng = np.random.default_rng(seed)
    picked, short = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) <= shots:
            short.append(int(label))
            picked.append(members)
        else:
            picked.append(rng.choice(members, size=int(shots), replace=False))
    if short:
        logger.info("%d classes have at most %d samples and keep them all: %s", len(short), shots, short[:10])
    return np.sort(np.concatenate(picked))


def few_shot(data: Embeddings | tuple[Any, Any], shots: int | str, seed: int = 1) -> Embeddings | tuple[Any, Any]:
    """The few-shot training subset of an Embeddings (or an (x, y) pair); validation and test stay full."""
    if isinstance(data, Embeddings):
        return data.subset(few_shot_indices(data.labels, shots, seed))
    x, y = data
    index = few_shot_indices(y, shots, seed)
    return x[index], y[index]


def few_shot_protocol(make_model: Callable[[], Any], train: Embeddings, val: Embeddings, test: Embeddings, *,
                      shots: Sequence[int | str] = FEW_SHOTS, seed: int = 1, probe: bool = True) -> list[dict[str, Any]]:
    """LaBo's evaluation: for each shot count, fit a fresh model on ``shots`` training samples per class
    (drawn with ``seed``) with the full validation split for model selection; accuracy on the full test
    split, beside the linear probe fitted on the same samples. One row per shot count."""
    rows = []
    for n in shots:
        subset = few_shot(train, n, seed)
        started = time.perf_counter()
        model = make_model().fit(subset, validation=val)
        row = {"shots": n, "train_samples": len(subset), "model_accuracy": model.score(test),
               "model_val_accuracy": model.metrics_["val_accuracy"], "model_seconds": time.perf_counter() - started}
        if probe:
            started = time.perf_counter()
            baseline = LinearProbe().fit(subset, validation=val)
            row.update(probe_accuracy=baseline.score(test), probe_val_accuracy=baseline.val_accuracy_,
                       probe_C=baseline.C_, probe_seconds=time.perf_counter() - started)
        rows.append(row)
    return rows
