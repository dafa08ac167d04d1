"""Philox4x32-10 counter-based uniforms: the randomness of rejection_sample when no `uniforms` are given.

Node j (local index) of request r gets the block philox(key=seed[r], counter=(offset[r], j)); its
words (w0, w1) give the acceptance uniform and (w2, w3) the sampling uniform, each with 53 random
bits in [0, 1). Every backend derives the same numbers, so a seed reproduces a round anywhere.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for a 32-bit constant a and 32-bit values b, in int64."""
    b_lo, b_hi = b & 0xFFFF, b >> 16
    low_part, high_part = a * b_lo, a * b_hi  # each < 2^48, no overflow
    hi = (high_part + (low_part >> 16)) >> 16
    lo = (low_part + ((high_part & 0xFFFF) << 16)) & _MASK32
    return hi, lo


def philox4x32(counter: list[torch.Tensor], key: list[torch.Tensor]) -> list[torch.Tensor]:
    """Philox4x32 with 10 rounds on int64 tensors holding 32-bit words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def _unit(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """53 random bits from two words, as a float64 in [0, 1)."""
    return ((high >> 5) * 67108864 + (low >> 6)).double() * (1.0 / 9007199254740992.0)


def philox_uniforms(seed: torch.Tensor, offset: torch.Tensor, qo_indptr: torch.Tensor) -> torch.Tensor:
    """[T, 2] float64 uniforms for the flattened round: column 0 judges node i, column 1 samples at it."""
    counts = (qo_indptr[1:] - qo_indptr[:-1]).long().cpu()
    seed_per_node = torch.repeat_interleave(seed.long().cpu(), counts)
    offset_per_node = torch.repeat_interleave(offset.long().cpu(), counts)
    local = torch.arange(int(counts.sum())) - torch.repeat_interleave(qo_indptr[:-1].long().cpu(), counts)
    words = philox4x32(
        [offset_per_node & _MASK32, (offset_per_node >> 32) & _MASK32, local & _MASK32, torch.zeros_like(local)],
        [seed_per_node & _MASK32, (seed_per_node >> 32) & _MASK32],
    )
    return torch.stack([_unit(words[0], words[1]), _unit(words[2], words[3])], dim=1).to(qo_indptr.device)
