"""y = x W^T + b for the model code, with the CPU's few-row steps on `dspark._C.small_batch_linear`.

A decoding step multiplies 1 row, a verification step a few; on a CPU that is bound by streaming W,
but BLAS re-reads W through a packed GEMM from 2 rows on, and bf16 GEMMs without AVX512-BF16 run row
by row: measured on the 2-core AVX2 EPYC we develop on (bf16, SmolLM2's 49,152 x 576 LM head), 1 / 8 /
64 rows take 4.1 / 32 / 218 ms with F.linear and 4.0 / 9.0 / 52 ms with the kernel. The kernel is batch
invariant (a row's result does not depend on the other rows), so verifying k tokens reproduces the
logits of decoding them one by one bit for bit.

fp32 weights use the kernel up to FP32_MAX_ROWS rows only: past that MKL's GEMM is as fast or faster;
bf16 ones up to DENSE_BF16_ROWS rows (2 for narrow matrices) where the CPU has AVX512-BF16 or AMX
(oneDNN's bf16 GEMM then wins).
Batch-invariant calls (decoding and verification rounds) keep the kernel at any row count.
GGUF block weights (QuantizedWeight) take the batch-invariant integer kernel, except in rounds of
DENSE_GEMM_ROWS rows or more that need no batch invariance (prefills): there the blocks are decoded
(one pass over the matrix) and a dense GEMM runs, bf16 where the CPU has AVX512-BF16 or AMX, else fp32.
Measured on the 2-vCPU EPYC (Zen 4, AVX512-BF16), SmolLM2's Q4_1 gate/up projection at 150 rows: 6.1 ms
in the integer kernel, 1.5 ms in F.linear's bf16 GEMM.
Autograd (drafter training) always takes F.linear. The reference is F.linear itself; both accumulate
in fp32 and round once, so they differ by rounding only.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from dspark.models.quantized import QuantizedWeight, quantized_linear

FP32_MAX_ROWS = 16
DENSE_GEMM_ROWS = 32
# Where the CPU multiplies bf16 natively, oneDNN's bf16 GEMM overtakes the kernel from about 12 rows for
# the matrices of these models (in_features 576-1536), and from 2 rows for narrow ones (a drafter's
# low-rank head, in_features 64). Measured on the 2-vCPU EPYC (Zen 4), F.linear / kernel time: SmolLM2's
# 16,385-row draft-vocabulary head 0.86 at 12 rows, 0.55 at 28; a 64-wide 16,385-row matrix 0.53 at 2 rows,
# 0.17 at 28.
DENSE_BF16_ROWS = 12
NARROW_IN_FEATURES = 128
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)

try:
    _kernel = importlib.import_module("dspark._C").small_batch_linear
except (ImportError, AttributeError):  # the C++ extension is not built: F.linear everywhere
    _kernel = None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them (none where it cannot be read), read once."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def fast_bf16_gemm(flags: frozenset[str] | None = None) -> bool:
    """Whether this CPU (or one with these flags) multiplies bf16 matrices natively (AVX512-BF16 or AMX), which
    oneDNN then uses."""
    flags = cpu_flags() if flags is None else flags
    return "avx512_bf16" in flags or "amx_bf16" in flags


def dense_gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a dense GEMM over GGUF blocks decoded for x runs in: x's if fp32, or bf16 where the CPU
    multiplies it natively; fp32 otherwise."""
    return x.dtype if x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and fast_bf16_gemm()) else torch.float32


