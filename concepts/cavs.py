"""Concept activation vectors (CAVs) learned from embeddings: the Post-hoc CBM recipe, batched.

For each concept, positive and negative example embeddings are split (seeded) into a training
and a held-out part (``val_fraction``). ``C`` is chosen by stratified ``folds``-fold
cross-validation on the training part (best mean accuracy; ties: the smallest ``C``), the CAV
is the classifier fit on the whole training part with that ``C``, and the held-out part, used
neither to fit nor to choose ``C``, measures its accuracy. Solvers:

- ``"torch"`` (:func:`learn_cavs`' default): the same hinge-loss linear SVM as SVC,
  ``1/2 ||w||^2 + C sum_i max(0, 1 - y_i (w.x_i + b))``, solved for ALL concepts and ALL ``C`` at
  once by batched dual coordinate descent (``hinge_svm``). Its sweeps visit one example at a time,
  so it suits the Post-hoc CBM recipe's hundred-odd examples per concept. Runs on CPU or GPU.
- ``"newton"`` (:func:`cavs_from_labels`' default): LinearSVC's objective, the squared hinge with
  the intercept as a regularised constant feature, ``1/2 (||w||^2 + b^2) + C sum_i max(0, 1 - y_i
  (w.x_i + b))^2``, solved for ALL concepts and ALL ``C`` at once in the primal by batched Newton-CG
  (``squared_hinge_svm``): every step is one product with the examples, which concepts labelled on
  one dataset share, so thousands of examples per concept cost seconds. Runs on CPU or GPU.
- ``"sklearn"``: ``sklearn.svm.SVC(kernel="linear", C)`` per concept and ``C``, as Post-hoc CBM does.
- ``"liblinear"``: ``sklearn.svm.LinearSVC(C)`` per concept and ``C``: the reference for ``"newton"``.
- ``"fastcav"``: difference of class means, threshold at the midpoint (no ``C``; FastCAV).

Departure from Post-hoc CBM: the reference fits one bank per ``C`` and reports each bank's
accuracy on its validation half, so the accuracy of the ``C`` a user then picks on those numbers
is optimistic; here the choice is made inside the training part and the reported accuracy is not.

Scores of the resulting ``kind="cav"`` bank are margins ``(v.f + b)/||v||``. Per concept the
bank's ``stats`` hold:
- ``C``: the chosen value;
- ``selection_accuracy``: its cross-validated accuracy on the training part (what chose it; NaN
  when there was nothing to choose: one ``C`` or ``fastcav``), optimistic by construction;
- ``train_accuracy``: accuracy of the CAV on the examples it was fit on;
- ``val_accuracy``: accuracy on the held-out examples, used neither to fit nor to choose ``C``:
  the figure to report;
- margin statistics of the positive and negative examples (``pos_mean``, ``pos_std``,
  ``pos_q10``, ``pos_q50``, ``pos_q90``, the same for ``neg_``, and the counts), over training
  and held-out examples: the reference values used for interventions.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Literal, get_args

import numpy as np
import torch
from tqdm.auto import tqdm

from concepts.bank import ConceptBank, real_tensor

logger = logging.getLogger(__name__)

Solver = Literal["torch", "newton", "sklearn", "liblinear", "fastcav"]
SOLVERS: tuple[str, ...] = get_args(Solver)
DEFAULT_CS = (0.001, 0.01, 0.1, 1.0)
QUANTILES = (0.1, 0.5, 0.9)


def hinge_svm(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, cs: Sequence[float], *,
              max_epochs: int = 100, tol: float = 0.1, seed: int = 0,
              memory_budget: int = 2**28) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched hinge-loss linear SVMs for K problems x len(cs) values of C, all at once.

    ``x`` [K,M,D] examples (padded), ``y`` [K,M] labels in {-1,+1}, ``valid`` [K,M] mask.
    Returns weights [K,C,D] and intercepts [K,C]. Dual coordinate descent (Hsieh et al. 2008,
    the LIBLINEAR algorithm) on ``min 1/2 a^T Q a - sum(a), 0 <= a <= C`` with the Gram matrix
    ``Q``: one sweep visits the examples in a seeded random order and updates example i of
    every (concept, C) problem in one tensor operation. Features are centred per concept and a
    constant column carries the bias, so its slight regularisation hardly matters. Stops when
    the largest projected-gradient violation is below ``tol`` (0.1, LIBLINEAR's default).
    Concepts are processed in chunks whose Gram matrices fit ``memory_budget`` bytes.
    """
    k, m, d = x.shape
    chunk = max(1, memory_budget // (4 * m * m * (1 + len(cs))))
    if k > chunk:
        parts = [hinge_svm(x[i:i + chunk], y[i:i + chunk], valid[i:i + chunk], cs, max_epochs=max_epochs,
                           tol=tol, seed=seed, memory_budget=memory_budget) for i in range(0, k, chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    y = y * valid                                              # padding: y = 0 removes it from Q
    mu = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
    # Q_ij = y_i y_j ((x_i - mu).(x_j - mu) + 1), built from the raw Gram matrix without copying x
    x_mu = torch.einsum("kmd,kd->km", x, mu)
    q = x @ x.transpose(1, 2) - x_mu[:, :, None] - x_mu[:, None, :] + (mu * mu).sum(-1)[:, None, None] + 1
    q *= y[:, :, None] * y[:, None, :]                         # [K,M,M]
    q_diag = torch.diagonal(q, dim1=1, dim2=2).clamp(min=1e-12).T.contiguous()  # [M,K]
    q_rows = q.permute(1, 0, 2).contiguous()[:, :, None, :]    # [M,K,1,M]: row i of every Q
    upper = torch.as_tensor(cs, dtype=x.dtype, device=x.device).view(1, 1, -1) * valid.T[..., None]  # [M,K,C]
    alpha = torch.zeros_like(upper)                            # [M,K,C]
    grad = -valid[:, None, :].expand(k, len(cs), m).to(x.dtype).contiguous()  # [K,C,M] = Q alpha - 1
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(max_epochs):
        for i in torch.randperm(m, generator=generator).tolist():
            old = alpha[i].clone()
            new = torch.minimum((old - grad[:, :, i] / q_diag[i, :, None]).clamp_(min=0), upper[i])
            alpha[i] = new
            grad.addcmul_((new - old)[..., None], q_rows[i])
        a = alpha.permute(1, 2, 0)
        grad = (torch.einsum("kcj,kij->kci", a, q) - 1) * valid[:, None, :]  # refresh: no float drift
        violation = torch.where(a <= 0, grad.clamp(max=0), torch.where(a >= upper.permute(1, 2, 0),
                                                                     grad.clamp(min=0), grad))
        if violation.abs().max() < tol:
            logger.debug("hinge_svm: converged after %d epochs", epoch + 1)
            break
    else:  # typical for large C on (nearly) separable data; such C rarely win on held-out data
        worst = violation.abs().amax(dim=(0, 2))
        logger.info("hinge_svm: stopped after %d epochs; projected-gradient violation per C: %s (tol %g)",
                    max_epochs, {c: round(float(v), 3) for c, v in zip(cs, worst, strict=True)}, tol)
    coef = alpha.permute(1, 2, 0) * y[:, None, :]              # [K,C,M]: w = sum_i coef_i (x_i - mu, 1)
    total = coef.sum(-1)
    weights = torch.einsum("kcm,kmd->kcd", coef, x) - total[..., None] * mu[:, None, :]
    return weights, total - torch.einsum("kcd,kd->kc", weights, mu)


def squared_hinge_svm(x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, cs: Sequence[float], *,
                      tol: float = 1e-3, max_newton: int = 100, max_cg: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched squared-hinge linear SVMs (LinearSVC's objective) for K problems x len(cs) values of C.

    ``x`` is one matrix [N,D] whose rows all K problems share, or padded examples [K,N,D] per problem;
    ``y`` [K,N] labels in {-1,+1} (0: not an example of that problem); ``rows`` [K,N] the examples to
    fit on. Returns weights [K,C,D] and intercepts [K,C] minimising ``1/2 (||w||^2 + b^2) + C sum_i
    max(0, 1 - y_i (w.x_i + b))^2``. Truncated Newton in the primal (Keerthi & DeCoste 2005), all K
    problems at once, one C after another from the smallest, each warm-started from the previous: each
    Newton system is solved by at most ``max_cg`` conjugate-gradient steps (or to 10% of the gradient's
    norm; more steps bought little: 12 s at 10, 20 s at 30 on the benchmark), then an exact line search. Coordinates are rotated into the eigenbasis of the examples' second-moment matrix, where
    the Hessian ``I + 2C sum_active x x^T`` is nearly diagonal: that diagonal preconditions CG.
    Each C stops when every problem's gradient norm is ``tol`` times its norm at zero.
    """
    forward, backward = ("nd,kd->kn", "kn,nd->kd") if x.ndim == 2 else ("knd,kd->kn", "kn,knd->kd")
    member = (y != 0) & rows
    y = (y * member).to(x.dtype)                                    # [K,N]; 0: not fit on
    x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)         # the intercept as a constant feature
    used = x[member.any(0)] if x.ndim == 2 else x[member]
    spectrum, basis = torch.linalg.eigh(used.T @ used / len(used))  # its precision hardly matters: it preconditions
    spectrum = spectrum.clamp(min=0)
    z = x @ basis                                                   # rotated: ||u|| = ||w||
    u = torch.zeros(y.shape[0], z.shape[-1], dtype=x.dtype, device=x.device)
    margin = torch.zeros_like(y)                                    # y (w.x + b) of every example
    at_zero = torch.einsum(backward, y, z).norm(dim=-1)            # gradient norm at w = 0, over 2C
    solutions = []
    for c in sorted(cs):
        for step in range(max_newton):
            slack = (1 - margin).clamp(min=0) * member
            grad = u - 2 * c * torch.einsum(backward, slack * y, z)
            norm = grad.norm(dim=-1)
            converged = norm <= tol * 2 * c * at_zero
            if converged.all():
                break
            active = (slack > 0).to(x.dtype)
            hessian = lambda v: v + 2 * c * torch.einsum(backward, active * torch.einsum(forward, z, v), z)  # noqa: E731,B023
            preconditioner = 1 / (1 + 2 * c * active.sum(-1, keepdim=True) * spectrum)
            direction = _conjugate_gradient(hessian, -grad, preconditioner, 0.1 * norm, max_cg)
            change = torch.einsum(forward, z, direction) * y        # margin change per unit step
            length = _exact_line_search(u, direction, margin, change, member, c)
            length = torch.where(converged, torch.zeros_like(length), length)[..., None]
            u, margin = u + length * direction, margin + length * change
        else:
            logger.info("squared_hinge_svm: C=%g stopped after %d Newton steps; largest gradient norm relative to "
                        "the start: %.4f (tol %g)", c, max_newton, float((norm / (2 * c * at_zero)).max()), tol)
        solutions.append(u @ basis.T)
    weights = torch.stack([solutions[sorted(cs).index(c)] for c in cs], dim=1)  # [K,C,D+1] in the order of cs
    return weights[..., :-1], weights[..., -1]


def _conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor,
                        preconditioner: torch.Tensor, enough: torch.Tensor, max_steps: int) -> torch.Tensor:
    """Preconditioned CG for ``apply(s) = target`` on a batch of vectors [...,D] (``apply`` symmetric
    positive definite): stops when every residual norm is below ``enough`` [...]."""
    solution, residual = torch.zeros_like(target), target.clone()
    scaled = preconditioner * residual
    direction, energy = scaled.clone(), (residual * scaled).sum(-1)
    for _ in range(max_steps):
        product = apply(direction)
        alpha = energy / (direction * product).sum(-1).clamp(min=1e-30)
        solution += alpha[..., None] * direction
        residual -= alpha[..., None] * product
        if (residual.norm(dim=-1) <= enough).all():
            break
        scaled = preconditioner * residual
        new_energy = (residual * scaled).sum(-1)
        direction = scaled + (new_energy / energy.clamp(min=1e-30))[..., None] * direction
        energy = new_energy
    return solution


def _exact_line_search(u: torch.Tensor, direction: torch.Tensor, margin: torch.Tensor, change: torch.Tensor,
                       member: torch.Tensor, c: float, steps: int = 20) -> torch.Tensor:
    """The step length [K] minimising ``1/2 ||u + t d||^2 + C sum max(0, 1 - margin - t change)^2``: the
    objective is a convex piecewise quadratic in t, so Newton's method on t ends after few steps."""
    ud, dd = (u * direction).sum(-1), (direction * direction).sum(-1)
    length = torch.ones_like(ud)
    for _ in range(steps):
        slack = (1 - margin - length[..., None] * change).clamp(min=0) * member
        slope = ud + length * dd - 2 * c * (slack * change).sum(-1)
        curvature = dd + 2 * c * ((slack > 0) * change * change).sum(-1)
        move = slope / curvature.clamp(min=1e-30)
        length = length - move
        if (move.abs() <= 1e-6 * length.abs().clamp(min=1)).all():
            break
    return length


def _sklearn_svm(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, cs: Sequence[float], progress: bool,
                 linear: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``SVC(kernel="linear")`` or, with ``linear``, ``LinearSVC`` per concept and C (``x`` shared [N,D] or
    padded [K,M,D])."""
    from sklearn.svm import SVC, LinearSVC

    weights = torch.zeros(y.shape[0], len(cs), x.shape[-1])
    bias = torch.zeros(y.shape[0], len(cs))
    for k in tqdm(range(y.shape[0]), desc="LinearSVC per concept" if linear else "SVC per concept",
                  disable=not progress):
        features, labels = (x if x.ndim == 2 else x[k])[valid[k]].numpy(), y[k][valid[k]].numpy()
        for j, c in enumerate(cs):
            svm = (LinearSVC(C=c) if linear else SVC(kernel="linear", C=c)).fit(features, labels)
            weights[k, j] = torch.tensor(svm.coef_[0], dtype=torch.float32)
            bias[k, j] = float(svm.intercept_[0])
    return weights, bias


def _fastcav(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Difference of the positive and negative means, thresholded at their midpoint."""
    pos, neg = ((y == s) & valid for s in (1, -1))
    mean_pos = (x * pos[..., None]).sum(1) / pos.sum(1, keepdim=True)
    mean_neg = (x * neg[..., None]).sum(1) / neg.sum(1, keepdim=True)
    direction = mean_pos - mean_neg
    return direction[:, None], -(direction * (mean_pos + mean_neg)).sum(-1)[:, None] / 2


class _Examples:
    """The examples of K concepts: labels ``y`` [K,M] in {-1,+1} (0: not an example of that concept) of the
    rows of ``x``, either one matrix [M,D] the concepts share (concepts labelled on one dataset, for the
    solvers that read it so: newton, liblinear) or padded examples [K,M,D] per concept; ``valid`` [K,M]
    marks the examples."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.valid = x, y, y != 0

    @classmethod
    def padded(cls, blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> _Examples:
        """From (positives, negatives) per concept: positives first, then negatives, padded to one width."""
        width = max(len(p) + len(n) for p, n in blocks)
        x = torch.zeros(len(blocks), width, blocks[0][0].shape[1])
        y = torch.zeros(len(blocks), width)
        for k, (pos, neg) in enumerate(blocks):
            x[k, :len(pos) + len(neg)] = torch.cat([pos, neg])
            y[k, :len(pos)], y[k, len(pos):len(pos) + len(neg)] = 1, -1
        return cls(x, y)

    def margins(self, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Signed distances [K,C,M] of every example to every candidate hyperplane ([K,C,D], [K,C])."""
        scores = torch.einsum("md,kcd->kcm" if self.x.ndim == 2 else "kmd,kcd->kcm", self.x, weights)
        return (scores + bias[..., None]) / weights.norm(dim=-1, keepdim=True)

    def correct(self, weights: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Number [K,C] of the examples in ``rows`` ([K,M] mask; default all) each candidate gets right."""
        rows = self.valid if rows is None else rows & self.valid
        return (((self.margins(weights, bias) >= 0) == (self.y[:, None] > 0)) & rows[:, None]).sum(-1)

    def accuracy(self, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Accuracy [K,C] of each candidate classifier."""
        return self.correct(weights, bias) / self.valid.sum(-1, keepdim=True)

    def folds(self, folds: int) -> torch.Tensor:
        """Stratified fold of every example [K,M] (-1 where there is none): each side dealt in turn, in row
        order, into ``min(folds, positives, negatives)`` folds of the concept."""
        positive, negative = self.y == 1, self.y == -1
        width = torch.minimum(torch.minimum(positive.sum(1), negative.sum(1)), torch.tensor(folds)).clamp(min=1)
        rank = torch.where(positive, positive.cumsum(1), negative.cumsum(1)) - 1  # position within its side
        return torch.where(self.valid, rank % width[:, None], -1)


def _split(block: torch.Tensor, val_fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(block.shape[0], generator=generator)
    n_val = min(block.shape[0] - 1, max(1, round(block.shape[0] * val_fraction)))
    return block[order[n_val:]], block[order[:n_val]]


def _held_out(n: int, val_fraction: float) -> int:
    """How many of ``n`` examples of one side :func:`_split` holds out."""
    return min(n - 1, max(1, round(n * val_fraction)))


def candidate_cs(solver: str, cs: Sequence[float]) -> tuple[float, ...]:
    """The values of ``C`` a solver chooses among: ``cs`` sorted and without repeats; one for ``fastcav``,
    which has no ``C``."""
    return (1.0,) if solver == "fastcav" else tuple(sorted({float(c) for c in cs}))


def min_examples(val_fraction: float = 0.5, selecting: bool = True) -> int:
    """The fewest examples per side :func:`learn_cavs` accepts: 2, or with a choice of ``C`` to
    make, enough to leave 2 in the training part for cross-validation."""
    n = 2
    while selecting and n - _held_out(n, val_fraction) < 2:
        n += 1
    return n


def _checked_options(solver: str, cs: Sequence[float], val_fraction: float, folds: int) -> tuple[float, ...]:
    """The candidate values of C, once the options are known to be valid."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}.")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(map(repr, SOLVERS))}, got {solver!r}.")
    cs = candidate_cs(solver, cs)
    if not cs or not all(0 < c < math.inf for c in cs):
        raise ValueError(f"C values must be positive finite numbers, got {cs}.")
    if not (isinstance(folds, numbers.Integral) and folds >= 2):
        raise ValueError(f"folds must be an integer of at least 2, got {folds!r}.")
    return cs


def learn_cavs(positives: Mapping[str, torch.Tensor], negatives: Mapping[str, torch.Tensor], *,
               solver: Solver = "torch", cs: Sequence[float] = DEFAULT_CS, val_fraction: float = 0.5,
               folds: int = 3, seed: int = 0, backbone: str | None = None, device: str | torch.device = "cpu",
               progress: bool = False) -> ConceptBank:
    """A CAV bank from positive/negative example embeddings per concept (name -> [n, D]).

    ``val_fraction`` of each side is held out to report accuracy (``stats["val_accuracy"]``);
    ``C`` is chosen by ``folds``-fold cross-validation on the rest (see the module docstring).
    """
    names = list(positives)
    if not names:
        raise ValueError("no concepts given: positives is empty.")
    if set(names) != set(negatives):
        raise ValueError(f"positives and negatives must name the same concepts; differing: "
                         f"{sorted(set(names) ^ set(negatives))[:10]}.")
    cs = _checked_options(solver, cs, val_fraction, folds)
    needed = min_examples(val_fraction, selecting=len(cs) > 1)
    dims = set()
    generator = torch.Generator().manual_seed(seed)
    train, val = [], []
    for name in names:
        pos, neg = (real_tensor(side[name], f"{label}[{name!r}]").cpu()
                    for side, label in ((positives, "positives"), (negatives, "negatives")))
        for label, block in (("positive", pos), ("negative", neg)):
            if block.ndim != 2 or block.shape[0] < needed:
                why = " (at least 2 to fit and choose C on, the rest held out)" if needed > 2 else ""
                raise ValueError(f"concept {name!r} needs at least {needed} {label} examples as an [n, D] tensor"
                                 f"{why}, got shape {tuple(block.shape)}.")
            if not torch.isfinite(block).all():
                raise ValueError(f"the {label} examples of concept {name!r} contain NaN or infinite values; "
                                 "drop those rows first.")
            dims.add(block.shape[1])
        (pos_train, pos_val), (neg_train, neg_val) = (_split(b, val_fraction, generator) for b in (pos, neg))
        train.append((pos_train, neg_train))
        val.append((pos_val, neg_val))
    if len(dims) != 1:
        raise ValueError(f"all examples must share one embedding dimension, got {sorted(dims)}.")
    return _fit_bank(names, _Examples.padded(train), _Examples.padded(val), solver=solver, cs=cs, folds=folds,
                     val_fraction=val_fraction, seed=seed, device=device, progress=progress, backbone=backbone)


def _fit_bank(names: list[str], train: _Examples, val: _Examples, *, solver: str, cs: tuple[float, ...], folds: int,
              val_fraction: float, seed: int, device: str | torch.device, progress: bool,
              backbone: str | None) -> ConceptBank:
    """Fit every candidate, choose C per concept, and describe the chosen CAVs on all their examples."""

    def solve(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifiers [K,C,D] and intercepts [K,C] fit on the training examples in ``rows``."""
        on = torch.device(device)
        if solver == "torch":
            weights, bias = hinge_svm(train.x.to(on), train.y.to(on), rows.to(on), cs, seed=seed)
        elif solver == "newton":
            y = train.y.repeat(len(rows) // len(train.y), 1)  # rows may stack several fits of every concept
            weights, bias = squared_hinge_svm(train.x.to(on), y.to(on), rows.to(on), cs)
        elif solver in ("sklearn", "liblinear"):
            return _sklearn_svm(train.x, train.y, rows, cs, progress, linear=solver == "liblinear")
        else:
            return _fastcav(train.x, train.y, rows)
        return weights.cpu(), bias.cpu()

    # the final fit on the whole training part and, to choose C, one fit per cross-validation fold without it
    fold = train.folds(folds)
    held = [fold == f for f in range(folds) if len(cs) > 1 and (fold == f).any()]
    fitted_on = [train.valid] + [train.valid & ~h for h in held]
    if solver == "newton" and train.x.ndim == 2:  # every fit in one batch: each product serves them all
        k = len(names)
        weights, bias = solve(torch.cat(fitted_on))
        fits = [(weights[i * k:(i + 1) * k], bias[i * k:(i + 1) * k]) for i in range(len(fitted_on))]
    else:
        fits = [solve(rows) for rows in fitted_on]
    weights, bias = fits[0]
    rows = torch.arange(len(names))
    if held:  # cross-validated accuracy [K,C]: each fold scored by the classifiers fit without it
        correct = sum(train.correct(w, b, h) for (w, b), h in zip(fits[1:], held))
        selection = correct / train.valid.sum(-1, keepdim=True)
        chosen = selection.argmax(dim=1)  # first maximum: the smallest C
        selection = selection[rows, chosen]
    else:
        chosen, selection = torch.zeros(len(names), dtype=torch.long), torch.full((len(names),), math.nan)
    vectors, intercepts = weights[rows, chosen][:, None], bias[rows, chosen][:, None]
    stats = {"C": torch.tensor(cs)[chosen], "selection_accuracy": selection,
             "train_accuracy": train.accuracy(vectors, intercepts)[:, 0],
             "val_accuracy": val.accuracy(vectors, intercepts)[:, 0]}
    margins = torch.cat([part.margins(vectors, intercepts)[:, 0] for part in (train, val)], dim=1)
    labels = torch.cat([train.y, val.y], dim=1)
    for side, sign in (("pos", 1), ("neg", -1)):  # margins of all examples, training and held-out
        values = torch.where(labels == sign, margins, torch.full_like(margins, float("nan")))
        count = (labels == sign).sum(1)
        mean = values.nanmean(1)
        stats[f"{side}_mean"] = mean
        stats[f"{side}_std"] = ((values - mean[:, None]) ** 2).nansum(1).div(count - 1).sqrt()
        for q in QUANTILES:
            stats[f"{side}_q{round(q * 100)}"] = values.nanquantile(q, dim=1)
        stats[f"{side}_count"] = count.float()
    provenance = {"generator": "cavs", "solver": solver, "C_grid": list(cs), "val_fraction": val_fraction,
                  "C_selection": f"{folds}-fold cross-validation on the training part" if len(cs) > 1 else "none",
                  "seed": seed}
    bank = ConceptBank(names, vectors[:, 0], intercepts[:, 0], kind="cav", backbone=backbone,
                       provenance=provenance, stats=stats)
    logger.info("learned %d CAVs (%s): mean held-out accuracy %.3f", len(names), solver,
                float(stats["val_accuracy"].mean()))
    return bank


def _row_labels(examples: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> torch.Tensor:
    """Labels [K, rows] of the shared feature matrix: +1 at each concept's positive rows, -1 at its negative rows."""
    labels = torch.zeros(len(examples), rows)
    for k, (positives, negatives) in enumerate(examples):
        labels[k, positives], labels[k, negatives] = 1, -1
    return labels


def cavs_from_labels(features: torch.Tensor, concept_labels: torch.Tensor, names: Sequence[str], *,
                     max_positives: int | None = None, seed: int = 0, on_missing: Literal["raise", "skip"] = "raise",
                     solver: Solver = "newton", cs: Sequence[float] = DEFAULT_CS, val_fraction: float = 0.5,
                     folds: int = 3, backbone: str | None = None, device: str | torch.device = "cpu",
                     progress: bool = False) -> ConceptBank:
    """CAVs from a labelled dataset: features [N,D] and binary concept labels [N,K].

    Positives are the samples with the concept (at most ``max_positives``, sampled); as many
    negatives are sampled from the rest (seeded). A concept with fewer positives or negatives than
    :func:`learn_cavs` needs (:func:`min_examples`: 4 with the defaults) raises, or with
    ``on_missing="skip"`` is left out and recorded in the provenance. The other options are
    :func:`learn_cavs`'; the default solver, ``"newton"``, reads the feature matrix once per step for
    all concepts, so every positive of every concept costs seconds, not minutes.
    """
    features = real_tensor(features, "features").cpu().float()
    labels = real_tensor(concept_labels, "concept_labels").cpu()
    if features.ndim != 2 or labels.ndim != 2 or labels.shape != (features.shape[0], len(names)):
        raise ValueError(f"need features [N,D] and concept labels [N,K={len(names)}], got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}.")
    if not (torch.isfinite(features).all() and torch.isfinite(labels).all()):
        raise ValueError("features and concept_labels must not contain NaN or infinite values; drop those rows first.")
    if on_missing not in ("raise", "skip"):
        raise ValueError(f"on_missing must be 'raise' or 'skip', got {on_missing!r}.")
    cs = _checked_options(solver, cs, val_fraction, folds)
    needed = min_examples(val_fraction, selecting=len(cs) > 1)
    if max_positives is not None and not (isinstance(max_positives, numbers.Integral) and max_positives >= needed):
        raise ValueError(f"max_positives must be an integer of at least {needed} (or None for all), "
                         f"got {max_positives!r}.")
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    kept, train, val, skipped = [], [], [], {}  # per concept: (positives, negatives) row numbers, split's order
    for k, name in enumerate(names):
        present = labels[:, k] >= 0.5
        pos_idx, neg_idx = (torch.nonzero(mask).flatten().numpy() for mask in (present, ~present))
        if min(len(pos_idx), len(neg_idx)) < needed:
            reason = f"{len(pos_idx)} positive and {len(neg_idx)} negative samples (need at least {needed} of each)"
            if on_missing == "raise":
                raise ValueError(f"cannot learn a CAV for {name!r}: {reason}; pass on_missing='skip' to leave it out.")
            skipped[name] = reason
            logger.warning("skipping concept %r: %s", name, reason)
            continue
        n_pos = len(pos_idx) if max_positives is None else min(len(pos_idx), max_positives)
        pos_idx = np.sort(rng.choice(pos_idx, size=n_pos, replace=False))
        neg_idx = np.sort(rng.choice(neg_idx, size=min(n_pos, len(neg_idx)), replace=False))
        (pos_train, pos_val), (neg_train, neg_val) = (_split(torch.from_numpy(index), val_fraction, generator)
                                                      for index in (pos_idx, neg_idx))  # as learn_cavs splits
        kept.append(name)
        train.append((pos_train, neg_train))
        val.append((pos_val, neg_val))
    if not kept:
        raise ValueError(f"no concept has enough positive and negative samples; skipped: {skipped}.")
    if solver in ("newton", "liblinear"):  # one feature matrix for every concept: labels mark each one's rows
        train, val = (_Examples(features, _row_labels(part, len(features))) for part in (train, val))
    else:  # each concept's own copy of its examples, exactly as learn_cavs lays them out
        train, val = (_Examples.padded([(features[p], features[n]) for p, n in part]) for part in (train, val))
    bank = _fit_bank(kept, train, val, solver=solver, cs=cs, folds=folds, val_fraction=val_fraction, seed=seed,
                     device=device, progress=progress, backbone=backbone)
    bank.provenance.update({"source": "concept labels", "max_positives": max_positives, "skipped": skipped})
    return bank
