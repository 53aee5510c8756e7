"""Counts of the gRPC calls a service answered, by method and status code.

The ErrorInterceptor (services/common/errors.py) knows every call's final code, so it
reports each one here. Counting is cheap (a dict increment under the client library's
lock), so every service counts whether or not anyone asks. Each service hands its counts
out over the common Telemetry RPC (services/common/telemetry.py); the orchestrator's
Prometheus endpoint asks every service of its node at each scrape, so one endpoint
carries every service's calls without a shared file or a second port per service.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter

REGISTRY = CollectorRegistry(auto_describe=True)
RPCS = Counter(
    "weir_rpc_requests",
    "gRPC calls this service answered, by full method name and status code",
    ["method", "code"],
    registry=REGISTRY,
)
# When this process began counting: a later start means its counts began again at zero.
START_TIME = time.time()


def observe(method: str, code: str) -> None:
    RPCS.labels(method=method, code=code).inc()


def counts() -> list[tuple[str, str, int]]:
    """(method, code, calls) for every pair seen since this process started, sorted."""
    out = []
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == "weir_rpc_requests_total":
                out.append((sample.labels["method"], sample.labels["code"], int(sample.value)))
    return sorted(out)
