"""DSpark drafter (markov, rnn, DFlash-style "none", EAGLE-style): draft probabilities are normalised
and are the rows the tokens were drawn from (and equal the teacher-forced training forward); greedy
speculative output is token-identical to plain decoding (batch 1 and several, contiguous and paged);
sampled output follows the target's law; the drafter's context caches stay aligned with the committed
tokens; save/load round-trips. Tiny random Llama models keep it fast."""

from __future__ import annotations

import pytest
import torch

from dspark.batch import build_round
from dspark.cache import KVCache, SideCache
from dspark.drafters.draft_sampling import processed_probs
from dspark.drafters.dspark import DSparkDrafter
from dspark.drafters.dspark_layers import DSparkConfig
from dspark.drafters.dspark_model import DSparkModel, save_drafter
from dspark.engine import Engine
from dspark.models import load_model
from dspark.sampling_params import SamplingParams
from dspark.scheduler import AsyncScheduler, ConfidenceThreshold, FixedLength, PrefixScheduler
from dspark.profiling import SPSCurve
from builders import threads, write_tiny_llama

transformers = pytest.importorskip("transformers")

VOCAB = 97
PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [9, 10, 11, 12, 13, 9, 10, 11, 30, 31], [40], [3, 4, 3, 4, 3, 4, 3, 4, 3],
           [70, 71]]
GREEDY = SamplingParams(max_tokens=16, ignore_eos=True)
VARIANTS = [("dspark", "markov"), ("dspark", "rnn"), ("dspark", "none"), ("eagle", "none")]


def tiny_target(path, vocab=VOCAB, hidden=64, layers=3, sharpen=1.0, seed=0):
    write_tiny_llama(path, vocab, hidden, layers, sharpen=sharpen, seed=seed)
    return load_model(str(path), torch.float32)


def make_model(target, kind, head, gamma=4, rank=16, seed=1) -> DSparkModel:
    torch.manual_seed(seed)
    config = DSparkConfig.for_target(target.config, [0, target.config.num_layers - 1], kind=kind, head=head,
                                     num_layers=2, gamma=gamma, rank=rank)
    model = DSparkModel(config)
    if head != "none":
        with torch.no_grad():  # a random (not zero) sequential head, so that it shapes the drafts
            model.w2.weight.normal_(0, 1.0)
    return model.attach(target).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: on a shared 2-core machine, intra-op threads only contend (10x slower)."""
    with threads(1):
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_target(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def plain(tiny):
    return [r.generated for r in Engine(tiny, max_batch=8, max_seq_len=128).generate(PROMPTS, GREEDY)]


def bigram_oracle(target, plain_outputs) -> DSparkModel:
    """A Markov drafter whose head encodes the target's greedy bigrams (rank = vocabulary, W1 = I), so
    greedy drafts are often right and the identity test exercises multi-token acceptance."""
    model = make_model(target, "dspark", "markov", rank=VOCAB)
    with torch.no_grad():
        model.w1.weight.copy_(torch.eye(VOCAB))
        model.w2.weight.zero_()
        for prompt, out in zip(PROMPTS, plain_outputs):
            seq = prompt + out
            for a, b in zip(seq[:-1], seq[1:]):
                model.w2.weight[:, a] = 0.0
                model.w2.weight[b, a] = 50.0
    return model


@pytest.mark.parametrize("kind,head", VARIANTS + [("oracle", "markov")])
@pytest.mark.parametrize("batch,block_size", [(1, None), (4, None), (3, 4)])
def test_greedy_is_token_identical_to_plain(tiny, plain, kind, head, batch, block_size):
    model = bigram_oracle(tiny, plain) if kind == "oracle" else make_model(tiny, kind, head)
    engine = Engine(tiny, drafter=DSparkDrafter(model), policy=FixedLength(model.config.gamma), max_batch=batch,
                    max_seq_len=128, block_size=block_size)  # fixed: a measured SPS curve would make it timing-dependent
    assert [r.generated for r in engine.generate(PROMPTS, GREEDY)] == plain
    if kind == "oracle":
        assert engine.stats.rounds * 2 < sum(len(t) for t in plain)


@pytest.mark.parametrize("kind,head", [("oracle", "markov"), ("eagle", "none")])
def test_greedy_through_graph_rounds_is_token_identical_to_plain(tiny, plain, kind, head):
    """The captured hidden states a drafter reads go through the padded graph rounds (dspark.round_graphs;
    on CPU they run eagerly), padding into a scratch row the drafter's own caches also hold."""
    model = bigram_oracle(tiny, plain) if kind == "oracle" else make_model(tiny, kind, head)
    engine = Engine(tiny, drafter=DSparkDrafter(model), policy=FixedLength(model.config.gamma), max_batch=3,
                    max_seq_len=128, block_size=4, cuda_graphs=True)
    assert [r.generated for r in engine.generate(PROMPTS, GREEDY)] == plain
    assert engine.graphs.captured_buckets


