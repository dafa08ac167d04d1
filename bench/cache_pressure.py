"""What other memory traffic costs the target's kernels between rounds: SmolLM2-135M-Instruct (native GGUF weights,
batch 1, greedy, 128 new tokens) decoding humaneval prompts in engines that differ only in what runs between two
target forwards, each engine taking a prompt in turn (so a slow spell of this shared machine falls on every arm):

- "plain + N MiB": plain decoding, then a read of a fixed N MiB buffer after every round (N = 0 is plain decoding);
- "plain + 1 ms busy": plain decoding, then 1 ms of a Python loop that touches next to no memory after every round;
- "n-gram gamma 1": prompt lookup at a fixed gamma of 1 (two-token verification rounds, next to no memory of its own);
- "DSpark gamma 1": the shipped DSpark drafter (Q8_0 blocks, ~17 MiB of weights read every round) at gamma 1.

The target's kernels are timed inside the engines (the fused decoder layers and the LM head, per call, by number of
tokens), so the table separates what a verification round costs by itself (n-gram's two-token calls) from what the
drafter's work costs it on top (DSpark's two-token calls). On a CPU whose last-level cache holds most of the target's
~96 MiB of weights per token, both what runs between forwards reads and how long it runs (a shared cache loses our
lines to other tenants' traffic while we are not reading them) slow the target's next forward.

    python bench/cache_pressure.py --out bench/results/cache-pressure-cpu
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import platform
import time

import torch

import dspark.models.cpu_decoder as cpu_decoder
import dspark.models.quantized as quantized
from dspark.cli.generate import warm_up
from dspark.drafters import DSparkDrafter, NgramDrafter
from dspark.drafters.dspark import drafter_weights_for
from dspark.engine import Engine
from dspark.models import load_model, load_tokenizer
from dspark.sampling_params import SamplingParams
from dspark.scheduler import FixedLength
from huge_pages import SHIPPED, humaneval_prompts



class KernelClock:
    """Wraps the kernels' Python entry points: seconds and calls of the target's layers and LM head, by tokens."""

    def __init__(self, model):
        self.layers_weights = 12 * model.config.num_layers  # the target's flat weight list (a drafter's is shorter)
        self.head_shape = tuple(model.lm_head().data.shape)
        self.arm = None
        self.seconds = collections.defaultdict(float)
        self.calls = collections.defaultdict(int)
        self._layers, self._linear = cpu_decoder._kernel, quantized._kernel
        cpu_decoder._kernel = self._timed(self._layers, lambda h, w, *a: "layers" if len(w) == self.layers_weights else None)
        quantized._kernel = self._timed(self._linear, lambda x, w, *a: "head" if tuple(w.shape) == self.head_shape else None)

    def _timed(self, kernel, kind_of):
        def call(*args):
            start = time.perf_counter()
            out = kernel(*args)
            kind = kind_of(*args)
            if kind is not None and self.arm is not None:
                key = (self.arm, kind, args[0].shape[0])
                self.seconds[key] += time.perf_counter() - start
                self.calls[key] += 1
            return out
        return call

    def ms(self, arm: str, kind: str, tokens: int) -> float | None:
        key = (arm, kind, tokens)
        return round(self.seconds[key] / self.calls[key] * 1e3, 3) if self.calls[key] else None


def after_each_step(step, work):
    def stepped():
        out = step()
        work()
        return out
    return stepped


def busy_wait(seconds: float) -> None:
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=6, help="first prompts of humaneval.jsonl")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mib", default="0,8,16,32,64", help="MiB read after every plain round, comma-separated")
    ap.add_argument("--busy-ms", type=float, default=1.0, help="the pause arm's busy loop after every round (0: none)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tokenizer = load_tokenizer(None)
    prompts = humaneval_prompts(tokenizer, args.prompts)
    params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    model = load_model(None, torch.bfloat16, native=True)
    clock = KernelClock(model)
    drafter = DSparkDrafter.from_pretrained(str(SHIPPED), model, 1, dtype=model.dtype, weights=drafter_weights_for(model))
    arms, buffers = {}, {}
    for mib in map(int, args.mib.split(",")):
        name = f"plain + {mib} MiB"
        arms[name] = Engine(model, tokenizer, None, max_batch=1, max_seq_len=1024)
        buffers[name] = torch.rand(mib << 18) if mib else None  # float32: mib MiB
    if args.busy_ms > 0:
        busy = f"plain + {args.busy_ms:g} ms busy"
        arms[busy] = Engine(model, tokenizer, None, max_batch=1, max_seq_len=1024)
    arms["n-gram gamma 1"] = Engine(model, tokenizer, NgramDrafter(num_draft=1), policy=FixedLength(1), max_batch=1,
                                    max_seq_len=1024)
    arms["DSpark gamma 1"] = Engine(model, tokenizer, drafter, policy=FixedLength(1), max_batch=1, max_seq_len=1024)
    for name, engine in arms.items():
        warm_up(engine, prompts[0], params)
        if buffers.get(name) is not None:
            engine.step = after_each_step(engine.step, buffers[name].sum)  # the other traffic: the whole buffer read
        elif name.endswith("ms busy"):
            engine.step = after_each_step(engine.step, lambda: busy_wait(args.busy_ms / 1e3))
    seconds, tokens, outputs = collections.defaultdict(float), collections.defaultdict(int), collections.defaultdict(list)
    for repeat in range(args.repeats):
        for prompt in prompts:
            for name, engine in arms.items():
                clock.arm = name
                start = time.perf_counter()
                request = engine.generate([prompt], params)[0]
                seconds[name] += time.perf_counter() - start
                clock.arm = None
                tokens[name] += len(request.generated)
                if repeat == 0:
                    outputs[name].append(request.generated)
    rows = []
    for name in arms:
        rows.append({"arm": name, "tok/s": round(tokens[name] / seconds[name], 1),
                     "layers 1 token ms": clock.ms(name, "layers", 1), "layers 2 tokens ms": clock.ms(name, "layers", 2),
                     "head 1 token ms": clock.ms(name, "head", 1), "head 2 tokens ms": clock.ms(name, "head", 2),
                     "identical to plain": outputs[name] == outputs["plain + 0 MiB"]})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        result = {"device": f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                  "command": "python bench/cache_pressure.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                                         if k != "out" and v is not None),
                  "prompts": args.prompts, "repeats": args.repeats, "rows": rows}
        pathlib.Path(args.out + ".json").write_text(json.dumps(result, indent=1))
        columns = list(rows[0])
        table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        table += ["| " + " | ".join("" if r[c] is None else str(r[c]) for c in columns) + " |" for r in rows]
        pathlib.Path(args.out + ".md").write_text(
            f"# Cache pressure ({result['device']})\n\n`{result['command']}`\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
