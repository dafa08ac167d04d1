"""Reading the engine's captured side cache: the target's hidden states that drafters conditioned on the
target (DSpark, EAGLE) turn into their own context, each committed position once, when they next draft."""

from __future__ import annotations

import torch

from dspark.cache import SideCache


def check_captured(captured: SideCache | None, rows: int, max_seq_len: int, width: int) -> None:
    """A drafter's bind(): the side cache, when given, covers its rows and positions at the width it reads."""
    if captured is None:
        return
    if not isinstance(captured, SideCache):
        raise TypeError(f"captured must be a dspark.cache.SideCache, got {type(captured).__name__}")
    have_rows, have_len, _, have_width = captured.data.shape
    if have_rows < rows or have_len < max_seq_len or have_width != width:
        raise ValueError(f"captured holds [{have_rows}, {have_len}, 1, {have_width}]; the drafter needs "
                         f"{rows} rows of {max_seq_len} positions, {width} wide (its target layers' hidden states)")


def pending_features(captured: SideCache, committed: torch.Tensor, requests) -> tuple[list, list[torch.Tensor]]:
    """The requests whose captured positions run past what the drafter committed (`committed`: its
    per-row lengths), and those positions' features [m, width] (views)."""
    ends, starts = captured.seqlens.tolist(), committed.tolist()
    pending, hidden = [], []
    for r in requests:
        start, end = starts[r.row], ends[r.row]
        if end > start:
            pending.append(r)
            hidden.append(captured.committed(r.row, start, end))
    return pending, hidden
