"""Reference for `quantized_linear` (csrc/cpu/quantized_linear.h): GGUF block formats decoded in
PyTorch, the activations quantised per 32-block as the kernel does, and the product in float64.

Formats (32 weights a block, little-endian fp16 scales):
  q4_0: d, 16 bytes of nibbles          w = d * (q - 8)
  q4_1: d, m, 16 bytes of nibbles       w = d * q + m
  q8_0: d, 32 int8                      w = d * q
Byte i of the nibbles holds weight i in its low nibble and weight i + 16 in its high nibble.
"""

from __future__ import annotations

import torch

BLOCK = 32
FORMATS = {"q4_0": 18, "q4_1": 20, "q8_0": 34}  # bytes per block


def _fp16(data: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 at byte offset `at` of every block: data [..., blocks, bytes] -> [..., blocks] fp32."""
    return data[..., at:at + 2].contiguous().view(torch.float16)[..., 0].float()


def decode(data: torch.Tensor, fmt: str, in_features: int):
    """data uint8 [out, blocks * bytes] -> (integer codes [out, in] int32, d [out, blocks], m [out, blocks]
    or None), with w = d * codes (+ m) per block."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    blocks = in_features // BLOCK
    raw = data.reshape(data.shape[0], blocks, FORMATS[fmt])
    d = _fp16(raw, 0)
    if fmt == "q8_0":
        codes = raw[..., 2:].contiguous().view(torch.int8).int()
        return codes.reshape(data.shape[0], in_features), d, None
    nibbles = raw[..., 4:] if fmt == "q4_1" else raw[..., 2:]
    codes = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=-1).int()
    codes = codes.reshape(data.shape[0], in_features)
    if fmt == "q4_0":
        return codes - 8, d, None
    return codes, d, _fp16(raw, 2)


def dequantize(data: torch.Tensor, fmt: str, in_features: int) -> torch.Tensor:
    """fp32 [out, in]: what llama.cpp (and the gguf package) decode the blocks to."""
    codes, d, m = decode(data, fmt, in_features)
    w = codes.float().view(data.shape[0], -1, BLOCK) * d[..., None]
    if m is not None:
        w = w + m[..., None]
    return w.reshape(data.shape[0], in_features)


def quantize_activations(x: torch.Tensor):
    """x [rows, in] -> (codes int32 [rows, in], scale [rows, blocks], sums [rows, blocks]), fp32 as the
    kernel computes them: scale = max|x| / 127, codes = round-half-even(x * (127 / max|x|)), sums =
    scale * sum(codes) (the quantised block's sum). A block holding a NaN or inf gets scale NaN."""
    x = x.float()
    rows, in_features = x.shape
    blocks = x.view(rows, in_features // BLOCK, BLOCK)
    amax = blocks.abs().amax(-1)
    # Divisions in float64, rounded once to fp32: IEEE fp32 division, as the kernel's (torch's vectorised
    # scalar-by-tensor division multiplies by a reciprocal and can land an ulp away, moving a tie).
    ratio = (127.0 / amax.double()).float()  # inf for max|x| < ~3.7e-37: such a block quantises to zeros
    inverse = torch.where((amax > 0) & torch.isfinite(ratio), ratio, torch.zeros_like(amax))
    codes = torch.round(blocks * inverse[..., None]).clamp(-127, 127)
    finite = torch.isfinite(blocks).all(-1)
    codes = torch.where(finite[..., None], codes, torch.zeros_like(codes)).int()
    scale = torch.where(finite, (amax.double() / 127.0).float(), torch.full_like(amax, float("nan")))
    sums = scale * codes.sum(-1).float()
    return codes.reshape(rows, in_features), scale, sums


def quantized_linear(x: torch.Tensor, data: torch.Tensor, fmt: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [rows, out] in x's dtype: sum over blocks of d * scale * (integer dot) (+ m * block sum), in
    float64, plus bias."""
    in_features = x.shape[-1]
    codes, d, m = decode(data, fmt, in_features)
    xq, scale, sums = quantize_activations(x.reshape(-1, in_features))
    rows, out, blocks = xq.shape[0], codes.shape[0], in_features // BLOCK
    dots = torch.einsum("rbi,obi->rob", xq.view(rows, blocks, BLOCK).double(), codes.view(out, blocks, BLOCK).double())
    y = (dots * (d.double()[None] * scale.double()[:, None])).sum(-1)
    if m is not None:
        y = y + (m.double()[None] * sums.double()[:, None]).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*x.shape[:-1], out)


def error_bound(x: torch.Tensor, data: torch.Tensor, fmt: str) -> torch.Tensor:
    """|quantized_linear - x @ dequantize(W)^T| <= this [rows, out], from the activation rounding alone
    (y = W . xhat with |xhat - x| <= scale / 2 per element): per block (scale / 2) * sum |w|."""
    in_features = x.shape[-1]
    _, scale, _ = quantize_activations(x.reshape(-1, in_features))
    out, blocks = data.shape[0], in_features // BLOCK
    magnitude = dequantize(data, fmt, in_features).double().abs().view(out, blocks, BLOCK).sum(-1)
    return (scale.double()[:, None, :] / 2 * magnitude[None]).sum(-1)
