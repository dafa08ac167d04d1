"""The decoding cycle: prefill -> draft -> schedule -> verify -> accept -> rollback (DESIGN.md).

Requests share one KV cache, a row each. Every round flattens the running requests' anchors and
admitted drafts into one tree_attention pass of the target; rejection_sample decides what each keeps
and kv_rollback compacts the cache. With no drafter the same loop is plain autoregressive decoding,
the baseline of every speedup.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from dspark import ops
from dspark.batch import RowState, build_round, draft_probs_rows, outputs_to_host
from dspark.cache import KVCache, SideCache
from dspark.drafters.base import Drafter, Proposal
from dspark.models.target import TargetModel
from dspark.request import Event, Request  # noqa: F401 (Request, Event: re-exported)
from dspark.round_graphs import RoundGraphs
from dspark.sampling_params import SamplingParams
from dspark.scheduler import FixedLength, VerificationPolicy
from dspark.stats import RunStats


class Engine:
    def __init__(self, model: TargetModel, tokenizer=None, drafter=None, policy=None, max_batch: int = 8,
                 max_seq_len: int = 2048, block_size: int | None = None, max_prefill_tokens: int = 512,
                 cuda_graphs: bool = False):
        """policy: how many draft nodes each request verifies; default FixedLength(drafter.num_draft). The
        DSpark prefix scheduler needs the target's SPS curve: measure it explicitly
        (`PrefixScheduler(dspark.profiling.load_or_measure_sps(model, tokens))`, cached on disk).
        max_prefill_tokens: prompt tokens per step. Whole prompts share a step while they fit; a longer
        one is prefilled in chunks of this size over its cached prefix. Running requests decode between
        chunks, and a bounded prefill keeps its activations in cache: on the 2-core CPU one 7,538-token
        prefill of 64 prompts ran at 348 tokens/s, steps of 512 tokens at 473. A drafter's own pass over
        a new prompt (its context) is not chunked: it runs whole at the request's first proposal.
        cuda_graphs: decoding and verification rounds replay CUDA graphs per padded token-count bucket
        (dspark.round_graphs; the cache gets one more row, for padding). On CPU, where there are no
        graphs, the same padded rounds run eagerly: a dry run of the captured path."""
        if not isinstance(model, TargetModel):
            raise TypeError(f"model must be a dspark.models.TargetModel (LlamaModel, HFCausalLM or your own), "
                            f"got {type(model).__name__}")
        c = model.config
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        self.max_prefill_tokens = max_prefill_tokens
        if drafter is not None and not isinstance(drafter, Drafter):
            raise TypeError(f"drafter must be a dspark.drafters.Drafter, got {type(drafter).__name__}")
        if policy is not None and not isinstance(policy, VerificationPolicy):
            raise TypeError(f"policy must be a dspark.scheduler.VerificationPolicy, got {type(policy).__name__}")
        self.model, self.tokenizer, self.drafter = model, tokenizer, drafter
        self.policy = policy or FixedLength(drafter.num_draft if drafter is not None else 0)
        self.max_seq_len = max_seq_len
        rows = max_batch + 1 if cuda_graphs else max_batch  # the last one pads graph rounds, holds no request
        self.cache = KVCache(c.num_layers, rows, max_seq_len, c.num_kv_heads, c.head_dim, model.dtype,
                             model.device, block_size=block_size)
        # Drafters conditioned on the target (DSpark) name the layers whose residual stream they read;
        # those hidden states are kept per committed token in a side cache as long as the K/V (it shares
        # their lengths), rolled back like them, and read by the drafter when it needs them.
        self.capture_layers = tuple(drafter.capture_layers) if drafter is not None else ()
        self.hidden_cache = SideCache(rows, max_seq_len, c.hidden_size * len(self.capture_layers), model.dtype,
                                      model.device, seqlens=self.cache.seqlens) if self.capture_layers else None
        if drafter is not None:
            drafter.bind(rows, max_seq_len, c.vocab_size, self.hidden_cache)
        eos = set(c.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = eos
        self.waiting: list[Request] = []
        self.prefilling: list[Request] = []  # hold cache rows, prompt not wholly cached yet, in admission order
        # One request order for every op of a round: the cache's rows. by_row[row] is the request there.
        self.by_row: list[Request | None] = [None] * rows
        self.rows = RowState(rows, model.device)
        self.sampler = ops.plan_rejection_sample(model.device)
        self.free_rows = list(range(max_batch - 1, -1, -1))
        self.next_id = 0
        self.finished: dict[int, Request] = {}
        self.stats = RunStats()
        self._drafted = False  # whether the current round asked the drafter for anything
        self._captured_now = False  # whether this round captured a graph (its time is no round's)
        self.graphs = RoundGraphs(model, self.cache, self.capture_layers, self.hidden_cache) if cuda_graphs else None

    # -- requests ---------------------------------------------------------------------------------
    def add_request(self, prompt: list[int] | str, params: SamplingParams | None = None) -> int:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs the engine's tokenizer")
            prompt = self.tokenizer(prompt).input_ids
        prompt = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if not prompt:
            raise ValueError("prompt is empty")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_seq_len {self.max_seq_len}")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need the engine's tokenizer")
        request = Request(self.next_id, prompt, params)
        self.next_id += 1
        self.waiting.append(request)
        return request.id

    def abort(self, request_id: int) -> bool:
        """Drop a waiting or running request between rounds (a client went away): its cache row and
        drafter state are freed, it is finished with finish_reason "abort". False if it is not here."""
        for r in self.waiting:
            if r.id == request_id:
                self.waiting.remove(r)
                r.finish_reason = "abort"
                self.finished[r.id] = r
                return True
        for r in self.prefilling:
            if r.id == request_id:
                self.prefilling.remove(r)
                r.finish_reason = "abort"
                self._release_row(r)
                self.finished[r.id] = r
                return True
        for r in self.running:
            if r.id == request_id:
                r.finish_reason = "abort"
                self._retire_finished()
                return True
        return False

    @property
    def running(self) -> list[Request]:
        """The requests holding cache rows, in row order."""
        return [r for r in self.by_row if r is not None]

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    # -- one engine step ----------------------------------------------------------------------------
    def step(self) -> list[Event]:
        self._retire_finished()  # requests an earlier step finished before it failed
        events = self._prefill_waiting()
        if self.running:
            events += self._decode_round()
        return events

    def _prefill_waiting(self) -> list[Event]:
        chunks: list[tuple[Request, int]] = []
        try:
            chunks = self._plan_prefill(chunks)
            return self._prefill(chunks) if chunks else []
        except BaseException:
            # Nothing of this step's requests may stay half-prefilled: their rows (and blocks) go back, they
            # end as "error" (in `finished`), and the caller sees the exception.
            for r, _ in chunks:
                if r in self.prefilling:
                    self.prefilling.remove(r)
                if r not in self.running:
                    r.finish_reason = "error"
                    self._release_row(r)
                    self.finished[r.id] = r
            raise

    def _plan_prefill(self, chunks: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
        """(request, prompt tokens to prefill now) within max_prefill_tokens: a prompt under way goes on
        first; then waiting ones take free rows while their whole prompts fit, or the first one, in
        chunks, when nothing else is in the step (so a step's rows are mostly fresh: plain causal prefills)."""
        budget = self.max_prefill_tokens
        for r in self.prefilling:
            n = min(len(r.prompt) - r.prefilled, budget)
            if n == 0:
                break
            chunks.append((r, n))
            budget -= n
        while self.waiting and self.free_rows and budget > 0:
            request = self.waiting[0]
            if len(request.prompt) > budget and chunks:
                break
            self.waiting.pop(0)
            request.row = self.free_rows.pop()
            request.tokens = list(request.prompt)
            self.prefilling.append(request)
            n = min(len(request.prompt), budget)
            chunks.append((request, n))
            self.cache.reserve(request.row, len(request.prompt) + request.params.max_tokens)
            budget -= n
        return chunks

    def _prefill(self, chunks: list[tuple[Request, int]]) -> list[Event]:
        chunks = sorted(chunks, key=lambda c: c[0].row)  # the round's order: rows ascending
        start = time.perf_counter()
        rnd = build_round(self.cache.rows, [(r.row, r.prompt[r.prefilled: r.prefilled + n], None) for r, n in chunks],
                          self.cache.seqlens.tolist(), self.model.device, prefill=True)
        hidden = self._forward(rnd)
        for r, n in chunks:
            r.prefilled += n
            self.cache.seqlens[r.row] = r.prefilled
        done = [i for i, (r, _) in enumerate(chunks) if r.prefilled == len(r.prompt)]
        admitted = [chunks[i][0] for i in done]
        events = []
        if admitted:
            logits = self.model.logits(hidden[rnd.last_index[done]])
            for r in admitted:
                self.prefilling.remove(r)
                self.rows.join(r.row, r.params, r.rounds)
            # One node (the prompt's last token) per finished prompt, rows in order.
            counts = torch.zeros(self.cache.rows, dtype=torch.int32)
            counts[[r.row for r in admitted]] = 1
            qo_indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0, dtype=torch.int32)]).to(self.model.device)
            anchors = torch.tensor([r.prompt[-1] for r in admitted], dtype=torch.int64, device=self.model.device)
            _, _, tokens = self._verify(logits, qo_indptr, anchors, None, 1, None, None)
            for r in admitted:
                r.rounds += 1
                events.append(self._emit(r, [int(tokens[r.row, 0])]))
                if r.finish_reason is None and self.drafter is not None:
                    self.drafter.start(r)
                self.by_row[r.row] = r  # running only once the drafter holds its state
        self.stats.prefill_time += time.perf_counter() - start
        self.stats.prompt_tokens += sum(n for _, n in chunks)
        self._retire_finished()
        return events

    def _decode_round(self) -> list[Event]:
        requests = self.running
        start = time.perf_counter()
        proposals = self._propose(requests)
        lengths = self.policy.choose(requests, proposals)
        proposals = [p.truncated(min(n, r.params.max_tokens - len(r.generated) - 1))
                     for r, p, n in zip(requests, proposals, lengths)]
        drafted = time.perf_counter()
        nodes = [[r.tokens[-1]] + p.tokens for r, p in zip(requests, proposals)]
        parents = [None if p.parents is None else [-1] + p.parents for p in proposals]
        rnd = build_round(self.cache.rows, [(r.row, n, pa) for r, n, pa in zip(requests, nodes, parents)],
                          self.cache.seqlens.tolist(), self.model.device)
        # Rows are in the round's order and idle rows have no tokens: every logits row is a running node, and
        # the round's own tokens and parents are the nodes' (chains get local parents in a tree round).
        probs = draft_probs_rows(requests, proposals, nodes, self.model.config.vocab_size, self.model.device)
        path_nodes, counts, emitted = self._verify(self._round_logits(rnd), rnd.qo_indptr, rnd.tokens, rnd.parents,
                                                   max(len(n) for n in nodes), *probs)
        self._rollback(path_nodes, counts)
        verified = time.perf_counter()
        self.stats.draft_time += drafted - start
        self.stats.verify_time += verified - drafted
        self.stats.rounds += 1
        if not self._captured_now:  # a capture's time says nothing of the round's
            self.policy.observe_round(len(requests), self._drafted, int(counts.sum()),
                                      verified - start, self._draft_sources)
        events, paths = [], []
        for r, proposal, node_parents in zip(requests, proposals, parents):
            m = int(counts[r.row])
            paths.append(path_nodes[r.row, :m].tolist())
            r.rounds += 1
            r.verified = len(proposal.tokens)
            r.stats.record_round(len(proposal.tokens), m - 1, node_parents)
            events.append(self._emit(r, emitted[r.row, :m].tolist()))
        if self.drafter is not None:
            self.drafter.accept(requests, paths)
        self._retire_finished()
        return events

    def _round_logits(self, rnd) -> torch.Tensor:
        self._captured_now = False
        if self.graphs is not None and self.graphs.applies(rnd):
            logits = self.graphs.logits(rnd)
            self._captured_now = self.graphs.recorded_last
            return logits
        return self.model.logits(self._forward(rnd))

    def _forward(self, rnd) -> torch.Tensor:
        """The target over the round; the drafter's captured layers go straight into the side cache."""
        if self.hidden_cache is None:
            return self.model.forward(self.cache, rnd)[0]
        return self.model.forward_capturing(self.cache, rnd, self.capture_layers, self.hidden_cache)

    def _verify(self, logits: torch.Tensor, qo_indptr: torch.Tensor, tokens: torch.Tensor,
                parents: torch.Tensor | None, max_nodes: int, draft_probs, draft_vocab):
        """rejection_sample over every cache row (idle ones have n_r = 0) with the rows' persistent
        sampling state: the round's flat tokens and local parents (None: chains) on the device; the
        outputs, row-indexed, come back to the host once."""
        s = self.rows
        path_nodes, counts, emitted = self.sampler.run(
            logits, tokens, qo_indptr, parents, draft_probs, s.temperature, s.top_k, s.top_p, s.seed, s.offset,
            max_nodes, draft_vocab)
        s.advance(qo_indptr)
        return (path_nodes, counts, emitted) if path_nodes.device.type == "cpu" else \
            outputs_to_host(path_nodes, counts, emitted)

    def _propose(self, requests: list[Request]) -> list[Proposal]:
        """Drafts of the requests the policy wants drafted (all, unless it has should_draft)."""
        self._drafted, self._draft_sources = False, ()
        if self.drafter is None or not self.policy.may_draft(len(requests)):
            return [Proposal([]) for _ in requests]
        sources = [self.drafter.source_for(r) for r in requests]
        wanted = self.policy.should_draft(requests, sources)
        self._drafted = any(wanted)
        self._draft_sources = tuple(sorted({s for s, w in zip(sources, wanted) if w}))
        drafting = [r for r, w in zip(requests, wanted) if w]
        if not drafting:
            return [Proposal([]) for _ in requests]
        limit = self.max_draft_for(drafting)
        # The floor holds for proposals of at most min(limit, num_draft) nodes: none for a drafter that states no
        # num_draft (the base class's 0).
        most = min(limit, self.drafter.num_draft)
        floor = self.policy.survival_floor(len(requests), most) if most > 0 else 0.0
        drafted = iter(self.drafter.propose_pruned(drafting, limit, floor))
        return [next(drafted) if w else Proposal([]) for w in wanted]

    def max_draft_for(self, requests: list[Request]) -> int:
        """Drafts never outgrow any request's cache row nor what the policy verifies; each request's token
        budget is applied to its own proposal afterwards (a round emits at most drafts + 1 tokens)."""
        cache_room = min(self.max_seq_len - len(r.tokens) for r in requests)
        token_room = max(r.params.max_tokens - len(r.generated) for r in requests)
        cap = self.policy.most_nodes()
        return max(0, min(cache_room, token_room - 1, cache_room if cap is None else cap))

    def _rollback(self, path_nodes: torch.Tensor, counts: torch.Tensor) -> None:
        """kv_rollback on the row-indexed outputs (idle rows accepted nothing and stay as they are)."""
        width = path_nodes.shape[1]
        device = self.cache.seqlens.device
        prefix = width == 1  # one node per row (no drafts this round) is a prefix by construction
        if not prefix:
            columns = torch.arange(width)
            prefix = bool(((path_nodes == columns) | (columns >= counts[:, None])).all())
        if prefix:
            # Every accepted path is the prefix 0..m-1 (plain decoding, fully accepted chains): kv_rollback
            # would move nothing and only advance the lengths (the side cache's are the same tensor).
            self.cache.seqlens += counts.to(device, torch.int32)
            return
        path_nodes, counts = path_nodes.to(device), counts.to(device)
        if self.hidden_cache is not None:  # first: it reads the lengths the KV rollback advances
            self.hidden_cache.rollback(path_nodes, counts)
        self.cache.rollback(path_nodes, counts)

    # -- emission and stopping ----------------------------------------------------------------------
    def _emit(self, r: Request, tokens: list[int]) -> Event:
        new = []
        for token in tokens:
            r.tokens.append(token)
            if token in r.params.stop_token_ids or (token in self.eos_ids and not r.params.ignore_eos):
                r.finish_reason = "stop"
                break
            r.generated.append(token)
            new.append(token)
            if r.params.stop_strings and self._hit_stop_string(r):
                break
            if len(r.generated) >= r.params.max_tokens:
                r.finish_reason = "length"
                break
        self.stats.generated_tokens += len(new)
        return Event(r.id, new, r.finish_reason is not None)

    def _hit_stop_string(self, r: Request) -> bool:
        text = self.tokenizer.decode(r.generated)
        for stop in r.params.stop_strings:
            at = text.find(stop)
            if at >= 0:
                r.text, r.finish_reason = text[:at], "stop"
                return True
        return False

    def _release_row(self, r: Request) -> None:
        """The request's cache row (and blocks, and side-cache length) back to the free list."""
        self.by_row[r.row] = None
        self.rows.leave(r.row)
        self.cache.free(r.row)
        self.free_rows.append(r.row)

    def _retire_finished(self) -> None:
        for r in [r for r in self.running if r.finish_reason is not None]:
            if self.drafter is not None:
                self.drafter.finish(r)
            self._release_row(r)
            if self.tokenizer is not None and not r.text:
                r.text = self.tokenizer.decode(r.generated)
            self.finished[r.id] = r

    # -- convenience --------------------------------------------------------------------------------
    def stream(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None) -> Iterator[Event]:
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        for prompt, p in zip(prompts, params_list):
            self.add_request(prompt, p)
        start = time.perf_counter()
        while self.has_work():
            yield from self.step()
        self.stats.wall_time += time.perf_counter() - start

    def generate(self, prompts: list, params=None, on_event: Callable[[Event], None] | None = None) -> list[Request]:
        """Runs the prompts to completion; returns their finished requests in prompt order."""
        first_id = self.next_id
        for event in self.stream(prompts, params):
            if on_event is not None:
                on_event(event)
        return [self.finished.pop(first_id + i) for i in range(len(prompts))]
