"""Counts of the gRPC calls a service answered, by method and status code.

The ErrorInterceptor (services/common/errors.py) knows every call's final code, so it
reports each one here; a service that serves Prometheus metrics (the orchestrator's
`--metrics-listen`) exports this registry beside its own. Counting is cheap (a dict
increment under the client library's lock), so every service counts whether or not it
exports.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

REGISTRY = CollectorRegistry(auto_describe=True)
RPCS = Counter(
    "weir_rpc_requests",
    "gRPC calls this service answered, by full method name and status code",
    ["method", "code"],
    registry=REGISTRY,
)


def observe(method: str, code: str) -> None:
    RPCS.labels(method=method, code=code).inc()
