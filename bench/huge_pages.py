"""Weights and caches on huge pages (dspark.huge_pages) against pytorch's 4 KiB pages, side by side in one process:
SmolLM2-135M-Instruct (native GGUF weights) loaded twice, once with DSPARK_HUGE_PAGES=0, each with its own engines
(plain decoding, and a DSpark drafter at a fixed gamma of 1); every engine decodes each prompt in turn (batch 1,
greedy, 128 new tokens, prefill included), the prompt set `--repeats` times. Prints and writes tokens/s per arm.

    python bench/huge_pages.py --out bench/results/huge-pages-cpu
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import platform
import time

import torch

from dspark.cli.generate import warm_up
from dspark.drafters import DSparkDrafter
from dspark.drafters.dspark import drafter_weights_for
from dspark.engine import Engine
from dspark.models import load_model, load_tokenizer
from dspark.sampling_params import SamplingParams
from dspark.scheduler import FixedLength

DATASETS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "datasets"
SHIPPED = pathlib.Path(__file__).resolve().parents[1] / "dspark" / "drafters" / "pretrained" / "smollm2-135m-instruct"


def humaneval_prompts(tokenizer, count: int) -> list[list[int]]:
    """The first `count` humaneval turns, chat-formatted and tokenized as `dspark generate` does."""
    lines = (DATASETS / "humaneval.jsonl").read_text().splitlines()[:count]
    return [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": json.loads(line)["turns"][0]}],
                                                    add_generation_prompt=True, tokenize=False)).input_ids
            for line in lines]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=6, help="first prompts of humaneval.jsonl")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tokenizer = load_tokenizer(None)
    prompts = humaneval_prompts(tokenizer, args.prompts)
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    engines, outputs = {}, collections.defaultdict(list)
    for pages, flag in (("4 KiB pages", "0"), ("huge pages", "1")):
        os.environ["DSPARK_HUGE_PAGES"] = flag  # read at load and at every cache allocation
        model = load_model(None, torch.bfloat16, native=True)
        drafter = DSparkDrafter.from_pretrained(str(SHIPPED), model, 1, dtype=model.dtype,
                                                weights=drafter_weights_for(model))
        arms = {"plain": Engine(model, tokenizer, None, max_batch=1, max_seq_len=1024),
                "DSpark gamma 1": Engine(model, tokenizer, drafter, policy=FixedLength(1), max_batch=1,
                                         max_seq_len=1024)}
        for method, engine in arms.items():
            warm_up(engine, prompts[0], params)
            engines[(method, pages)] = engine
    os.environ.pop("DSPARK_HUGE_PAGES")
    seconds, tokens = collections.defaultdict(float), collections.defaultdict(int)
    for repeat in range(args.repeats):
        for prompt in prompts:
            for key, engine in engines.items():
                start = time.perf_counter()
                request = engine.generate([prompt], params)[0]
                seconds[key] += time.perf_counter() - start
                tokens[key] += len(request.generated)
                if repeat == 0:
                    outputs[key].append(request.generated)
    rows = []
    for method in ("plain", "DSpark gamma 1"):
        rate = {pages: tokens[(method, pages)] / seconds[(method, pages)] for pages in ("4 KiB pages", "huge pages")}
        rows.append({"method": method, **{f"{pages} tok/s": r for pages, r in rate.items()},
                     "speedup": rate["huge pages"] / rate["4 KiB pages"],
                     "identical": outputs[(method, "huge pages")] == outputs[(method, "4 KiB pages")]})
        print(json.dumps(rows[-1]))
    if args.out:
        result = {"device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                  "prompts": args.prompts, "repeats": args.repeats, "rows": rows}
        pathlib.Path(args.out + ".json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
