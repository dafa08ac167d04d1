"""What an attached drafter costs the rounds in which it does not draft (issue 15: a request the policy does
not draft for pays (near) nothing for drafting). SmolLM2 with `--drafter auto`'s drafter (DSpark + n-gram
lookup) under two policies that never draft, in lockstep with plain decoding of the same prompts:

- "quiet": the policy says no request may draft (`may_draft` False), as the throughput gate does between its
  trials. What remains is capturing the target's hidden states into the side cache and the drafter's bookkeeping.
- "asked": the engine asks which source would speak (`source_for`) and the policy then declines every request,
  as in rounds that are not quiet.

    python bench/attached_cost.py --concurrency 1,2,8,16,64 --repeats 6 --out bench/results/attached-cost-cpu

Reports, per concurrency, the median over runs of each arm's decode tokens/s over plain's (each run steps the
three engines in turn, a step each, every other run in the reverse order). Writes <out>.json and <out>.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics

import torch

from dspark.drafters import HybridDrafter
from dspark.drafters.dspark import drafter_weights_for
from dspark.models import load_model, load_tokenizer
from dspark.models.dtypes import WEIGHTS, resolve_weights
from dspark.sampling_params import SamplingParams
from dspark.scheduler import VerificationPolicy
from load import mixed_prompts, run


class NeverDrafts(VerificationPolicy):
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def may_draft(self, batch):
        return not self.quiet

    def should_draft(self, requests, sources=None):
        return [False] * len(requests)

    def choose(self, requests, proposals):
        return [0] * len(proposals)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drafter", default="dspark/drafters/pretrained/smollm2-135m-instruct")
    ap.add_argument("--concurrency", default="1,2,8,16,64")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--datasets", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    ap.add_argument("--weights", choices=WEIGHTS, default=None)
    ap.add_argument("--out", default="bench/results/attached-cost-cpu")
    args = ap.parse_args()
    dtype, native = resolve_weights(args.weights, None, None, "cpu")
    tokenizer, model = load_tokenizer(None), load_model(None, dtype, native=native)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    results = {"device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "weights": "native" if native else str(dtype), "drafter": args.drafter, "max_tokens": args.max_tokens,
               "repeats": args.repeats, "cells": []}
    names = ("plain", "quiet", "asked")
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        prompts = mixed_prompts(pathlib.Path(args.datasets), concurrency, tokenizer)
        ratios = {"quiet": [], "asked": []}
        plain_rates = []
        for repeat in range(args.repeats):
            arms = {"plain": (None, None)}
            for name in ("quiet", "asked"):
                drafter = HybridDrafter.from_pretrained(args.drafter, model, 7, dtype=dtype,
                                                       weights=drafter_weights_for(model))
                arms[name] = (drafter, NeverDrafts(quiet=name == "quiet"))
            order = list(names) if repeat % 2 == 0 else list(reversed(names))
            records = dict(zip(order, run(model, tokenizer, [arms[n] for n in order], prompts, params)))
            plain = records["plain"]["decode_tokens_per_s"]
            plain_rates.append(plain)
            for name in ratios:
                ratios[name].append(records[name]["decode_tokens_per_s"] / plain)
        cell = {"concurrency": concurrency, "plain_decode_tokens_per_s": statistics.median(plain_rates),
                **{f"{name}_over_plain": statistics.median(v) for name, v in ratios.items()},
                "samples": ratios}
        results["cells"].append(cell)
        print(f"c={concurrency:<3} plain {cell['plain_decode_tokens_per_s']:7.1f} tok/s  "
              f"quiet x{cell['quiet_over_plain']:.3f}  asked x{cell['asked_over_plain']:.3f}", flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    lines = [f"# Attached drafter, never drafting, against plain decoding ({results['device']}, {results['weights']})",
             "", "| c | plain decode tok/s | quiet / plain | asked / plain |", "|---|---|---|---|"]
    lines += [f"| {c['concurrency']} | {c['plain_decode_tokens_per_s']:.1f} | {c['quiet_over_plain']:.3f} | "
              f"{c['asked_over_plain']:.3f} |" for c in results["cells"]]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
