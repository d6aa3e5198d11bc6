"""The gateway's Prometheus metrics, on a registry of its own, served at GET /metrics:
`bagel_gateway_requests_total{route, status}`, `bagel_gateway_request_seconds{route}` and
`bagel_gateway_streams_in_flight`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serving.service.metrics import LATENCY_BUCKETS


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "bagel_gateway_requests",
            "HTTP requests by route and final status (499: the client went away)",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "bagel_gateway_request_seconds",
            "Wall time of an HTTP request, to its last byte",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.streams_in_flight = Gauge(
            "bagel_gateway_streams_in_flight",
            "Server-sent event streams open now",
            registry=self.registry,
        )

    def page(self) -> bytes:
        return generate_latest(self.registry)
