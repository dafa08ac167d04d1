"""Engine: greedy speculative decoding is token-identical to plain decoding and to transformers'
generate; batching, paging and drafters never change the output; seeds reproduce; bad input fails
clearly without disturbing other requests. A tiny random Llama written to a temp dir keeps it fast."""

from __future__ import annotations

import pytest
import torch

from dspark.drafters import DraftModelDrafter, NgramDrafter
from dspark.engine import Engine
from dspark.models import load_model
from dspark.sampling_params import SamplingParams
from dspark.scheduler import FixedLength
from builders import delegating_target, write_tiny_llama

transformers = pytest.importorskip("transformers")

VOCAB = 97
PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [9, 10, 11, 12, 13, 9, 10, 11, 30, 31], [40], [3, 4, 3, 4, 3, 4, 3, 4, 3],
           [50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 50, 51], [70, 71], [80, 81, 82, 80, 81], [90, 2, 90]]
GREEDY = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    hf = write_tiny_llama(path, VOCAB)
    return hf, load_model(str(path), torch.float32)


def generated(engine: Engine, prompts, params=GREEDY) -> list[list[int]]:
    return [r.generated for r in engine.generate(prompts, params)]


def test_plain_greedy_matches_transformers_generate(tiny):
    hf, model = tiny
    ours = generated(Engine(model, max_batch=8, max_seq_len=128), PROMPTS)
    with torch.no_grad():
        for prompt, tokens in zip(PROMPTS, ours):
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
            assert out[0, len(prompt):].tolist() == tokens


def make_drafter(kind: str, model):
    return {
        "ngram": lambda: NgramDrafter(4),
        "ngram_tree": lambda: NgramDrafter(6, branches=3),
        "self_draft": lambda: DraftModelDrafter.self_draft(model, 1, 3),
        "self_draft_tree": lambda: DraftModelDrafter.self_draft(model, 2, branching=(2, 2, 1)),
    }[kind]()


@pytest.mark.parametrize("drafter", ["ngram", "ngram_tree", "self_draft", "self_draft_tree"])
@pytest.mark.parametrize("block_size", [None, 4])
@pytest.mark.parametrize("batch", [1, 8])
def test_speculative_greedy_is_token_identical_to_plain(tiny, drafter, block_size, batch):
    _, model = tiny
    plain = generated(Engine(model, max_batch=8, max_seq_len=128), PROMPTS)
    proposer = make_drafter(drafter, model)
    engine = Engine(model, drafter=proposer, max_batch=batch, max_seq_len=128, block_size=block_size)
    assert generated(engine, PROMPTS) == plain
    assert engine.stats.rounds < sum(len(t) for t in plain)  # drafts were accepted, rounds were saved


def test_ngram_tree_merges_continuations():
    drafter = NgramDrafter(6, max_ngram=1, branches=3)
    proposal = drafter._trie(drafter.continuations([7, 1, 2, 7, 1, 3, 7, 4, 9, 7], 3), 6)
    # after 7 came [4, 9, 7], [1, 3, 7], [1, 2, 7]: the trie shares the 1
    assert proposal.tokens == [4, 9, 7, 1, 3, 7] and proposal.parents == [0, 1, 2, 0, 4, 5]
    proposal = drafter._trie(drafter.continuations([7, 1, 2, 7, 1, 3, 7], 3), 6)
    assert proposal.tokens == [1, 3, 7, 2, 7] and proposal.parents == [0, 1, 2, 1, 4]


def test_sampled_output_is_reproducible_by_seed(tiny):
    _, model = tiny

    def run(seed):
        params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True)
        return generated(Engine(model, drafter=DraftModelDrafter.self_draft(model, 1, 3), max_batch=4,
                                max_seq_len=128), PROMPTS[:4], params)

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_token_ids_and_max_tokens(tiny):
    _, model = tiny
    [full] = generated(Engine(model, max_seq_len=128), PROMPTS[:1])
    stop = full[5]
    params = SamplingParams(max_tokens=24, stop_token_ids=(stop,), ignore_eos=True)
    [request] = Engine(model, drafter=NgramDrafter(4), max_seq_len=128).generate(PROMPTS[:1], params)
    assert request.generated == full[: full.index(stop)] and request.finish_reason == "stop"
    [short] = Engine(model, drafter=NgramDrafter(4), max_seq_len=128).generate(
        PROMPTS[:1], SamplingParams(max_tokens=3, ignore_eos=True))
    assert short.generated == full[:3] and short.finish_reason == "length"


