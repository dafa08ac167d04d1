"""quantized_linear (GGUF Q4_0 / Q4_1 / Q8_0 blocks read in place) against its references, on fresh
random blocks: the block decoding against the gguf package's; the kernel against the PyTorch
reference of its own arithmetic (activations quantised per block, integer dots) to fp32 rounding; and
against dequantise-then-matmul in fp32 within the bound the activation rounding implies. Batch
invariance bit for bit, NaN isolation, and errors naming the argument."""

from __future__ import annotations

import itertools
import pathlib
import shutil
import subprocess
import zlib

import numpy as np
import pytest
import torch

from dspark.models.linear import linear
from dspark.models.quantized import TYPE_IDS, QuantizedWeight, quantized_linear, tile_rows
from dspark.reference import quantized_linear as ref

_C = pytest.importorskip("dspark._C")
FORMATS = ("q4_0", "q4_1", "q8_0")
X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cpu_flags() -> set[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


CPU_FLAGS = _cpu_flags()


def random_blocks(fmt: str, out: int, in_features: int, seed: int) -> torch.Tensor:
    """uint8 [out, blocks * bytes] with random codes and fp16 scales (and mins) of both signs."""
    g = torch.Generator().manual_seed(seed)
    blocks = in_features // 32
    d = (torch.rand(out, blocks, generator=g) * 0.02 + 0.001) * (torch.randint(0, 2, (out, blocks), generator=g) * 2 - 1)
    parts = [d.half().view(torch.uint8).view(out, blocks, 2)]
    if fmt == "q4_1":
        m = torch.randn(out, blocks, generator=g) * 0.05
        parts.append(m.half().view(torch.uint8).view(out, blocks, 2))
    if fmt == "q8_0":
        parts.append(torch.randint(-128, 128, (out, blocks, 32), generator=g, dtype=torch.int8).view(torch.uint8))
    else:
        parts.append(torch.randint(0, 256, (out, blocks, 16), generator=g, dtype=torch.int32).to(torch.uint8))
    return torch.cat(parts, dim=-1).reshape(out, -1).contiguous()


def random_x(rows: int, in_features: int, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=g) * 3 + 0.1
    return (torch.randn(rows, in_features, generator=g) * scale).to(dtype)


def kernel(x, data, fmt, bias=None):
    return quantized_linear(x, QuantizedWeight(data, fmt, x.shape[-1]), bias)


@pytest.mark.parametrize("fmt", FORMATS)
def test_block_decoding_matches_the_gguf_package(fmt):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data = random_blocks(fmt, 9, 96, seed=1)
    theirs = dequantize(data.numpy(), GGMLQuantizationType[fmt.upper()])
    ours = ref.dequantize(data, fmt, 96)
    assert torch.equal(ours, torch.from_numpy(np.asarray(theirs, dtype=np.float32)).reshape(9, 96))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", X_DTYPES)
@pytest.mark.parametrize("rows, in_features, out", [(1, 32, 1), (1, 576, 64), (3, 96, 7), (5, 1536, 33),
                                                    (8, 576, 50), (16, 64, 9), (17, 128, 12)])
def test_kernel_matches_its_reference(fmt, dtype, rows, in_features, out):
    seed = zlib.crc32(repr((fmt, rows, in_features, out)).encode()) % 10_000
    data = random_blocks(fmt, out, in_features, seed)
    x = random_x(rows, in_features, dtype, seed + 1)
    bias = torch.randn(out, generator=torch.Generator().manual_seed(seed)).to(dtype)
    got = kernel(x, data, fmt, bias).double()
    want = ref.quantized_linear(x, data, fmt, bias).double()
    # fp32 lane sums against float64: a few ulps of the sum of |terms| (at most 48 blocks here), then one
    # rounding to the output dtype.
    xq, scale, sums = ref.quantize_activations(x)
    codes, d, m = ref.decode(data, fmt, in_features)
    blocks = in_features // 32
    terms = torch.einsum("rbi,obi->rob", xq.double().abs().view(rows, blocks, 32),
                         codes.double().abs().view(out, blocks, 32)) * (d.double().abs()[None] * scale.double()[:, None])
    magnitude = terms.sum(-1) + (0 if m is None else (m.double().abs()[None] * sums.double().abs()[:, None]).sum(-1))
    ulp = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    assert ((got - want).abs() <= magnitude * 4e-6 + want.abs() * ulp + 1e-30).all()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 4, 11])
