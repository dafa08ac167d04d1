"""Verification policies under load (issue 6; the paper's Figures 7 and 8 at our scale): SmolLM2 with a
trained DSpark drafter, 1..64 concurrent requests from the shared prompt sets, every policy side by
side in one run against plain decoding of the same engine.

    python bench/load.py --drafter data/drafters/smollm2-dspark-markov --out bench/results/load-cpu

For each (policy, concurrency): aggregate tokens/s (all tokens / wall time), per-user tokens/s (each
request's tokens over the time from the batch's start to its own finish, averaged), the same two for
the decoding phase alone (wall time less the engine's prefill steps, which run 512 prompt tokens at a
time between decoding rounds: on this CPU prefill is most of the wall time from 8 requests on, the
same for every policy) and the average verification
budget (draft tokens verified per request per round). With --repeats N every cell runs N times, the
policies interleaved, and reports the medians (JSON: every run's rates under "samples"); with --lockstep the
policies' engines step in turn within each run, a step each, each timed on its own clock (the fairest A/B on a
machine that drifts; every other run in the reverse order); with --keep-gate the gated policy keeps its
throughput estimates from run to run, as a server would (the first, cold run reported apart). Writes <out>.json and
<out>-throughput.png (aggregate against per-user tokens/s) and <out>-budget.png (budget against
concurrency).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import torch

from dspark.models.dtypes import WEIGHTS, resolve_weights
from dspark.drafters import DSparkDrafter, HybridDrafter
from dspark.drafters.dspark import drafter_weights_for
from dspark.engine import Engine
from dspark.models import load_model, load_tokenizer
from dspark.profiling import load_or_measure_sps
from dspark.sampling_params import SamplingParams
from dspark.draft_gates import ThroughputGate
from dspark.scheduler import AsyncScheduler, ConfidenceThreshold, FixedLength, PrefixScheduler, VerificationPolicy

DOMAINS = ("humaneval.jsonl", "gsm8k.jsonl", "mt-bench.jsonl")


class Recording(VerificationPolicy):
    """Wraps a policy; remembers the draft tokens it admitted per request and round."""

    def __init__(self, inner):
        self.inner, self.lengths = inner, []

    def may_draft(self, batch):
        return self.inner.may_draft(batch)

    def should_draft(self, requests, sources=None):
        return self.inner.should_draft(requests, sources)

    def choose(self, requests, proposals):
        lengths = self.inner.choose(requests, proposals)
        self.lengths += [min(n, len(p)) for n, p in zip(lengths, proposals)]
        return lengths

    def observe_round(self, batch, drafted, tokens, seconds, sources=()):
        self.inner.observe_round(batch, drafted, tokens, seconds, sources)


def policies(model, gamma: int, concurrency: int, threshold: float, keep_gate: bool = False) -> dict:
    """name -> (uses the drafter, policy factory). keep_gate: the throughput-gated policy of every run shares
    one ThroughputGate (its estimates carry from run to run, as in a server; each run's engine is new)."""
    sps = lambda: load_or_measure_sps(model, concurrency * (1 + gamma))  # noqa: E731 (cached after the first)
    shared = True
    if keep_gate:
        curve = sps()  # loaded once: the gate reads it every round
        shared = ThroughputGate(expected=lambda b: b * curve(b))
    out = {"no speculation": (False, lambda: None)}
    for g in (1, 3, 5, 7):
        out[f"fixed gamma={g}"] = (True, lambda g=g: FixedLength(g))
    out[f"threshold {threshold:g}"] = (True, lambda: ConfidenceThreshold(threshold, gamma))
    out["prefix scheduler"] = (True, lambda: PrefixScheduler(sps(), gamma))
    out["prefix scheduler + throughput gate"] = (True, lambda: PrefixScheduler(sps(), gamma, throughput_gate=shared))
    out["async scheduler"] = (True, lambda: AsyncScheduler(sps(), gamma))
    return out


def mixed_prompts(directory: pathlib.Path, count: int, tokenizer) -> list[list[int]]:
    """`count` prompts taking the three domains in turn (code, math, chat, code, ...)."""
    lines = [(directory / name).read_text().splitlines() for name in DOMAINS]
    texts = [json.loads(lines[i % 3][i // 3])["turns"][0] for i in range(count)]
    return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                    tokenize=False)).input_ids for t in texts]


def run(model, tokenizer, arms, prompts, params) -> list[dict]:
    """Each arm (drafter or None, policy or None) gets its own engine over the same prompts. Their engines
    step in turn, one step each (lockstep), so that this machine's drift, 10-20% within minutes, reaches
    every arm alike at the scale of a round; each arm's clock counts only its own steps."""
    arms_state = []
    for drafter, policy in arms:
        recording = Recording(policy or FixedLength(0))
        engine = Engine(model, tokenizer, drafter, policy=recording, max_batch=len(prompts),
                        max_seq_len=max(map(len, prompts)) + params.max_tokens + 16)
        ids = [engine.add_request(p, params) for p in prompts]
        # clock: seconds of this engine's steps; finished / prefill_before: the clock and the engine's prefill
        # seconds at each request's finish
        arms_state.append({"engine": engine, "recording": recording, "ids": ids, "clock": 0.0, "finished": {},
                           "prefill_before": {}})
    while any(a["engine"].has_work() for a in arms_state):
        for a in arms_state:
            engine = a["engine"]
            if not engine.has_work():
                continue
            start = time.perf_counter()
            events = engine.step()
            a["clock"] += time.perf_counter() - start
            for event in events:
                if event.finished:
                    a["finished"][event.request_id] = a["clock"]
                    a["prefill_before"][event.request_id] = engine.stats.prefill_time
    return [summarize(a) for a in arms_state]


def summarize(arm: dict) -> dict:
    engine, finished, wall = arm["engine"], arm["finished"], arm["clock"]
    requests = [engine.finished.pop(i) for i in arm["ids"]]
    tokens = sum(len(r.generated) for r in requests)
    per_user = [len(r.generated) / finished[r.id] for r in requests]
    # Decoding alone: the clock less the prefill steps (each gives its finished prompts their first
    # token); the policies differ only in what follows.
    prefill = engine.stats.prefill_time
    decoded = [len(r.generated) - 1 for r in requests]
    per_user_decode = [n / (finished[r.id] - arm["prefill_before"][r.id]) if n else 0.0
                       for n, r in zip(decoded, requests)]
    summary = engine.stats.summary(requests)
    lengths = arm["recording"].lengths
    return {"aggregate_tokens_per_s": tokens / wall, "per_user_tokens_per_s": sum(per_user) / len(per_user),
            "decode_tokens_per_s": sum(decoded) / (wall - prefill),
            "per_user_decode_tokens_per_s": sum(per_user_decode) / len(per_user_decode), "prefill_s": prefill,
            "budget_per_request": sum(lengths) / max(1, len(lengths)), "tau": summary["tau"],
            "generated_tokens": tokens, "wall_s": wall, "outputs": [r.generated for r in requests]}


RATES = ("aggregate_tokens_per_s", "per_user_tokens_per_s", "decode_tokens_per_s", "per_user_decode_tokens_per_s")


def median_record(records: list[dict], skip_first: bool = False) -> dict:
    """One (policy, concurrency) cell from its repeated runs: each rate is the median over the runs (the
    runs' values kept under "samples"), the rest from the run whose decoding rate is the median. skip_first:
    the medians leave the first run out (its rates kept as "first_run": with --keep-gate, the cold one)."""
    first = records[0]
    records = records[1:] if skip_first and len(records) > 1 else records
    order = sorted(records, key=lambda r: r["decode_tokens_per_s"])
    out = dict(order[(len(order) - 1) // 2])
    for key in RATES:
        out[key] = statistics.median(r[key] for r in records)
    out["samples"] = {key: [r[key] for r in records] for key in RATES}
    if skip_first:
        out["first_run"] = {key: first[key] for key in RATES}
    if any("identical_to_plain" in r for r in records):
        out["identical_to_plain"] = all(r.get("identical_to_plain", False) for r in records)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drafter", required=True, help="a DSpark drafter folder")
    ap.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--gamma", type=int, default=7, help="drafted block (the schedulers choose within it)")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--hybrid", action="store_true", help="n-gram lookup where the context repeats, the DSpark "
                    "drafter elsewhere (what `dspark generate --drafter auto` runs)")
    ap.add_argument("--only", default=None, help="run only the policies whose name contains this")
    ap.add_argument("--datasets", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    ap.add_argument("--out", default="bench/results/load-cpu")
    ap.add_argument("--weights", choices=WEIGHTS, default=None, help="default: native, as `dspark generate`")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per (policy, concurrency), interleaved across policies; rates are their medians "
                         "(one run of 48 tokens at c=16 lasts ~2 s, and this machine drifts 10-20%% within minutes)")
    ap.add_argument("--lockstep", action="store_true",
                    help="the policies' engines step in turn, a step each, in one process (see run()), instead of "
                         "one policy's whole run after another")
    ap.add_argument("--keep-gate", action="store_true",
                    help="the gated policy's throughput estimates carry over the repeats of a cell (one "
                         "ThroughputGate, as a long-running server keeps it); medians over runs 2..N, the first "
                         "(cold) run's rates under first_run")
    args = ap.parse_args()
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.keep_gate and args.repeats < 2:
        ap.error("--keep-gate reports runs 2..N (the first is the cold one): give --repeats >= 2")
    dtype, native = resolve_weights(args.weights, None, None, "cpu")
    tokenizer, model = load_tokenizer(None), load_model(None, dtype, native=native)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=0)
    results = {"device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "dtype": str(dtype), "weights": "native" if native else str(dtype), "drafter": args.drafter,
               "max_tokens": args.max_tokens, "repeats": args.repeats, "keep_gate": args.keep_gate,
               "lockstep": args.lockstep,
               "temperature": args.temperature, "gamma": args.gamma, "runs": []}
    kind = HybridDrafter if args.hybrid else DSparkDrafter
    results["hybrid"] = args.hybrid
    warm = mixed_prompts(pathlib.Path(args.datasets), 1, tokenizer)
    def new_drafter():  # as `dspark generate`: Q8_0 blocks beside a natively loaded target
        return kind.from_pretrained(args.drafter, model, args.gamma, dtype=dtype, weights=drafter_weights_for(model))

    run(model, tokenizer, [(new_drafter(), None)], warm,
        SamplingParams(max_tokens=8))  # first calls pay one-time costs (allocator, thread pools)
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        prompts = mixed_prompts(pathlib.Path(args.datasets), concurrency, tokenizer)
        chosen = {name: spec for name, spec in policies(model, args.gamma, concurrency, args.threshold,
                                                        args.keep_gate).items()
                  if not args.only or args.only in name or name == "no speculation"}
        samples: dict[str, list[dict]] = {name: [] for name in chosen}
        plain_outputs = None
        for repeat in range(args.repeats):  # interleaved: every policy once per pass, so drift hits all alike
            arms = [(new_drafter() if speculative else None,
                     make_policy()) for speculative, make_policy in chosen.values()]
            if args.lockstep:
                # Every other pass builds and steps the engines in the reverse order: what being first or
                # last in a pass costs (allocation, cache state) reaches each arm alike.
                flip = repeat % 2 == 1
                records = run(model, tokenizer, arms[::-1] if flip else arms, prompts, params)
                records = records[::-1] if flip else records
            else:
                records = [run(model, tokenizer, [arm], prompts, params)[0] for arm in arms]
            for name, record in zip(chosen, records):
                outputs = record.pop("outputs")
                if plain_outputs is None:  # "no speculation" runs first
                    plain_outputs = outputs
                if args.temperature == 0:
                    record["identical_to_plain"] = outputs == plain_outputs
                samples[name].append(record)
        baseline = None
        for name, records in samples.items():
            record = median_record(records, skip_first=args.keep_gate)
            if baseline is None:
                baseline = record
            if "first_run" in record:
                record["first_run_speedup_decode"] = (record["first_run"]["decode_tokens_per_s"]
                                                      / baseline["first_run"]["decode_tokens_per_s"])
            record.update(policy=name, concurrency=concurrency,
                          speedup_aggregate=record["aggregate_tokens_per_s"] / baseline["aggregate_tokens_per_s"],
                          speedup_per_user=record["per_user_tokens_per_s"] / baseline["per_user_tokens_per_s"],
                          speedup_decode=record["decode_tokens_per_s"] / baseline["decode_tokens_per_s"])
            results["runs"].append(record)
            print(f"c={concurrency:<3} {name:34s} aggregate {record['aggregate_tokens_per_s']:7.1f} tok/s "
                  f"per-user {record['per_user_tokens_per_s']:6.2f} tok/s decoding {record['decode_tokens_per_s']:7.1f} "
                  f"/ {record['per_user_decode_tokens_per_s']:6.2f} tok/s budget {record['budget_per_request']:.2f} "
                  f"tau {record['tau']:.2f} [x{record['speedup_decode']:.2f} decoding, "
                  f"{len(record['samples']['decode_tokens_per_s'])} runs]" +
                  (f" first (cold) run x{record['first_run_speedup_decode']:.2f}"
                                             if "first_run" in record else ""), flush=True)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    plot(results, args.out)


def plot(results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["policy"] for r in results["runs"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (user, total, what) in zip(axes, [("per_user_tokens_per_s", "aggregate_tokens_per_s", "prefill included"),
                                              ("per_user_decode_tokens_per_s", "decode_tokens_per_s", "decoding only")]):
        for name in names:
            runs = sorted((r for r in results["runs"] if r["policy"] == name), key=lambda r: r["concurrency"])
            ax.plot([r[user] for r in runs], [r[total] for r in runs], "o-", label=name, markersize=3)
        ax.set_xlabel("per-user tokens/s")
        ax.set_ylabel("aggregate tokens/s")
        ax.set_xscale("log")
        ax.set_title(f"SmolLM2-135M + DSpark, {what}, T={results['temperature']:g}\n{results['device']}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out + "-throughput.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        if name == "no speculation":
            continue
        runs = sorted((r for r in results["runs"] if r["policy"] == name), key=lambda r: r["concurrency"])
        ax.plot([r["concurrency"] for r in runs], [r["budget_per_request"] for r in runs], "o-", label=name,
                markersize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("draft tokens verified per request per round")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out + "-budget.png", dpi=110)


if __name__ == "__main__":
    main()
