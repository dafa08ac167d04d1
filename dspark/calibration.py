"""Calibrating the confidence head: Sequential Temperature Scaling (DSPARK.md section 3).

The scheduler trusts the survival a_k = c_1 ... c_k as the probability that drafts 1..k are all
accepted. Calibration data is what the engine really does: decode held-out prompts with the drafter
at a fixed gamma, and record per round the raw confidences and how many drafts rejection sampling
kept (survived_k = accepted >= k). STS then picks, for k = 1..gamma in order, the temperature T_k of
c_k = sigmoid(logit_k / T_k) that minimises the ECE of a_k, earlier temperatures held fixed. Each T_k
is a monotone map of c_k, so the ranking of single-position confidences never changes.

A temperature only scales logits about 0, so it cannot fix a head that is over- or under-confident by
a constant: on SmolLM2's shipped drafter position 1 kept 4.9% ECE after STS. `shift_grid` adds a shift
b_k, c_k = sigmoid(logit_k / T_k + b_k), still monotone (the paper's STS is shift_grid=(0.0,)). With a
shift, ECE alone is minimised by a constant at the observed survival rate (a huge T_k and the shift to
the base rate: measured on that drafter, T_1 = 20), which keeps the ranking but throws away the spread
the scheduler needs; so the shifted fit minimises the log loss of a_k, a proper scoring rule, and
reports ECE.
"""

from __future__ import annotations

import math

import torch

from dspark.scheduler import FixedLength, VerificationPolicy

TEMPERATURES = [round(math.exp(x / 20), 4) for x in range(-40, 61)]  # 0.135 .. 20, log spaced
SHIFTS = [x / 10 for x in range(-30, 31)]  # logit shifts -3 .. 3


class RecordingPolicy(VerificationPolicy):
    """FixedLength(gamma) that remembers each round's proposal confidences, and from each request's
    emitted count before and after the round, how many drafts were accepted."""

    def __init__(self, gamma: int):
        self.inner = FixedLength(gamma)
        self.rounds: list[tuple[object, int, list[float], int]] = []  # request, emitted before, c, drafted

    def choose(self, requests, proposals):
        lengths = self.inner.choose(requests, proposals)
        budget = [r.params.max_tokens - len(r.generated) - 1 for r in requests]
        for r, p, n, room in zip(requests, proposals, lengths, budget):
            if p.confidences is None and len(p):
                raise ValueError("calibration needs a drafter with a confidence head")
            conf = [] if p.confidences is None else p.confidences.float().tolist()
            self.rounds.append((r, r.stats.emitted, conf, max(0, min(n, room))))
        return lengths

    def request_index(self) -> torch.Tensor:
        """[N]: for each round (as samples() orders them), its request's order of first appearance, so
        that rounds can be split by request (rounds of one request are correlated)."""
        order: dict[int, int] = {}
        return torch.tensor([order.setdefault(id(r), len(order)) for r, *_ in self.rounds], dtype=torch.long)

    def samples(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [N, gamma], survived [N, gamma] float, valid [N, gamma] bool) over the rounds."""
        gamma = self.inner.num_draft
        # A round emits accepted + 1 tokens: up to the request's next round, or to its final count.
        accepted_counts, next_before = [0] * len(self.rounds), {}
        for i in range(len(self.rounds) - 1, -1, -1):
            r, before = self.rounds[i][:2]
            accepted_counts[i] = next_before.get(id(r), r.stats.emitted) - before - 1
            next_before[id(r)] = before
        logits, survived, valid = [], [], []
        for (_, _, conf, drafted), accepted in zip(self.rounds, accepted_counts):
            c = torch.tensor(conf[:gamma] + [0.5] * (gamma - len(conf[:gamma]))).clamp(1e-7, 1 - 1e-7)
            logits.append(torch.log(c) - torch.log1p(-c))
            k = torch.arange(1, gamma + 1)
            survived.append((k <= accepted).float())
            valid.append(k <= drafted)
        return torch.stack(logits), torch.stack(survived), torch.stack(valid)


def survival_probs(logits: torch.Tensor, temperatures: list[float], shifts: list[float] | None = None) -> torch.Tensor:
    """a_k = prod_{i<=k} sigmoid(logit_i / T_i + b_i), [N, gamma] (b = 0 without shifts)."""
    t = torch.tensor(temperatures, dtype=logits.dtype)
    b = torch.tensor(shifts if shifts is not None else [0.0] * len(temperatures), dtype=logits.dtype)
    return torch.cumprod(torch.sigmoid(logits / t + b), dim=1)


def ece(pred: torch.Tensor, label: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error with equal-width bins (weighted |mean prediction - frequency|)."""
    if pred.numel() == 0:
        return float("nan")
    index = (pred * bins).long().clamp(0, bins - 1)
    gap = torch.bincount(index, weights=pred.double() - label.double(), minlength=bins)
    return float(gap.abs().sum()) / pred.numel()  # per bin: count x |mean prediction - frequency|