def test_kernel_within_the_activation_rounding_bound_of_fp32_matmul(fmt, rows):
    in_features, out = 576, 40
    data = random_blocks(fmt, out, in_features, seed=rows)
    x = random_x(rows, in_features, torch.float32, seed=rows + 7)
    exact = x.double() @ ref.dequantize(data, fmt, in_features).double().T
    got = kernel(x, data, fmt).double()
    bound = ref.error_bound(x, data, fmt)
    assert ((got - exact).abs() <= bound * 1.0001 + exact.abs() * 1e-5 + 1e-5).all()
    assert (got - exact).abs().max() > 0  # the activations were quantised: not a dense matmul in disguise
    # The bound is tight enough to mean something: the typical error is a fair fraction of it.
    assert float(((got - exact).abs() / bound).max()) > 0.05


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariance(fmt, dtype):
    data = random_blocks(fmt, 70, 576, seed=3)
    x = random_x(16, 576, dtype, seed=4)
    alone = torch.cat([kernel(x[i:i + 1], data, fmt) for i in range(16)])
    for rows in (2, 3, 5, 8, 13, 16):
        together = kernel(x[:rows], data, fmt)
        assert torch.equal(together, alone[:rows]), rows
    shuffled = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kernel(x[shuffled], data, fmt), alone[shuffled])


def test_a_nan_row_poisons_only_itself():
    data = random_blocks("q4_1", 20, 96, seed=5)
    x = random_x(4, 96, torch.float32, seed=6)
    clean = kernel(x, data, "q4_1")
    x[2, 40] = float("nan")
    dirty = kernel(x, data, "q4_1")
    assert torch.isnan(dirty[2]).all()
    assert torch.equal(dirty[[0, 1, 3]], clean[[0, 1, 3]])


def test_linear_dispatches_and_weight_helpers():
    data = random_blocks("q8_0", 12, 64, seed=8)
    weight = QuantizedWeight(data, "q8_0", 64)
    x = random_x(3, 64, torch.float32, seed=9)
    assert torch.equal(linear(x, weight), kernel(x, data, "q8_0"))
    order = torch.tensor([3, 1, 0, 2, 11, 10, 9, 8, 7, 6, 5, 4])
    assert torch.equal(weight.rows(order).dequantize(), weight.dequantize()[order])
    both = QuantizedWeight.cat([weight, weight.rows(order[:5])])
    assert both.shape == (17, 64) and torch.equal(both.dequantize()[12:], weight.dequantize()[order[:5]])
    tokens = torch.tensor([[4, 0], [11, 4]])
    assert torch.equal(weight.embedding(tokens, torch.float32), weight.dequantize()[tokens])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", X_DTYPES)
def test_dequantize_kernel_matches_the_reference(fmt, dtype):
    """dequantize_blocks: the reference's fp32 values exactly, rounded to nearest even in bf16 / fp16."""
    data = random_blocks(fmt, 37, 160, seed=21)
    ours = QuantizedWeight(data, fmt, 160).dequantize(dtype)
    assert ours.dtype == dtype and ours.shape == (37, 160)
    assert torch.equal(ours, ref.dequantize(data, fmt, 160).to(dtype))
    tokens = torch.tensor([[3, 0, 36], [3, 17, 5]])  # an embedding lookup: the same rows, any token shape
    looked_up = QuantizedWeight(data, fmt, 160).embedding(tokens, dtype)
    assert looked_up.shape == (2, 3, 160) and torch.equal(looked_up, ours[tokens])


