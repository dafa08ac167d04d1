"""RoundGraphs (dspark/round_graphs.py): rounds padded to token-count buckets over static tensors give every
real token exactly the eager round's logits, K/V and captured hidden states, and the engine's output
through them is token-identical to eager decoding. CPU has no CUDA graphs: these run the padded static
rounds eagerly (capture=False), the same code the graphs capture on a GPU (bench/gpu_check.sh engine)."""

from __future__ import annotations

import pytest
import torch

from dspark.batch import build_round
from dspark.cache import KVCache, SideCache
from dspark.drafters import DraftModelDrafter, NgramDrafter
from dspark.engine import Engine
from dspark.models import load_model
from dspark.round_graphs import RoundGraphs
from dspark.sampling_params import SamplingParams
from builders import delegating_target, random_parents, write_tiny_llama

pytest.importorskip("transformers")

VOCAB = 97
PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [9, 10, 11, 12, 13, 9, 10, 11, 30, 31], [40], [3, 4, 3, 4, 3, 4, 3, 4, 3],
           [50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 50, 51], [70, 71]]


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def tiny(tmp_path_factory, request):
    path = tmp_path_factory.mktemp("tiny_llama")
    write_tiny_llama(path, VOCAB, sharpen=4.0)
    return load_model(str(path), request.param)


def random_state(model, gen, rows: int, max_seq_len: int, block_size, width: int):
    """A cache (and side cache) of random contents whose real rows hold random committed lengths; the
    last row is the scratch row (length 0)."""
    c = model.config
    cache = KVCache(c.num_layers, rows, max_seq_len, c.num_kv_heads, c.head_dim, model.dtype, block_size=block_size)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    for row in range(rows - 1):
        cache.reserve(row, max_seq_len - 16)
        cache.seqlens[row] = int(torch.randint(0, max_seq_len - 40, (1,), generator=gen))
    side = SideCache(rows, max_seq_len, width, model.dtype, seqlens=cache.seqlens) if width else None
    if side is not None:
        side.data.copy_(torch.randn(side.data.shape, generator=gen))
    return cache, side


def clone_state(cache: KVCache, side: SideCache | None):
    copy = KVCache.__new__(KVCache)
    copy.__dict__.update({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in cache.__dict__.items()})
    copy._free_blocks = list(getattr(cache, "_free_blocks", []))
    copy._row_blocks = [list(b) for b in getattr(cache, "_row_blocks", [])]
    side_copy = None
    if side is not None:
        side_copy = SideCache(side.data.shape[0], side.data.shape[1], side.data.shape[3], side.data.dtype,
                              seqlens=copy.seqlens)
        side_copy.data.copy_(side.data)
    return copy, side_copy


def same_real_rows(cache: KVCache, other: KVCache) -> bool:
    """Whether the K/V every real (non-scratch) row can reach are equal in both caches."""
    if cache.block_table is None:
        return torch.equal(cache.k[:, :-1], other.k[:, :-1]) and torch.equal(cache.v[:, :-1], other.v[:, :-1])
    blocks = cache.block_table[:-1][cache.block_table[:-1] >= 0].long()
    return torch.equal(cache.k[:, blocks], other.k[:, blocks]) and torch.equal(cache.v[:, blocks], other.v[:, blocks])