@pytest.mark.parametrize("prompt,params,message", [
    ([], GREEDY, "prompt is empty"),
    ([5, VOCAB], GREEDY, "outside the vocabulary"),
    ([5, -1], GREEDY, "outside the vocabulary"),
    (list(range(1, 90)) * 2, GREEDY, "exceeds max_seq_len"),
    ("text", GREEDY, "needs the engine's tokenizer"),
])
def test_bad_requests_are_refused_and_others_finish(tiny, prompt, params, message):
    _, model = tiny
    engine = Engine(model, drafter=NgramDrafter(4), max_batch=4, max_seq_len=128)
    engine.add_request(PROMPTS[0], GREEDY)
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, params)
    expected = generated(Engine(model, max_seq_len=128), PROMPTS[:1])
    while engine.has_work():
        engine.step()
    assert engine.finished[0].generated == expected[0]


def test_bad_sampling_params_and_mismatched_drafter(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    small = model.truncated(1)
    small_config = small.config.__class__(**{**small.config.__dict__, "vocab_size": VOCAB + 1})
    mismatched = DraftModelDrafter(type(small)(small_config, small.weights))
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(model, drafter=mismatched, max_seq_len=64)


def test_sampled_speculative_decoding_follows_the_target_distribution(tmp_path):
    """Joint law of the first three emitted tokens on an 8-token vocabulary vs the exact law of the
    target, enumerated with transformers: chi-square over 8^3 cells (rare cells pooled)."""
    from test_rejection_sample_distribution import chi_square_p_value

    vocab, trials = 8, 12_000
    # A sharpened random model, so that drafts are sometimes right, sometimes not.
    hf = write_tiny_llama(tmp_path, vocab, hidden=32, layers=2, heads=2, kv_heads=1, max_positions=64, sharpen=6.0,
                          seed=1)
    model = load_model(str(tmp_path), torch.float32)
    prompt = [3, 5, 4]
    temperature = 0.8
    with torch.no_grad():
        sequences = torch.cartesian_prod(*[torch.arange(vocab)] * 2)
        first = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1] / temperature, -1).double()
        contexts = torch.cat([torch.tensor([prompt]).expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
        second = torch.softmax(hf(contexts).logits[:, -1] / temperature, -1).double()  # [a, b]
        pairs = torch.cat([torch.tensor([prompt]).expand(vocab * vocab, -1), sequences], 1)
        third = torch.softmax(hf(pairs).logits[:, -1] / temperature, -1).double().view(vocab, vocab, vocab)
    law = first[:, None, None] * second[:, :, None] * third
    engine = Engine(model, drafter=DraftModelDrafter.self_draft(model, 1, 3), max_batch=64, max_seq_len=16)
    params = [SamplingParams(max_tokens=3, temperature=temperature, seed=s, ignore_eos=True) for s in range(trials)]
    requests = engine.generate([prompt] * trials, params)
    out = torch.tensor([r.generated for r in requests])
    cells = out[:, 0] * vocab * vocab + out[:, 1] * vocab + out[:, 2]
    assert engine.stats.summary(requests)["tau"] > 1.2  # speculation was exercised
    assert chi_square_p_value(cells, law.reshape(-1)) >= 1e-3


class RecordingDrafter(NgramDrafter):
    """An n-gram drafter that also asks for target hidden states and, at every hook, reads the committed
    positions of the engine's captured side cache that are new since the last."""

    capture_layers = (0, 2)

    def __init__(self):
        super().__init__(4, branches=2)
        self.seen: dict[int, list[torch.Tensor]] = {}

    def bind(self, rows, max_seq_len, vocab_size, captured=None):
        self.captured = captured

    def start(self, request):
        n = int(self.captured.seqlens[request.row])
        assert n == len(request.prompt)
        self.seen[request.id] = [self.captured.committed(request.row, 0, n).clone()]

    def accept(self, requests, paths):
        for request, path in zip(requests, paths):
            have, end = sum(h.shape[0] for h in self.seen[request.id]), int(self.captured.seqlens[request.row])
            assert end - have == len(path)  # the round's accepted nodes, no more, no less
            self.seen[request.id].append(self.captured.committed(request.row, have, end).clone())


@pytest.mark.parametrize("prefill_budget", [512, 3])
def test_drafters_receive_the_target_hidden_states_of_every_committed_token(tiny, prefill_budget):
    from dspark.batch import build_round
    from dspark.cache import KVCache

    _, model = tiny
    drafter = RecordingDrafter()
    engine = Engine(model, drafter=drafter, max_batch=4, max_seq_len=128, block_size=8,
                    max_prefill_tokens=prefill_budget)
    requests = engine.generate(PROMPTS[:4], SamplingParams(max_tokens=20, ignore_eos=True))
    c = model.config
    for request in requests:
        committed = request.tokens[:-1][: sum(h.shape[0] for h in drafter.seen[request.id])]
        cache = KVCache(c.num_layers, 1, 128, c.num_kv_heads, c.head_dim, torch.float32)
        _, captured = model.forward(cache, build_round(1, [(0, committed, None)], [0]), capture_layers=(0, 2))
        expected = torch.cat(captured, dim=-1)
        torch.testing.assert_close(torch.cat(drafter.seen[request.id]), expected, rtol=1e-4, atol=1e-4)


def test_transformers_model_as_target_and_as_drafter(tiny):
    from dspark.models.hf_adapter import HFCausalLM

    hf, model = tiny
    adapter = HFCausalLM(hf)
    plain = generated(Engine(model, max_batch=8, max_seq_len=128), PROMPTS)
    assert generated(Engine(adapter, max_batch=8, max_seq_len=128), PROMPTS) == plain
    assert generated(Engine(adapter, drafter=NgramDrafter(6, branches=3), max_batch=3, max_seq_len=128),
                     PROMPTS) == plain
    assert generated(Engine(model, drafter=DraftModelDrafter(adapter, 3), max_batch=8, max_seq_len=128),
                     PROMPTS) == plain
    with pytest.raises(ValueError, match="contiguous"):
        Engine(adapter, max_seq_len=128, block_size=4).generate(PROMPTS[:1], GREEDY)


def test_engine_takes_typed_drafters_and_policies(tiny):
    _, model = tiny

    class DuckDrafter:  # the four calls, but not the interface: refused, not probed with hasattr
        num_draft = 2

        def propose(self, requests, max_draft):
            return []

    with pytest.raises(TypeError, match="drafter must be a dspark.drafters.Drafter"):
        Engine(model, drafter=DuckDrafter(), max_seq_len=64)
    with pytest.raises(TypeError, match="policy must be"):
        Engine(model, drafter=NgramDrafter(2), policy=lambda r, p: [0] * len(r), max_seq_len=64)
    engine = Engine(model, drafter=NgramDrafter(3), max_seq_len=64)
    assert isinstance(engine.policy, FixedLength) and engine.policy.num_draft == 3


@pytest.mark.parametrize("budget", [1, 4, 9, 512])
@pytest.mark.parametrize("block_size", [None, 4])
def test_chunked_prefill_matches_transformers_generate(tiny, budget, block_size):
    """A step prefills at most `budget` prompt tokens (long prompts in chunks over their cached prefix) while
    earlier requests decode: the output is transformers' greedy generate, with and without a drafter."""
    hf, model = tiny
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    sizes = []
    forward = model.forward

    def recording_forward(cache, rnd, capture_layers=()):
        sizes.append(int(rnd.tokens.shape[0]))
        return forward(cache, rnd, capture_layers)

    model.forward = recording_forward
    try:
        for max_batch in (2, 8):
            sizes.clear()
            engine = Engine(model, max_batch=max_batch, max_seq_len=128, block_size=block_size,
                            max_prefill_tokens=budget)
            assert generated(engine, PROMPTS) == expected
            assert engine.stats.prompt_tokens == sum(map(len, PROMPTS))
            assert not engine.prefilling and sorted(engine.free_rows) == list(range(max_batch))
            # A forward holds at most the budget of prompt tokens, or one token per decoding request.
            assert max(sizes) <= max(budget, max_batch)
            speculative = Engine(model, drafter=DraftModelDrafter.self_draft(model, 1, 3), max_batch=max_batch,
                                 max_seq_len=128, block_size=block_size, max_prefill_tokens=budget)
            assert generated(speculative, PROMPTS) == expected
    finally:
        model.forward = forward


def test_chunked_prefill_rounds_interleave_with_decoding(tiny):
    _, model = tiny
    engine = Engine(model, max_batch=4, max_seq_len=128, max_prefill_tokens=4)
    short_id = engine.add_request(PROMPTS[5], GREEDY)  # 2 tokens: prefilled and decoding after one step
    engine.step()
    long_id = engine.add_request(PROMPTS[4], GREEDY)  # 14 tokens: chunks of 4, 4, 4, 2
    chunked = []
    for _ in range(4):
        events = engine.step()
        chunked.append([r.prefilled for r in engine.prefilling])
        # the running request emits a token every step while the long prompt is being prefilled
        assert any(e.request_id == short_id and len(e.new_tokens) == 1 for e in events)
    assert chunked == [[4], [8], [12], []] and {r.id for r in engine.running} == {short_id, long_id}
    # two tokens in the first step (prefill, then a decoding round), one in each of the next four
    assert not engine.finished and len([t for t in engine.running if t.id == short_id][0].generated) == 6
    # An abort while a prompt is being prefilled frees its row.
    third = engine.add_request(PROMPTS[1] * 2, GREEDY)
    engine.step()
    assert [r.id for r in engine.prefilling] == [third]
    row = engine.prefilling[0].row
    assert engine.abort(third) and not engine.prefilling and row in engine.free_rows
    assert int(engine.cache.seqlens[row]) == 0 and engine.finished[third].finish_reason == "abort"
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        Engine(model, max_seq_len=64, max_prefill_tokens=0)


@pytest.mark.parametrize("block_size", [None, 4])
def test_a_failing_prefill_chunk_ends_only_its_request(tiny, block_size):
    hf, model = tiny
    expected = generated(Engine(model, max_batch=1, max_seq_len=128), PROMPTS[:1])[0]
    engine = Engine(model, max_batch=2, max_seq_len=128, block_size=block_size, max_prefill_tokens=4)
    ok_id = engine.add_request(PROMPTS[0], GREEDY)  # 7 tokens: two chunks
    engine.step()
    engine.step()
    long_id = engine.add_request(PROMPTS[4], GREEDY)
    engine.step()  # the long prompt's first chunk
    forward = model.forward

    def failing_forward(cache, rnd, capture_layers=()):
        if rnd.prefill:
            raise RuntimeError("out of memory (simulated)")
        return forward(cache, rnd, capture_layers)

    model.forward = failing_forward
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            engine.step()
    finally:
        model.forward = forward
    failed = engine.finished[long_id]
    assert failed.finish_reason == "error" and not engine.prefilling and failed.row in engine.free_rows
    assert int(engine.cache.seqlens[failed.row]) == 0
    while engine.has_work():
        engine.step()
    assert engine.finished[ok_id].generated == expected and sorted(engine.free_rows) == [0, 1]


def test_chunked_prefill_through_the_transformers_adapter_and_sampling(tiny):
    from dspark.models.hf_adapter import HFCausalLM

    hf, model = tiny
    adapter = HFCausalLM(hf)
    plain = generated(Engine(model, max_batch=8, max_seq_len=128), PROMPTS)
    assert generated(Engine(adapter, max_batch=3, max_seq_len=128, max_prefill_tokens=5), PROMPTS) == plain
    sampled = [SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True) for s in range(len(PROMPTS))]
    whole = [r.generated for r in Engine(model, max_batch=8, max_seq_len=128).generate(PROMPTS, sampled)]
    chunked = [r.generated for r in Engine(model, max_batch=8, max_seq_len=128, max_prefill_tokens=3)
               .generate(PROMPTS, sampled)]
    assert chunked == whole and len({tuple(t) for t in whole}) > 1


def test_engine_takes_any_target_model_and_refuses_other_objects(tiny):
    _, model = tiny
    plain = generated(Engine(model, max_batch=8, max_seq_len=128), PROMPTS)
    own = delegating_target(model)  # a serving stack's own target: the interface, nothing else
    assert generated(Engine(own, drafter=NgramDrafter(4), max_batch=3, max_seq_len=128), PROMPTS) == plain
    with pytest.raises(TypeError, match="model must be a dspark.models.TargetModel"):
        Engine(model.weights, max_seq_len=64)


def test_round_outputs_come_to_the_host_in_one_copy_unchanged():
    from dspark.batch import outputs_to_host

    gen = torch.Generator().manual_seed(0)
    path_nodes = torch.randint(-1, 8, (5, 4), generator=gen, dtype=torch.int32)
    counts = torch.randint(0, 5, (5,), generator=gen, dtype=torch.int32)
    emitted = torch.randint(-1, 50_000, (5, 4), generator=gen)
    got = outputs_to_host(path_nodes, counts, emitted)
    for a, b in zip(got, (path_nodes, counts, emitted)):
        assert a.dtype == b.dtype and torch.equal(a, b)
