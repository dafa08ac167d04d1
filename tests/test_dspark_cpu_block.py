"""The DSpark drafter's block through the fused C++ layers (dspark.drafters.dspark_cpu) against the PyTorch
block (DSparkModel.block, its reference): dense fp32 / bf16 and Q8_0 weights, several requests with contexts
of different lengths in any row order, q/k norms, and the fallbacks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dspark.cache import KVCache
from dspark.drafters import dspark_cpu
from dspark.drafters.dspark import committed_context
from dspark.drafters.dspark_layers import DSparkConfig
from dspark.drafters.dspark_model import DSparkModel
from dspark.models.layers import rms_norm
from test_dspark_drafter import tiny  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not dspark_cpu.cpu_decoder.enabled(), reason="dspark._C is not built")


class Req:
    def __init__(self, row, length):
        self.row, self.id, self.tokens = row, row, list(range(3, 3 + length + 1))


def drafter_model(target, dtype, qk_norm=False, num_layers=2, seed=3) -> DSparkModel:
    torch.manual_seed(seed)
    config = DSparkConfig.for_target(target.config, [0, target.config.num_layers - 1], num_layers=num_layers,
                                     gamma=5, rank=16)
    model = DSparkModel(dataclasses.replace(config, qk_norm=qk_norm))
    with torch.no_grad():  # norms away from 1, so that a weight read in the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.attach(target).eval().to(dtype)


def filled_context(model, rows: int, lengths: dict[int, int], seed: int) -> KVCache:
    """A drafter K/V cache whose rows hold context K/V of random context features (as commits write them)."""
    c = model.config
    kv = KVCache(c.num_layers, rows, 64, c.num_kv_heads, c.head_dim, model.dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for row, m in lengths.items():
            ctx = rms_norm(torch.randn(m, c.hidden_size, generator=gen).to(model.dtype), model.ctx_norm,
                           c.rms_norm_eps)
            for i, (k, v) in enumerate(model.context_kv(ctx, torch.arange(m))):
                kv.write(i, torch.full((m,), row), torch.arange(m), k, v)
            kv.seqlens[row] = m
    return kv


# (atol, rtol, bound on the mean difference). bf16: the two paths round alike op by op but attend in different
# orders, and a one-ulp difference of a value near 4 is 0.03. Q8_0: x is quantised to int8 per 32-block before
# each projection, so a last-bit difference that moves a code across a rounding tie changes that row's output
# by a step; the mean difference stays far below what a wrong layer gives (~0.5).
TOLERANCES = {(torch.float32, None): (2e-5, 2e-5, 2e-6), (torch.float32, "q8_0"): (0.1, 0.05, 5e-3),
              (torch.bfloat16, None): (0.08, 0.05, 0.01), (torch.bfloat16, "q8_0"): (0.2, 0.1, 0.025)}


@pytest.mark.parametrize("dtype,weights", list(TOLERANCES))
@pytest.mark.parametrize("qk_norm", [False, True])
def test_the_fused_block_matches_the_pytorch_block(tiny, dtype, weights, qk_norm):  # noqa: F811
    tol = TOLERANCES[(dtype, weights)]
    model = drafter_model(tiny, dtype, qk_norm)
    if weights:
        model.quantize_weights(weights)
    lengths = {4: 9, 1: 23, 2: 1, 6: 40}  # rows 0, 3, 5, 7 idle
    kv = filled_context(model, 8, lengths, seed=11)
    requests = [Req(row, m) for row, m in lengths.items()]  # not in row order
    anchors = torch.tensor([5, 17, 42, 90])
    starts = torch.tensor([lengths[r.row] for r in requests])
    n = 6
    with torch.inference_mode():  # as the drafter proposes
        weights = dspark_cpu.block_weights(model, kv, int(starts.max()), n)
    assert weights is not None
    before = (kv.k.clone(), kv.v.clone(), kv.seqlens.clone())
    fused = dspark_cpu.block(model, kv, weights, [r.row for r in requests], anchors, starts, n)
    layers, valid, _ = committed_context(kv, requests, model.config.num_layers)
    with torch.no_grad():
        want = model.block(anchors, starts, layers, valid, n)
    assert fused.dtype == dtype and fused.shape == want.shape
    torch.testing.assert_close(fused.float(), want.float(), atol=tol[0], rtol=tol[1])
    assert (fused.float() - want.float()).abs().mean() < tol[2]
    assert torch.equal(kv.seqlens, before[2])  # nothing committed
    for row, m in lengths.items():  # the context K/V untouched: only slots past it were written
        assert torch.equal(kv.k[:, row, :m], before[0][:, row, :m]) and torch.equal(kv.v[:, row, :m], before[1][:, row, :m])
    for row in (0, 3, 5, 7):
        assert torch.equal(kv.k[:, row], before[0][:, row])


def test_a_block_sees_the_whole_block_and_the_context(tiny):  # noqa: F811
    """Changing a later block position's input (the mask embedding) changes an earlier position's output
    (bidirectional within the block), as in the PyTorch block; a causal kernel would leave h_1 alone."""
    model = drafter_model(tiny, torch.float32, num_layers=1)
    kv = filled_context(model, 2, {0: 12}, seed=2)
    starts, anchors = torch.tensor([12]), torch.tensor([7])
    with torch.inference_mode():
        weights = dspark_cpu.block_weights(model, kv, 12, 4)
    first = dspark_cpu.block(model, kv, weights, [0], anchors, starts, 4)
    with torch.no_grad():
        model.mask_embedding.mul_(-1.5)
    second = dspark_cpu.block(model, kv, weights, [0], anchors, starts, 4)
    assert not torch.allclose(first[0, 0], second[0, 0], atol=1e-4)


def test_fallbacks_to_the_pytorch_block(tiny, monkeypatch):  # noqa: F811
    model = drafter_model(tiny, torch.float32)
    kv = filled_context(model, 2, {0: 60}, seed=4)
    with torch.inference_mode():
        assert dspark_cpu.block_weights(model, kv, 60, 5) is None  # no room past the context for the block
        assert dspark_cpu.block_weights(model, kv, 59, 5) is not None
        monkeypatch.setenv("DSPARK_FUSED_CPU", "0")
        assert dspark_cpu.block_weights(model, kv, 10, 5) is None
    monkeypatch.delenv("DSPARK_FUSED_CPU")
    assert dspark_cpu.block_weights(model, kv, 10, 5) is None  # autograd on: training keeps PyTorch


def test_the_weights_follow_the_drafter(tiny):  # noqa: F811
    """Cached per model, and rebuilt when a weight changes in place or gets blocks."""
    model = drafter_model(tiny, torch.float32)
    kv = filled_context(model, 1, {0: 8}, seed=6)
    with torch.inference_mode():
        dense = dspark_cpu.block_weights(model, kv, 8, 5)
        assert dspark_cpu.block_weights(model, kv, 8, 5) is dense
    with torch.no_grad():
        model.layers[0].o_proj.weight.mul_(2)
    with torch.inference_mode():
        doubled = dspark_cpu.block_weights(model, kv, 8, 5)
        assert doubled is not dense and torch.equal(doubled[0][5], 2 * dense[0][5])
        model.quantize_weights("q8_0")
        quantized = dspark_cpu.block_weights(model, kv, 8, 5)
    assert quantized[1][1] != 0 and dense[1][1] == 0  # qkv now in blocks


def test_the_kernel_refuses_a_block_past_the_cache(tiny):  # noqa: F811
    """The binding checks that every request's context plus its token count fits its cache row."""
    model = drafter_model(tiny, torch.float32)
    kv = filled_context(model, 2, {0: 62}, seed=5)
    with torch.inference_mode():
        weights = dspark_cpu._layer_weights(model)
    with pytest.raises(ValueError, match="cache_seqlens"):
        dspark_cpu.block(model, kv, weights, [0], torch.tensor([3]), torch.tensor([62]), 5)


def test_projections_the_kernel_cannot_take_keep_the_pytorch_block(tiny):  # noqa: F811
    """A projection with a bias, or one projection of a fused group in blocks and another dense: no fused
    weights (the PyTorch block runs), never a silently dropped bias or a mixed stack."""
    kv_rows = {0: 8}
    biased = drafter_model(tiny, torch.float32)
    layer = biased.layers[0]
    layer.k_proj.bias = torch.nn.Parameter(torch.randn(layer.k_proj.out_features))
    mixed = drafter_model(tiny, torch.float32)
    mixed.layers[1].gate_proj.quantize("q8_0")  # its partner up_proj stays dense
    with torch.inference_mode():
        for model in (biased, mixed):
            assert dspark_cpu.block_weights(model, filled_context(model, 1, kv_rows, seed=7), 8, 5) is None
        biased.quantize_weights("q8_0")
        assert dspark_cpu.block_weights(biased, filled_context(biased, 1, kv_rows, seed=7), 8, 5) is None
