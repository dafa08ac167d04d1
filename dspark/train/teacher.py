"""The frozen target's view of training sequences, computed once per sequence per step: the residual
stream after the drafter's layers (its context features) and the target's next-token logits at the
positions the blocks need (only those: [N, V] for every position would dominate memory)."""

from __future__ import annotations

import torch

from dspark.batch import build_round
from dspark.cache import KVCache


class TeacherOutput:
    def __init__(self, features: torch.Tensor, hidden: torch.Tensor | None, logits: torch.Tensor | None, target):
        self.features, self._hidden, self._logits, self._target = features, hidden, logits, target

    def logits_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The target's next-token logits [*, V] (fp32) at these positions."""
        if self._logits is not None:
            return self._logits[positions]
        with torch.no_grad():
            return self._target.logits(self._hidden[positions]).float()


@torch.no_grad()
def teacher_pass(target, sequences: list[torch.Tensor], layers: tuple[int, ...]) -> list[TeacherOutput]:
    """One batched prefill of the sequences through the target (a LlamaModel or the transformers
    adapter); features are cloned out of inference mode so autograd may read them."""
    c = target.config
    longest = max(s.shape[0] for s in sequences)
    cache = KVCache(c.num_layers, len(sequences), longest, c.num_kv_heads, c.head_dim, target.dtype, target.device)
    rnd = build_round(len(sequences), [(i, s.tolist(), None) for i, s in enumerate(sequences)], [0] * len(sequences),
                      target.device)
    out, captured = target.forward(cache, rnd, layers)
    features = torch.cat(captured, dim=-1)
    adapter = target.forward_returns_logits  # the transformers adapter: logits, not hidden states
    results, offsets = [], rnd.qo_indptr.tolist()
    for i in range(len(sequences)):
        span = slice(offsets[i], offsets[i + 1])
        feats = features[span].clone()
        rest = out[span].clone()
        results.append(TeacherOutput(feats, None if adapter else rest, rest if adapter else None, target))
    return results
