"""The DSpark drafter beside a natively quantized target: drafting through the target's GGUF LM head rows and
through Q8_0 blocks of the drafter's own matrices, with the draft law reported exactly and greedy output unchanged."""

from __future__ import annotations

import pytest
import torch

from dspark.drafters.draft_sampling import processed_probs
from dspark.drafters.dspark import DSparkDrafter
from dspark.engine import Engine
from dspark.sampling_params import SamplingParams
from dspark.scheduler import FixedLength
from test_dspark_drafter import (DRAFT_PROMPT, GREEDY, PROMPTS, SUBSET, VOCAB, bigram_oracle, captured, make_model,
                                 one_thread, propose_once, replayed_draws, tiny)  # noqa: F401 (fixtures)


def natively_quantized(target):
    """The target with its tied embedding / LM head as Q8_0 blocks, as a natively loaded GGUF keeps it."""
    from dspark.models.llama import LlamaModel
    from dspark.models.quantized import QuantizedWeight

    weights = dict(target.weights)
    head = weights["lm_head.weight"]
    weights["embed_tokens.weight"] = weights["lm_head.weight"] = QuantizedWeight.from_dense(head)
    return LlamaModel(target.config, weights)


@pytest.mark.parametrize("vocab", [None, SUBSET])
def test_natively_quantized_head_drafts_through_its_blocks(tiny, vocab):
    """A few block rows take the target's own GGUF head (its rows of the draft vocabulary): exactly
    quantized_linear over those blocks; many rows take the dense copy, exactly its product."""
    from dspark.drafters.dspark import QUANTIZED_HEAD_MAX_ROWS
    from dspark.models.linear import linear
    from dspark.models.quantized import quantized_linear

    target = natively_quantized(tiny)
    model = make_model(target, "dspark", "markov")
    drafter = DSparkDrafter(model, draft_vocab=vocab)
    ids = torch.arange(VOCAB) if vocab is None else vocab.unique()
    blocks = target.lm_head().rows(ids)
    gen = torch.Generator().manual_seed(7)
    few = torch.randn(2, 3, 64, generator=gen)
    assert torch.equal(drafter._logits(few), quantized_linear(few, blocks).float())
    many = torch.randn(QUANTIZED_HEAD_MAX_ROWS + 1, 64, generator=gen)
    assert torch.equal(drafter._logits(many), linear(many, model.lm_head_weight[ids].contiguous()).float())
    assert not torch.equal(quantized_linear(many, blocks), linear(many, model.lm_head_weight[ids]))


def test_natively_quantized_head_keeps_greedy_identity(tiny):
    target = natively_quantized(tiny)
    plain = [r.generated for r in Engine(target, max_batch=8, max_seq_len=128).generate(PROMPTS, GREEDY)]
    drafter = DSparkDrafter(make_model(target, "dspark", "markov"), draft_vocab=SUBSET)
    engine = Engine(target, drafter=drafter, policy=FixedLength(4), max_batch=4, max_seq_len=128)
    assert [r.generated for r in engine.generate(PROMPTS, GREEDY)] == plain


def test_q8_0_drafter_weights_replace_every_quantizable_projection(tiny):
    """quantize_weights writes each projection's Q8_0 blocks (as ggml would); inference runs through them,
    while a call that trains the weights still takes the dense ones (their gradients flow)."""
    from dspark.drafters.dspark_layers import Linear
    from dspark.models.quantized import QuantizedWeight, quantized_linear

    model = make_model(tiny, "dspark", "rnn").quantize_weights("q8_0")
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    quantized = [m for m in linears if m.blocks is not None]
    assert len(quantized) >= 2 * 4 + 1  # every draft layer's projections and the context projection
    for m in linears:
        assert (m.blocks is not None) == (m.in_features % 32 == 0 and m.out_features >= 32)
    layer = model.layers[0].q_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(layer(x), quantized_linear(x, QuantizedWeight.from_dense(layer.weight)))
        assert not torch.allclose(layer(x), x @ layer.weight.T, rtol=1e-4, atol=1e-5)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    meta = make_model(tiny, "dspark", "markov").to("meta")
    with pytest.raises(ValueError, match="CPU only"):
        meta.quantize_weights("q8_0")


@pytest.mark.parametrize("kind,head", [("dspark", "markov"), ("eagle", "none")])
def test_q8_0_drafter_draws_from_the_rows_it_reports(tiny, kind, head):
    """Rejection sampling stays lossless for any draft law as long as draft_probs is the law the tokens were
    drawn from: with Q8_0 weights, the rows are the quantized model's own (not the dense one's) and the
    tokens replay from them."""
    dense = make_model(tiny, kind, head)
    model = make_model(tiny, kind, head).quantize_weights("q8_0")
    params = SamplingParams(temperature=0.9, seed=11)
    request, proposal = propose_once(DSparkDrafter(model), tiny, params)
    prompt = DRAFT_PROMPT
    n = len(proposal.tokens)
    rows = proposal.draft_probs[:n]
    assert replayed_draws(rows, params.seed) == proposal.tokens
    tokens = torch.tensor(request.tokens + proposal.tokens)
    features = captured(tiny, tokens.tolist(), model.config.target_layers)
    with torch.no_grad():
        logits, _ = model.train_forward(features, tokens, torch.tensor([len(prompt)]))
        dense_logits, _ = dense.train_forward(features, tokens, torch.tensor([len(prompt)]))
    expected = torch.stack([processed_probs(logits[0, k], 0.9, 0, 1.0) for k in range(n)])
    torch.testing.assert_close(rows, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits[0, :n], dense_logits[0, :n], rtol=1e-4, atol=1e-5)


def test_a_natively_quantized_target_gets_a_q8_0_drafter_with_greedy_identity(tiny, tmp_path):
    """from_pretrained(weights=drafter_weights_for(target)), as `dspark generate` loads it: Q8_0 drafting
    for a target that computes with GGUF blocks, dense for a dense one; greedy output stays the target's."""
    from dspark.drafters.dspark import drafter_weights_for
    from dspark.drafters.dspark_model import save_drafter

    target = natively_quantized(tiny)
    assert drafter_weights_for(target) == "q8_0" and drafter_weights_for(tiny) is None
    plain = [r.generated for r in Engine(target, max_batch=8, max_seq_len=128).generate(PROMPTS, GREEDY)]
    save_drafter(bigram_oracle(target, plain), str(tmp_path))  # multi-token acceptance through Q8_0 layers
    drafter = DSparkDrafter.from_pretrained(str(tmp_path), target, 4, weights=drafter_weights_for(target))
    assert drafter.model.fc.blocks is not None and drafter.model.layers[0].q_proj.blocks is not None
    engine = Engine(target, drafter=drafter, policy=FixedLength(4), max_batch=4, max_seq_len=128)
    requests = engine.generate(PROMPTS, GREEDY)
    assert [r.generated for r in requests] == plain
    assert engine.stats.rounds * 2 < sum(len(t) for t in plain)
