"""GGUF block-quantized weights kept as they are in the file (Q4_0, Q4_1, Q8_0), and the linear layer
over them (`dspark._C.quantized_linear`, csrc/cpu/quantized_linear.h; reference
dspark/reference/quantized_linear.py).

Decoding on a CPU streams every weight once per token: SmolLM2-135M's Q4_1 GGUF is ~96 MB read per
token natively against ~270 MB as bf16. Only the matrices are kept quantized (projections, the
embedding and the LM head); norms and biases are dense in the compute dtype.
"""

from __future__ import annotations

import importlib

import torch

from dspark.reference import quantized_linear as reference

TYPE_IDS = {"q4_0": 2, "q4_1": 3, "q8_0": 8}  # GGML's type ids, the kernel's format argument

try:
    _kernel = importlib.import_module("dspark._C").quantized_linear
    _dequantize_kernel = importlib.import_module("dspark._C").dequantize_blocks
except (ImportError, AttributeError):  # the C++ extension is not built: the (slow) reference
    _kernel = _dequantize_kernel = None
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class QuantizedWeight:
    """A [out_features, in_features] matrix as GGUF blocks: `data` uint8 [out, in / 32 * bytes]."""

    def __init__(self, data: torch.Tensor, fmt: str, in_features: int):
        if fmt not in TYPE_IDS:
            raise ValueError(f"format must be one of {sorted(TYPE_IDS)}, got {fmt!r}")
        if in_features % reference.BLOCK:
            raise ValueError(f"in_features must be a multiple of 32, got {in_features}")
        row_bytes = in_features // reference.BLOCK * reference.FORMATS[fmt]
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != row_bytes:
            raise ValueError(f"data must be uint8 [out, {row_bytes}] for {fmt} with {in_features} inputs, got "
                             f"{data.dtype} {tuple(data.shape)}")
        self.data, self.format, self.in_features = data.contiguous(), fmt, in_features

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.in_features)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.format}, shape={self.shape})"

    @classmethod
    def from_dense(cls, weight: torch.Tensor, fmt: str = "q8_0") -> "QuantizedWeight":
        """A dense [out, in] matrix written as GGUF blocks, as llama.cpp's quantizer does (Q8_0: d = max|w| / 127
        rounded to fp16, codes roundf(w / d) from the unrounded d: bit-identical to ggml's). Only Q8_0 is written."""
        if fmt != "q8_0":
            raise ValueError(f"only q8_0 blocks can be written, got {fmt!r}")
        if weight.dim() != 2 or not weight.is_floating_point() or weight.shape[1] % reference.BLOCK:
            raise ValueError(f"weight must be a float [out, in] matrix with in a multiple of 32, got "
                             f"{weight.dtype} {tuple(weight.shape)}")
        if not torch.isfinite(weight).all():
            raise ValueError("weight holds NaN or inf: it has no Q8_0 blocks")
        out, in_features = weight.shape
        w = weight.detach().float().cpu().view(out, in_features // reference.BLOCK, reference.BLOCK)
        d = w.abs().amax(-1, keepdim=True) / 127
        scaled = w * torch.where(d > 0, 1 / d, torch.zeros_like(d))
        whole = scaled.abs().floor()  # C's roundf (halves away from zero), as ggml rounds
        codes = (torch.sign(scaled) * (whole + torch.floor(2 * (scaled.abs() - whole)))).to(torch.int8)
        data = torch.cat([d.half().view(torch.uint8), codes.view(torch.uint8)], dim=-1)
        return cls(data.reshape(out, -1), fmt, in_features)

    def rows(self, index: torch.Tensor) -> "QuantizedWeight":
        """The matrix of the selected rows (a permutation or a subset)."""
        return QuantizedWeight(self.data[index], self.format, self.in_features)

    @staticmethod
    def cat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Rows stacked (fused projections): same format and input width required."""
        if len({(p.format, p.in_features) for p in parts}) != 1:
            raise ValueError("only weights of one format and input width can be stacked")
        return QuantizedWeight(torch.cat([p.data for p in parts]), parts[0].format, parts[0].in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [out, in] matrix (dspark._C.dequantize_blocks on the CPU: the reference's values,
        rounded to `dtype`)."""
        if _dequantize_kernel is None or self.device.type != "cpu" or dtype not in _FLOATS:
            return reference.dequantize(self.data, self.format, self.in_features).to(dtype)
        out = torch.empty(self.shape, dtype=dtype)
        _dequantize_kernel(self.data, TYPE_IDS[self.format], out)
        return out

    def embedding(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `tokens` decoded: an embedding lookup (the C++ decoder on the CPU: the reference's ~20
        small ops cost ~90 us a batch-1 round)."""
        picked = self.data[tokens.reshape(-1)]
        if _dequantize_kernel is None or self.device.type != "cpu" or dtype not in _FLOATS:
            return reference.dequantize(picked, self.format, self.in_features).to(dtype).view(*tokens.shape, -1)
        out = torch.empty(picked.shape[0], self.in_features, dtype=dtype)
        _dequantize_kernel(picked.contiguous(), TYPE_IDS[self.format], out)
        return out.view(*tokens.shape, -1)


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b, x [..., in] float on the CPU; y in x's dtype. Bias in x's dtype."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x [..., {weight.in_features}] expected for weight {weight.shape}, got {tuple(x.shape)}")
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError("block-quantized weights run on the CPU only (load the model with dense weights elsewhere)")
    if torch.is_grad_enabled() and x.requires_grad:
        raise ValueError("block-quantized weights have no backward: run them under torch.no_grad()")
    if bias is not None and (bias.dtype != x.dtype or bias.shape != (weight.shape[0],)):
        raise ValueError(f"bias must be [{weight.shape[0]}] of x's dtype {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if _kernel is None:
        return reference.quantized_linear(x, weight.data, weight.format, bias)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=x.dtype)
    _kernel(flat, weight.data, TYPE_IDS[weight.format], None if bias is None else bias.contiguous(), out)
    return out.view(*x.shape[:-1], weight.shape[0])
