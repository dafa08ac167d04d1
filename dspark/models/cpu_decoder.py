"""The decoder stack of a CPU decoding or verification round in one C++ call.

`LlamaModel.forward` in PyTorch dispatches ~45 small ops per layer; at batch 1 on a 2-core CPU that
costs about as much as streaming the weights. `dspark._C.llama_decoder_layers`
(csrc/cpu/decoder_layers.cpp) runs the same layers with the same roundings around the same kernels
(small_batch_linear, tree_attention), row by row, so it is batch invariant like them. It serves
rounds on CPU tensors without autograd whose tree_attention plan chose the C++ backend, and prefills
short enough that the few-row kernels are the faster choice (takes_prefill); everything else keeps the
PyTorch path, which remains the reference (tests/test_cpu_decoder.py compares them).
"""

from __future__ import annotations

import importlib
import os

import torch

from dspark.models.linear import cpu_flags, fast_bf16_gemm, kernel_takes
from dspark.models.quantized import QuantizedWeight

try:
    _kernel = importlib.import_module("dspark._C").llama_decoder_layers
except (ImportError, AttributeError):
    _kernel = None

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_LAYER_WEIGHTS = ("input_layernorm.weight", "self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias",
                  "self_attn.q_norm.weight", "self_attn.k_norm.weight", "self_attn.o_proj.weight",
                  "self_attn.o_proj.bias", "post_attention_layernorm.weight", "mlp.gate_up_proj.weight",
                  "mlp.gate_up_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")


def enabled() -> bool:
    """DSPARK_FUSED_CPU=0 keeps every round on the PyTorch layers (debugging, comparisons)."""
    return _kernel is not None and os.environ.get("DSPARK_FUSED_CPU", "1") != "0"


def quantized_prefill_limit(flags: frozenset[str] | None = None) -> int:
    """How many prefill tokens over GGUF blocks the fused layers take, from this CPU's flags (or these). Where
    the CPU multiplies bf16 natively (avx512_bf16, amx_bf16) oneDNN's dense GEMMs win past ~64 tokens: on the 2-vCPU
    Xeon (AMX), SmolLM2 native, one fresh prompt of 8 / 31 / 64 / 96 / 128 tokens took 11.5 / 25.9 / 49.3 / 55.1 /
    63.3 ms in the PyTorch layers, 6.4 / 19.7 / 39.7 / 55.3 / 75.5 fused. On an AVX2 CPU without them the int8 dots
    (built for it with the default -march=native) win up to the default step of 512 tokens: on the 2-vCPU AMD EPYC,
    bf16, 100 / 160 / 300 / 512 tokens took 376 / 596 / 1056 / 1581 ms in the PyTorch layers, 211 / 383 / 800 / 1562
    fused (fp32: 100 / 300 tokens 448 / 886 against 237 / 815). Elsewhere (other ISAs, unreadable flags: unmeasured)
    64, the limit measured first."""
    flags = cpu_flags() if flags is None else flags
    return 512 if "avx2" in flags and not fast_bf16_gemm(flags) else 64


QUANTIZED_PREFILL_TOKENS = quantized_prefill_limit()


def takes_prefill(model, tokens: int) -> bool:
    """Whether a prefill round of `tokens` tokens that asks for no batch invariance runs faster in the fused
    layers: over GGUF blocks up to QUANTIZED_PREFILL_TOKENS tokens; over dense matrices while linear() would
    give the round's rows to the few-row kernel anyway (SmolLM2 bf16 with oneDNN's bf16 GEMM: 22 ms fused
    against 30 at 8 tokens, 37 against 31 at 16)."""
    weight = model.weights.get("layers.0.self_attn.qkv_proj.weight")
    if isinstance(weight, QuantizedWeight):
        return tokens <= QUANTIZED_PREFILL_TOKENS
    return isinstance(weight, torch.Tensor) and kernel_takes(tokens, model.dtype, weight)


