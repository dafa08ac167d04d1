"""DeepSpec-format drafters (the authors' checkpoints) against the authors' own outputs.

The fixtures under tests/fixtures/deepspec were written by THEIR classes (make_fixtures.py there): a
tiny random Qwen3 DSpark drafter per sequential head (vanilla Markov, gated, RNN) and a DFlash drafter,
with their block hidden states, base and corrected logits, greedy drafts and confidence logits for two
rounds through their draft cache. Our loader must reproduce every tensor to <= 1e-4 (fp32), through
the model API and through the engine-facing DSparkDrafter with its own context caches; without
q/k-norm it must not. Export writes their format back, and a reload is identical.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark.cache import SideCache
from dspark.drafters.deepspec_format import export_deepspec
from dspark.drafters.dspark import DSparkDrafter
from dspark.drafters.dspark_layers import DSparkConfig
from dspark.drafters.dspark_model import DSparkModel, load_drafter_model
from dspark.engine import Request
from dspark.models import load_model
from dspark.sampling_params import SamplingParams
from builders import write_tiny_llama

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "deepspec")
VARIANTS = ("dspark_vanilla", "dspark_gated", "dspark_rnn", "dflash")
TOLERANCE = 1e-4


def fixture(name):
    folder = os.path.join(FIXTURES, name)
    ref = load_file(os.path.join(folder, "reference_outputs.safetensors"))
    with open(os.path.join(folder, "config.json")) as f:
        raw = json.load(f)
    return folder, raw, ref


def model_rounds(model: DSparkModel, features, tokens, contexts=(9, 12)) -> dict[str, torch.Tensor]:
    """Our model API, from scratch each round: context features of the committed positions, the block
    at the anchor, the sequential head left to right (greedy)."""
    out = {}
    for name, n in zip(("round1", "round2"), contexts):
        positions = torch.arange(n)
        kv = model.context_kv(model.context(features[:n])[None], positions)
        anchor = tokens[n:n + 1]
        h = model.block(anchor, torch.tensor([n]), kv, None, model.config.gamma)
        base = model.lm_logits(h)
        prev, state, logits, drafted, confs = anchor, None, [], [], []
        for k in range(model.config.gamma):
            bias, conf, state = model.head_step(h[:, k], prev, state)
            step = base[:, k] if bias is None else base[:, k] + bias
            prev = step.argmax(-1)
            logits.append(step[0])
            drafted.append(prev[0])
            confs.append(conf)
        out[f"{name}.block_hidden"] = h[0]
        out[f"{name}.base_logits"] = base[0]
        out[f"{name}.logits"] = torch.stack(logits)
        out[f"{name}.draft_tokens"] = torch.stack(drafted)
        if model.conf is not None:
            out[f"{name}.confidence_logits"] = torch.cat(confs)
    return out


def max_error(ours: dict, ref: dict) -> dict[str, float]:
    errors = {}
    for key, value in ours.items():
        expected = ref[f"output.{key}"]
        assert value.shape == expected.shape, key
        errors[key] = float((value.double() - expected.double()).abs().max())
    return errors


@pytest.mark.parametrize("name", VARIANTS)
@torch.inference_mode()
def test_loader_reproduces_their_outputs(name):
    folder, raw, ref = fixture(name)
    model = load_drafter_model(folder)
    assert model.config.qk_norm and model.config.gamma == raw["block_size"]
    ours = model_rounds(model, ref["input.features"], ref["input.tokens"])
    expected = {k[len("output."):] for k in ref if k.startswith("output.")}
    assert set(ours) == expected
    errors = max_error(ours, ref)
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize("name", ["dspark_vanilla", "dflash"])
@torch.inference_mode()
def test_without_qk_norm_the_outputs_differ(name):
    """The fixture can catch the missing Qwen3 q/k-norm: the same weights without it are far off."""
    folder, _, ref = fixture(name)
    model = load_drafter_model(folder)
    model.config.qk_norm = False  # the layers read their config at run time
    errors = max_error(model_rounds(model, ref["input.features"], ref["input.tokens"]), ref)
    assert errors["round1.block_hidden"] > 100 * TOLERANCE


def drive_drafter(drafter: DSparkDrafter, features, tokens, contexts=(9, 12)):
    """The engine's calls on the drafter: start with a prompt of contexts[0] tokens and a first
    emitted token, propose, accept the next positions, propose again."""
    vocab = drafter.model.config.vocab_size
    side = SideCache(1, 64, features.shape[-1], torch.float32)  # the engine's captured hidden states
    drafter.bind(1, 64, vocab, side)
    n1, n2 = contexts
    request = Request(0, tokens[:n1].tolist(), SamplingParams(temperature=0.0), row=0)
    request.tokens = tokens[:n1 + 1].tolist()
    side.append(0, features[:n1])
    drafter.start(request)
    first = drafter.propose([request], drafter.num_draft)[0]
    request.tokens = tokens[:n2 + 1].tolist()
    side.append(0, features[n1:n2])
    drafter.accept([request], [list(range(n2 - n1))])
    second = drafter.propose([request], drafter.num_draft)[0]
    return first, second


@pytest.mark.parametrize("name", VARIANTS)
def test_drafter_through_its_caches_matches_their_rounds(name):
    folder, _, ref = fixture(name)
    model = load_drafter_model(folder)
    drafter = DSparkDrafter(model)
    first, second = drive_drafter(drafter, ref["input.features"], ref["input.tokens"])
    for proposal, round_name in ((first, "round1"), (second, "round2")):
        assert proposal.tokens == ref[f"output.{round_name}.draft_tokens"].tolist()
        if model.conf is not None:
            expected = torch.sigmoid(ref[f"output.{round_name}.confidence_logits"])
        else:  # DFlash: the drafter's own probability of each (greedy) draft
            expected = torch.softmax(ref[f"output.{round_name}.logits"], -1).max(-1).values
        assert torch.allclose(proposal.confidences.float(), expected, atol=TOLERANCE)


@pytest.mark.parametrize("name", VARIANTS)
def test_export_writes_their_files_back(name, tmp_path):
    """Loading then exporting (fp32) gives back their tensors bit for bit and an equivalent config."""
    folder, raw, _ = fixture(name)
    model = load_drafter_model(folder)
    export_deepspec(model, str(tmp_path), raw["mask_token_id"], raw["num_target_layers"], torch.float32)
    theirs = load_file(os.path.join(folder, "model.safetensors"))
    exported = load_file(os.path.join(tmp_path, "model.safetensors"))
    assert sorted(exported) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(exported[key], value), key
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    for key in ("architectures", "block_size", "target_layer_ids", "mask_token_id", "markov_rank", "vocab_size",
                "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "enable_confidence_head", "num_target_layers", "intermediate_size"):
        assert written[key] == raw[key], key
    for key in ("markov_head_type", "confidence_head_with_markov"):
        assert written.get(key) == raw.get(key), key


def random_qk_norm_drafter(target, head="markov", seed=3) -> DSparkModel:
    torch.manual_seed(seed)
    config = DSparkConfig.for_target(target.config, [0, target.config.num_layers - 1], head=head, num_layers=2,
                                     gamma=4, rank=8, qk_norm=True)
    model = DSparkModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.2 * torch.randn_like(p))  # norms and W2 away from their initial ones/zeros
    return model.attach(target).eval()


@pytest.mark.parametrize("head", ["markov", "gated", "rnn", "none"])
def test_our_drafter_exports_and_reloads_identically(tmp_path, head):
    write_tiny_llama(tmp_path / "target", 97, 64, 3, seed=0)
    target = load_model(str(tmp_path / "target"), torch.float32)
    model = random_qk_norm_drafter(target, head)
    export_deepspec(model, str(tmp_path / "exported"), mask_token_id=96, num_target_layers=3, dtype=torch.float32)
    reloaded = load_drafter_model(str(tmp_path / "exported"), target)
    before, after = model.state_dict(), reloaded.state_dict()
    assert sorted(before) == sorted(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    g = torch.Generator().manual_seed(0)
    features = torch.randn(13, 2 * 64, generator=g)
    tokens = torch.randint(0, 97, (13,), generator=g)
    for a, b in zip(drive_drafter(DSparkDrafter(model), features, tokens),
                    drive_drafter(DSparkDrafter(reloaded), features, tokens)):
        assert a.tokens == b.tokens
        assert torch.equal(a.confidences, b.confidences)


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    write_tiny_llama(tmp_path / "target", 97, 64, 3, seed=0)
    target = load_model(str(tmp_path / "target"), torch.float32)
    plain = DSparkModel(DSparkConfig.for_target(target.config, [0, 2], num_layers=1, gamma=4, rank=8)).attach(target)
    with pytest.raises(ValueError, match="qk_norm"):
        export_deepspec(plain, str(tmp_path / "x"), 96, 3)
    model = random_qk_norm_drafter(target)
    with pytest.raises(ValueError, match="mask_token_id"):
        export_deepspec(model, str(tmp_path / "x"), 97, 3)
    with pytest.raises(ValueError, match="num_target_layers"):
        export_deepspec(model, str(tmp_path / "x"), 5, 2)


def edited_fixture(tmp_path, edit_config=None, edit_tensors=None):
    folder = tmp_path / "edited"
    shutil.copytree(os.path.join(FIXTURES, "dspark_vanilla"), folder)
    if edit_config:
        with open(folder / "config.json") as f:
            raw = json.load(f)
        edit_config(raw)
        with open(folder / "config.json", "w") as f:
            json.dump(raw, f)
    if edit_tensors:
        tensors = load_file(folder / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, folder / "model.safetensors")
    return str(folder)


@pytest.mark.parametrize("edit, match", [
    (lambda raw: raw.update(architectures=["Gemma4DSparkModel"]), "Gemma4DSparkModel"),
    (lambda raw: raw.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "yarn"),
    (lambda raw: raw.update(attention_bias=True), "attention_bias"),
    (lambda raw: raw.update(target_layer_ids=[-1, 2]), "target_layer_ids"),
    (lambda raw: raw.update(markov_head_type="lstm"), "markov_head_type"),
    (lambda raw: raw.update(mask_token_id=96), "mask_token_id"),
])
def test_loader_refuses_unsupported_configs(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        load_drafter_model(edited_fixture(tmp_path, edit_config=edit))


def test_loader_refuses_missing_and_unknown_tensors(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        load_drafter_model(edited_fixture(tmp_path, edit_tensors=lambda t: t.pop("layers.1.self_attn.k_norm.weight")))
    shutil.rmtree(tmp_path / "edited")
    with pytest.raises(ValueError, match="not understood"):
        load_drafter_model(edited_fixture(tmp_path, edit_tensors=lambda t: t.update(extra=torch.ones(2))))


def test_export_command_writes_a_loadable_deepspec_folder(tmp_path):
    from dspark.cli import main
    from dspark.drafters.dspark_model import save_drafter

    write_tiny_llama(tmp_path / "target", 97, 64, 3, seed=0)
    target = load_model(str(tmp_path / "target"), torch.float32)
    model = random_qk_norm_drafter(target, "rnn")
    save_drafter(model, str(tmp_path / "ours"))
    assert main(["export-drafter", str(tmp_path / "ours"), str(tmp_path / "theirs"), "--format", "deepspec",
                 "--model", str(tmp_path / "target"), "--mask-token-id", "96", "--dtype", "fp32"]) == 0
    with open(tmp_path / "theirs" / "config.json") as f:
        raw = json.load(f)
    assert raw["architectures"] == ["Qwen3DSparkModel"] and raw["markov_head_type"] == "rnn"
    reloaded = load_drafter_model(str(tmp_path / "theirs"), target)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match="--mask-token-id"):
        main(["export-drafter", str(tmp_path / "ours"), str(tmp_path / "x"), "--format", "deepspec",
              "--model", str(tmp_path / "target")])
