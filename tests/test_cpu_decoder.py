"""The fused CPU decoder stack (dspark/models/cpu_decoder.py, csrc/cpu/decoder_layers.cpp) against the
PyTorch layers it replaces, on tiny random Llama (biases), Qwen2 and Qwen3 (q/k norms, head_dim != hidden /
heads) checkpoints, in fp32, bf16 and fp16, contiguous and paged caches, chains and trees, with captured
layers: hidden states, captured states and the K/V written to the cache."""

from __future__ import annotations

import pytest
import torch

from dspark.batch import build_round
from dspark.cache import KVCache, SideCache
from dspark.models import cpu_decoder, load_model
from test_model_families import write_checkpoint

pytestmark = pytest.mark.skipif(not cpu_decoder.enabled(), reason="dspark._C is not built")

# Both paths round after every op; they differ in summation order (RMSNorm's mean, FMA contraction),
# so a bf16 element may land one rounding step apart and carry that through a layer.
TOLERANCE = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
             torch.float16: dict(rtol=4e-3, atol=4e-3)}


@pytest.fixture(scope="module", params=["llama_linear_tied_biases", "qwen2_untied", "qwen3"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    write_checkpoint(path, request.param)
    return str(path)


def _round_pair(model, block_size):
    """Two identical caches after a prefill of three prompts, and a tree round over them."""
    c = model.config
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 150, (n,), generator=gen).tolist() for n in (9, 17, 4)]
    cache = KVCache(c.num_layers, 3, 64, c.num_kv_heads, c.head_dim, model.dtype, block_size=block_size)
    for row, p in enumerate(prompts):
        cache.reserve(row, 64)
    model.forward(cache, build_round(3, [(r, p, None) for r, p in enumerate(prompts)], [0, 0, 0]))
    cache.seqlens.copy_(torch.tensor([len(p) for p in prompts], dtype=torch.int32))
    entries = [(0, [5, 6, 7, 8, 9], [-1, 0, 0, 1, 2]), (1, [11], None), (2, [12, 13, 14], None)]
    rnd = build_round(3, entries, cache.seqlens.tolist())
    twin = KVCache(c.num_layers, 3, 64, c.num_kv_heads, c.head_dim, model.dtype, block_size=block_size)
    for name in ("k", "v", "seqlens"):
        getattr(twin, name).copy_(getattr(cache, name))
    if block_size is not None:
        twin.block_table.copy_(cache.block_table)
    return cache, twin, rnd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [None, 4])
def test_fused_layers_match_the_pytorch_layers(checkpoint, dtype, block_size, monkeypatch):
    model = load_model(checkpoint, dtype)
    capture = (0, model.config.num_layers - 1)
    fused_cache, eager_cache, rnd = _round_pair(model, block_size)
    calls = []
    run = cpu_decoder.run
    monkeypatch.setattr(cpu_decoder, "run", lambda *a: calls.append(1) or run(*a))
    fused, fused_captured = model.forward(fused_cache, rnd, capture)
    assert calls, "the round did not take the fused path"
    monkeypatch.setenv("DSPARK_FUSED_CPU", "0")
    eager, eager_captured = model.forward(eager_cache, rnd, capture)
    assert len(calls) == 1
    torch.testing.assert_close(fused, eager, **TOLERANCE[dtype])
    assert len(fused_captured) == len(eager_captured) == 2
    for a, b in zip(fused_captured, eager_captured):
        torch.testing.assert_close(a, b, **TOLERANCE[dtype])
    torch.testing.assert_close(fused_cache.k, eager_cache.k, **TOLERANCE[dtype])
    torch.testing.assert_close(fused_cache.v, eager_cache.v, **TOLERANCE[dtype])


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("block_size", [None, 4])
def test_captured_states_written_in_place(checkpoint, fused, block_size, monkeypatch):
    """forward_capturing puts forward's captured states, concatenated, at each token's (row, slot) of the
    side cache (the fused layers write them there themselves) and touches no other position."""
    model = load_model(checkpoint, torch.bfloat16)
    capture = (0, model.config.num_layers - 1)
    if not fused:
        monkeypatch.setenv("DSPARK_FUSED_CPU", "0")
    cache, twin, rnd = _round_pair(model, block_size)
    _, expected = model.forward(twin, rnd, capture)
    side = SideCache(3, 64, 2 * model.config.hidden_size, torch.bfloat16)
    side.data.normal_(generator=torch.Generator().manual_seed(5))
    before = side.data.clone()
    out = model.forward_capturing(cache, rnd, capture, side)
    torch.testing.assert_close(out, model.forward(twin, rnd)[0], rtol=0, atol=0)
    written = torch.zeros(3, 64, dtype=torch.bool)
    written[rnd.write_rows, rnd.write_slots] = True
    torch.testing.assert_close(side.data[rnd.write_rows, rnd.write_slots, 0], torch.cat(expected, -1), rtol=0, atol=0)
    assert torch.equal(side.data[~written], before[~written])
    with pytest.raises(ValueError, match="side cache"):
        model.forward_capturing(cache, rnd, capture, SideCache(3, 64, model.config.hidden_size, torch.bfloat16))


