"""End-to-end speculative decoding on SmolLM2 over the paper's prompt sets, side by side in one run:
our plain decoding (the baseline of every ratio), our drafters, transformers' own `generate` (plain, and
prompt-lookup decoding) on the same model, prompts and dtype, and llama.cpp through llama-cpp-python (plain,
and its prompt-lookup draft model) on the same GGUF with its own quantized weights, when installed
(`pip install llama-cpp-python`, a ~5 minute source build: bench environments only, not CI). Batch 1,
chat template, the same prompt ids and token budget everywhere; times include the prefill.

Methods take turns prompt by prompt (each keeps its engine, warm, across the prompts), so that a slow spell
of a shared machine falls on all of them; --repeats runs the prompt set that many times over, and each
method's ratio to our plain decoding is also given per repeat (its spread is the run's noise).

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


class Ours:
    """One of our methods: its engine, warm, kept across the prompts; one prompt per call (batch 1)."""

    def __init__(self, model, tokenizer, drafter, prompts, params, policy=None):
        self.engine = Engine(model, tokenizer, drafter, policy=policy, max_batch=1,
                             max_seq_len=max(map(len, prompts)) + params.max_tokens + 16)
        warm_up(self.engine, prompts[0], params)  # as `dspark generate`: every method is timed warm
        self.params, self.requests = params, []

    def __call__(self, prompt) -> tuple[list[int], float]:
        start = time.perf_counter()
        request = self.engine.generate([prompt], self.params)[0]
        self.requests.append(request)
        return request.generated, time.perf_counter() - start

    def summary(self) -> dict:
        return self.engine.stats.summary(self.requests)


def run_transformers(hf, prompt, params, lookup: int | None) -> tuple[list[int], float]:
    kwargs = dict(max_new_tokens=params.max_tokens, do_sample=params.temperature > 0, pad_token_id=2)
    if params.temperature > 0:
        kwargs.update(temperature=params.temperature, top_k=0)
    if lookup:
        kwargs.update(prompt_lookup_num_tokens=lookup)
    with torch.no_grad():
        start = time.perf_counter()
        out = hf.generate(torch.tensor([prompt]), **kwargs)
        elapsed = time.perf_counter() - start
    return out[0, len(prompt):].tolist(), elapsed


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


def run_llama_cpp(llm, prompt, params, eos: set[int]) -> tuple[list[int], float]:
    """Same prompt ids, same token budget, stop at EOS; timed from the prompt to the last token."""
    llm.reset()
    start = time.perf_counter()
    tokens = []
    sampling = dict(temp=params.temperature, top_k=1 if params.temperature == 0 else 0, top_p=1.0, min_p=0.0,
                    repeat_penalty=1.0)
    for token in llm.generate(prompt, reset=True, **sampling):
        if token in eos:
            break
        tokens.append(token)
        if len(tokens) >= params.max_tokens:
            break
    return tokens, time.perf_counter() - start


def interleaved(methods: dict, prompts: list, repeats: int) -> tuple[dict, dict]:
    """Every method over every prompt, taking turns prompt by prompt, the prompt set `repeats` times: per method
    (tokens, seconds) per repeat, and its outputs of the first repeat."""
    per_repeat = {name: [] for name in methods}
    outputs = {name: [] for name in methods}
    for repeat in range(repeats):
        totals = {name: [0, 0.0] for name in methods}
        for prompt in prompts:
            for name, run in methods.items():
                tokens, seconds = run(prompt)
                totals[name][0] += len(tokens)
                totals[name][1] += seconds
                if repeat == 0:
                    outputs[name].append(tokens)
        for name, (tokens, seconds) in totals.items():
            per_repeat[name].append((tokens, seconds))
    return per_repeat, outputs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-domain", type=int, default=3, help="prompts per domain (CPU: 3 keeps a run ~15 min)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--repeats", type=int, default=1, help="times over each domain's prompts (ratios per repeat)")
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
               "dtype": str(dtype), "weights": "native" if native else str(dtype), "max_tokens": args.max_tokens,
               "per_domain": args.per_domain, "repeats": args.repeats, "order": "methods take turns prompt by prompt",
               "runs": []}
    for temperature in [float(t) for t in args.temperatures.split(",")]:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=temperature, seed=0)
        for domain, domain_prompts in prompts.items():
            ours = {"dspark plain": Ours(model, tokenizer, None, domain_prompts, params)}
            if dense is not None:
                ours["dspark plain (bf16 weights)"] = Ours(dense, tokenizer, None, domain_prompts, params)
            for name, (make, make_policy) in drafters(model, args.dspark, args.only).items():
                ours[name] = Ours(model, tokenizer, make(), domain_prompts, params, make_policy() if make_policy else None)
            methods = dict(ours)
            if hf is not None:
                methods["transformers plain"] = lambda p: run_transformers(hf, p, params, None)
                methods["transformers prompt lookup 5"] = lambda p: run_transformers(hf, p, params, 5)
            for name, llm in llama_cpp_runs.items():
                methods[name] = lambda p, llm=llm: run_llama_cpp(llm, p, params, eos)
            per_repeat, outputs = interleaved(methods, domain_prompts, args.repeats)
            rate = {name: sum(t for t, _ in runs) / sum(s for _, s in runs) for name, runs in per_repeat.items()}
            base = "dspark plain"
            for name, runs in per_repeat.items():
                summary = ours[name].summary() if name in ours else {
                    "generated_tokens": sum(t for t, _ in runs), "wall_s": sum(s for _, s in runs)}
                summary["tokens_per_s"] = rate[name]  # timed per prompt, as every method
                ratios = [(t / s) / (bt / bs) for (t, s), (bt, bs) in zip(runs, per_repeat[base])]
                identical = outputs[name] == outputs[base] if name in ours and name != "dspark plain (bf16 weights)" else None
                record = {"temperature": temperature, "domain": domain, "method": name,
                          "speedup_vs_dspark_plain": rate[name] / rate[base], "speedup_per_repeat": ratios,
                          "identical_to_plain": identical, **summary}
                results["runs"].append(record)
                spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
                print(f"T={temperature} {domain:5s} {name:38s} {rate[name]:7.1f} tok/s "
                      f"x{record['speedup_vs_dspark_plain']:.2f}{spread} tau {summary.get('tau', float('nan')):.2f} "
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
