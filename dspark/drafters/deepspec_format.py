"""The authors' checkpoint format (deepseek-ai/DeepSpec) for DSpark and DFlash drafters, read into a
DSparkModel and written from one.

Their drafter folder is a Hugging Face folder: the target's Qwen3 config with the draft's keys on top
(architectures ["Qwen3DSparkModel"], num_hidden_layers = draft layers, block_size, target_layer_ids,
mask_token_id, markov_rank, markov_head_type, enable_confidence_head, confidence_head_with_markov,
num_target_layers) and one safetensors file under their parameter names, frozen copies of the target's
embed_tokens and lm_head included. The math is ours with `qk_norm` on: Qwen3 layers normalise every
head of q and of every key (context keys too) before RoPE; one projected context, fc then hidden_norm,
serves every layer with no input norm; slot 0 (the anchor) predicts the first draft token; the mask
slots embed `mask_token_id`, so our mask embedding is that row of their embed_tokens. DFlash
checkpoints are the same class with markov_rank 0 and no confidence head.
"""

from __future__ import annotations

import json
import os

import torch

from dspark.drafters.dspark_layers import DSparkConfig
from dspark.drafters.dspark_model import DSparkModel

ARCHITECTURE = "Qwen3DSparkModel"
HEAD_TYPES = {"vanilla": "markov", "gated": "gated", "rnn": "rnn"}  # theirs -> ours
NUM_ANCHORS = 512  # a training setting their class requires in the config; theirs ship 512


def is_deepspec_config(raw: dict) -> bool:
    return raw.get("architecture") is None and bool(raw.get("architectures"))


def _rope_theta(raw: dict, path: str) -> float:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{path}: rope_type {rope_type!r} is not supported (only default RoPE)")
    theta = rope.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        raise ValueError(f"{path}: config.json names no rope_theta")
    return float(theta)


def config_from_deepspec(raw: dict, path: str) -> DSparkConfig:
    architecture = (raw.get("architectures") or [None])[0]
    if architecture == "Qwen3Eagle3Model":
        raise ValueError(f"{path} holds an EAGLE-3 drafter: load it with dspark.drafters.Eagle3Drafter "
                         "(CLI: --drafter eagle3:DIR)")
    if architecture != ARCHITECTURE:
        raise ValueError(f"{path}: DeepSpec architecture {architecture!r} is not supported; supported: "
                         f"{ARCHITECTURE} (DSpark and DFlash drafters of Qwen3-style targets) and Qwen3Eagle3Model")
    if raw.get("attention_bias"):
        raise ValueError(f"{path}: attention_bias true is not supported")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
    if any(t != "full_attention" for t in raw.get("layer_types") or []):
        raise ValueError(f"{path}: sliding-window draft layers are not supported")
    layers = [int(i) for i in raw["target_layer_ids"]]
    if -1 in layers:
        raise ValueError(f"{path}: target_layer_ids -1 (the embedding output as context) is not supported")
    rank = int(raw.get("markov_rank", 0))
    head = "none"
    if rank > 0:
        head_type = str(raw.get("markov_head_type", "")).lower()
        if head_type not in HEAD_TYPES:
            raise ValueError(f"{path}: markov_head_type {head_type!r} is not supported ({sorted(HEAD_TYPES)})")
        head = HEAD_TYPES[head_type]
    confidence = bool(raw.get("enable_confidence_head", False))
    heads = int(raw["num_attention_heads"])
    return DSparkConfig(
        vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
        target_hidden_size=int(raw["hidden_size"]), target_layers=layers, num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads", heads)),
        head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
        intermediate_size=int(raw["intermediate_size"]), kind="dspark", num_layers=int(raw["num_hidden_layers"]),
        gamma=int(raw["block_size"]), head=head, rank=rank if rank > 0 else 1, rope_theta=_rope_theta(raw, path),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), calibration=raw.get("dspark_sts_temperatures"),
        calibration_shift=raw.get("dspark_sts_shifts"),
        qk_norm=True, confidence=confidence,
        confidence_with_head=bool(raw.get("confidence_head_with_markov", False)) if confidence else False)


def _layer_names(i: int) -> dict[str, str]:
    """theirs -> ours for draft layer i."""
    names = {f"layers.{i}.input_layernorm.weight": f"layers.{i}.input_norm",
             f"layers.{i}.post_attention_layernorm.weight": f"layers.{i}.post_norm",
             f"layers.{i}.self_attn.q_norm.weight": f"layers.{i}.q_norm",
             f"layers.{i}.self_attn.k_norm.weight": f"layers.{i}.k_norm"}
    for proj in ("q", "k", "v", "o"):
        names[f"layers.{i}.self_attn.{proj}_proj.weight"] = f"layers.{i}.{proj}_proj.weight"
    for proj in ("gate", "up", "down"):
        names[f"layers.{i}.mlp.{proj}_proj.weight"] = f"layers.{i}.{proj}_proj.weight"
    return names


def tensor_names(config: DSparkConfig) -> dict[str, str]:
    """Their tensor names -> ours, for every tensor that maps one to one."""
    names = {"fc.weight": "fc.weight", "hidden_norm.weight": "ctx_norm", "norm.weight": "norm"}
    for i in range(config.num_layers):
        names.update(_layer_names(i))
    if config.head != "none":
        names.update({"markov_head.markov_w1.weight": "w1.weight", "markov_head.markov_w2.weight": "w2.weight"})
    if config.head == "gated":
        names.update({"markov_head.gate_proj.weight": "markov_gate.weight",
                      "markov_head.gate_proj.bias": "markov_gate.bias"})
    if config.confidence:
        names.update({"confidence_head.proj.weight": "conf.weight", "confidence_head.proj.bias": "conf.bias"})
    return names


