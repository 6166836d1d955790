"""The baselines the families are compared with: the black-box linear probe on embeddings and the
time-averaged concept classifier for videos. (The joint CBM of Koh et al. is a family of its own:
``cbm.models.bottleneck.ConceptBottleneck(training="joint")``.)"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cbm.models.base import (
    Validation,
    as_labels,
    as_matrix,
    labels_of,
    split_validation,
)
from cbm.models.temporal.sequences import (
    SequenceInput,
    as_sequences,
    concept_cosines,
    labelled_sequences,
)
from concepts.bank import ConceptBank


class LinearProbe:
    """The black-box baseline: multinomial L2 logistic regression on L2-normalised, standardised features,
    C chosen on validation accuracy over a log grid and then refined around the best (CoOp's protocol).

    The objective is scikit-learn's (``C * sum of cross-entropies + ||W||^2 / 2``, intercept unpenalised),
    solved full-batch with torch L-BFGS in float32, each fit warm-started from the nearest C tried so far:
    scikit-learn's lbfgs needs minutes on separable few-shot data at large C.
    """

    def __init__(self, cs: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0), refine: int = 3,
                 normalize: bool = True, max_iter: int = 300) -> None:
        self.cs = cs
        self.refine = refine
        self.normalize = normalize
        self.max_iter = max_iter

    def _prepare(self, x: Any) -> torch.Tensor:
        x = as_matrix(x, "x").float()
        if self.normalize:
            x = nn.functional.normalize(x, dim=1)
        return x

    def _solve(self, x: torch.Tensor, x_t: torch.Tensor, y: torch.Tensor, c: float, start: torch.Tensor) -> torch.Tensor:
        """Parameters [D+1, K] (weights, then the intercept) at ``C = c``, from ``start``; ``x`` [N, D]
        features and ``x_t`` their contiguous transpose.

        The gradient is written out in class-major layout: both products then read a contiguous
        matrix row by row ([K, D] @ [D, N] and [K, N] @ [N, D]), several times faster on CPU than autograd's
        ``x.T @ residual``. Stops at scikit-learn's criterion: largest gradient entry of the mean-scaled
        objective below 1e-4."""
        n = len(x)
        params = start.T.contiguous()  # [K, D+1]
        params.grad = torch.zeros_like(params)
        onehot = nn.functional.one_hot(y, params.shape[0]).T.to(x.dtype)  # [K, N]
        optimiser = torch.optim.LBFGS([params], lr=1, max_iter=self.max_iter, tolerance_grad=1e-4,
                                      tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            weights = params[:, :-1]
            log_probs = (weights @ x_t + params[:, -1:]).log_softmax(0)
            residual = (log_probs.exp() - onehot) / n
            params.grad[:, :-1] = residual @ x + weights / (c * n)
            params.grad[:, -1] = residual.sum(1)
            return -(log_probs * onehot).sum() / n + weights.pow(2).sum() / (2 * c * n)

        optimiser.step(closure)
        return params.T

    def fit(self, x: Any, y: Any = None, *, validation: Validation = None, seed: int = 0) -> LinearProbe:
        y = labels_of(x, y)
        features = as_matrix(x, "x")
        labels = as_labels(y, len(features))
        train_x, train_y, val_x, val_y, self.validation_ = split_validation(features, labels, validation, seed)
        train_x, val_x = self._prepare(train_x), self._prepare(val_x)
        val_y = torch.as_tensor(np.asarray(val_y)).long()
        self.mean_, self.std_ = train_x.mean(0), train_x.std(0).clamp(min=1e-8) if len(train_x) > 1 else 1.0
        train_x, val_x = (train_x - self.mean_) / self.std_, (val_x - self.mean_) / self.std_
        n_classes = max(int(train_y.max()), int(val_y.max())) + 1
        tried: dict[float, tuple[float, torch.Tensor]] = {}
        zeros = torch.zeros(train_x.shape[1] + 1, n_classes)
        train_x_t = train_x.T.contiguous()

        def attempt(c: float) -> None:
            if c not in tried:  # warm start from the solution at the nearest C tried so far
                nearest = min(tried, key=lambda t: abs(math.log(t / c)), default=None)
                params = self._solve(train_x, train_x_t, train_y, c, zeros if nearest is None else tried[nearest][1])
                logits = val_x @ params[:-1] + params[-1]
                tried[c] = (float((logits.argmax(1) == val_y).double().mean()), params)

        for c in sorted(float(c) for c in self.cs):
            attempt(c)
        step = 10.0
        for _ in range(self.refine):  # bisect (in log space) around the best C so far
            step = math.sqrt(step)
            best_c = max(tried, key=lambda c: (tried[c][0], -abs(math.log10(c))))
            attempt(best_c / step)
            attempt(best_c * step)
        self.C_ = max(tried, key=lambda c: (tried[c][0], -abs(math.log10(c))))
        self.val_accuracy_, self.params_ = tried[self.C_]
        self.tried_ = {c: score for c, (score, _) in sorted(tried.items())}
        return self

    def decision_function(self, x: Any) -> torch.Tensor:
        features = (self._prepare(x) - self.mean_) / self.std_
        return features @ self.params_[:-1] + self.params_[-1]

    def predict(self, x: Any) -> np.ndarray:
        return self.decision_function(x).argmax(1).numpy()

    def score(self, x: Any, y: Any = None) -> float:
        y = labels_of(x, y)
        return float(np.mean(self.predict(x) == np.asarray(y)))


class TimeAveragedCBM:
    """The "global CBM" baseline: a linear classifier on the time-averaged standardised concept
    activations (the same ``max(0, cos)`` activations and training statistics as TemporalCBM), an
    L2 logistic regression whose strength is chosen on validation accuracy. Averaging over time
    discards order by construction."""

    def __init__(self, bank: ConceptBank, *, cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0), seed: int = 0):
        self.bank, self.cs, self.seed = bank, tuple(cs), seed

    def _averaged(self, x: SequenceInput) -> torch.Tensor:
        features, valid, _, _ = as_sequences(x)
        a = (concept_cosines(self.bank, features, valid) - self.mean_) / self.std_ * valid[..., None]
        return a.sum(1) / valid.sum(1, keepdim=True)

    def fit(self, x: SequenceInput, y: Any = None, *, validation: Any) -> TimeAveragedCBM:
        from sklearn.linear_model import LogisticRegression

        features, valid, labels = labelled_sequences(x if y is None else (x, y), "x")
        flat = concept_cosines(self.bank, features, valid)[valid]
        self.mean_, self.std_ = flat.mean(0), flat.std(0).clamp_min(1e-6)
        train = self._averaged((features, valid)).numpy()
        val_f, val_v, val_y = labelled_sequences(validation)
        val = self._averaged((val_f, val_v)).numpy()
        best = None
        for c in self.cs:
            clf = LogisticRegression(C=c, max_iter=3000).fit(train, labels.numpy())
            acc = clf.score(val, val_y.numpy())
            if best is None or acc > best[0]:
                best = (acc, c, clf)
        self.val_accuracy_, self.c_, self.classifier_ = best
        return self

    def decision_function(self, x: SequenceInput) -> torch.Tensor:
        return torch.as_tensor(self.classifier_.decision_function(self._averaged(x).numpy()), dtype=torch.float32)

    def predict(self, x: SequenceInput) -> np.ndarray:
        return self.classifier_.classes_[self.decision_function(x).argmax(1).numpy()]

    def score(self, x: SequenceInput, y: Any = None) -> float:
        if y is None:
            y = as_sequences(x)[2]
        return float((self.predict(x) == np.asarray(y)).mean())