def log_loss(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Mean binary cross-entropy of predicted survival against the observed outcome."""
    p = pred.double().clamp(1e-7, 1 - 1e-7)
    return float(-(label * torch.log(p) + (1 - label) * torch.log1p(-p)).mean())


def roc_auc(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Probability that a random positive outranks a random negative (ties count half)."""
    pos, neg = pred[label > 0.5].double(), pred[label <= 0.5].double()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    order = torch.cat([pos, neg])
    sorted_values, idx = order.sort()
    _, group, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    ranks = torch.empty_like(order)
    ranks[idx] = ((ends - counts + 1 + ends) / 2)[group]  # tied values share their mean rank
    return float((ranks[: pos.numel()].sum() - pos.numel() * (pos.numel() + 1) / 2) / (pos.numel() * neg.numel()))


def fit_sts(logits: torch.Tensor, survived: torch.Tensor, valid: torch.Tensor, grid=TEMPERATURES,
            shift_grid=(0.0,)) -> tuple[list[float], list[float]]:
    """(temperatures, shifts): for k = 1..gamma in order, the (T_k, b_k) on the grids minimising the ECE
    of a_k (temperatures only, the paper's STS) or its log loss (with shifts), earlier positions held
    fixed; ties go to the map closest to identity."""
    gamma = logits.shape[1]
    temps, shifts = [1.0] * gamma, [0.0] * gamma
    for k in range(gamma):
        mask = valid[:, k]
        if not mask.any():
            continue
        before = survival_probs(logits[mask], temps, shifts)[:, k - 1] if k else torch.ones(int(mask.sum()))
        column, label = logits[mask, k], survived[mask, k]
        candidates = [(t, b) for t in grid for b in shift_grid]
        error = ece if tuple(shift_grid) == (0.0,) else log_loss
        errors = [error(before * torch.sigmoid(column / t + b), label) for t, b in candidates]
        temps[k], shifts[k] = min(zip(candidates, errors),
                                  key=lambda ce: (ce[1], abs(math.log(ce[0][0])) + abs(ce[0][1])))[0]
    return temps, shifts


def report(logits, survived, valid, temperatures: list[float], shifts: list[float] | None = None) -> list[dict]:
    """Per position: samples, observed survival, ECE and ROC-AUC of a_k before (T = 1) and after."""
    before = survival_probs(logits, [1.0] * logits.shape[1])
    after = survival_probs(logits, temperatures, shifts)
    rows = []
    for k in range(logits.shape[1]):
        m = valid[:, k]
        rows.append({"position": k + 1, "samples": int(m.sum()), "survival_rate": float(survived[m, k].mean()),
                     "temperature": temperatures[k], "shift": shifts[k] if shifts is not None else 0.0,
                     "ece_before": ece(before[m, k], survived[m, k]), "ece_after": ece(after[m, k], survived[m, k]),
                     "auc_before": roc_auc(before[m, k], survived[m, k]),
                     "auc_after": roc_auc(after[m, k], survived[m, k])})
    return rows


def reliability_diagram(path: str, logits, survived, valid, temperatures, title: str, bins: int = 10,
                        shifts: list[float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gamma = logits.shape[1]
    cols = min(gamma, 4)
    fig, axes = plt.subplots(-(-gamma // cols), cols, figsize=(3.2 * cols, 3.0 * -(-gamma // cols)), squeeze=False)
    for k in range(gamma):
        ax, m = axes[k // cols][k % cols], valid[:, k]
        for temps, shift, name, style in (([1.0] * gamma, None, "before", "o--"),
                                          (temperatures, shifts, "after STS", "s-")):
            a = survival_probs(logits[m], temps, shift)[:, k]
            index = (a * bins).long().clamp(0, bins - 1)
            xs = [float(a[index == b].mean()) for b in range(bins) if (index == b).any()]
            ys = [float(survived[m, k][index == b].mean()) for b in range(bins) if (index == b).any()]
            ax.plot(xs, ys, style, label=f"{name} (ECE {ece(a, survived[m, k]):.3f})", markersize=4)
        ax.plot([0, 1], [0, 1], color="gray", linewidth=0.8)
        ax.set_title(f"a_{k + 1}, n={int(m.sum())}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    for k in range(gamma, axes.size):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(title, fontsize=10)
    fig.supxlabel("predicted survival a_k")
    fig.supylabel("observed survival")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heldout_prompts(path: str, vocab_size: int, holdout: int) -> list[list[int]]:
    """The prompts of the sequences train-drafter held out (the last min(holdout, n // 10))."""
    from dspark.train.data import load_sequences

    sequences = load_sequences(path, vocab_size, max_len=1 << 30)
    count = min(holdout, len(sequences) // 10)
    prompts = [s.ids[: s.prompt_len].tolist() for s in sequences[len(sequences) - count:]]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"{path}: no held-out prompts (holdout {holdout}, {len(sequences)} sequences)")
    return prompts


def collect(target, drafter, prompts, max_tokens: int, temperature: float, batch: int):
    from dspark.engine import Engine
    from dspark.sampling_params import SamplingParams

    policy = RecordingPolicy(drafter.num_draft)
    longest = max(len(p) for p in prompts)
    engine = Engine(target, None, drafter, policy=policy, max_batch=batch,
                    max_seq_len=longest + max_tokens + drafter.num_draft + 8)
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i) for i in range(len(prompts))]
    engine.generate(prompts, params)
    return (*policy.samples(), policy.request_index())


def held_out_report(logits, survived, valid, request, shift_grid=(0.0,)) -> list[dict]:
    """ECE and AUC measured honestly: fit on the rounds of even-numbered requests, report on the odd ones."""
    fit = request % 2 == 0
    temps, shifts = fit_sts(logits[fit], survived[fit], valid[fit], shift_grid=shift_grid)
    return report(logits[~fit], survived[~fit], valid[~fit], temps, shifts)
