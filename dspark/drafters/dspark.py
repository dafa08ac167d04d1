"""The DSpark drafter on the engine's Drafter protocol (DSPARK.md section 2), also running the
DFlash-style (head "none") and EAGLE-style (kind "eagle") baselines.

Per request the drafter keeps, for every committed token before the anchor:
- its context features H_ctx (a SideCache, [rows, S, 1, d]) and
- each draft layer's keys/values of them (a KVCache): context K/V depend only on the context, so they
  are computed once per committed token (when the drafter next drafts for the request, so rounds it is
  not asked to draft cost it nothing) and reused by every later round. Recomputing them
  instead would cost a [L, width] x [width, d] projection plus every layer's K/V projection per round,
  O(L) work that dominates drafting at L ~ 1-2k on a CPU; the cache makes a round O(gamma) in
  projections and O(gamma * L) only inside attention.
The engine learns target features only at verification and keeps those of committed tokens in its
captured side cache (rolled back with its K/V); the drafter reads the positions it has not committed
yet when it next drafts, so its caches only ever append committed entries: nothing speculative is
written, hence nothing to roll back here.

Sampling follows DraftModelDrafter (dspark.drafters.draft_sampling): greedy requests draft the argmax
(draft_probs None, a deterministic proposal); sampled requests draw each x_k from processed_probs(U_k +
B_k) under the request's temperature/top-k/top-p, batched over the requests, with uniforms from a
per-request generator, and report exactly those rows.
"""

from __future__ import annotations

import json
import os

import torch

from dspark.cache import KVCache, SideCache
from dspark.drafters.base import Drafter, Proposal
from dspark.drafters.captured import check_captured, pending_features
from dspark.drafters import dspark_cpu
from dspark.drafters.draft_sampling import DraftSampler
from dspark.drafters.dspark_layers import rms_norm
from dspark.drafters.dspark_model import DSparkModel, load_drafter_model
from dspark.models.linear import linear
from dspark.models.quantized import QuantizedWeight, quantized_linear

DRAFT_VOCAB_FILE = "draft_vocab.json"
# Up to this many block rows (requests x draft positions) a natively loaded target's quantized head
# is cheaper than the dense copy; the dense GEMM wins from ~20 rows (measured on the head's draft
# vocabulary, 16k x 576: Q8_0 0.6 ms against bf16 1.6 ms at 7 rows, 1.3 against 1.1 at 28).
QUANTIZED_HEAD_MAX_ROWS = 16


def drafter_weights_for(target) -> str | None:
    """The `weights` a drafter of this target drafts from: Q8_0 blocks where the target itself computes with
    GGUF blocks (loaded natively, on the CPU), so both stream compact weights; dense otherwise."""
    return "q8_0" if isinstance(target.lm_head(), QuantizedWeight) else None


