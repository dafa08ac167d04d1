"""Flattening requests into one round (DESIGN.md conventions): tokens, qo_indptr over every cache row,
parents, RoPE positions and the cache slots the round's K/V are written to."""

from __future__ import annotations

import dataclasses

import torch

from dspark import tree


@dataclasses.dataclass
class Round:
    tokens: torch.Tensor       # [T] int64
    qo_indptr: torch.Tensor    # [rows + 1] int32; rows without tokens this round have n_r = 0
    parents: torch.Tensor | None  # [T] int32 local parents, None when every request is a chain
    positions: torch.Tensor    # [T] int64: cache_seqlens[row] + depth
    write_rows: torch.Tensor   # [T] int64
    write_slots: torch.Tensor  # [T] int64: cache_seqlens[row] + local index
    last_index: torch.Tensor   # [rows with tokens] index of each entry's last token in the flat round
    # The longest entry when every entry is a chain written into an empty cache row (plain causal
    # attention over the round's own tokens, e.g. a first prefill), else 0.
    fresh_prefill_len: int = 0


def build_round(num_rows: int, entries: list[tuple[int, list[int], list[int] | None]], seqlens: list[int],
                device: torch.device | str = "cpu") -> Round:
    """entries: (cache row, tokens, local parents or None for a chain), rows in any order;
    seqlens: committed length of every cache row."""
    per_row: dict[int, tuple[list[int], list[int] | None]] = {}
    for row, tokens, parents in entries:
        if row in per_row:
            raise ValueError(f"cache row {row} appears twice in one round")
        per_row[row] = (tokens, parents)
    flat, parents_flat, positions, rows, slots, counts = [], [], [], [], [], []
    any_tree = any(p is not None for _, _, p in entries)
    for row in range(num_rows):
        tokens, parents = per_row.get(row, ([], None))
        local_parents = list(range(-1, len(tokens) - 1)) if parents is None else parents
        depth = tree.depths(local_parents)
        base = seqlens[row]
        flat.extend(tokens)
        parents_flat.extend(local_parents)
        positions.extend(base + d for d in depth)
        rows.extend([row] * len(tokens))
        slots.extend(range(base, base + len(tokens)))
        counts.append(len(tokens))
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    last = [offsets[row + 1] - 1 for row, _, _ in entries]
    fresh = not any_tree and all(seqlens[row] == 0 for row, _, _ in entries)

    def tensor(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    return Round(tensor(flat, torch.int64), tensor(offsets, torch.int32),
                 tensor(parents_flat, torch.int32) if any_tree else None, tensor(positions, torch.int64),
                 tensor(rows, torch.int64), tensor(slots, torch.int64), tensor(last, torch.int64),
                 max(counts, default=0) if fresh else 0)