def test_fused_rows_are_batch_invariant(checkpoint):
    """A row's hidden state does not depend on the other rows of its round (greedy speculative decoding
    stays token-identical to plain decoding through the fused path)."""
    model = load_model(checkpoint, torch.bfloat16)
    cache, twin, rnd = _round_pair(model, None)
    together, _ = model.forward(cache, rnd)
    alone_round = build_round(3, [(1, [11], None)], twin.seqlens.tolist())
    alone, _ = model.forward(twin, alone_round)
    assert torch.equal(together[5], alone[0])  # request 1's single token is flat index 5


def test_packed_blocks_give_the_file_layouts_results(tmp_path, monkeypatch):
    """A model over GGUF blocks packs its matrices at load (LlamaModel, QuantizedWeight.pack): decoding rounds in the
    fused layers, a prefill through the dense GEMMs (blocks decoded from the packed tiles), the embedding lookup and
    the LM head give bit for bit what the file's layout gives (DSPARK_PACK_BLOCKS=0)."""
    from builders import write_tiny_llama
    from dspark.models.llama import LlamaModel
    from dspark.models.quantized import QuantizedWeight, tile_rows

    monkeypatch.setattr(cpu_decoder, "QUANTIZED_PREFILL_TOKENS", 64)  # the 107-token prefill takes the dense GEMMs
    write_tiny_llama(tmp_path, 97, 64, 2, seed=4)
    dense = load_model(str(tmp_path), torch.float32)
    blocks = {name: QuantizedWeight.from_dense(t) if t.dim() == 2 else t for name, t in dense.weights.items()}
    packed = LlamaModel(dense.config, blocks)
    monkeypatch.setenv("DSPARK_PACK_BLOCKS", "0")
    file = LlamaModel(dense.config, blocks)
    matrices = [name for name, t in packed.weights.items() if isinstance(t, QuantizedWeight)]
    assert matrices and all(packed.weights[n].packed == (tile_rows() is not None) for n in matrices)
    assert not any(file.weights[n].packed for n in matrices)

    def run(model):
        c = model.config
        cache = KVCache(c.num_layers, 2, 160, c.num_kv_heads, c.head_dim, model.dtype)
        gen = torch.Generator().manual_seed(8)
        prompts = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (100, 7)]
        out = [model.logits(model.forward(cache, build_round(2, [(r, p, None) for r, p in enumerate(prompts)],
                                                             [0, 0], prefill=True))[0])]
        cache.seqlens.copy_(torch.tensor([100, 7], dtype=torch.int32))
        rnd = build_round(2, [(0, [5, 6, 7], [-1, 0, 1]), (1, [9], None)], cache.seqlens.tolist())
        out.append(model.logits(model.forward(cache, rnd)[0]))
        return out

    calls = []
    fused = cpu_decoder.run
    monkeypatch.setattr(cpu_decoder, "run", lambda *a: calls.append(1) or fused(*a))
    for a, b in zip(run(packed), run(file)):
        assert torch.equal(a, b)
    assert len(calls) == 2  # the decoding rounds ran in the fused layers


