"""The per-token pieces every model here shares, the target (dspark.models.llama) and the drafters
(dspark.drafters): RMSNorm and rotate-half RoPE. One implementation, so that a drafter's features and
the target's are normalised and rotated alike."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope_frequencies(rope_theta: float, head_dim: int) -> torch.Tensor:
    """Unscaled RoPE inverse frequencies [head_dim / 2] in fp64: theta^(-2i / head_dim)."""
    return 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin over the full head dim, [..., T, 1, D] fp32 for positions [..., T], so that
    rotating is x * cos + swap(x) * sin with swap exchanging the two halves (rotate-half convention)."""
    angles = positions.float()[..., None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], -1)[..., None, :], torch.cat([-sin, sin], -1)[..., None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, H, D]; cos, sin from rope_tables."""
    x32 = x.float()
    swapped = x32.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x32 * cos, swapped, sin).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [..., T, H, D] rotated at positions [..., T] (any leading dims, broadcastable to x's)."""
    cos, sin = rope_tables(positions, inv_freq)
    return apply_rope(x, cos, sin)