@pytest.mark.skipif(tile_rows() is None, reason="dspark._C is not built")
@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_rows_from_either_layout_match_the_reference(fmt):
    """dequantize_rows (embedding lookups): any picked rows, repeated, the last of a partial tile, few (one thread)
    or many (several), from the file's layout and from packed tiles: the reference's rows, rounded to the dtype;
    ids outside the matrix, and shapes that do not fit, are refused by name."""
    from dspark import _C

    r = tile_rows()
    out, in_features = 3 * r + 5, 160
    data = random_blocks(fmt, out, in_features, seed=31)
    dense = ref.dequantize(data, fmt, in_features)
    gen = torch.Generator().manual_seed(32)
    for ids in (torch.tensor([out - 1]), torch.tensor([0, out - 1, 7, 7, r]),
                torch.randint(0, out, (600,), generator=gen)):
        for weight in (QuantizedWeight(data, fmt, in_features), QuantizedWeight(data, fmt, in_features).pack()):
            for dtype in X_DTYPES:
                got = weight.embedding(ids, dtype)
                assert got.dtype == dtype and torch.equal(got, dense[ids].to(dtype)), (weight.packed, dtype)
    packed = QuantizedWeight(data, fmt, in_features).pack()
    assert packed.embedding(torch.zeros(0, dtype=torch.long), torch.float32).shape == (0, in_features)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, %d\), got %d" % (out, out)):
        packed.embedding(torch.tensor([1, out]), torch.float32)
    with pytest.raises(ValueError, match="got -1"):
        packed.embedding(torch.tensor([-1]), torch.float32)
    with pytest.raises(ValueError, match="rows must be Long"):
        _C.dequantize_rows(packed.data, TYPE_IDS[fmt], out, torch.tensor([1], dtype=torch.int32),
                           torch.empty(1, in_features))
    with pytest.raises(ValueError, match="out must be"):
        _C.dequantize_rows(packed.data, TYPE_IDS[fmt], out, torch.tensor([1]), torch.empty(2, in_features))
    with pytest.raises(ValueError, match="a packed weight of"):
        _C.dequantize_rows(packed.data, TYPE_IDS[fmt], out + r, torch.tensor([1]), torch.empty(1, in_features))


