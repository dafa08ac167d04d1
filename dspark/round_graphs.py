"""CUDA graphs of the target's decoding and verification rounds (nano-vllm's model runner, gpt-fast's
static caches): one graph per padded token-count bucket, captured the first time a round of that size
comes and replayed over static round tensors from then on.

A round of n tokens runs as the smallest bucket b >= n. Its tensors fill the first n entries of the
static ones; the b - n padding tokens go to a scratch cache row that no request ever holds (the cache's
last), as one chain from slot 0. tree_attention lets a token see only its own row, and every layer
treats tokens row by row, so padding never changes a real token's result. The scratch row's length
stays 0: rejection_sample and kv_rollback get the round's own qo_indptr, where that row has no tokens.
The static qo_indptr is the round's with its last entry set to b. Chain rounds and tree rounds have
graphs of their own (the padding is a chain too), so plain decoding keeps tree_attention's chain path.

The attention plan is made once per graph, at capture, over the static tensors, and reused by every
later round: its backend must read the round's values on the device at each run, as tree_attention's
cuda, cpu and reference backends do (Triton's plans its work list from the values, on the host). The
engine's rounds come from build_round, valid by construction: the trusted path, no per-round
validation. Prefills and rounds past the largest bucket run eagerly. Capturing needs a planned forward
(TargetModel.plans_rounds) and dspark._C built with CUDA.

Graphs share one memory pool: they never run concurrently, and a round's logits (a view of its graph's
static output) are read before the next round replays anything.

On CPU there are no graphs: `capture=False` runs the same padded static rounds eagerly, which is how the
CPU tests check the padding.
"""

from __future__ import annotations

import dataclasses

import torch

from dspark.batch import Round
from dspark.cache import KVCache, SideCache
from dspark.models.target import TargetModel
from dspark.ops._backend import cpu_extension, cuda_extension_built

# Steps of ~1.5x: a round pays at most ~50% padding; buckets are captured only when a round needs them.
BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclasses.dataclass
class _Bucket:
    forward: object                 # the padded round's logits, run eagerly (no capture)
    graph: object = None            # torch.cuda.CUDAGraph replaying forward, its output in `logits`
    logits: torch.Tensor | None = None

    def run(self) -> torch.Tensor:
        if self.graph is None:
            return self.forward()
        self.graph.replay()
        return self.logits


