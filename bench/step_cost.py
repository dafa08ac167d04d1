"""What a target forward step costs at 1-16 tokens (the verification round of gamma + 1 tokens), SmolLM2-135M-Instruct
with native GGUF weights, chains of up to 8 tokens over 256 committed ones: dspark.profiling.time_step (forward and
LM head, lower quartile of 20). Two checkouts are compared by running it alternately from each (PYTHONPATH=<other
checkout>, with its extension built in place: `python setup.py build_ext --inplace`):

    for i in 1 2 3; do python bench/step_cost.py; PYTHONPATH=/tmp/old python bench/step_cost.py; done

--contexts 256,1024 times the same steps over each number of committed tokens (attention's share grows with it).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import dspark
from dspark.models import load_model
from dspark.models.dtypes import resolve_weights
from dspark.profiling import time_step

TOKENS = (1, 2, 4, 8, 16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="256", help="committed tokens before the step, comma-separated")
    args = ap.parse_args()
    dtype, native = resolve_weights(None, None, None, "cpu")
    model = load_model(None, dtype, native=native)
    for context in map(int, args.contexts.split(",")):
        step_ms = {b: round(time_step(model, b, context, 8, 20) * 1e3, 2) for b in TOKENS}
        print(json.dumps({"checkout": str(pathlib.Path(dspark.__file__).parents[1]), "context": context,
                          "step_ms": step_ms,
                          "ratio_to_one_token": {b: round(t / step_ms[1], 2) for b, t in step_ms.items()}}))


if __name__ == "__main__":
    main()