def test_short_prefills_over_gguf_blocks_take_the_fused_layers(tmp_path, monkeypatch):
    """Prefill rounds of up to QUANTIZED_PREFILL_TOKENS tokens over block-quantized matrices run in the fused
    layers, with the PyTorch layers' results (both take quantized_linear below DENSE_GEMM_ROWS rows); longer
    rounds, and every prefill of a model asked for batch-invariant prefills, keep the PyTorch layers."""
    from builders import write_tiny_llama
    from dspark.models.llama import LlamaModel
    from dspark.models.quantized import QuantizedWeight

    monkeypatch.setattr(cpu_decoder, "QUANTIZED_PREFILL_TOKENS", 40)  # the CPU's own limit is 64 or 512
    write_tiny_llama(tmp_path, 97, 64, 2, seed=3)
    dense = load_model(str(tmp_path), torch.float32)
    model = LlamaModel(dense.config, {name: QuantizedWeight.from_dense(t) if name.startswith("layers.") and t.dim() == 2
                                      else t for name, t in dense.weights.items()})
    calls = []
    run = cpu_decoder.run
    monkeypatch.setattr(cpu_decoder, "run", lambda *a: calls.append(1) or run(*a))

    def prefill(lengths):
        c = model.config
        cache = KVCache(c.num_layers, len(lengths), 80, c.num_kv_heads, c.head_dim, model.dtype)
        gen = torch.Generator().manual_seed(sum(lengths))
        entries = [(row, torch.randint(3, 97, (n,), generator=gen).tolist(), None) for row, n in enumerate(lengths)]
        hidden, _ = model.forward(cache, build_round(len(lengths), entries, [0] * len(lengths)))
        return hidden, cache

    fused, fused_cache = prefill([9, 17])
    assert calls
    monkeypatch.setenv("DSPARK_FUSED_CPU", "0")
    eager, eager_cache = prefill([9, 17])
    monkeypatch.delenv("DSPARK_FUSED_CPU")
    torch.testing.assert_close(fused, eager, **TOLERANCE[torch.float32])
    torch.testing.assert_close(fused_cache.k, eager_cache.k, **TOLERANCE[torch.float32])
    limit = cpu_decoder.QUANTIZED_PREFILL_TOKENS
    calls.clear()
    prefill([limit - 20, 20])
    assert calls
    calls.clear()
    prefill([limit - 20, 21])
    assert not calls
    model.batch_invariant_prefill = True
    prefill([8])
    assert not calls
    # Dense fp32 matrices: while linear() would give the rows to small_batch_linear anyway.
    from dspark.models.linear import FP32_MAX_ROWS
    assert cpu_decoder.takes_prefill(dense, FP32_MAX_ROWS) and not cpu_decoder.takes_prefill(dense, FP32_MAX_ROWS + 1)


def _kernel_args(model, cache, rnd, plan):
    """The raw kernel's arguments for a round, as cpu_decoder.run passes them (no capture), by name."""
    c = model.config
    weights, formats = cpu_decoder._weights(model)
    return dict(hidden=model.embed(rnd.tokens).contiguous(), weights=weights, formats=formats, k=cache.k, v=cache.v,
                positions=rnd.positions.contiguous(), inv_freq=model.inv_freq.contiguous(), write_rows=rnd.write_rows,
                write_slots=rnd.write_slots, qo_indptr=plan.qo_indptr, seqlens=plan.cache_seqlens,
                parents=plan.parents, block_table=plan.block_table, captured=None, slots=[-1] * c.num_layers,
                heads=c.num_heads, inter=c.intermediate_size, eps=c.rms_norm_eps, scale=1.0 / c.head_dim ** 0.5,
                final_norm=None, bidirectional=False)


def _corrupt(name, args, cache):
    """One bad argument of a valid round (and what its error names)."""
    args = dict(args)
    if name == "write_rows":
        args["write_rows"] = args["write_rows"].clone()
        args["write_rows"][-1] = cache.k.shape[1] + 5
        return args, "write_rows/write_slots out of range"
    if name == "write_slots":
        args["write_slots"] = args["write_slots"].clone()
        args["write_slots"][0] = -1
        return args, "write_rows/write_slots out of range"
    if name == "qo_indptr":
        args["qo_indptr"] = args["qo_indptr"].clone()
        args["qo_indptr"][-1] += 1
        return args, "qo_indptr must run from 0"
    if name == "cache_seqlens":
        args["seqlens"] = args["seqlens"].clone()
        args["seqlens"][1] = 64
        return args, "cache_seqlens \\+ its token count"
    if name == "block_table":
        args["block_table"] = args["block_table"].clone()
        args["block_table"].fill_(cache.k.shape[1])
        return args, "outside the cache"
    if name == "capture_slot":
        args["slots"] = args["slots"][:-1]
        return args, "capture_slot: one per layer"
    if name == "norm format":
        args["formats"] = [3] + list(args["formats"][1:])
        return args, "only the qkv, o, gate_up and down projections"
    if name == "hidden dtype":
        args["hidden"] = args["hidden"].double()
        return args, "hidden"
    if name == "positions":
        args["positions"] = args["positions"][:-1]
        return args, "positions must be \\[rows\\]"
    raise AssertionError(name)