class RoundGraphs:
    def __init__(self, model: TargetModel, cache: KVCache, capture_layers: tuple[int, ...] = (),
                 side: SideCache | None = None, max_tokens: int = 256, capture: bool | None = None):
        """cache: its last row is the scratch row, never to be given to a request. capture: CUDA graphs
        (default: when the model is on CUDA); False runs the padded rounds eagerly."""
        if not model.plans_rounds:
            raise ValueError(f"{type(model).__name__} has no planned forward (TargetModel.plans_rounds): its rounds "
                             f"cannot be captured in CUDA graphs")
        device = model.device
        self.capture = device.type == "cuda" if capture is None else capture
        if self.capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, got {device}")
        if device.type == "cuda" and not cuda_extension_built:
            raise ValueError("graph rounds on CUDA need tree_attention's CUDA backend: build dspark._C with CUDA "
                             "(DSPARK_CUDA=1)")
        if device.type == "cuda" and model.config.head_dim > 256:
            raise ValueError(f"tree_attention's CUDA backend supports head_dim <= 256, got {model.config.head_dim}")
        # A backend whose plan reads the values at every run (see the module's docstring).
        self.backend = "cuda" if device.type == "cuda" else ("cpu" if cpu_extension is not None else "reference")
        if (side is None) != (not capture_layers):
            raise ValueError("capture_layers and a side cache go together")
        self.model, self.cache, self.capture_layers, self.side = model, cache, tuple(capture_layers), side
        self.scratch_row = cache.rows - 1
        self.buckets = tuple(b for b in BUCKETS if b <= min(max_tokens, cache.max_seq_len))
        if not self.buckets:
            raise ValueError(f"max_tokens and the cache's max_seq_len must be >= 1, got {max_tokens}, "
                             f"{cache.max_seq_len}")
        size = self.buckets[-1]
        cache.reserve(self.scratch_row, size)
        as_long = dict(dtype=torch.int64, device=device)
        self.ramp = torch.arange(size, **as_long)
        self.tokens = torch.zeros(size, **as_long)
        self.positions = torch.zeros(size, **as_long)
        self.write_rows = torch.zeros(size, **as_long)
        self.write_slots = torch.zeros(size, **as_long)
        self.parents = torch.zeros(size, dtype=torch.int32, device=device)
        self.qo_indptr = torch.zeros(cache.rows + 1, dtype=torch.int32, device=device)
        self._captured: dict[tuple[int, bool], _Bucket] = {}  # (bucket, tree) -> its graph
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.recorded_last = False  # whether the last round captured (or planned) a new graph

    def applies(self, rnd: Round) -> bool:
        return not rnd.prefill and 0 < rnd.tokens.shape[0] <= self.buckets[-1]

    def logits(self, rnd: Round) -> torch.Tensor:
        """fp32 logits [n, V] of the round's n tokens (a view of the bucket's static output: read it
        before the next round)."""
        n = rnd.tokens.shape[0]
        bucket = next(b for b in self.buckets if b >= n)
        key = (bucket, rnd.parents is not None)
        self._load(rnd, n, bucket)
        entry = self._captured.get(key)
        self.recorded_last = entry is None
        if entry is None:
            entry = self._captured[key] = self._record(*key)
        return entry.run()[:n]

    def capture_up_to(self, num_tokens: int) -> None:
        """Capture every bucket a round of up to num_tokens tokens may take, now (a server's or a
        benchmark's warm-up) rather than at the first such round. The rounds captured hold padding only:
        they write the scratch row alone, so this is safe between any two rounds."""
        for bucket in self.buckets:
            for tree in (False, True):
                if (bucket, tree) not in self._captured:
                    self._load(None, 0, bucket)
                    self._captured[(bucket, tree)] = self._record(bucket, tree)
            if bucket >= num_tokens:
                break

    def _load(self, rnd: Round | None, n: int, bucket: int) -> None:
        """The round (None: no tokens) into the static tensors, padding into the scratch row."""
        if rnd is None:
            self.qo_indptr.zero_()
        else:
            self.tokens[:n].copy_(rnd.tokens)
            self.positions[:n].copy_(rnd.positions)
            self.write_rows[:n].copy_(rnd.write_rows)
            self.write_slots[:n].copy_(rnd.write_slots)
            self.qo_indptr.copy_(rnd.qo_indptr)
            if rnd.parents is not None:
                self.parents[:n].copy_(rnd.parents)
        pad = bucket - n
        if pad:
            # Stale tokens past n are earlier rounds' ids: valid, and only the scratch row sees them.
            self.positions[n:bucket].copy_(self.ramp[:pad])
            self.write_rows[n:bucket].fill_(self.scratch_row)
            self.write_slots[n:bucket].copy_(self.ramp[:pad])
            self.parents[n:bucket].copy_(self.ramp[:pad] - 1)
        self.qo_indptr[-1:].fill_(bucket)

    def _record(self, bucket: int, tree: bool) -> _Bucket:
        """The graph's plan over the static tensors (which hold a valid round now) and the graph. The
        warm-up runs the current round itself, so its cache writes are the replay's own."""
        rnd = Round(self.tokens[:bucket], self.qo_indptr, self.parents[:bucket] if tree else None,
                    self.positions[:bucket], self.write_rows[:bucket], self.write_slots[:bucket], self.ramp[:0])
        plan = self.model.plan(self.cache, rnd, backend=self.backend)

        def forward() -> torch.Tensor:
            return self.model.logits(self.model.forward_planned(self.cache, rnd, plan, self.capture_layers, self.side))

        if not self.capture:
            return _Bucket(forward)
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = forward()
        return _Bucket(forward, graph, logits)

    @property
    def captured_buckets(self) -> tuple[int, ...]:
        return tuple(sorted({bucket for bucket, _ in self._captured}))
