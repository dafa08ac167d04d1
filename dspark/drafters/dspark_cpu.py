"""A DSpark drafter's block pass in one C++ call on a CPU: the target's fused decoder layers
(`dspark._C.llama_decoder_layers`, csrc/cpu/decoder_layers.cpp) run the drafter's layers, whose attention
sees each row's committed context in the drafter's own K/V cache and, bidirectionally, the whole block.

A draft layer is a Llama layer (RMSNorm, q/k/v projections, RoPE, attention, o projection, residual,
RMSNorm, SiLU-gated MLP, residual): the same arithmetic as DraftLayer.forward with the same roundings,
where the PyTorch path dispatches ~40 small ops per layer. The block's own K/V are written at each row's
slots right after its committed context, which the drafter's cache keeps free for them (the next commit
overwrites them). The PyTorch block (DSparkModel.block) is the reference: tests/test_dspark_cpu_block.py
compares the two. DSPARK_FUSED_CPU=0 keeps the PyTorch path, as for the target.
"""

from __future__ import annotations

import torch

from dspark.cache import KVCache
from dspark.huge_pages import onto_huge_pages
from dspark.drafters.dspark_layers import Linear
from dspark.models import cpu_decoder
from dspark.models.quantized import QuantizedWeight

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _fused(parts: list[Linear]) -> torch.Tensor | QuantizedWeight | None:
    """The projections' weights stacked by rows, as the kernel computes them: all Q8_0 blocks or all dense."""
    if any(p.bias is not None for p in parts):  # the kernel's draft layers take no biases
        return None
    weights = [p.inference_weight() for p in parts]
    if all(isinstance(w, QuantizedWeight) for w in weights):
        if len({(w.format, w.in_features) for w in weights}) != 1:
            return None
        return QuantizedWeight.cat(weights).pack()
    if any(isinstance(w, QuantizedWeight) for w in weights):
        return None
    return torch.cat([w.detach() for w in weights]).contiguous()


def _layer_weights(model) -> tuple[list, list[int]] | None:
    """The kernel's 12 entries per layer (cpu_decoder._LAYER_WEIGHTS' order) and their formats, or None when a
    weight has another dtype or layout; cached on the model until a weight is replaced or changed in place."""
    linears = model.__dict__.get("_fused_cpu_linears")
    if linears is None or linears[0] is not model.layers:
        linears = model.__dict__["_fused_cpu_linears"] = (
            model.layers, [m for m in model.layers.modules() if isinstance(m, Linear)])
    key = [(m.weight, m.weight._version, m.blocks) for m in linears[1]]
    cached = model.__dict__.get("_fused_cpu_block")
    if cached is not None and len(cached[0]) == len(key) and all(
            a[0] is b[0] and a[1] == b[1] and a[2] is b[2] for a, b in zip(cached[0], key)):
        return cached[1]
    dtype, entries = model.dtype, []
    for layer in model.layers:
        qkv = _fused([layer.q_proj, layer.k_proj, layer.v_proj])
        gate_up = _fused([layer.gate_proj, layer.up_proj])
        o, down = (_fused([layer.o_proj]), _fused([layer.down_proj]))
        q_norm, k_norm = (layer.q_norm, layer.k_norm) if layer.c.qk_norm else (None, None)
        entries += [layer.input_norm, qkv, None, q_norm, k_norm, o, None, layer.post_norm, gate_up, None, down, None]
    usable = all(e is None or isinstance(e, QuantizedWeight)
                 or (e.dtype == dtype and e.device.type == "cpu") for e in entries)
    usable = usable and not any(e is None for e in entries[1::12] + entries[5::12] + entries[8::12] + entries[10::12])
    flat = [e.data if isinstance(e, QuantizedWeight) else None if e is None else e.detach().contiguous()
            for e in entries]
    # The stacked blocks (copies made here) go on huge pages: every drafting round reads them. Dense entries stay
    # views of the module's parameters, which training may change in place.
    blocks = [i for i, e in enumerate(entries) if isinstance(e, QuantizedWeight)]
    for i, moved in zip(blocks, onto_huge_pages([flat[i] for i in blocks])):
        flat[i] = moved
    formats = [e.kernel_format if isinstance(e, QuantizedWeight) else 0 for e in entries]
    result = (flat, formats) if usable else None
    model.__dict__["_fused_cpu_block"] = (key, result)
    return result


def block_weights(model, kv: KVCache, longest: int, n: int) -> tuple[list, list[int]] | None:
    """The kernel's weights when the fused block serves this proposal, else None: a DSpark-kind drafter on the
    CPU without autograd, weights the kernel reads, and room after every row's context (the longest: `longest`
    positions) for the block's n slots."""
    if not (cpu_decoder.enabled() and model.config.kind == "dspark" and model.norm.device.type == "cpu"
            and model.dtype in _FLOATS and kv.k.dtype == model.dtype and kv.block_table is None
            and kv.k.is_contiguous() and kv.v.is_contiguous() and not torch.is_grad_enabled()
            and longest + n <= kv.k.shape[2]):
        return None
    return _layer_weights(model)


@torch.inference_mode()
def block(model, kv: KVCache, weights: tuple[list, list[int]], rows: list[int], anchors: torch.Tensor,
          starts: torch.Tensor, n: int) -> torch.Tensor:
    """DSparkModel.block for the requests in cache rows `rows` (their committed context: kv.seqlens[rows],
    which must equal starts), with block_weights' weights: the normed h_1..h_n [B, n, d], in the given order."""
    c, B = model.config, len(rows)
    order = sorted(range(B), key=lambda i: rows[i])  # the kernel takes the tokens in cache-row order
    index = torch.tensor(order)
    sorted_rows = torch.tensor([rows[i] for i in order])
    x = torch.cat([model.embed(anchors[index])[:, None].to(model.dtype),
                   model.mask_embedding.expand(B, n - 1, -1)], dim=1).reshape(B * n, -1).contiguous()
    positions = (starts[index][:, None] + torch.arange(n)).reshape(-1)
    counts = torch.zeros(kv.k.shape[1], dtype=torch.int32)
    counts[sorted_rows] = n
    qo_indptr = torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0, dtype=torch.int32)])
    flat, formats = weights
    cpu_decoder._kernel(x, flat, formats, kv.k, kv.v, positions, model.inv_freq.contiguous(),
                        sorted_rows.repeat_interleave(n), positions, qo_indptr, kv.seqlens, None, None, None,
                        [-1] * c.num_layers, c.num_heads, c.intermediate_size, c.rms_norm_eps,
                        1.0 / c.head_dim ** 0.5, model.norm.detach().contiguous(), True)
    h = torch.empty(B, n, x.shape[-1], dtype=x.dtype)
    h[index] = x.view(B, n, -1)
    return h
