"""Prometheus metrics of the server, in a registry of its own (several servers in one process, as in
the tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily


class ServerMetrics:
    def __init__(self, loop_ref):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dspark_requests", "finished HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("dspark_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("dspark_generated_tokens", "tokens returned to clients", registry=r)
        self.request_rounds = Counter("dspark_request_rounds", "engine rounds of finished requests", registry=r)
        self.request_emitted = Counter("dspark_request_emitted", "tokens emitted by those rounds", registry=r)
        self.latency = Histogram("dspark_request_seconds", "time from admission to the last token",
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        self.queue = Gauge("dspark_queue_depth", "requests waiting for a cache row", registry=r)
        self.running = Gauge("dspark_running_requests", "requests in the engine's batch", registry=r)
        self.queue.set_function(lambda: loop_ref().waiting() if loop_ref() else 0)
        self.running.set_function(lambda: loop_ref().running() if loop_ref() else 0)
        r.register(_EngineCollector(loop_ref))

    def finished(self, request, elapsed: float) -> None:
        self.prompt_tokens.inc(len(request.prompt))
        self.generated_tokens.inc(len(request.generated))
        self.request_rounds.inc(request.stats.rounds)
        self.request_emitted.inc(request.stats.emitted)
        self.latency.observe(elapsed)


class _EngineCollector:
    """The engine's own counters, read at scrape time: prefill/draft/verify seconds, rounds, tau,
    acceptance by draft position, and the verification budget (draft nodes verified per round)."""

    def __init__(self, loop_ref):
        self.loop_ref = loop_ref

    def collect(self):
        loop = self.loop_ref()
        if loop is None:
            return
        stats = loop.engine.stats
        seconds = GaugeMetricFamily("dspark_engine_seconds", "engine time by phase", labels=["phase"])
        for phase, value in (("prefill", stats.prefill_time), ("draft", stats.draft_time),
                             ("verify", stats.verify_time)):
            seconds.add_metric([phase], value)
        yield seconds
        yield GaugeMetricFamily("dspark_engine_rounds", "decoding rounds run", value=stats.rounds)
        totals = loop.totals
        tau = totals["emitted"] / totals["rounds"] if totals["rounds"] else 0.0
        yield GaugeMetricFamily("dspark_tau", "tokens emitted per round over finished requests", value=tau)
        budget = totals["verified"] / totals["rounds"] if totals["rounds"] else 0.0
        yield GaugeMetricFamily("dspark_verification_budget", "draft nodes verified per request-round",
                                value=budget)
        acceptance = GaugeMetricFamily("dspark_acceptance", "acceptance of draft position k given 1..k-1",
                                       labels=["position"])
        for k, (accepted, attempts) in enumerate(zip(totals["accepted"], totals["attempts"]), start=1):
            acceptance.add_metric([str(k)], accepted / attempts if attempts else 0.0)
        yield acceptance
