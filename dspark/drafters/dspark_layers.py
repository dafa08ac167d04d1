"""Building blocks of the target-conditioned drafters (DSpark, its DFlash-style ablation, the
EAGLE-style baseline): configuration, a small pure-torch attention over [context; block], and one
pre-norm decoder layer, with the target's own RMSNorm and RoPE (dspark.models.layers).

Attention here is plain torch on purpose: the drafter's block is a handful of queries that attend to
a per-request context (bidirectionally within the block for DSpark, causally for EAGLE), a pattern
the engine's tree_attention (ancestors only) cannot express. Context keys may be shared by every
block (training: many anchors of one sequence, batch dimension 1) or per block (inference: one row
per request, padded, with a validity mask).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dspark.models.layers import rms_norm, rope, rope_frequencies
from dspark.models.linear import linear
from dspark.models.quantized import QuantizedWeight

KINDS = ("dspark", "eagle")
HEADS = ("markov", "gated", "rnn", "none")


class Linear(nn.Linear):
    """nn.Linear whose inference calls (no autograd) take the CPU small-batch kernel of the model code, or
    GGUF blocks of its weight once `quantize` wrote them: inference only; a call that trains the weight, and
    saving, take the dense weight, which stays."""

    blocks: QuantizedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.inference_weight()
        if weight is not self.weight:
            return linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))
        return linear(x, self.weight, self.bias)

    def inference_weight(self) -> torch.Tensor | QuantizedWeight:
        """The blocks, unless this call trains the weight."""
        if self.blocks is None or (torch.is_grad_enabled() and self.weight.requires_grad):
            return self.weight
        return self.blocks

    def quantize(self, fmt: str = "q8_0") -> None:
        self.blocks = QuantizedWeight.from_dense(self.weight, fmt).pack()


@dataclasses.dataclass
class DSparkConfig:
    vocab_size: int
    hidden_size: int            # = the target's (the embedding and LM head are the target's)
    target_hidden_size: int
    target_layers: list[int]    # 0-based target layers whose residual stream feeds the context
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    kind: str = "dspark"        # "dspark": parallel block + sequential head; "eagle": step by step
    num_layers: int = 1         # draft transformer layers (1-5)
    gamma: int = 7              # block size: anchor + gamma - 1 masks, gamma draft tokens
    head: str = "markov"        # sequential head: markov, gated (Markov with a gate), rnn, or none (DFlash-style)
    rank: int = 256             # Markov / RNN width r
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    calibration: list[float] | None = None  # STS temperature per block position (confidence logits)
    calibration_shift: list[float] | None = None  # and a logit shift per position: sigmoid(logit / T + b)
    qk_norm: bool = False       # Qwen3-style RMSNorm on each head of q and of every key, context keys too
    confidence: bool = True     # a confidence head; without one, a draft's confidence is its own draft probability
    confidence_with_head: bool = True  # the confidence head also reads W1[x_{k-1}] (when there is a head)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.kind == "eagle":
            self.head = "none"  # autoregressive: the backbone itself conditions on the previous token
        if not 1 <= self.num_layers <= 8:
            raise ValueError(f"num_layers must lie in [1, 8], got {self.num_layers}")
        if self.gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {self.gamma}")
        if not self.target_layers:
            raise ValueError("target_layers is empty")
        self.target_layers = sorted(int(i) for i in self.target_layers)

    @classmethod
    def for_target(cls, target_config, layers=None, **overrides) -> "DSparkConfig":
        """Dimensions from the target's ModelConfig (the drafter reuses its embedding width)."""
        c = target_config
        return cls(vocab_size=c.vocab_size, hidden_size=c.hidden_size, target_hidden_size=c.hidden_size,
                   target_layers=list(layers) if layers else default_layers(c.num_layers),
                   num_heads=c.num_heads, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                   intermediate_size=c.intermediate_size, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
                   **overrides)


def default_layers(num_layers: int, count: int = 5) -> list[int]:
    """`count` layers spread over the depth from the second layer to the third-to-last (the
    reference configuration takes [1, 9, 17, 25, 33] of 36)."""
    if num_layers <= count:
        return list(range(num_layers))
    last = max(1, num_layers - 3)
    return sorted({round(1 + i * (last - 1) / (count - 1)) for i in range(count)})


def attend(q, k_ctx, v_ctx, ctx_valid, k_blk, v_blk, causal: bool) -> torch.Tensor:
    """q [B, n, H, D]; k_ctx, v_ctx [Bc, N, Hkv, D] with Bc in {1, B}; ctx_valid [Bc or B, N] bool
    (None: all valid); k_blk, v_blk [B, n, Hkv, D]. Every query sees the valid context and the
    block (all of it, or itself and earlier when causal). Returns [B, n, H * D].
    A context per row (drafting: Bc = B) goes to scaled_dot_product_attention over the context and block
    keys side by side (its fused kernel: 2-4x the grouped matmuls on a CPU at 200-1000 context positions);
    a context shared by many rows (training's anchors) stays in grouped matmuls, which never copy it."""
    if k_ctx.shape[0] == q.shape[0]:
        return _attend_fused(q, k_ctx, v_ctx, ctx_valid, k_blk, v_blk, causal)
    return _attend_grouped(q, k_ctx, v_ctx, ctx_valid, k_blk, v_blk, causal)


