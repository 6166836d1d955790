"""Full-batch solvers in torch (CPU or GPU) for the heads of the linear families.

``elastic_net_softmax`` minimises the multinomial logistic loss with an elastic-net penalty on
the weights (not the bias)::

    mean CE(x W^T + b, y) + lam * (l1_ratio * |W|_1 + (1 - l1_ratio) / 2 * |W|_2^2)

by FISTA (accelerated proximal gradient) on centred features with a fixed step 1/L from the loss's
Lipschitz bound, adaptive restarts, and warm starts along a regularisation path. It stops when an iteration changes
(W, b) by less than ``tol`` (1e-5) relative to their norm: on the PCBM benchmark's 10,000 x 200
scores that takes 84 iterations and reaches the objective of a 1e-7 run to 6 digits.

Every pass over the data (mean, Lipschitz bound, gradients) adds up sums over the chunks of a
:class:`~cbm.models.streaming.Rows`: one chunk for tensors on the device, many for data streamed
from host memory, with the same result up to float rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from cbm.models.streaming import Rows

logger = logging.getLogger(__name__)


@dataclass
class LinearSolution:
    weight: torch.Tensor  # [C, K]
    bias: torch.Tensor  # [C]
    lam: float
    iterations: int
    converged: bool


def _as_rows(x: torch.Tensor | Rows, y: torch.Tensor | None) -> Rows:
    """Features and labels as resident Rows on their device, or ``x`` itself when it already is Rows of
    (features, labels), e.g. streamed ones."""
    if isinstance(x, Rows):
        if y is not None:
            raise TypeError("x is Rows of (features, labels); pass y=None.")
        return x
    return Rows((x, y), x.device)


def _centred(data: Rows) -> tuple[Rows, torch.Tensor]:
    """Rows of (features - their column mean, labels), and the mean."""
    mean = data.sum(lambda x, _: x.sum(dim=0)) / len(data)
    return data.map(lambda x, y: (x - mean, y)), mean


def _class_counts(data: Rows, n_classes: int) -> torch.Tensor:
    return data.sum(lambda _, y: torch.bincount(y, minlength=n_classes))


def _lipschitz(data: Rows, iterations: int = 30) -> float:
    """Upper bound of the softmax cross-entropy gradient's Lipschitz constant: sigma_max([x, 1])^2 / (2 N)."""
    def augmented_times(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # [x, 1] @ v
        return x @ v[:-1] + v[-1]

    def gram_times(v: torch.Tensor) -> torch.Tensor:  # [x, 1]^T [x, 1] @ v
        def part(x: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            u = augmented_times(x, v)
            return torch.cat([x.T @ u, u.sum()[None]])

        return data.sum(part)

    features = data.tensors[0]
    vector = torch.ones(features.shape[1] + 1, device=data.device, dtype=features.dtype)
    for _ in range(iterations):
        vector = gram_times(vector)
        vector = vector / vector.norm()
    sigma_squared = float(data.sum(lambda x, _: augmented_times(x, vector).square().sum()))
    return 1.05 * sigma_squared / (2 * len(data))  # power iteration approaches from below: keep a margin


def lambda_max(x: torch.Tensor | Rows, y: torch.Tensor | None, n_classes: int, l1_ratio: float) -> float:
    """The smallest penalty at which every weight is zero (the start of a path), with a relative margin of
    1e-4 so that rounding in the solver's first step cannot let a weight through. ``x`` and ``y`` as in
    :func:`elastic_net_softmax`."""
    data = _as_rows(x, y)
    prior = _class_counts(data, n_classes).to(data.tensors[0].dtype) / len(data)
    gradient = data.sum(lambda x, y: (prior[None] - nn.functional.one_hot(y, n_classes).to(x.dtype)).T @ x)
    return (1 + 1e-4) * float(gradient.abs().max() / len(data)) / max(l1_ratio, 1e-3)


def elastic_net_softmax(x: torch.Tensor | Rows, y: torch.Tensor | None, n_classes: int, lam: float,
                        l1_ratio: float = 0.99, *, init: LinearSolution | None = None, max_iter: int = 3000,
                        tol: float = 1e-5, step: float | None = None) -> LinearSolution:
    """Fit the elastic-net softmax head on features ``x`` [N, K] and labels ``y`` [N], or on
    :class:`~cbm.models.streaming.Rows` ``x`` of (features, labels) with ``y=None`` (then each pass over
    the data goes chunk by chunk, streamed from host memory when the Rows are).

    The solver works on centred features, ``x W^T + b = (x - mean) W^T + (b + mean W^T)``: the same
    problem (the bias is not penalised), but a feature mean no longer dominates the Lipschitz bound,
    which shortens the step for every other direction (4x fewer iterations on typical concept scores).
    """
    centred, mean = _centred(_as_rows(x, y))
    return _fista(centred, mean, n_classes, lam, l1_ratio, init=init, max_iter=max_iter, tol=tol, step=step)


def _fista(data: Rows, mean: torch.Tensor, n_classes: int, lam: float, l1_ratio: float, *,
           init: LinearSolution | None, max_iter: int, tol: float, step: float | None) -> LinearSolution:
    """FISTA on centred (features, labels) ``data``; the solution is for the uncentred features."""
    n, n_features = len(data), data.tensors[0].shape[1]
    l1, l2 = lam * l1_ratio, lam * (1 - l1_ratio)
    step = step or 1.0 / (_lipschitz(data) + l2)
    dtype = mean.dtype
    weight = init.weight.clone() if init else torch.zeros(n_classes, n_features, device=data.device, dtype=dtype)
    if init:
        bias = init.bias + init.weight @ mean
    else:
        bias = torch.log(_class_counts(data, n_classes).to(dtype).clamp_min(1) / n)
    moment_w, moment_b, t = weight.clone(), bias.clone(), 1.0

    def gradients(w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def part(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # [C, K + 1]: weight and bias columns
            residual = torch.softmax(x @ w.T + b, dim=1)
            residual.scatter_add_(1, y[:, None], -torch.ones(len(y), 1, device=y.device, dtype=x.dtype))
            return torch.cat([residual.T @ x, residual.sum(dim=0)[:, None]], dim=1)

        total = data.sum(part) / n
        return total[:, :-1] + l2 * w, total[:, -1]

    def smooth_loss(w: torch.Tensor, b: torch.Tensor) -> float:
        cross_entropy = data.sum(lambda x, y: nn.functional.cross_entropy(x @ w.T + b, y, reduction="sum")) / n
        return float(cross_entropy + 0.5 * l2 * (w * w).sum())

    converged, iteration = False, 0
    for iteration in range(1, max_iter + 1):
        grad_w, grad_b = gradients(moment_w, moment_b)
        new_w = moment_w - step * grad_w
        new_w = torch.sign(new_w) * (new_w.abs() - step * l1).clamp_min(0)
        new_b = moment_b - step * grad_b
        change = float(((new_w - weight).norm() ** 2 + (new_b - bias).norm() ** 2).sqrt())
        scale = max(float((weight.norm() ** 2 + bias.norm() ** 2).sqrt()), 1.0)
        # adaptive restart (O'Donoghue & Candes): drop momentum when it points uphill
        uphill = float(((moment_w - new_w) * (new_w - weight)).sum() + ((moment_b - new_b) * (new_b - bias)).sum()) > 0
        t_next = 1.0 if uphill else (1 + (1 + 4 * t * t) ** 0.5) / 2
        momentum = 0.0 if uphill else (t - 1) / t_next
        moment_w = new_w + momentum * (new_w - weight)
        moment_b = new_b + momentum * (new_b - bias)
        weight, bias, t = new_w, new_b, t_next
        if change / scale < tol:
            converged = True
            break
    if not converged:
        logger.debug("elastic-net head stopped at max_iter=%d (lam=%.3g, loss %.4f)", max_iter, lam,
                     smooth_loss(weight, bias))
    return LinearSolution(weight, bias - weight @ mean, float(lam), iteration, converged)


def elastic_net_path(x: torch.Tensor | Rows, y: torch.Tensor | None, n_classes: int, lams: list[float],
                     l1_ratio: float = 0.99, *, max_iter: int = 3000, tol: float = 1e-5) -> list[LinearSolution]:
    """Solutions for decreasing penalties, each warm-started from the previous one; ``x`` and ``y`` as in
    :func:`elastic_net_softmax`."""
    centred, mean = _centred(_as_rows(x, y))
    step = 1.0 / (_lipschitz(centred) + max(lams) * (1 - l1_ratio))
    solutions, previous = [], None
    for lam in sorted(lams, reverse=True):
        previous = _fista(centred, mean, n_classes, lam, l1_ratio, init=previous, max_iter=max_iter, tol=tol,
                          step=step)
        solutions.append(previous)
    return solutions
