"""Environment of bench/gpu_suite.py: making dspark importable from a bare checkout, the device, and timers.

Importing this module (also as a pytest plugin, `pytest -p gpu_env`) makes `dspark.triton_kernels`
importable on a machine where the project was never pip-installed: setup.py maps the `triton_kernels/`
folder to that name, which a plain checkout on sys.path does not do.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ensure_dspark() -> None:
    """Import dspark from the checkout if it is not installed, and map dspark.triton_kernels onto triton_kernels/."""
    if importlib.util.find_spec("dspark") is None:
        sys.path.insert(0, str(ROOT))
    dspark = importlib.import_module("dspark")
    if importlib.util.find_spec("dspark.triton_kernels") is not None:
        return
    folder = ROOT / "triton_kernels"
    spec = importlib.util.spec_from_file_location("dspark.triton_kernels", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    dspark.triton_kernels = module


ensure_dspark()

import torch  # noqa: E402  (after the path set-up above, like every dspark import)


def device_info(device: torch.device) -> dict:
    """Name, file-name slug, L2 size and versions, for the report."""
    info = {"torch": torch.__version__, "python": sys.version.split()[0]}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), sms=props.multi_processor_count,
                    l2_bytes=getattr(props, "L2_cache_size", 50 * 2**20), cuda=torch.version.cuda)
    else:
        info.update(name="cpu", l2_bytes=32 * 2**20)
    info["slug"] = re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")
    return info


def rotation_copies(bytes_moved: int, l2_bytes: int, cap: int = 64) -> int:
    """Input sets to cycle through so that the bytes touched between reuses exceed L2 three times over."""
    return max(1, min(cap, math.ceil(3 * l2_bytes / max(bytes_moved, 1))))


class Timer:
    """Median time of one call, cycling through `calls` (one per rotated input set).

    CUDA: CUDA events around a batch of calls; the batch is captured in a CUDA graph when the runner
    allows it (no host syncs), so Python and launch overhead stay out, else it runs eagerly (the time
    then includes the Python overhead that a caller of the op pays). CPU (smoke mode): the wall clock.
    """

    def __init__(self, device: torch.device, budget_s: float, max_reps: int = 100):
        self.cuda = device.type == "cuda"
        self.budget_s, self.max_reps = budget_s, max_reps

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _clock(self, fn) -> float:
        """Seconds one call of fn takes, measured on the device."""
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def _capture(self, batch):
        """A CUDA graph replaying `batch`, or None (with the reason) when it cannot be captured."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # allocator warm-up on a side stream, as torch recommends
                batch()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                batch()
            return graph, None
        except Exception as error:  # a host sync or an unsupported call inside: time it eagerly
            torch.cuda.synchronize()
            return None, f"{type(error).__name__}: {error}"[:200]

    def time(self, calls: list, capturable: bool) -> dict:
        calls[0]()  # warm-up: compilation, allocator, first-touch of outputs stay out of the times
        self._sync()
        single = self._clock(calls[0])
        if single > self.budget_s:  # too slow to repeat within the budget
            return {"ms": single * 1e3, "mode": "single", "reps": 1, "inner": 1}
        if capturable and self.cuda:  # whole rotations, at least 16 calls, so one replay's launch gap is amortised
            inner = len(calls) * math.ceil(16 / len(calls))
        else:
            inner = max(1, min(len(calls), int(self.budget_s / 5 / single)))

        def batch():
            for i in range(inner):
                calls[i % len(calls)]()

        fn, mode, note = batch, "eager" if self.cuda else "wall", None
        if capturable and self.cuda:
            graph, note = self._capture(batch)
            if graph is not None:
                fn, mode = graph.replay, "graph"
        fn()
        one = self._clock(fn)
        reps = max(3, min(self.max_reps, int(self.budget_s / max(one, 1e-6))))
        times = sorted(self._clock(fn) / inner for _ in range(reps))
        result = {"ms": statistics.median(times) * 1e3, "mode": mode, "reps": reps, "inner": inner,
                  "p20_ms": times[len(times) // 5] * 1e3, "p80_ms": times[(4 * len(times)) // 5] * 1e3}
        if note:
            result["capture_error"] = note
        return result


def copy_bandwidth(device: torch.device, timer: Timer, size_bytes: int) -> dict:
    """Device-to-device copy of a large buffer (torch copy_): bytes read plus bytes written per second."""
    src = torch.randint(0, 255, (size_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = timer.time([lambda: dst.copy_(src)], capturable=True)
    moved = 2 * size_bytes
    return {"bytes": moved, "ms": timing["ms"], "mode": timing["mode"], "gbps": moved / timing["ms"] / 1e6}
