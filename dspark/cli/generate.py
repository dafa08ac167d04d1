"""`dspark generate PROMPT`: speculative decoding on the CPU (or GPU), streamed, then tau, tokens/s and
the speedup over plain decoding of the same prompt with the same engine."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from dspark.drafters import DraftModelDrafter, DSparkDrafter, Eagle3Drafter, HybridDrafter, NgramDrafter
from dspark.drafters.dspark import drafter_weights_for
from dspark.engine import Engine
from dspark.models import load_model, load_tokenizer
from dspark.models.dtypes import DTYPES, WEIGHTS, resolve_weights
from dspark.profiling import load_or_measure_sps
from dspark.sampling_params import SamplingParams
from dspark.scheduler import PrefixScheduler
from dspark.stats import RunStats

SHIPPED_DRAFTERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "drafters", "pretrained")


def shipped_drafter(model_arg: str | None) -> str | None:
    """The drafter folder packaged for the default target (SmolLM2-135M-Instruct), when this install
    has one; other targets have none."""
    folder = os.path.join(SHIPPED_DRAFTERS, "smollm2-135m-instruct")
    return folder if model_arg is None and os.path.exists(os.path.join(folder, "config.json")) else None


def make_drafter(spec: str, target, num_draft: int | None, dtype, device, model_arg: str | None = None):
    """num_draft None: the drafter's own default (a DSpark drafter's gamma, else 4)."""
    if spec == "none":
        return None
    if spec == "auto":  # the shipped DSpark drafter (with n-gram and corpus lookup) for the default target, else n-gram
        folder = shipped_drafter(model_arg)
        spec = f"hybrid:{folder}" if folder else "ngram"
    if spec.startswith("dspark:"):  # a folder written by `dspark train-drafter`, or a DeepSpec DSpark/DFlash one
        return DSparkDrafter.from_pretrained(spec.split(":", 1)[1], target, num_draft, dtype=dtype,
                                             weights=drafter_weights_for(target))
    if spec.startswith("eagle3:"):  # an EAGLE-3 drafter in DeepSpec's format
        return Eagle3Drafter.from_pretrained(spec.split(":", 1)[1], target, num_draft, dtype=dtype)
    if spec.startswith("hybrid:"):  # n-gram lookup, the folder's corpus (if any), that DSpark drafter otherwise
        return HybridDrafter.from_pretrained(spec.split(":", 1)[1], target, num_draft, dtype=dtype,
                                             weights=drafter_weights_for(target))
    num_draft = num_draft or 4
    if spec == "ngram":
        return NgramDrafter(num_draft)
    if spec.startswith("self:"):
        return DraftModelDrafter.self_draft(target, int(spec.split(":", 1)[1]), num_draft)
    if spec.startswith("model:"):
        return DraftModelDrafter(load_model(spec.split(":", 1)[1], dtype, device), num_draft)
    raise ValueError(f"--drafter must be auto, none, ngram, self:LAYERS, model:PATH, dspark:DIR, eagle3:DIR or hybrid:DIR, got {spec!r}")


def warm_up(engine: Engine, prompt: list[int], params: SamplingParams) -> None:
    """A few tokens through the engine before it is timed (first-call allocations, drafter setup), so
    that the printed speedup compares warm engines; the statistics start over afterwards."""
    engine.generate([prompt], dataclasses.replace(params, max_tokens=min(8, params.max_tokens)))
    engine.stats = RunStats()


def add_target_arguments(ap: argparse.ArgumentParser) -> None:
    """How the target is loaded and how drafting is gated, as `dspark generate` and `dspark serve` take them."""
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="compute dtype (default: the fastest here; bf16 with --weights native)")
    ap.add_argument("--no-throughput-gate", action="store_true",
                    help="draft whenever the prefix scheduler's SPS curve says so, never switching a drafter off by "
                         "measured speed: a seed's sampled output then does not depend on timing (the gate changes "
                         "how many rounds a reply takes, hence the random stream; its law is exact either way)")
    ap.add_argument("--weights", choices=WEIGHTS, default=None,
                    help="native: a GGUF file's Q4_0/Q4_1/Q8_0 matrices stay as blocks (the default for GGUF on CPU); "
                         "bf16/fp16/fp32: dequantised to that dtype")
    ap.add_argument("--batch-invariant-prefill", action="store_true",
                    help="prefill each row alone (dense GEMMs over fixed 128-row chunks), so that a greedy request's "
                         "output never depends on which prompts were prefilled beside it (slower prefills)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="replay decoding and verification rounds as CUDA graphs, one per padded token-count bucket "
                         "(needs --device cuda and dspark._C built with CUDA)")


def cuda_graphs_of(args) -> bool:
    if args.cuda_graphs and not str(args.device).startswith("cuda"):
        raise SystemExit(f"--cuda-graphs needs --device cuda, got --device {args.device}")
    return args.cuda_graphs


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("prompt")
    ap.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--drafter", default="auto",
                     help="auto (the shipped DSpark drafter with n-gram and corpus lookup, hybrid:SHIPPED, for "
                          "the default model; else ngram), none, ngram, self:LAYERS, model:PATH, dspark:DIR (ours or "
                          "a DeepSpec DSpark/DFlash folder), eagle3:DIR (a DeepSpec EAGLE-3 folder), hybrid:DIR")
    ap.add_argument("--num-draft", type=int, default=None,
                     help="draft tokens per round, gamma (default: the DSpark drafter's block, 4 for the others); "
                          "a DSpark drafter's prefix scheduler verifies a prefix of them")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    add_target_arguments(ap)
    ap.add_argument("--raw", action="store_true", help="do not apply the chat template")
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain-decoding comparison")


def run(args) -> int:
    graphs = cuda_graphs_of(args)
    dtype, native = resolve_weights(args.weights, args.dtype, args.model, args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype, args.device, native=native)
    model.batch_invariant_prefill = args.batch_invariant_prefill
    if args.raw:
        prompt = tokenizer(args.prompt).input_ids
    else:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                               tokenize=True)
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    drafter = make_drafter(args.drafter, model, args.num_draft, dtype, args.device, args.model)
    num_draft = drafter.num_draft if drafter is not None else 0
    max_seq_len = len(prompt) + args.max_tokens + num_draft + 8
    policy = None
    if drafter is not None and drafter.gives_confidences:  # the DSpark prefix scheduler on this machine's SPS curve
        policy = PrefixScheduler(load_or_measure_sps(model, 1 + num_draft),
                                 throughput_gate=not args.no_throughput_gate)
    engine = Engine(model, tokenizer, drafter, policy=policy, max_batch=1, max_seq_len=max_seq_len,
                    cuda_graphs=graphs)
    shown = ""
    generated: list[int] = []

    def show(event):
        nonlocal shown
        generated.extend(event.new_tokens)
        text = tokenizer.decode(generated)
        if text.startswith(shown):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    warm_up(engine, prompt, params)
    [request] = engine.generate([prompt], params, on_event=show)
    print()
    summary = engine.stats.summary([request])
    acceptance = ", ".join(f"{a:.2f}" for a in summary["acceptance_by_depth"])
    name = type(drafter).__name__ if drafter is not None else "none"
    print(f"\n[{name}, gamma {num_draft}, {type(engine.policy).__name__}, {str(dtype).removeprefix('torch.')}] "
          f"{summary['generated_tokens']} tokens in {summary['wall_s']:.2f}s: {summary['tokens_per_s']:.1f} tokens/s, "
          f"tau {summary['tau']:.2f}, acceptance by depth [{acceptance}]")
    if drafter is not None and not args.no_baseline:
        plain = Engine(model, tokenizer, None, max_batch=1, max_seq_len=max_seq_len, cuda_graphs=graphs)
        warm_up(plain, prompt, params)
        [baseline] = plain.generate([prompt], params)
        base = plain.stats.summary([baseline])
        same = "identical output" if baseline.generated == request.generated else "different output (sampling)"
        print(f"[plain decoding] {base['generated_tokens']} tokens in {base['wall_s']:.2f}s: "
              f"{base['tokens_per_s']:.1f} tokens/s; speedup {summary['tokens_per_s'] / base['tokens_per_s']:.2f}x, "
              f"{same}")
    return 0


