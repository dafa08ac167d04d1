"""dspark._C.small_batch_linear (the CPU model code's linear layer) against F.linear in fp32."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dspark.models import linear as linear_module
from dspark.models.linear import linear, small_batch_linear, uses_kernel

pytestmark = pytest.mark.skipif(linear_module._kernel is None, reason="dspark._C is not built")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Relative to the largest |output|: fp32 differs in summation order only; 16-bit outputs round once.
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def reference(x, weight, bias=None):
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def random_inputs(rows, k, n, x_dtype, w_dtype, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(x_dtype)
    weight = (torch.randn(n, k, generator=gen) / max(k, 1) ** 0.5).to(w_dtype)
    b = torch.randn(n, generator=gen).to(w_dtype) if bias else None
    return x, weight, b


def assert_close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = want.float().abs().max().clamp_min(1e-6)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= TOLERANCE[want.dtype], f"max error {err:.2e} relative to {scale:.2e}"


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 33])
def test_matches_reference_across_dtypes(x_dtype, w_dtype, rows):
    for k, n, bias in ((576, 97, False), (13, 8, True), (8, 1, True), (40, 33, False)):
        x, w, b = random_inputs(rows, k, n, x_dtype, w_dtype, bias, seed=rows * 1000 + k + n)
        assert_close(small_batch_linear(x, w, b), reference(x, w, b))


@pytest.mark.parametrize("w_dtype", DTYPES)
def test_batch_invariant_bit_for_bit(w_dtype):
    """Row i of a batch equals the same row computed alone: the property that makes greedy speculative
    decoding reproduce plain decoding exactly."""
    x, w, b = random_inputs(11, 200, 45, torch.bfloat16, w_dtype, True, seed=7)
    batch = small_batch_linear(x, w, b)
    for i in range(x.shape[0]):
        assert torch.equal(small_batch_linear(x[i:i + 1], w, b), batch[i:i + 1])
    assert torch.equal(small_batch_linear(x[3:9], w, b), batch[3:9])


def test_leading_dims_noncontiguous_and_empty():
    x, w, _ = random_inputs(12, 24, 10, torch.float32, torch.bfloat16, False, seed=3)
    x3 = x.view(3, 4, 24)
    assert_close(small_batch_linear(x3, w), reference(x, w).view(3, 4, 10))
    strided = x.t().contiguous().t()  # same values, column-major
    assert not strided.is_contiguous()
    assert_close(small_batch_linear(strided, w), reference(x, w))
    assert small_batch_linear(x[:0], w).shape == (0, 10)


def test_dispatch():
    w32, w16 = torch.randn(8, 16), torch.randn(8, 16).bfloat16()
    assert uses_kernel(torch.randn(3, 16), w32)
    assert not uses_kernel(torch.randn(linear_module.FP32_MAX_ROWS + 1, 16), w32)  # MKL's GEMM wins there
    many = torch.randn(500, 16).bfloat16()
    # bf16 prefills go to oneDNN's bf16 GEMM where the CPU has AVX512-BF16 / AMX; invariant calls never do
    assert uses_kernel(many, w16) != linear_module.fast_bf16_gemm()
    assert uses_kernel(many, w16, batch_invariant=True)
    assert uses_kernel(many[:1], w16)
    wide = torch.randn(8, linear_module.NARROW_IN_FEATURES + 1).bfloat16()
    assert uses_kernel(torch.randn(linear_module.DENSE_BF16_ROWS - 1, wide.shape[1]).bfloat16(), wide)
    assert uses_kernel(torch.randn(linear_module.DENSE_BF16_ROWS, wide.shape[1]).bfloat16(), wide) \
        != linear_module.fast_bf16_gemm()
    assert uses_kernel(many[:2], w16) != linear_module.fast_bf16_gemm()  # a narrow matrix: from 2 rows
    assert uses_kernel(many.float(), w16)  # mixed dtypes: the kernel
    trained = torch.randn(8, 16, requires_grad=True)
    assert not uses_kernel(torch.randn(3, 16), trained)  # autograd needs F.linear
    y = linear(torch.randn(3, 16), trained)
    y.sum().backward()
    assert trained.grad is not None
    x = torch.randn(2, 16).bfloat16()
    assert_close(linear(x, w16), F.linear(x.float(), w16.float()).bfloat16())


def test_bad_input_names_the_argument():
    x, w = torch.randn(2, 16), torch.randn(8, 15)
    with pytest.raises(ValueError, match="weight"):
        small_batch_linear(x, w)
    with pytest.raises(ValueError, match="bias"):
        small_batch_linear(x, torch.randn(8, 16), torch.randn(7))
    with pytest.raises(ValueError, match="bias"):
        small_batch_linear(x, torch.randn(8, 16), torch.randn(8).bfloat16())
    with pytest.raises(ValueError, match="x"):
        small_batch_linear(torch.randint(0, 3, (2, 16)), torch.randn(8, 16))


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


@pytest.mark.skipif("avx512_bf16" not in _cpu_flags() or os.environ.get("DSPARK_CPU_ARCH", "native") != "native",
                    reason="the AVX512-BF16 path is built (-march=native) only on CPUs that have it")
def test_bf16_path_sums_lanes_in_its_fixed_tree():
    """The AVX512-BF16 path ends every dot with the 16-lane tree ((l0+l8) + (l4+l12)) + ... (halves added
    256 -> 128 -> 64 -> 32 bits), reduced for four x rows at once. Lanes are set one product each (odd
    elements zero, x = 1) to values whose sum depends on the order; a row alone or among 2-4 must give the
    tree's float32 sum exactly (a left-to-right sum differs in a few percent of these dots)."""
    f = np.float32

    def tree(l):
        return f(f(f(f(l[0] + l[8]) + f(l[4] + l[12])) + f(f(l[2] + l[10]) + f(l[6] + l[14])))
                 + f(f(f(l[1] + l[9]) + f(l[5] + l[13])) + f(f(l[3] + l[11]) + f(l[7] + l[15]))))

    g = torch.Generator().manual_seed(1)
    values = torch.tensor([2.0 ** 25, -2.0 ** 25, 1.0, -1.0, 3.0, 2.0 ** 12, -2.0 ** 12, 0.5])
    x = torch.zeros(4, 32)
    x[:, 0::2] = 1.0
    w = torch.zeros(64, 32)
    w[:, 0::2] = values[torch.randint(0, len(values), (64, 16), generator=g)]
    x, w = x.bfloat16(), w.bfloat16()
    expected = torch.tensor([float(tree(row)) for row in w.float().numpy()[:, 0::2]]).bfloat16()
    for rows in (1, 2, 3, 4):
        y = small_batch_linear(x[:rows], w)
        assert torch.equal(y, expected.expand(rows, -1))
