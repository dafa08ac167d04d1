"""Bad inputs raise a ValueError naming the argument, and leave every tensor as it was."""

from __future__ import annotations

import pytest
import torch

from dspark import ops

I32 = torch.int32


def attention_inputs():
    gen = torch.Generator().manual_seed(0)
    return dict(
        q=torch.randn(5, 4, 8, generator=gen),
        k_cache=torch.randn(2, 12, 2, 8, generator=gen),
        v_cache=torch.randn(2, 12, 2, 8, generator=gen),
        qo_indptr=torch.tensor([0, 3, 5], dtype=I32),
        cache_seqlens=torch.tensor([4, 9], dtype=I32),
        parents=torch.tensor([-1, 0, 0, -1, 0], dtype=I32),
    )


def paged_attention_inputs():
    inputs = attention_inputs()
    gen = torch.Generator().manual_seed(1)
    inputs["k_cache"] = torch.randn(6, 4, 2, 8, generator=gen)
    inputs["v_cache"] = torch.randn(6, 4, 2, 8, generator=gen)
    inputs["block_table"] = torch.tensor([[3, 1, -1], [0, 2, 5]], dtype=I32)
    return inputs


def sampling_inputs():
    gen = torch.Generator().manual_seed(0)
    return dict(
        target_logits=torch.randn(5, 10, generator=gen),
        draft_tokens=torch.tensor([1, 2, 3, 4, 5]),
        qo_indptr=torch.tensor([0, 3, 5], dtype=I32),
        parents=torch.tensor([-1, 0, 0, -1, 0], dtype=I32),
        draft_probs=torch.softmax(torch.randn(5, 10, generator=gen), -1),
        seed=7,
    )


def rollback_inputs():
    gen = torch.Generator().manual_seed(0)
    return dict(
        k_cache=torch.randn(2, 12, 2, 8, generator=gen),
        v_cache=torch.randn(2, 12, 2, 8, generator=gen),
        cache_seqlens=torch.tensor([4, 9], dtype=I32),
        accepted_nodes=torch.tensor([[0, 2, -1], [0, 1, 2]], dtype=I32),
        num_accepted=torch.tensor([2, 3], dtype=I32),
    )


def _set(key, value):
    return lambda inputs: inputs.__setitem__(key, value(inputs) if callable(value) else value)


ATTENTION_CASES = {
    "q dtype": (_set("q", lambda x: x["q"].double()), "q"),
    "q rank": (_set("q", lambda x: x["q"][0]), "q"),
    "cache dtype": (_set("k_cache", lambda x: x["k_cache"].half()), "k_cache"),
    "v shape": (_set("v_cache", lambda x: x["v_cache"][:, :6]), "v_cache"),
    "head dim": (_set("q", lambda x: x["q"][..., :4]), "head_dim"),
    "gqa": (_set("q", lambda x: x["q"][:, :3]), "heads"),
    "indptr dtype": (_set("qo_indptr", lambda x: x["qo_indptr"].long()), "qo_indptr"),
    "indptr not monotone": (_set("qo_indptr", torch.tensor([0, 6, 5], dtype=I32)), "qo_indptr"),
    "indptr total": (_set("qo_indptr", torch.tensor([0, 3, 4], dtype=I32)), "qo_indptr"),
    "indptr start": (_set("qo_indptr", torch.tensor([1, 3, 5], dtype=I32)), "qo_indptr"),
    "seqlens negative": (_set("cache_seqlens", torch.tensor([-1, 2], dtype=I32)), "cache_seqlens"),
    "seqlens shape": (_set("cache_seqlens", torch.tensor([1, 2, 3], dtype=I32)), "cache_seqlens"),
    "cache too short": (_set("cache_seqlens", torch.tensor([4, 11], dtype=I32)), "k_cache"),
    "parent not earlier": (_set("parents", torch.tensor([-1, 0, 2, -1, 0], dtype=I32)), "parents"),
    "parent in other request": (_set("parents", torch.tensor([-1, 0, 0, -1, -1], dtype=I32)), "parents"),
    "root parent": (_set("parents", torch.tensor([0, 0, 0, -1, 0], dtype=I32)), "parents"),
    "backend": (_set("backend", "tpu"), "backend"),
    "zero query heads": (_set("q", lambda x: x["q"][:, :0]), "at least one head"),
    "zero head_dim": (lambda x: x.update(q=x["q"][..., :0], k_cache=x["k_cache"][..., :0],
                                         v_cache=x["v_cache"][..., :0]), "head_dim >= 1"),
    "q as a list": (_set("q", lambda x: x["q"].tolist()), "q must be a torch.Tensor"),
    "sm_scale a string": (_set("sm_scale", "0.5"), "sm_scale"),
}

