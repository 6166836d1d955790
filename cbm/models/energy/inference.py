"""ECBM's gradient inference: the relaxed class and concepts optimised per sample with Adam, the exact class
read-out at the inferred concepts, and the results (``Inference``, ``Propagation``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from cbm.models.energy.networks import (
    ConceptEnergyTable,
    EnergyNetworks,
    LinkEdits,
    frozen,
)


@dataclass
class Inference:
    """Result of gradient inference per sample: class logits (the exact read-out, see ``infer``),
    concept probabilities, the relaxed class variable, the final total energy, the optimisation steps
    taken (in all, when an intervention continued it), and the optimiser's state from which an
    intervention continues: for the class [N, 3, C] and the concepts [N, 3, K], the pre-activations and
    Adam's first and second moments."""

    logits: torch.Tensor
    concept_probs: torch.Tensor
    relaxed_class_probs: torch.Tensor
    energy: torch.Tensor
    steps: torch.Tensor
    class_state: torch.Tensor
    concept_state: torch.Tensor

    @property
    def class_probs(self) -> torch.Tensor:
        return torch.softmax(self.logits, dim=1)

    def take(self, rows: torch.Tensor) -> Inference:
        """The results of samples ``rows`` (an index tensor; repeats allowed), copied."""
        return Inference(*(getattr(self, f.name)[rows] for f in fields(self)))

    def to(self, device: torch.device) -> Inference:
        return Inference(*(getattr(self, f.name).to(device) for f in fields(self)))

    def put(self, rows: torch.Tensor, other: Inference) -> None:
        """Overwrite the results of samples ``rows`` with ``other``'s (one row of it per index)."""
        for f in fields(self):
            getattr(self, f.name)[rows] = getattr(other, f.name)


@dataclass
class Propagation:
    """An intervention: what was fixed, and how the other concepts and the class moved."""

    mask: torch.Tensor  # [N, K] the intervened concepts
    concepts_before: torch.Tensor  # [N, K] probabilities before
    concepts_after: torch.Tensor  # [N, K] after (intervened ones hold the given values)
    logits_before: torch.Tensor  # [N, C]
    logits_after: torch.Tensor  # [N, C]
    concept_names: list[str]
    class_names: list[str]

    @property
    def concept_shift(self) -> torch.Tensor:
        """Change of every non-intervened concept's probability [N, K] (0 on intervened ones)."""
        return torch.where(self.mask, torch.zeros(()), self.concepts_after - self.concepts_before)

    @property
    def flipped(self) -> torch.Tensor:
        """Non-intervened concepts whose predicted value (p > 0.5) changed [N, K]."""
        return ~self.mask & ((self.concepts_after > 0.5) != (self.concepts_before > 0.5))

    @property
    def class_changed(self) -> torch.Tensor:
        return self.logits_before.argmax(1) != self.logits_after.argmax(1)

    def describe(self, i: int = 0, top: int = 5) -> str:
        """One sample's intervention in words."""
        fixed = [self.concept_names[k] for k in torch.nonzero(self.mask[i]).flatten().tolist()]
        shift = self.concept_shift[i]
        order = shift.abs().argsort(descending=True)[:top]
        moved = [f"{self.concept_names[k]} {float(self.concepts_before[i, k]):.2f}->{float(self.concepts_after[i, k]):.2f}"
                 for k in order.tolist() if abs(float(shift[k])) > 1e-3]
        before, after = int(self.logits_before[i].argmax()), int(self.logits_after[i].argmax())
        return (f"fixed {', '.join(fixed) or 'nothing'}; class {self.class_names[before]} -> {self.class_names[after]}; "
                f"moved: {', '.join(moved) or 'nothing'}")


