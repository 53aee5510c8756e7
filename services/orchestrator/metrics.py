"""The node's Prometheus endpoint (`--metrics-listen HOST:PORT`, off by default).

One endpoint per node, served by the orchestrator with prometheus-client's HTTP server
in a thread of its own. Every scrape reads the datapath as it is then (a custom
collector, nothing cached): the per-CPU drop and forward counters by reason and
direction, the entry programs' packets by hook, what became of the events of each kind
(emitted, rate-limited, sampled out, lost), conntrack entries and the fill level of the
node's maps; the policy verdicts by endpoint that the flows counted; the load balancer's
counters per service and backend and the prefilter's per interface and entry, asked of
those services over their sockets (left out, with `weir_scrape_errors` counting it, when
one does not answer); and the gRPC calls every service of the node answered, by service,
method and code (services/orchestrator/rpcscrape.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from weir.common.v1 import common_pb2
from weir.lb.v1 import lb_pb2, lb_pb2_grpc
from weir.prefilter.v1 import prefilter_pb2, prefilter_pb2_grpc

from services.orchestrator.chain import Chain
from services.orchestrator.eventlimits import EventLimits
from services.orchestrator.flows import Flows
from services.orchestrator.mapfill import MapFill
from services.orchestrator.rpcscrape import ServiceRpcs

PEER_TIMEOUT = 2.0  # seconds a scrape waits for the lb or prefilter service
MAX_SERVICES = 1000  # LB services asked for counters per scrape
PAGE = 500
MAX_PREFILTER_ENTRIES = 1000  # a deny list of a million entries must not make a million series


def parse_listen(value: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [addr]:port) -> (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"--metrics-listen must be HOST:PORT with a port in 1-65535, got {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--metrics-listen: {host!r} is not an IP address") from None
    return host, int(port)


class NodeCollector(Collector):
    """Reads the node's counters at each scrape."""

    def __init__(
        self,
        chain: Chain,
        limits: EventLimits,
        flows: Flows,
        fill: MapFill,
        socket_path: Callable[[str], Path],
        rpcs: ServiceRpcs,
        caught_up: Callable[[], None] | None = None,
    ) -> None:
        """caught_up (EventHub.wait_caught_up) makes a scrape count the events of traffic sent before it."""
        self._chain, self._limits, self._flows = chain, limits, flows
        self._caught_up = caught_up
        self._fill = fill
        self._socket_path = socket_path
        self._rpcs = rpcs
        self._scrape_errors: dict[str, int] = {}

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        if self._caught_up is not None:
            self._caught_up()
        yield from self._datapath()
        yield from self._events()
        yield from self._policy_verdicts()
        yield from self._maps_fill()
        failed: set[str] = set()  # services this scrape could not ask, each counted once
        yield from self._asked("lb", self._lb, failed)
        yield from self._asked("prefilter", self._prefilter, failed)
        yield from self._rpcs.families(failed)
        for service in failed:
            self._scrape_errors[service] = self._scrape_errors.get(service, 0) + 1
        errors = CounterMetricFamily(
            "weir_scrape_errors", "scrapes that could not ask a service for its counters", labels=["service"]
        )
        for service, count in sorted(self._scrape_errors.items()):
            errors.add_metric([service], count)
        yield errors

    def _datapath(self) -> Iterable[CounterMetricFamily]:
        packets = CounterMetricFamily(
            "weir_datapath_packets",
            "packets that left the chain, by reason (FORWARDED, or why it was dropped) and direction",
            labels=["reason", "direction"],
        )
        nbytes = CounterMetricFamily(
            "weir_datapath_bytes", "bytes of the packets in weir_datapath_packets", labels=["reason", "direction"]
        )
        for r in self._chain.reason_counts():
            reason = r.reason.name if hasattr(r.reason, "name") else str(r.reason)
            labels = [reason, r.direction.name]
            packets.add_metric(labels, r.packets)
            nbytes.add_metric(labels, r.bytes)
        hooks = CounterMetricFamily("weir_hook_packets", "packets seen by each hook's entry program", labels=["hook"])
        for hook, (count, _) in self._chain.entry_counts().items():
            hooks.add_metric([hook.name], count)
        return [packets, nbytes, hooks]

    def _events(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        events = CounterMetricFamily(
            "weir_datapath_events",
            "the datapath's events by kind and outcome: emitted, rate_limited, sampled_out, lost (ring buffer full)",
            labels=["kind", "outcome"],
        )
        for k in self._limits.stats():
            for outcome, value in (
                ("emitted", k.emitted), ("rate_limited", k.limited), ("sampled_out", k.sampled_out), ("lost", k.lost),
            ):  # fmt: skip
                events.add_metric([k.kind, outcome], value)
        flows = CounterMetricFamily(
            "weir_flows", "flows the orchestrator made, and those it could not keep or deliver", labels=["outcome"]
        )
        flows.add_metric(["seen"], self._flows.seen)
        flows.add_metric(["evicted"], self._flows.evicted)
        flows.add_metric(["subscriber_dropped"], self._flows.subscriber_dropped)
        return [events, flows]

    def _policy_verdicts(self) -> Iterable[CounterMetricFamily]:
        verdicts = CounterMetricFamily(
            "weir_policy_verdicts",
            "policy verdicts by endpoint, direction and verdict, from the datapath's events (so within "
            "the event rate limits; weir_datapath_packets has every packet)",
            labels=["endpoint", "direction", "verdict"],
        )
        for (endpoint, direction, verdict), count in sorted(self._flows.policy_verdicts.copy().items()):
            verdicts.add_metric([endpoint, direction, verdict], count)
        return [verdicts]

    def _maps_fill(self) -> Iterable[GaugeMetricFamily]:
        entries = GaugeMetricFamily("weir_map_entries", "entries in the node's maps", labels=["map"])
        capacity = GaugeMetricFamily("weir_map_capacity", "the node's maps' max_entries", labels=["map"])
        conntrack = GaugeMetricFamily("weir_conntrack_entries", "entries in the node's conntrack map")
        for fill in self._fill.read():
            entries.add_metric([fill.name], fill.entries)
            capacity.add_metric([fill.name], fill.capacity)
            if fill.name == "conntrack":
                conntrack.add_metric([], fill.entries)
        return [entries, capacity, conntrack]

    def _asked(
        self, service: str, ask: Callable[[grpc.Channel], list[CounterMetricFamily]], failed: set[str]
    ) -> Iterable[CounterMetricFamily]:
        path = self._socket_path(service)
        if not path.exists():
            return []
        try:
            with grpc.insecure_channel(f"unix://{path}") as channel:
                return ask(channel)
        except grpc.RpcError:
            failed.add(service)
            return []

    @staticmethod
    def _lb(channel: grpc.Channel) -> list[CounterMetricFamily]:
        stub = lb_pb2_grpc.LoadBalancerStub(channel)
        labels = ["service", "backend"]
        packets = CounterMetricFamily("weir_lb_packets", "packets translated, by service and backend", labels=labels)
        conns = CounterMetricFamily(
            "weir_lb_connections", "new connections given a backend, by service and backend", labels=labels
        )
        services: list[lb_pb2.Service] = []
        token = ""
        while len(services) < MAX_SERVICES:
            page = stub.ListServices(
                lb_pb2.ListServicesRequest(page=common_pb2.PageRequest(page_size=PAGE, page_token=token)),
                timeout=PEER_TIMEOUT,
            )
            services.extend(page.services)
            token = page.next_page_token
            if not token:
                break
        for svc in services[:MAX_SERVICES]:
            counters = stub.GetCounters(lb_pb2.GetCountersRequest(service=svc.name), timeout=PEER_TIMEOUT)
            for b in counters.backends:
                backend = f"{b.address}:{b.port}"
                packets.add_metric([svc.name, backend], b.counter.packets)
                conns.add_metric([svc.name, backend], b.counter.new_connections)
        return [packets, conns]

    @staticmethod
    def _prefilter(channel: grpc.Channel) -> list[CounterMetricFamily]:
        stub = prefilter_pb2_grpc.PrefilterStub(channel)
        counters = stub.GetCounters(prefilter_pb2.GetCountersRequest(), timeout=PEER_TIMEOUT)
        by_interface = CounterMetricFamily(
            "weir_prefilter_packets", "packets the prefilter judged, by interface and outcome",
            labels=["interface", "outcome"],
        )  # fmt: skip
        for i in counters.interfaces:
            for outcome, counter in (("dropped", i.dropped), ("audited", i.audited), ("passed", i.passed)):
                by_interface.add_metric([i.interface, outcome], counter.packets)
        by_entry = CounterMetricFamily(
            "weir_prefilter_entry_hits",
            f"packets that matched a deny-list entry, for the {MAX_PREFILTER_ENTRIES} entries hit most",
            labels=["cidr"],
        )
        hit = sorted((e for e in counters.entries if e.hits.packets), key=lambda e: -e.hits.packets)
        for e in hit[:MAX_PREFILTER_ENTRIES]:
            by_entry.add_metric([e.cidr], e.hits.packets)
        return [by_interface, by_entry]


class MetricsServer:
    """The HTTP endpoint over the node's collector."""

    def __init__(self, collector: NodeCollector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        """Listen; returns the port (the one the kernel chose when `port` is 0)."""
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.shutdown()
                self._server.server_close()
            self._server = None