# A CPU-like curve (flat for a few tokens, then falling) so that the schedulers cut drafts short.
SPS = SPSCurve([1, 4, 8, 16, 32], [20.0, 19.0, 15.0, 9.0, 5.0])
POLICIES = {"threshold": lambda: ConfidenceThreshold(0.3), "prefix": lambda: PrefixScheduler(SPS),
            "async": lambda: AsyncScheduler(SPS), "default": lambda: None}


@pytest.mark.parametrize("policy", list(POLICIES))
def test_greedy_is_token_identical_under_every_policy(tiny, plain, policy):
    model = bigram_oracle(tiny, plain)
    engine = Engine(tiny, drafter=DSparkDrafter(model), policy=POLICIES[policy](), max_batch=4, max_seq_len=128)
    assert [r.generated for r in engine.generate(PROMPTS, GREEDY)] == plain
    assert engine.stats.rounds < sum(len(t) for t in plain)  # drafts were verified and accepted
    if policy == "default":  # measuring an SPS curve is explicit, never a side effect of Engine()
        assert isinstance(engine.policy, FixedLength) and engine.policy.num_draft == engine.drafter.num_draft


@pytest.mark.parametrize("steps_per_second,batch", [((20.0, 10.0), 4), ((20.0, 10.2), 1)])
def test_gated_scheduler_drafts_rarely_when_drafts_cannot_pay(tiny, plain, steps_per_second, batch):
    """Verification that costs (about) as much per token as decoding. Where even a certain draft token would
    not pay (20 steps/s of 1 token, 10 of 2), the prefix scheduler never asks the drafter. Where only a
    near-certain one would (10.2: a_1 > 0.96), requests draft a first time and then only on the draft gate's
    probe rounds (every 8th, then rarer). Either way nothing is verified and the output is the target's."""
    drafter = DSparkDrafter(bigram_oracle(tiny, plain))
    calls = []
    propose = drafter.propose_pruned  # what the engine calls
    drafter.propose_pruned = lambda requests, *limits: calls.append(len(requests)) or propose(requests, *limits)
    engine = Engine(tiny, drafter=drafter, policy=PrefixScheduler(SPSCurve([1, 2], list(steps_per_second))),
                    max_batch=batch, max_seq_len=128)
    requests = engine.generate(PROMPTS, GREEDY)
    assert [r.generated for r in requests] == plain
    rounds = sum(r.stats.rounds for r in requests)  # per request; the first token comes from the prefill
    assert rounds == sum(len(t) for t in plain) - len(PROMPTS)  # nothing verified: plain decoding
    if steps_per_second[1] * 2 <= steps_per_second[0]:
        assert not calls
    else:
        assert 0 < sum(calls) <= rounds // 8 + 2 * len(PROMPTS)  # a first draft each, then probes


class Req:
    def __init__(self, tokens, params, row=0):
        self.id, self.row, self.tokens, self.params, self.finish_reason = row, row, list(tokens), params, None


def captured(target, tokens, layers):
    c = target.config
    cache = KVCache(c.num_layers, 1, 128, c.num_kv_heads, c.head_dim, torch.float32)
    _, caps = target.forward(cache, build_round(1, [(0, list(tokens), None)], [0]), tuple(layers))
    return torch.cat(caps, dim=-1).clone()