def random_entries(gen, real_rows: int, tree: bool, sizes: list[int]):
    """(row, tokens, parents) for a random subset of the real rows, with the given node counts."""
    rows = torch.randperm(real_rows, generator=gen)[: len(sizes)].tolist()
    return [(row, torch.randint(0, VOCAB, (n,), generator=gen).tolist(),
             [-1] + [p + 1 for p in random_parents(n - 1, gen, chain=False)] if tree and n > 1 else None)
            for row, n in zip(rows, sizes)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused-cpu-layers", "pytorch-layers"])
@pytest.mark.parametrize("block_size", [None, 8])
@pytest.mark.parametrize("capture_layers", [(), (0, 2)])
def test_padded_rounds_give_real_tokens_the_eager_results(tiny, block_size, capture_layers, fused, monkeypatch):
    """The PyTorch layers are the ones a GPU captures; the fused C++ ones serve CPU rounds."""
    monkeypatch.setenv("DSPARK_FUSED_CPU", "1" if fused else "0")
    model = tiny
    gen = torch.Generator().manual_seed(3)
    rows, max_seq_len = 6, 96
    width = model.config.hidden_size * len(capture_layers)
    cache, side = random_state(model, gen, rows, max_seq_len, block_size, width)
    graphs = RoundGraphs(model, cache, capture_layers, side, max_tokens=32, capture=False)
    before, before_side = clone_state(cache, side)
    graphs.capture_up_to(3)  # rounds of padding alone: they write the scratch row only
    assert same_real_rows(cache, before)
    if side is not None:
        assert torch.equal(side.data[: rows - 1], before_side.data[: rows - 1])
    # 5 -> bucket 6, 7 -> 8, 13 -> 16, 1 -> 1, and a second round of bucket 8 replays the first one's plan.
    for tree, sizes in ((False, [2, 3]), (True, [3, 4]), (True, [5, 1, 4, 3]), (False, [1]), (True, [4, 2, 1])):
        entries = random_entries(gen, rows - 1, tree, sizes)
        rnd = build_round(rows, entries, cache.seqlens.tolist())
        eager_cache, eager_side = clone_state(cache, side)
        if side is None:
            expected = model.logits(model.forward(eager_cache, rnd)[0])
        else:
            expected = model.logits(model.forward_capturing(eager_cache, rnd, capture_layers, eager_side))
        got = graphs.logits(rnd)
        assert graphs.captured_buckets[-1] >= sum(sizes)
        assert torch.equal(got, expected), f"round of {sizes} nodes (tree={tree})"
        assert same_real_rows(cache, eager_cache)
        if side is not None:
            assert torch.equal(side.data[: rows - 1], eager_side.data[: rows - 1])
        assert torch.equal(cache.seqlens, eager_cache.seqlens) and int(cache.seqlens[-1]) == 0
        # the next round over advanced lengths, as after an accepted round
        grown = torch.randint(0, 3, (rows - 1,), generator=gen, dtype=torch.int32)
        cache.seqlens[: rows - 1] += grown
    assert graphs.captured_buckets == (1, 2, 3, 6, 8, 16)


def test_graph_rounds_refuse_what_they_cannot_capture(tiny):
    model = tiny
    c = model.config
    cache = KVCache(c.num_layers, 3, 64, c.num_kv_heads, c.head_dim, model.dtype)
    with pytest.raises(ValueError, match="CUDA graphs need a model on a CUDA device"):
        RoundGraphs(model, cache, capture=True)
    with pytest.raises(ValueError, match="capture_layers and a side cache go together"):
        RoundGraphs(model, cache, (1,), None, capture=False)
    graphs = RoundGraphs(model, cache, max_tokens=24, capture=False)
    assert graphs.buckets[-1] == 24
    prefill = build_round(3, [(0, [5, 6, 7], None)], [0, 0, 0])
    assert not graphs.applies(prefill)  # prefills run eagerly
    too_long = build_round(3, [(0, list(range(3, 30)), None)], [4, 0, 0])
    assert not graphs.applies(too_long)
    assert graphs.applies(build_round(3, [(0, [5, 6, 7], None)], [4, 0, 0]))


def test_models_without_a_planned_forward_are_refused(tiny):
    c = tiny.config
    cache = KVCache(c.num_layers, 2, 32, c.num_kv_heads, c.head_dim, tiny.dtype)
    with pytest.raises(ValueError, match="has no planned forward"):
        RoundGraphs(delegating_target(tiny), cache, capture=False)


def generated(engine: Engine, prompts, params) -> list[list[int]]:
    return [r.generated for r in engine.generate(prompts, params)]


@pytest.mark.parametrize("drafter", [None, "ngram", "self_draft_tree"])
@pytest.mark.parametrize("block_size", [None, 4])
def test_engine_through_graph_rounds_is_token_identical_to_eager(tiny, drafter, block_size):
    model = tiny
    make = {None: lambda: None, "ngram": lambda: NgramDrafter(4),
            "self_draft_tree": lambda: DraftModelDrafter.self_draft(model, 2, branching=(2, 2, 1))}[drafter]
    greedy = SamplingParams(max_tokens=20, ignore_eos=True)
    plain = generated(Engine(model, max_batch=4, max_seq_len=128), PROMPTS, greedy)
    engine = Engine(model, drafter=make(), max_batch=4, max_seq_len=128, block_size=block_size, cuda_graphs=True)
    assert generated(engine, PROMPTS, greedy) == plain
    assert engine.graphs.captured_buckets  # the decoding rounds went through the padded path
    assert int(engine.cache.seqlens[-1]) == 0 and engine.cache.rows == 5
    # Sampling reads the same logits: a seed's output is the eager engine's.
    sampled = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    eager = generated(Engine(model, drafter=make(), max_batch=4, max_seq_len=128, block_size=block_size),
                      PROMPTS, sampled)
    through_graphs = Engine(model, drafter=make(), max_batch=4, max_seq_len=128, block_size=block_size,
                            cuda_graphs=True)
    assert generated(through_graphs, PROMPTS, sampled) == eager


def test_a_planned_round_reads_nothing_back_from_the_device(tiny):
    """What a CUDA graph captures must not read tensor values on the host (a sync breaks the capture).
    On meta tensors every such read raises: the static-round loading, the layers, the cache and side-cache
    writes and the LM head run here on meta, with the attention (a C++ launch) stood in for."""
    from dspark.models.llama import LlamaModel

    class MetaPlan:
        backend = "meta"

        def run(self, q, k_cache, v_cache, sm_scale=None):
            return torch.empty_like(q)

    model = LlamaModel(tiny.config, {name: w.to("meta") for name, w in tiny.weights.items()})
    model.plan = lambda cache, rnd, backend=None: MetaPlan()
    c = model.config
    cache = KVCache(c.num_layers, 4, 64, c.num_kv_heads, c.head_dim, model.dtype, device="meta", block_size=8)
    side = SideCache(4, 64, 2 * c.hidden_size, model.dtype, device="meta", seqlens=cache.seqlens)
    graphs = RoundGraphs(model, cache, (0, 1), side, max_tokens=16, capture=False)
    for tree in (False, True):
        host = build_round(4, [(0, [5, 6, 7], [-1, 0, 0] if tree else None), (2, [8, 9], None)], [3, 0, 6, 0])
        rnd = type(host)(**{k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in host.__dict__.items()})
        logits = graphs.logits(rnd)
        assert logits.shape == (5, c.vocab_size) and logits.device.type == "meta"


def test_reused_plans_read_the_round_values_at_every_run(tiny, monkeypatch):
    """A graph's plan serves every later round of its bucket, so its attention backend must not plan
    from the values (Triton's does): with Triton asked for, the graphs still take the C++ backend, and a
    second round of a bucket, with other rows, lengths and tree, gets that backend's eager results."""
    monkeypatch.setenv("DSPARK_BACKEND", "triton")
    model = tiny
    gen = torch.Generator().manual_seed(5)
    cache, _ = random_state(model, gen, 5, 64, None, 0)
    graphs = RoundGraphs(model, cache, max_tokens=16, capture=False)
    assert graphs.backend == "cpu"
    graphs.capture_up_to(8)  # planned over padding alone
    for sizes in ([3, 4], [2, 5], [6, 1]):
        rnd = build_round(5, random_entries(gen, 4, True, sizes), cache.seqlens.tolist())
        eager_cache, _ = clone_state(cache, None)
        monkeypatch.setenv("DSPARK_BACKEND", "cpu")
        expected = model.logits(model.forward(eager_cache, rnd)[0])
        monkeypatch.setenv("DSPARK_BACKEND", "triton")
        assert torch.equal(graphs.logits(rnd), expected)
        assert not graphs.recorded_last  # every round replayed a graph planned before it
