"""Prometheus metrics of the ranking service (``GET /metrics``), in a registry of their own.

Names (all prefixed ``recsys_serve_``): ``requests_total{endpoint,status}``,
``request_latency_seconds{endpoint}`` (histogram), ``batch_size`` (requests per scoring batch, histogram),
``batch_candidates`` (histogram), ``batch_seconds{variant}`` (histogram), ``queue_depth`` and
``queue_predicted_ms`` (gauges), ``variant_requests_total{variant,degraded}``, ``variant_selected{variant}``
(1 for the SLO choice), ``ms_per_candidate{variant}`` (gauge), ``rejections_total{reason}``
(``overloaded``, ``invalid``, ``malformed_json``, ``too_large``, ``not_implemented``). One replica serves
one registry: with more replicas, scrape each replica or aggregate Ray's own metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CANDIDATE_BUCKETS = (1, 10, 50, 100, 200, 400, 800, 1600, 3200)
KNOWN_ENDPOINTS = ("/rank", "/recommend", "/healthz", "/metrics", "/profile", "/openapi.json", "/docs")


class ServingMetrics:
    """The service's metric objects; :meth:`render` gives the Prometheus text format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, variants: list[str], selected: str | None):
        self.registry = r = CollectorRegistry()
        p = "recsys_serve_"
        self.requests = Counter(p + "requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)  # fmt: skip
        self.latency = Histogram(p + "request_latency_seconds", "server-side request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch_size = Histogram(p + "batch_size", "requests per scoring batch", buckets=SIZE_BUCKETS, registry=r)
        self.batch_candidates = Histogram(p + "batch_candidates", "candidates per scoring batch",
                                          buckets=CANDIDATE_BUCKETS, registry=r)  # fmt: skip
        self.batch_seconds = Histogram(p + "batch_seconds", "model time per scoring batch and variant", ["variant"],
                                       buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue_depth = Gauge(p + "queue_depth", "admitted /rank requests not yet answered", registry=r)
        self.queue_ms = Gauge(p + "queue_predicted_ms", "predicted work of the admitted requests (ms)", registry=r)
        self.variant_requests = Counter(p + "variant_requests_total", "/rank requests served per variant",
                                        ["variant", "degraded"], registry=r)  # fmt: skip
        self.variant_selected = Gauge(p + "variant_selected", "1 for the variant the SLO logic chose", ["variant"],
                                      registry=r)  # fmt: skip
        self.ms_per_candidate = Gauge(p + "ms_per_candidate", "running cost per candidate (ms)", ["variant"],
                                      registry=r)  # fmt: skip
        self.rejections = Counter(p + "rejections_total", "requests refused, by reason", ["reason"], registry=r)
        for v in variants:
            self.variant_selected.labels(v).set(1 if v == selected else 0)

    @staticmethod
    def endpoint(path: str) -> str:
        """Bounded label values: known paths, else "other"."""
        return path if path in KNOWN_ENDPOINTS else "other"

    def render(self) -> bytes:
        return generate_latest(self.registry)
