"""Input checks shared by the ops. Every failure is a ValueError naming the argument.

Shape, dtype and device checks always run. Checks of tensor *values* (index ranges, NaN logits, ...)
read the data on the host: they always run for CPU tensors and, on accelerators, only with
DSPARK_DEBUG=1, so that a GPU round never synchronises with the host (DESIGN.md, conventions).
"""

from __future__ import annotations

import os

import torch
from torch._subclasses.fake_tensor import FakeTensor

from dspark import tree

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fail(message: str) -> None:
    raise ValueError(message)


def values_checked(t: torch.Tensor) -> bool:
    if t.device.type == "meta" or isinstance(t, FakeTensor):  # shapes only, under tracing
        return False
    return t.device.type == "cpu" or os.environ.get("DSPARK_DEBUG") == "1"


def check_tensor(
    name: str,
    t,
    *,
    dtypes: tuple[torch.dtype, ...],
    ndim: int | None = None,
    min_ndim: int | None = None,
    shape: tuple[int | None, ...] | None = None,
    device: torch.device | None = None,
) -> None:
    if not isinstance(t, torch.Tensor):
        fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        fail(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        fail(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        fail(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        for axis, want in enumerate(shape):
            if want is not None and t.shape[axis] != want:
                fail(f"{name} must have shape {_shape_text(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        fail(f"{name} must be on {device} like the other inputs, got {t.device}")


def check_tensors(**tensors) -> None:
    """The wrappers' first check: every named argument is a tensor (or None where it says so), so that a
    list or a number gets our ValueError instead of the dispatcher's schema error."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _byte_extent(t: torch.Tensor) -> tuple[int, int]:
    span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    low = t.data_ptr() + t.element_size() * sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())
                                                if stride < 0)
    return low, low + (span + 1) * t.element_size()


def _share_an_element(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b may address a common byte. Exact for two views of one layout (same dtype,
    shape and strides: k and v halves of one buffer), otherwise by byte extents, which may refuse
    interleaved views that do not in fact meet."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a_low, a_high), (b_low, b_high) = _byte_extent(a), _byte_extent(b)
    if a_high <= b_low or b_high <= a_low:
        return False
    if a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride():
        return True
    gap = abs(a.data_ptr() - b.data_ptr())
    if gap % a.element_size():
        return True
    gap //= a.element_size()
    dims = sorted((stride, size) for stride, size in zip(a.stride(), a.shape) if size > 1 and stride > 0)
    reach = 0
    for stride, size in dims:  # nested strides: each exceeds everything the smaller ones can reach
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    for stride, size in reversed(dims):  # then the greedy decomposition is the only one
        gap -= min(gap // stride, size - 1) * stride
    return gap == 0


def check_no_aliasing(mutated: dict, others: dict) -> None:
    """An op that writes in place refuses inputs that share memory with what it writes: its kernels
    would read half-written data, and no two backends would agree on the result."""
    named = {**mutated, **others}
    present = {name: t for name, t in named.items() if isinstance(t, torch.Tensor)}
    if any(t.device.type == "meta" or isinstance(t, FakeTensor) for t in present.values()):
        return
    for name, t in mutated.items():
        if t is not None and t.numel() > 1 and torch._debug_has_internal_overlap(t) == 1:
            fail(f"{name} has elements that share memory (a broadcast or expanded view); the op writes it in place")
    names = list(present)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            if (first in mutated or second in mutated) and _share_an_element(present[first], present[second]):
                fail(f"{second} shares memory with {first}, which the op writes in place; pass separate tensors"
                     + (" (v_cache=None compacts a single cache)" if {first, second} == {"k_cache", "v_cache"}
                        else ""))


def _shape_text(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        fail(f"{name} must be contiguous (the op works in place or reads it by pointer); call .contiguous() first")


def check_qo_indptr(qo_indptr: torch.Tensor, num_tokens: int, device: torch.device, *, min_tokens: int = 0) -> None:
    check_tensor("qo_indptr", qo_indptr, dtypes=(torch.int32,), ndim=1, device=device)
    if qo_indptr.numel() < 2:
        fail(f"qo_indptr must hold R + 1 >= 2 offsets, got {qo_indptr.numel()}")
    if not values_checked(qo_indptr):
        return
    offsets = qo_indptr.tolist()
    if offsets[0] != 0:
        fail(f"qo_indptr[0] must be 0, got {offsets[0]}")
    if offsets[-1] != num_tokens:
        fail(f"qo_indptr[-1] must equal the number of tokens T = {num_tokens}, got {offsets[-1]}")
    counts = [b - a for a, b in zip(offsets, offsets[1:])]
    if min(counts) < min_tokens:
        r = min(range(len(counts)), key=counts.__getitem__)
        fail(f"qo_indptr must be non-decreasing with at least {min_tokens} token(s) per request; request {r} has {counts[r]}")


def check_parents(parents: torch.Tensor | None, qo_indptr: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    if parents is None:
        return
    check_tensor("parents", parents, dtypes=(torch.int32,), ndim=1, shape=(num_tokens,), device=device)
    if not values_checked(parents):
        return
    values = parents.tolist()
    offsets = qo_indptr.tolist()
    for r, (start, end) in enumerate(zip(offsets, offsets[1:])):
        for local, parent in enumerate(values[start:end]):
            if local == 0 and parent != -1:
                fail(f"parents[{start}] (node 0 of request {r}) must be -1, got {parent}")
            if local > 0 and not 0 <= parent < local:
                fail(
                    f"parents[{start + local}] (node {local} of request {r}) must be a node of the same request "
                    f"with a smaller index, in [0, {local}), got {parent}"
                )


def request_depths(parents: torch.Tensor | None, qo_indptr: torch.Tensor) -> list[int]:
    """Largest depth of each request's tree (host read: CPU or debug only)."""
    offsets = qo_indptr.tolist()
    if parents is None:
        return [max(b - a - 1, 0) for a, b in zip(offsets, offsets[1:])]
    values = parents.tolist()
    return [max(tree.depths(values[a:b]), default=0) for a, b in zip(offsets, offsets[1:])]


def check_cache_capacity(
    name: str,
    cache: torch.Tensor,
    needed: list[int],
    block_table: torch.Tensor | None,
) -> None:
    """needed[r]: slots request r must own. Checks capacity and the block ids that hold them."""
    slots_per_row = cache.shape[-3]
    if block_table is None:
        for r, n in enumerate(needed):
            if n > slots_per_row:
                fail(f"{name} is too short: request {r} needs {n} slots, the cache holds {slots_per_row} per request")
        return
    capacity = block_table.shape[1] * slots_per_row
    num_blocks = cache.shape[-4]
    table = block_table.tolist()
    for r, n in enumerate(needed):
        if n > capacity:
            fail(f"block_table is too short: request {r} needs {n} slots, its row maps {capacity}")
        used = table[r][: (n + slots_per_row - 1) // slots_per_row]
        bad = [b for b in used if not 0 <= b < num_blocks]
        if bad:
            fail(f"block_table[{r}] holds block id {bad[0]} outside [0, {num_blocks}) for a slot the op touches")


def check_block_table(block_table: torch.Tensor | None, num_requests: int, device: torch.device) -> None:
    if block_table is not None:
        check_tensor("block_table", block_table, dtypes=(torch.int32,), ndim=2, shape=(num_requests, None), device=device)


def check_finite_logits(name: str, logits: torch.Tensor) -> None:
    """One reduction pass: a row's max is NaN if it holds a NaN, +inf if it holds +inf, and -inf
    if every entry is masked. The slower diagnosis runs only on failure."""
    if not values_checked(logits) or logits.numel() == 0:
        return
    row_max = logits.amax(dim=-1)
    if bool(torch.isfinite(row_max).all()):
        return
    if torch.isnan(logits).any():
        fail(f"{name} contains NaN")
    if torch.isposinf(logits).any():
        fail(f"{name} contains +inf")
    row = int(torch.nonzero(~torch.isfinite(row_max))[0])
    fail(f"{name} row {row} has no finite value (every token is masked)")
