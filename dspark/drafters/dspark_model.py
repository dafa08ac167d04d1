"""The drafter networks (DSPARK.md section 2) and their Hugging Face style folder.

DSparkModel, kind "dspark": context features H_ctx = RMSNorm(W_c [target layers concatenated]) give
every draft layer extra keys/values; one pass over [anchor, mask x (gamma - 1)] at positions
a..a+gamma-1 yields h_1..h_gamma, and h_k predicts x_k (the token at a + k) through the target's
frozen LM head: U_k. The sequential head adds B_k (Markov: W2 W1[x_{k-1}]; RNN: a gated state over
[s; W1[x_{k-1}]; h_k]); head "none" is the DFlash-style parallel drafter. The confidence head reads
[h_k; W1[x_{k-1}]] (just h_k without a head).

Kind "eagle": the autoregressive baseline. Position j's input is W_in [E(t_j); g_{j-1}] with g the
context features of the previous token (teacher forced) or, while drafting, the drafter's own last
hidden state; causal layers over the committed positions' cached K/V; one step per draft token.

The target's embedding and LM head are shared and frozen: held as plain attributes set by `attach`,
never parameters, so they are neither trained nor saved.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from dspark.drafters.corpus import CORPUS_FILE
from dspark.drafters.dspark_layers import DraftLayer, DSparkConfig, Linear, RopeModule, rms_norm
from dspark.models.dtypes import compute_dtype
from dspark.models.linear import linear
from dspark.models.quantized import QuantizedWeight

FORMAT_VERSION = 1


def check_shared_weights(embed: torch.Tensor, head: torch.Tensor, vocab: int, width: int) -> None:
    if embed.shape != (vocab, width) or head.shape != (vocab, width):
        raise ValueError(f"the target's embedding {tuple(embed.shape)} / LM head {tuple(head.shape)} do not match "
                         f"the drafter's vocabulary {vocab} and width {width}")


class DSparkModel(RopeModule):
    def __init__(self, config: DSparkConfig):
        super().__init__()
        c = self.config = config
        d, r = c.hidden_size, c.rank
        self.fc = Linear(len(c.target_layers) * c.target_hidden_size, d, bias=False)
        self.ctx_norm = nn.Parameter(torch.ones(d))
        self.layers = nn.ModuleList(DraftLayer(c) for _ in range(c.num_layers))
        self.norm = nn.Parameter(torch.ones(d))
        if c.kind == "dspark":
            self.mask_embedding = nn.Parameter(torch.randn(d) * 0.02)
        else:
            self.fc_in = Linear(2 * d, d, bias=False)
        if c.head != "none":
            self.w1 = nn.Embedding(c.vocab_size, r)
            nn.init.normal_(self.w1.weight, std=0.02)
            self.w2 = Linear(r, c.vocab_size, bias=False)
            nn.init.zeros_(self.w2.weight)  # B = 0 at first: training starts from the parallel drafter
        if c.head == "rnn":
            self.rnn_gate, self.rnn_cand, self.rnn_out = (Linear(2 * r + d, r) for _ in range(3))
        if c.head == "gated":
            self.markov_gate = Linear(d + r, r)
        self.conf_reads_head = c.head != "none" and c.confidence_with_head
        self.conf = Linear(d + (r if self.conf_reads_head else 0), 1) if c.confidence else None
        self.init_rope(c.rope_theta, c.head_dim)
        self.embed_weight: torch.Tensor | None = None
        self.lm_head_weight: torch.Tensor | None = None
        # The target's head as the target computes with it (GGUF blocks when loaded natively): drafting
        # may take it where it is cheaper than the dense copy; training never does.
        self.inference_head: torch.Tensor | QuantizedWeight | None = None
        self._heads: dict = {}  # (draft vocabulary, dtype) -> (its ids, the frozen head's rows in that dtype)

    def quantize_weights(self, fmt: str = "q8_0") -> "DSparkModel":
        """Inference on a CPU from GGUF blocks (dspark._C.quantized_linear) instead of dense weights: each
        draft layer's projections, the context projection and the Markov / RNN head's W2. Between the
        target's rounds the drafter's weights are out of cache, and Q8_0 streams about half of bf16's bytes
        through a kernel that handles a block's few rows better. Drafts change slightly; what is accepted
        stays the target's."""
        if self.norm.device.type != "cpu":
            raise ValueError(f"quantized drafter weights run on the CPU only; this drafter is on {self.norm.device}")
        linears = [m for m in self.modules()
                   if isinstance(m, Linear) and m.in_features % 32 == 0 and m.out_features >= 32]
        for module in linears:
            module.quantize(fmt)
        for module, blocks in zip(linears, QuantizedWeight.onto_huge_pages([m.blocks for m in linears])):
            module.blocks = blocks
        return self

    # -- shared, frozen target pieces ---------------------------------------------------------------
    def attach(self, target) -> "DSparkModel":
        self.attach_weights(*target.shared_weights())
        self.inference_head = target.lm_head()
        return self

    def attach_weights(self, embed: torch.Tensor, head: torch.Tensor) -> "DSparkModel":
        """The frozen embedding [V, d] and LM head [V, d] (the target's, or a checkpoint's own copies)."""
        check_shared_weights(embed, head, self.config.vocab_size, self.config.hidden_size)
        self.embed_weight, self.lm_head_weight = embed, head
        self.inference_head = head
        self._heads = {}
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.dtype

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embed_weight).to(self.dtype)

    def lm_logits(self, h: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        """U = LM head(h), over the whole vocabulary or only the draft vocabulary `vocab_ids`."""
        weight = self._frozen_head(vocab_ids, h.device.type)
        return linear(h.to(weight.dtype), weight).float()

    def _frozen_head(self, vocab_ids: torch.Tensor | None, device_type: str) -> torch.Tensor:
        """The frozen head's rows (of the draft vocabulary) in the compute dtype (autocast's, when on),
        gathered and cast once: per call, the gather and autocast's cast of a 16k x 576 matrix cost
        as much as the training step's product with it."""
        dtype = compute_dtype(device_type, self.lm_head_weight.dtype)
        key = (None if vocab_ids is None else id(vocab_ids), dtype)
        hit = self._heads.get(key)
        if hit is None or hit[0] is not vocab_ids:
            rows = self.lm_head_weight if vocab_ids is None else self.lm_head_weight[vocab_ids]
            hit = self._heads[key] = (vocab_ids, rows.to(dtype).contiguous())
        return hit[1]

    def context(self, features: torch.Tensor) -> torch.Tensor:
        """Captured target hidden states [..., width] -> context features H_ctx [..., d]."""
        return rms_norm(self.fc(features.to(self.dtype)), self.ctx_norm, self.config.rms_norm_eps)

    # -- DSpark: parallel backbone and sequential head ----------------------------------------------
    def context_kv(self, ctx: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's keys/values of the context features (they do not depend on the block)."""
        return [layer.kv(ctx, positions, self.inv_freq, normed=True) for layer in self.layers]

    def block(self, anchors, starts, ctx_kv, ctx_valid, n: int) -> torch.Tensor:
        """anchors [B] at positions starts [B]; returns the normed h_1..h_n [B, n, d]."""
        B = anchors.shape[0]
        x = torch.cat([self.embed(anchors)[:, None], self.mask_embedding.expand(B, n - 1, -1)], dim=1)
        positions = starts[:, None] + torch.arange(n, device=anchors.device)
        for layer, (k, v) in zip(self.layers, ctx_kv):
            x, _ = layer(x, positions, self.inv_freq, k, v, ctx_valid, causal=False)
        return rms_norm(x, self.norm, self.config.rms_norm_eps)

    def head_step(self, h_k: torch.Tensor, prev: torch.Tensor, state, w2_rows: torch.Tensor | None = None,
                  confidence: bool = True):
        """Block position k: (B_k [B, V] or None, confidence logit [B] or None, new state) from h_k [B, d]
        and the previous token x_{k-1} [B] (the anchor for k = 1). w2_rows: W2's rows of a draft
        vocabulary subset, for B_k over that subset only. confidence=False leaves the confidence out
        (inference computes every position's at once: block_confidence_logits)."""
        c = self.config
        if c.head == "none":
            return None, self.confidence_logit(h_k, None) if confidence else None, None
        e = self.w1(prev).to(h_k.dtype)
        w2 = self.w2.inference_weight() if w2_rows is None else w2_rows
        if c.head == "markov":
            bias = linear(e, w2)
        elif c.head == "gated":
            bias = linear(torch.sigmoid(self.markov_gate(torch.cat([h_k, e], dim=-1))) * e, w2)
        else:
            s = torch.zeros(h_k.shape[0], c.rank, dtype=h_k.dtype, device=h_k.device) if state is None else state
            z = torch.cat([s, e, h_k], dim=-1)
            gate = torch.sigmoid(self.rnn_gate(z))
            bias = linear(torch.tanh(self.rnn_out(z)), w2)
            state = gate * s + (1 - gate) * torch.tanh(self.rnn_cand(z))
        return bias.float(), self.confidence_logit(h_k, e) if confidence else None, state

    def block_confidence_logits(self, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor | None:
        """Every block position's confidence logit [B, n] at once, from h [B, n, d] and the previous tokens
        prev [B, n]: what head_step gives position by position (rows are independent: the same values)."""
        if self.conf is None:
            return None
        return self.confidence_logit(h, self.w1(prev).to(h.dtype) if self.conf_reads_head else None)

    def confidence_logit(self, h_k: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor | None:
        if self.conf is None:
            return None
        return self.conf(torch.cat([h_k, e], dim=-1) if self.conf_reads_head else h_k).squeeze(-1)

    # -- EAGLE: autoregressive baseline ---------------------------------------------------------------
    def eagle_input(self, tokens: torch.Tensor, prev_features: torch.Tensor) -> torch.Tensor:
        return self.fc_in(torch.cat([self.embed(tokens), prev_features.to(self.dtype)], dim=-1))

    def eagle_run(self, x, positions, ctx_kv, ctx_valid):
        """Causal pass of inputs x [B, n, d] after the context; returns the last layer's residual
        stream [B, n, d] (fed back as the next step's feature) and each layer's block (k, v)."""
        block_kv = []
        for layer, (k, v) in zip(self.layers, ctx_kv):
            x, kv = layer(x, positions, self.inv_freq, k, v, ctx_valid, causal=True)
            block_kv.append(kv)
        return x, block_kv

    def empty_kv(self, batch: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        z = torch.zeros(batch, 0, c.num_kv_heads, c.head_dim, dtype=self.dtype, device=device)
        return [(z, z)] * c.num_layers

    # -- teacher-forced training pass -------------------------------------------------------------------
    def train_forward(self, features: torch.Tensor, tokens: torch.Tensor, anchors: torch.Tensor,
                      vocab_ids: torch.Tensor | None = None):
        """One sequence: features [N, width] (target layers at every position), tokens [N], anchors [A]
        (positions >= 1). Returns draft logits [A, gamma, V] (or [A, gamma, |S|] over a draft
        vocabulary S = vocab_ids) for x_k = t_{a+k} and confidence logits [A, gamma]; positions past
        the sequence end are garbage for the caller to mask."""
        c, N = self.config, tokens.shape[0]
        steps = torch.arange(c.gamma, device=tokens.device)
        prev = tokens[(anchors[:, None] + steps).clamp(max=N - 1)]  # x_{k-1} = t_{a+k-1}, teacher forced
        ctx = self.context(features)
        positions = torch.arange(N, device=tokens.device)
        if c.kind == "eagle":
            return self._eagle_train(ctx, tokens, anchors, prev, vocab_ids)
        kv = self.context_kv(ctx[None], positions)
        valid = positions[None] < anchors[:, None]
        h = self.block(tokens[anchors], anchors, kv, valid, c.gamma)
        logits, confs, state = self.lm_logits(h, vocab_ids), [], None
        w2_rows = None if vocab_ids is None or c.head == "none" else self.w2.weight[vocab_ids]
        biases = []
        for k in range(c.gamma):
            bias, conf, state = self.head_step(h[:, k], prev[:, k], state, w2_rows)
            biases.append(bias)
            confs.append(conf)
        if c.head != "none":
            logits = logits + torch.stack(biases, dim=1)
        return logits, None if self.conf is None else torch.stack(confs, dim=1)

    def _eagle_train(self, ctx, tokens, anchors, prev, vocab_ids=None):
        """Teacher-forced causal pass over the sequence, then gamma - 1 steps that feed the drafter's
        own hidden states back (training-time test), re-running the short drafted block each step."""
        c, N, A = self.config, tokens.shape[0], anchors.shape[0]
        shifted = torch.cat([torch.zeros_like(ctx[:1]), ctx[:-1]])  # g_{j-1}; nothing before position 0
        positions = torch.arange(N, device=tokens.device)
        out, tf_kv = self.eagle_run(self.eagle_input(tokens, shifted)[None], positions[None],
                                    self.empty_kv(1, tokens.device), None)
        valid = positions[None] <= anchors[:, None]  # the anchor's own teacher-forced K/V is context
        feats = [out[0, anchors]]  # step 1 is the anchor's teacher-forced output
        inputs = []
        for k in range(1, c.gamma):
            inputs.append(self.eagle_input(prev[:, k], feats[-1]))
            x = torch.stack(inputs, dim=1)
            pos = anchors[:, None] + torch.arange(1, k + 1, device=tokens.device)
            y, _ = self.eagle_run(x, pos, tf_kv, valid)
            feats.append(y[:, -1])
        h = rms_norm(torch.stack(feats, dim=1), self.norm, c.rms_norm_eps)
        return self.lm_logits(h, vocab_ids), self.confidence_logit(h, None)


# -- Hugging Face style folder: config.json + model.safetensors (+ calibration inside config) ---------
def save_drafter(model: DSparkModel, path: str, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    config = {"architecture": "DSparkDrafter", "format_version": FORMAT_VERSION, **dataclasses.asdict(model.config),
              **(extra or {})}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "model.safetensors"))


def load_drafter_model(path: str, target=None, device=None, dtype: torch.dtype = torch.float32) -> DSparkModel:
    """A drafter folder in our format or in DeepSpec's (detected from config.json). Without a target,
    a DeepSpec drafter uses the frozen embedding and LM head stored in its own checkpoint."""
    from safetensors.torch import load_file

    from dspark.drafters import deepspec_format

    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    stored = None
    if deepspec_format.is_deepspec_config(raw):
        model, *stored = deepspec_format.load_deepspec(path, raw)
    elif raw.get("architecture") == "DSparkDrafter":
        fields = {f.name for f in dataclasses.fields(DSparkConfig)}
        model = DSparkModel(DSparkConfig(**{k: v for k, v in raw.items() if k in fields}))
        model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    else:
        raise ValueError(f"{path} is not a drafter folder: config.json has neither our architecture "
                         f"'DSparkDrafter' nor DeepSpec's architectures (got {raw.get('architecture')!r})")
    if device is None and target is not None:
        device = target.device
    model = model.to(device=device or "cpu", dtype=dtype).eval()
    if target is not None:
        return model.attach(target)
    if stored is not None:
        return model.attach_weights(*(w.to(device=device or "cpu", dtype=dtype) for w in stored))
    return model


DRAFTER_FILES = ("config.json", "draft_vocab.json", "reliability.png", CORPUS_FILE)


def export_drafter(source: str, destination: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Copy a trained drafter folder for shipping: its config, draft vocabulary and reliability
    diagram, and its weights cast to `dtype` (bf16 halves the file; loading casts back to the
    compute dtype). Trainer state, logs and snapshots stay behind. Returns the size in bytes."""
    import shutil

    from safetensors.torch import load_file, save_file

    with open(os.path.join(source, "config.json")) as f:
        if json.load(f).get("architecture") != "DSparkDrafter":
            raise ValueError(f"{source} is not a DSpark drafter folder")
    os.makedirs(destination, exist_ok=True)
    for name in DRAFTER_FILES:
        if os.path.exists(os.path.join(source, name)):
            shutil.copyfile(os.path.join(source, name), os.path.join(destination, name))
    state = load_file(os.path.join(source, "model.safetensors"))
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
              os.path.join(destination, "model.safetensors"))
    return {name: os.path.getsize(os.path.join(destination, name)) for name in os.listdir(destination)}