def _attend_fused(q, k_ctx, v_ctx, ctx_valid, k_blk, v_blk, causal: bool) -> torch.Tensor:
    B, n, H, D = q.shape
    N = k_ctx.shape[1]
    k = torch.cat([k_ctx, k_blk], dim=1).transpose(1, 2)
    v = torch.cat([v_ctx, v_blk], dim=1).transpose(1, 2)
    visible = torch.ones(B, 1, n, N + n, dtype=torch.bool, device=q.device)
    if ctx_valid is not None:
        visible[..., :N] = ctx_valid[:, None, None, :]
    if causal:
        visible[..., N:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=visible, enable_gqa=True)
    return out.transpose(1, 2).reshape(B, n, H * D)


def _attend_grouped(q, k_ctx, v_ctx, ctx_valid, k_blk, v_blk, causal: bool) -> torch.Tensor:
    B, n, H, D = q.shape
    Hkv = k_blk.shape[2]
    G = H // Hkv
    # Group queries by kv head so GQA needs no repeated keys: rows are (g, i) pairs.
    qg = q.view(B, n, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * n, D)
    s_ctx = qg @ k_ctx.permute(0, 2, 3, 1)            # [B, Hkv, G*n, N]
    s_blk = qg @ k_blk.permute(0, 2, 3, 1)            # [B, Hkv, G*n, n]
    scores = torch.cat([s_ctx, s_blk], dim=-1).float() * (1.0 / math.sqrt(D))
    N = k_ctx.shape[1]
    visible = torch.ones(scores.shape[0], 1, G * n, N + n, dtype=torch.bool, device=q.device)
    if ctx_valid is not None:
        visible[..., :N] = ctx_valid[:, None, None, :]
    if causal:
        visible[..., N:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril().repeat(G, 1)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).to(q.dtype)
    out = probs[..., :N] @ v_ctx.permute(0, 2, 1, 3) + probs[..., N:] @ v_blk.permute(0, 2, 1, 3)
    return out.view(B, Hkv, G, n, D).permute(0, 3, 1, 2, 4).reshape(B, n, H * D)


class RopeModule(nn.Module):
    """A drafter holding RoPE inverse frequencies (`inv_freq`, a buffer not saved) that stay fp32 whatever
    dtype the module is cast to. Training runs them in fp32 (autocast leaves buffers alone); cast to bf16
    they would shift every angle by up to 0.4%: at position 1,000 SmolLM2's second pair turned 0.7 radian
    away from where training put it."""

    def init_rope(self, rope_theta: float, head_dim: int) -> None:
        self.register_buffer("inv_freq", rope_frequencies(rope_theta, head_dim).float(), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        fp32 = rope_frequencies(self.config.rope_theta, self.config.head_dim).float()
        self.inv_freq = fp32.to(self.inv_freq.device)
        return self


class DraftLayer(nn.Module):
    """Pre-norm Llama-style decoder layer whose attention also sees externally supplied context K/V."""

    def __init__(self, c: DSparkConfig):
        super().__init__()
        self.c = c
        d, hd = c.hidden_size, c.head_dim
        self.input_norm = nn.Parameter(torch.ones(d))
        self.q_proj = Linear(d, c.num_heads * hd, bias=False)
        self.k_proj = Linear(d, c.num_kv_heads * hd, bias=False)
        self.v_proj = Linear(d, c.num_kv_heads * hd, bias=False)
        self.o_proj = Linear(c.num_heads * hd, d, bias=False)
        if c.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(hd))
            self.k_norm = nn.Parameter(torch.ones(hd))
        self.post_norm = nn.Parameter(torch.ones(d))
        self.gate_proj = Linear(d, c.intermediate_size, bias=False)
        self.up_proj = Linear(d, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, d, bias=False)

    def kv(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, normed: bool = False):
        """Keys (with RoPE) and values of x [..., T, d]; normed: x already went through a norm."""
        c = self.c
        h = x if normed else rms_norm(x, self.input_norm, c.rms_norm_eps)
        k = self.k_proj(h).unflatten(-1, (c.num_kv_heads, c.head_dim))
        v = self.v_proj(h).unflatten(-1, (c.num_kv_heads, c.head_dim))
        if c.qk_norm:
            k = rms_norm(k, self.k_norm, c.rms_norm_eps)
        return rope(k, positions, inv_freq), v

    def forward(self, x, positions, inv_freq, k_ctx, v_ctx, ctx_valid, causal: bool):
        """x [B, n, d] at positions [B, n]; returns (new x, the block's own (k, v))."""
        c = self.c
        h = rms_norm(x, self.input_norm, c.rms_norm_eps)
        q = self.q_proj(h).unflatten(-1, (c.num_heads, c.head_dim))
        if c.qk_norm:
            q = rms_norm(q, self.q_norm, c.rms_norm_eps)
        q = rope(q, positions, inv_freq)
        k, v = self.kv(h, positions, inv_freq, normed=True)
        x = x + self.o_proj(attend(q, k_ctx, v_ctx, ctx_valid, k, v, causal))
        h = rms_norm(x, self.post_norm, c.rms_norm_eps)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)), (k, v)
