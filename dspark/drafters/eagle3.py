"""EAGLE-3 drafters in the authors' format (DeepSpec's Qwen3Eagle3Model; SpecForge's layout), on the
engine's Drafter interface.

The EAGLE-3 layer differs from the DSpark draft layer: its attention reads a 2d-wide input,
[input_layernorm(embedding of the token); hidden_norm(feature)], and its residual stream starts from the
feature, not from the token. Position j pairs the feature of position j (the target's captured layers
through `fc`, or while drafting the drafter's own previous output) with the token at j + 1, at RoPE
position j, causally over every earlier position; lm_head(norm(h_j)) predicts the token at j + 2. So
the committed positions are those before the anchor (their next token is known), the anchor's pair's
output predicts the first draft, and each draft step feeds back its own output.

Per request the drafter keeps each layer's K/V of the committed positions (nothing speculative: a
round's drafted positions live only in the round) and the output at the last committed position,
computed when it next drafts for the request (rounds it is not asked to draft cost it nothing).
Greedy requests draft the argmax; sampled ones draw from the request's processed distribution and
report exactly those rows as draft_probs, so verification stays lossless.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from dspark.cache import KVCache, SideCache
from dspark.drafters.base import Drafter, Proposal
from dspark.drafters.captured import check_captured, pending_features
from dspark.drafters.deepspec_format import _checkpoint_files, _rope_theta
from dspark.drafters.draft_sampling import DraftSampler
from dspark.drafters.dspark import committed_context
from dspark.drafters.dspark_layers import Linear, RopeModule, attend, rms_norm, rope
from dspark.drafters.dspark_model import check_shared_weights
from dspark.models.linear import linear

ARCHITECTURE = "Qwen3Eagle3Model"


@dataclasses.dataclass
class Eagle3Config:
    vocab_size: int
    hidden_size: int
    target_layers: list[int]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    num_layers: int = 1
    steps: int = 7  # training-time-test length: the default number of draft tokens
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @classmethod
    def from_deepspec(cls, raw: dict, path: str) -> "Eagle3Config":
        if (raw.get("architectures") or [None])[0] != ARCHITECTURE:
            raise ValueError(f"{path}: not a {ARCHITECTURE} folder (architectures {raw.get('architectures')})")
        if raw.get("attention_bias"):
            raise ValueError(f"{path}: attention_bias true is not supported")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (only silu)")
        layers = [int(i) for i in raw["target_layer_ids"]]
        if any(i < 0 for i in layers):
            raise ValueError(f"{path}: target_layer_ids must be target decoder layers (>= 0), got {layers}")
        heads = int(raw["num_attention_heads"])
        return cls(vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]), target_layers=layers,
                   num_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads", heads)),
                   head_dim=int(raw.get("head_dim") or int(raw["hidden_size"]) // heads),
                   intermediate_size=int(raw["intermediate_size"]), num_layers=int(raw["num_hidden_layers"]),
                   steps=int(raw.get("ttt_length", 7)), rope_theta=_rope_theta(raw, path),
                   rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)))


class Eagle3Layer(nn.Module):
    def __init__(self, c: Eagle3Config):
        super().__init__()
        self.c = c
        d, hd = c.hidden_size, c.head_dim
        self.hidden_norm = nn.Parameter(torch.ones(d))
        self.input_norm = nn.Parameter(torch.ones(d))
        self.q_proj = Linear(2 * d, c.num_heads * hd, bias=False)
        self.k_proj = Linear(2 * d, c.num_kv_heads * hd, bias=False)
        self.v_proj = Linear(2 * d, c.num_kv_heads * hd, bias=False)
        self.q_norm = nn.Parameter(torch.ones(hd))
        self.k_norm = nn.Parameter(torch.ones(hd))
        self.o_proj = Linear(c.num_heads * hd, d, bias=False)
        self.post_norm = nn.Parameter(torch.ones(d))
        self.gate_proj = Linear(d, c.intermediate_size, bias=False)
        self.up_proj = Linear(d, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, d, bias=False)

    def forward(self, embeds, hidden, positions, inv_freq, k_ctx, v_ctx, ctx_valid):
        """embeds, hidden [B, n, d] at positions [B, n]: causal over the n positions, after the context
        K/V [B or 1, N, Hkv, D]. Returns (new hidden, the n positions' (k, v))."""
        c = self.c
        z = torch.cat([rms_norm(embeds, self.input_norm, c.rms_norm_eps),
                       rms_norm(hidden, self.hidden_norm, c.rms_norm_eps)], dim=-1)
        q = rms_norm(self.q_proj(z).unflatten(-1, (c.num_heads, c.head_dim)), self.q_norm, c.rms_norm_eps)
        k = rms_norm(self.k_proj(z).unflatten(-1, (c.num_kv_heads, c.head_dim)), self.k_norm, c.rms_norm_eps)
        v = self.v_proj(z).unflatten(-1, (c.num_kv_heads, c.head_dim))
        q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
        hidden = hidden + self.o_proj(attend(q, k_ctx, v_ctx, ctx_valid, k, v, causal=True))
        h = rms_norm(hidden, self.post_norm, c.rms_norm_eps)
        return hidden + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)), (k, v)


