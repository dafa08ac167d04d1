"""One command for a GPU machine: the GPU tests, then every op on every GPU backend and beside its peers.

    python bench/gpu_suite.py            # (or bench/gpu_suite) about 5-8 minutes on an H100, inside 10
    python bench/gpu_suite.py --smoke    # CPU, Triton interpreter, tiny shapes: checks the suite itself

Steps: (a) pytest over the GPU test files, recording pass/fail counts (not in --smoke); (b) a
device-to-device copy (torch copy_) as the bandwidth ceiling; (c) each case (bench/gpu_cases.py) on
each dspark backend that runs on the device, and on the peers of bench/gpu_peers.py (FlashInfer,
flash-attn, vLLM's flash-attn, torch SDPA, plain-torch baselines) where importable. Times are medians
of CUDA-event timings of a CUDA graph of calls (eager when a runner cannot be captured), cycling over
enough input copies that L2 does not flatter. Achieved bandwidth counts the bytes each op must move.
A runner that raises is recorded as an error entry; a missing peer as "unavailable"; neither stops
the suite. Writes bench/results/gpu-<device>-<date>.json and .md (smoke-cpu-<date> in --smoke).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import gpu_env  # noqa: E402  (dspark importable from a bare checkout)
import torch  # noqa: E402

from dspark.ops import BACKENDS, choose_backend  # noqa: E402
from gpu_cases import Case, Unavailable, attention_case, rollback_case, sampling_case  # noqa: E402
from gpu_peers import attention_peers, rollback_peers, sampling_peers  # noqa: E402
from gpu_report import markdown, run_pytest  # noqa: E402
from shapes import COMMITTED, REQUESTS, TREE, VOCABS  # noqa: E402

MODES = ["greedy_tree", "sampled_chain", "sampled_topk_topp"]


def gpu_backends(device: torch.device) -> list[str]:
    """dspark backends that run on the device, the reference first (its outputs check the others)."""
    names = []
    for name in BACKENDS:
        if name == "cpu":  # the C++ CPU kernels are timed by the pytest-benchmark files
            continue
        try:
            choose_backend(name, device)
            names.append(name)
        except ValueError:
            pass
    return sorted(names, key=lambda b: b != "reference")


def full_cases(backends: list[str]) -> list[Case]:
    """The microbenchmark shapes (bench/shapes.py) and the issue's goal shapes."""
    bf16, chain = torch.bfloat16, list(range(-1, 7))
    # The goal shapes first, then the grids, one op after another: a deadline cuts the grids, not an op.
    cases = [attention_case(32, 4096, chain, bf16, bs, backends, attention_peers()) for bs in (None, 16)]
    cases += [rollback_case(32, 32, 4096, bf16, bs, backends, rollback_peers()) for bs in (None, 16)]
    cases += [sampling_case(32, VOCABS[-1], mode, backends, sampling_peers()) for mode in MODES]
    cases += [attention_case(R, L, TREE, bf16, bs, backends, attention_peers())
              for R in REQUESTS for L in COMMITTED for bs in (None, 16)]
    cases += [rollback_case(4, R, L, bf16, None, backends, rollback_peers()) for R in REQUESTS for L in COMMITTED]
    cases += [sampling_case(R, V, mode, backends, sampling_peers()) for V in VOCABS for R in REQUESTS for mode in MODES
              if (R, V) != (32, VOCABS[-1])]
    return cases


def smoke_cases(backends: list[str]) -> list[Case]:
    """Tiny shapes for the interpreter; fp32 attention, bf16 caches for rollback."""
    dims, tree, chain = (4, 2, 16), [-1, 0, 0, 1], [-1, 0, 1, 2]
    cases = [attention_case(2, 16, t, torch.float32, bs, backends, attention_peers(), dims=dims)
             for t in (tree, chain) for bs in (None, 4)]
    cases += [sampling_case(2, 64, mode, backends, sampling_peers(), nodes=4) for mode in MODES[:2]]
    cases += [rollback_case(2, 2, 16, torch.bfloat16, bs, backends, rollback_peers(), dims=(2, 16), nodes=8)
              for bs in (None, 4)]
    return cases


def _entry(case: Case, runner: str, copies: int, **fields) -> dict:
    return {"op": case.op, "case": case.params, "runner": runner, "bytes": case.bytes_moved, "copies": copies,
            **fields}


