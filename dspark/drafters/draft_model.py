"""A draft language model with the target's vocabulary: an independent small model, or the target's
own first layers (self-draft).

Chain mode samples each draft token from the model's processed distribution (temperature, top-k,
top-p of the request; argmax for greedy requests) and reports it as draft_probs, so rejection
sampling stays lossless. Tree mode expands a static branching template (e.g. (3, 2, 1): three
children of the anchor, two under each, then one) with the draft's top-k tokens at every node: a
deterministic proposal, children best first."""

from __future__ import annotations

import torch

from dspark import ops
from dspark.batch import build_round
from dspark.cache import KVCache
from dspark.drafters.base import Drafter, Proposal
from dspark.drafters.draft_sampling import DraftSampler
from dspark.models.llama import LlamaModel


class DraftModelDrafter(Drafter):
    def __init__(self, model: LlamaModel, num_draft: int = 4, branching: tuple[int, ...] | None = None):
        if num_draft < 1:
            raise ValueError(f"num_draft must be >= 1, got {num_draft}")
        if branching is not None and (not branching or min(branching) < 1):
            raise ValueError(f"branching must list >= 1 children per level, got {branching}")
        self.model, self.num_draft, self.branching = model, num_draft, branching
        if branching is not None:  # verify the whole template unless the policy says otherwise
            sizes, width = 0, 1
            for b in branching:
                width *= b
                sizes += width
            self.num_draft = sizes
        self.cache: KVCache | None = None
        self.lengths: list[int] = []
        self.generators: dict[int, torch.Generator] = {}
        self._written: dict[int, int] = {}  # tree mode: nodes 0.._written-1 of the last proposal are in the cache

    @classmethod
    def self_draft(cls, target: LlamaModel, num_layers: int, num_draft: int = 4,
                   branching: tuple[int, ...] | None = None) -> "DraftModelDrafter":
        """The target's first num_layers layers plus its final norm and head: no training needed."""
        return cls(target.truncated(num_layers), num_draft, branching)

    def bind(self, rows: int, max_seq_len: int, vocab_size: int, captured=None) -> None:
        c = self.model.config
        if c.vocab_size != vocab_size:
            raise ValueError(f"the draft model's vocabulary ({c.vocab_size}) differs from the target's ({vocab_size})")
        self.cache = KVCache(c.num_layers, rows, max_seq_len, c.num_kv_heads, c.head_dim, self.model.dtype,
                             self.model.device)
        self.lengths = [0] * rows

    def start(self, request) -> None:
        self.lengths[request.row] = 0
        self.generators[request.row] = torch.Generator(self.model.device).manual_seed(request.params.seed + 0x5EED)

    def finish(self, request) -> None:
        self.lengths[request.row] = 0
        self.generators.pop(request.row, None)

    def accept(self, requests, paths) -> None:
        if self.branching is None:
            for request in requests:  # a chain keeps its slot order: trim to what the target committed
                self.lengths[request.row] = min(self.lengths[request.row], len(request.tokens) - 1)
            return
        # Tree: keep the accepted path's nodes that the draft model has written (all but the last level).
        rows = self.cache.rows
        kept = torch.full((rows, max(len(p) for p in paths)), -1, dtype=torch.int32)
        counts = torch.zeros(rows, dtype=torch.int32)
        for request, path in zip(requests, paths):
            written = [node for node in path if node < self._written.get(request.row, 1)]
            kept[request.row, : len(written)] = torch.tensor(written, dtype=torch.int32)
            counts[request.row] = len(written)
        self.cache.seqlens.copy_(torch.tensor(self.lengths, dtype=torch.int32))
        device = self.cache.seqlens.device
        ops.kv_rollback(self.cache.k, self.cache.v, self.cache.seqlens, kept.to(device), counts.to(device))
        self.lengths = self.cache.seqlens.tolist()

    def _forward_last(self, entries, positions_of_interest):
        """One draft forward; logits [sum of picks, V] at the requested local nodes of each entry."""
        rnd = build_round(self.cache.rows, entries, self.lengths, self.model.device)
        self.cache.seqlens.copy_(torch.tensor(self.lengths, dtype=torch.int32))
        hidden, _ = self.model.forward(self.cache, rnd)
        index = [int(rnd.qo_indptr[row]) + node for (row, _, _), nodes in zip(entries, positions_of_interest)
                 for node in nodes]
        return self.model.logits(hidden[torch.tensor(index, dtype=torch.long)])

    def _propose_tree(self, requests, max_draft: int) -> list[Proposal]:
        """Level by level: every round re-runs the anchor and the tree so far (tree_attention sees
        in-round ancestors only), then adds the top-b children of the newest level's nodes."""
        catch_up = {r.row: r.tokens[self.lengths[r.row]:-1] for r in requests}
        trees = {r.row: ([], []) for r in requests}  # tokens, parents of nodes 1..n
        frontier = {r.row: [0] for r in requests}
        # Level 0: commit the catch-up tokens, read the anchor's logits.
        entries = [(r.row, catch_up[r.row] + [r.tokens[-1]], None) for r in requests]
        logits = self._forward_last(entries, [[len(catch_up[r.row])] for r in requests])
        for r in requests:
            self.lengths[r.row] += len(catch_up[r.row])
        for level, width in enumerate(self.branching):
            offset = 0
            for r in requests:
                tokens, parents = trees[r.row]
                new_frontier = []
                for node in frontier[r.row]:
                    top = torch.topk(logits[offset], width).indices.tolist()
                    offset += 1
                    for token in top:
                        if len(tokens) < max_draft:
                            tokens.append(token)
                            parents.append(node)
                            new_frontier.append(len(tokens))
                frontier[r.row] = new_frontier
            if level == len(self.branching) - 1 or not any(frontier.values()):
                break
            entries = [(r.row, [r.tokens[-1]] + trees[r.row][0], [-1] + trees[r.row][1]) for r in requests]
            logits = self._forward_last(entries, [frontier[r.row] for r in requests])
        self._written = {r.row: 1 + len(trees[r.row][0]) - len(frontier[r.row]) for r in requests}
        return [Proposal(*trees[r.row]) for r in requests]

    def propose(self, requests, max_draft: int) -> list[Proposal]:
        steps = min(self.num_draft, max_draft)
        if steps <= 0 or not requests:
            return [Proposal([]) for _ in requests]
        if self.branching is not None:
            return self._propose_tree(requests, steps)
        rows = self.cache.rows
        feeds = [r.tokens[self.lengths[r.row]:] for r in requests]
        sampler = DraftSampler(requests, steps, self.generators, self.model.device)
        drafted = []
        for k in range(steps):
            rnd = build_round(rows, [(r.row, feed, None) for r, feed in zip(requests, feeds)], self.lengths,
                              self.model.device)
            self.cache.seqlens.copy_(torch.tensor(self.lengths, dtype=torch.int32))
            hidden, _ = self.model.forward(self.cache, rnd)
            logits = self.model.logits(hidden[rnd.last_index])
            for r, feed in zip(requests, feeds):
                self.lengths[r.row] += len(feed)
            drafted.append(sampler.choose(logits, k))
            feeds = [[token] for token in drafted[-1].tolist()]  # the next step's round is built on the host
        tokens = torch.stack(drafted, dim=1).tolist()
        return [Proposal(tokens[i], draft_probs=q) for i, q in enumerate(sampler.draft_probs())]
