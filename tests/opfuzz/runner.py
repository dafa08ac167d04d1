"""Property-based fuzzing of the ops, each case isolated against crashes and hangs.

    python tests/opfuzz/runner.py --cases 10000 --backends cpu           # a long run
    python tests/opfuzz/runner.py --cases 300 --backends triton          # Triton (interpreter on CPU)
    python tests/opfuzz/runner.py --op kv_rollback --backends cpu --seed 1234 -v   # replay one case
    python tests/opfuzz/runner.py --device cuda --backends triton,cuda   # on a GPU machine

Cases run in worker processes (one per op and backend; `--jobs` at once). A worker announces each seed
before running it and reports its verdict after; a worker that dies (SIGSEGV, SIGFPE, abort) or goes
silent past `--timeout` seconds is killed, its case recorded as "crash" or "hang" with the seed that
replays it, and a new worker goes on from the next seed. faulthandler prints the dying stack.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, so that `opfuzz` imports as a package

OP_NAMES = ("tree_attention", "rejection_sample", "kv_rollback")
FAILURES = ("mismatch", "corruption", "accepted-invalid", "rejected-valid", "unnamed", "error", "crash", "hang")


def _environment(device: str) -> None:
    """Triton runs interpreted on CPU tensors; on accelerators the value checks (index ranges, NaN)
    run only with DSPARK_DEBUG=1, which the invalid-input oracle needs."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        os.environ.setdefault("DSPARK_DEBUG", "1")


def worker(op: str, backend: str, device: str, first: int, last: int) -> None:
    """Runs seeds first..last-1, one JSON line per event on stdout."""
    import faulthandler

    faulthandler.enable()
    _environment(device)
    from opfuzz.oracle import judge, make_case

    for seed in range(first, last):
        print(json.dumps({"start": seed}), flush=True)
        try:
            case = make_case(op, seed, backend, device)
            verdict, detail = judge(case, backend)
            label = case.label + (f" | broken: {case.broken.label}" if case.broken else "") + f" | {case.entry}"
        except Exception as error:  # noqa: BLE001 - a broken generator is reported, not hidden
            verdict, detail, label = "error", f"case generation: {type(error).__name__}: {error}", ""
        print(json.dumps({"seed": seed, "verdict": verdict, "detail": detail[:2000], "label": label}), flush=True)


def run_slice(op: str, backend: str, device: str, first: int, last: int, timeout: float) -> list[dict]:
    """Every seed of [first, last) judged, restarting the worker after a crash or a hang."""
    results, seed = [], first
    while seed < last:
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--op", op, "--backends", backend,
                   "--device", device, "--start", str(seed), "--cases", str(last - seed)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                         daemon=True).start()
        stderr: list[str] = []
        threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
        started, limit = None, timeout * 4  # the first case also pays the imports
        while True:
            try:
                line = lines.get(timeout=limit)
            except queue.Empty:
                proc.kill()
                proc.wait()
                hung = started if started is not None else seed
                results.append({"seed": hung, "verdict": "hang", "detail": f"no answer in {limit:.0f} s", "label": ""})
                seed = hung + 1
                break
            limit = timeout
            if line is None:
                proc.wait()
                if started is not None:  # died inside a case
                    tail = "".join(stderr)[-3000:]
                    results.append({"seed": started, "verdict": "crash",
                                    "detail": f"worker exit code {proc.returncode}\n{tail}", "label": ""})
                    seed = started + 1
                else:
                    if proc.returncode:
                        raise RuntimeError(f"fuzz worker failed before any case:\n{''.join(stderr)[-3000:]}")
                    seed = last
                break
            event = json.loads(line)
            if "start" in event:
                started = event["start"]
            else:
                results.append(event)
                started, seed = None, event["seed"] + 1
    return results


def fuzz(ops, backends, device: str, cases: int, start: int = 0, jobs: int = 2, timeout: float = 60.0,
         slices: int = 1) -> dict:
    """{(op, backend): [result, ...]} over seeds start..start+cases-1, `slices` workers per pair."""
    work = []
    for op in ops:
        for backend in backends:
            bounds = [start + cases * i // slices for i in range(slices + 1)]
            work += [(op, backend, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    out = collections.defaultdict(list)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_slice, op, backend, device, a, b, timeout): (op, backend)
                   for op, backend, a, b in work}
        for future, key in futures.items():
            out[key] += future.result()
    return dict(out)


def failures(results: dict) -> list[str]:
    lines = []
    for (op, backend), items in results.items():
        for item in items:
            if item["verdict"] in FAILURES:
                lines.append(f"{item['verdict']}: {op} on {backend}, seed {item['seed']} ({item['label']}): "
                             f"{item['detail'][:600]}\n  replay: python tests/opfuzz/runner.py --op {op} "
                             f"--backends {backend} --seed {item['seed']} -v")
    return lines


def summary(results: dict) -> dict:
    return {f"{op}/{backend}": dict(collections.Counter(item["verdict"] for item in items))
            for (op, backend), items in sorted(results.items())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", default="all", help="an op name or 'all'")
    parser.add_argument("--backends", default="cpu", help="comma-separated: cpu, triton, cuda, reference")
    parser.add_argument("--device", default="cpu", help="where the tensors live (cuda for the GPU backends)")
    parser.add_argument("--cases", type=int, default=200, help="cases per op and backend")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="replay this one seed in this process")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes at once")
    parser.add_argument("--slices", type=int, default=1, help="workers per op and backend")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one case may take")
    parser.add_argument("--json", help="write the summary and every failure here")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ops = OP_NAMES if args.op == "all" else tuple(args.op.split(","))
    backends = tuple(args.backends.split(","))
    if args.worker:
        worker(ops[0], backends[0], args.device, args.start, args.start + args.cases)
        return 0
    if args.seed is not None:
        _environment(args.device)
        from opfuzz.oracle import judge, make_case

        for op in ops:
            for backend in backends:
                case = make_case(op, args.seed, backend, args.device)
                print(f"{op} on {backend}, seed {args.seed}: {case.label} | {case.entry}"
                      + (f" | broken: {case.broken.label} (names {case.broken.names})" if case.broken else ""))
                print("  ->", *judge(case, backend))
        return 0
    began = time.time()
    results = fuzz(ops, backends, args.device, args.cases, args.start, args.jobs, args.timeout, args.slices)
    found = failures(results)
    report = {"cases_per_op_and_backend": args.cases, "first_seed": args.start, "device": args.device,
              "seconds": round(time.time() - began, 1), "outcomes": summary(results), "failures": found}
    print(json.dumps({k: v for k, v in report.items() if k != "failures"}, indent=1))
    for line in found:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
