"""ECBM's conditional probabilities (Propositions 3.2-3.5 of Xu et al.) read off the global energy, exactly by
enumeration or by Gibbs sampling, and the empirical tables they are compared with."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from cbm.models.base import as_labels, as_matrix
from cbm.models.energy.inference import Inference
from cbm.models.energy.networks import LinkEdits


class EnergyConditionals:
    """``EnergyCBM``'s conditional probabilities (a mixin: it reads the fitted global energy)."""

    def _global_terms(self, links: LinkEdits | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per class: ``e(c) = base_m + c @ slope_m`` with cut links folded in ([M, H], [M, K, H])."""
        links = links or self._links()
        base, slope = self.net_.global_affine()
        mask = links.mask.float()
        base_m = base[None] + ((1 - mask) * links.value) @ slope
        slope_m = mask[..., None] * slope[None]
        return base_m, slope_m

    def _class_energy_of_states(self, states: torch.Tensor) -> torch.Tensor:
        """E_cy(c, y) [M, S] for binary states [S, K] under every class."""
        base_m, slope_m = self._global_terms()
        e = base_m[:, None] + torch.einsum("sk,mkh->msh", states, slope_m)
        u = self.net_.units()[:, None]
        return self.net_.global_out(F.relu(e * (1 + u))).squeeze(-1)

    def _exact_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = len(self.concept_names_)
        states = torch.tensor(list(itertools.product((0.0, 1.0), repeat=k)))  # [2^K, K]
        with torch.no_grad():
            energy = self._class_energy_of_states(states)
        return states, torch.softmax(-energy, dim=1)  # p(c | y) [M, 2^K]

    def _gibbs(self, chains: int, sweeps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples [M, S, K] of p(c | y) ~ exp(-E_cy(c, y)) per class and Rao-Blackwellised marginals [M, K]."""
        generator = torch.Generator().manual_seed(seed)
        m, k = len(self.class_names_), len(self.concept_names_)
        base_m, slope_m = self._global_terms()
        u = self.net_.units()[:, None]  # [M, 1, H]
        w, b = self.net_.global_out.weight[0], self.net_.global_out.bias[0]
        energy = lambda z: F.relu(z * (1 + u)) @ w + b
        state = (torch.rand(m, chains, k, generator=generator) < self.concept_prior_).float()
        e = base_m[:, None] + torch.einsum("msk,mkh->msh", state, slope_m)
        burn = max(1, sweeps // 4)
        kept, marginal, count = [], torch.zeros(m, k), 0
        with torch.no_grad():
            for sweep in range(sweeps):
                for j in range(k):
                    column = state[..., j:j + 1]
                    e_on = e + (1 - column) * slope_m[:, None, j]
                    e_off = e - column * slope_m[:, None, j]
                    p_on = torch.sigmoid(energy(e_off) - energy(e_on))  # [M, S]
                    if sweep >= burn:
                        marginal[:, j] += p_on.mean(1)
                    new = (torch.rand(m, chains, generator=generator) < p_on).float()
                    e = torch.where(new[..., None] > 0, e_on, e_off)
                    state[..., j] = new
                if sweep >= burn:
                    kept.append(state.clone())
                    count += 1
        return torch.cat(kept, dim=1), marginal / count

    def conditionals(self, subset: Sequence[str] | None = None, *, exact: bool | None = None,
                     chains: int | None = None, sweeps: int | None = None, seed: int | None = None) -> dict[str, Any]:
        """Conditional probabilities read off the global energy, ``p(c | y) ~ exp(-E_cy(c, y))``:

        - ``p_c_given_y`` [C, K]: p(c_k = 1 | y) (Proposition 3.2);
        - ``p_c_given_y_c`` [C, K, K]: [y, j, k] = p(c_k = 1 | y, c_j = 1) (NaN where p(c_j = 1 | y) = 0);
        - ``p_c_given_c`` [K, K]: [j, k] = p(c_k = 1 | c_j = 1), classes mixed by their training frequency;
        - ``joint_given_y`` [C, 2^s] for ``subset`` (s concept names): p(c_subset = bits | y), the bits of
          column i are ``i``'s binary digits, first concept most significant; with ``subset_states``.

        Exact by enumeration when there are at most ``exact_max_concepts`` concepts, else Gibbs sampling.
        """
        self._check_fitted()
        k = len(self.concept_names_)
        exact = k <= self.exact_max_concepts if exact is None else exact
        with torch.no_grad():
            if exact:
                if k > 20:
                    raise ValueError(f"exact enumeration of {k} concepts is too large; use Gibbs sampling.")
                states, weights = self._exact_states()  # [S, K], [M, S]
                marginal = weights @ states
                pair = torch.einsum("ms,sj,sk->mjk", weights, states, states)
                method = "exact enumeration"
            else:
                samples, marginal = self._gibbs(chains or self.gibbs_chains, sweeps or self.gibbs_sweeps,
                                                self.seed if seed is None else seed)
                weights = None
                pair = torch.einsum("msj,msk->mjk", samples, samples) / samples.shape[1]
                # use the Rao-Blackwellised marginals on the diagonal (lower variance)
                pair = pair.clone()
                pair.diagonal(dim1=1, dim2=2).copy_(marginal)
                method = f"Gibbs sampling ({samples.shape[1]} kept samples per class)"
        result = _tables(marginal.double(), pair.double(), self.class_prior_.double())
        result["method"] = method
        if subset is not None:
            columns = [self.concept_index(name) for name in subset]
            if exact:
                codes = _codes(states[:, columns])
                joint = torch.zeros(len(self.class_names_), 2 ** len(columns), dtype=torch.float64)
                joint.index_add_(1, codes, weights.double())
            else:
                codes = _codes(samples[..., columns].reshape(-1, len(columns))).view(samples.shape[:2])
                joint = torch.stack([torch.bincount(row, minlength=2 ** len(columns)) for row in codes]).double()
                joint /= samples.shape[1]
            result["joint_given_y"] = joint
            result["subset"] = list(subset)
            result["subset_states"] = list(itertools.product((0, 1), repeat=len(columns)))
        return result

    def empirical_conditionals(self, x: Any, subset: Sequence[str] | None = None,
                               inference: Inference | None = None) -> dict[str, Any]:
        """The same tables estimated from predictions on ``x`` (the reference's ``CalcImportanceScore`` way):
        frequencies of predicted concepts (p > 0.5) among samples predicted as each class."""
        inference = inference or self.infer(x)
        columns = None if subset is None else [self.concept_index(name) for name in subset]
        return conditional_table((inference.concept_probs > 0.5).float(), inference.class_probs.argmax(1),
                                 len(self.class_names_), columns)

    def compare_conditionals(self, x: Any, subset: Sequence[str] | None = None, **options: Any) -> dict[str, Any]:
        """Energy-derived and empirical tables side by side, with the Pearson correlation of each."""
        energy = self.conditionals(subset, **options)
        empirical = self.empirical_conditionals(x, subset)
        pearson = {}
        for key in ("p_c_given_y", "p_c_given_c", "p_c_given_y_c", "joint_given_y"):
            if key in energy and key in empirical:
                pearson[key] = pearson_r(energy[key], empirical[key])
        return {"energy": energy, "empirical": empirical, "pearson": pearson}

    # ------------------------------------------------------------------ global edits


def _codes(bits: torch.Tensor) -> torch.Tensor:
    """Integer code of binary rows, first column most significant."""
    s = bits.shape[-1]
    powers = 2 ** torch.arange(s - 1, -1, -1)
    return (bits.long() * powers).sum(-1)


def _tables(marginal: torch.Tensor, pair: torch.Tensor, prior: torch.Tensor) -> dict[str, Any]:
    """Conditional tables from p(c_k | y) [M, K] and p(c_j, c_k | y) [M, K, K]."""
    with np.errstate(all="ignore"):
        given_y_c = pair / marginal[..., None]
        given_y_c = torch.where(marginal[..., None] > 0, given_y_c, torch.full_like(given_y_c, float("nan")))
        pair_all = torch.einsum("m,mjk->jk", prior, pair)
        single = prior @ marginal
        given_c = torch.where(single[:, None] > 0, pair_all / single[:, None], torch.full_like(pair_all, float("nan")))
    return {"p_c_given_y": marginal, "p_c_given_y_c": given_y_c, "p_c_given_c": given_c}


def conditional_table(concepts: Any, labels: Any, n_classes: int, subset: Sequence[int] | None = None) -> dict[str, Any]:
    """Empirical conditional tables from binary concepts [N, K] and class labels [N] (predicted or true):
    the same keys as ``EnergyCBM.conditionals`` (classes never seen get NaN rows)."""
    c = as_matrix(concepts, "concepts").double()
    y = as_labels(labels, len(c), n_classes)
    one_hot = F.one_hot(y, n_classes).double()  # [N, M]
    counts = one_hot.sum(0)
    with np.errstate(all="ignore"):
        marginal = (one_hot.T @ c) / counts[:, None]
        pair = torch.einsum("nm,nj,nk->mjk", one_hot, c, c) / counts[:, None, None]
        given_c = (c.T @ c) / c.sum(0)[:, None]
    result = _tables(marginal, pair, counts / counts.sum())
    result["p_c_given_c"] = torch.where(c.sum(0)[:, None] > 0, given_c, torch.full_like(given_c, float("nan")))
    if subset is not None:
        codes = _codes(c[:, list(subset)])
        joint = (one_hot.T @ F.one_hot(codes, 2 ** len(subset)).double()) / counts[:, None]
        result["joint_given_y"] = joint
        result["subset_states"] = list(itertools.product((0, 1), repeat=len(subset)))
    result["method"] = "empirical frequencies"
    return result


def pearson_r(a: Any, b: Any) -> float:
    """Pearson correlation over the entries finite in both."""
    a = torch.as_tensor(a, dtype=torch.float64).flatten()
    b = torch.as_tensor(b, dtype=torch.float64).flatten()
    keep = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[keep] - a[keep].mean(), b[keep] - b[keep].mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else float("nan")
