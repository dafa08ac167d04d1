"""Llama-family decoder on dspark ops: every forward (prefill, verification, plain decoding) is one
flattened round through `tree_attention` over the KV cache.

Weights are held in Hugging Face layout (rotate-half RoPE), whatever file they came from.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn.functional as F

from dspark import ops
from dspark.batch import Round
from dspark.cache import KVCache, SideCache
from dspark.huge_pages import onto_huge_pages
from dspark.models import cpu_decoder, flash_prefill
from dspark.models.config import ModelConfig, rope_type
from dspark.models.layers import apply_rope, rms_norm, rope_frequencies, rope_tables
from dspark.models.linear import linear
from dspark.models.quantized import QuantizedWeight
from dspark.models.target import TargetModel


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    inv_freq = rope_frequencies(config.rope_theta, config.head_dim)
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


class LlamaModel(TargetModel):
    plans_rounds = True

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor | QuantizedWeight]):
        """weights: Hugging Face names without the `model.` prefix (embed_tokens.weight,
        layers.{i}.self_attn.q_proj.weight, ..., norm.weight, lm_head.weight). Matrices may be
        QuantizedWeight (GGUF blocks, CPU); the compute dtype is then that of the dense weights (norms)."""
        self.config = config
        self.weights = weights = dict(weights)  # fused projections are added, the caller's dict is left alone
        dense = [t for t in weights.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        self._dtype = weights["embed_tokens.weight"].dtype if isinstance(weights["embed_tokens.weight"], torch.Tensor) \
            else (dense[0].dtype if dense else torch.float32)
        self._dense_cache: dict[int, torch.Tensor] = {}
        # Prefills take dense GEMMs (oneDNN / MKL, faster at many rows) whose per-row results depend on the row
        # count on some CPUs, so a greedy request's output can depend on the prompts prefilled beside it
        # (SmolLM2 native on an AVX512-BF16 Xeon: 11 of 16 replies differed between batch 1 and batch 8).
        # True: prefills compute each row alone (linear's row_stable: dense GEMMs over fixed-size row chunks), and
        # outputs never depend on batching.
        self.batch_invariant_prefill = False
        self.inv_freq = rope_inverse_frequencies(config).float().to(weights["embed_tokens.weight"].device)
        # Tied checkpoints may still carry a (stale or identical) lm_head; transformers uses the embedding.
        if config.tie_word_embeddings or "lm_head.weight" not in weights:
            weights["lm_head.weight"] = weights["embed_tokens.weight"]
        self._fuse_projections()
        if os.environ.get("DSPARK_PACK_BLOCKS", "1") != "0":
            self._pack_blocks()
        self._onto_huge_pages()

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
        return self._dtype

    @property
    def quantized(self) -> bool:
        return any(isinstance(t, QuantizedWeight) for t in self.weights.values())

    def dense_weight(self, name: str) -> torch.Tensor:
        """A weight as a dense tensor of the compute dtype (a block-quantized one decoded once and kept),
        for code that needs plain matrices: the drafters sharing the embedding and LM head."""
        weight = self.weights[name]
        if isinstance(weight, torch.Tensor):
            return weight
        if id(weight) not in self._dense_cache:  # by object: a tied embedding and LM head decode once
            self._dense_cache[id(weight)] = weight.dequantize(self.dtype)
        return self._dense_cache[id(weight)]

    @property
    def device(self) -> torch.device:
        return self.weights["embed_tokens.weight"].device

    def shared_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.dense_weight("embed_tokens.weight"), self.dense_weight("lm_head.weight")

    def lm_head(self) -> torch.Tensor | QuantizedWeight:
        return self.weights["lm_head.weight"]

    def _fuse_projections(self) -> None:
        """q/k/v and gate/up become one matrix each: one pass over x instead of three and two (the
        originals are dropped, so memory does not grow)."""
        w = self.weights
        for i in range(self.config.num_layers):
            for fused, parts in ((f"layers.{i}.self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                 (f"layers.{i}.mlp.gate_up_proj", ("gate_proj", "up_proj"))):
                if fused + ".weight" in w:
                    continue
                prefix = fused.rsplit(".", 1)[0] + "."
                for kind in ("weight", "bias"):
                    names = [f"{prefix}{part}.{kind}" for part in parts]
                    if all(n in w for n in names):
                        w[f"{fused}.{kind}"] = self._stack([w.pop(n) for n in names])
                    elif any(n in w for n in names):
                        raise ValueError(f"layer {i}: {kind} present for some of {parts} only")

    def _pack_blocks(self) -> None:
        """GGUF block matrices into the CPU kernel's packed layout, once (QuantizedWeight.pack: the same bytes,
        loaded as the kernel uses them instead of transposed from the file's layout on every call; the same
        results). A tied embedding and LM head stay one object. DSPARK_PACK_BLOCKS=0 keeps the file's layout."""
        packed: dict[int, QuantizedWeight] = {}
        for name, t in self.weights.items():
            if isinstance(t, QuantizedWeight):
                self.weights[name] = packed.setdefault(id(t), t.pack())

    def _onto_huge_pages(self) -> None:
        """Every CPU weight copied onto 2 MiB pages (dspark.huge_pages), once: a model sharing another's
        weights (truncated) keeps them where they are. A tied embedding and LM head stay one object."""
        entries = list(self.weights.items())
        tensors = [t.data if isinstance(t, QuantizedWeight) else t for _, t in entries]
        moved: dict[int, torch.Tensor | QuantizedWeight] = {}
        for (name, t), data in zip(entries, onto_huge_pages(tensors)):
            if data is not (t.data if isinstance(t, QuantizedWeight) else t):
                if id(t) not in moved:
                    moved[id(t)] = data if isinstance(t, torch.Tensor) else \
                        QuantizedWeight(data, t.format, t.in_features, t.out_features)
                self.weights[name] = moved[id(t)]

    def _stack(self, parts: list) -> torch.Tensor | QuantizedWeight:
        """Rows stacked; parts of one block format stay blocks, a mix (GGUF files may quantize q/k and v,
        or gate and up, differently) is decoded to dense in the compute dtype."""
        if all(isinstance(p, QuantizedWeight) for p in parts) and len({(p.format, p.in_features) for p in parts}) == 1:
            return QuantizedWeight.cat(parts)
        return torch.cat([p.dequantize(self.dtype) if isinstance(p, QuantizedWeight) else p for p in parts])

    def _attention(self, i: int, x: torch.Tensor, cos, sin, cache: KVCache, rnd: Round, plan,
                   invariant: bool, row_stable: bool = False) -> torch.Tensor:
        c, w = self.config, self.weights
        prefix = f"layers.{i}.self_attn."
        qkv = linear(x, w[prefix + "qkv_proj.weight"], w.get(prefix + "qkv_proj.bias"), invariant, row_stable)
        qkv = qkv.view(-1, c.num_heads + 2 * c.num_kv_heads, c.head_dim)
        q, k, v = qkv.split([c.num_heads, c.num_kv_heads, c.num_kv_heads], dim=1)
        if c.qk_norm:
            q = apply_rope(rms_norm(q, w[prefix + "q_norm.weight"], c.rms_norm_eps), cos, sin)
            k = apply_rope(rms_norm(k, w[prefix + "k_norm.weight"], c.rms_norm_eps), cos, sin)
        else:  # q and k are adjacent in qkv: rotate them in one go
            q, k = apply_rope(qkv[:, :c.num_heads + c.num_kv_heads], cos, sin).split([c.num_heads, c.num_kv_heads], 1)
        cache.write(i, rnd.write_rows, rnd.write_slots, k, v)
        if flash_prefill.applies(q, rnd):
            out = flash_prefill.attention(q, k, v, rnd, 1.0 / math.sqrt(c.head_dim))
        else:  # the round's tree_attention plan, or a CPU prefill's SDPA plan (flash_prefill.plan_cpu)
            out = plan.run(q, cache.k[i], cache.v[i])
        return linear(out.reshape(x.shape[0], -1), w[prefix + "o_proj.weight"], w.get(prefix + "o_proj.bias"),
                      invariant, row_stable)

    def _mlp(self, i: int, x: torch.Tensor, invariant: bool, row_stable: bool = False) -> torch.Tensor:
        w = self.weights
        prefix = f"layers.{i}.mlp."
        # Biases exist only in Llama checkpoints with mlp_bias=True; absent ones read as None.
        gate, up = linear(x, w[prefix + "gate_up_proj.weight"], w.get(prefix + "gate_up_proj.bias"),
                          invariant, row_stable).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, w[prefix + "down_proj.weight"], w.get(prefix + "down_proj.bias"),
                      invariant, row_stable)

    def forward(self, cache: KVCache, rnd: Round,
                capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final-norm hidden states [T, hidden], and the residual stream after each layer in
        capture_layers (for drafters conditioned on the target's hidden states)."""
        return self._forward(cache, rnd, capture_layers, None)

    def forward_capturing(self, cache: KVCache, rnd: Round, capture_layers: tuple[int, ...],
                          side: SideCache) -> torch.Tensor:
        """The fused CPU layers write the captured streams straight into the side cache (no list, no
        concatenation, no scatter: on the 2-core CPU those few small ops after a round's layers cost
        ~2% of a batch-1 round, every cache line cold); the PyTorch path goes through the list."""
        return self._forward(cache, rnd, capture_layers, side)[0]

    def plan(self, cache: KVCache, rnd: Round, backend: str | None = None) -> ops.TreeAttentionPlan:
        """The round's attention metadata validated and prepared once for every layer (host reads)."""
        self.check_context(cache.max_seq_len)
        return ops.plan_tree_attention(rnd.qo_indptr, cache.seqlens, rnd.parents, cache.block_table,
                                       num_tokens=rnd.tokens.shape[0], num_q_heads=self.config.num_heads,
                                       k_cache=cache.k[0], backend=backend)

    def forward_planned(self, cache: KVCache, rnd: Round, plan, capture_layers: tuple[int, ...] = (),
                        side: SideCache | None = None) -> torch.Tensor:
        return self._forward(cache, rnd, capture_layers, side, plan)[0]

    @torch.inference_mode()
    def _forward(self, cache: KVCache, rnd: Round, capture_layers: tuple[int, ...],
                 side: SideCache | None, plan=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        c, w = self.config, self.weights
        plan = self.plan(cache, rnd) if plan is None else plan
        # Decoding and verification rounds must give a token the same result whatever else shares the
        # round (greedy speculative decoding = plain decoding); only prefills (fresh, or a long prompt's
        # later chunks) may take MKL's faster fp32 GEMM for many rows.
        invariant = not rnd.prefill
        h = self.embed(rnd.tokens)
        norm = w["norm.weight"]
        normed = False
        # Short prefills too, unless they must not depend on batching: whether a prompt's round is short depends
        # on what shares it, and the fused layers' arithmetic is not the batch-invariant prefill's.
        fused = invariant or (not self.batch_invariant_prefill and cpu_decoder.takes_prefill(self, rnd.tokens.shape[0]))
        if cpu_decoder.applies(self, cache, plan, fused):  # every layer, and the final norm, in one C++ call
            in_place = side is not None and side.data.dtype == h.dtype and side.data.is_contiguous()
            normed = norm.dtype == h.dtype and norm.is_contiguous()
            h, captured = cpu_decoder.run(self, h, cache, rnd, plan, capture_layers, side if in_place else None,
                                          norm if normed else None)
        else:
            cos, sin = rope_tables(rnd.positions, self.inv_freq)
            row_stable = rnd.prefill and self.batch_invariant_prefill
            plan = flash_prefill.plan_cpu(rnd, cache, self.dtype, 1.0 / math.sqrt(c.head_dim), row_stable) or plan
            h, captured = self._layers(h, cache, rnd, plan, cos, sin, capture_layers, invariant, row_stable)
        if side is not None and captured:
            side.write(rnd.write_rows, rnd.write_slots, torch.cat(captured, dim=-1))
            captured = []
        return (h if normed else rms_norm(h, norm, c.rms_norm_eps)), captured

    def _layers(self, h, cache, rnd, plan, cos, sin, capture_layers, invariant, row_stable=False):
        """The PyTorch layers: the reference the fused ones are tested against, and every other round."""
        c, w = self.config, self.weights
        captured = []
        for i in range(c.num_layers):
            h = h + self._attention(i, rms_norm(h, w[f"layers.{i}.input_layernorm.weight"], c.rms_norm_eps), cos, sin,
                                    cache, rnd, plan, invariant, row_stable)
            h = h + self._mlp(i, rms_norm(h, w[f"layers.{i}.post_attention_layernorm.weight"], c.rms_norm_eps),
                              invariant, row_stable)
            if i in capture_layers:
                captured.append(h)
        return h, captured

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        table = self.weights["embed_tokens.weight"]
        if isinstance(table, QuantizedWeight):
            return table.embedding(tokens, self.dtype)
        return F.embedding(tokens, table)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.weights["lm_head.weight"], batch_invariant=True).float()