def bind(drafter, rows: int, max_seq_len: int = 128) -> None:
    """As the engine binds a drafter: with a side cache of the target's captured hidden states."""
    c = drafter.model.config
    drafter.bind(rows, max_seq_len, VOCAB, SideCache(rows, max_seq_len, len(c.target_layers) * c.target_hidden_size,
                                                     torch.float32))


def start(drafter, request, features) -> None:
    """A request joins with its prompt's captured hidden states in the side cache."""
    drafter.captured.append(request.row, features)
    drafter.start(request)


DRAFT_PROMPT = [5, 6, 7, 8, 9, 10]


def propose_once(drafter, target, params, rows: int = 1):
    """Bind the drafter, start one request in row 0 after DRAFT_PROMPT (its first generated token, 11, is the
    anchor) and draft up to 8 tokens: (the request, its proposal)."""
    bind(drafter, rows)
    request = Req(DRAFT_PROMPT + [11], params)
    start(drafter, request, captured(target, DRAFT_PROMPT, drafter.model.config.target_layers))
    [proposal] = drafter.propose([request], 8)
    return request, proposal


@pytest.mark.parametrize("head", ["markov", "rnn", "none"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_pruned_drafting_stops_where_every_survival_falls_below_the_floor(tiny, head, temperature):
    """propose_pruned drafts the unpruned proposal's first nodes (same tokens, confidences and rows, the same
    random stream after it), at least one, and stops at the first position whose survival is below the floor in
    every row. A floor of zero prunes nothing."""
    params = SamplingParams(temperature=temperature, seed=5)
    model = make_model(tiny, "dspark", head, gamma=6, seed=4)
    prompts = [DRAFT_PROMPT + [11], [20, 21, 22, 23, 24, 25, 26]]
    requests = [Req(p, params, row=i) for i, p in enumerate(prompts)]

    def drafts(floor):
        drafter = DSparkDrafter(model)
        bind(drafter, 2)
        for r in requests:
            start(drafter, r, captured(tiny, r.tokens[:-1], model.config.target_layers))
        first = drafter.propose_pruned(requests, 6, floor)
        return first, drafter.propose(requests, 6)  # the next round: the generators must be where they were

    (full, after), seen = drafts(0.0), set()
    survivals = torch.stack([torch.cumprod(p.confidences, 0) for p in full])
    for floor in torch.linspace(0.0, 1.0, 41).tolist():
        pruned, pruned_after = drafts(floor)
        below = [k for k in range(1, 6) if bool((survivals[:, k] < floor).all())]
        n = below[0] if below else 6
        seen.add(n)
        for p, q, r, s in zip(pruned, full, pruned_after, after):
            assert p.tokens == q.tokens[:n]
            torch.testing.assert_close(p.confidences, q.confidences[:n])
            if temperature > 0:
                torch.testing.assert_close(p.draft_probs[:n], q.draft_probs[:n])
            assert r.tokens == s.tokens
    assert len(seen) >= 3 and 6 in seen and 1 in seen


def replayed_draws(rows: torch.Tensor, seed: int) -> list[int]:
    """The drafter's draws replayed from its rows: one uniform per step from the request's generator, by inverse
    CDF."""
    uniforms = torch.rand(rows.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 0xD5))
    cdfs = rows.double().cumsum(-1)
    return [int(torch.searchsorted(cdfs[k], uniforms[k] * cdfs[k, -1], right=True)) for k in range(rows.shape[0])]


@pytest.mark.parametrize("kind,head", VARIANTS)
def test_draft_probs_are_the_distributions_the_tokens_were_drawn_from(tiny, kind, head):
    model = make_model(tiny, kind, head)
    drafter = DSparkDrafter(model)
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=3)
    request, proposal = propose_once(drafter, tiny, params, rows=2)
    prompt = DRAFT_PROMPT
    n = len(proposal.tokens)
    assert n == model.config.gamma and proposal.draft_probs.shape == (n + 1, VOCAB)
    rows = proposal.draft_probs
    torch.testing.assert_close(rows[:n].sum(-1), torch.ones(n))
    assert (rows[n] == 0).all() and proposal.confidences.shape == (n,)
    assert ((proposal.confidences > 0) & (proposal.confidences < 1)).all()
    assert replayed_draws(rows[:n], params.seed) == proposal.tokens
    # The rows are processed softmaxes of the teacher-forced training forward on the drafted prefix.
    tokens = torch.tensor(request.tokens + proposal.tokens)
    logits, confidence_logits = model.train_forward(captured(tiny, tokens.tolist(), model.config.target_layers),
                                                    tokens, torch.tensor([len(prompt)]))
    expected = torch.stack([processed_probs(logits[0, k], 0.7, 40, 0.9) for k in range(n)])
    torch.testing.assert_close(rows[:n], expected, rtol=1e-4, atol=1e-5)
    if confidence_logits is not None:  # confidences: the head's, of the drafted prefix (no calibration here)
        torch.testing.assert_close(proposal.confidences, torch.sigmoid(confidence_logits[0, :n].float()),
                                   rtol=1e-4, atol=1e-5)
    greedy = Req(prompt + [11], SamplingParams(), row=1)
    start(drafter, greedy, captured(tiny, prompt, model.config.target_layers))
    [deterministic] = drafter.propose([greedy], 3)
    assert deterministic.draft_probs is None and len(deterministic.tokens) == 3
    assert deterministic.tokens[0] == int(torch.argmax(logits[0, 0]))


