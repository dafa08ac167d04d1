"""KV caches: contiguous ([layers, rows, S_max, H_kv, D]) or paged ([layers, blocks, block_size, H_kv, D]
with a block table), one row per request slot of the engine. Rollback goes through ops.kv_rollback."""

from __future__ import annotations

import torch

from dspark import huge_pages, ops


class KVCache:
    def __init__(self, num_layers: int, rows: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", block_size: int | None = None,
                 num_blocks: int | None = None):
        self.max_seq_len = max_seq_len
        self.block_size = block_size
        self.seqlens = torch.zeros(rows, dtype=torch.int32, device=device)
        if block_size is None:
            shape = (num_layers, rows, max_seq_len, num_kv_heads, head_dim)
            self.block_table = None
        else:
            blocks_per_row = -(-max_seq_len // block_size)
            num_blocks = rows * blocks_per_row if num_blocks is None else num_blocks
            shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
            self.block_table = torch.full((rows, blocks_per_row), -1, dtype=torch.int32, device=device)
            self._free_blocks = list(range(num_blocks - 1, -1, -1))
            self._row_blocks: list[list[int]] = [[] for _ in range(rows)]
        self.k = huge_pages.zeros(shape, dtype, device)
        self.v = huge_pages.zeros(shape, dtype, device)

    @property
    def rows(self) -> int:
        return self.seqlens.shape[0]

    def reserve(self, row: int, num_slots: int) -> None:
        """Make row own at least num_slots slots (allocates blocks for a paged cache)."""
        if num_slots > self.max_seq_len:
            raise ValueError(f"sequence of {num_slots} tokens exceeds the cache's max_seq_len {self.max_seq_len}")
        if self.block_size is None:
            return
        owned = self._row_blocks[row]
        needed = -(-num_slots // self.block_size) - len(owned)
        if needed > len(self._free_blocks):
            raise RuntimeError(f"KV cache out of blocks: row {row} needs {needed} more, {len(self._free_blocks)} free")
        for _ in range(needed):
            block = self._free_blocks.pop()
            self.block_table[row, len(owned)] = block
            owned.append(block)

    def free(self, row: int) -> None:
        self.seqlens[row] = 0
        if self.block_size is not None:
            self._free_blocks.extend(reversed(self._row_blocks[row]))
            self._row_blocks[row] = []
            self.block_table[row] = -1

    def write(self, layer: int, rows: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a round's K/V [T, H_kv, D] at (rows[t], slots[t])."""
        if self.block_table is None:
            self.k[layer, rows, slots] = k
            self.v[layer, rows, slots] = v
        else:
            blocks = self.block_table[rows, slots // self.block_size].long()
            offsets = slots % self.block_size
            self.k[layer, blocks, offsets] = k
            self.v[layer, blocks, offsets] = v

    def rollback(self, accepted_nodes: torch.Tensor, num_accepted: torch.Tensor) -> None:
        """Keep each row's accepted path (rows with num_accepted 0 are untouched); all layers at once."""
        ops.kv_rollback(self.k, self.v, self.seqlens, accepted_nodes, num_accepted, self.block_table)


class SideCache:
    """Per-token side data (e.g. target hidden states a drafter is conditioned on), [rows, S_max, 1, width],
    written at the round's slots like K/V and compacted by the same kv_rollback. Its lengths are its own,
    or a KV cache's (`seqlens=kv.seqlens`: the engine's captured hidden states, always as long as the K/V);
    shared lengths are the KV cache's to advance, so rollback then compacts the data alone and must run
    before the KV cache's."""

    def __init__(self, rows: int, max_seq_len: int, width: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 seqlens: torch.Tensor | None = None):
        self.data = huge_pages.zeros((rows, max_seq_len, 1, width), dtype, device)
        self.shares_lengths = seqlens is not None
        if seqlens is not None and (seqlens.shape != (rows,) or seqlens.dtype != torch.int32
                                    or seqlens.device != self.data.device):
            raise ValueError(f"seqlens must be int32 [{rows}] on {self.data.device}")
        self.seqlens = seqlens if seqlens is not None else torch.zeros(rows, dtype=torch.int32, device=device)

    def write(self, rows: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
        if values.dim() != 2 or values.shape[1] != self.data.shape[3]:
            raise ValueError(f"values must be [tokens, {self.data.shape[3]}] for this side cache, "
                             f"got {list(values.shape)}")
        self.data[rows, slots, 0] = values.to(self.data.dtype)

    def rollback(self, accepted_nodes: torch.Tensor, num_accepted: torch.Tensor) -> None:
        seqlens = self.seqlens.clone() if self.shares_lengths else self.seqlens
        ops.kv_rollback(self.data, None, seqlens, accepted_nodes, num_accepted)

    def append(self, row: int, values: torch.Tensor) -> None:
        """values [m, width] at a row's next m positions (a drafter driven without an engine, as in tests)."""
        if self.shares_lengths:
            raise ValueError("a side cache sharing a KV cache's lengths is written by the rounds, not appended to")
        start = int(self.seqlens[row])
        self.data[row, start: start + values.shape[0], 0] = values.to(self.data.dtype)
        self.seqlens[row] += values.shape[0]

    def committed(self, row: int, start: int, end: int) -> torch.Tensor:
        """[end - start, width]: the side data of committed positions start..end-1 of a row."""
        return self.data[row, start:end, 0]
