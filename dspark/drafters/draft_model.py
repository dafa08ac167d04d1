"""A draft language model with the target's vocabulary: an independent small model, or the target's
own first layers (self-draft). It proposes a chain, sampled from its own processed distribution
(temperature, top-k, top-p of each request; argmax for greedy requests), and reports that
distribution as draft_probs so that rejection sampling stays lossless."""

from __future__ import annotations

import torch

from dspark.batch import build_round
from dspark.cache import KVCache
from dspark.drafters.base import Proposal
from dspark.models.llama import LlamaModel


def processed_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """softmax(logits / temperature) restricted to the top-k, then to the top-p nucleus (float32)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if 0 < top_k < probs.shape[-1]:
        kth = torch.topk(probs, top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, -1) - sorted_probs
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before < top_p * probs.sum(-1, True))
        probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum(-1, keepdim=True)


class DraftModelDrafter:
    def __init__(self, model: LlamaModel, num_draft: int = 4):
        if num_draft < 1:
            raise ValueError(f"num_draft must be >= 1, got {num_draft}")
        self.model, self.num_draft = model, num_draft
        self.cache: KVCache | None = None
        self.lengths: list[int] = []
        self.generators: dict[int, torch.Generator] = {}

    @classmethod
    def self_draft(cls, target: LlamaModel, num_layers: int, num_draft: int = 4) -> "DraftModelDrafter":
        """The target's first num_layers layers plus its final norm and head: no training needed."""
        return cls(target.truncated(num_layers), num_draft)

    def bind(self, rows: int, max_seq_len: int, vocab_size: int) -> None:
        c = self.model.config
        if c.vocab_size != vocab_size:
            raise ValueError(f"the draft model's vocabulary ({c.vocab_size}) differs from the target's ({vocab_size})")
        self.cache = KVCache(c.num_layers, rows, max_seq_len, c.num_kv_heads, c.head_dim, self.model.dtype,
                             self.model.device)
        self.lengths = [0] * rows

    def start(self, request) -> None:
        self.lengths[request.row] = 0
        self.generators[request.row] = torch.Generator().manual_seed(request.params.seed + 0x5EED)

    def finish(self, request) -> None:
        self.lengths[request.row] = 0
        self.generators.pop(request.row, None)

    def accept(self, requests, paths, target_hidden) -> None:
        for request in requests:  # a chain keeps its slot order: trim to what the target committed
            self.lengths[request.row] = min(self.lengths[request.row], len(request.tokens) - 1)

    def propose(self, requests, max_draft: int) -> list[Proposal]:
        steps = min(self.num_draft, max_draft)
        if steps <= 0 or not requests:
            return [Proposal([]) for _ in requests]
        rows = self.cache.rows
        feeds = {r.row: r.tokens[self.lengths[r.row]:] for r in requests}
        drafted: dict[int, list[int]] = {r.row: [] for r in requests}
        probs: dict[int, list[torch.Tensor]] = {r.row: [] for r in requests}
        for _ in range(steps):
            rnd = build_round(rows, [(r.row, feeds[r.row], None) for r in requests], self.lengths, self.model.device)
            self.cache.seqlens.copy_(torch.tensor(self.lengths, dtype=torch.int32))
            hidden, _ = self.model.forward(self.cache, rnd)
            logits = self.model.logits(hidden[rnd.last_index])
            for i, r in enumerate(requests):
                self.lengths[r.row] += len(feeds[r.row])
                p = r.params
                if p.temperature == 0:
                    token = int(torch.argmax(logits[i]))
                    q = torch.zeros_like(logits[i])
                else:
                    q = processed_probs(logits[i], p.temperature, p.top_k, p.top_p)
                    token = int(torch.multinomial(q, 1, generator=self.generators[r.row]))
                drafted[r.row].append(token)
                probs[r.row].append(q)
                feeds[r.row] = [token]
        vocab = self.model.config.vocab_size
        out = []
        for r in requests:
            rows_q = probs[r.row] + [torch.zeros(vocab, device=self.model.device)]  # the last node has no children
            stochastic = r.params.temperature > 0
            out.append(Proposal(drafted[r.row], draft_probs=torch.stack(rows_q) if stochastic else None))
        return out