PAGED_CASES = {
    "block id out of range": (_set("block_table", torch.tensor([[3, 6, -1], [0, 2, 5]], dtype=I32)), "block_table"),
    "block table too short": (_set("cache_seqlens", torch.tensor([4, 11], dtype=I32)), "block_table"),
    "block table dtype": (_set("block_table", lambda x: x["block_table"].long()), "block_table"),
}

SAMPLING_CASES = {
    "logits nan": (lambda x: x["target_logits"].__setitem__((1, 3), float("nan")), "target_logits"),
    "logits +inf": (lambda x: x["target_logits"].__setitem__((1, 3), float("inf")), "target_logits"),
    "logits row masked": (lambda x: x["target_logits"][2].fill_(float("-inf")), "target_logits"),
    "logits dtype": (_set("target_logits", lambda x: x["target_logits"].double()), "target_logits"),
    "token -1": (_set("draft_tokens", torch.tensor([1, -1, 3, 4, 5])), "draft_tokens"),
    "token V": (_set("draft_tokens", torch.tensor([1, 2, 3, 4, 10])), "draft_tokens"),
    "tokens float": (_set("draft_tokens", torch.tensor([1.0, 2, 3, 4, 5])), "draft_tokens"),
    "parents outside": (_set("parents", torch.tensor([-1, 0, 3, -1, 0], dtype=I32)), "parents"),
    "draft probs shape": (_set("draft_probs", lambda x: x["draft_probs"][:, :9]), "draft_probs"),
    "draft probs negative": (lambda x: x["draft_probs"].__setitem__((0, 0), -0.1), "draft_probs"),
    "temperature negative": (_set("temperature", -0.5), "temperature"),
    "temperature shape": (_set("temperature", torch.tensor([1.0, 1.0, 1.0])), "temperature"),
    "top_k negative": (_set("top_k", torch.tensor([0, -2])), "top_k"),
    "top_k float": (_set("top_k", 2.5), "top_k"),
    "top_p zero": (_set("top_p", 0.0), "top_p"),
    "top_p above one": (_set("top_p", 1.5), "top_p"),
    "no randomness": (_set("seed", None), "randomness"),
    "two randomness sources": (_set("uniforms", torch.rand(5, 2, dtype=torch.float64)), "randomness"),
    "uniforms range": (lambda x: x.update(seed=None, uniforms=torch.full((5, 2), 1.0, dtype=torch.float64)),
                       "uniforms"),
    "max_nodes too small": (_set("max_nodes", 1), "max_nodes"),
    "offset without seed": (lambda x: x.update(seed=None, offset=3, uniforms=torch.rand(5, 2, dtype=torch.float64)),
                            "offset needs a seed"),
    "logits as a list": (_set("target_logits", lambda x: x["target_logits"].tolist()), "target_logits must be"),
}

ROLLBACK_CASES = {
    "count above width": (_set("num_accepted", torch.tensor([2, 4], dtype=I32)), "num_accepted"),
    "count negative": (_set("num_accepted", torch.tensor([-1, 1], dtype=I32)), "num_accepted"),
    "path not increasing": (_set("accepted_nodes", torch.tensor([[0, 0, -1], [0, 1, 2]], dtype=I32)), "accepted_nodes"),
    "path negative": (_set("accepted_nodes", torch.tensor([[-1, 2, -1], [0, 1, 2]], dtype=I32)), "accepted_nodes"),
    "path past cache": (_set("accepted_nodes", torch.tensor([[0, 8, -1], [0, 1, 2]], dtype=I32)), "k_cache"),
    "v shape": (_set("v_cache", lambda x: x["v_cache"][:1]), "v_cache"),
    "rank": (_set("k_cache", lambda x: x["k_cache"][0]), "k_cache"),
    "seqlens dtype": (_set("cache_seqlens", lambda x: x["cache_seqlens"].long()), "cache_seqlens"),
    "seqlens negative": (_set("cache_seqlens", torch.tensor([-3, 9], dtype=I32)), "cache_seqlens"),
    "rows": (_set("cache_seqlens", torch.tensor([4, 9, 1], dtype=I32)), "accepted_nodes"),
    "v is k": (_set("v_cache", lambda x: x["k_cache"]), "v_cache shares memory with k_cache"),
    "v overlaps k": (lambda x: _overlapping(x, shift=16), "v_cache shares memory"),
    "lengths are the counts": (_set("num_accepted", lambda x: x["cache_seqlens"]), "shares memory"),
    "broadcast cache": (_set("k_cache", lambda x: x["k_cache"][:, :1].expand(x["k_cache"].shape)), "k_cache has"),
    "lengths as a list": (_set("cache_seqlens", [4, 9]), "cache_seqlens must be a torch.Tensor"),
}


