"""EAGLE-3 drafters in the authors' format: the fixture (tests/fixtures/deepspec/eagle3, written by
DeepSpec's Qwen3Eagle3Model) reproduced through our drafter's caches to <= 1e-4 over two rounds, and the
drafter in the Engine: greedy output token-identical to plain decoding, sampled draft rows normalised."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark.cache import SideCache
from dspark.drafters.eagle3 import Eagle3Drafter, load_eagle3
from dspark.engine import Engine, Request
from dspark.models import load_model
from dspark.sampling_params import SamplingParams
from builders import write_tiny_llama

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "deepspec", "eagle3")
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def reference():
    return load_file(os.path.join(FIXTURE, "reference_outputs.safetensors"))


def test_drafter_reproduces_their_two_rounds(reference):
    features, tokens = reference["input.features"], reference["input.tokens"]
    drafter = Eagle3Drafter(load_eagle3(FIXTURE))
    steps = reference["output.round1.draft_tokens"].numel()
    assert drafter.num_draft == steps  # their ttt_length
    side = SideCache(1, 64, features.shape[-1], torch.float32)  # the engine's captured hidden states
    drafter.bind(1, 64, 96, side)
    request = Request(0, tokens[:9].tolist(), SamplingParams(), row=0)
    request.tokens = tokens[:10].tolist()
    side.append(0, features[:9])
    drafter.start(request)
    rounds = [drafter.propose([request], steps)[0]]
    last = [drafter.last[0].clone()]
    request.tokens = tokens[:13].tolist()
    side.append(0, features[9:12])
    drafter.accept([request], [[0, 1, 2]])
    rounds.append(drafter.propose([request], steps)[0])
    last.append(drafter.last[0].clone())
    for name, proposal, hidden in zip(("round1", "round2"), rounds, last):
        assert proposal.tokens == reference[f"output.{name}.draft_tokens"].tolist()
        assert float((hidden - reference[f"output.{name}.anchor_hidden"]).abs().max()) <= TOLERANCE
        expected = torch.softmax(reference[f"output.{name}.logits"], -1).max(-1).values
        assert torch.allclose(proposal.confidences, expected, atol=TOLERANCE)
    with torch.inference_mode():
        first_logits = drafter.model.logits(last[1][None])[0]
    assert float((first_logits - reference["output.round2.logits"][0]).abs().max()) <= TOLERANCE


def test_layer_math_is_checked_by_the_fixture(reference):
    """Dropping the hidden_norm (one of EAGLE-3's two input norms) must break the match."""
    model = load_eagle3(FIXTURE)
    with torch.no_grad():
        model.layers[0].hidden_norm.fill_(1.0)
    drafter = Eagle3Drafter(model)
    features = reference["input.features"]
    side = SideCache(1, 64, features.shape[-1], torch.float32)
    drafter.bind(1, 64, 96, side)
    tokens = reference["input.tokens"]
    request = Request(0, tokens[:9].tolist(), SamplingParams(), row=0)
    request.tokens = tokens[:10].tolist()
    side.append(0, features[:9])
    drafter.start(request)
    drafter.propose([request], 1)  # commits the prompt's positions
    assert float((drafter.last[0] - reference["output.round1.anchor_hidden"]).abs().max()) > 100 * TOLERANCE


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = tmp_path_factory.mktemp("target")
    write_tiny_llama(path, 96, 64, 6, sharpen=3.0, seed=4)
    return load_model(str(path), torch.float32)


PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [9, 10, 11, 12, 13, 9, 10], [40], [3, 4, 3, 4, 3, 4, 3, 4, 3]]


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_is_token_identical_to_plain(target, batch):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    plain = [r.generated for r in Engine(target, max_batch=batch).generate(PROMPTS, params)]
    drafter = Eagle3Drafter.from_pretrained(FIXTURE, target, num_draft=3)
    engine = Engine(target, drafter=drafter, max_batch=batch)
    assert [r.generated for r in engine.generate(PROMPTS, params)] == plain
    assert engine.stats.rounds < sum(len(g) for g in plain)  # it drafted (the target's own head shares nothing)


def test_sampled_drafts_report_their_distributions(target):
    drafter = Eagle3Drafter.from_pretrained(FIXTURE, target, num_draft=3)
    engine = Engine(target, drafter=drafter, max_batch=2)
    seen = []
    original = drafter.propose

    def spy(requests, max_draft):
        proposals = original(requests, max_draft)
        seen.extend(proposals)
        return proposals

    drafter.propose = spy
    params = SamplingParams(max_tokens=12, temperature=0.8, top_k=20, seed=3, ignore_eos=True)
    engine.generate(PROMPTS[:2], params)
    assert seen
    for p in (p for p in seen if p.tokens):  # a request's last token leaves no room to draft: nothing to report
        assert p.draft_probs.shape == (len(p.tokens) + 1, 96)
        assert torch.allclose(p.draft_probs[:-1].sum(-1), torch.ones(len(p.tokens)), atol=1e-5)
        assert all(p.draft_probs[i, t] > 0 for i, t in enumerate(p.tokens))
        assert int((p.draft_probs[0] > 0).sum()) <= 20  # top-k applied


def test_loader_errors(tmp_path):
    folder = tmp_path / "e"
    shutil.copytree(FIXTURE, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["d2t"] = torch.zeros(4, dtype=torch.int64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError, match="d2t"):
        load_eagle3(str(folder))
    with open(folder / "config.json") as f:
        raw = json.load(f)
    raw["architectures"] = ["Qwen3DSparkModel"]
    with open(folder / "config.json", "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match="Qwen3Eagle3Model"):
        load_eagle3(str(folder))


def test_cli_runs_an_eagle3_folder(target, tmp_path):
    from dspark.cli.generate import make_drafter

    drafter = make_drafter(f"eagle3:{FIXTURE}", target, 2, torch.float32, "cpu")
    assert isinstance(drafter, Eagle3Drafter) and drafter.num_draft == 2
    from dspark.drafters import DSparkDrafter

    with pytest.raises(ValueError, match="Eagle3Drafter"):
        DSparkDrafter.from_pretrained(FIXTURE, target)
