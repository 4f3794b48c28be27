"""Prometheus metrics of the API: request latency, jobs by state, queue depths, circuits executed.

Each app gets its own registry (tests build many apps in one process). Latency is labelled by the route's
template (`/v1/jobs/{job_id}`), never the raw path, so ids do not explode the label set. The gauges are read
from the store and the broker at scrape time, so every API replica reports the same numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.store import Store

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class StoreCollector(Collector):
    def __init__(self, store: Callable[[], Store], queue_depths: Callable[[], dict[str, int]]):
        self._store = store
        self._queue_depths = queue_depths

    def collect(self) -> Iterator[Metric]:
        store = self._store()
        jobs = GaugeMetricFamily("qaa_jobs", "Jobs in the store by state.", labels=["state"])
        for state, count in store.count_jobs_by_status().items():
            jobs.add_metric([state], count)
        yield jobs
        depth = GaugeMetricFamily("qaa_queue_depth", "Task messages waiting in each broker queue.", labels=["queue"])
        for queue, count in self._queue_depths().items():
            depth.add_metric([queue], count)
        yield depth
        circuits = CounterMetricFamily("qaa_circuits_executed", "Quantum circuits executed by all jobs.")
        circuits.add_metric([], store.circuits_executed())
        yield circuits


def new_registry() -> tuple[CollectorRegistry, Histogram]:
    registry = CollectorRegistry()
    latency = Histogram(
        "qaa_http_request_duration_seconds",
        "API request latency by route template, method and status.",
        ["method", "route", "status"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )
    return registry, latency


class LatencyMiddleware:
    """Pure ASGI middleware (no response buffering, so streamed downloads stay streamed)."""

    def __init__(self, app: ASGIApp, histogram: Histogram):
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.histogram.labels(scope["method"], template, str(status)).observe(time.perf_counter() - start)