def _overlapping(inputs, shift):
    """k and v as two windows of one buffer, `shift` elements apart."""
    shape, numel = inputs["k_cache"].shape, inputs["k_cache"].numel()
    buffer = torch.randn(numel + shift)
    inputs.update(k_cache=buffer[:numel].view(shape), v_cache=buffer[shift:].view(shape))


def test_kv_rollback_takes_k_and_v_from_one_buffer(backend):
    """Disjoint halves of one allocation (one [2, ...] KV tensor) share no element: allowed."""
    inputs = rollback_inputs()
    expected = {k: v.clone() for k, v in inputs.items()}
    ops.kv_rollback(**expected, backend="reference")
    both = torch.stack([inputs["k_cache"], inputs["v_cache"]])
    inputs.update(k_cache=both[0], v_cache=both[1])
    ops.kv_rollback(**inputs, backend=backend)
    assert torch.equal(both[0], expected["k_cache"]) and torch.equal(both[1], expected["v_cache"])


def _snapshot(inputs):
    return {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}


def _expect_error(op, inputs, corrupt, needle, backend):
    corrupt(inputs)
    before = _snapshot(inputs)
    with pytest.raises(ValueError, match=needle):
        op(**{"backend": backend, **inputs})
    for name, tensor in before.items():
        torch.testing.assert_close(inputs[name], tensor, rtol=0, atol=0, equal_nan=True, msg=f"{name} changed")


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_tree_attention_rejects(backend, case):
    corrupt, needle = ATTENTION_CASES[case]
    _expect_error(ops.tree_attention, attention_inputs(), corrupt, needle, backend)


@pytest.mark.parametrize("case", list(PAGED_CASES))
def test_paged_tree_attention_rejects(backend, case):
    corrupt, needle = PAGED_CASES[case]
    _expect_error(ops.tree_attention, paged_attention_inputs(), corrupt, needle, backend)


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_rejection_sample_rejects(backend, case):
    corrupt, needle = SAMPLING_CASES[case]
    _expect_error(ops.rejection_sample, sampling_inputs(), corrupt, needle, backend)


@pytest.mark.parametrize("case", list(ROLLBACK_CASES))
def test_kv_rollback_rejects(backend, case):
    corrupt, needle = ROLLBACK_CASES[case]
    _expect_error(ops.kv_rollback, rollback_inputs(), corrupt, needle, backend)


def test_valid_inputs_pass(backend):
    # The bases of the cases above are valid, so each failure above comes from its corruption alone.
    assert ops.tree_attention(**attention_inputs(), backend=backend).shape == (5, 4, 8)
    assert ops.tree_attention(**paged_attention_inputs(), backend=backend).shape == (5, 4, 8)
    nodes, count, _ = ops.rejection_sample(**sampling_inputs(), backend=backend)
    assert nodes.shape == (2, 3) and bool((count >= 1).all())
    inputs = rollback_inputs()
    ops.kv_rollback(**inputs, backend=backend)
    assert inputs["cache_seqlens"].tolist() == [6, 12]


def test_mismatched_devices_are_named():
    inputs = attention_inputs()
    inputs["cache_seqlens"] = inputs["cache_seqlens"].to("meta")
    with pytest.raises(ValueError, match="cache_seqlens must be on cpu"):
        ops.tree_attention(**inputs)


def _custom_op_sampling_args(**change):
    x = sampling_inputs()
    args = dict(target_logits=x["target_logits"], draft_tokens=x["draft_tokens"], qo_indptr=x["qo_indptr"],
                parents=x["parents"], draft_probs=x["draft_probs"], temperature=torch.ones(2),
                top_k=torch.zeros(2, dtype=I32), top_p=torch.ones(2), uniforms=None,
                seed=torch.tensor([7, 8]), offset=torch.zeros(2, dtype=torch.int64), max_nodes=3)
    args.update(change)
    return list(args.values())


@pytest.mark.parametrize("change, needle", [
    (dict(uniforms=torch.rand(5, 2, dtype=torch.float64)), "one source of randomness"),  # was: uniforms won
    (dict(offset=None), "seed and offset go together"),
])
def test_custom_op_refuses_ambiguous_randomness(backend, change, needle):
    with pytest.raises(ValueError, match=needle):
        torch.ops.dspark.rejection_sample(*_custom_op_sampling_args(**change), backend)


def test_meta_tensors_check_the_backend_name_and_need_max_nodes():
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in attention_inputs().items()}
    assert ops.tree_attention(**meta).shape == (5, 4, 8)
    with pytest.raises(ValueError, match="backend"):
        ops.tree_attention(**meta, backend="tpu")
    x = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in sampling_inputs().items()}
    with pytest.raises(ValueError, match="max_nodes must be given"):
        ops.rejection_sample(**x)
    nodes, count, tokens = ops.rejection_sample(**x, max_nodes=4)
    assert nodes.shape == tokens.shape == (2, 4) and count.shape == (2,)
