"""ECBM's three energy networks (class, concept, global) and the link edits of the global energy."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


def relu_products(x: torch.Tensor, scales: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_h weights[n, h] * relu(x[b, h] * scales[n, h])`` [B, N] without the [B, N, H] tensor.

    Every energy network gates a shared vector by an embedding, ``relu(x * s)``; as
    ``relu(x s) = relu(x) relu(s) + relu(-x) relu(-s)`` the weighted sum is two matrix products, the same
    numbers at a fraction of the memory traffic (``weights`` [N, H] or [1, H])."""
    return F.relu(x) @ (weights * F.relu(scales)).T + F.relu(-x) @ (weights * F.relu(-scales)).T


class EnergyNetworks(nn.Module):
    """The three energy networks; every energy is returned per sample (lower = more compatible)."""

    def __init__(self, n_features: int, n_concepts: int, n_classes: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.k, self.m, self.hidden = n_concepts, n_classes, hidden
        self.x_to_y = nn.Linear(n_features, hidden)
        self.x_to_c = nn.Linear(n_features, hidden)
        self.class_embedding = nn.Parameter(torch.randn(n_classes, hidden) / math.sqrt(hidden))
        self.concept_embedding = nn.Parameter(torch.randn(n_concepts, 2, hidden) / math.sqrt(hidden))
        self.class_out = nn.Linear(hidden, 1)
        self.concept_out_weight = nn.Parameter(torch.randn(n_concepts, hidden) / math.sqrt(hidden))
        self.concept_out_bias = nn.Parameter(torch.zeros(n_concepts))
        self.concept_proj = nn.Linear(n_concepts * hidden, hidden)
        self.global_out = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)

    # -- pieces
    def units(self) -> torch.Tensor:
        """Unit class embeddings [M, H]."""
        return F.normalize(self.class_embedding, dim=1)

    def global_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``e(c) = base + c @ slope``: the projection of the mixed concept embeddings is affine in c."""
        weight = self.concept_proj.weight.view(self.hidden, self.k, self.hidden)  # [out, K, in]
        projected = torch.einsum("okh,kjh->kjo", weight, self.concept_embedding)  # [K, 2, out]
        base = projected[:, 0].sum(0) + self.concept_proj.bias
        return base, projected[:, 1] - projected[:, 0]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dropout(self.x_to_y(x)), self.dropout(self.x_to_c(x))

    # -- class energy
    def class_energy_all(self, h: torch.Tensor) -> torch.Tensor:
        """E_xy for every class [B, M]."""
        return relu_products(h, 1 + self.units(), self.class_out.weight) + self.class_out.bias

    def class_energy_soft(self, h: torch.Tensor, p_y: torch.Tensor) -> torch.Tensor:
        """E_xy at relaxed classes p_y [B, M]: the class embedding is the normalised mixture [B]."""
        u = F.normalize(p_y @ self.units(), dim=1)
        return self.class_out(F.relu(h * (1 + u))).squeeze(-1)

    # -- concept energy
    def concept_energy_both(self, g: torch.Tensor) -> torch.Tensor:
        """E_xc for both values of every concept [B, K, 2]."""
        scales = (1 + self.concept_embedding).reshape(2 * self.k, self.hidden)  # rows (k, j)
        weights = self.concept_out_weight.repeat_interleave(2, dim=0)
        return relu_products(g, scales, weights).view(-1, self.k, 2) + self.concept_out_bias[:, None]

    def concept_energy_soft(self, g: torch.Tensor, p_c: torch.Tensor) -> torch.Tensor:
        """E_xc at relaxed concepts p_c [B, K] (mixed embeddings) [B, K]."""
        v0, v1 = self.concept_embedding[:, 0], self.concept_embedding[:, 1]
        v = v0[None] + p_c[..., None] * (v1 - v0)[None]
        z = F.relu(g[:, None] * (1 + v))
        return torch.einsum("bkh,kh->bk", z, self.concept_out_weight) + self.concept_out_bias

    def concept_energy_parts(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-batch constants of ``concept_energy_soft``: its pre-activation is ``z0 + p * dz``."""
        v0, v1 = self.concept_embedding[:, 0], self.concept_embedding[:, 1]
        return g[:, None] * (1 + v0)[None], g[:, None] * (v1 - v0)[None]

    def concept_energy_from_parts(self, parts: tuple[torch.Tensor, torch.Tensor], p_c: torch.Tensor) -> torch.Tensor:
        z = F.relu(parts[0] + p_c[..., None] * parts[1])
        return torch.einsum("bkh,kh->bk", z, self.concept_out_weight) + self.concept_out_bias

    # -- global energy
    def global_from_e(self, e: torch.Tensor) -> torch.Tensor:
        """E_cy for every class from pre-activations e [B, H] (shared by the classes) or [B, M, H] -> [B, M].

        Decided by the number of dimensions, not the shape: a batch of B == M rows is still a batch."""
        u = self.units()
        if e.ndim == 2:
            return relu_products(e, 1 + u, self.global_out.weight) + self.global_out.bias
        return self.global_out(F.relu(e * (1 + u))).squeeze(-1)

    def global_e(self, p_c: torch.Tensor, links: LinkEdits | None = None) -> torch.Tensor:
        """Pre-activations [B, H], or [B, M, H] when some links are edited."""
        base, slope = self.global_affine()
        e = base + p_c @ slope
        if links is None or links.is_identity:
            return e
        mask, value = links.mask.to(e.device), links.value.to(e.device)
        # for class m, concept k sees value[m, k] instead of p_c[:, k] where mask[m, k] is False
        delta = torch.einsum("mk,bmk,kh->bmh", (~mask).float(), value[None] - p_c[:, None], slope)
        return e[:, None] + delta

    def global_energy_all(self, p_c: torch.Tensor, links: LinkEdits | None = None) -> torch.Tensor:
        """E_cy(c, y) for every class [B, M]."""
        return self.global_from_e(self.global_e(p_c, links))

    def global_energy_soft(self, p_c: torch.Tensor, p_y: torch.Tensor, links: LinkEdits | None = None) -> torch.Tensor:
        """E_cy at relaxed concepts and class [B]."""
        e = self.global_e(p_c, links)
        if e.ndim == 3:
            e = (p_y[..., None] * e).sum(1)
        u = F.normalize(p_y @ self.units(), dim=1)
        return self.global_out(F.relu(e * (1 + u))).squeeze(-1)


