"""The DSpark training objective (DSPARK.md section 3, reference weights of section 6).

Per block position k = 1..gamma (weight w_k = exp(-(k-1)/decay), decay 4):
  CE    -log p_d(t_{a+k})                 the token the target produced
  L1    ||p_d - p_t||_1                   2 x total variation; 1 - L1/2 is the acceptance probability
  BCE   bce(c_k, c*_k), c*_k = 1 - L1/2   (detached: the confidence head predicts, never steers)
Total 0.1 CE + 0.9 L1 + 1.0 BCE, a weighted mean over valid (block, position) pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WEIGHTS = (0.1, 0.9, 1.0)


def block_loss(draft_logits, conf_logits, target_logits, target_tokens, valid, decay: float = 4.0,
               weights=WEIGHTS, vocab_ids: torch.Tensor | None = None,
               target_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """draft_logits, target_logits [A, g, V]; conf_logits [A, g] (None: no confidence head); target_tokens [A, g]; valid [A, g] bool.
    With a draft vocabulary S (vocab_ids), draft_logits are [A, g, |S|]: the drafter puts no mass
    outside S, so the target's mass there counts in full in L1, and CE skips targets outside S.
    target_probs instead of target_logits: the target's probabilities, already restricted to S when
    there is one ([A, g, |S|]; their deficit from 1 is the mass outside S).
    Returns (loss, metrics); metrics hold the terms and the per-position acceptance 1 - TV."""
    if (target_logits is None) == (target_probs is None):
        raise ValueError("give exactly one of target_logits and target_probs")
    g = draft_logits.shape[1]
    log_pd = torch.log_softmax(draft_logits.float(), dim=-1)
    if target_probs is None:
        p_t = torch.softmax(target_logits.float(), dim=-1)
        if vocab_ids is not None:
            p_t = p_t[..., vocab_ids]
    else:
        p_t = target_probs.float()
    if p_t.shape != log_pd.shape:
        raise ValueError(f"the target's probabilities {tuple(p_t.shape)} do not match the draft's {tuple(log_pd.shape)}")
    ce_valid = valid
    if vocab_ids is not None:
        # Each target token's column in S (any order of S), found without a host read.
        ids, order = vocab_ids.to(target_tokens.device, target_tokens.dtype).sort()
        at = torch.searchsorted(ids, target_tokens).clamp(max=ids.numel() - 1)
        ce_valid = valid & (ids[at] == target_tokens)
        target_tokens = order[at]
    ce = -log_pd.gather(-1, target_tokens[..., None]).squeeze(-1)
    l1 = (log_pd.exp() - p_t).abs().sum(-1)
    if vocab_ids is not None:
        l1 = l1 + (1 - p_t.sum(-1)).clamp(min=0)
    accept = (1 - 0.5 * l1).detach().clamp(0, 1)
    bce = (torch.zeros_like(accept) if conf_logits is None
           else F.binary_cross_entropy_with_logits(conf_logits.float(), accept, reduction="none"))
    w = torch.exp(-torch.arange(g, device=draft_logits.device, dtype=torch.float32) / decay)[None] * valid
    norm = w.sum().clamp_min(1e-9)
    terms = {name: (value * w).sum() / norm for name, value in (("l1", l1), ("bce", bce))}
    w_ce = w * ce_valid
    terms["ce"] = (ce * w_ce).sum() / w_ce.sum().clamp_min(1e-9)
    loss = weights[0] * terms["ce"] + weights[1] * terms["l1"] + weights[2] * terms["bce"]
    counts = valid.sum(0).clamp_min(1)
    # Expected accepted length under teacher forcing: bonus + sum_k prod_{i<=k} acceptance.
    survive = torch.cumprod(torch.where(valid, accept, 0.0), dim=1)
    metrics = {name: float(v.detach()) for name, v in terms.items()}
    metrics["loss"] = float(loss.detach())
    metrics["accept_by_pos"] = ((accept * valid).sum(0) / counts).tolist()
    metrics["tau_est"] = float(1 + survive.sum(1).mean())
    return loss, metrics