def _sync(device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.synchronize()
        except Exception:  # a sticky error from the failed runner: later entries will show it too
            pass


def _measure(case, runner, sets, timer, device, reference, entry) -> object:
    """Warm-up call (checked against the reference output), then the timing; fills `entry`."""
    calls = [runner.make(x) for x in sets]
    out = calls[0]()
    _sync(device)
    if reference is not None and runner.checked and case.compare is not None:
        entry.update(case.compare(out, reference))
    entry.update(timer.time(calls, runner.capturable))
    entry["status"] = "ok"
    return out


def run_case(case: Case, device, timer, l2_bytes: int, cap: int, deadline: float, copy_gbps: float) -> list[dict]:
    copies = gpu_env.rotation_copies(case.bytes_moved, l2_bytes, cap)
    entries, reference, overhead_ms = [], None, 0.0
    try:
        sets = case.build(device, copies)
        if case.overhead is not None:
            overhead_ms = timer.time([case.overhead(x) for x in sets], capturable=True)["ms"]
    except Exception as error:
        return [_entry(case, r.name, copies, status="error", error=f"inputs: {type(error).__name__}: {error}")
                for r in case.runners]
    for runner in case.runners:
        entry = _entry(case, runner.name, len(sets))
        entries.append(entry)
        if time.monotonic() > deadline:
            entry.update(status="skipped", error="the suite's time budget ran out")
            continue
        try:
            out = _measure(case, runner, sets, timer, device, reference, entry)
            reference = out if runner.name == "dspark/reference" else reference
        except Unavailable as why:
            entry.update(status="unavailable", error=str(why))
        except Exception as error:  # recorded, never fatal: the other runners and cases still run
            entry.update(status="error", error=f"{type(error).__name__}: {error}"[:500])
            _sync(device)
            continue
        if entry["status"] == "ok":
            net = max(entry["ms"] - overhead_ms, 1e-6)
            entry.update(net_ms=net, overhead_ms=overhead_ms, gbps=case.bytes_moved / net / 1e6)
            entry["copy_ratio"] = entry["gbps"] / copy_gbps
    del sets
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes, no pytest step")
    parser.add_argument("--out", type=Path, default=BENCH / "results", help="folder of the JSON and markdown")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per runner and case")
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds after which cases are skipped")
    parser.add_argument("--pytest-timeout", type=float, default=240.0)
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest step")
    parser.add_argument("--only", default=None, help="run only this op (tree_attention, rejection_sample, ...)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated dspark backends to time (default: all that run on the device)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA GPU here: use --smoke to check the suite on the CPU", file=sys.stderr)
        return 2
    info = gpu_env.device_info(device)
    report = {"device": info, "date": datetime.date.today().isoformat(), "smoke": args.smoke, "results": []}
    if not (args.smoke or args.no_tests):
        report["pytest"] = run_pytest(args.pytest_timeout)
        print(f"pytest: {report['pytest']['summary']}", flush=True)
    timer = gpu_env.Timer(device, args.budget or (0.02 if args.smoke else 0.25), max_reps=5 if args.smoke else 100)
    report["copy"] = gpu_env.copy_bandwidth(device, timer, 2**24 if args.smoke else 2**30)
    backends = gpu_backends(device)
    if args.backends:
        wanted = args.backends.split(",")
        backends = [b for b in backends if b in wanted]
    report["backends"] = backends
    cases = (smoke_cases if args.smoke else full_cases)(backends)
    deadline = started + args.deadline
    for case in cases:
        if args.only and case.op != args.only:
            continue
        entries = run_case(case, device, timer, info["l2_bytes"], 2 if args.smoke else 64, deadline,
                           report["copy"]["gbps"])
        report["results"] += entries
        for e in entries:
            print(f"{e['op']:16} {json.dumps(e['case'])[:90]:90} {e['runner']:18} {e['status']:11} "
                  f"{e.get('net_ms', float('nan')):9.4f} ms", flush=True)
    report["wall_s"] = time.monotonic() - started
    stem = f"{'smoke-cpu' if args.smoke else 'gpu-' + info['slug']}-{report['date']}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(f"wrote {args.out / stem}.json and .md in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