def blocks_with_special_scales(fmt: str, out: int, in_features: int, seed: int) -> torch.Tensor:
    """random_blocks with ~30% of the scales (and Q4_1's mins) NaN (any payload), infinite, subnormal, signed
    zeros or fp16's largest."""
    data = random_blocks(fmt, out, in_features, seed).view(out, in_features // 32, -1)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 6e-8, -3e-5, 0.0, -0.0, 65504.0, 1.0 / 3]).half()
    # NaNs whose payload is all ones: rounding them as numbers would carry into the sign (a zero, not a NaN).
    special = torch.cat([special, torch.tensor([0x7FFF, -1], dtype=torch.int16).view(torch.float16)])
    g = torch.Generator().manual_seed(seed + 1)
    for field in range(2 if fmt == "q4_1" else 1):  # d, then m
        picks = special[torch.randint(0, len(special), (out, in_features // 32), generator=g)]
        chosen = torch.rand(out, in_features // 32, generator=g) < 0.3
        halves = data[..., 2 * field: 2 * field + 2].contiguous().view(torch.float16).squeeze(-1)
        data[..., 2 * field: 2 * field + 2] = torch.where(chosen, picks, halves).unsqueeze(-1).view(torch.uint8)
    return data.reshape(out, -1).contiguous()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", X_DTYPES)
def test_dequantize_kernel_on_special_scales(fmt, dtype):
    """Special scales over enough rows for the threads to split them: the kernel's vector lanes (fp32, bf16) and
    scalar code (fp16) give the reference's values, NaN exactly where it has NaN (d = inf times a zero code
    is one)."""
    data = blocks_with_special_scales(fmt, 300, 256, seed=24)
    ours = QuantizedWeight(data, fmt, 256).dequantize(dtype)
    expected = ref.dequantize(data, fmt, 256).to(dtype)
    nan = expected.isnan()
    assert nan.any() and torch.equal(ours.isnan(), nan)
    assert torch.equal(ours[~nan], expected[~nan])


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
@pytest.mark.parametrize("march", ["x86-64-v2", "x86-64-v3", "x86-64-v4", "cooperlake"])
def test_dequantize_builds_match_the_extension_bit_for_bit(tmp_path, march):
    """dequantize_blocks built portable (x86-64-v2), with AVX2 lanes (x86-64-v3), with AVX-512 lanes rounding
    to bf16 in integer code (x86-64-v4) or by AVX512-BF16's conversion (cooperlake): the extension's bytes,
    NaN payloads included."""
    needs = {"x86-64-v4": {"avx512f", "avx512bw"}, "cooperlake": {"avx512f", "avx512bw", "avx512_bf16"}}
    if not CPU_FLAGS >= needs.get(march, set()):
        pytest.skip(f"this CPU cannot run a {march} build")
    root = pathlib.Path(__file__).resolve().parents[1]
    binary = tmp_path / "dequantize_cli"
    compile_ = subprocess.run(["g++", "-std=c++17", "-O2", "-fopenmp", f"-march={march}", f"-I{root / 'csrc'}",
                               str(root / "csrc/cpu/tests/dequantize_cli.cpp"),
                               str(root / "csrc/cpu/dequantize_blocks.cpp"), "-o", str(binary)],
                              capture_output=True, text=True)
    assert compile_.returncode == 0, compile_.stderr
    for fmt, (dtype, dtype_id) in itertools.product(FORMATS, ((torch.float32, 0), (torch.bfloat16, 2))):
        data = blocks_with_special_scales(fmt, 40, 96, seed=26)
        data.numpy().tofile(tmp_path / "w.u8")
        run = subprocess.run([str(binary), str(TYPE_IDS[fmt]), "40", "96", str(dtype_id), str(tmp_path / "w.u8"),
                              str(tmp_path / "y.bin")], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        theirs = torch.from_numpy(np.fromfile(tmp_path / "y.bin", dtype=np.uint8))
        ours = QuantizedWeight(data, fmt, 96).dequantize(dtype).view(torch.uint8).flatten()
        assert torch.equal(theirs, ours), (fmt, dtype)


@pytest.mark.parametrize("dtype", X_DTYPES)
def test_many_rows_without_invariance_take_a_dense_gemm(dtype):
    """From DENSE_GEMM_ROWS rows, unless batch invariance is asked for, linear() decodes the blocks and runs
    a dense GEMM: close to fp32 dequantise-then-matmul (closer than the int8-activation kernel), while
    the invariant call still equals the kernel bit for bit."""
    from dspark.models.linear import DENSE_GEMM_ROWS

    data, bias = random_blocks("q4_1", 48, 256, seed=22), torch.randn(48).to(dtype)
    weight = QuantizedWeight(data, "q4_1", 256)
    x = random_x(DENSE_GEMM_ROWS + 5, 256, dtype, seed=23)
    exact = x.double() @ ref.dequantize(data, "q4_1", 256).double().T + bias.double()
    dense, invariant = linear(x, weight, bias), linear(x, weight, bias, batch_invariant=True)
    assert dense.dtype == dtype and torch.equal(invariant, kernel(x, data, "q4_1", bias))
    assert not torch.equal(dense, invariant)
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    scale = exact.abs().max()
    assert (dense.double() - exact).abs().max() / scale < tolerance
    assert (dense.double() - exact).abs().mean() < (invariant.double() - exact).abs().mean()
    few = x[: DENSE_GEMM_ROWS - 1]
    assert torch.equal(linear(few, weight, bias), kernel(few, data, "q4_1", bias))  # below the threshold: the kernel


@pytest.mark.skipif(tile_rows() is None, reason="dspark._C is not built")
@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_layout_gives_the_file_layouts_results(fmt):
    """QuantizedWeight.pack(): the kernel's packed tiles (last one padded) hold the same matrix: the file's rows come
    back from it byte for byte (all, or picked), and quantized_linear (every row count of the one-pass and the
    chunked paths, with bias), dequantize and embedding lookups give the file layout's results bit for bit."""
    r = tile_rows()
    for out, in_features in ((1, 64), (r - 1, 96), (r, 160), (r + 1, 96), (5 * r + 3, 256)):
        data = random_blocks(fmt, out, in_features, seed=out)
        file, packed = QuantizedWeight(data, fmt, in_features), QuantizedWeight(data, fmt, in_features).pack()
        assert packed.packed and packed.shape == file.shape and packed.pack() is packed
        assert packed.data.shape == (-(-out // r), in_features // 32, r * ref.FORMATS[fmt])
        assert torch.equal(packed.file_rows(), data)
        picked = torch.tensor([out - 1, 0, out // 2, out - 1])
        assert torch.equal(packed.file_rows(picked), data[picked]) and torch.equal(packed.rows(picked).data, data[picked])
        gen = torch.Generator().manual_seed(out)
        bias = torch.randn(out, generator=gen).bfloat16()
        for rows in (1, 2, 3, 5, 8, 9, 13, 20):
            x = torch.randn(rows, in_features, generator=gen).bfloat16()
            assert torch.equal(quantized_linear(x, packed, bias), quantized_linear(x, file, bias)), (out, rows)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert torch.equal(packed.dequantize(dtype), file.dequantize(dtype))
        tokens = torch.tensor([[0, out - 1], [out // 2, 0]])
        assert torch.equal(packed.embedding(tokens, torch.float32), file.embedding(tokens, torch.float32))
        both = QuantizedWeight.cat([packed, file])
        assert not both.packed and torch.equal(both.data, torch.cat([data, data]))


@pytest.mark.skipif(tile_rows() is None, reason="dspark._C is not built")
def test_packed_shapes_are_checked():
    from dspark import _C
    r = tile_rows()
    data = random_blocks("q4_1", 2 * r, 64, seed=5)
    packed = QuantizedWeight(data, "q4_1", 64).pack()
    with pytest.raises(ValueError, match="packed data of 7 rows"):
        QuantizedWeight(packed.data, "q4_1", 64, 7)
    with pytest.raises(ValueError, match="out_features"):
        QuantizedWeight(packed.data, "q4_1", 64)
    with pytest.raises(ValueError, match="a packed weight of 7 rows"):
        _C.quantized_linear(torch.randn(1, 64), packed.data, TYPE_IDS["q4_1"], None, torch.empty(1, 7))
    with pytest.raises(ValueError, match="a packed weight"):
        _C.dequantize_blocks(packed.data, TYPE_IDS["q8_0"], torch.empty(2 * r, 64))


def test_bad_arguments_name_themselves():
    data = random_blocks("q4_0", 4, 64, seed=2)
    with pytest.raises(ValueError, match="format"):
        QuantizedWeight(data, "q5_k", 64)
    with pytest.raises(ValueError, match="data must be uint8"):
        QuantizedWeight(data[:, :-1], "q4_0", 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantizedWeight(data, "q4_0", 48)
    weight = QuantizedWeight(data, "q4_0", 64)
    with pytest.raises(ValueError, match=r"x \[\.\.\., 64\]"):
        quantized_linear(torch.randn(2, 32), weight)
    with pytest.raises(ValueError, match="bias"):
        quantized_linear(torch.randn(2, 64), weight, torch.randn(3))
    with pytest.raises(ValueError, match="format"):
        _C.quantized_linear(torch.randn(2, 64), data, 7, None, torch.empty(2, 4))
    with pytest.raises(ValueError, match="blocks"):
        _C.quantized_linear(torch.randn(2, 64), data, TYPE_IDS["q4_1"], None, torch.empty(2, 4))
    with pytest.raises(ValueError, match="weight holds 4 rows but out has 3"):
        _C.dequantize_blocks(data, TYPE_IDS["q4_0"], torch.empty(3, 64))
    with pytest.raises(ValueError, match="weight holds 4 rows but out has 5"):
        _C.quantized_linear(torch.randn(2, 64), data, TYPE_IDS["q4_0"], None, torch.empty(2, 5))
    with pytest.raises(ValueError, match="blocks"):
        _C.dequantize_blocks(data, TYPE_IDS["q8_0"], torch.empty(4, 64))
    with pytest.raises(ValueError, match="out must be float32"):
        _C.dequantize_blocks(data, TYPE_IDS["q4_0"], torch.empty(4, 64, dtype=torch.int32))


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
@pytest.mark.parametrize("march", ["x86-64-v2", "x86-64-v3", "x86-64-v4", "icelake-server"])
def test_other_builds_match_the_extension_bit_for_bit(tmp_path, march):
    """Without AVX2 (x86-64-v2) the kernel runs the same lanes in plain C++; with AVX2 but no AVX512-VNNI
    (x86-64-v3, x86-64-v4) its integer dots take maddubs/madd over tiles of 8 W rows and Q8_0 its sign form;
    with AVX512-VNNI at 512 bits (icelake-server) tiles of 16 rows and dpbusd: same results, bit for bit, as
    the extension's build for this machine."""
    if march in ("x86-64-v4", "icelake-server") and not CPU_FLAGS >= {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}:
        pytest.skip(f"this CPU cannot run a {march} build")
    root = pathlib.Path(__file__).resolve().parents[1]
    binary = tmp_path / "quantized_linear_cli"
    compile_ = subprocess.run(["g++", "-std=c++17", "-O2", "-fopenmp", "-ffp-contract=fast", f"-march={march}",
                               f"-I{root / 'csrc'}", str(root / "csrc/cpu/tests/quantized_linear_cli.cpp"),
                               str(root / "csrc/cpu/quantized_linear.cpp"), "-o", str(binary)],
                              capture_output=True, text=True)
    assert compile_.returncode == 0, compile_.stderr
    build_tile_rows = int(subprocess.run([str(binary), "tile-rows"], capture_output=True, text=True, check=True).stdout)
    assert build_tile_rows == (16 if march == "icelake-server" else 8)
    # Rows 1, 5, 9: each block used as it is prepared, or chunks of prepared blocks swept in passes of x rows
    # (which path depends on the build: up to 8 rows fused with AVX-512, 2 without); 13 and 37 outputs: a
    # partial tile of W rows alone, and after whole tiles. The weights in the file's layout, and packed in that
    # build's tiles (QuantizedWeight.packed_data) against the extension's own packing.
    for fmt, rows, out, packed in itertools.product(FORMATS, (1, 5, 9), (13, 37), (False, True)):
        in_features = 96
        data = random_blocks(fmt, out, in_features, seed=11)
        x = random_x(rows, in_features, torch.float32, seed=12)
        weight = QuantizedWeight(data, fmt, in_features)
        x.numpy().tofile(tmp_path / "x.f32")
        (weight.packed_data(build_tile_rows) if packed else data).numpy().tofile(tmp_path / "w.u8")
        run = subprocess.run([str(binary), str(TYPE_IDS[fmt]), str(rows), str(in_features), str(out),
                              str(tmp_path / "x.f32"), str(tmp_path / "w.u8"), str(tmp_path / "y.f32")]
                             + (["packed"] if packed else []), capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        other = torch.from_numpy(np.fromfile(tmp_path / "y.f32", dtype=np.float32)).view(rows, out)
        ours = quantized_linear(x, weight.pack()) if packed else kernel(x, data, fmt)
        assert torch.equal(other, ours), (fmt, rows, out, packed)


def test_blocks_too_small_for_a_finite_scale_quantise_to_zeros():
    data = random_blocks("q8_0", 6, 64, seed=13)
    x = torch.randn(2, 64)
    x[0, :32] = torch.randn(32) * 1e-38  # 127 / max|x| overflows
    got = kernel(x, data, "q8_0")
    want = ref.quantized_linear(x, data, "q8_0")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    xq, _, _ = ref.quantize_activations(x)
    assert (xq[0, :32] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_q8_0_writer_matches_the_gguf_package(dtype):
    """from_dense writes what ggml's Q8_0 quantizer writes, byte for byte: halves of a scale round away from
    zero, an all-zero block gets d = 0, and the blocks decode to within half a step of each weight."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    gen = torch.Generator().manual_seed(17)
    weight = (torch.randn(40, 160, generator=gen) * 0.05).to(dtype)
    weight[3, :32] = 0
    weight[5, 32:64] = torch.arange(32) - 15.5  # scaled codes land on halves
    theirs = quantize(weight.float().numpy(), GGMLQuantizationType.Q8_0)
    ours = QuantizedWeight.from_dense(weight)
    assert ours.shape == (40, 160) and ours.format == "q8_0"
    assert torch.equal(ours.data, torch.from_numpy(np.asarray(theirs)))
    decoded = ref.dequantize(ours.data, "q8_0", 160)
    d = weight.float().view(40, 5, 32).abs().amax(-1, keepdim=True) / 127
    bound = d / 2 + 127 * (d.half().float() - d).abs()  # half a step, plus fp16's rounding of d over 127 codes
    assert ((decoded - weight.float()).view(40, 5, 32).abs() <= bound * 1.0001).all()


def test_q8_0_writer_rejects_what_it_cannot_write():
    with pytest.raises(ValueError, match="only q8_0"):
        QuantizedWeight.from_dense(torch.randn(4, 64), "q4_0")
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantizedWeight.from_dense(torch.randn(4, 48))
    with pytest.raises(ValueError, match=r"float \[out, in\]"):
        QuantizedWeight.from_dense(torch.randn(64))
    with pytest.raises(ValueError, match=r"float \[out, in\]"):
        QuantizedWeight.from_dense(torch.ones(4, 64, dtype=torch.int32))
    weight = torch.randn(4, 64)
    weight[2, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        QuantizedWeight.from_dense(weight)


@pytest.mark.parametrize("dtype", X_DTYPES)
@pytest.mark.parametrize("quantized", [False, True])
def test_row_stable_rows_depend_on_themselves_alone(dtype, quantized):
    """linear(..., row_stable=True): a row's result is the same bits whether it comes alone, among a few rows or
    among hundreds, at any position; close to the exact product; dense and block weights alike."""
    from dspark.models.linear import ROW_STABLE_ROWS

    gen = torch.Generator().manual_seed(31)
    dense = (torch.randn(96, 1536, generator=gen) * 0.05).to(dtype)
    weight = QuantizedWeight.from_dense(dense) if quantized else dense
    bias = torch.randn(96, generator=gen).to(dtype)
    rows = random_x(45, 1536, dtype, seed=32)
    alone = linear(rows, weight, bias, row_stable=True)
    assert alone.dtype == dtype and alone.shape == (45, 96)
    for before, total in ((0, 45), (3, 50), (100, 3 * ROW_STABLE_ROWS + 7), (7, 370)):
        batch = random_x(total, 1536, dtype, seed=total)
        batch[before: before + 45] = rows
        assert torch.equal(linear(batch, weight, bias, row_stable=True)[before: before + 45], alone)
    first = linear(rows[:1], weight, bias, row_stable=True)
    assert torch.equal(first, alone[:1])
    decoded = ref.dequantize(weight.data, "q8_0", 1536) if quantized else dense.float()
    exact = rows.double() @ decoded.double().T + bias.double()
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert (alone.double() - exact).abs().max() / exact.abs().max() < tolerance
    assert torch.equal(linear(rows, weight, bias, batch_invariant=True, row_stable=True),
                       linear(rows, weight, bias, batch_invariant=True))  # batch invariance wins


def test_fused_projections_of_mixed_formats_are_decoded_to_dense(tmp_path):
    """q and k in blocks, v dense (GGUF files mix types): the fused qkv is dense and the model computes
    exactly what the same weights loaded dense do."""
    from builders import write_tiny_llama
    from dspark.batch import build_round
    from dspark.cache import KVCache
    from dspark.models import load_model
    from dspark.models.llama import LlamaModel

    write_tiny_llama(tmp_path, 97, 64, 2, seed=3)
    dense = load_model(str(tmp_path), torch.float32)
    raw = {}
    for name, t in dense.weights.items():
        raw[name] = t
    # Undo the fusion to build the mixed dict (q, k as Q8_0 blocks; v dense).
    mixed, reference = {}, {}
    for name, t in raw.items():
        if name.endswith("qkv_proj.weight"):
            prefix = name.removesuffix("qkv_proj.weight")
            c = dense.config
            q, k, v = t.split([c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim])
            for part, value in (("q_proj", q), ("k_proj", k)):
                blocks = QuantizedWeight.from_dense(value)
                mixed[f"{prefix}{part}.weight"] = blocks
                reference[f"{prefix}{part}.weight"] = blocks.dequantize()
            mixed[f"{prefix}v_proj.weight"] = reference[f"{prefix}v_proj.weight"] = v
        else:
            mixed[name] = reference[name] = t
    model, expected = LlamaModel(dense.config, mixed), LlamaModel(dense.config, reference)
    assert isinstance(model.weights["layers.0.self_attn.qkv_proj.weight"], torch.Tensor)

    def logits(m):
        c = m.config
        cache = KVCache(c.num_layers, 1, 32, c.num_kv_heads, c.head_dim, m.dtype)
        hidden, _ = m.forward(cache, build_round(1, [(0, [5, 6, 7, 8], None)], [0]))
        return m.logits(hidden)

    assert torch.equal(logits(model), logits(expected))
