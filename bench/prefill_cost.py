"""What a prefill costs: SmolLM2-135M-Instruct with native GGUF weights, fresh prompts of 8-1,000 tokens (one
request, and 8 x 60 tokens in one round), the model's forward over the prompt (prefill, no LM head), lower
quartile of `--repeats`; the default prefill and the batch-invariant one. Two checkouts are compared by
running it alternately from each (PYTHONPATH=<other checkout>, its extension built in place:
`python setup.py build_ext --inplace`):

    for i in 1 2 3; do python bench/prefill_cost.py; PYTHONPATH=/tmp/old python bench/prefill_cost.py; done
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


def prefill_ms(model, lengths: list[int], repeats: int) -> float:
    c = model.config
    cache = KVCache(c.num_layers, len(lengths), max(lengths) + 8, c.num_kv_heads, c.head_dim, model.dtype, model.device)
    gen = torch.Generator().manual_seed(sum(lengths))
    entries = [(row, torch.randint(0, c.vocab_size, (n,), generator=gen).tolist(), None) for row, n in enumerate(lengths)]
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        cache.seqlens.zero_()
        rnd = build_round(len(lengths), entries, [0] * len(lengths), prefill=True)
        start = time.perf_counter()
        model.forward(cache, rnd)
        times.append(time.perf_counter() - start)
    return round(1e3 * sorted(times[1:])[(len(times) - 1) // 4], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    dtype, native = resolve_weights(None, None, None, "cpu")
    model = load_model(None, dtype, native=native)
    result = {"checkout": str(pathlib.Path(dspark.__file__).parents[1])}
    for invariant in (False, True):
        model.batch_invariant_prefill = invariant
        result["batch_invariant" if invariant else "default"] = {
            name: prefill_ms(model, lengths, args.repeats) for name, lengths in CASES.items()}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
