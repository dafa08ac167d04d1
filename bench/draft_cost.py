"""What one drafting call costs: DSparkDrafter.propose for one request (batch 1) after a real prompt and
reply, per drafter and gamma, beside the target's own verification step at gamma + 1 tokens, on the same
context, in one run. The drafting side of "tau per unit of drafting cost" (issue 16).

    python bench/draft_cost.py --drafter L1=runs/layers/L1 --drafter L2=runs/layers/L2 --gammas 1,3,7

--arms compares ways of computing the same drafter on a CPU beside a natively loaded target: "dense" (its
matrices in the target's dtype, the PyTorch block), "q8_0" (Q8_0 blocks of its matrices, the PyTorch block) and
"q8_0+fused" (Q8_0 blocks, the block in the fused C++ layers: what `dspark generate` runs). Each arm drafts on
the same context, in one run.

Prints lower-quartile milliseconds of 40 calls each (the machine's timings drift; the lower quartile is the
steady state), and writes --out JSON when given.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import torch

from dspark.batch import build_round
from dspark.drafters import DSparkDrafter
from dspark.drafters.dspark import drafter_weights_for
from dspark.engine import Engine
from dspark.models import load_model, load_tokenizer
from dspark.models.dtypes import resolve_weights
from dspark.sampling_params import SamplingParams


def lower_quartile_ms(fn, repeats: int = 40) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 4] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drafter", action="append", required=True, help="NAME=DIR (repeatable)")
    ap.add_argument("--gammas", default="1,3,7")
    ap.add_argument("--context", type=int, default=256, help="reply tokens generated before timing")
    ap.add_argument("--datasets", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    ap.add_argument("--arms", default="q8_0+fused", help="comma-separated: dense, q8_0, q8_0+fused")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype, native = resolve_weights(None, None, None, "cpu")
    tokenizer, model = load_tokenizer(None), load_model(None, dtype, native=native)
    text = json.loads((pathlib.Path(args.datasets) / "mt-bench.jsonl").read_text().splitlines()[0])["turns"][0]
    prompt = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=False)).input_ids
    gammas = [int(g) for g in args.gammas.split(",")]
    results = {"device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "weights": "native" if native else str(dtype), "prompt_tokens": len(prompt), "drafters": {}}
    for spec in args.drafter:
        name, folder = spec.split("=", 1)
        for arm in args.arms.split(","):
            weights = {"dense": None, "q8_0": "q8_0", "q8_0+fused": "q8_0"}[arm]
            drafter = DSparkDrafter.from_pretrained(folder, model, max(gammas), dtype=dtype,
                                                    weights=weights if drafter_weights_for(model) else None)
            engine = Engine(model, tokenizer, drafter, max_batch=1, max_seq_len=len(prompt) + args.context + 64)
            engine.add_request(prompt, SamplingParams(max_tokens=args.context + 32, temperature=0.0, ignore_eos=True))
            engine.step()  # prefill: the drafter starts with the prompt's features
            request = engine.running[0]
            while len(request.generated) < args.context:
                engine.step()
            drafter.commit_pending([request])  # the features deferred while the engine decoded
            row = {}
            os.environ["DSPARK_FUSED_CPU"] = "1" if arm.endswith("+fused") else "0"  # read at each proposal
            for g in gammas:
                row[f"propose_gamma{g}_ms"] = lower_quartile_ms(lambda: drafter.propose([request], g))
            os.environ.pop("DSPARK_FUSED_CPU")
            results["drafters"][f"{name} {arm}"] = row
            print(name, arm, {k: round(v, 2) for k, v in row.items()}, flush=True)
    # The target's verification step on the same context (cache positions past the prompt; nothing is kept).
    cache, base = engine.cache, int(engine.cache.seqlens[0])
    for g in gammas:
        rnd = build_round(cache.rows, [(0, [1] * (g + 1), None)], cache.seqlens.tolist(), model.device)
        results[f"target_step_{g + 1}_tokens_ms"] = lower_quartile_ms(
            lambda: model.logits(model.forward(cache, rnd, ())[0]))
        cache.seqlens[0] = base
    print({k: round(v, 2) for k, v in results.items() if k.startswith("target")})
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
