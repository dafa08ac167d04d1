"""Flattening requests into one round (DESIGN.md conventions): tokens, qo_indptr over every cache row,
parents, RoPE positions and the cache slots the round's K/V are written to, the proposals' draft_probs rows;
the per-row sampling state that persists across rounds; rejection_sample's outputs brought to the host."""

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
    # Prompt tokens only (a fresh round, or a prompt's later chunks over its cached prefix): no decoding
    # or verification result depends on how they are batched, so the model may take batch-dependent
    # fast paths.
    prefill: bool = False


def build_round(num_rows: int, entries: list[tuple[int, list[int], list[int] | None]], seqlens: list[int],
                device: torch.device | str = "cpu", prefill: bool = False) -> Round:
    """entries: (cache row, tokens, local parents or None for a chain), rows in any order;
    seqlens: committed length of every cache row; prefill: every token is a prompt token (implied for a
    fresh round: chains written into empty rows can only be prompts)."""
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

    # The int64 fields travel as one tensor (one host-to-device copy; a batch-1 round's small tensors are
    # much of the Python around its kernels), then split into contiguous views.
    t = len(flat)
    packed = torch.tensor(flat + positions + rows + slots + last, dtype=torch.int64, device=device)
    tokens, positions_t, rows_t, slots_t, last_t = packed.split([t, t, t, t, len(last)])
    int32 = dict(dtype=torch.int32, device=device)
    return Round(tokens, torch.tensor(offsets, **int32), torch.tensor(parents_flat, **int32) if any_tree else None,
                 positions_t, rows_t, slots_t, last_t, max(counts, default=0) if fresh else 0, prefill or fresh)


class RowState:
    """Each cache row's sampling parameters on the model's device, in the one request order every op of
    a round shares (the cache's rows): written when a request joins or leaves, its Philox offset
    advanced on the device after each round. Idle rows are greedy with no drafts (n_r = 0), so
    rejection_sample accepts nothing for them."""

    def __init__(self, rows: int, device: torch.device | str):
        self.temperature = torch.zeros(rows, dtype=torch.float32, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.int32, device=device)
        self.top_p = torch.ones(rows, dtype=torch.float32, device=device)
        self.seed = torch.zeros(rows, dtype=torch.int64, device=device)
        self.offset = torch.zeros(rows, dtype=torch.int64, device=device)
        self.sampled: set[int] = set()  # rows of requests with temperature > 0: the ones that read offsets

    def join(self, row: int, params, offset: int) -> None:
        if params.temperature > 0:
            self.sampled.add(row)
        self.temperature[row] = params.temperature
        self.top_k[row] = params.top_k
        self.top_p[row] = params.top_p
        self.seed[row] = params.seed
        self.offset[row] = offset

    def leave(self, row: int) -> None:
        self.sampled.discard(row)
        self.temperature[row], self.top_k[row], self.top_p[row] = 0.0, 0, 1.0
        self.seed[row] = self.offset[row] = 0

    def advance(self, qo_indptr: torch.Tensor) -> None:
        """One more round for every row that had tokens in it. Greedy rows never read their offset, so
        a round of greedy rows only skips the update (a row's offset is set again when it joins)."""
        if self.sampled:
            self.offset += (qo_indptr[1:] > qo_indptr[:-1]).to(torch.int64)


def draft_probs_rows(requests, proposals, nodes: list[list[int]], vocab_size: int,
                     device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(draft_probs over the round's nodes, their draft vocabulary or None): rows written only for proposals
    that carry them (greedy requests' rows stay unwritten: rejection_sample never reads them); as narrow as the
    drafters' shared draft vocabulary, widened to vocab_size when proposals differ. nodes: per request, its
    anchor and drafted tokens."""
    carrying = [p for p in proposals if p.draft_probs is not None]
    if not carrying:
        return None, None
    subsets = {id(p.draft_vocab): p.draft_vocab for p in carrying}
    draft_vocab = next(iter(subsets.values())) if len(subsets) == 1 else None
    width = vocab_size if draft_vocab is None else draft_vocab.numel()
    out = torch.empty(sum(len(n) for n in nodes), width, device=device)
    at = 0
    for r, p, n in zip(requests, proposals, nodes):
        if p.draft_probs is not None:
            rows = p.draft_probs.float()
            if draft_vocab is None and p.draft_vocab is not None:
                rows = rows.new_zeros(len(n), width).index_copy_(1, p.draft_vocab, rows)
            out[at: at + len(n)] = rows
        elif r.params.temperature > 0:
            raise ValueError("a batch mixes stochastic and deterministic proposals for sampled requests")
        at += len(n)
    return out, draft_vocab


def outputs_to_host(path_nodes: torch.Tensor, counts: torch.Tensor, emitted: torch.Tensor):
    """rejection_sample's three outputs on the host in one device-to-host copy (one sync per round)."""
    width = path_nodes.shape[1]
    packed = torch.cat([path_nodes.long(), counts.long()[:, None], emitted], dim=1).cpu()
    return packed[:, :width].int(), packed[:, width].int(), packed[:, width + 1:]
