"""The C++ kernels give the same bits at 1, 2 and 3 OpenMP threads: their work splits never depend on the
thread count and no thread writes another's output. Under pytest-xdist every other test runs at one thread
per worker (conftest.py), so this module is where the threaded paths (split key ranges, row and tile
partitions, per-thread scratch) run with several threads and would show a race or a wrong split."""

from __future__ import annotations

import pytest
import torch

from builders import random_cache, random_round, threads
from dspark import ops
from dspark.models import cpu_decoder, load_model
from dspark.models.linear import small_batch_linear
from dspark.models.quantized import QuantizedWeight, quantized_linear, tile_rows
from test_cpu_decoder import _round_pair
from test_kv_rollback import _accepted
from test_model_families import write_checkpoint
from test_quantized_linear import random_blocks, random_x
from test_rejection_sample import _random_batch

pytestmark = pytest.mark.skipif(tile_rows() is None, reason="dspark._C is not built")
THREADS = (1, 2, 3)


def assert_same_bits_at_every_count(run) -> None:
    """run() -> a tensor or a tuple of tensors, computed afresh from the same inputs at each thread count."""
    results = []
    for count in THREADS:
        with threads(count):
            out = run()
        results.append(out if isinstance(out, tuple) else (out,))
    for count, result in zip(THREADS[1:], results[1:]):
        for got, want in zip(result, results[0]):
            assert torch.equal(got, want), f"{count} threads differ from one"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("chain", [True, False])
def test_tree_attention(dtype, block_size, chain):
    gen = torch.Generator().manual_seed(11)
    # Committed prefixes past several 128-slot chunks: split key ranges, merged per row.
    rnd = random_round(gen, num_requests=4, max_nodes=9, max_committed=700, chain=chain)
    needed = [c + n for c, n in zip(rnd.cache_seqlens.tolist(), rnd.counts)]
    cache = random_cache(gen, needed, 2, 64, dtype, block_size)
    q = torch.randn(int(rnd.qo_indptr[-1]), 6, 64, generator=gen).to(dtype)
    assert_same_bits_at_every_count(lambda: ops.tree_attention(
        q, cache.k, cache.v, rnd.qo_indptr, rnd.cache_seqlens, rnd.parents, cache.block_table, backend="cpu"))


@pytest.mark.parametrize("block_size", [None, 16])
def test_kv_rollback(block_size):
    gen = torch.Generator().manual_seed(5)
    committed, paths = [5, 0, 130, 2, 61], [[0, 2, 3], [0, 1, 3], [0], [0, 1, 2, 4, 7], [1, 5]]
    cache = random_cache(gen, [c + max(p) + 2 for c, p in zip(committed, paths)], 2, 64, torch.bfloat16, block_size,
                         lead=(3,))
    accepted, counts = _accepted(paths, 6)

    def run():
        k, v, seqlens = cache.k.clone(), cache.v.clone(), torch.tensor(committed, dtype=torch.int32)
        ops.kv_rollback(k, v, seqlens, accepted, counts, cache.block_table, backend="cpu")
        return k, v, seqlens

    assert_same_bits_at_every_count(run)


@pytest.mark.parametrize("fmt", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_quantized_linear_and_dequantize(fmt, rows):
    weight = QuantizedWeight(random_blocks(fmt, 203, 256, seed=rows), fmt, 256)
    x = random_x(rows, 256, torch.bfloat16, seed=rows + 1)
    tokens = torch.randint(0, 203, (rows, 3), generator=torch.Generator().manual_seed(rows))
    for w in (weight, weight.pack()):
        assert_same_bits_at_every_count(lambda: (quantized_linear(x, w), w.dequantize(torch.bfloat16),
                                                 w.embedding(tokens, torch.float32)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_small_batch_linear(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.randn(301, 192, generator=gen).to(dtype), torch.randn(301, generator=gen).to(dtype)
    x = torch.randn(rows, 192, generator=gen).to(dtype)
    assert_same_bits_at_every_count(lambda: small_batch_linear(x, weight, bias))


@pytest.mark.parametrize("stochastic", [False, True])
def test_rejection_sample(stochastic):
    batch, _ = _random_batch(5, 333, 24, chain=False, stochastic=stochastic)
    seed = torch.arange(24) * 7919
    assert_same_bits_at_every_count(lambda: ops.rejection_sample(**batch, seed=seed, offset=3, backend="cpu"))


@pytest.mark.skipif(not cpu_decoder.enabled(), reason="the fused CPU decoder is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decoder_layers(tmp_path, dtype):
    write_checkpoint(tmp_path, "qwen3")
    model = load_model(str(tmp_path), dtype)

    def run():
        cache, _, rnd = _round_pair(model, block_size=4)  # prefill of three prompts, then a tree round
        hidden, captured = model.forward(cache, rnd, (0, model.config.num_layers - 1))
        return (hidden, *captured, cache.k, cache.v)

    assert_same_bits_at_every_count(run)