class Eagle3Model(RopeModule):
    def __init__(self, config: Eagle3Config):
        super().__init__()
        c = self.config = config
        self.fc = Linear(len(c.target_layers) * c.hidden_size, c.hidden_size, bias=False)
        self.layers = nn.ModuleList(Eagle3Layer(c) for _ in range(c.num_layers))
        self.norm = nn.Parameter(torch.ones(c.hidden_size))
        self.init_rope(c.rope_theta, c.head_dim)
        self.embed_weight: torch.Tensor | None = None
        self.lm_head_weight: torch.Tensor | None = None

    def attach_weights(self, embed: torch.Tensor, head: torch.Tensor) -> "Eagle3Model":
        check_shared_weights(embed, head, self.config.vocab_size, self.config.hidden_size)
        self.embed_weight, self.lm_head_weight = embed, head
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.dtype

    def run(self, tokens, hidden, positions, layer_kv, ctx_valid):
        """tokens [B, n] paired with hidden [B, n, d] (fc(features) or the drafter's own outputs) at
        positions [B, n]; layer_kv: per layer the context (k, v). Returns (outputs [B, n, d], per layer the
        n positions' (k, v))."""
        embeds = F.embedding(tokens, self.embed_weight).to(self.dtype)
        block_kv = []
        for layer, (k, v) in zip(self.layers, layer_kv):
            hidden, kv = layer(embeds, hidden, positions, self.inv_freq, k, v, ctx_valid)
            block_kv.append(kv)
        return hidden, block_kv

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = rms_norm(hidden, self.norm, self.config.rms_norm_eps)
        return linear(h.to(self.lm_head_weight.dtype), self.lm_head_weight).float()


def _tensor_names(c: Eagle3Config) -> dict[str, str]:
    """Their names -> ours."""
    names = {"fc.weight": "fc.weight", "norm.weight": "norm"}
    for i in range(c.num_layers):
        names.update({f"layers.{i}.hidden_norm.weight": f"layers.{i}.hidden_norm",
                      f"layers.{i}.input_layernorm.weight": f"layers.{i}.input_norm",
                      f"layers.{i}.post_attention_layernorm.weight": f"layers.{i}.post_norm",
                      f"layers.{i}.self_attn.q_norm.weight": f"layers.{i}.q_norm",
                      f"layers.{i}.self_attn.k_norm.weight": f"layers.{i}.k_norm"})
        for proj in ("q", "k", "v", "o"):
            names[f"layers.{i}.self_attn.{proj}_proj.weight"] = f"layers.{i}.{proj}_proj.weight"
        for proj in ("gate", "up", "down"):
            names[f"layers.{i}.mlp.{proj}_proj.weight"] = f"layers.{i}.{proj}_proj.weight"
    return names


