"""What a prefill costs: SmolLM2-135M-Instruct with native GGUF weights, fresh prompts of 8-1,000 tokens (one
request, and 8 x 60 tokens in one round) and one of 2,048 tokens in the engine's 512-token chunks (each later
chunk over the cached prefix), the model's forward over the prompt (prefill, no LM head), lower quartile of
`--repeats`; the default prefill and the batch-invariant one. Two checkouts are compared by
running it alternately from each (PYTHONPATH=<other checkout>, its extension built in place:
`python setup.py build_ext --inplace`):

    for i in 1 2 3; do python bench/prefill_cost.py; PYTHONPATH=/tmp/old python bench/prefill_cost.py; done

--llama-cpp adds llama.cpp's prefill of the same prompt ids on the same GGUF (llama-cpp-python, its own
weights, batches of 512 tokens, this machine's threads), timed in the same run: Llama.eval over the prompt
after a reset.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

import dspark
from dspark.batch import build_round
from dspark.cache import KVCache
from dspark.models import load_model
from dspark.models.dtypes import resolve_weights

CASES = {"8": [8], "40": [40], "170": [170], "512": [512], "1000": [1000], "8x60": [60] * 8}
CHUNKED = 2048, 512  # one prompt, prefilled in chunks of this many tokens


def prefill_ms(model, lengths: list[int], repeats: int, chunk: int | None = None) -> float:
    """Fresh prompts of these lengths in one round, or (chunk given) one prompt in rounds of `chunk` tokens."""
    c = model.config
    cache = KVCache(c.num_layers, len(lengths), max(lengths) + 8, c.num_kv_heads, c.head_dim, model.dtype, model.device)
    gen = torch.Generator().manual_seed(sum(lengths))
    prompts = [torch.randint(0, c.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    step = chunk or max(lengths)
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        cache.seqlens.zero_()
        start = time.perf_counter()
        for begin in range(0, max(lengths), step):
            entries = [(row, p[begin: begin + step], None) for row, p in enumerate(prompts) if len(p) > begin]
            rnd = build_round(len(lengths), entries, cache.seqlens.tolist(), prefill=True)
            model.forward(cache, rnd)
            for row, p in enumerate(prompts):
                cache.seqlens[row] = min(len(p), begin + step)
        times.append(time.perf_counter() - start)
    return round(1e3 * sorted(times[1:])[(len(times) - 1) // 4], 1)


def llama_cpp_ms(llm, lengths: list[int], vocab: int, repeats: int) -> float | None:
    """llama.cpp's prefill of one prompt of these tokens (the same ids as prefill_ms draws); None for several."""
    if len(lengths) != 1:
        return None
    prompt = torch.randint(0, vocab, (lengths[0],), generator=torch.Generator().manual_seed(sum(lengths))).tolist()
    times = []
    for _ in range(repeats + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        times.append(time.perf_counter() - start)
    return round(1e3 * sorted(times[1:])[(len(times) - 1) // 4], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--llama-cpp", action="store_true", help="also time llama.cpp's prefill (one-prompt cases)")
    args = parser.parse_args()
    dtype, native = resolve_weights(None, None, None, "cpu")
    model = load_model(None, dtype, native=native)
    result = {"checkout": str(pathlib.Path(dspark.__file__).parents[1])}
    for invariant in (False, True):
        model.batch_invariant_prefill = invariant
        times = {name: prefill_ms(model, lengths, args.repeats) for name, lengths in CASES.items()}
        times[f"{CHUNKED[0]} in {CHUNKED[1]}s"] = prefill_ms(model, [CHUNKED[0]], args.repeats, CHUNKED[1])
        result["batch_invariant" if invariant else "default"] = times
    if args.llama_cpp:
        import sys

        sys.path.insert(0, str(pathlib.Path(__file__).parent))
        from e2e import load_llama_cpp
        from dspark.models import default_model_path

        llm = load_llama_cpp(default_model_path(), None)
        if llm is None:
            raise SystemExit("--llama-cpp: llama-cpp-python is not installed")
        cases = {name: lengths for name, lengths in CASES.items() if max(lengths) + 8 <= 2048}
        cases[f"{CHUNKED[0]} in {CHUNKED[1]}s"] = [CHUNKED[0]]
        result["llama.cpp"] = {name: llama_cpp_ms(llm, lengths, model.config.vocab_size, args.repeats)
                               for name, lengths in cases.items() if len(lengths) == 1}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
