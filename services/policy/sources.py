"""What the policy service learns from the orchestrator, which owns the node's state.

Endpoints and identities (with the ipcache prefixes of each) arrive on two watch streams
that start with a snapshot; `follow` keeps them open in the background and hands every
message to the service, so no request ever waits for the orchestrator to refresh them.
Two things are asked for directly: a snapshot at start (the maps cannot be rebuilt before
it, and guessing "no endpoints" would throw every endpoint's policy away), and the
identities of CIDRs that rules name (allocated by the orchestrator). A failure raises
Unavailable instead of answering "nothing".
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
import structlog
from weir.common.v1 import common_pb2
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc

from services.common.errors import Unavailable
from services.common.ipv4 import parse_ipv4_network
from services.common.validate import Network
from services.policy.compute import EndpointView, NamedPort

log = structlog.get_logger("weir.policy")

OWNER = "policy"
CIDR_LABEL = "cidr:"
PAGE = 1000
TIMEOUT = 5.0
CIDR_TIMEOUT = 0.0002  # added per CIDR to a CIDR identity call: 10k CIDRs may take seconds on a busy node
RECONNECT_SECONDS = 0.5


def endpoint_view(msg: orch_pb.Endpoint) -> EndpointView:
    named = tuple(sorted(NamedPort(p.name, p.port, p.protocol or "TCP") for p in msg.named_ports))
    return EndpointView(msg.name, msg.id, msg.ipv4, msg.ipv6, dict(msg.labels), msg.identity, msg.namespace, named)


@dataclass(frozen=True)
class IdentityView:
    """An identity as policy needs it: its text, the prefixes mapping to it, who holds it."""

    id: int
    text: str
    prefixes: tuple[Network, ...]
    owners: frozenset[str] = field(default_factory=frozenset)

    @property
    def cidr(self) -> Network | None:
        return _cidr_of(self.text)


MAX_CACHED_CIDRS = 1 << 18
_cidrs: dict[str, Network] = {}  # "cidr:<cidr>" label -> the CIDR, parsed once (every recompute asks for each)


def _cidr_of(text: str) -> Network | None:
    """The CIDR of a "cidr:..." identity."""
    if not text.startswith(CIDR_LABEL):
        return None
    network = _cidrs.get(text)
    if network is None:
        network = _network(text.removeprefix(CIDR_LABEL))
        _remember(text, network)
    return network


def _remember(label: str, network: Network) -> None:
    if len(_cidrs) >= MAX_CACHED_CIDRS:
        _cidrs.clear()
    _cidrs[label] = network


def cidr_label(network: Network) -> str:
    """The label of a CIDR's identity; the CIDR is remembered, so its view's `cidr` parses nothing."""
    label = f"{CIDR_LABEL}{network}"
    _remember(label, network)
    return label


def identity_view(msg: orch_pb.Identity) -> IdentityView:
    prefixes = msg.prefixes
    return IdentityView(msg.id, ",".join(msg.labels), tuple(map(_network, prefixes)) if prefixes else (),
                        frozenset(msg.owners))  # fmt: skip


def _network(text: str) -> Network:
    """A prefix the orchestrator sends (thousands per stream message): IPv4 without `ipaddress`'s parser."""
    return parse_ipv4_network(text) or ipaddress.ip_network(text)


def _unavailable(socket: Path, exc: grpc.RpcError) -> Unavailable:
    code = exc.code()
    details = exc.details()
    return Unavailable(f"the orchestrator at {socket} does not answer ({code.name}: {details}); retry when it is up")