class ConceptEnergyTable:
    """``E_xc(x, c_k = p)`` of one batch for relaxed ``p`` in [0, 1], as the exact piecewise-linear function
    of ``p`` it is: a bias plus H ReLUs of ``z0 + p dz`` (``EnergyNetworks.concept_energy_parts``).

    Knots (where a unit switches), values and slopes are built once per batch; each evaluation is then a
    binary search per concept instead of a sum over H units, which is what makes the inference loop (which
    evaluates the concept energy at every step) cheap. Differentiable w.r.t. ``p`` (the slope)."""

    def __init__(self, net: EnergyNetworks, parts: tuple[torch.Tensor, torch.Tensor]) -> None:
        z0, dz = parts  # [B, K, H]
        w = net.concept_out_weight.detach()[None]  # [1, K, H]
        with torch.no_grad():
            switch = torch.where(dz != 0, -z0 / torch.where(dz != 0, dz, torch.ones_like(dz)), torch.zeros_like(dz))
            crossing = (switch > 0) & (switch < 1)
            knots, order = torch.where(crossing, switch, torch.ones_like(switch)).sort(dim=-1)
            jumps = torch.where(crossing, w * dz.abs(), torch.zeros_like(dz)).gather(-1, order)
            on_at_zero = (z0 > 0) | ((z0 == 0) & (dz > 0))
            first_slope = (w * dz * on_at_zero).sum(-1, keepdim=True)  # just above p = 0
            at_zero = (w * z0.clamp_min(0)).sum(-1, keepdim=True) + net.concept_out_bias.detach()[None, :, None]
            self.knots = torch.cat([torch.zeros_like(first_slope), knots], dim=-1)  # [B, K, H + 1]
            self.slopes = torch.cat([first_slope, first_slope + jumps.cumsum(-1)], dim=-1)
            rises = self.slopes[..., :-1] * self.knots.diff(dim=-1)
            self.values = torch.cat([at_zero, at_zero + rises.cumsum(-1)], dim=-1)

    def __call__(self, p_c: torch.Tensor) -> torch.Tensor:
        """``E_xc(x, c_k = p_c[:, k])`` [B, K]."""
        p = p_c.clamp(0, 1)[..., None]
        segment = (torch.searchsorted(self.knots, p.detach(), right=True) - 1).clamp_min(0)
        knot, value, slope = (t.gather(-1, segment) for t in (self.knots, self.values, self.slopes))
        return (value + slope * (p - knot)).squeeze(-1)


@contextmanager
def frozen(net: nn.Module) -> Iterator[None]:
    """The network's weights out of autograd while the block runs (inference and read-outs never train)."""
    for p in net.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in net.parameters():
            p.requires_grad_(True)


@dataclass
class LinkEdits:
    """Which concepts feed the global energy of which class (``mask`` [M, K]) and what the cut ones see."""

    mask: torch.Tensor
    value: torch.Tensor

    @property
    def is_identity(self) -> bool:
        return bool(self.mask.all())