def tiny_target_and_law(path, vocab: int, prompt: list[int], depth: int, temperature: float):
    """A sharp tiny target and the exact law of its first `depth` sampled tokens after `prompt`
    (enumerated with transformers), flattened in lexicographic order of the token tuples."""
    target = tiny_target(path, vocab=vocab, hidden=32, layers=2, sharpen=6.0, seed=1)
    hf = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        seqs = torch.cartesian_prod(*[torch.arange(vocab)] * depth)
        law = torch.ones(len(seqs), dtype=torch.float64)
        for d in range(depth):
            ctx = torch.cat([torch.tensor([prompt]).expand(len(seqs), -1), seqs[:, :d]], 1)
            probs = torch.softmax(hf(ctx).logits[:, -1] / temperature, -1).double()
            law *= probs.gather(1, seqs[:, d: d + 1]).squeeze(1)
    return target, law


def test_sampled_output_follows_the_target_distribution(tmp_path):
    """Joint law of the first three emitted tokens (8-token vocabulary) vs the target's exact law: the
    first round verifies 3 drafts, so the Markov head's dependence on x_{k-1} is in play."""
    from test_rejection_sample_distribution import chi_square_p_value

    vocab, trials, temperature, prompt = 8, 3000, 0.8, [3, 5, 4]
    target, law = tiny_target_and_law(tmp_path, vocab, prompt, 3, temperature)
    model = make_model(target, "dspark", "markov", gamma=3, rank=8)
    engine = Engine(target, drafter=DSparkDrafter(model), policy=FixedLength(3), max_batch=64, max_seq_len=16)
    params = [SamplingParams(max_tokens=5, temperature=temperature, seed=s, ignore_eos=True) for s in range(trials)]
    requests = engine.generate([prompt] * trials, params)
    out = torch.tensor([r.generated[:3] for r in requests])
    cells = out[:, 0] * vocab * vocab + out[:, 1] * vocab + out[:, 2]
    assert engine.stats.summary(requests)["tau"] > 1.3  # drafts were accepted
    assert chi_square_p_value(cells, law) >= 1e-3


SUBSET = torch.tensor(sorted({3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83,
                               89, 97 - 1}))