def uses_kernel(x: torch.Tensor, weight: torch.Tensor, batch_invariant: bool = False) -> bool:
    if x.dim() == 0 or x.shape[-1] == 0:
        return False
    return (x.device.type == "cpu" and kernel_takes(x.numel() // x.shape[-1], x.dtype, weight, batch_invariant)
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def kernel_takes(rows: int, x_dtype: torch.dtype, weight: torch.Tensor, batch_invariant: bool = False) -> bool:
    """Whether linear() gives `rows` rows of x_dtype (CPU, no autograd) to small_batch_linear over this dense
    weight. Calls that ask for no batch invariance (prefills, drafters) go to F.linear past FP32_MAX_ROWS rows
    of fp32 weights, and from DENSE_BF16_ROWS (2 for narrow matrices) of bf16 ones where the CPU runs bf16
    GEMMs natively."""
    least = 2 if weight.shape[-1] <= NARROW_IN_FEATURES else DENSE_BF16_ROWS
    dense_gemm = (rows >= least and x_dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
                  and fast_bf16_gemm())
    return (_kernel is not None and weight.device.type == "cpu" and x_dtype in _FLOATS and weight.dtype in _FLOATS
            and weight.dim() == 2
            and (batch_invariant or (rows <= FP32_MAX_ROWS if weight.dtype == torch.float32 else not dense_gemm)))


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel itself, on CPU tensors of any float dtypes: x [..., in], weight [out, in], bias [out]
    (weight's dtype); the result has x's dtype."""
    if _kernel is None:
        raise RuntimeError("dspark._C is not built; install the package to build the C++ kernels")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., {weight.shape[-1] if weight.dim() == 2 else '?'}] and weight [out, in] expected, "
                         f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if bias is not None and (bias.dtype != weight.dtype or bias.shape != (weight.shape[0],)):
        raise ValueError(f"bias must be [{weight.shape[0]}] of weight's dtype {weight.dtype}, "
                         f"got {tuple(bias.shape)} {bias.dtype}")
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=x.dtype)
    _kernel(flat, weight.contiguous(), None if bias is None else bias.contiguous(), out)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
           batch_invariant: bool = False, row_stable: bool = False) -> torch.Tensor:
    """batch_invariant: keep fp32 weights on the kernel past FP32_MAX_ROWS too, so that a row's result
    never depends on how many rows share the call (MKL's GEMM blocks by the row count). A
    QuantizedWeight (GGUF blocks) takes quantized_linear, batch invariant at any row count, unless the
    call has DENSE_GEMM_ROWS rows or more and asks for no batch invariance (then: decoded, dense GEMM).
    row_stable (prefills that must not depend on batching, batch_invariant False): every row through
    the same dense GEMM shape whatever the row count (row_stable_linear); without autograd."""
    if row_stable and not batch_invariant:
        return row_stable_linear(x, weight, bias)
    if isinstance(weight, QuantizedWeight):
        rows = x.numel() // max(x.shape[-1], 1)
        if batch_invariant or rows < DENSE_GEMM_ROWS or x.device.type != "cpu":
            return quantized_linear(x, weight, bias)
        dense = dense_gemm_dtype(x)
        y = F.linear(x.to(dense), weight.dequantize(dense), None if bias is None else bias.to(dense))
        return y.to(x.dtype)
    if uses_kernel(x, weight, batch_invariant):
        return small_batch_linear(x, weight, bias)
    return F.linear(x, weight, bias)


ROW_STABLE_ROWS = 128


@torch.inference_mode()
def row_stable_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b with each row's result depending on that row alone: dense GEMMs over chunks of exactly
    ROW_STABLE_ROWS rows, the last zero-padded, so that every row goes through one GEMM shape whatever the
    row count (oneDNN's and MKL's GEMMs pick their blocking, and for some shapes the order of the sums, by
    the row count: measured on an AVX512-BF16 Xeon, 3 of 45 rows of a 576 x 1536 bf16 product changed
    between 45 and 370 rows). For prefills as fast as one GEMM over all rows, where the few-row kernels
    would take many times longer; a QuantizedWeight is decoded once per call."""
    if isinstance(weight, QuantizedWeight):
        dense = dense_gemm_dtype(x)
        weight, bias = weight.dequantize(dense), None if bias is None else bias.to(dense)
    flat = x.reshape(-1, x.shape[-1]).to(weight.dtype)
    rows = flat.shape[0]
    padded = -(-rows // ROW_STABLE_ROWS) * ROW_STABLE_ROWS
    if padded != rows:
        flat = torch.cat([flat, flat.new_zeros(padded - rows, flat.shape[1])])
    out = torch.cat([F.linear(chunk, weight, bias) for chunk in flat.split(ROW_STABLE_ROWS)])
    return out[:rows].to(x.dtype).view(*x.shape[:-1], weight.shape[0])