def infer_batch(net: EnergyNetworks, x: torch.Tensor, fixed: torch.Tensor, given: torch.Tensor,
                lam: tuple[float, float, float], links: LinkEdits, start: Inference | None, *,
                max_steps: int, lr: float, tol: float, patience: int, init: str = "networks") -> tuple[torch.Tensor, ...]:
    """Adam on the relaxed class and concept variables of one batch until each sample's relative energy
    change stays under ``tol`` for ``patience`` steps (at most ``max_steps``), then the exact read-out.
    Returns the fields of an ``Inference``, in order.

    A fresh inference (no ``start``) begins at the networks' own predictions (``init="networks"``: the
    class variable at ``-E_xy(x, .)``, each concept at the log-odds ``E_xc(x, 0) - E_xc(x, 1)``), which
    saves most of the steps, or uniform (``"uniform"``, the reference's start)."""
    b, m, k = len(x), net.m, net.k
    with torch.no_grad():
        h, g = net.encode(x)
        g = net.concept_energy_parts(g)
        concept_energy = ConceptEnergyTable(net, g)
    if start is None:
        class_state, concept_state = torch.zeros(b, 3, m, device=x.device), torch.zeros(b, 3, k, device=x.device)
        if init == "networks":
            with torch.no_grad():
                class_state[:, 0] = -net.class_energy_all(h)
                concept_state[:, 0] = concept_energy.values[..., 0] - concept_energy(torch.ones(b, k, device=x.device))
    else:
        class_state, concept_state = start.class_state.clone(), start.concept_state.clone()
    with frozen(net), torch.enable_grad():  # the relaxed variables are optimised by gradient, even under no_grad
        a, s = class_state[:, 0].clone(), concept_state[:, 0].clone()
        params = [a, s]
        moments = [(class_state[:, 1], class_state[:, 2]), (concept_state[:, 1], concept_state[:, 2])]
        settled = fixed.all(dim=1)  # nothing left to infer: the read-out below is exact without steps
        active = ~settled
        stale = torch.zeros(b, dtype=torch.long, device=x.device)
        steps = torch.zeros(b, dtype=torch.long, device=x.device) if start is None else start.steps.clone()
        previous = None
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for _ in range(max_steps):
            if not active.any():
                break
            a.requires_grad_(True)
            s.requires_grad_(True)
            energy = total_energy(net, h, concept_energy, a, s, fixed, given, lam, links)
            # a zero weight can leave the class or the concept variables out of the energy
            grads = torch.autograd.grad(energy.sum(), params, allow_unused=True, materialize_grads=True)
            a, s = a.detach(), s.detach()
            energy = energy.detach()
            if previous is not None:
                small = (previous - energy).abs() <= tol * energy.abs().clamp_min(1e-3)
                stale = torch.where(small, stale + 1, torch.zeros_like(stale))
                active = active & (stale < patience)
                if not active.any():
                    break
            previous = energy
            steps += active.long()
            rows = active[:, None].float()
            updated = []
            for t, grad, (m1, m2) in zip((a, s), grads, moments):
                m1.mul_(1 - (1 - beta1) * rows).add_((1 - beta1) * rows * grad)
                m2.mul_(1 - (1 - beta2) * rows).add_((1 - beta2) * rows * grad * grad)
                count = steps[:, None].clamp_min(1).float()
                m_hat = m1 / (1 - beta1 ** count)
                v_hat = m2 / (1 - beta2 ** count)
                updated.append(t - rows * lr * m_hat / (v_hat.sqrt() + eps))
            a, s = updated
            params = [a, s]
        with torch.no_grad():
            p_c = torch.where(fixed, given, torch.sigmoid(s))
            if lam[0] or lam[2]:  # exact minimisation over the discrete class given the concepts
                logits = readout(net, h, g, p_c, lam, links)
                a = torch.where(settled[:, None], logits, a)
            else:
                logits = torch.log_softmax(a, dim=1)
            energy = total_energy(net, h, lambda p: net.concept_energy_from_parts(g, p), a, s, fixed, given, lam,
                                  links)
        class_state[:, 0], concept_state[:, 0] = a, s
        return logits, p_c, torch.softmax(a, dim=1), energy, steps, class_state, concept_state


def total_energy(net: EnergyNetworks, h: torch.Tensor, concept_energy: Callable[[torch.Tensor], torch.Tensor],
                 a: torch.Tensor, s: torch.Tensor, fixed: torch.Tensor, given: torch.Tensor,
                 lam: tuple[float, float, float], links: LinkEdits) -> torch.Tensor:
    """The weighted total energy per sample at relaxed class ``softmax(a)`` and concepts ``sigmoid(s)``
    (fixed concepts hold ``given``); ``concept_energy(p_c)`` gives ``E_xc`` [B, K]."""
    p_y = torch.softmax(a, dim=1)
    p_c = torch.where(fixed, given, torch.sigmoid(s))
    total = torch.zeros(len(h), device=h.device)
    if lam[0]:
        total = total + lam[0] * net.class_energy_soft(h, p_y)
    if lam[1]:
        total = total + lam[1] * concept_energy(p_c).sum(1)
    if lam[2]:
        total = total + lam[2] * net.global_energy_soft(p_c, p_y, links)
    return total


def concept_part(net: EnergyNetworks, p_c: torch.Tensor, links: LinkEdits,
                 lam: tuple[float, float, float]) -> torch.Tensor:
    """The concepts' part of the logits, ``-l_cy E_cy(c, y)`` [B, M]."""
    return -lam[2] * net.global_energy_all(p_c, links)


def input_part(net: EnergyNetworks, h: torch.Tensor, g_parts: tuple[torch.Tensor, torch.Tensor],
               p_c: torch.Tensor, lam: tuple[float, float, float]) -> torch.Tensor:
    """The rest of the logits, ``-(l_xy E_xy(x, y) + l_xc sum_k E_xc(x, c_k))`` [B, M] (the concept
    energy is the same for every class)."""
    rest = -lam[0] * net.class_energy_all(h)
    return rest - lam[1] * net.concept_energy_from_parts(g_parts, p_c).sum(1, keepdim=True)


def readout(net: EnergyNetworks, h: torch.Tensor, g_parts: tuple[torch.Tensor, torch.Tensor],
            p_c: torch.Tensor, lam: tuple[float, float, float], links: LinkEdits) -> torch.Tensor:
    """Exact class logits at concepts ``p_c``: minus the total energy of (x, y, c) for every class y."""
    return input_part(net, h, g_parts, p_c, lam) + concept_part(net, p_c, links, lam)
