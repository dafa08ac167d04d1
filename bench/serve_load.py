"""Load check of `dspark serve` (not a test): C concurrent streaming clients over loopback work through a
bounded list of requests (the shared prompt sets, greedy); every reply must equal offline greedy decoding
of the same prompt; the server's aggregate tokens/s is reported beside `Engine.generate` of the same
requests at the same batch size, in the same run.

    python bench/serve_load.py --concurrency 1,32,64 --requests 64 --max-tokens 32 \\
        --out bench/results/serve-load-cpu-<date>
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import platform
import sys
import threading
import time

import httpx
import torch
import uvicorn

from dspark.cli.generate import make_drafter
from dspark.engine import Engine
from dspark.models import load_model, load_tokenizer
from dspark.models.dtypes import WEIGHTS, resolve_weights
from dspark.sampling_params import SamplingParams
from dspark.serve import EngineLoop, Limits, create_app

DATASETS = pathlib.Path(__file__).resolve().parents[2] / "shared" / "datasets"
MAX_MODEL_LEN = 1024


def prompts_of(tokenizer, count: int) -> list[list[int]]:
    turns = []
    for name in ("humaneval.jsonl", "gsm8k.jsonl", "mt-bench.jsonl"):
        turns += [json.loads(line)["turns"][0] for line in (DATASETS / name).read_text().splitlines()]
    chosen = [turns[(i * 7) % len(turns)] for i in range(count)]
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
           for t in chosen]
    return [list(x["input_ids"] if hasattr(x, "keys") else x)[: MAX_MODEL_LEN // 2] for x in ids]


def start_server(model, tokenizer, drafter, batch: int):
    """The server in this process (a uvicorn thread over an engine thread; the kernels release the
    interpreter lock), warmed by one request before anything is timed."""
    engine = Engine(model, tokenizer, drafter, max_batch=batch, max_seq_len=MAX_MODEL_LEN + 16)
    loop = EngineLoop(engine, max_waiting=4096)
    loop.start()
    app = create_app(loop, tokenizer, Limits("bench", model.config.vocab_size, MAX_MODEL_LEN))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    with httpx.Client(timeout=600) as http:
        stream_one(http, url, [1, 2, 3, 4], 4)
    return url, server, thread, loop


def stream_one(http: httpx.Client, url: str, prompt: list[int], max_tokens: int) -> tuple[str, int]:
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text, tokens = [], 0
    with http.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:200]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            text += [c["text"] for c in chunk["choices"]]
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return "".join(text), tokens


def offline_run(model, tokenizer, drafter_spec, prompts, concurrency, params, dtype):
    engine = Engine(model, tokenizer, make_drafter(drafter_spec, model, None, dtype, "cpu"), max_batch=concurrency,
                    max_seq_len=MAX_MODEL_LEN + 16)
    start = time.perf_counter()
    requests = engine.generate(prompts, params)
    return requests, sum(len(r.generated) for r in requests) / (time.perf_counter() - start)


def served_run(url: str, prompts, concurrency: int, max_tokens: int):
    pending = list(range(len(prompts)))
    lock = threading.Lock()
    replies: dict[int, tuple[str, int]] = {}
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if not pending:
                        return
                    i = pending.pop(0)
                try:
                    replies[i] = stream_one(http, url, prompts[i], max_tokens)
                except Exception as error:  # noqa: BLE001 - counted and reported
                    errors.append(f"request {i}: {error}")

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: client(), range(concurrency)))
    elapsed = time.perf_counter() - start
    return replies, errors, sum(tokens for _, tokens in replies.values()) / elapsed


def run_level(model, tokenizer, drafter_spec, prompts, concurrency: int, max_tokens: int, dtype,
              repeats: int) -> dict:
    """Offline and served runs alternate `repeats` times (the machine's speed drifts between runs);
    the ratio is of the means."""
    params = SamplingParams(max_tokens=max_tokens)
    Engine(model, tokenizer, None, max_batch=1, max_seq_len=64).generate([[1, 2, 3, 4]], SamplingParams(max_tokens=4))
    url, server, thread, loop = start_server(model, tokenizer, make_drafter(drafter_spec, model, None, dtype, "cpu"),
                                             concurrency)
    offline_speeds, served_speeds, errors, identical = [], [], [], []
    for _ in range(repeats):
        expected, speed = offline_run(model, tokenizer, drafter_spec, prompts, concurrency, params, dtype)
        offline_speeds.append(speed)
        replies, errs, speed = served_run(url, prompts, concurrency, max_tokens)
        served_speeds.append(speed)
        errors += errs
        identical.append(sum(replies.get(i, ("", 0))[0] == r.text for i, r in enumerate(expected)))
    server.should_exit = True
    thread.join(timeout=10)
    loop.stop()
    served, offline = sum(served_speeds) / repeats, sum(offline_speeds) / repeats
    return {"concurrency": concurrency, "requests": len(prompts), "repeats": repeats, "errors": len(errors),
            "error_samples": errors[:3], "identical_to_offline": min(identical), "served_tokens_per_s": served,
            "engine_tokens_per_s": offline, "served_runs": served_speeds, "engine_runs": offline_speeds,
            "ratio": served / offline}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,32,64")
    ap.add_argument("--requests", type=int, default=64, help="requests per level (at least the concurrency)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--drafter", default="none", help="as for dspark serve (none, ngram, auto, ...)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating offline/served runs per level")
    ap.add_argument("--batch-invariant-prefill", action="store_true", help="as for dspark serve")
    ap.add_argument("--weights", choices=WEIGHTS, default=None,
                    help="as for dspark serve (default: native, the GGUF's own blocks, as `dspark serve` on a CPU)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype, native = resolve_weights(args.weights, None, None, "cpu")
    tokenizer, model = load_tokenizer(None), load_model(None, dtype, native=native)
    model.batch_invariant_prefill = args.batch_invariant_prefill
    report = {"machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "dtype": str(dtype),
              "weights": "native" if native else str(dtype), "drafter": args.drafter,
              "max_tokens": args.max_tokens, "levels": []}
    for c in [int(x) for x in args.concurrency.split(",")]:
        prompts = prompts_of(tokenizer, max(args.requests if c > 1 else min(args.requests, 8), c))
        level = run_level(model, tokenizer, args.drafter, prompts, c, args.max_tokens, dtype, args.repeats)
        report["levels"].append(level)
        print(json.dumps({k: v for k, v in level.items() if k != "error_samples"}), flush=True)
    if args.out:
        pathlib.Path(args.out + ".json").write_text(json.dumps(report, indent=1))
        lines = [f"# dspark serve load check ({report['machine']}, {report['weights']} weights, {report['dtype']} compute, "
                 f"drafter {args.drafter}, "
                 f"{args.max_tokens} tokens/request, greedy)", "",
                 "| clients | requests | errors | identical to offline | server tok/s (mean) | Engine.generate tok/s (mean) | ratio |",
                 "|---|---|---|---|---|---|---|"]
        for lv in report["levels"]:
            lines.append(f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {lv['identical_to_offline']} | "
                         f"{lv['served_tokens_per_s']:.1f} | {lv['engine_tokens_per_s']:.1f} | {lv['ratio']:.2f} |")
        pathlib.Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    bad = any(lv["errors"] or lv["identical_to_offline"] != lv["requests"] for lv in report["levels"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
