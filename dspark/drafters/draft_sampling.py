"""How the drafters draw their tokens, batched over the requests of a proposal.

Greedy rows take one argmax. Sampled rows take one batched draw per step from their processed
distributions, by inverse CDF: a request's temperature, top-k and top-p apply to its own row. The
uniforms come from each request's own generator, all of a proposal's steps in one call, so a seed
reproduces a request's drafts whatever else shares the batch. No per-request loop runs per draft step,
and the tokens stay on the device between steps. The rows drawn from are exactly the draft_probs the
proposal reports, which keeps rejection sampling lossless.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _per_row(value, rows: int) -> list:
    return list(value) if isinstance(value, Sequence) else [value] * rows


def processed_probs(logits: torch.Tensor, temperature, top_k=0, top_p=1.0) -> torch.Tensor:
    """softmax(logits / temperature) restricted to the top-k (ties with the k-th kept), then to the
    top-p nucleus of what remains, renormalised; fp32, logits' shape. logits [W] or [R, W]; each
    parameter a number or a sequence with one entry per row (top_k 0 and top_p 1 are off)."""
    width = logits.shape[-1]
    x = logits.reshape(-1, width)
    rows, device = x.shape[0], x.device
    temperatures, ks, ps = (_per_row(v, rows) for v in (temperature, top_k, top_p))
    probs = torch.softmax(x.float() / torch.tensor(temperatures, device=device)[:, None], dim=-1)
    if any(0 < k < width for k in ks):
        # A row without top-k compares with its smallest probability: it keeps everything.
        kth = [k - 1 if 0 < k < width else width - 1 for k in ks]
        ordered = torch.sort(probs, dim=-1, descending=True).values
        threshold = ordered.gather(1, torch.tensor(kth, device=device)[:, None])
        probs = torch.where(probs >= threshold, probs, 0.0)
    if any(p < 1.0 for p in ps):
        ordered, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(ordered, -1) - ordered
        nucleus = torch.tensor(ps, device=device)[:, None]
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before < nucleus * probs.sum(-1, True))
        probs = torch.where(keep | (nucleus >= 1.0), probs, 0.0)
    return (probs / probs.sum(-1, keepdim=True)).reshape(logits.shape)


class DraftSampler:
    """One proposal's draws: `choose` per draft step, `draft_probs` at the end."""

    def __init__(self, requests: list, steps: int, generators: dict[int, torch.Generator], device,
                 vocab_ids: torch.Tensor | None = None):
        """generators: each sampled request's own, by cache row; vocab_ids: the draft vocabulary the
        logits' columns stand for (None: the whole vocabulary)."""
        self.count, self.vocab_ids = len(requests), vocab_ids
        self.sampled = [i for i, r in enumerate(requests) if r.params.temperature > 0]
        self.rows: list[torch.Tensor] = []  # per step, the sampled requests' distributions [S, W]
        if self.sampled:
            params = [requests[i].params for i in self.sampled]
            self.index = torch.tensor(self.sampled, device=device)
            self.params = ([p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params])
            self.uniforms = torch.stack([torch.rand(steps, dtype=torch.float64, device=device,
                                                    generator=generators[requests[i].row]) for i in self.sampled])

    def choose(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The step's tokens [R] (full-vocabulary ids, on the device) from logits [R, W]."""
        picked = torch.argmax(logits, dim=-1)
        if self.sampled:
            q = processed_probs(logits[self.index], *self.params)
            cdf = q.double().cumsum(-1)
            drawn = torch.searchsorted(cdf, self.uniforms[:, step: step + 1] * cdf[:, -1:], right=True).squeeze(-1)
            # u < 1 keeps the draw below the total; should rounding reach it, the last token of weight > 0
            last_positive = q.shape[-1] - 1 - (q.flip(-1) > 0).to(torch.int8).argmax(-1)
            picked = picked.index_copy(0, self.index, torch.minimum(drawn, last_positive))
            self.rows.append(q)
        return picked if self.vocab_ids is None else self.vocab_ids[picked]

    def draft_probs(self) -> list[torch.Tensor | None]:
        """Per request, its distributions [steps + 1, W] (the last node has no children: a zero row), or
        None for a greedy request (a deterministic proposal)."""
        out: list[torch.Tensor | None] = [None] * self.count
        if self.sampled and self.rows:
            stacked = torch.stack(self.rows, dim=1)
            stacked = torch.cat([stacked, stacked.new_zeros(stacked.shape[0], 1, stacked.shape[2])], dim=1)
            for j, i in enumerate(self.sampled):
                out[i] = stacked[j]
        return out
