"""``/metrics``: Prometheus text from a registry of the server's own (one per app, so tests can run several).

Request, token and latency figures are counted by the server as it answers; queue depth, running rows
and the rows per decode step are read from the engine at scrape time (``stats()``, when the engine has
one), so they are the scheduler's own numbers, not samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineCollector(Collector):
    def __init__(self, engine: Any):
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        stats_of = getattr(self._engine, "stats", None)
        if stats_of is None:
            return
        stats = stats_of()
        yield GaugeMetricFamily("lorabot_engine_queue_depth", "Requests waiting for the engine's batch",
                                value=stats.get("queued", 0))
        yield GaugeMetricFamily("lorabot_engine_running_rows", "Generations in the engine's running batch",
                                value=stats.get("running_rows", 0))
        yield CounterMetricFamily("lorabot_engine_decode_steps", "Decode steps the engine ran",
                                  value=stats.get("decode_steps", 0))
        sizes: dict[int, int] = stats.get("decode_batch_sizes", {})
        limit = max([stats.get("max_batch", 16), *sizes, 1])
        edges, edge = [], 1
        while edge < limit:
            edges.append(edge)
            edge *= 2
        edges.append(edge)
        buckets = [(str(float(e)), sum(n for rows, n in sizes.items() if rows <= e)) for e in edges]
        buckets.append(("+Inf", sum(sizes.values())))
        yield HistogramMetricFamily(
            "lorabot_engine_decode_batch_rows", "Rows decoded together in one step (requests sharing a batch)",
            buckets=buckets, sum_value=sum(rows * n for rows, n in sizes.items()),
        )


class Metrics:
    def __init__(self, engine: Any):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorabot_http_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram("lorabot_request_seconds", "Time to the complete answer", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("lorabot_time_to_first_token_seconds", "Time to a stream's first text",
                                     ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("lorabot_tokens", "Prompt and generated tokens", ["kind", "model"], registry=r)
        self.in_flight = Gauge("lorabot_requests_in_flight", "Model requests the server is answering", registry=r)
        self.rejected = Counter("lorabot_requests_rejected", "Requests refused before reaching the model",
                                ["reason"], registry=r)
        self.cancelled = Counter("lorabot_requests_cancelled", "Model requests stopped because the client left",
                                 ["endpoint"], registry=r)
        r.register(EngineCollector(engine))

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        self.tokens.labels("prompt", model).inc(prompt)
        self.tokens.labels("completion", model).inc(completion)

    def render(self) -> bytes:
        return generate_latest(self.registry)
