"""Drafter quality on the paper's prompt sets (issue 5's evaluation; Table 1, Figures 2, 4, 5 at our
scale): SmolLM2 as the target, chain drafting at a fixed gamma (no scheduler), temperatures 0 and 1.

    python bench/drafter_eval.py --drafter dspark-markov=DIR --drafter dflash=DIR2 --out bench/results/drafters-cpu

One engine run per (drafter, temperature, domain) records every round's confidences and accepted
count (calibration.RecordingPolicy), which gives:
- tau (tokens per round, bonus included) and tokens/s, against plain decoding of the same prompts;
- the position-wise conditional acceptance (Figure 2);
- tau at shorter gammas, by truncating each recorded round (Figure 4): verifying only the first g
  drafts of a chain accepts min(accepted, g) of them with the same draws, so this is exact per
  round, though later rounds would start elsewhere;
- the confidence-threshold sweep (Figure 5): verifying the prefix whose survival is >= t, tokens per
  round against the acceptance rate of the verified drafts, from the same records.
Writes <out>.json, <out>-table.md and <out>.png.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import time

import torch

from dspark.calibration import RecordingPolicy
from dspark.models.dtypes import default_dtype
from dspark.drafters import DSparkDrafter, NgramDrafter
from dspark.engine import Engine
from dspark.models import load_model, load_tokenizer
from dspark.sampling_params import SamplingParams
from dspark.scheduler import FixedLength

DOMAINS = {"code": "humaneval.jsonl", "math": "gsm8k.jsonl", "chat": "mt-bench.jsonl"}
THRESHOLDS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def load_prompts(directory: pathlib.Path, per_domain: int, tokenizer) -> dict[str, list[list[int]]]:
    out = {}
    for domain, name in DOMAINS.items():
        lines = (directory / name).read_text().splitlines()[:per_domain]
        texts = [json.loads(line)["turns"][0] for line in lines]
        out[domain] = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": t}],
                                                               add_generation_prompt=True, tokenize=False)).input_ids
                       for t in texts]
    return out


def decode(model, tokenizer, drafter, policy, prompts, params):
    engine = Engine(model, tokenizer, drafter, policy=policy, max_batch=1,
                    max_seq_len=max(map(len, prompts)) + params.max_tokens + 16)
    start = time.perf_counter()
    requests = [engine.generate([p], params)[0] for p in prompts]  # batch 1, one after another
    wall = time.perf_counter() - start
    tokens = sum(len(r.generated) for r in requests)
    return engine.stats.summary(requests), tokens / wall, [r.generated for r in requests]


def counterfactuals(logits: torch.Tensor, survived: torch.Tensor, valid: torch.Tensor, gamma: int) -> dict:
    """tau at each g <= gamma and the threshold sweep, from recorded rounds."""
    accepted = (survived * valid).sum(1)  # drafts accepted per round (a prefix)
    drafted = valid.sum(1)
    out = {"tau_by_gamma": {g: float((1 + accepted.clamp(max=g)).mean()) for g in range(1, gamma + 1)}}
    a = torch.cumprod(torch.sigmoid(logits), 1) * valid  # survival as the drafter reports it (calibrated if it is)
    sweep = []
    for t in THRESHOLDS:
        length = torch.where(a >= t, 1, 0).cumprod(1).sum(1).clamp(max=drafted)
        kept = torch.minimum(accepted, length)
        sweep.append({"threshold": t, "tokens_per_round": float((1 + kept).mean()),
                      "verified_per_round": float(length.float().mean()),
                      "acceptance_rate": float(kept.sum() / length.sum().clamp(min=1))})
    out["threshold_sweep"] = sweep
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drafter", action="append", default=[],
                    help="NAME=DIR, a trained drafter (repeatable); DIR#full ignores its draft vocabulary")
    ap.add_argument("--ngram", action="store_true", help="also the n-gram drafter at the same gamma")
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--per-domain", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--datasets", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    ap.add_argument("--out", default="bench/results/drafters-cpu")
    args = ap.parse_args()
    dtype = default_dtype("cpu")
    tokenizer, model = load_tokenizer(None), load_model(None, dtype)
    prompts = load_prompts(pathlib.Path(args.datasets), args.per_domain, tokenizer)
    drafters = {name: (lambda path=path: DSparkDrafter.from_pretrained(
                    path.removesuffix("#full"), model, args.gamma, dtype=dtype, use_draft_vocab=not path.endswith("#full")))
                for name, path in (spec.split("=", 1) for spec in args.drafter)}
    if args.ngram:
        drafters["ngram"] = lambda: NgramDrafter(args.gamma)
    warm = prompts["code"][:1]
    for make in drafters.values():  # first calls pay one-time costs (allocator, thread pools)
        decode(model, tokenizer, make(), None, warm, SamplingParams(max_tokens=8))
    results = {"device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "dtype": str(dtype), "gamma": args.gamma, "per_domain": args.per_domain, "max_tokens": args.max_tokens,
               "drafters": dict(spec.split("=", 1) for spec in args.drafter), "runs": []}
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=temperature, seed=0)
        for domain, domain_prompts in prompts.items():
            _, plain_speed, plain_out = decode(model, tokenizer, None, None, domain_prompts, params)
            for name, make in drafters.items():
                drafter = make()
                policy = RecordingPolicy(args.gamma) if drafter.gives_confidences else \
                    FixedLength(args.gamma)
                summary, speed, out = decode(model, tokenizer, drafter, policy, domain_prompts, params)
                record = {"drafter": name, "temperature": temperature, "domain": domain, "tau": summary["tau"],
                          "tokens_per_s": speed, "plain_tokens_per_s": plain_speed, "speedup": speed / plain_speed,
                          "acceptance_by_position": summary["acceptance_by_depth"]}
                if temperature == 0:
                    record["identical_to_plain"] = out == plain_out
                if isinstance(policy, RecordingPolicy) and policy.rounds:
                    logits, survived, valid = policy.samples()
                    record.update(counterfactuals(logits, survived, valid, args.gamma))
                results["runs"].append(record)
                print(f"T={temperature:g} {domain:5s} {name:16s} tau {record['tau']:.2f} "
                      f"{speed:6.1f} tok/s (plain {plain_speed:.1f}, x{record['speedup']:.2f}) "
                      f"acc/pos {[round(x, 2) for x in record['acceptance_by_position']]}", flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    pathlib.Path(f"{args.out}-table.md").write_text(table(results))
    plot(results, f"{args.out}.png")


def table(results: dict) -> str:
    lines = [f"Drafters on SmolLM2-135M-Instruct, gamma {results['gamma']}, chain, fixed length; {results['device']}, "
             f"{results['dtype']}; {results['per_domain']} prompts per domain, {results['max_tokens']} tokens each.",
             "", "| T | drafter | tau code | tau math | tau chat | speedup code | speedup math | speedup chat |",
             "|---|---|---|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["temperature"], r["drafter"]) for r in results["runs"]))
    for temperature, name in keys:
        runs = {r["domain"]: r for r in results["runs"] if r["temperature"] == temperature and r["drafter"] == name}
        taus = [f"{runs[d]['tau']:.2f}" if d in runs else "-" for d in DOMAINS]
        speeds = [f"{runs[d]['speedup']:.2f}x" if d in runs else "-" for d in DOMAINS]
        lines.append(f"| {temperature:g} | {name} | " + " | ".join(taus + speeds) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "tau_by_gamma" in r]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in runs:
        label = f"{r['drafter']} {r['domain']} T={r['temperature']:g}"
        axes[0].plot(range(1, len(r["acceptance_by_position"]) + 1), r["acceptance_by_position"], "o-", markersize=3,
                     label=label)
        gammas = sorted(int(g) for g in r["tau_by_gamma"])
        axes[1].plot(gammas, [r["tau_by_gamma"][g] for g in gammas], "o-", markersize=3, label=label)
        sweep = r["threshold_sweep"]
        axes[2].plot([s["acceptance_rate"] for s in sweep], [s["tokens_per_round"] for s in sweep], "o-",
                     markersize=3, label=label)
    axes[0].set(xlabel="draft position k", ylabel="P(accept x_k | x_<k accepted)", title="Position-wise acceptance")
    axes[1].set(xlabel="gamma (drafts verified)", ylabel="tau", title="tau against gamma (recorded rounds truncated)")
    axes[2].set(xlabel="acceptance rate of verified drafts", ylabel="tokens per round",
                title="Confidence-threshold sweep (t = 0 .. 0.9)")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
