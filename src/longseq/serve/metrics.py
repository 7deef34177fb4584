"""Prometheus metrics for the server, in a registry of its own so that many apps can live in one process."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from longseq.engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class _EngineCollector(Collector):
    """Reads the engine's state at scrape time, so the gauges are never stale."""

    def __init__(self, stats: Callable[[], dict[str, Any]], tokens_per_second: Callable[[], float]):
        self._stats = stats
        self._tokens_per_second = tokens_per_second

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield GaugeMetricFamily("longseq_num_requests_waiting", "Requests waiting for a slot", s.get("num_waiting", 0))
        yield GaugeMetricFamily("longseq_num_requests_running", "Requests being generated", s.get("num_running", 0))
        yield GaugeMetricFamily(
            "longseq_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1)", s.get("kv_cache_usage", 0.0)
        )
        yield CounterMetricFamily(
            "longseq_num_preemptions", "Requests preempted to free KV cache blocks", s.get("num_preempted", 0)
        )
        yield GaugeMetricFamily(
            "longseq_generation_tokens_per_second",
            "Generated tokens per second over the last few seconds",
            self._tokens_per_second(),
        )


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict[str, Any]], window_s: float = 10.0):
        self.registry = CollectorRegistry()
        self.prompt_tokens = Counter(
            "longseq_prompt_tokens", "Prompt tokens of finished requests", registry=self.registry
        )
        self.generation_tokens = Counter("longseq_generation_tokens", "Generated tokens", registry=self.registry)
        self.requests = Counter(
            "longseq_requests", "Finished requests", ["finish_reason"], registry=self.registry
        )
        self.ttft = Histogram(
            "longseq_time_to_first_token_seconds", "Arrival to first output token", buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "longseq_time_per_output_token_seconds", "Mean time between output tokens of a request",
            buckets=_TPOT_BUCKETS, registry=self.registry,
        )
        self.e2e = Histogram(
            "longseq_e2e_request_latency_seconds", "Arrival to last output token", buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent generation
        self._started = time.monotonic()
        self.registry.register(_EngineCollector(stats, self._tokens_per_second))

    def _tokens_per_second(self) -> float:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - self._window_s:
            self._recent.popleft()
        # A server younger than the window would otherwise report a rate that is too low.
        span = min(self._window_s, max(now - self._started, 1e-3))
        return sum(n for _, n in self._recent) / span

    def add_generated(self, n: int) -> None:
        if n > 0:
            self.generation_tokens.inc(n)
            self._recent.append((time.monotonic(), n))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """One request's timings and token counts, reported to the metrics once when it ends."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int, arrival: float | None = None):
        """arrival: time.monotonic() when the request came in (default: now)."""
        self._m = metrics
        self._prompt = num_prompt_tokens
        self.arrival = time.monotonic() if arrival is None else arrival
        self.first_token: float | None = None
        self.num_generated = 0
        self.done = False

    def on_output(self, out: RequestOutput) -> None:
        new = len(out.token_ids) - self.num_generated
        if new > 0:
            if self.first_token is None:
                self.first_token = time.monotonic()
                self._m.ttft.observe(self.first_token - self.arrival)
            self.num_generated = len(out.token_ids)
            self._m.add_generated(new)

    def finish(self, finish_reason: str | None) -> None:
        if self.done:
            return
        self.done = True
        end = time.monotonic()
        self._m.prompt_tokens.inc(self._prompt)
        self._m.requests.labels(finish_reason=finish_reason or "unknown").inc()
        self._m.e2e.observe(end - self.arrival)
        if self.first_token is not None and self.num_generated > 1:
            self._m.tpot.observe((end - self.first_token) / (self.num_generated - 1))