@pytest.mark.parametrize("kind,head", [("dspark", "markov"), ("dspark", "rnn"), ("eagle", "none")])
def test_draft_vocabulary_subset_probs(tiny, kind, head):
    """Drafting over a token subset S: tokens from S, rows zero outside S and exactly the processed
    softmax over S of the full-vocabulary logits (the training forward's), replayable draws."""
    model = make_model(tiny, kind, head)
    drafter = DSparkDrafter(model, draft_vocab=SUBSET)
    params = SamplingParams(temperature=0.9, seed=4)
    request, proposal = propose_once(drafter, tiny, params)
    prompt = DRAFT_PROMPT
    n = len(proposal.tokens)
    # Rows come over the draft vocabulary itself (rejection_sample reads q = 0 elsewhere); widened here.
    assert torch.equal(proposal.draft_vocab, SUBSET.unique()) and proposal.draft_probs.shape == (n + 1, SUBSET.numel())
    rows = torch.zeros(n + 1, VOCAB).index_copy_(1, proposal.draft_vocab, proposal.draft_probs)
    assert set(proposal.tokens) <= set(SUBSET.tolist())
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[SUBSET] = False
    assert (rows[:, outside] == 0).all()
    torch.testing.assert_close(rows[:n].sum(-1), torch.ones(n))
    uniforms = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(params.seed + 0xD5))
    cdfs = proposal.draft_probs[:n].double().cumsum(-1)
    assert [int(proposal.draft_vocab[torch.searchsorted(cdfs[k], uniforms[k] * cdfs[k, -1], right=True)])
            for k in range(n)] == proposal.tokens
    tokens = torch.tensor(request.tokens + proposal.tokens)
    logits, _ = model.train_forward(captured(tiny, tokens.tolist(), model.config.target_layers), tokens,
                                    torch.tensor([len(prompt)]))
    expected = torch.softmax(logits[0, :n, SUBSET] / 0.9, -1)
    torch.testing.assert_close(rows[:n, SUBSET], expected, rtol=1e-4, atol=1e-5)
    for bad, match in ((torch.tensor([1, 1]), "repeated"), (torch.tensor([VOCAB]), "lie in"),
                       (torch.tensor([]), "non-empty"), (torch.tensor([0.5]), "token ids")):
        with pytest.raises(ValueError, match=match):
            DSparkDrafter(model, draft_vocab=bad)


def test_draft_vocabulary_subset_greedy_and_sampled_stay_lossless(tiny, plain, tmp_path):
    oracle = bigram_oracle(tiny, plain)
    greedy = Engine(tiny, drafter=DSparkDrafter(oracle, draft_vocab=SUBSET), policy=FixedLength(4), max_batch=4,
                    max_seq_len=128)
    assert [r.generated for r in greedy.generate(PROMPTS, GREEDY)] == plain
    from test_rejection_sample_distribution import chi_square_p_value

    vocab, trials, prompt = 8, 3000, [3, 5, 4]
    target, law = tiny_target_and_law(tmp_path, vocab, prompt, 2, 1.0)
    model = make_model(target, "dspark", "markov", gamma=3, rank=8)
    drafter = DSparkDrafter(model, draft_vocab=torch.tensor([1, 2, 4, 6]))  # half the vocabulary
    engine = Engine(target, drafter=drafter, policy=FixedLength(3), max_batch=64, max_seq_len=16)
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=s, ignore_eos=True) for s in range(trials)]
    out = torch.tensor([r.generated[:2] for r in engine.generate([prompt] * trials, params)])
    assert chi_square_p_value(out[:, 0] * vocab + out[:, 1], law) >= 1e-3


