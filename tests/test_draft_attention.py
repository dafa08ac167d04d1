"""The drafter's attention (dspark.drafters.dspark_layers.attend): both of its paths (a context per row,
through scaled_dot_product_attention; a context shared by every row, through grouped matmuls) against a
per-row, per-head softmax written out in fp64."""

from __future__ import annotations

import math

import pytest
import torch

from dspark.drafters.dspark_layers import _attend_fused, _attend_grouped, attend


def reference(q, k_ctx, v_ctx, ctx_valid, k_blk, v_blk, causal):
    B, n, H, D = q.shape
    N, Hkv = k_ctx.shape[1], k_blk.shape[2]
    out = torch.empty(B, n, H, D, dtype=torch.float64)
    for b in range(B):
        c = b if k_ctx.shape[0] == B else 0
        keys = torch.cat([k_ctx[c], k_blk[b]]).double()
        values = torch.cat([v_ctx[c], v_blk[b]]).double()
        for i in range(n):
            seen = torch.ones(N + n, dtype=torch.bool)
            if ctx_valid is not None:
                seen[:N] = ctx_valid[b if ctx_valid.shape[0] == B else 0]
            if causal:
                seen[N + i + 1:] = False
            for h in range(H):
                g = h // (H // Hkv)
                scores = keys[seen, g] @ q[b, i, h].double() / math.sqrt(D)
                out[b, i, h] = torch.softmax(scores, 0) @ values[seen, g]
    return out.reshape(B, n, H * D)


def inputs(B, Bc, N, n, H, Hkv, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, n, H, D, generator=gen)
    k_ctx, v_ctx = torch.randn(2, Bc, N, Hkv, D, generator=gen)
    k_blk, v_blk = torch.randn(2, B, n, Hkv, D, generator=gen)
    valid = torch.rand(B, N, generator=gen) < 0.8
    valid[:, 0] = True  # a drafter's context always holds the prompt's first token
    return [t.to(dtype) for t in (q, k_ctx, v_ctx)] + [valid] + [t.to(dtype) for t in (k_blk, v_blk)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("B,Bc,N,n,H,Hkv", [(1, 1, 37, 7, 9, 3), (3, 3, 130, 4, 4, 4), (4, 1, 50, 5, 6, 2),
                                            (2, 2, 1, 1, 2, 1)])
def test_both_paths_match_the_reference(dtype, tol, causal, B, Bc, N, n, H, Hkv):
    args = inputs(B, Bc, N, n, H, Hkv, 64, dtype, seed=B * 100 + N)
    want = reference(*args, causal)
    got = attend(*args, causal)
    assert got.dtype == dtype and got.shape == (B, n, H * 64)
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    if Bc == B:  # the grouped path takes a per-row context too: the fused path must agree with it
        torch.testing.assert_close(_attend_grouped(*args, causal).double(), want, atol=tol, rtol=tol)


def test_every_context_position_valid_when_no_mask_is_given():
    q, k_ctx, v_ctx, _, k_blk, v_blk = inputs(2, 2, 20, 3, 4, 2, 64, torch.float32, seed=4)
    torch.testing.assert_close(_attend_fused(q, k_ctx, v_ctx, None, k_blk, v_blk, False).double(),
                               reference(q, k_ctx, v_ctx, None, k_blk, v_blk, False), atol=1e-5, rtol=1e-5)


def test_the_fused_path_carries_gradients_as_the_grouped_one():
    args = inputs(2, 2, 16, 3, 4, 2, 64, torch.float32, seed=5)
    grads = []
    for path in (_attend_fused, _attend_grouped):
        leaves = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
        path(*leaves, True).square().sum().backward()
        grads.append([a.grad for a in leaves if a.is_floating_point()])
    for fused, grouped in zip(*grads):
        torch.testing.assert_close(fused, grouped, atol=1e-4, rtol=1e-4)
