"""`dspark profile`: measure SPS(B), the target's steps per second at each step size, as the prefix
scheduler uses it; print, cache and optionally plot it."""

from __future__ import annotations

import json

import torch

from dspark.models import load_model
from dspark.models.dtypes import WEIGHTS, resolve_weights
from dspark.profiling import load_or_measure_sps


def add_arguments(ap) -> None:
    ap.add_argument("--model", default=None, help="target (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                    help="compute dtype (default: the fastest here; bf16 with --weights native)")
    ap.add_argument("--weights", choices=WEIGHTS, default=None,
                    help="native: a GGUF file's Q4_0/Q4_1/Q8_0 matrices stay as blocks (the default for GGUF on CPU); "
                         "bf16/fp16/fp32: dequantised to that dtype")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-tokens", type=int, default=64, help="largest step: max batch x (1 + gamma)")
    ap.add_argument("--context", type=int, default=256, help="committed tokens per request")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--refresh", action="store_true", help="measure again even if cached")
    ap.add_argument("--png", default=None, help="plot the curve here")
    ap.add_argument("--json", default=None, help="write the curve here")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, native = resolve_weights(args.weights, args.dtype, args.model, args.device)
    model = load_model(args.model, dtype, args.device, native=native)
    curve = load_or_measure_sps(model, args.max_tokens, args.context, refresh=args.refresh,
                                progress=lambda b, s: print(f"  B={b:<4} {s:8.2f} steps/s", flush=True))
    print(f"SPS(B) on {curve.meta.get('device')} ({curve.meta.get('dtype')}), context {args.context}")
    print("    B   steps/s   tokens/s   (monotone SPS used by the scheduler)")
    for b, raw, s in zip(curve.tokens, curve.raw, curve.sps):
        print(f"{b:>5}  {raw:8.2f}  {b * raw:9.1f}   {s:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(curve.to_dict(), f, indent=1)
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        ax.plot(curve.tokens, curve.raw, "o", markersize=3, label="measured")
        ax.plot(curve.tokens, curve.sps, "-", label="SPS(B) (monotone)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per step B")
        ax.set_ylabel("target steps per second")
        ax.set_title(f"{curve.meta.get('device')}, {curve.meta.get('dtype')}", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)
        plt.close(fig)
    return 0
