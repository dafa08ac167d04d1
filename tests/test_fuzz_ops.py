"""The op fuzzer (tests/opfuzz) at a bounded budget: random valid and broken inputs for the three ops
through the wrappers, torch.ops.dspark.* and the plan/run path, on every backend here, each case in
a crash-isolated worker process. Any crash, hang, mismatch with the reference, write outside what the
op owns, accepted invalid input or unnamed error fails the test with the seed that replays it.

Longer runs: DSPARK_FUZZ_CASES="cpu=10000,triton=300" python -m pytest tests/test_fuzz_ops.py, or
python tests/opfuzz/runner.py directly (see its docstring). DSPARK_FUZZ_START moves the seed range.
"""

from __future__ import annotations

import os

import pytest

from conftest import BACKENDS, device_of
from opfuzz.runner import OP_NAMES, failures, fuzz, summary

# Cases per op: the C++ backend is fast, the Triton interpreter ~0.2 s a case, the reference checks
# the shared validation and its own memory discipline. About 40 s on 2 cores.
DEFAULT_CASES = {"cpu": 800, "triton": 40, "reference": 150, "cuda": 300}


def _budget() -> dict:
    cases = dict(DEFAULT_CASES)
    for item in filter(None, os.environ.get("DSPARK_FUZZ_CASES", "").split(",")):
        name, _, count = item.partition("=")
        cases[name.strip()] = int(count)
    return cases


@pytest.mark.parametrize("fuzz_backend", BACKENDS)
def test_ops_survive_random_inputs(fuzz_backend):
    cases = _budget()[fuzz_backend]
    device = device_of(fuzz_backend).type
    results = fuzz(OP_NAMES, (fuzz_backend,), device, cases, start=int(os.environ.get("DSPARK_FUZZ_START", 0)),
                   jobs=2, slices=1 if cases < 200 else 2, timeout=120)
    outcomes = summary(results)
    for op in OP_NAMES:  # the generator must reach both sides of the oracle
        counts = outcomes[f"{op}/{fuzz_backend}"]
        assert counts.get("valid", 0) > cases // 5 and counts.get("invalid", 0) > cases // 5, counts
    found = failures(results)
    assert not found, f"{len(found)} failing cases, outcomes {outcomes}:\n" + "\n".join(found[:20])
