"""MoTIF's network: per-concept attention over time (or mixing attention, for comparison), the per-concept
feed-forward and output layers, the non-negative classifier and log-sum-exp pooling."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

ATTENTION_MODES = ("identity", "uniform", "reversed", "shuffled")


def sinusoidal_encoding(length: int, width: int, base: float = 10000.0) -> torch.Tensor:
    """[length, width] sinusoidal positional encoding (sin on even, cos on odd channels)."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(base) / max(width, 1)))
    encoding = torch.zeros(length, width)
    encoding[:, 0::2] = torch.sin(position * rate)
    encoding[:, 1::2] = torch.cos(position * rate[: width // 2])
    return encoding


class ConceptNorm(nn.Module):
    """A learned scale and shift per concept channel: the per-concept stand-in for LayerNorm (no
    statistics, none shared across concepts)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(k))
        self.bias = nn.Parameter(torch.zeros(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def _mode_weights(weights: torch.Tensor, valid: torch.Tensor, mode: str | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Replace attention weights [B, H, T, T] (softmax over the last axis) by an intervention mode."""
    if mode is None:
        return weights
    b, _, t, _ = weights.shape
    lengths = valid.sum(1)
    if mode == "identity":
        eye = torch.eye(t, dtype=weights.dtype)
        return eye.expand_as(weights).clone()
    if mode == "uniform":
        row = valid.to(weights.dtype) / lengths[:, None].to(weights.dtype)
        return row[:, None, None, :].expand_as(weights).clone()
    steps = torch.arange(t)
    if mode == "reversed":  # window t reads the values of the mirrored windows: key u -> L-1-u
        source = torch.where(valid, lengths[:, None] - 1 - steps[None], steps[None])
    elif mode == "shuffled":  # keys permuted at random inside each video's valid windows
        source = steps.repeat(b, 1)
        for i, n in enumerate(lengths.tolist()):
            source[i, :n] = torch.randperm(n, generator=generator)
    else:
        raise ValueError(f"unknown attention mode {mode!r}; use one of {', '.join(ATTENTION_MODES)}.")
    index = source[:, None, None, :].expand_as(weights)
    return weights.gather(3, index)


class TemporalNet(nn.Module):
    """The MoTIF network on standardised concept activations [B, T, K] (see the module docstring)."""

    def __init__(self, k: int, c: int, *, attention: str = "per_concept", heads: int = 1, head_dim: int = 1,
                 hidden: int = 4, norm: str = "concept", dropout: float = 0.1, positional: str = "attention",
                 position_dim: int = 8) -> None:
        super().__init__()
        self.k, self.c, self.attention, self.heads, self.head_dim = k, c, attention, heads, head_dim
        if positional not in ("input", "attention"):
            raise ValueError(f"positional must be 'input' or 'attention', got {positional!r}.")
        self.positional, self.position_dim = positional, position_dim
        make_norm = (lambda: nn.LayerNorm(k)) if norm == "layer" else (lambda: ConceptNorm(k))
        self.norm1, self.norm2, self.norm_out = make_norm(), make_norm(), make_norm()
        self.drop = nn.Dropout(dropout)
        if attention == "per_concept":  # grouped 1x1 convolutions: one small projection per concept
            scale = 1.0 / math.sqrt(head_dim)
            self.q_weight = nn.Parameter(torch.randn(k, head_dim) * scale + 1.0)
            self.k_weight = nn.Parameter(torch.randn(k, head_dim) * scale + 1.0)
            self.v_weight = nn.Parameter(torch.randn(k, head_dim) * scale + 1.0)
            self.q_bias = nn.Parameter(torch.zeros(k, head_dim))
            self.k_bias = nn.Parameter(torch.zeros(k, head_dim))
            self.v_bias = nn.Parameter(torch.zeros(k, head_dim))
            self.log_temperature = nn.Parameter(torch.zeros(k))
            if positional == "attention":  # each concept's own projection of a shared encoding of time
                self.q_position = nn.Parameter(torch.randn(k, position_dim, head_dim) / math.sqrt(position_dim))
                self.k_position = nn.Parameter(torch.randn(k, position_dim, head_dim) / math.sqrt(position_dim))
        elif attention == "mixing":
            if k % heads:
                raise ValueError(f"mixing attention needs heads dividing the {k} concepts, got heads={heads}.")
            self.qkv = nn.Linear(k, 3 * k)
            self.out = nn.Linear(k, k)
        else:
            raise ValueError(f"attention must be 'per_concept' or 'mixing', got {attention!r}.")
        self.ffn_w1 = nn.Parameter(torch.randn(k, hidden) / math.sqrt(1.0))
        self.ffn_b1 = nn.Parameter(torch.zeros(k, hidden))
        self.ffn_w2 = nn.Parameter(torch.randn(k, hidden) / math.sqrt(hidden))
        self.ffn_b2 = nn.Parameter(torch.zeros(k))
        self.affine_weight = nn.Parameter(torch.ones(k))
        self.affine_bias = nn.Parameter(torch.zeros(k))
        self.classifier = nn.Linear(k, c)
        with torch.no_grad():
            self.classifier.weight.uniform_(0.0, 1.0 / math.sqrt(k))

    def _attend(self, x: torch.Tensor, valid: torch.Tensor, mode: str | None,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        pad = ~valid
        if self.attention == "per_concept":
            q = x[..., None] * self.q_weight + self.q_bias  # [B, T, K, d]
            key = x[..., None] * self.k_weight + self.k_bias
            if self.positional == "attention":
                encoding = sinusoidal_encoding(x.shape[1], self.position_dim, base=100.0).to(x)
                q = q + torch.einsum("tp,kpd->tkd", encoding, self.q_position)[None]
                key = key + torch.einsum("tp,kpd->tkd", encoding, self.k_position)[None]
            v = x[..., None] * self.v_weight + self.v_bias
            temperature = torch.exp(self.log_temperature.clamp(-5.0, 5.0))
            scores = torch.einsum("btkd,bukd->bktu", q, key) / math.sqrt(self.head_dim)
            scores = scores * temperature[None, :, None, None]
            weights = torch.softmax(scores.masked_fill(pad[:, None, None, :], float("-inf")), dim=-1)
            weights = _mode_weights(weights, valid, mode, generator)
            out = torch.einsum("bktu,bukd->btkd", weights, v).mean(-1)
            return out, weights
        b, t, k = x.shape
        q, key, v = self.qkv(x).view(b, t, 3, self.heads, k // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ key.transpose(-1, -2) / math.sqrt(k // self.heads)
        weights = torch.softmax(scores.masked_fill(pad[:, None, None, :], float("-inf")), dim=-1)
        weights = _mode_weights(weights, valid, mode, generator)
        out = (weights @ v).transpose(1, 2).reshape(b, t, k)
        return self.out(out), weights

    def bottleneck(self, x: torch.Tensor, valid: torch.Tensor, mode: str | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-window concepts [B, T, K] (zero at padding) and the attention weights [B, H, T, T]."""
        if self.positional == "input" or self.attention == "mixing":
            x = x + sinusoidal_encoding(x.shape[1], self.k).to(x)[None]
        h = self.drop(x)
        attended, weights = self._attend(self.norm1(h), valid, mode, generator)
        h = h + self.drop(attended)
        g = self.norm2(h)
        hidden = F.gelu(g[..., None] * self.ffn_w1 + self.ffn_b1)
        h = h + self.drop((hidden * self.ffn_w2).sum(-1) + self.ffn_b2)
        concepts = F.relu(F.softplus(self.affine_weight * self.norm_out(h) + self.affine_bias) - math.log(2.0))
        return concepts * valid[..., None], weights

    def head(self, concepts: torch.Tensor, valid: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled logits [B, C], per-window logits [B, T, C]) from per-window concepts."""
        window_logits = self.classifier(concepts)
        masked = (tau * window_logits).masked_fill(~valid[..., None], float("-inf"))
        return torch.logsumexp(masked, dim=1) / tau, window_logits