@pytest.mark.parametrize("bad", ["write_rows", "write_slots", "qo_indptr", "cache_seqlens", "block_table",
                                 "capture_slot", "norm format", "hidden dtype", "positions"])
def test_kernel_refuses_a_bad_round_and_writes_nothing(checkpoint, bad):
    """The raw kernel (what the engine's trusted path calls) checks what would put a write or a read outside the
    caches, and refuses before writing anything: a ValueError naming the argument, K/V and hidden unchanged."""
    model = load_model(checkpoint, torch.bfloat16)
    cache, _, rnd = _round_pair(model, 4 if bad == "block_table" else None)
    args = _kernel_args(model, cache, rnd, model.plan(cache, rnd))
    cpu_decoder._kernel(*(a.clone() if isinstance(a, torch.Tensor) and name == "hidden" else a
                          for name, a in args.items()))  # the valid round runs
    args, message = _corrupt(bad, args, cache)
    k, v, hidden = cache.k.clone(), cache.v.clone(), args["hidden"].clone()
    with pytest.raises(ValueError, match=message):
        cpu_decoder._kernel(*args.values())
    assert torch.equal(cache.k, k) and torch.equal(cache.v, v) and torch.equal(args["hidden"], hidden)


@pytest.mark.parametrize("bad", ["packed flag dropped", "packed flag added", "rows missing"])
def test_kernel_checks_each_projections_block_layout(tmp_path, bad):
    """A block-quantized projection's shape must be the layout its format says (file rows, or packed tiles holding
    every output row): otherwise a ValueError naming the projection, and nothing written."""
    from builders import write_tiny_llama
    from dspark.models.llama import LlamaModel
    from dspark.models.quantized import PACKED_FORMAT, QuantizedWeight, tile_rows

    if tile_rows() is None:
        pytest.skip("dspark._C is not built")
    write_tiny_llama(tmp_path, 160, 64, 2, seed=5)
    dense = load_model(str(tmp_path), torch.bfloat16)
    model = LlamaModel(dense.config, {name: QuantizedWeight.from_dense(t) if name.startswith("layers.") and t.dim() == 2
                                      else t for name, t in dense.weights.items()})
    cache, _, rnd = _round_pair(model, None)
    args = _kernel_args(model, cache, rnd, model.plan(cache, rnd))
    assert args["formats"][1] & PACKED_FORMAT  # qkv, packed at load
    formats, weights = list(args["formats"]), list(args["weights"])
    qkv = weights[1]
    file_rows = next(w for w in model.weights.values() if isinstance(w, QuantizedWeight) and w.data is qkv).file_rows()
    if bad == "packed flag dropped":
        formats[1] &= ~PACKED_FORMAT
        message = "qkv_proj's shape is packed"
    elif bad == "packed flag added":
        weights[1] = file_rows
        message = "qkv_proj's format says packed"
    else:
        weights[1] = qkv[:-1].contiguous()
        message = "a packed qkv_proj of"
    args.update(formats=formats, weights=weights)
    k, v, hidden = cache.k.clone(), cache.v.clone(), args["hidden"].clone()
    with pytest.raises(ValueError, match=message):
        cpu_decoder._kernel(*args.values())
    assert torch.equal(cache.k, k) and torch.equal(cache.v, v) and torch.equal(args["hidden"], hidden)


def test_the_fused_prefill_limit_follows_the_cpus_flags():
    """Longer prefills stay in the fused layers only on AVX2 CPUs that do not multiply bf16 natively."""
    for flags, limit in [("fpu avx2 fma f16c avx512f avx512bw avx512_vnni", 512), ("avx2 avx512_bf16 avx512f", 64),
                         ("avx2 amx_bf16 amx_tile", 64), ("avx2 xavx512_bf16x", 512), ("fp asimd bf16", 64),
                         ("sse4_2 avx xavx2", 64), ("", 64)]:
        assert cpu_decoder.quantized_prefill_limit(frozenset(flags.split())) == limit, flags
    assert cpu_decoder.QUANTIZED_PREFILL_TOKENS == cpu_decoder.quantized_prefill_limit()