@pytest.mark.parametrize("kind,head", [("dspark", "markov"), ("eagle", "none")])
def test_context_caches_stay_aligned_with_committed_tokens(tiny, kind, head):
    """After every round (rejections included), the drafter's features and each layer's context K/V
    equal what a fresh target forward over the committed tokens gives."""
    model = make_model(tiny, kind, head)
    drafter = DSparkDrafter(model)
    engine = Engine(tiny, drafter=drafter, max_batch=3, max_seq_len=128, block_size=4)
    for prompt in PROMPTS[:3]:
        engine.add_request(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=len(prompt), ignore_eos=True))
    checks = 0
    while engine.has_work():
        engine.step()
        drafter.commit_pending(engine.running)  # what the next proposal does first
        for r in engine.running:
            n = int(drafter.kv.seqlens[r.row])
            assert n == len(r.tokens) - 1
            feats = captured(tiny, r.tokens[:n], model.config.target_layers)
            with torch.no_grad():
                ctx = model.context(feats)
                if kind == "dspark":
                    expected = model.context_kv(ctx, torch.arange(n))
                else:
                    shifted = torch.cat([torch.zeros_like(ctx[:1]), ctx[:-1]])
                    x = model.eagle_input(torch.tensor(r.tokens[:n]), shifted)[None]
                    _, block = model.eagle_run(x, torch.arange(n)[None], model.empty_kv(1, "cpu"), None)
                    expected = [(k[0], v[0]) for k, v in block]
            torch.testing.assert_close(drafter.features.data[r.row, :n, 0], ctx, rtol=1e-4, atol=1e-4)
            for layer, (k, v) in enumerate(expected):
                torch.testing.assert_close(drafter.kv.k[layer, r.row, :n], k, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(drafter.kv.v[layer, r.row, :n], v, rtol=1e-4, atol=1e-4)
            checks += 1
    assert checks > 10


@pytest.mark.parametrize("kind,head", [("dspark", "rnn"), ("eagle", "none")])
def test_save_load_round_trips(tiny, tmp_path, kind, head):
    from safetensors.torch import load_file

    model = make_model(tiny, kind, head)
    model.config.calibration = [1.0, 1.5, 2.0, 2.0]
    model.config.calibration_shift = [0.5, -0.2, 0.0, -1.0]
    save_drafter(model, str(tmp_path), {"training": {"note": "test"}})
    saved = load_file(tmp_path / "model.safetensors")  # the drafter's own weights, never the target's
    assert saved.keys() == model.state_dict().keys()
    assert not any(t.shape == tiny.weights["embed_tokens.weight"].shape for t in saved.values())
    loaded = DSparkDrafter.from_pretrained(str(tmp_path), tiny)
    assert loaded.model.config == model.config

    def run(drafter):
        params = SamplingParams(max_tokens=12, temperature=0.9, seed=5, ignore_eos=True)
        engine = Engine(tiny, drafter=drafter, max_batch=2, max_seq_len=64)
        engine.add_request(PROMPTS[1], params)
        engine.step()
        [proposal] = drafter.propose(engine.running, 8)
        return proposal

    a, b = run(DSparkDrafter(model)), run(loaded)
    assert a.tokens == b.tokens
    torch.testing.assert_close(a.draft_probs, b.draft_probs)
    torch.testing.assert_close(a.confidences, b.confidences)


def test_export_ships_bf16_weights_and_only_the_drafter_files(tiny, tmp_path):
    from safetensors.torch import load_file

    from dspark.cli import main as cli_main
    from dspark.drafters.dspark import save_draft_vocab

    model = make_model(tiny, "dspark", "markov")
    model.config.calibration = [1.0, 1.3, 1.6, 2.0]
    trained, shipped = tmp_path / "run", tmp_path / "shipped"
    save_drafter(model, str(trained), {"training": {"note": "test"}})
    save_draft_vocab(str(trained), SUBSET.tolist(), 0.9, "data.jsonl")
    (trained / "trainer_state.pt").write_bytes(b"optimizer state")
    assert cli_main(["export-drafter", str(trained), str(shipped)]) == 0
    assert sorted(p.name for p in shipped.iterdir()) == ["config.json", "draft_vocab.json", "model.safetensors"]
    weights = load_file(shipped / "model.safetensors")
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    for name, w in model.state_dict().items():
        torch.testing.assert_close(weights[name], w.to(torch.bfloat16), rtol=0, atol=0)
    loaded = DSparkDrafter.from_pretrained(str(shipped), tiny)
    assert loaded.model.config == model.config and loaded.vocab_ids.tolist() == sorted(SUBSET.tolist())
    with pytest.raises(ValueError, match="not a DSpark drafter"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "config.json").write_text('{"architecture": "LlamaForCausalLM"}')
        cli_main(["export-drafter", str(tmp_path / "other"), str(tmp_path / "out")])


def test_rope_frequencies_stay_fp32_when_the_drafter_is_cast(tiny):
    """Training runs RoPE in fp32; a drafter cast to bf16 for inference must rotate by the same angles."""
    from dspark.models.layers import rope_frequencies

    model = make_model(tiny, "dspark", "markov").to(torch.bfloat16)
    c = model.config
    assert model.norm.dtype == torch.bfloat16 and model.inv_freq.dtype == torch.float32
    assert torch.equal(model.inv_freq, rope_frequencies(c.rope_theta, c.head_dim).float())
    assert not torch.equal(model.inv_freq, model.inv_freq.bfloat16().float())  # bf16 would have rounded them
