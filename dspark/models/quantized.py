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

from dspark.huge_pages import onto_huge_pages
from dspark.reference import quantized_linear as reference

TYPE_IDS = {"q4_0": 2, "q4_1": 3, "q8_0": 8}  # GGML's type ids, the kernel's format argument
PACKED_FORMAT = 0x100  # or-ed into a type id for the fused decoder layers: the weight is packed (kPackedFormat)

try:
    _kernel = importlib.import_module("dspark._C").quantized_linear
    _dequantize_kernel = importlib.import_module("dspark._C").dequantize_blocks
    _rows_kernel = importlib.import_module("dspark._C").dequantize_rows
    _tile_rows = int(importlib.import_module("dspark._C").quantized_tile_rows())
except (ImportError, AttributeError):  # the C++ extension is not built: the (slow) reference
    _kernel = _dequantize_kernel = _rows_kernel = _tile_rows = None
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def tile_rows() -> int | None:
    """Rows per tile of the kernel's packed layout in this build (16 with 512-bit VNNI, else 8), or None
    without the C++ extension (no packing then)."""
    return _tile_rows


class QuantizedWeight:
    """A [out_features, in_features] matrix as GGUF blocks: `data` uint8, either as the file stores it,
    [out, in / 32 * bytes], or packed for the CPU kernel (`pack()`: [tiles, in / 32, R * bytes], tiles of R =
    tile_rows() rows, csrc/cpu/quantized_linear.h): the same bytes per weight, no per-call transposition."""

    def __init__(self, data: torch.Tensor, fmt: str, in_features: int, out_features: int | None = None):
        if fmt not in TYPE_IDS:
            raise ValueError(f"format must be one of {sorted(TYPE_IDS)}, got {fmt!r}")
        if in_features % reference.BLOCK:
            raise ValueError(f"in_features must be a multiple of 32, got {in_features}")
        bytes_ = reference.FORMATS[fmt]
        row_bytes = in_features // reference.BLOCK * bytes_
        if data.dtype == torch.uint8 and data.dim() == 3:
            r = _tile_rows
            if r is None or out_features is None or out_features < 0:
                raise ValueError("packed data needs the C++ extension and out_features")
            expected = (-(-out_features // r), in_features // reference.BLOCK, r * bytes_)
            if tuple(data.shape) != expected:
                raise ValueError(f"packed data of {out_features} rows must be uint8 {expected}, got {tuple(data.shape)}")
        elif data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != row_bytes:
            raise ValueError(f"data must be uint8 [out, {row_bytes}] for {fmt} with {in_features} inputs, got "
                             f"{data.dtype} {tuple(data.shape)}")
        elif out_features is not None and out_features != data.shape[0]:
            raise ValueError(f"out_features {out_features} differs from data's {data.shape[0]} rows")
        self.data, self.format, self.in_features = data.contiguous(), fmt, in_features
        self.out_features = data.shape[0] if data.dim() == 2 else out_features

    @property
    def packed(self) -> bool:
        return self.data.dim() == 3

    @property
    def kernel_format(self) -> int:
        """The format id the fused C++ layers take for this weight (GGML's, with PACKED_FORMAT when packed)."""
        return TYPE_IDS[self.format] | (PACKED_FORMAT if self.packed else 0)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.format}, shape={self.shape}{', packed' if self.packed else ''})"

    def _split(self) -> tuple[int, int]:
        """(fp16 scales per block, 4-byte code chunks per block)."""
        scales = 2 if self.format == "q4_1" else 1
        return scales, (reference.FORMATS[self.format] - 2 * scales) // 4

    def pack(self) -> "QuantizedWeight":
        """This matrix in the kernel's packed layout (itself if packed already, or without the extension or
        off the CPU, where nothing reads that layout)."""
        if self.packed or _tile_rows is None or self.device.type != "cpu":
            return self
        return QuantizedWeight(self.packed_data(_tile_rows), self.format, self.in_features, self.out_features)

    def packed_data(self, tile_rows: int) -> torch.Tensor:
        """This file-layout matrix's bytes in the packed layout of tiles of `tile_rows` rows (what pack() stores
        with this build's tile_rows(); another build's for tests comparing builds): [tiles, in / 32, R * bytes]."""
        if self.packed:
            raise ValueError("packed_data takes a matrix in the file's layout")
        r, out, blocks = tile_rows, self.out_features, self.in_features // reference.BLOCK
        tiles = -(-out // r)
        rows = torch.zeros(tiles * r, self.data.shape[1], dtype=torch.uint8)
        rows[:out] = self.data
        scales, chunks = self._split()
        by_block = rows.view(tiles, r, blocks, -1)
        header = by_block[..., : 2 * scales].reshape(tiles, r, blocks, scales, 2).permute(0, 2, 3, 1, 4)
        codes = by_block[..., 2 * scales:].reshape(tiles, r, blocks, chunks, 4).permute(0, 2, 3, 1, 4)
        return torch.cat([header.reshape(tiles, blocks, -1), codes.reshape(tiles, blocks, -1)], dim=-1)

    def file_rows(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The selected rows (all by default) as the file stores them: uint8 [rows, in / 32 * bytes]."""
        if not self.packed:
            return self.data if index is None else self.data[index]
        r, blocks = _tile_rows, self.in_features // reference.BLOCK
        rows = torch.arange(self.out_features) if index is None else torch.as_tensor(index).reshape(-1)
        scales, chunks = self._split()
        tiles = self.data[rows // r]  # [n, blocks, R * bytes]
        lane = (rows % r).view(-1, 1, 1, 1, 1)
        header = tiles[..., : 2 * r * scales].reshape(len(rows), blocks, scales, r, 2)
        codes = tiles[..., 2 * r * scales:].reshape(len(rows), blocks, chunks, r, 4)
        header = header.gather(3, lane.expand(-1, blocks, scales, 1, 2)).squeeze(3)
        codes = codes.gather(3, lane.expand(-1, blocks, chunks, 1, 4)).squeeze(3)
        out = torch.cat([header.reshape(len(rows), blocks, -1), codes.reshape(len(rows), blocks, -1)], dim=-1)
        out = out.reshape(len(rows), -1)
        return out if index is None else out.view(*torch.as_tensor(index).shape, -1)

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
        """The matrix of the selected rows (a permutation or a subset), as the file stores them."""
        return QuantizedWeight(self.file_rows(index), self.format, self.in_features)

    @staticmethod
    def cat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """Rows stacked (fused projections): same format and input width required."""
        if len({(p.format, p.in_features) for p in parts}) != 1:
            raise ValueError("only weights of one format and input width can be stacked")
        return QuantizedWeight(torch.cat([p.file_rows() for p in parts]), parts[0].format, parts[0].in_features)

    @staticmethod
    def onto_huge_pages(weights: list["QuantizedWeight"]) -> list["QuantizedWeight"]:
        """The weights with their blocks copied into one mapping on huge pages (dspark.huge_pages), the same
        bytes; each one that did not move comes back as it is."""
        moved = onto_huge_pages([w.data for w in weights])
        return [w if data is w.data else QuantizedWeight(data, w.format, w.in_features, w.out_features)
                for w, data in zip(weights, moved)]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [out, in] matrix (dspark._C.dequantize_blocks on the CPU: the reference's values,
        rounded to `dtype`)."""
        if _dequantize_kernel is None or self.device.type != "cpu" or dtype not in _FLOATS:
            return reference.dequantize(self.file_rows(), self.format, self.in_features).to(dtype)
        out = torch.empty(self.shape, dtype=dtype)
        _dequantize_kernel(self.data, TYPE_IDS[self.format], out)
        return out

    def embedding(self, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `tokens` decoded: an embedding lookup (dspark._C.dequantize_rows on the CPU, from either layout in
        one call: picking a row out of packed tiles with torch ops took ~10 of them, ~45 us a batch-1 round)."""
        if _rows_kernel is None or self.device.type != "cpu" or dtype not in _FLOATS:
            picked = self.file_rows(tokens.reshape(-1))
            return reference.dequantize(picked, self.format, self.in_features).to(dtype).view(*tokens.shape,
                                                                                              self.in_features)
        ids = tokens.reshape(-1).long().contiguous()
        out = torch.empty(ids.shape[0], self.in_features, dtype=dtype)
        _rows_kernel(self.data, TYPE_IDS[self.format], self.out_features, ids, out)
        return out.view(*tokens.shape, self.in_features)


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
        return reference.quantized_linear(x, weight.file_rows(), weight.format, bias)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=x.dtype)
    _kernel(flat, weight.data, TYPE_IDS[weight.format], None if bias is None else bias.contiguous(), out)
    return out.view(*x.shape[:-1], weight.shape[0])
