"""End-to-end speculative decoding on SmolLM2 over the paper's prompt sets, side by side in one run:
our plain decoding (the baseline of every ratio), our drafters, transformers' own `generate` (plain, and
prompt-lookup decoding) on the same model, prompts and dtype, and llama.cpp through llama-cpp-python (plain,
and its prompt-lookup draft model) on the same GGUF with its own quantized weights, when installed
(`pip install llama-cpp-python`, a ~5 minute source build: bench environments only, not CI). Batch 1,
chat template, the same prompt ids and token budget everywhere; times include the prefill.

    python bench/e2e.py --per-domain 3 --max-tokens 128 --out bench/results/e2e-cpu

writes <out>.json and <out>.png. Prompts come from ../shared/datasets (or --datasets).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import time

import torch

from dspark.cli.generate import warm_up
from dspark.drafters import DraftModelDrafter, DSparkDrafter, HybridDrafter, NgramDrafter
from dspark.drafters.dspark import drafter_weights_for
from dspark.engine import Engine
from dspark.models import default_model_path, load_model, load_tokenizer
from dspark.models.dtypes import WEIGHTS, resolve_weights
from dspark.profiling import load_or_measure_sps
from dspark.sampling_params import SamplingParams
from dspark.scheduler import FixedLength, PrefixScheduler

DOMAINS = {"code": "humaneval.jsonl", "math": "gsm8k.jsonl", "chat": "mt-bench.jsonl"}


def drafters(model, trained: list[str], only: str | None) -> dict:
    """Every drafter to compare: n-gram, self-draft, and each trained drafter folder (`dspark
    train-drafter`) at gamma 3, 5 and 7; `only` (a regular expression) keeps the matching names."""
    makers = {
        "ngram gamma=3": lambda: NgramDrafter(3),
        "ngram gamma=5": lambda: NgramDrafter(5),
        "ngram gamma=8": lambda: NgramDrafter(8),
        "ngram tree (3 branches, 8 nodes)": lambda: NgramDrafter(8, branches=3),
        "self-draft 8/30 layers gamma=3": lambda: DraftModelDrafter.self_draft(model, 8, 3),
    }
    makers = {name: (make, None) for name, make in makers.items()}
    def load(kind, folder, gamma):  # as `dspark generate`: the target's dtype, Q8_0 blocks beside a native target
        return kind.from_pretrained(folder, model, gamma, dtype=model.dtype, weights=drafter_weights_for(model))

    for folder in trained:
        for gamma in (3, 5, 7):  # fixed length: every drafted token is verified
            makers[f"{pathlib.Path(folder).name} gamma={gamma}"] = (
                lambda folder=folder, gamma=gamma: load(DSparkDrafter, folder, gamma),
                lambda gamma=gamma: FixedLength(gamma))
        prefix = lambda: PrefixScheduler(load_or_measure_sps(model, 8), throughput_gate=True)  # noqa: E731 (as `dspark generate`)
        makers[f"{pathlib.Path(folder).name} gamma=7 prefix scheduler"] = (
            lambda folder=folder: load(DSparkDrafter, folder, 7), prefix)
        makers[f"{pathlib.Path(folder).name} + n-gram gamma=7 prefix scheduler"] = (
            lambda folder=folder: load(HybridDrafter, folder, 7), prefix)  # `--drafter auto`
    return {name: pair for name, pair in makers.items() if only is None or re.search(only, name)}


def load_prompts(directory: pathlib.Path, per_domain: int, tokenizer) -> dict[str, list[list[int]]]:
    prompts = {}
    for domain, name in DOMAINS.items():
        lines = (directory / name).read_text().splitlines()[:per_domain]
        prompts[domain] = [tokenizer.apply_chat_template([{"role": "user", "content": json.loads(line)["turns"][0]}],
                                                         add_generation_prompt=True, tokenize=False) for line in lines]
        prompts[domain] = [tokenizer(p).input_ids for p in prompts[domain]]
    return prompts


def run_ours(model, tokenizer, drafter, prompts, params, policy=None):
    engine = Engine(model, tokenizer, drafter, policy=policy, max_batch=1,
                    max_seq_len=max(map(len, prompts)) + params.max_tokens + 16)
    warm_up(engine, prompts[0], params)  # as `dspark generate`: every method is timed warm
    requests = [engine.generate([p], params)[0] for p in prompts]  # batch 1, one prompt after another
    summary = engine.stats.summary(requests)
    return summary, [r.generated for r in requests]


def run_transformers(hf, prompts, params, lookup: int | None):
    kwargs = dict(max_new_tokens=params.max_tokens, do_sample=params.temperature > 0, pad_token_id=2)
    if params.temperature > 0:
        kwargs.update(temperature=params.temperature, top_k=0)
    if lookup:
        kwargs.update(prompt_lookup_num_tokens=lookup)
    tokens, elapsed = 0, 0.0
    with torch.no_grad():
        for prompt in prompts:
            start = time.perf_counter()
            out = hf.generate(torch.tensor([prompt]), **kwargs)
            elapsed += time.perf_counter() - start
            tokens += out.shape[1] - len(prompt)
    return {"generated_tokens": tokens, "wall_s": elapsed, "tokens_per_s": tokens / elapsed}


def load_llama_cpp(path: str, lookup: int | None):
    """llama.cpp (llama-cpp-python) on the same GGUF file, its own quantized weights, this machine's
    threads; `lookup`: its prompt-lookup draft model with that many tokens. None when not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    extra = {}
    if lookup:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        extra["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=lookup)
    return llama_cpp.Llama(model_path=path, n_ctx=2048, n_batch=512, n_threads=torch.get_num_threads(),
                           verbose=False, **extra)


def run_llama_cpp(llm, prompts, params, eos: set[int]):
    """Same prompt ids, same token budget, stop at EOS; timed from the prompt to the last token."""
    tokens, elapsed = 0, 0.0
    for prompt in prompts:
        llm.reset()
        start = time.perf_counter()
        count = 0
        sampling = dict(temp=params.temperature, top_k=1 if params.temperature == 0 else 0, top_p=1.0, min_p=0.0,
                        repeat_penalty=1.0)
        for token in llm.generate(prompt, reset=True, **sampling):
            if token in eos:
                break
            count += 1
            if count >= params.max_tokens:
                break
        elapsed += time.perf_counter() - start
        tokens += count
    return {"generated_tokens": tokens, "wall_s": elapsed, "tokens_per_s": tokens / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-domain", type=int, default=3, help="prompts per domain (CPU: 3 keeps a run ~15 min)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--datasets", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    ap.add_argument("--out", default="bench/results/e2e-cpu")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even when llama-cpp-python is here")
    ap.add_argument("--dspark", action="append", default=[], help="a trained drafter folder (repeatable)")
    ap.add_argument("--only", default=None, help="regular expression: run only the drafters it matches")
    ap.add_argument("--weights", choices=WEIGHTS, default=None,
                    help="our target's weights (default: native, the GGUF's own blocks; as `dspark generate`)")
    ap.add_argument("--compare-dense", action="store_true",
                    help="also run our plain decoding with bf16 weights (a row beside the native baseline)")
    args = ap.parse_args()
    dtype, native = resolve_weights(args.weights, None, None, "cpu")
    tokenizer = load_tokenizer(None)
    model = load_model(None, dtype, native=native)
    dense = load_model(None, torch.bfloat16) if args.compare_dense and native else None
    prompts = load_prompts(pathlib.Path(args.datasets), args.per_domain, tokenizer)
    hf = None
    if not args.no_transformers:
        import transformers

        path = default_model_path()
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                               dtype=dtype).eval()
    llama_cpp_runs = {}
    if not args.no_llama_cpp:
        for name, lookup in (("llama.cpp plain", None), ("llama.cpp prompt lookup 5", 5)):
            llm = load_llama_cpp(default_model_path(), lookup)
            if llm is not None:
                llama_cpp_runs[name] = llm
    eos = set(model.config.eos_token_ids) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
    results = {"device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
               "dtype": str(dtype), "weights": "native" if native else str(dtype), "max_tokens": args.max_tokens, "per_domain": args.per_domain, "runs": []}
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=temperature, seed=0)
        for domain, domain_prompts in prompts.items():
            base, base_tokens = run_ours(model, tokenizer, None, domain_prompts, params)
            rows = [("dspark plain", base, True)]
            if dense is not None:
                summary, _ = run_ours(dense, tokenizer, None, domain_prompts, params)
                rows.append(("dspark plain (bf16 weights)", summary, None))
            for name, (make, make_policy) in drafters(model, args.dspark, args.only).items():
                policy = make_policy() if make_policy else None
                summary, tokens = run_ours(model, tokenizer, make(), domain_prompts, params, policy)
                rows.append((name, summary, tokens == base_tokens))
            if hf is not None:
                rows.append(("transformers plain", run_transformers(hf, domain_prompts, params, None), None))
                rows.append(("transformers prompt lookup 5", run_transformers(hf, domain_prompts, params, 5), None))
            for name, llm in llama_cpp_runs.items():
                rows.append((name, run_llama_cpp(llm, domain_prompts, params, eos), None))
            for name, summary, identical in rows:
                record = {"temperature": temperature, "domain": domain, "method": name,
                          "speedup_vs_dspark_plain": summary["tokens_per_s"] / base["tokens_per_s"],
                          "identical_to_plain": identical, **summary}
                results["runs"].append(record)
                print(f"T={temperature} {domain:5s} {name:38s} {summary['tokens_per_s']:7.1f} tok/s "
                      f"x{record['speedup_vs_dspark_plain']:.2f} tau {summary.get('tau', float('nan')):.2f} "
                      f"{'' if identical is None else 'identical' if identical else 'differs'}", flush=True)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out + ".json").write_text(json.dumps(results, indent=1))
    plot(results, args.out + ".png")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temperatures = sorted({r["temperature"] for r in results["runs"]})
    fig, axes = plt.subplots(1, len(temperatures), figsize=(7 * len(temperatures), 5), squeeze=False)
    for ax, temperature in zip(axes[0], temperatures):
        runs = [r for r in results["runs"] if r["temperature"] == temperature]
        methods = list(dict.fromkeys(r["method"] for r in runs))
        domains = list(dict.fromkeys(r["domain"] for r in runs))
        width = 0.8 / len(domains)
        for i, domain in enumerate(domains):
            values = [next(r["speedup_vs_dspark_plain"] for r in runs if r["method"] == m and r["domain"] == domain)
                      for m in methods]
            ax.barh([j + i * width for j in range(len(methods))], values, height=width, label=domain)
        ax.set_yticks([j + 0.4 - width / 2 for j in range(len(methods))], methods, fontsize=8)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("tokens/s relative to dspark plain decoding")
        ax.set_title(f"SmolLM2-135M, temperature {temperature:g}, weights {results.get('weights', results['dtype'])}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
