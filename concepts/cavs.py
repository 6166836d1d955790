"""Concept activation vectors (CAVs) learned from embeddings: the Post-hoc CBM recipe, batched.

For each concept, positive and negative example embeddings are split (seeded) into a training
and a held-out part (``val_fraction``). ``C`` is chosen by stratified ``folds``-fold
cross-validation on the training part (best mean accuracy; ties: the smallest ``C``), the CAV
is the classifier fit on the whole training part with that ``C``, and the held-out part, used
neither to fit nor to choose ``C``, measures its accuracy. Solvers:

- ``"torch"``: the same hinge-loss linear SVM as SVC, ``1/2 ||w||^2 + C sum_i max(0, 1 - y_i (w.x_i + b))``,
  solved for ALL concepts and ALL ``C`` at once by batched dual coordinate descent
  (``hinge_svm``). Runs on CPU or GPU.
- ``"sklearn"``: ``sklearn.svm.SVC(kernel="linear", C)`` per concept and ``C``, as Post-hoc CBM does.
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
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from concepts.bank import ConceptBank, real_tensor

logger = logging.getLogger(__name__)

Solver = Literal["torch", "sklearn", "fastcav"]
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


def _sklearn_svm(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, cs: Sequence[float],
                 progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.svm import SVC

    weights = torch.zeros(x.shape[0], len(cs), x.shape[2])
    bias = torch.zeros(x.shape[0], len(cs))
    for k in tqdm(range(x.shape[0]), desc="SVC per concept", disable=not progress):
        features, labels = x[k][valid[k]].numpy(), y[k][valid[k]].numpy()
        for j, c in enumerate(cs):
            svm = SVC(kernel="linear", C=c).fit(features, labels)
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
    """Per-concept examples padded to [K,M,D] with labels [K,M] in {-1,+1} and a mask [K,M]
    (positives first, then negatives, each side in the seeded order of :func:`_split`)."""

    def __init__(self, blocks: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        width = max(len(p) + len(n) for p, n in blocks)
        self.x = torch.zeros(len(blocks), width, blocks[0][0].shape[1])
        self.y = torch.zeros(len(blocks), width)
        for k, (pos, neg) in enumerate(blocks):
            self.x[k, :len(pos) + len(neg)] = torch.cat([pos, neg])
            self.y[k, :len(pos)], self.y[k, len(pos):len(pos) + len(neg)] = 1, -1
        self.valid = self.y != 0

    def margins(self, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Signed distances [K,C,M] of every example to every candidate hyperplane ([K,C,D], [K,C])."""
        return (torch.einsum("kmd,kcd->kcm", self.x, weights) + bias[..., None]) / weights.norm(dim=-1, keepdim=True)

    def correct(self, weights: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Number [K,C] of the examples in ``rows`` ([K,M] mask; default all) each candidate gets right."""
        rows = self.valid if rows is None else rows & self.valid
        return (((self.margins(weights, bias) >= 0) == (self.y[:, None] > 0)) & rows[:, None]).sum(-1)

    def accuracy(self, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Accuracy [K,C] of each candidate classifier."""
        return self.correct(weights, bias) / self.valid.sum(-1, keepdim=True)

    def folds(self, folds: int) -> torch.Tensor:
        """Stratified fold of every example [K,M] (-1 at padding): each side dealt in turn into
        ``min(folds, positives, negatives)`` folds of the concept."""
        positives, negatives = (self.y == 1).sum(1), (self.y == -1).sum(1)
        width = torch.minimum(torch.minimum(positives, negatives), torch.tensor(folds)).clamp(min=1)
        rank = torch.arange(self.y.shape[1]).expand_as(self.y)
        rank = torch.where(self.y == 1, rank, rank - positives[:, None])  # position within its side
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


def _choose_c(train: _Examples, solve: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
              folds: int) -> torch.Tensor:
    """Cross-validated accuracy [K,C] of every C on the training part: each fold is scored by the
    classifiers fit on the other folds."""
    fold = train.folds(folds)
    correct = torch.zeros(fold.shape[0], 1)
    for f in range(folds):
        held = fold == f
        if held.any():
            weights, bias = solve(train.valid & ~held)
            correct = correct + train.correct(weights, bias, held)
    return correct / train.valid.sum(-1, keepdim=True)


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
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}.")
    if solver not in ("torch", "sklearn", "fastcav"):
        raise ValueError(f"solver must be 'torch', 'sklearn' or 'fastcav', got {solver!r}.")
    cs = candidate_cs(solver, cs)
    if not cs or not all(0 < c < math.inf for c in cs):
        raise ValueError(f"C values must be positive finite numbers, got {cs}.")
    if not (isinstance(folds, numbers.Integral) and folds >= 2):
        raise ValueError(f"folds must be an integer of at least 2, got {folds!r}.")
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
    train, val = _Examples(train), _Examples(val)

    def solve(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classifiers [K,C,D] and intercepts [K,C] fit on the training examples in ``rows``."""
        if solver == "torch":
            on = torch.device(device)
            weights, bias = hinge_svm(train.x.to(on), train.y.to(on), rows.to(on), cs, seed=seed)
            return weights.cpu(), bias.cpu()
        if solver == "sklearn":
            return _sklearn_svm(train.x, train.y, rows, cs, progress)
        return _fastcav(train.x, train.y, rows)

    weights, bias = solve(train.valid)
    rows = torch.arange(len(names))
    if len(cs) > 1:
        selection = _choose_c(train, solve, folds)
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


def cavs_from_labels(features: torch.Tensor, concept_labels: torch.Tensor, names: Sequence[str], *,
                     max_positives: int | None = None, seed: int = 0, on_missing: Literal["raise", "skip"] = "raise",
                     **learn_kwargs) -> ConceptBank:
    """CAVs from a labelled dataset: features [N,D] and binary concept labels [N,K].

    Positives are the samples with the concept (at most ``max_positives``, sampled); as many
    negatives are sampled from the rest (seeded). A concept with fewer positives or negatives than
    :func:`learn_cavs` needs (:func:`min_examples`: 4 with the defaults) raises, or with
    ``on_missing="skip"`` is left out and recorded in the provenance.
    """
    features = real_tensor(features, "features").cpu()
    labels = real_tensor(concept_labels, "concept_labels").cpu()
    if features.ndim != 2 or labels.ndim != 2 or labels.shape != (features.shape[0], len(names)):
        raise ValueError(f"need features [N,D] and concept labels [N,K={len(names)}], got "
                         f"{tuple(features.shape)} and {tuple(labels.shape)}.")
    if not (torch.isfinite(features).all() and torch.isfinite(labels).all()):
        raise ValueError("features and concept_labels must not contain NaN or infinite values; drop those rows first.")
    if on_missing not in ("raise", "skip"):
        raise ValueError(f"on_missing must be 'raise' or 'skip', got {on_missing!r}.")
    selecting = len(candidate_cs(learn_kwargs.get("solver", "torch"), learn_kwargs.get("cs", DEFAULT_CS))) > 1
    needed = min_examples(learn_kwargs.get("val_fraction", 0.5), selecting)
    if max_positives is not None and not (isinstance(max_positives, numbers.Integral) and max_positives >= needed):
        raise ValueError(f"max_positives must be an integer of at least {needed} (or None for all), "
                         f"got {max_positives!r}.")
    rng = np.random.default_rng(seed)
    positives, negatives, skipped = {}, {}, {}
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
        pos_idx = rng.choice(pos_idx, size=n_pos, replace=False)
        neg_idx = rng.choice(neg_idx, size=min(n_pos, len(neg_idx)), replace=False)
        positives[name], negatives[name] = features[np.sort(pos_idx)], features[np.sort(neg_idx)]
    if not positives:
        raise ValueError(f"no concept has enough positive and negative samples; skipped: {skipped}.")
    bank = learn_cavs(positives, negatives, seed=seed, **learn_kwargs)
    bank.provenance.update({"source": "concept labels", "max_positives": max_positives, "skipped": skipped})
    return bank
