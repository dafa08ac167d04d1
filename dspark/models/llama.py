"""Llama-family decoder on dspark ops: every forward (prefill, verification, plain decoding) is one
flattened round through `tree_attention` over the KV cache.

Weights are held in Hugging Face layout (rotate-half RoPE), whatever file they came from.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from dspark import ops
from dspark.batch import Round
from dspark.cache import KVCache
from dspark.models import flash_prefill
from dspark.models.config import ModelConfig, rope_type


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    kind = rope_type(scaling)
    factor = float(scaling.get("factor", 1.0))
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3 are)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos, sin [T, D/2] in fp32 (rotate-half convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]):
        """weights: Hugging Face names without the `model.` prefix (embed_tokens.weight,
        layers.{i}.self_attn.q_proj.weight, ..., norm.weight, lm_head.weight)."""
        self.config = config
        self.weights = weights
        self.inv_freq = rope_inverse_frequencies(config).float().to(weights["embed_tokens.weight"].device)
        # Tied checkpoints may still carry a (stale or identical) lm_head; transformers uses the embedding.
        if config.tie_word_embeddings or "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["embed_tokens.weight"]

    def check_context(self, max_seq_len: int) -> None:
        """Refuse caches longer than the sliding window: tree_attention has no window, and positions
        below the window are exactly the ones where windowed and full attention agree."""
        window = self.config.sliding_window
        if window is not None and max_seq_len > window:
            raise ValueError(f"this checkpoint uses sliding-window attention (window {window}), which dspark does "
                             f"not implement; use max_seq_len <= {window} (got {max_seq_len})")

    def truncated(self, num_layers: int) -> "LlamaModel":
        """The first num_layers layers with the final norm and head, sharing this model's weights."""
        if not 1 <= num_layers <= self.config.num_layers:
            raise ValueError(f"num_layers must lie in [1, {self.config.num_layers}], got {num_layers}")
        config = dataclasses.replace(self.config, num_layers=num_layers)
        return LlamaModel(config, self.weights)

    @property
    def dtype(self) -> torch.dtype:
        return self.weights["embed_tokens.weight"].dtype

    @property
    def device(self) -> torch.device:
        return self.weights["embed_tokens.weight"].device

    def _attention(self, i: int, x: torch.Tensor, cos, sin, cache: KVCache, rnd: Round) -> torch.Tensor:
        c, w = self.config, self.weights
        prefix = f"layers.{i}.self_attn."
        q = F.linear(x, w[prefix + "q_proj.weight"], w.get(prefix + "q_proj.bias")).view(-1, c.num_heads, c.head_dim)
        k = F.linear(x, w[prefix + "k_proj.weight"], w.get(prefix + "k_proj.bias")).view(-1, c.num_kv_heads, c.head_dim)
        v = F.linear(x, w[prefix + "v_proj.weight"], w.get(prefix + "v_proj.bias")).view(-1, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q = rms_norm(q, w[prefix + "q_norm.weight"], c.rms_norm_eps)
            k = rms_norm(k, w[prefix + "k_norm.weight"], c.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.write(i, rnd.write_rows, rnd.write_slots, k, v)
        if flash_prefill.applies(q, rnd):
            out = flash_prefill.attention(q, k, v, rnd, 1.0 / math.sqrt(c.head_dim))
        else:
            out = ops.tree_attention(q, cache.k[i], cache.v[i], rnd.qo_indptr, cache.seqlens, rnd.parents,
                                     cache.block_table)
        return F.linear(out.reshape(x.shape[0], -1), w[prefix + "o_proj.weight"], w.get(prefix + "o_proj.bias"))

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        w = self.weights
        prefix = f"layers.{i}.mlp."
        # Biases exist only in Llama checkpoints with mlp_bias=True; absent ones read as None.
        gate = F.linear(x, w[prefix + "gate_proj.weight"], w.get(prefix + "gate_proj.bias"))
        up = F.linear(x, w[prefix + "up_proj.weight"], w.get(prefix + "up_proj.bias"))
        return F.linear(F.silu(gate) * up, w[prefix + "down_proj.weight"], w.get(prefix + "down_proj.bias"))

    @torch.inference_mode()
    def forward(self, cache: KVCache, rnd: Round,
                capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final-norm hidden states [T, hidden], and the residual stream after each layer in
        capture_layers (for drafters conditioned on the target's hidden states)."""
        c, w = self.config, self.weights
        self.check_context(cache.max_seq_len)
        angles = rnd.positions.float()[:, None] * self.inv_freq[None, :]
        cos, sin = angles.cos(), angles.sin()
        h = F.embedding(rnd.tokens, w["embed_tokens.weight"])
        captured = []
        for i in range(c.num_layers):
            h = h + self._attention(i, rms_norm(h, w[f"layers.{i}.input_layernorm.weight"], c.rms_norm_eps), cos, sin,
                                    cache, rnd)
            h = h + self._mlp(i, rms_norm(h, w[f"layers.{i}.post_attention_layernorm.weight"], c.rms_norm_eps))
            if i in capture_layers:
                captured.append(h)
        return rms_norm(h, w["norm.weight"], c.rms_norm_eps), captured

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weights["lm_head.weight"]).float()