RNN_PARTS = ("rnn_gate", "rnn_cand", "rnn_out")  # their joint_proj rows: [gate; candidate; output]


def _checkpoint_files(path: str) -> list[str]:
    """model.safetensors, or the shards its index names (save_pretrained's layout)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        raise ValueError(f"{path}: no model.safetensors (or model.safetensors.index.json)")
    return ["model.safetensors"]


def load_deepspec(path: str, raw: dict) -> tuple[DSparkModel, torch.Tensor, torch.Tensor]:
    """(the drafter in fp32, their embed_tokens [V, d], their lm_head [V, d])."""
    from safetensors.torch import load_file

    config = config_from_deepspec(raw, path)
    theirs = {}
    for name in _checkpoint_files(path):
        theirs.update(load_file(os.path.join(path, name)))
    ours = {}
    for their_name, our_name in tensor_names(config).items():
        if their_name not in theirs:
            raise ValueError(f"{path}: tensor {their_name!r} is missing")
        ours[our_name] = theirs.pop(their_name)
    if config.head == "rnn":
        for suffix in ("weight", "bias"):
            joint = theirs.pop(f"markov_head.joint_proj.{suffix}")
            for part, piece in zip(RNN_PARTS, joint.chunk(3, dim=0)):
                ours[f"{part}.{suffix}"] = piece
    embed, head = theirs.pop("embed_tokens.weight"), theirs.pop("lm_head.weight")
    if theirs:
        raise ValueError(f"{path}: tensors not understood: {sorted(theirs)}")
    mask_id = int(raw["mask_token_id"])
    if not 0 <= mask_id < config.vocab_size:
        raise ValueError(f"{path}: mask_token_id {mask_id} is outside the vocabulary [0, {config.vocab_size})")
    ours["mask_embedding"] = embed[mask_id]
    model = DSparkModel(config)
    model.load_state_dict({k: v.float() for k, v in ours.items()})
    return model, embed, head


def deepspec_config(config: DSparkConfig, mask_token_id: int, num_target_layers: int,
                    dtype: torch.dtype) -> dict:
    """Their config.json for one of our drafters (the Qwen3 keys their class reads, then theirs)."""
    head_type = {v: k for k, v in HEAD_TYPES.items()}
    raw = {
        "architectures": [ARCHITECTURE], "model_type": "qwen3", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "max_position_embeddings": 32768, "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": None,
        "layer_types": ["full_attention"] * config.num_layers,
        "dtype": {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32"),
        "num_target_layers": num_target_layers, "block_size": config.gamma,
        "target_layer_ids": list(config.target_layers), "mask_token_id": mask_token_id, "num_anchors": NUM_ANCHORS,
        "markov_rank": config.rank if config.head != "none" else 0,
        "enable_confidence_head": config.confidence,
    }
    if config.head != "none":
        raw["markov_head_type"] = head_type[config.head]
    if config.confidence:
        raw["confidence_head_with_markov"] = config.head != "none" and config.confidence_with_head
    if config.calibration:
        raw["dspark_sts_temperatures"] = list(config.calibration)  # ours; their loader ignores it
    if config.calibration_shift:
        raw["dspark_sts_shifts"] = list(config.calibration_shift)
    return raw


def export_deepspec(model: DSparkModel, destination: str, mask_token_id: int, num_target_layers: int,
                    dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Write an attached drafter (its target's embedding and LM head at hand) in their format. Their
    mask slots embed `mask_token_id`: that row of the stored embedding becomes our mask embedding, so
    pick an id the target never emits (a reserved or padding token). Returns the files' sizes."""
    from safetensors.torch import save_file

    c = model.config
    if c.kind != "dspark":
        raise ValueError("only DSpark-kind drafters have a DeepSpec DSpark form (an EAGLE-style drafter of ours "
                         "has a different layer from their EAGLE-3)")
    if not c.qk_norm:
        raise ValueError("their Qwen3 draft layers always normalise q and k per head; this drafter was built "
                         "without q/k-norm (qk_norm false), so their format cannot hold it exactly: train with "
                         "--qk-norm")
    if model.embed_weight is None:
        raise ValueError("attach the drafter to its target first: the format stores the target's embedding and "
                         "LM head")
    if not 0 <= mask_token_id < c.vocab_size:
        raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary [0, {c.vocab_size})")
    if num_target_layers <= max(c.target_layers):
        raise ValueError(f"num_target_layers {num_target_layers} does not cover target layer {max(c.target_layers)}")
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    theirs = {their: ours.pop(our) for their, our in tensor_names(c).items()}
    if c.head == "rnn":
        for suffix in ("weight", "bias"):
            theirs[f"markov_head.joint_proj.{suffix}"] = torch.cat([ours.pop(f"{p}.{suffix}") for p in RNN_PARTS])
    embed = model.embed_weight.detach().float().clone()
    embed[mask_token_id] = ours.pop("mask_embedding").float()
    theirs["embed_tokens.weight"] = embed
    theirs["lm_head.weight"] = model.lm_head_weight.detach()
    if ours:
        raise ValueError(f"tensors without a place in the DeepSpec format: {sorted(ours)}")
    os.makedirs(destination, exist_ok=True)
    with open(os.path.join(destination, "config.json"), "w") as f:
        json.dump(deepspec_config(c, mask_token_id, num_target_layers, dtype), f, indent=2)
    save_file({k: v.to(dtype).contiguous().cpu() for k, v in theirs.items()},
              os.path.join(destination, "model.safetensors"), metadata={"format": "pt"})
    return {name: os.path.getsize(os.path.join(destination, name)) for name in os.listdir(destination)}