def load_eagle3(path: str, target=None, device=None, dtype: torch.dtype = torch.float32) -> Eagle3Model:
    """Their folder; the frozen embedding and LM head are the target's when given, else the copies
    stored in the checkpoint."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    config = Eagle3Config.from_deepspec(raw, path)
    theirs = {}
    for name in _checkpoint_files(path):
        theirs.update(load_file(os.path.join(path, name)))
    ours = {}
    for their_name, our_name in _tensor_names(config).items():
        if their_name not in theirs:
            raise ValueError(f"{path}: tensor {their_name!r} is missing")
        ours[our_name] = theirs.pop(their_name).float()
    stored = theirs.pop("embed_tokens.weight", None), theirs.pop("lm_head.weight", None)
    for extra in ("d2t", "t2d"):
        if extra in theirs:
            raise ValueError(f"{path}: a reduced draft vocabulary ({extra}) is not supported")
    if theirs:
        raise ValueError(f"{path}: tensors not understood: {sorted(theirs)}")
    model = Eagle3Model(config)
    model.load_state_dict(ours)
    if device is None and target is not None:
        device = target.device
    model = model.to(device=device or "cpu", dtype=dtype).eval()
    if target is not None:
        return model.attach_weights(*target.shared_weights())
    if stored[0] is None or stored[1] is None:
        raise ValueError(f"{path}: no embed_tokens / lm_head stored: pass the target")
    return model.attach_weights(*(w.to(device=device or "cpu", dtype=dtype) for w in stored))


class Eagle3Drafter(Drafter):
    def __init__(self, model: Eagle3Model, num_draft: int | None = None):
        if model.embed_weight is None:
            raise ValueError("the EAGLE-3 model has no embedding / LM head: load it with a target")
        self.model = model.eval()
        self.num_draft = num_draft or model.config.steps
        if self.num_draft < 1:
            raise ValueError(f"num_draft must be >= 1, got {num_draft}")
        self.capture_layers = tuple(model.config.target_layers)
        self.kv: KVCache | None = None
        self.last: torch.Tensor | None = None  # [rows, d]: the output at each row's last committed position
        self.generators: dict[int, torch.Generator] = {}
        self.captured: SideCache | None = None  # the engine's target features, run at the next proposal

    @classmethod
    def from_pretrained(cls, path: str, target, num_draft: int | None = None,
                        dtype: torch.dtype = torch.float32) -> "Eagle3Drafter":
        return cls(load_eagle3(path, target, dtype=dtype), num_draft)

    @property
    def device(self) -> torch.device:
        return self.model.norm.device

    def bind(self, rows: int, max_seq_len: int, vocab_size: int, captured: SideCache | None = None) -> None:
        c = self.model.config
        if c.vocab_size != vocab_size:
            raise ValueError(f"the drafter's vocabulary ({c.vocab_size}) differs from the target's ({vocab_size})")
        check_captured(captured, rows, max_seq_len, len(c.target_layers) * c.hidden_size)
        self.captured = captured
        self.kv = KVCache(c.num_layers, rows, max_seq_len, c.num_kv_heads, c.head_dim, self.model.dtype, self.device)
        self.last = torch.zeros(rows, c.hidden_size, dtype=self.model.dtype, device=self.device)

    def start(self, request) -> None:
        if self.captured is None:
            raise ValueError("the EAGLE-3 drafter needs the target's hidden states: bind it with the captured "
                             "side cache (the Engine does)")
        self.kv.seqlens[request.row] = 0
        self.generators[request.row] = torch.Generator(self.device).manual_seed(request.params.seed + 0xE3)

    def finish(self, request) -> None:
        self.kv.seqlens[request.row] = 0
        self.generators.pop(request.row, None)

    def _commit_pending(self, requests) -> None:
        for request, hidden in zip(*pending_features(self.captured, self.kv.seqlens, requests)):
            self._commit(request, hidden)

    @torch.inference_mode()
    def _commit(self, request, hidden: torch.Tensor) -> None:
        """Positions L..L+m-1 of one row: the target's features paired with the tokens one later."""
        model, row, m = self.model, request.row, hidden.shape[0]
        start = int(self.kv.seqlens[row])
        positions = torch.arange(start, start + m, device=self.device)
        tokens = torch.tensor(request.tokens[start + 1: start + m + 1], device=self.device)
        ctx = [(self.kv.k[i, row: row + 1, :start], self.kv.v[i, row: row + 1, :start])
               for i in range(model.config.num_layers)]
        out, block = model.run(tokens[None], model.fc(hidden.to(self.device, model.dtype))[None], positions[None],
                               ctx, None)
        rows = torch.full((m,), row, dtype=torch.long, device=self.device)
        for i, (k, v) in enumerate(block):
            self.kv.write(i, rows, positions, k[0], v[0])
        self.kv.seqlens[row] += m
        self.last[row] = out[0, -1]

    @torch.inference_mode()
    def propose(self, requests, max_draft: int) -> list[Proposal]:
        steps = min(self.num_draft, max_draft)
        if steps <= 0 or not requests:
            return [Proposal([]) for _ in requests]
        model = self.model
        self._commit_pending(requests)
        layer_kv, valid, starts = committed_context(self.kv, requests, model.config.num_layers)
        hidden = self.last[torch.tensor([r.row for r in requests], device=self.device)][:, None]
        batch = len(requests)
        ones = torch.ones(batch, 1, dtype=torch.bool, device=self.device)
        if valid is None:
            valid = torch.ones(batch, layer_kv[0][0].shape[1], dtype=torch.bool, device=self.device)
        sampler = DraftSampler(requests, steps, self.generators, self.device)
        tokens, confs = [], []
        for k in range(steps):
            logits = model.logits(hidden[:, 0])
            picked = sampler.choose(logits, k)
            tokens.append(picked)
            confs.append(torch.softmax(logits, -1).gather(-1, picked[:, None])[:, 0])
            if k + 1 == steps:
                break
            # The drafted position joins the round's context (never the cache): the next step attends to it.
            hidden, block = model.run(picked[:, None], hidden, (starts + k)[:, None], layer_kv, valid)
            layer_kv = [(torch.cat([kc.expand(batch, -1, -1, -1), kb], 1), torch.cat([vc.expand(batch, -1, -1, -1), vb], 1))
                        for (kc, vc), (kb, vb) in zip(layer_kv, block)]
            valid = torch.cat([valid, ones], dim=1)
        token_rows = torch.stack(tokens, dim=1).tolist()
        confidences = torch.stack(confs, dim=1)
        return [Proposal(token_rows[i], draft_probs=q, confidences=confidences[i])
                for i, q in enumerate(sampler.draft_probs())]
