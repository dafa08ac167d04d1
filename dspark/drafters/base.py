"""What every drafter returns and receives (the Drafter protocol of DESIGN.md's engine cycle)."""

from __future__ import annotations

import abc
import dataclasses

import torch

from dspark.cache import SideCache


@dataclasses.dataclass
class Proposal:
    """One request's draft for this round. Node 0 is the anchor (the last emitted token, not part of
    `tokens`); nodes 1..n carry `tokens`.

    parents: parent of each node 1..n (a node index < its own, 0 = the anchor), None for a chain.
    draft_probs: [n + 1, V], row u = the distribution node u's children were sampled from, or None
        when the proposal is deterministic (greedy, top-k tree, n-gram lookup); [n + 1, V_d] over
        `draft_vocab` (strictly increasing token ids, q = 0 elsewhere) for a drafter over a subset.
    confidences: [n], the drafter's estimate that each node is accepted given its parent is.
    """

    tokens: list[int]
    parents: list[int] | None = None
    draft_probs: torch.Tensor | None = None
    confidences: torch.Tensor | None = None
    draft_vocab: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def truncated(self, n: int) -> "Proposal":
        """The first n draft nodes (a prefix in node order is always a valid tree)."""
        return Proposal(
            self.tokens[:n],
            None if self.parents is None else self.parents[:n],
            None if self.draft_probs is None else self.draft_probs[: n + 1],
            None if self.confidences is None else self.confidences[:n],
            self.draft_vocab,
        )


DEFAULT_SOURCE = "draft"  # what Drafter.source_for says for a drafter with one source


class Drafter(abc.ABC):
    """Proposers plug into the Engine through this interface; every hook but `propose` has a default.
    `request` objects expose `row` (cache row), `tokens` (prompt + emitted so far; the last one is the
    anchor), `params` and, in accept(), `verified` (how many of its drafted nodes the policy let the
    target verify)."""

    num_draft: int = 0  # the most draft nodes a proposal holds (gamma)
    gives_confidences: bool = False  # proposals carry per-node confidences (a DSpark confidence head)
    capture_layers: tuple[int, ...] = ()  # target layers whose residual stream the drafter reads

    def bind(self, rows: int, max_seq_len: int, vocab_size: int, captured: SideCache | None = None) -> None:
        """The engine's shape, once, before any request: allocate per-row state here. captured: when the
        drafter set `capture_layers`, the engine's side cache of the target's residual stream after those
        layers (concatenated, [rows, S, 1, width]). captured.seqlens[row] positions of a row are committed
        (prompt and accepted tokens, the anchor excluded) and `captured.committed(row, start, end)` reads
        them: a request's prompt before start(), each round's accepted nodes before accept(). The engine
        hands nothing over per round; a drafter reads what it needs when it drafts (rounds it is not asked
        to draft then cost it nothing, and the policy prices that deferred work with the round that drafts)."""

    def start(self, request) -> None:
        """A request joined (after its prefill)."""

    def source_for(self, request) -> str:
        """Which of this drafter's sources would propose for the request now (a function of its
        committed context only), so that policies can price sources whose costs and yields differ
        apart. Default: one source."""
        return DEFAULT_SOURCE

    @abc.abstractmethod
    def propose(self, requests: list, max_draft: int) -> list[Proposal]:
        """Drafts for the given requests, at most max_draft nodes each."""

    def propose_pruned(self, requests: list, max_draft: int, survival_floor: float) -> list[Proposal]:
        """propose(), told that no node whose survival (the product of the confidences up to it) falls below
        `survival_floor` will be verified (VerificationPolicy.survival_floor): a drafter that computes
        confidences step by step may stop once every request's survival is below it, keeping at least one
        node each (a policy may learn from the first node's confidence). Default: propose()."""
        return self.propose(requests, max_draft)

    def accept(self, requests: list, paths: list[list[int]]) -> None:
        """The verified round: each request's accepted node path (starting with 0)."""

    def finish(self, request) -> None:
        """A request left; free what the drafter holds for it."""
