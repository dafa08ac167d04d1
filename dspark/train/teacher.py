"""The frozen target's view of training sequences, computed once per sequence per step: the residual
stream after the drafter's layers (its context features) and the target's next-token logits at the
positions the blocks need (only those: [N, V] for every position would dominate memory)."""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from dspark.batch import build_round
from dspark.cache import KVCache
from dspark.models.dtypes import compute_dtype


class TeacherOutput:
    def __init__(self, features: torch.Tensor, hidden: torch.Tensor | None, logits: torch.Tensor | None, target):
        self.features, self._hidden, self._logits, self._target = features, hidden, logits, target

    def logits_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The target's next-token logits [*, V] (fp32) at these positions.

        Blocks overlap (a position serves up to gamma anchors), so the LM head runs once per distinct
        position, as one dense GEMM: the engine's batch-invariant kernel streams the head once per few
        rows, and took two thirds of a CPU training step here."""
        if self._logits is not None:
            return self._logits[positions]
        unique, inverse = torch.unique(positions, return_inverse=True)
        return self._distinct_logits(unique)[inverse]

    def probs_at(self, positions: torch.Tensor, vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The target's next-token probabilities [*, V] (fp32) at these positions, or only their
        columns of a draft vocabulary ([*, |S|]): softmax and gather run once per distinct position, and
        the [*, V] rows of every block position are never built."""
        unique, inverse = torch.unique(positions, return_inverse=True)
        if self._logits is not None:
            logits = self._logits[unique].float()
        else:
            logits = self._distinct_logits(unique)
        probs = torch.softmax(logits, dim=-1)
        if vocab_ids is not None:
            probs = probs[:, vocab_ids.to(probs.device)]
        return probs[inverse]

    def _distinct_logits(self, unique: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            head = lm_head(self._target, self._hidden.device.type)
            return F.linear(self._hidden[unique].to(head.dtype), head).float()


_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lm_head(target, device_type: str) -> torch.Tensor:
    """The target's LM head in the compute dtype (autocast's, when on), cast once per target."""
    head = target.shared_weights()[1]
    dtype = compute_dtype(device_type, head.dtype)
    per_dtype = _HEADS.setdefault(target, {})
    if dtype not in per_dtype:
        per_dtype[dtype] = head.to(dtype).contiguous()
    return per_dtype[dtype]


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
