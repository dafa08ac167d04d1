"""`dspark generate PROMPT`: speculative decoding on the CPU (or GPU), streamed, then tau, tokens/s and
the speedup over plain decoding of the same prompt with the same engine."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from dspark.drafters import DraftModelDrafter, DSparkDrafter, HybridDrafter, NgramDrafter
from dspark.engine import Engine
from dspark.models import load_model, load_tokenizer
from dspark.sampling_params import SamplingParams

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_dtype(device: str) -> torch.dtype:
    """bf16 on accelerators. On CPUs, time a verification-sized matmul through the model's own linear
    layer in both and take the faster. Its weight (32,768 x 576) outgrows the caches as a model's do, so
    the timing sees what decoding sees, memory streaming: with dspark._C's small-batch kernel bf16 wins
    on AVX2 too (half the bytes), while F.linear runs bf16 GEMMs of a few rows up to 5x slower than fp32
    on AVX2-only machines."""
    if device != "cpu":
        return torch.bfloat16
    import time

    from dspark.models.linear import linear

    best, best_time = torch.float32, float("inf")
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(8, 576).to(dtype), torch.randn(32768, 576).to(dtype)
        linear(x, w)
        start = time.perf_counter()
        for _ in range(5):
            linear(x, w)
        elapsed = time.perf_counter() - start
        if elapsed < best_time:
            best, best_time = dtype, elapsed
    return best


SHIPPED_DRAFTERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "drafters", "pretrained")


def shipped_drafter(model_arg: str | None) -> str | None:
    """The drafter folder packaged for the default target (SmolLM2-135M-Instruct), when this install
    has one; other targets have none."""
    folder = os.path.join(SHIPPED_DRAFTERS, "smollm2-135m-instruct")
    return folder if model_arg is None and os.path.exists(os.path.join(folder, "config.json")) else None


def make_drafter(spec: str, target, num_draft: int | None, dtype, device, model_arg: str | None = None):
    """num_draft None: the drafter's own default (a DSpark drafter's gamma, else 4)."""
    if spec == "none":
        return None
    if spec == "auto":  # the shipped DSpark drafter (with n-gram lookup) for the default target, else n-gram
        folder = shipped_drafter(model_arg)
        spec = f"hybrid:{folder}" if folder else "ngram"
    if spec.startswith("dspark:"):  # a folder written by `dspark train-drafter`
        return DSparkDrafter.from_pretrained(spec.split(":", 1)[1], target, num_draft, dtype=dtype)
    if spec.startswith("hybrid:"):  # n-gram lookup when the context repeats, that DSpark drafter otherwise
        return HybridDrafter.from_pretrained(spec.split(":", 1)[1], target, num_draft, dtype=dtype)
    num_draft = num_draft or 4
    if spec == "ngram":
        return NgramDrafter(num_draft)
    if spec.startswith("self:"):
        return DraftModelDrafter.self_draft(target, int(spec.split(":", 1)[1]), num_draft)
    if spec.startswith("model:"):
        return DraftModelDrafter(load_model(spec.split(":", 1)[1], dtype, device), num_draft)
    raise ValueError(f"--drafter must be auto, none, ngram, self:LAYERS, model:PATH, dspark:DIR or hybrid:DIR, got {spec!r}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dspark")
    sub = ap.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a reply with speculative decoding")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--drafter", default="auto",
                     help="auto (the shipped DSpark drafter with n-gram lookup, hybrid:SHIPPED, for the default "
                          "model; else ngram), none, ngram, self:LAYERS, model:PATH, dspark:DIR, hybrid:DIR")
    gen.add_argument("--num-draft", type=int, default=None,
                     help="draft tokens per round, gamma (default: the DSpark drafter's block, 4 for the others); "
                          "a DSpark drafter's prefix scheduler verifies a prefix of them")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--no-baseline", action="store_true", help="skip the plain-decoding comparison")
    from dspark.train.trainer import add_arguments

    add_arguments(sub.add_parser("train-drafter", help="train a DSpark / DFlash-style / EAGLE-style drafter"))
    vocab = sub.add_parser("draft-vocab", help="write a drafter's draft vocabulary: its data's frequent tokens")
    vocab.add_argument("--drafter", required=True, help="drafter folder (gets draft_vocab.json)")
    vocab.add_argument("--data", required=True, help="the training jsonl")
    vocab.add_argument("--size", type=int, default=16384)
    vocab.add_argument("--model", default=None, help="target (for its vocabulary and EOS ids)")
    export = sub.add_parser("export-drafter", help="copy a trained drafter for shipping (weights in bf16)")
    export.add_argument("source", help="the drafter folder written by train-drafter (and calibrate)")
    export.add_argument("destination", help="e.g. dspark/drafters/pretrained/smollm2-135m-instruct")
    export.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    from dspark import calibration, profiling

    calibration.add_arguments(sub.add_parser("calibrate", help="fit a drafter's confidence temperatures (STS)"))
    profiling.add_arguments(sub.add_parser("profile", help="measure SPS(B), the target's steps/s per step size"))
    return ap


def run_generate(args) -> int:
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype, args.device)
    if args.raw:
        prompt = tokenizer(args.prompt).input_ids
    else:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                               tokenize=True)
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    drafter = make_drafter(args.drafter, model, args.num_draft, dtype, args.device, args.model)
    num_draft = getattr(drafter, "num_draft", 0)
    max_seq_len = len(prompt) + args.max_tokens + num_draft + 8
    engine = Engine(model, tokenizer, drafter, max_batch=1, max_seq_len=max_seq_len)
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

    [request] = engine.generate([prompt], params, on_event=show)
    print()
    summary = engine.stats.summary([request])
    acceptance = ", ".join(f"{a:.2f}" for a in summary["acceptance_by_depth"])
    name = type(drafter).__name__ if drafter is not None else "none"
    print(f"\n[{name}, gamma {num_draft}, {type(engine.policy).__name__}, {str(dtype).removeprefix('torch.')}] "
          f"{summary['generated_tokens']} tokens in {summary['wall_s']:.2f}s: {summary['tokens_per_s']:.1f} tokens/s, "
          f"tau {summary['tau']:.2f}, acceptance by depth [{acceptance}]")
    if drafter is not None and not args.no_baseline:
        plain = Engine(model, tokenizer, None, max_batch=1, max_seq_len=max_seq_len)
        [baseline] = plain.generate([prompt], params)
        base = plain.stats.summary([baseline])
        same = "identical output" if baseline.generated == request.generated else "different output (sampling)"
        print(f"[plain decoding] {base['generated_tokens']} tokens in {base['wall_s']:.2f}s: "
              f"{base['tokens_per_s']:.1f} tokens/s; speedup {summary['tokens_per_s'] / base['tokens_per_s']:.2f}x, "
              f"{same}")
    return 0


def run_draft_vocab(args) -> int:
    from dspark.drafters.dspark import save_draft_vocab
    from dspark.train.data import frequent_tokens, load_sequences

    if args.size < 1:
        raise ValueError(f"--size must be >= 1, got {args.size}")
    config = load_model(args.model, torch.float32).config
    sequences = load_sequences(args.data, config.vocab_size, max_len=1 << 30)
    ids, covered = frequent_tokens(sequences, args.size, tuple(config.eos_token_ids))
    save_draft_vocab(args.drafter, ids, covered, args.data)
    print(f"{len(ids)} draft tokens cover {covered:.2%} of the data's response tokens")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "generate":
        return run_generate(args)
    if args.command == "train-drafter":
        from dspark.train.trainer import main as train_main

        return train_main(args)
    if args.command == "draft-vocab":
        return run_draft_vocab(args)
    if args.command == "calibrate":
        from dspark.calibration import main as calibrate_main

        return calibrate_main(args)
    if args.command == "export-drafter":
        from dspark.drafters.dspark_model import export_drafter

        sizes = export_drafter(args.source, args.destination, DTYPES[args.dtype])
        print("\n".join(f"{name}: {size / 1e6:.1f} MB" for name, size in sorted(sizes.items())))
        return 0
    if args.command == "profile":
        from dspark.profiling import main as profile_main

        return profile_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
