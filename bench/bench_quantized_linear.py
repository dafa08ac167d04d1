"""The CPU linear layer over GGUF blocks: dspark._C.quantized_linear (Q4_1: SmolLM2's projections; Q8_0:
its embedding / LM head) beside small_batch_linear over the same matrix in bf16, on SmolLM2's shapes at
the row counts of decoding (1) and verification (2-16), and this machine's read bandwidth (a sum over a
512 MiB buffer). Weights are cycled through a set larger than the last-level cache, as a model's are
in a forward pass.

    pytest bench/bench_quantized_linear.py --benchmark-json=OUT.json -p no:cacheprovider
    python bench/bench_quantized_linear.py OUT.json > OUT.md     # bytes/s and % of read bandwidth
"""

import json
import sys

import pytest
import torch

from dspark.models.linear import linear, small_batch_linear
from dspark.models.quantized import QuantizedWeight, _kernel, quantized_linear
from dspark.reference.quantized_linear import FORMATS

# SmolLM2-135M: fused qkv (9 + 2 x 3 heads of 64), fused gate/up, down, the tied LM head.
SHAPES = {"qkv 960x576": (960, 576, "q4_1"), "gate_up 3072x576": (3072, 576, "q4_1"),
          "down 576x1536": (576, 1536, "q4_1"), "lm_head 49152x576": (49152, 576, "q8_0")}
ROWS = [1, 2, 4, 8, 16]
CACHE_BYTES = 96 << 20


def random_blocks(fmt: str, out: int, in_features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    blocks, size = in_features // 32, FORMATS[fmt]
    data = torch.randint(0, 256, (out, blocks, size), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = (torch.rand(out, blocks, 2 if fmt == "q4_1" else 1, generator=g) * 0.02).half().view(torch.uint8)
    data[..., : scales.shape[-1]] = scales.view(out, blocks, -1)
    return data.reshape(out, -1)


@pytest.mark.skipif(_kernel is None, reason="dspark._C is not built")
@pytest.mark.parametrize("impl", ["quantized_linear", "quantized_linear packed", "small_batch_linear bf16"])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_quantized_linear(benchmark, impl, rows, shape):
    """impl "quantized_linear": blocks in the file's layout; "packed": in the kernel's tiles (QuantizedWeight.pack),
    as a loaded model holds them."""
    out_features, in_features, fmt = SHAPES[shape]
    quantized = impl.startswith("quantized_linear")
    if quantized:
        weights = [QuantizedWeight(random_blocks(fmt, out_features, in_features, 0), fmt, in_features)]
        if impl.endswith("packed"):
            weights = [weights[0].pack()]
        weight_bytes = weights[0].nbytes
    else:
        weights = [torch.randn(out_features, in_features).bfloat16()]
        weight_bytes = out_features * in_features * 2
    copies = max(1, -(-CACHE_BYTES // weight_bytes))
    while len(weights) < copies:
        weights.append(QuantizedWeight(weights[0].data.clone(), fmt, in_features, out_features) if quantized
                       else weights[0].clone())
    x = torch.randn(rows, in_features).bfloat16()
    fn = quantized_linear if quantized else small_batch_linear
    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % copies
        return fn(x, weights[state["i"]])

    benchmark.extra_info.update(op="linear", impl=impl, rows=rows, shape=shape,
                                format=fmt if quantized else "bf16", weight_bytes=weight_bytes)
    benchmark.pedantic(step, rounds=max(20, 2 * copies), warmup_rounds=copies)


PREFILL_ROWS = [64, 256]


@pytest.mark.skipif(_kernel is None, reason="dspark._C is not built")
@pytest.mark.parametrize("impl", ["quantized_linear", "dequantize_blocks + F.linear"])
@pytest.mark.parametrize("rows", PREFILL_ROWS)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s != "lm_head 49152x576"])
def test_prefill_linear(benchmark, impl, rows, shape):
    """A prefill's many rows: the integer kernel against the blocks decoded (dspark._C.dequantize_blocks)
    and a dense GEMM, what linear() takes from DENSE_GEMM_ROWS rows when no batch invariance is asked."""
    out_features, in_features, fmt = SHAPES[shape]
    weight = QuantizedWeight(random_blocks(fmt, out_features, in_features, 0), fmt, in_features)
    x = torch.randn(rows, in_features).bfloat16()
    fn = (lambda: quantized_linear(x, weight)) if impl == "quantized_linear" else (lambda: linear(x, weight))
    benchmark.extra_info.update(op="prefill", impl=impl, rows=rows, shape=shape, format=fmt,
                                weight_bytes=weight.nbytes)
    benchmark.pedantic(fn, rounds=20, warmup_rounds=2)


def test_read_bandwidth(benchmark):
    """Bytes per second one pass over 512 MiB reads here (torch.sum over fp32: memory bound)."""
    buffer = torch.rand(128 << 20)
    benchmark.extra_info.update(op="read", weight_bytes=buffer.numel() * 4)
    benchmark.pedantic(buffer.sum, rounds=10, warmup_rounds=2)


def table(path: str) -> None:
    data = json.load(open(path))
    bandwidth = next(b["extra_info"]["weight_bytes"] / b["stats"]["median"] for b in data["benchmarks"]
                     if b["extra_info"]["op"] == "read")
    machine = data.get("machine_info", {}).get("cpu", {})
    print(f"pytest-benchmark medians, bench/bench_quantized_linear.py, {machine.get('brand_raw', '?')} "
          f"({machine.get('count', '?')} vCPUs), torch {torch.__version__}; weights cycled through 96 MiB.\n"
          f"Read bandwidth (sum over 512 MiB): {bandwidth / 1e9:.1f} GB/s.\n")
    print("| shape | rows | quantized (ms) | GB/s | % of read | packed (ms) | GB/s | packed speedup | "
          "bf16 small_batch_linear (ms) | GB/s | packed / bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cases = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if info["op"] == "linear":
            cases.setdefault((info["shape"], info["rows"]), {})[info["impl"]] = (b["stats"]["median"], info["weight_bytes"])
    for (shape, rows), impls in sorted(cases.items(), key=lambda kv: (list(SHAPES).index(kv[0][0]), kv[0][1])):
        (tq, bq), (tp, bp) = impls["quantized_linear"], impls["quantized_linear packed"]
        tb, bb = impls["small_batch_linear bf16"]
        print(f"| {shape} ({SHAPES[shape][2]}) | {rows} | {tq * 1e3:.3f} | {bq / tq / 1e9:.1f} | "
              f"{100 * bq / tq / bandwidth:.0f}% | {tp * 1e3:.3f} | {bp / tp / 1e9:.1f} | {tq / tp:.2f}x | "
              f"{tb * 1e3:.3f} | {bb / tb / 1e9:.1f} | {tb / tp:.2f}x |")
    prefill = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        if info["op"] == "prefill":
            prefill.setdefault((info["shape"], info["rows"]), {})[info["impl"]] = b["stats"]["median"]
    if prefill:
        print("\n| shape | rows | quantized_linear (ms) | dequantize_blocks + F.linear (ms) | speedup |")
        print("|---|---|---|---|---|")
        for (shape, rows), impls in sorted(prefill.items(), key=lambda kv: (list(SHAPES).index(kv[0][0]), kv[0][1])):
            tq, td = impls["quantized_linear"], impls["dequantize_blocks + F.linear"]
            print(f"| {shape} ({SHAPES[shape][2]}) | {rows} | {tq * 1e3:.3f} | {td * 1e3:.3f} | {tq / td:.2f}x |")


if __name__ == "__main__":
    table(sys.argv[1])
