"""Plain decoding speed of one checkout at batch 1, decode phase only: SmolLM2-135M-Instruct (native GGUF
weights), the first prompts of the shared sets in turn, 128 new tokens each after a warm-up, median over
the prompts. Two checkouts are compared by running it alternately from each (PYTHONPATH=<other checkout>,
with its extension built in place: `python setup.py build_ext --inplace`):

    for i in 1 2 3 4 5; do python bench/plain_decode.py; PYTHONPATH=/tmp/old python bench/plain_decode.py; done
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import dspark  # noqa: E402
from dspark.engine import Engine  # noqa: E402
from dspark.models import load_model, load_tokenizer  # noqa: E402
from dspark.models.dtypes import resolve_weights  # noqa: E402
from dspark.sampling_params import SamplingParams  # noqa: E402
from load import mixed_prompts  # noqa: E402

DATASETS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "datasets"


def main() -> None:
    dtype, native = resolve_weights(None, None, None, "cpu")
    tokenizer, model = load_tokenizer(None), load_model(None, dtype, native=native)
    prompts = mixed_prompts(DATASETS, 6, tokenizer)
    engine = Engine(model, tokenizer, None, max_batch=1, max_seq_len=max(map(len, prompts)) + 200)
    engine.generate(prompts[:1], SamplingParams(max_tokens=16, ignore_eos=True))
    speeds = []
    for prompt in prompts:
        engine.add_request(prompt, SamplingParams(max_tokens=128, ignore_eos=True))
        engine.step()  # the prefill and the first token stay out of the timing
        before, start = engine.stats.generated_tokens, time.perf_counter()
        while engine.has_work():
            engine.step()
        speeds.append((engine.stats.generated_tokens - before) / (time.perf_counter() - start))
    print(json.dumps({"checkout": str(pathlib.Path(dspark.__file__).parents[1]),
                      "decode_tokens_per_s": sorted(speeds)[len(speeds) // 2]}))


if __name__ == "__main__":
    main()
