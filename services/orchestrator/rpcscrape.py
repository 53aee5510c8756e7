"""Every service's gRPC calls, by service, method and code, for the node's metrics endpoint.

Each service counts the calls it answers (services/common/rpcmetrics.py) and hands the
counts out over the common Telemetry RPC. At each scrape the orchestrator asks every
service with a socket in its node's run directory, all at once and each with a short
timeout, and reports its own calls from memory. Why asked, not shared through files
(prometheus-client's multiprocess mode): the sockets are already how the services of a
node reach each other, as processes of one suite or as containers that share the run
directory (compose.yaml); they are per instance by construction, so two nodes on one host
never see each other's counts; and nothing is left on disk by processes that died.

A restarted service counts from zero again: its series drop, which Prometheus reads as a
counter reset (rate() and increase() carry on), and `weir_service_start_time_seconds`
says when each process started. A service that does not answer in time, or answers for
another instance, is left out of the scrape and counted in `weir_scrape_errors_total`.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from weir.common.v1 import telemetry_pb2 as pb
from weir.common.v1 import telemetry_pb2_grpc as pb_grpc

from services.common import rpcmetrics

log = structlog.get_logger("weir.orchestrator.metrics")

ASK_TIMEOUT = 1.0  # seconds a scrape waits for one service's counts (all are asked at once)
MAX_SERVICES = 32  # sockets asked per scrape; a run directory holds one per service


class ServiceRpcs:
    """Asks the node's services for their RPC counts; reports them with this process's own."""

    def __init__(self, run_dir: Path, instance: str, local: str) -> None:
        self._run_dir = run_dir
        self._instance = instance
        self._local = local

    def sockets(self) -> dict[str, Path]:
        """The services (other than this one) with a socket in the run directory, by name."""
        found = sorted(p for p in self._run_dir.glob("*.sock") if p.stem != self._local)
        return {p.stem: p for p in found[:MAX_SERVICES]}

    def families(self, failed: set[str]) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        """The families for one scrape; a service that did not answer is added to `failed`."""
        rpcs = CounterMetricFamily(
            "weir_rpc_requests",
            "gRPC calls each service of the node answered since its process started, by service, "
            "full method name and status code",
            labels=["service", "method", "code"],
        )
        starts = GaugeMetricFamily(
            "weir_service_start_time_seconds",
            "when each service's process started (Unix seconds); its RPC counts begin at zero then",
            labels=["service"],
        )
        answers = [(self._local, rpcmetrics.START_TIME, rpcmetrics.counts())]
        sockets = self.sockets()
        if sockets:
            with ThreadPoolExecutor(max_workers=len(sockets), thread_name_prefix="rpc-scrape") as pool:
                asked = list(pool.map(self._ask, sockets.items()))
            for service, reply in zip(sockets, asked, strict=True):
                if reply is None:
                    failed.add(service)
                    continue
                answers.append((service, reply.start_time_seconds, [(c.method, c.code, c.count) for c in reply.counts]))
        for service, started, counts in answers:
            starts.add_metric([service], started)
            for method, code, count in counts:
                rpcs.add_metric([service, method, code], count)
        return [rpcs, starts]

    def _ask(self, item: tuple[str, Path]) -> pb.RpcCounts | None:
        service, path = item
        try:
            with grpc.insecure_channel(f"unix://{path}") as channel:
                reply = pb_grpc.TelemetryStub(channel).GetRpcCounts(pb.GetRpcCountsRequest(), timeout=ASK_TIMEOUT)
        except grpc.RpcError as exc:
            log.debug("service did not give its rpc counts", service=service, code=exc.code().name)
            return None
        if (reply.service, reply.instance) != (service, self._instance):
            log.warning(
                "a socket in the run directory answered for another service or instance; left out",
                socket=str(path), service=reply.service, instance=reply.instance,
            )  # fmt: skip
            return None
        return reply