class Orchestrator:
    """Blocking calls to the orchestrator, for start-up and CIDR identities."""

    def __init__(self, socket_path: Path) -> None:
        self._socket = socket_path
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")
        self._stub = orch_grpc.OrchestratorStub(self._channel)
        self._told: set[tuple[str, int]] = set()

    def snapshot(self) -> tuple[list[EndpointView], list[IdentityView]]:
        """Every endpoint and identity now."""
        endpoints: list[EndpointView] = []
        token = ""
        try:
            while True:
                reply = self._stub.ListEndpoints(
                    orch_pb.ListEndpointsRequest(page=common_pb2.PageRequest(page_size=PAGE, page_token=token)),
                    timeout=TIMEOUT,
                )
                endpoints += [endpoint_view(e) for e in reply.endpoints]
                token = reply.next_page_token
                if not token:
                    break
            identities = self._stub.ListIdentities(orch_pb.ListIdentitiesRequest(), timeout=TIMEOUT).identities
        except grpc.RpcError as exc:
            raise _unavailable(self._socket, exc) from None
        return endpoints, [identity_view(i) for i in identities]

    def allocate(self, networks: Iterable[Network], reserve_only: bool = False) -> dict[Network, int]:
        """The identities of these CIDRs, held by the policy service (idempotent)."""
        wanted = sorted({str(n): n for n in networks}.items())
        if not wanted:
            return {}
        request = orch_pb.AllocateCIDRIdentitiesRequest(
            owner=OWNER, cidrs=[text for text, _ in wanted], reserve_only=reserve_only, ids_only=True
        )
        try:
            reply = self._stub.AllocateCIDRIdentities(request, timeout=TIMEOUT + CIDR_TIMEOUT * len(wanted))
        except grpc.RpcError as exc:
            raise _unavailable(self._socket, exc) from None
        if len(reply.ids) != len(wanted):
            raise Unavailable(f"the orchestrator at {self._socket} answered {len(reply.ids)} identities for "
                              f"{len(wanted)} CIDRs; it may be older than this service: upgrade it")  # fmt: skip
        return {n: identity for (_, n), identity in zip(wanted, reply.ids, strict=True)}

    def release(self, networks: Iterable[Network]) -> None:
        wanted = sorted(set(networks), key=str)
        if not wanted:
            return
        try:
            self._stub.ReleaseCIDRIdentities(
                orch_pb.ReleaseCIDRIdentitiesRequest(owner=OWNER, cidrs=[str(n) for n in wanted]),
                timeout=TIMEOUT + CIDR_TIMEOUT * len(wanted),
            )
        except grpc.RpcError as exc:
            raise _unavailable(self._socket, exc) from None

    def policy_ready(self, installed: Iterable[tuple[str, int]], revision: int, resend: bool = False) -> None:
        """Tell the orchestrator these endpoints' maps are installed (it lets their traffic through).

        Only endpoints not told before are sent (all of them with ``resend``, after a snapshot:
        the orchestrator may have restarted). Best effort: a failure is logged and the endpoints
        are sent again with the next call; until then their traffic stays dropped (fail closed).
        """
        now = set(installed)
        new = now if resend else now - self._told
        if not new:
            self._told = now
            return
        request = orch_pb.EndpointPolicyReadyRequest(
            endpoints=[orch_pb.EndpointPolicyReadyRequest.Ready(name=n, id=i) for n, i in sorted(new)],
            revision=revision,
        )
        try:
            self._stub.EndpointPolicyReady(request, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            log.warning("cannot tell the orchestrator that endpoint policy is installed; will retry",
                        endpoints=len(new), code=exc.code().name)  # fmt: skip
            self._told = now - new
            return
        self._told = now

    def close(self) -> None:
        self._channel.close()


OnEndpoints = Callable[[bool, list[EndpointView], list[str]], Awaitable[object]]
# The identities come as the stream's messages: converting them (thousands after a bulk
# import) is left to the callee, which does it on the worker rather than on the event loop.
OnIdentities = Callable[[orch_pb.IdentityUpdate], Awaitable[object]]


def identity_views(update: orch_pb.IdentityUpdate) -> list[IdentityView]:
    """Every identity an update upserts, CIDR identities in the packed form (`cidrs`) included."""
    views = [identity_view(m) for m in update.upserted]
    packed = update.cidrs
    owners = {text: frozenset(text.split(",")) if text else frozenset() for text in set(packed.owners)}
    for identity, cidr, published, holders in zip(packed.ids, packed.cidrs, packed.published, packed.owners,
                                                  strict=True):  # fmt: skip
        label = CIDR_LABEL + cidr
        network = _cidr_of(label)  # parsed once per CIDR (the allocation that made it remembered it)
        prefixes = (network,) if published and network is not None else ()
        views.append(IdentityView(identity, label, prefixes, owners[holders]))
    return views


async def follow_endpoints(socket_path: Path, on_change: OnEndpoints) -> None:
    """on_change(snapshot, upserted, deleted names) for every endpoint change, forever.

    The first call after each (re)connection carries the whole set (snapshot=True).
    An outage is logged once at info, its retries at debug.
    """
    down = False
    while True:
        try:
            async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
                stub = orch_grpc.OrchestratorStub(channel)
                pending: list[EndpointView] = []
                async for change in stub.WatchEndpoints(orch_pb.WatchEndpointsRequest(snapshot=True)):
                    down = False
                    if change.kind == "EXISTS":
                        pending.append(endpoint_view(change.endpoint))
                    elif change.kind == "SYNCED":
                        await on_change(True, pending, [])
                    elif change.kind == "DELETED":
                        await on_change(False, [], [change.name])
                    else:
                        await on_change(False, [endpoint_view(change.endpoint)], [])
        except grpc.RpcError as exc:
            (log.debug if down else log.info)("endpoint stream interrupted; reconnecting", code=exc.code().name)
            down = True
        await asyncio.sleep(RECONNECT_SECONDS)


async def follow_identities(socket_path: Path, on_change: OnIdentities) -> None:
    """on_change(update) for every identity change, forever (outages logged once); `identity_views`
    converts its identities."""
    down = False
    while True:
        try:
            async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
                stub = orch_grpc.OrchestratorStub(channel)
                async for update in stub.WatchIdentities(orch_pb.WatchIdentitiesRequest(packed_cidrs=True)):
                    down = False
                    await on_change(update)
        except grpc.RpcError as exc:
            (log.debug if down else log.info)("identity stream interrupted; reconnecting", code=exc.code().name)
            down = True
        await asyncio.sleep(RECONNECT_SECONDS)