def applies(model, cache, plan, eligible: bool) -> bool:
    """eligible: a decoding or verification round, or a prefill that takes_prefill."""
    dtype = model.dtype
    return (enabled() and eligible and model.device.type == "cpu" and plan.backend == "cpu"
            and dtype in _FLOATS and cache.k.dtype == dtype and cache.k.is_contiguous() and cache.v.is_contiguous()
            and model.config.head_dim % 2 == 0 and not torch.is_grad_enabled() and _weights(model) is not None
            # q/k norms exactly when the config has them, as the PyTorch layers read them
            and (model.weights.get("layers.0.self_attn.q_norm.weight") is not None) == bool(model.config.qk_norm))


def _weights(model) -> tuple[list[torch.Tensor | None], list[int]] | None:
    """The flat per-layer weight list the kernel takes and each entry's format (0: dense in the compute
    dtype, else the GGML type id of a block-quantized projection), or None if a weight has another dtype
    or layout; checked once per model and weight dict: the tensors are the model's own."""
    key = (id(model.weights), len(model.weights), model.config.num_layers)
    cached = model.__dict__.get("_fused_cpu_weights")
    if cached is None or cached[0] != key:
        w, dtype = model.weights, model.dtype
        entries = [w.get(f"layers.{i}.{name}") for i in range(model.config.num_layers) for name in _LAYER_WEIGHTS]
        flat, formats = [], []
        for t in entries:
            quantized = isinstance(t, QuantizedWeight)
            flat.append(t.data if quantized else t)
            formats.append(t.kernel_format if quantized else 0)
        usable = all(t is None or (isinstance(t, QuantizedWeight) and t.device.type == "cpu")
                     or (isinstance(t, torch.Tensor) and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu")
                     for t in entries)
        cached = (key, (flat, formats) if usable else None)
        model.__dict__["_fused_cpu_weights"] = cached
    return cached[1]


def run(model, h: torch.Tensor, cache, rnd, plan, capture_layers: tuple[int, ...], capture_into=None,
        final_norm: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """All layers over the round's embeddings h [T, hidden], their RoPE tables made in the same call from
    the round's positions (rope_tables' formula; its eight small ops cost ~60 us at batch 1, cold caches);
    returns the last layer's residual stream
    (given final_norm, a weight of the dtype, normalised by it: right after the layers, in cache, that
    costs ~1 us where the PyTorch norm's seven ops cost ~100 at batch 1) and the residual stream after each
    layer in capture_layers, or, given capture_into (a SideCache [R, S, 1, n * hidden] of the dtype),
    writes those concatenated at the round's slots and returns []."""
    c = model.config
    h = h.contiguous()
    slots = [-1] * c.num_layers
    # Layers outside the model capture nothing, as in the PyTorch forward (`if i in capture_layers`).
    for index, layer in enumerate(sorted({i for i in capture_layers if 0 <= i < c.num_layers})):
        slots[layer] = index
    num_captured = sum(s >= 0 for s in slots)
    if not num_captured:
        captured = None
    elif capture_into is not None:
        captured = capture_into.data
    else:
        captured = torch.empty(h.shape[0], num_captured * c.hidden_size, dtype=h.dtype)
    weights, formats = _weights(model)
    _kernel(h, weights, formats, cache.k, cache.v, rnd.positions.contiguous(), model.inv_freq.contiguous(),
            rnd.write_rows, rnd.write_slots, plan.qo_indptr,
            plan.cache_seqlens, plan.parents, plan.block_table, captured, slots, c.num_heads, c.intermediate_size,
            c.rms_norm_eps, 1.0 / c.head_dim ** 0.5, final_norm, False)
    if captured is None or capture_into is not None:
        return h, []
    # In layer order, one per captured layer, as the PyTorch forward collects them.
    return h, list(captured.view(h.shape[0], num_captured, c.hidden_size).unbind(1))
