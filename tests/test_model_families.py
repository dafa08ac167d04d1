"""Llama-family variants against transformers: RoPE scaling (linear, llama3), tied and untied heads,
Llama/Qwen2 biases, Qwen3 q/k norms with head_dim != hidden/heads, Mistral's sliding window. Each
writes a tiny random checkpoint, loads it with dspark (fp32), and compares prefill logits and greedy
generation (plain and speculative). Unsupported features must fail at load with a clear error."""

from __future__ import annotations

import json

import pytest
import torch

from dspark.batch import build_round
from dspark.cache import KVCache
from dspark.drafters import DraftModelDrafter, NgramDrafter
from dspark.engine import Engine
from dspark.models import load_model
from dspark.sampling_params import SamplingParams
from builders import threads

transformers = pytest.importorskip("transformers")

VOCAB = 160
ORIGINAL_CONTEXT = 32  # llama3's original_max_position_embeddings; prompts run well past it
MAX_SEQ_LEN = 96
NEW_TOKENS = 20
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4 * ORIGINAL_CONTEXT, bos_token_id=1, eos_token_id=2,
              initializer_range=0.15)  # larger than the default 0.02: varied, decisive greedy output
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL_CONTEXT}

# With head_dim 16 and theta 1e4 the wavelengths run 6.3 ... 19869, so llama3's high (< 8), medium (8..32)
# and low (> 32) frequency bands all have members.
FAMILIES = {
    "llama_linear_tied_biases": ("LlamaConfig", "LlamaForCausalLM",
                                 dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, tie_word_embeddings=True,
                                      attention_bias=True, mlp_bias=True)),
    "llama3_untied": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False)),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2_untied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=MAX_SEQ_LEN + 32)),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These matrices are tiny: fanning them out over threads costs more than it saves, and on a busy
    machine OpenMP's spin-waiting makes every op ~10x slower still."""
    with threads(1):
        yield


def perturb(hf) -> None:
    """Fresh checkpoints have zero biases and unit norm weights, which would hide a dropped bias or norm."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))


def write_checkpoint(path, family: str, **overrides):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    hf = getattr(transformers, model_name)(config).eval()
    perturb(hf)
    hf.save_pretrained(path, safe_serialization=True)
    return hf


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = write_checkpoint(path, request.param)
    return hf, load_model(str(path), torch.float32)


def prompt_of(length: int, seed: int) -> list[int]:
    """A random prompt with a repeated stretch, so the n-gram drafter has something to propose."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(3, VOCAB, (length - 12,), generator=gen).tolist()
    return head + head[4:16]


PROMPTS = [prompt_of(2 * ORIGINAL_CONTEXT, 0), prompt_of(ORIGINAL_CONTEXT + 20, 1), prompt_of(14, 2)]


def dspark_prefill_logits(model, prompt: list[int]) -> torch.Tensor:
    c = model.config
    cache = KVCache(c.num_layers, 1, MAX_SEQ_LEN, c.num_kv_heads, c.head_dim, model.dtype)
    hidden, _ = model.forward(cache, build_round(1, [(0, prompt, None)], [0]))
    return model.logits(hidden)


def test_prefill_logits_match_transformers(pair):
    hf, model = pair
    prompt = PROMPTS[0]
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0].float()
    ours = dspark_prefill_logits(model, prompt)
    assert expected.std() > 0.1  # logits with structure, not a near-uniform blur
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def hf_greedy(hf, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("drafter", [None, "ngram", "self_draft"])
def test_greedy_generation_matches_transformers(pair, drafter):
    hf, model = pair
    proposer = {None: lambda: None, "ngram": lambda: NgramDrafter(4),
                "self_draft": lambda: DraftModelDrafter.self_draft(model, 1, 3)}[drafter]()
    engine = Engine(model, drafter=proposer, max_batch=len(PROMPTS), max_seq_len=MAX_SEQ_LEN)
    results = engine.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    if not hasattr(hf, "dspark_expected"):  # transformers' generate once per model, not per drafter
        hf.dspark_expected = [hf_greedy(hf, p) for p in PROMPTS]
    assert [r.generated for r in results] == hf.dspark_expected



def test_generation_up_to_the_sliding_window_matches_transformers(tmp_path):
    """A cache exactly as long as Mistral's window: the last position still sees every key."""
    window = 48
    hf = write_checkpoint(tmp_path, "mistral", sliding_window=window)
    model = load_model(str(tmp_path), torch.float32)
    prompt = PROMPTS[1][: window - NEW_TOKENS]
    engine = Engine(model, max_batch=1, max_seq_len=window)
    assert engine.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))[0].generated == \
        hf_greedy(hf, prompt)


def test_sliding_window_shorter_than_the_context_is_refused(tmp_path):
    write_checkpoint(tmp_path, "mistral", sliding_window=32)
    model = load_model(str(tmp_path), torch.float32)
    with pytest.raises(ValueError, match=r"sliding-window attention \(window 32\).*max_seq_len <= 32 \(got 33\)"):
        Engine(model, max_batch=1, max_seq_len=33).generate([[5, 6, 7]], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="sliding-window"):
        dspark_prefill_logits(model, [5, 6, 7])  # its cache holds MAX_SEQ_LEN > 32 positions


def edited_checkpoint(path, family: str, **changes) -> str:
    """A valid checkpoint whose config.json is then edited to something dspark must refuse."""
    write_checkpoint(path, family)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("changes, message", [
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                           "original_max_position_embeddings": 32}), "rope scaling type 'yarn' is not supported"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
     "rope scaling type 'dynamic' is not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}),
     "llama3 rope scaling lacks low_freq_factor, high_freq_factor, original_max_position_embeddings"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(model_type="gemma"), "model_type 'gemma' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
])
def test_unsupported_configs_fail_at_load(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_model(edited_checkpoint(tmp_path, "llama3_untied", **changes), torch.float32)


@pytest.mark.parametrize("family, changes, window", [
    ("qwen2_tied", dict(use_sliding_window=False, sliding_window=4096), None),  # Qwen2.5 configs look like this
    ("qwen2_tied", dict(use_sliding_window=True, sliding_window=4096,
                        layer_types=["full_attention", "sliding_attention"]), 4096),
    ("qwen3", dict(use_sliding_window=True, sliding_window=4096, layer_types=["full_attention"] * 2), None),
    ("mistral", dict(sliding_window=None), None),
    ("mistral", dict(sliding_window=4096), 4096),
])
def test_sliding_window_parsing(tmp_path, family, changes, window):
    assert load_model(edited_checkpoint(tmp_path, family, **changes), torch.float32).config.sliding_window == window