def save_draft_vocab(folder: str, token_ids: list[int], coverage: float, data: str) -> None:
    """Write a drafter folder's draft vocabulary (read back by DSparkDrafter.from_pretrained)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, DRAFT_VOCAB_FILE), "w") as f:
        json.dump({"size": len(token_ids), "coverage_of_data": coverage, "data": os.path.abspath(data),
                   "token_ids": token_ids}, f)


def context_lengths(kv: KVCache, requests) -> list[int]:
    """Each request's committed drafter context length; every row must hold exactly the positions before its
    anchor."""
    lengths = kv.seqlens[[r.row for r in requests]].tolist()
    for r, n in zip(requests, lengths):
        if n != len(r.tokens) - 1:
            raise RuntimeError(f"drafter context of request {r.id} holds {n} tokens, expected {len(r.tokens) - 1}")
    return lengths


def committed_context(kv: KVCache, requests, num_layers: int, lengths: list[int] | None = None):
    """Per layer the committed context K/V of the requests' rows [R, Lmax, Hkv, D], a validity mask
    (None when every row is full length) and the anchors' positions; every row must hold exactly the
    positions before its anchor. lengths: context_lengths(kv, requests) when the caller has them."""
    rows = [r.row for r in requests]
    lengths = context_lengths(kv, requests) if lengths is None else lengths
    longest = max(lengths)
    device = kv.k.device
    if len(rows) == 1:  # a slice is a view: no copy of the context
        layers = [(kv.k[i, rows[0]: rows[0] + 1, :longest], kv.v[i, rows[0]: rows[0] + 1, :longest])
                  for i in range(num_layers)]
    else:
        index = torch.tensor(rows, device=device)
        layers = [(kv.k[i, index, :longest], kv.v[i, index, :longest]) for i in range(num_layers)]
    starts = torch.tensor(lengths, device=device)
    valid = None if min(lengths) == longest else torch.arange(longest, device=device)[None] < starts[:, None]
    return layers, valid, starts


class DSparkDrafter(Drafter):
    gives_confidences = True  # the engine's default policy is then the prefix scheduler

    def __init__(self, model: DSparkModel, num_draft: int | None = None, draft_vocab: torch.Tensor | None = None):
        if model.embed_weight is None:
            raise ValueError("attach the target first (DSparkModel.attach(target)): the drafter shares its "
                             "embedding and LM head")
        self.model = model.eval()
        c = model.config
        self.num_draft = num_draft or c.gamma
        if self.num_draft < 1:
            raise ValueError(f"num_draft must be >= 1, got {num_draft}")
        self._restrict_vocabulary(draft_vocab)
        self.capture_layers = tuple(c.target_layers)  # the engine captures these for us
        self.features: SideCache | None = None
        self.kv: KVCache | None = None
        # The engine's captured target features; those of committed tokens past self.features' lengths
        # are turned into context K/V at the row's next proposal, so rounds the policy does not draft for
        # cost the drafter nothing.
        self.captured: SideCache | None = None
        self.generators: dict[int, torch.Generator] = {}

    @classmethod
    def from_pretrained(cls, path: str, target, num_draft: int | None = None, dtype: torch.dtype = torch.float32,
                        use_draft_vocab: bool = True, weights: str | None = None) -> "DSparkDrafter":
        """use_draft_vocab: draft over the folder's draft_vocab.json when it has one. weights "q8_0": draft
        from Q8_0 blocks of the drafter's matrices on the CPU (DSparkModel.quantize_weights); None: dense."""
        vocab_file = os.path.join(path, DRAFT_VOCAB_FILE)
        draft_vocab = None
        if use_draft_vocab and os.path.exists(vocab_file):
            with open(vocab_file) as f:
                draft_vocab = torch.tensor(json.load(f)["token_ids"], dtype=torch.long)
        model = load_drafter_model(path, target, dtype=dtype)
        if weights is not None:
            model.quantize_weights(weights)
        return cls(model, num_draft, draft_vocab)

    def _restrict_vocabulary(self, draft_vocab: torch.Tensor | None) -> None:
        """Drafting over a subset S of the vocabulary (frequent tokens, as FR-Spec): the LM head and the
        Markov head's W2 shrink to |S| rows, most of a CPU drafting step. Still lossless: x_k is drawn
        from softmax over S, and draft_probs reports exactly that (zero outside S), so rejection
        sampling's residual covers every token the drafter cannot propose."""
        model, vocab = self.model, self.model.config.vocab_size
        self.vocab_ids = self.head_rows = self.w2_rows = None
        native = model.inference_head if isinstance(model.inference_head, QuantizedWeight) else None
        self.quantized_head_rows = native
        if draft_vocab is None:
            return
        ids = torch.as_tensor(draft_vocab)
        if ids.dim() != 1 or ids.numel() == 0 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError("draft_vocab must be a non-empty 1-D tensor of token ids")
        ids = ids.long().unique()  # sorted
        if ids.numel() != torch.as_tensor(draft_vocab).numel():
            raise ValueError("draft_vocab has repeated token ids")
        if int(ids[0]) < 0 or int(ids[-1]) >= vocab:
            raise ValueError(f"draft_vocab ids must lie in [0, {vocab})")
        self.vocab_ids = ids.to(self.device)
        self.head_rows = model.lm_head_weight[self.vocab_ids].contiguous()
        if native is not None:
            self.quantized_head_rows = native.rows(ids.to(native.device)).pack()
        if model.config.head != "none":
            blocks = model.w2.blocks
            self.w2_rows = (model.w2.weight.detach()[self.vocab_ids].contiguous() if blocks is None
                            else blocks.rows(ids.to(blocks.device)).pack())
        # What every drafting round reads, on huge pages (dspark.huge_pages)
        if native is not None:
            self.quantized_head_rows, = QuantizedWeight.onto_huge_pages([self.quantized_head_rows])
        if isinstance(self.w2_rows, QuantizedWeight):
            self.w2_rows, = QuantizedWeight.onto_huge_pages([self.w2_rows])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """U over the draft vocabulary (or all of it): with the target's own GGUF blocks for a few rows."""
        if self.quantized_head_rows is not None and h.numel() // h.shape[-1] <= QUANTIZED_HEAD_MAX_ROWS:
            return quantized_linear(h, self.quantized_head_rows).float()
        if self.head_rows is None:
            return self.model.lm_logits(h)
        return linear(h.to(self.head_rows.dtype), self.head_rows).float()

    @property
    def device(self) -> torch.device:
        return self.model.norm.device

    def bind(self, rows: int, max_seq_len: int, vocab_size: int, captured: SideCache | None = None) -> None:
        c = self.model.config
        if c.vocab_size != vocab_size:
            raise ValueError(f"the drafter's vocabulary ({c.vocab_size}) differs from the target's ({vocab_size})")
        check_captured(captured, rows, max_seq_len, len(self.capture_layers) * c.target_hidden_size)
        self.captured = captured
        self.features = SideCache(rows, max_seq_len, c.hidden_size, self.model.dtype, self.device)
        # Room past the longest context for a block's own K/V (the fused CPU block writes them there).
        block = max(c.gamma, self.num_draft)
        self.kv = KVCache(c.num_layers, rows, max_seq_len + block, c.num_kv_heads, c.head_dim, self.model.dtype,
                          self.device)

    def start(self, request) -> None:
        if self.captured is None:
            raise ValueError("the DSpark drafter needs the target's hidden states: bind it with the captured "
                             "side cache (the Engine does)")
        self.features.seqlens[request.row] = 0
        self.kv.seqlens[request.row] = 0
        self.generators[request.row] = torch.Generator(self.device).manual_seed(request.params.seed + 0xD5)

    def finish(self, request) -> None:
        self.features.seqlens[request.row] = 0
        self.kv.seqlens[request.row] = 0
        self.generators.pop(request.row, None)

    def commit_pending(self, requests) -> None:
        """Commit the captured features of the requests about to draft that they have not committed yet."""
        pending, hidden = pending_features(self.captured, self.features.seqlens, requests)
        if not pending:
            return
        if self.model.config.kind == "dspark":  # context K/V depend on each token alone: one batched pass
            self._commit_rows([r.row for r in pending], hidden)
            return
        for r, h in zip(pending, hidden):
            self._commit_eagle(r.row, r.tokens, h)

    @torch.inference_mode()
    def _commit_rows(self, rows: list[int], hidden: list[torch.Tensor]) -> None:
        """DSpark kind: the context features and each layer's context K/V of every row's new
        positions, one projection for all of them."""
        counts = [h.shape[0] for h in hidden]
        starts = self.features.seqlens[rows].tolist()  # one host read
        if len(rows) == 1:  # the batch-1 round: no concatenations
            positions = torch.arange(starts[0], starts[0] + counts[0], device=self.device)
            row_index = torch.full((counts[0],), rows[0], device=self.device)
        else:
            positions = torch.cat([torch.arange(s, s + m) for s, m in zip(starts, counts)]).to(self.device)
            row_index = torch.repeat_interleave(torch.tensor(rows), torch.tensor(counts)).to(self.device)
        ctx = self.model.context(torch.cat(hidden).to(self.device))
        self._store(rows, counts, row_index, positions, ctx, self.model.context_kv(ctx, positions))

    @torch.inference_mode()
    def _commit_eagle(self, row: int, tokens: list[int], hidden: torch.Tensor) -> None:
        """EAGLE kind: committed positions run through the causal layers, inputs teacher forced."""
        m, start = hidden.shape[0], int(self.features.seqlens[row])
        model, device = self.model, self.device
        ctx = model.context(hidden.to(device))
        positions = torch.arange(start, start + m, device=device)
        before = self.features.data[row, start - 1: start, 0] if start else torch.zeros_like(ctx[:1])
        x = model.eagle_input(torch.tensor(tokens[start: start + m], device=device), torch.cat([before, ctx[:-1]]))
        ctx_kv = [(self.kv.k[i, row: row + 1, :start], self.kv.v[i, row: row + 1, :start])
                  for i in range(model.config.num_layers)]
        _, block = model.eagle_run(x[None], positions[None], ctx_kv, None)
        rows = torch.full((m,), row, dtype=torch.long, device=device)
        self._store([row], [m], rows, positions, ctx, [(k[0], v[0]) for k, v in block])

    def _store(self, rows: list[int], counts: list[int], row_index, positions, ctx, kvs) -> None:
        self.features.write(row_index, positions, ctx)
        for i, (k, v) in enumerate(kvs):
            self.kv.write(i, row_index, positions, k, v)
        for lengths in (self.features.seqlens, self.kv.seqlens):
            lengths[torch.tensor(rows, device=lengths.device)] += torch.tensor(counts, dtype=torch.int32,
                                                                              device=lengths.device)

    def _context(self, requests):
        return committed_context(self.kv, requests, self.model.config.num_layers)

    def _confidence(self, logit: torch.Tensor | None, k: int, logits: torch.Tensor, picked: torch.Tensor):
        """sigmoid of the confidence head's logit (STS-scaled), or without a confidence head (DFlash
        checkpoints) the drafter's own probability of each drafted token."""
        if logit is None:
            local = picked if self.vocab_ids is None else torch.searchsorted(self.vocab_ids, picked)
            return torch.softmax(logits.float(), dim=-1).gather(-1, local[:, None]).squeeze(-1)
        config = self.model.config
        if config.calibration:  # Sequential Temperature Scaling: one temperature per block position
            logit = logit / config.calibration[min(k, len(config.calibration) - 1)]
        if config.calibration_shift:
            logit = logit + config.calibration_shift[min(k, len(config.calibration_shift) - 1)]
        return torch.sigmoid(logit.float())

    def propose(self, requests, max_draft: int) -> list[Proposal]:
        return self.propose_pruned(requests, max_draft, 0.0)

    @torch.inference_mode()
    def propose_pruned(self, requests, max_draft: int, survival_floor: float) -> list[Proposal]:
        """DSpark kind on a CPU: the sequential head stops once every request's survival is below the
        floor (a per-step host read, which is why only on the CPU)."""
        steps = min(self.num_draft, max_draft)
        if steps <= 0 or not requests:
            return [Proposal([]) for _ in requests]
        self.commit_pending(requests)
        anchors = torch.tensor([r.tokens[-1] for r in requests], device=self.device)
        sampler = DraftSampler(requests, steps, self.generators, self.device, self.vocab_ids)
        if self.model.config.kind == "eagle":
            kv, valid, starts = self._context(requests)
            tokens, confs = self._draft_eagle(requests, sampler, steps, kv, valid, starts, anchors)
        else:
            prune = survival_floor > 0 and self.model.conf is not None and self.device.type == "cpu"
            tokens, confs = self._draft_block(requests, sampler, steps, anchors, survival_floor if prune else None)
        token_rows = torch.stack(tokens, dim=1).tolist()  # the one host read of the drafted tokens
        confidences = torch.stack(confs, dim=1)
        # Rows over the draft vocabulary stay that narrow: rejection_sample reads them as q = 0 elsewhere.
        return [Proposal(token_rows[i], draft_probs=q, confidences=confidences[i], draft_vocab=self.vocab_ids)
                for i, q in enumerate(sampler.draft_probs())]

    def _draft_block(self, requests, sampler, steps, anchors, floor: float | None = None):
        """One backbone pass over the block, then the sequential head left to right; given a survival
        floor (a confidence head's), the head computes each position's confidence as it goes and stops
        before a position k > 1 at which every row's survival c_1 ... c_k is below the floor: c_k reads
        h_k and x_{k-1}, never x_k, so what is dropped is exactly what the policy would not verify."""
        model = self.model
        h = self._block(requests, anchors, max(model.config.gamma, steps))
        base = self._logits(h[:, :steps])
        if floor is not None:
            return self._draft_pruned(sampler, steps, anchors, h, base, floor)
        tokens, prev, state, own_probs = [], anchors, None, []
        for k in range(steps):
            bias, _, state = model.head_step(h[:, k], prev, state, self.w2_rows, confidence=False)
            logits = base[:, k] if bias is None else base[:, k] + bias
            picked = sampler.choose(logits, k)
            tokens.append(picked)
            if model.conf is None:  # no confidence head: a draft's confidence is its own probability
                own_probs.append(self._confidence(None, k, logits, picked))
            prev = picked
        if model.conf is None:
            return tokens, own_probs
        # The confidence head reads h_k and W1[x_{k-1}]: every position at once, once the tokens are known.
        logits = model.block_confidence_logits(h[:, :steps], torch.stack([anchors] + tokens[:-1], dim=1))
        return tokens, [self._confidence(logits[:, k], k, None, None) for k in range(steps)]

    def _draft_pruned(self, sampler, steps, anchors, h, base, floor: float):
        model = self.model
        tokens, confs, prev, state, survival = [], [], anchors, None, None
        for k in range(steps):
            bias, logit, state = model.head_step(h[:, k], prev, state, self.w2_rows)
            confidence = self._confidence(logit, k, None, None)
            survival = confidence if survival is None else survival * confidence
            if k > 0 and bool((survival < floor).all()):
                break
            logits = base[:, k] if bias is None else base[:, k] + bias
            prev = sampler.choose(logits, k)
            tokens.append(prev)
            confs.append(confidence)
        return tokens, confs

    def _block(self, requests, anchors, n: int) -> torch.Tensor:
        """h_1..h_n [B, n, d]: the fused C++ layers on a CPU (dspark_cpu), else DSparkModel.block."""
        lengths = context_lengths(self.kv, requests)
        weights = dspark_cpu.block_weights(self.model, self.kv, max(lengths), n)
        if weights is not None:
            return dspark_cpu.block(self.model, self.kv, weights, [r.row for r in requests], anchors,
                                    torch.tensor(lengths), n)
        kv, valid, starts = committed_context(self.kv, requests, self.model.config.num_layers, lengths)
        return self.model.block(anchors, starts, kv, valid, n)

    def _draft_eagle(self, requests, sampler, steps, kv, valid, starts, anchors):
        """Step by step: the anchor's input uses the last committed context feature, each later
        input the drafter's own previous residual stream (the drafted block is re-run causally)."""
        model = self.model
        rows = torch.tensor([r.row for r in requests], device=self.device)
        last = self.features.data[rows, starts - 1, 0]
        inputs = [model.eagle_input(anchors, last)]
        tokens, confs = [], []
        for k in range(steps):
            positions = starts[:, None] + torch.arange(k + 1, device=self.device)
            y, _ = model.eagle_run(torch.stack(inputs, dim=1), positions, kv, valid)
            h = rms_norm(y[:, -1], model.norm, model.config.rms_norm_eps)
            logits = self._logits(h)
            picked = sampler.choose(logits, k)
            tokens.append(picked)
            confs.append(self._confidence(model.confidence_logit(h, None), k, logits, picked))
            inputs.append(model.eagle_input(picked, y[:, -1]))
        return tokens, confs
