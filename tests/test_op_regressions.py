"""Regressions found by the op fuzzer (tests/opfuzz), one test per bug. The aliasing bug of kv_rollback
(v_cache is k_cache applied the moves twice on C++) is in test_validation.py ("v is k")."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import device_of
from dspark import ops

I32 = torch.int32


def _run_isolated(code: str) -> subprocess.CompletedProcess:
    """A crash (SIGFPE, SIGSEGV) fails the test instead of killing the test run."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_zero_query_heads_is_a_value_error_not_sigfpe():
    """0 % H_kv == 0 passed validation and the C++ kernel divided by group = 0."""
    done = _run_isolated("""
        import torch, dspark._C as C
        from dspark import ops
        I = lambda x: torch.tensor(x, dtype=torch.int32)
        args = (torch.zeros(1, 0, 4), torch.zeros(1, 4, 1, 4), torch.zeros(1, 4, 1, 4), I([0, 1]), I([3]))
        try:
            ops.tree_attention(*args, backend="cpu")
        except ValueError as error:
            print("refused:", error)
        out = torch.empty(1, 0, 4)
        C.tree_attention(*args, None, None, 0.5, out)  # the kernel's own guard, below validation
        print("kernel returned")
    """)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: q must have at least one head" in done.stdout and "kernel returned" in done.stdout


def _gapped(values: torch.Tensor, fill: int) -> torch.Tensor:
    """A non-contiguous view of `values` (every other element of a larger tensor), `fill` in the gaps."""
    wide = torch.full((values.shape[0] * 2, *values.shape[1:]), fill, dtype=values.dtype)
    wide[::2] = values
    return wide[::2]


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("fill", [0, 1])
def test_triton_tree_attention_reads_strided_index_tensors(paged, fill):
    """The Triton launcher passed qo_indptr, cache_seqlens, parents and block_table by pointer and
    ignored their strides: a strided view made it read the gaps (wrong output, hangs, segfaults)."""
    device = device_of("triton")
    gen = torch.Generator().manual_seed(7)
    counts, committed = [3, 1, 4], [5, 9, 2]
    parents = torch.tensor([-1, 0, 0, -1, -1, 0, 1, 1], dtype=I32)
    qo_indptr = torch.tensor([0, 3, 4, 8], dtype=I32)
    seqlens = torch.tensor(committed, dtype=I32)
    if paged:
        k = torch.randn(8, 4, 2, 16, generator=gen)
        table = torch.tensor([[0, 1, -1], [2, 3, 4], [5, 6, -1]], dtype=I32)
    else:
        k, table = torch.randn(3, 13, 2, 16, generator=gen), None
    v = torch.randn(k.shape, generator=gen)
    q = torch.randn(sum(counts), 4, 16, generator=gen)
    expected = ops.tree_attention(q, k, v, qo_indptr, seqlens, parents, table, backend="reference")
    strided = [_gapped(t, fill) for t in (qo_indptr, seqlens, parents)]
    strided.append(None if table is None else _gapped(table.t(), fill).t())
    assert not any(t.is_contiguous() for t in strided if t is not None)
    on = [None if t is None else t.to(device) for t in (q, k, v, *strided)]
    out = ops.tree_attention(*on[:3], *on[3:6], on[6], backend="triton")
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=2e-5)
