"""SPS(B): target forward steps per second at B tokens per step, the hardware curve the prefix
scheduler trades verified tokens against (DSPARK.md section 4).

A step of B tokens is what a verification round costs: chains of up to `per_request` nodes (the
anchor and its drafts) over requests that each hold `context` committed tokens, plus the LM head
over every node. Measured once per (model shape, dtype, device, threads) and cached as JSON under
$DSPARK_CACHE_DIR (default ~/.cache/dspark), since a profile takes seconds on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time

import torch

from dspark.batch import build_round
from dspark.cache import KVCache

FORMAT = 5  # 2: after the CPU small-batch linear kernel changed what a step costs; 3: after its AVX512-BF16 path and the VNNI quantized kernel; 4: after the quantized kernel went to tiles of 8 W rows; 5: after 16-row tiles and the vectorised decoder made several-token steps cheaper


def token_grid(max_tokens: int) -> list[int]:
    """1..8 one by one, then about 25% apart up to max_tokens (which is always included)."""
    points, b = [], 1
    while b < max_tokens:
        points.append(b)
        b = b + 1 if b < 8 else max(b + 1, round(b * 1.25))
    return points + [max_tokens]


class SPSCurve:
    """Piecewise-linear SPS(B) through measured points, made non-increasing in B (a step with more
    tokens is never faster; without this, timing noise would look like free verification). Past the
    last point tokens per second is held constant."""

    def __init__(self, tokens: list[int], steps_per_second: list[float], meta: dict | None = None):
        if len(tokens) != len(steps_per_second) or not tokens:
            raise ValueError("tokens and steps_per_second must be non-empty and of equal length")
        if any(b2 <= b1 for b1, b2 in zip(tokens, tokens[1:])) or tokens[0] < 1:
            raise ValueError("tokens must be increasing positive counts")
        if any(not (s > 0 and math.isfinite(s)) for s in steps_per_second):
            raise ValueError("steps_per_second must be positive and finite")
        self.tokens = [int(b) for b in tokens]
        self.raw = [float(s) for s in steps_per_second]
        self.sps, low = [], float("inf")
        for s in self.raw:
            low = min(low, s)
            self.sps.append(low)
        self.meta = meta or {}

    def __call__(self, b: float) -> float:
        t, s = self.tokens, self.sps
        if b <= t[0]:
            return s[0]
        if b >= t[-1]:
            return s[-1] * t[-1] / b
        hi = next(i for i, x in enumerate(t) if x >= b)
        w = (b - t[hi - 1]) / (t[hi] - t[hi - 1])
        return s[hi - 1] + w * (s[hi] - s[hi - 1])

    def to_dict(self) -> dict:
        return {"format": FORMAT, "tokens": self.tokens, "steps_per_second": self.raw, "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict) -> "SPSCurve":
        return cls(data["tokens"], data["steps_per_second"], data.get("meta"))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}-{torch.get_num_threads()}threads"


@torch.inference_mode()
def time_step(model, tokens: int, context: int, per_request: int, repeats: int) -> float:
    """Seconds of one verification-shaped forward of `tokens` tokens (the lower quartile of `repeats`)."""
    c = model.config
    rows = -(-tokens // per_request)
    cache = KVCache(c.num_layers, rows, context + per_request, c.num_kv_heads, c.head_dim, model.dtype, model.device)
    cache.seqlens.fill_(context)
    gen = torch.Generator().manual_seed(tokens)
    sizes = [per_request] * (tokens // per_request) + ([tokens % per_request] if tokens % per_request else [])
    entries = [(row, torch.randint(0, c.vocab_size, (n,), generator=gen).tolist(), None) for row, n in enumerate(sizes)]
    rnd = build_round(rows, entries, [context] * rows, model.device)
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        start = time.perf_counter()
        hidden, _ = model.forward(cache, rnd)
        model.logits(hidden)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        times.append(time.perf_counter() - start)
    # A low quantile rather than the median: on a shared CPU, steps are slowed by others' work, never
    # sped up, and a curve measured in a noisy moment would misprice verification for the whole run.
    return sorted(times[1:])[(len(times) - 1) // 4]


def measure_sps(model, max_tokens: int, context: int = 256, per_request: int = 8, repeats: int = 8,
                progress=None) -> SPSCurve:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    grid = token_grid(max_tokens)
    sps = []
    for b in grid:
        sps.append(1.0 / time_step(model, b, context, per_request, repeats))
        if progress is not None:
            progress(b, sps[-1])
    return SPSCurve(grid, sps, {"context": context, "per_request": per_request, "repeats": repeats,
                                "device": _device_name(model.device), "dtype": str(model.dtype),
                                "weights": weight_formats(model)})


def weight_formats(model) -> str:
    """"dense", or the block formats of a model's quantized matrices (their cost curve differs)."""
    from dspark.models.quantized import QuantizedWeight

    formats = sorted({t.format for t in model.weights.values() if isinstance(t, QuantizedWeight)})
    return "+".join(formats) if formats else "dense"


def profile_key(model, max_tokens: int, context: int, per_request: int) -> str:
    c = model.config
    fields = [c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim,
              c.vocab_size, str(model.dtype), _device_name(model.device), torch.__version__, max_tokens, context,
              per_request, FORMAT]
    if weight_formats(model) != "dense":  # dense keys stay as they were: cached curves remain valid
        fields.append(weight_formats(model))
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


def cache_dir() -> str:
    """Where DSpark keeps what it measures or builds once (SPS profiles, corpus indexes, tokenizers)."""
    return os.environ.get("DSPARK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dspark")


def load_or_measure_sps(model, max_tokens: int, context: int = 256, per_request: int = 8, refresh: bool = False,
                        progress=None) -> SPSCurve:
    """The cached curve for this model shape, dtype and device, measuring it when absent (or refresh)."""
    path = os.path.join(cache_dir(), "sps", profile_key(model, max_tokens, context, per_request) + ".json")
    if not refresh and os.path.exists(path):
        with open(path) as f:
            return SPSCurve.from_dict(json.load(f))
    curve = measure_sps(model, max_tokens, context, per_request, progress=progress)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(curve.to_dict(), f, indent=1)
    os.replace(tmp, path)
    return curve
