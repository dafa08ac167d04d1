"""The pytest step and the markdown report of bench/gpu_suite.py."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time

from gpu_env import ROOT

TEST_FILES = ["tests/test_tree_attention.py", "tests/test_rejection_sample.py",
              "tests/test_rejection_sample_distribution.py", "tests/test_kv_rollback.py", "tests/test_custom_ops.py"]
_PROGRESS = re.compile(r"^([.FEsxX]+)\s*(?:\[\s*\d+%\])?$", re.MULTILINE)
_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)")


def run_pytest(timeout_s: float) -> dict:
    """The GPU tests in a subprocess (`-p gpu_env` maps dspark.triton_kernels in a bare checkout). Without
    the C++ extension (never built on the GPU machine) the "cpu" backend's cases are deselected."""
    files = [f for f in TEST_FILES if (ROOT / f).exists()]
    # One fixed Triton attention tile: autotuning compiles 12 configs per shape key the tests sweep.
    env = dict(os.environ, PYTHONUNBUFFERED="1", DSPARK_TRITON_AUTOTUNE="0", PYTHONPATH=os.pathsep.join([str(ROOT / "bench"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "gpu_env", "-p", "no:cacheprovider", *files]
    result = {"files": files}
    if importlib.util.find_spec("dspark._C") is None:
        cmd += ["-k", "not cpu"]
        result["note"] = "dspark._C is not built: tests of the cpu backend deselected"
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: what was printed survives a timeout
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = None
        log.seek(0)
        out = log.read()
    if code is None:
        progress = "".join(m.group(1) for m in _PROGRESS.finditer(out))  # -q prints one character per test
        counts = {"passed": progress.count("."), "failed": progress.count("F"), "error": progress.count("E"),
                  "skipped": progress.count("s")}
        return {**result, "summary": f"timed out after {timeout_s:.0f} s; before that {counts}", "counts": counts,
                "returncode": None, "tail": out[-3000:]}
    lines = out.strip().splitlines()
    summary = lines[-1] if lines else "no output"
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in _COUNT.findall(summary)}
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return {**result, "summary": summary, "counts": counts, "returncode": code,
            "seconds": round(time.monotonic() - start, 1), "failures": failures[:50],
            "tail": out[-3000:]}


def _fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _case(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def _check(entry: dict) -> str:
    if "rel_err" in entry:
        return f"rel err {entry['rel_err']:.1e}"
    if "match" in entry:
        tokens = {True: ", tokens =", False: ", tokens differ"}.get(entry.get("tokens_match"), "")
        return f"{entry['match']:.0%} same length{tokens}"
    return ""


def markdown(report: dict) -> str:
    info, copy = report["device"], report["copy"]
    lines = [f"# DSpark GPU suite: {info['name']}, {report['date']}{' (smoke, CPU interpreter)' if report['smoke'] else ''}",
             "", f"torch {info['torch']}, triton {info['triton']}, CUDA {info.get('cuda')}; "
             f"backends: {', '.join(report['backends'])}; wall time {report['wall_s']:.0f} s.", "",
             f"Copy ceiling (torch copy_, read + write): {copy['gbps']:.0f} GB/s ({copy['ms']:.3f} ms for "
             f"{copy['bytes'] / 1e9:.2f} GB, {copy['mode']}).", ""]
    if "pytest" in report:
        test = report["pytest"]
        lines += [f"Tests: {test['summary']} ({test.get('seconds', '?')} s). {test.get('note', '')}", ""]
        lines += [f"- {line}" for line in test.get("failures", [])] + [""]
    lines += ["Times: median per call (minus the cache_seqlens reset for kv_rollback); GB/s counts the bytes "
              "the op must move (bench/gpu_cases.py); 'of copy' is that over the copy ceiling; checks compare "
              "with dspark's reference backend on the same inputs.", "",
              "| op | case | runner | ms | GB/s | of copy | timing | check | note |", "|---" * 9 + "|"]
    for e in report["results"]:
        if e["status"] == "ok":
            timing = f"{e['mode']}, {e['reps']}x{e['inner']}, {e['copies']} copies"
            cells = [_fmt(e["net_ms"], 4), _fmt(e["gbps"], 1), f"{e['copy_ratio']:.0%}", timing, _check(e),
                     e.get("capture_error", "")[:80]]
        else:
            cells = ["-", "-", "-", e["status"], "", e.get("error", "")[:120].replace("|", "/").replace("\n", " ")]
        lines.append(f"| {e['op']} | {_case(e['case'])} | {e['runner']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
