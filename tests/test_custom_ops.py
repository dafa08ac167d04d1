"""The ops as torch custom ops: schema and fake-tensor checks, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

import dspark  # noqa: F401  (registers torch.ops.dspark.*)
from conftest import device_of
from dspark import ops
from test_validation import attention_inputs, paged_attention_inputs, rollback_inputs

I32 = torch.int32


def sampling_args(uniforms: bool):
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(5, 10, generator=gen), torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 3, 5], dtype=I32),
        torch.tensor([-1, 0, 0, -1, 0], dtype=I32), torch.softmax(torch.randn(5, 10, generator=gen), -1),
        torch.tensor([1.0, 0.0]), torch.tensor([0, 3], dtype=I32), torch.tensor([0.9, 1.0]),
        torch.rand(5, 2, dtype=torch.float64, generator=gen) if uniforms else None,
        None if uniforms else torch.tensor([3, 4]), None if uniforms else torch.tensor([0, 0]), 3,
    )


def _on(device, args):
    """The op's arguments on the backend's device (the GPU backends' inputs live there)."""
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def test_importing_dspark_registers_the_ops():
    for name in ("tree_attention", "rejection_sample", "kv_rollback"):
        assert hasattr(torch.ops.dspark, name)


@pytest.mark.parametrize("paged", [False, True])
def test_opcheck_tree_attention(backend, paged):
    inputs = paged_attention_inputs() if paged else attention_inputs()
    args = [inputs[k] for k in ("q", "k_cache", "v_cache", "qo_indptr", "cache_seqlens", "parents")]
    torch.library.opcheck(torch.ops.dspark.tree_attention.default,
                          _on(device_of(backend), (*args, inputs.get("block_table"), None, backend)))


@pytest.mark.parametrize("uniforms", [False, True])
def test_opcheck_rejection_sample(backend, uniforms):
    torch.library.opcheck(torch.ops.dspark.rejection_sample.default,
                          _on(device_of(backend), (*sampling_args(uniforms), backend)))


def test_opcheck_kv_rollback(backend):
    inputs = rollback_inputs()
    torch.library.opcheck(torch.ops.dspark.kv_rollback.default, _on(device_of(backend), (*inputs.values(), None, backend)))


def test_compile_fullgraph_calls_all_three_ops():
    attention = attention_inputs()
    logits, tokens, qo_indptr, parents, probs, temperature, top_k, top_p, _, seed, offset, width = sampling_args(False)
    k_cache, v_cache, seqlens = attention["k_cache"], attention["v_cache"], attention["cache_seqlens"]

    def verify_round(q, k_cache, v_cache, seqlens):
        out = ops.tree_attention(q, k_cache, v_cache, qo_indptr, seqlens, parents)
        nodes, count, emitted = torch.ops.dspark.rejection_sample(
            logits + out.sum(), tokens, qo_indptr, parents, probs, temperature, top_k, top_p, None, seed, offset, width)
        ops.kv_rollback(k_cache, v_cache, seqlens, nodes, count)
        return out, emitted

    eager_state = (k_cache.clone(), v_cache.clone(), seqlens.clone())
    expected = verify_round(attention["q"], *eager_state)
    compiled = torch.compile(verify_round, fullgraph=True, backend="aot_eager")
    state = (k_cache.clone(), v_cache.clone(), seqlens.clone())
    got = compiled(attention["q"], *state)
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b)
    for a, b in zip(eager_state, state):
        assert torch.equal(a, b)  # the in-place rollback happened inside the compiled graph too
