"""The gateway's Prometheus metrics (its own registry, served on /metrics)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("streamer_gateway_requests", "HTTP requests answered, by "
                                "endpoint and status code", ["endpoint", "status"], registry=r)
        self.errors = Counter("streamer_gateway_errors", "Error answers by OpenAI error code",
                              ["code"], registry=r)
        self.ttft = Histogram("streamer_gateway_ttft_seconds", "From the HTTP request to its "
                              "first token reaching the gateway", ["endpoint"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("streamer_gateway_request_seconds", "From the HTTP request to "
                                  "its last byte", ["endpoint"], buckets=LATENCY_BUCKETS,
                                  registry=r)
        self.open_streams = Gauge("streamer_gateway_open_streams", "Generation requests open "
                                  "(streaming or waiting for their answer)", registry=r)
        self.cancels = Counter("streamer_gateway_cancels", "Cancels the gateway "
                               "published: the HTTP client left or the deadline passed", registry=r)
        self.ready_workers = Gauge("streamer_gateway_ready_workers", "Workers announcing "
                                   "ready on <prefix>.workers", registry=r)
        self.backlog = Gauge("streamer_gateway_lane_backlog", "Requests produced but not yet "
                             "committed by the workers, per lane", ["lane"], registry=r)
        self.batch_lines = Counter("streamer_gateway_batch_lines", "Batch lines finished, by "
                                   "outcome", ["outcome"], registry=r)

    def render(self, refresh: Callable[[], None] | None = None) -> bytes:
        if refresh is not None:
            refresh()
        return generate_latest(self.registry)
