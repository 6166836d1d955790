"""Post-hoc Concept Bottleneck Models (Yuksekgonul, Wang, Zou, ICLR 2023): PCBM and PCBM-h.

Concept scores are margins to the bank's hyperplanes, ``s_k(x) = (v_k . f(x) + b_k) / ||v_k||`` on
the raw (unnormalised) embedding, as the reference code does; for text banks (unit vectors, zero
intercepts) that is the projection on the text direction. The head is a sparse linear softmax
classifier fitted with an elastic net (l1 ratio 0.99) by a full-batch torch solver; its strength is
the paper's rule ``lam = c / (classes x concepts)`` or is chosen along a regularisation path on the
validation split. PCBM-h keeps that head frozen and adds a residual linear layer on the embedding,
trained with an L2 penalty and early stopping on the validation split (never on test data).

Departures from the reference, on purpose: the head is multinomial (the reference's
SGDClassifier is one-vs-rest) so that probabilities and the logit decomposition are exact; and when
no validation data is given, a seeded 10% of the training data is held out for it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from cbm.backbones import resolve_device
from cbm.models.base import (ConceptBottleneckModel, LinearHeadEdits, Validation, _restore_common, accuracy, as_matrix,
                             bank_from_state, bank_state, check_tensors, holdout_split, prepare_validation)
from cbm.models.solvers import LinearSolution, elastic_net_path, elastic_net_softmax, lambda_max
from cbm.models.streaming import Rows, Stream, evaluate, should_stream
from concepts.bank import ConceptBank

logger = logging.getLogger(__name__)

ROW_CHUNK = 2**22  # values per chunk of the fit's passes over all rows (16 MiB of float32)


def row_blocks(n: int, width: int, order: torch.Tensor | None = None) -> Iterator[tuple[slice, slice | torch.Tensor]]:
    """(output rows, input rows) of consecutive blocks of ``n`` rows of ``width`` values, about ``ROW_CHUNK``
    values each; the input rows are ``order[block]`` (an index into the input) when ``order`` is given."""
    step = max(1, ROW_CHUNK // max(width, 1))
    for start in range(0, n, step):
        block = slice(start, start + step)
        yield block, block if order is None else order[block]


class PosthocCBM(LinearHeadEdits, ConceptBottleneckModel):
    """Post-hoc CBM over a concept bank; ``hybrid=True`` gives PCBM-h.

    Parameters
    ----------
    bank: the ConceptBank (text or CAV) whose margins are the concepts.
    lam: "rule" (``c / (classes x concepts)``, the paper's default), "path" (chosen on validation
        accuracy along ``n_lambdas`` penalties), or a number.
    c: the constant of the lambda rule (the paper uses 2 for CIFAR, 0.01 for CUB).
    l1_ratio: elastic-net mixing, 0.99 (almost pure L1) as in the paper.
    hybrid: add the PCBM-h residual; ``residual_l2``, ``residual_lr``, ``residual_epochs``,
        ``batch_size`` and ``patience`` configure its training (reference: 1e-3, 1e-2, 20, 64).
    stream: keep the training data on the device (False), stream it from host memory in chunks and
        batches (True), or decide by free device memory ("auto"); see ``cbm.models.streaming``.
    """

    family = "posthoc"

    def __init__(self, bank: ConceptBank, *, lam: float | Literal["rule", "path"] = "rule", c: float = 2.0,
                 l1_ratio: float = 0.99, n_lambdas: int = 12, hybrid: bool = False, residual_l2: float = 1e-3,
                 residual_lr: float = 1e-2, residual_epochs: int = 20, batch_size: int = 64, patience: int = 3,
                 max_iter: int = 3000, seed: int = 0, device: str = "auto", stream: Stream = "auto") -> None:
        self.bank = bank
        self.lam = lam
        self.c = c
        self.l1_ratio = l1_ratio
        self.n_lambdas = n_lambdas
        self.hybrid = hybrid
        self.residual_l2 = residual_l2
        self.residual_lr = residual_lr
        self.residual_epochs = residual_epochs
        self.batch_size = batch_size
        self.patience = patience
        self.max_iter = max_iter
        self.seed = seed
        self.device = device
        self.stream = stream

    # ------------------------------------------------------------------ concepts
    def _margins(self, features: torch.Tensor) -> torch.Tensor:
        vectors = self.bank.vectors
        return (features @ vectors.T + self.bank.intercepts) / vectors.norm(dim=1)

    def concepts(self, x: Any) -> torch.Tensor:
        """Concept scores [N, K]: margins to the bank's hyperplanes."""
        return self._margins(self._features(x))

    def predict_from_concepts(self, c: Any) -> torch.Tensor:
        scores = as_matrix(c, "concept scores", len(self.concept_names_))
        return scores @ self.weight_.T + self.bias_

    def _logits(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        logits = self.predict_from_concepts(c)
        if self.hybrid:
            logits = logits + x @ self.residual_weight_.T + self.residual_bias_
        return logits

    def contributions(self, x: Any, concepts: Any = None) -> torch.Tensor:
        """Exact per-concept contributions [N, C, K] (at ``concepts`` when given): logit = sum_k contributions
        + bias (+ residual)."""
        return self._concepts_or(x, concepts)[:, None, :] * self.weight_[None]

    def residual(self, x: Any) -> torch.Tensor:
        """The PCBM-h residual's part of each logit [N, C] (zeros for plain PCBM)."""
        features = self._features(x)
        if not self.hybrid:
            return torch.zeros(len(features), len(self.class_names_))
        return features @ self.residual_weight_.T + self.residual_bias_

    def sparsity(self) -> dict[str, int]:
        """Non-zero concept weights per class."""
        return {name: int((row != 0).sum()) for name, row in zip(self.class_names_, self.weight_)}

    # ------------------------------------------------------------------ fitting
    def fit(self, x: Any, y: Any = None, *, validation: Validation = None, class_names: list[str] | None = None,
            concept_labels: Any = None) -> PosthocCBM:
        """Fit the sparse head (and the residual when ``hybrid``).

        Concept labels are not needed; when given ([N, K] binary, aligned with ``x``), the
        intervention reference values "high"/"low" become the mean training score of the samples
        with and without each concept, and ``concept_label_map`` becomes a ridge regression of the
        training scores on the labels. A head fitted on continuous scores leans on signal shared
        between them, so ground truth only helps when the intervened scores keep that sharing: on
        toy:cnn CAVs, setting all concepts by this map raises accuracy 0.891 -> 0.954, while the
        per-concept means lower it to 0.815.

        Memory: beyond ``x`` the fit holds one [N, K] tensor of concept scores (the training rows' and, when
        the validation data are held out of ``x``, theirs); float32 input is used in place, and checks,
        references and solver passes go chunk by chunk. PCBM-h with held-out validation data also copies the
        training rows' features for its residual.
        """
        features, labels = self._begin_bank_fit(x, y, class_names)
        n_classes = len(self.class_names_)
        if concept_labels is not None:
            concept_labels = as_matrix(concept_labels, "concept_labels", len(self.concept_names_))
            if len(concept_labels) != len(features):
                raise ValueError(f"concept_labels has {len(concept_labels)} rows but x has {len(features)}.")
        if validation is None:  # a seeded 10% held out: all rows' scores in one tensor, the training rows first
            train_rows, held_rows = holdout_split(len(features), self.seed)
            order, val_source = torch.cat([train_rows, held_rows]), f"held out 10% of train (seed {self.seed})"
            train_y, val_x, val_y = labels[train_rows], features[held_rows], labels[held_rows]
            scores = self._scores(features, order)
            train_s, val_s = scores[:len(train_rows)], scores[len(train_rows):]
        else:
            train_rows = order = None
            _, train_y, val_x, val_y, val_source = prepare_validation(self, features, labels, validation, self.seed,
                                                                     self.bank)
            scores = train_s = self._scores(features)
            val_s = self._scores(val_x)
        references = self._references(scores, concept_labels, order)
        self.label_map_ = None if concept_labels is None else label_regression(concept_labels, scores, order=order)
        # the residual learns from the features themselves (a copy of the training rows when some are held out)
        residual_x = (features if train_rows is None else features[train_rows], val_x) if self.hybrid else ()

        device = resolve_device(self.device)
        streamed = should_stream(self.stream, (train_s, train_y, val_s, val_y, *residual_x), device)
        train, val = Rows((train_s, train_y), device, streamed), Rows((val_s, val_y), device, streamed)
        head = self._fit_head(train, val, n_classes)
        self.weight_, self.bias_ = head.weight.cpu(), head.bias.cpu()
        self.lam_ = head.lam
        self.reference_high_, self.reference_low_ = references
        head_val = evaluate(val, lambda s: s @ head.weight.T + head.bias)[0]
        self.metrics_ = {"train_accuracy": evaluate(train, lambda s: s @ head.weight.T + head.bias)[0],
                         "val_accuracy": head_val, "pcbm_val_accuracy": head_val,
                         "nonzero_weights": int((self.weight_ != 0).sum())}
        if self.hybrid:
            train_x, val_x = residual_x
            self._fit_residual((train_x, train_s, train_y), (val_x, val_s, val_y), streamed)
            self.metrics_["val_accuracy"] = accuracy(self._logits(val_x, val_s), val_y)
        self.training_ = {"samples": len(train_s), "validation": val_source, "validation_samples": len(val_s),
                          "lam": self.lam_, "solver_iterations": head.iterations, "converged": head.converged,
                          "streamed": streamed,
                          "data": getattr(x, "ids", None) and len(x.ids)}
        logger.info("PCBM%s: lam=%.3g, %d non-zero weights, validation accuracy %.3f", "-h" if self.hybrid else "",
                    self.lam_, self.metrics_["nonzero_weights"], self.metrics_["val_accuracy"])
        return self

    def _fit_head(self, train: Rows, val: Rows, n_classes: int) -> LinearSolution:
        """The elastic-net head on (margins, labels) ``train``, its penalty chosen on ``val`` for "path"."""
        if self.lam == "path":
            top = lambda_max(train, None, n_classes, self.l1_ratio)
            lams = list(np.geomspace(top, top * 1e-3, self.n_lambdas))
            path = elastic_net_path(train, None, n_classes, lams, self.l1_ratio, max_iter=self.max_iter)
            scores = [evaluate(val, lambda s, w=solution: s @ w.weight.T + w.bias)[0] for solution in path]
            best = max(range(len(path)), key=lambda i: (round(scores[i], 4), -i))  # ties: the sparser one
            self.path_ = [{"lam": s.lam, "val_accuracy": a, "nonzero": int((s.weight != 0).sum())}
                          for s, a in zip(path, scores)]
            return path[best]
        lam = self.c / (n_classes * len(self.concept_names_)) if self.lam == "rule" else float(self.lam)
        if lam < 0 or not np.isfinite(lam):
            raise ValueError(f"lam must be 'rule', 'path' or a non-negative number, got {self.lam!r}.")
        return elastic_net_softmax(train, None, n_classes, lam, self.l1_ratio, max_iter=self.max_iter)

    def _scores(self, features: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        """Concept scores [N, K] of ``features`` (of its rows ``order``, in that order, when given), made chunk by
        chunk into one tensor."""
        n = len(features) if order is None else len(order)
        scores = torch.empty(n, len(self.bank.names), device=features.device)
        with torch.no_grad():
            for block, rows in row_blocks(n, features.shape[1], order):
                scores[block] = self._margins(features[rows])
        return scores

    def _references(self, scores: torch.Tensor, concept_labels: torch.Tensor | None,
                    order: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-concept "high"/"low" scores over all of x's rows (``scores``; row i is x's row ``order[i]`` when
        given): the mean score with and without each concept if concept labels (aligned with x) are given, else
        the CAV's recorded positive/negative mean margins, else the 95th/5th percentiles; chunk by chunk."""
        n, k = scores.shape
        if concept_labels is not None:
            counts, high, low = scores.new_zeros(k, dtype=torch.long), scores.new_zeros(k), scores.new_zeros(k)
            for block, rows in row_blocks(n, k, order):
                present, part = concept_labels[rows] > 0.5, scores[block]
                counts += present.sum(0)
                high += (part * present).sum(0)
                low += (part * ~present).sum(0)
            if (counts == 0).any() or (counts == n).any():
                raise ValueError("every concept needs positive and negative examples in concept_labels.")
            return high / counts, low / (n - counts)
        stats = self.bank.stats
        if "pos_mean" in stats and "neg_mean" in stats:
            return stats["pos_mean"].clone(), stats["neg_mean"].clone()
        columns = max(1, ROW_CHUNK // n)  # a few columns at a time: quantile sorts a copy of its input
        levels = torch.tensor([0.95, 0.05], device=scores.device)
        high_low = torch.cat([torch.quantile(scores[:, start:start + columns], levels, dim=0)
                              for start in range(0, k, columns)], dim=1)
        return high_low[0], high_low[1]

    def concept_label_map(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The ridge map from concept labels to scores fitted on the training data (``fit`` with
        ``concept_labels``), else None."""
        self._check_fitted()
        return getattr(self, "label_map_", None)

    def _fit_residual(self, train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                      val: tuple[torch.Tensor, torch.Tensor, torch.Tensor], streamed: bool) -> None:
        """Train the residual layer on (features, concept scores, labels) ``train`` with Adam; keep the epoch with
        the best validation loss on ``val``."""
        device = resolve_device(self.device)
        generator = torch.Generator().manual_seed(self.seed)
        residual = nn.Linear(train[0].shape[1], len(self.class_names_)).to(device)
        with torch.no_grad():
            residual.weight.zero_()
            residual.bias.zero_()
        train, val = (Rows((x, s @ self.weight_.T + self.bias_, y), device, streamed) for x, s, y in (train, val))
        optimiser = torch.optim.Adam(residual.parameters(), lr=self.residual_lr)

        def validation_loss() -> float:
            return evaluate(val, lambda x, head: head + residual(x))[1]

        start = validation_loss()  # epoch 0 is the plain PCBM: the residual is kept only if validation improves
        best = (start, residual.weight.detach().clone(), residual.bias.detach().clone(), 0)
        stale = 0
        for epoch in range(1, self.residual_epochs + 1):
            for batch in torch.randperm(len(train), generator=generator).split(self.batch_size):
                x, head, y = train.batch(batch)
                loss = nn.functional.cross_entropy(head + residual(x), y) + self.residual_l2 * residual.weight.pow(2).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            val_loss = validation_loss()
            if val_loss < best[0] - 1e-5:
                best, stale = (val_loss, residual.weight.detach().clone(), residual.bias.detach().clone(), epoch), 0
            else:
                stale += 1
                if stale >= self.patience:
                    break
        self.residual_weight_, self.residual_bias_ = best[1].cpu(), best[2].cpu()
        self.residual_epochs_ = best[3]

    # ------------------------------------------------------------------ bundles
    def _state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {"weight": self.weight_, "bias": self.bias_, "reference_high": self.reference_high_,
                   "reference_low": self.reference_low_}
        if self.label_map_ is not None:
            tensors.update(label_weight=self.label_map_[0], label_bias=self.label_map_[1])
        if self.hybrid:
            tensors.update(residual_weight=self.residual_weight_, residual_bias=self.residual_bias_)
        state = {"lam": self.lam_, "path": getattr(self, "path_", None)}
        bank_manifest, bank_tensors = bank_state(self.bank)
        return {**state, "bank": bank_manifest}, {**tensors, **bank_tensors}

    @classmethod
    def _from_manifest(cls, manifest: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PosthocCBM:
        state = manifest["state"]
        model = cls(bank_from_state(state["bank"], tensors), **manifest["params"])
        _restore_common(model, manifest)
        k, c, d = len(model.concept_names_), len(model.class_names_), model.n_features_in_
        expected = {"weight": (c, k), "bias": (c,), "reference_high": (k,), "reference_low": (k,)}
        if model.hybrid:
            expected.update(residual_weight=(c, d), residual_bias=(c,))
        for name, shape in expected.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                raise ValueError(f"tensor {name!r} must have shape {shape}")
        if model.bank.names != model.concept_names_ or model.bank.dim != d:
            raise ValueError("the concept bank does not match the model's concepts or input width")
        model.weight_, model.bias_ = tensors["weight"].float(), tensors["bias"].float()
        model.reference_high_, model.reference_low_ = tensors["reference_high"].float(), tensors["reference_low"].float()
        model.label_map_ = None
        if "label_weight" in tensors or "label_bias" in tensors:  # absent in bundles fitted without concept labels
            check_tensors(tensors, {"label_weight": (k, k), "label_bias": (k,)})
            model.label_map_ = (tensors["label_weight"].float(), tensors["label_bias"].float())
        if model.hybrid:
            model.residual_weight_, model.residual_bias_ = tensors["residual_weight"].float(), tensors["residual_bias"].float()
        model.lam_ = float(state["lam"])
        if state.get("path"):
            model.path_ = state["path"]
        return model


def label_regression(labels: torch.Tensor, scores: torch.Tensor, ridge: float = 1.0, *,
                     order: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [K, K], bias [K]) of the ridge regression of scores [N, K] on binary labels [N, K] (score row i
    stands for label row ``order[i]`` when given), in float64, chunk by chunk.

    One-hot concept groups make the labels collinear; the small ridge keeps the solution unique."""
    if len(labels) != len(scores):
        raise ValueError(f"concept_labels has {len(labels)} rows but x has {len(scores)}.")
    n, k = scores.shape

    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for block, rows in row_blocks(n, k, order):
            yield labels[rows].double(), scores[block].double()

    sums = torch.zeros(2, k, dtype=torch.float64)
    for chunk_labels, chunk_scores in chunks():
        sums += torch.stack([chunk_labels.sum(0), chunk_scores.sum(0)])
    label_mean, score_mean = sums / n
    gram, cross = ridge * torch.eye(k, dtype=torch.float64), torch.zeros(k, k, dtype=torch.float64)
    for chunk_labels, chunk_scores in chunks():
        centred = chunk_labels - label_mean
        gram += centred.T @ centred
        cross += centred.T @ (chunk_scores - score_mean)
    weight = torch.linalg.solve(gram, cross).T
    return weight.float(), (score_mean - weight @ label_mean).float()
