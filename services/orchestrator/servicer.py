"""The orchestrator's gRPC layer: validate, call one method, fill the reply.

Status codes come from the exceptions the plain classes raise; the mapping
lives in services/common/errors.py and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
import structlog
from weir.common.v1 import common_pb2
from weir.orchestrator.v1 import orchestrator_pb2 as pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

from pybpf import XdpMode
from services.common.chain_client import XdpPlacement as XdpState
from services.common.datapath import Direction, Hook, Slot
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.worker import Worker
from services.orchestrator.chain import Chain, SlotState
from services.orchestrator.cluster import Cluster, ClusterStatus
from services.orchestrator.conntrack import Conntrack
from services.orchestrator.devices import Devices
from services.orchestrator.endpoints import Endpoint, Endpoints, EndpointSpec, NamedPort
from services.orchestrator.eventlimits import EventLimits, KindStats, parse_limit
from services.orchestrator.events import EventHub
from services.orchestrator.flows import MAX_LAST, Flow, FlowFilter, Flows, Peer
from services.orchestrator.identities import Identities, IdentityChange, IdentityInfo, cidr_key, parse_cidrs
from services.orchestrator.limits import MAX_EVENT_TYPES, MAX_PROGRAMS
from services.orchestrator.mapfill import MapFill
from services.orchestrator.node_rpcs import NodeRpcs
from services.orchestrator.nodes import NodeTable

# How long CreateEndpoint waits for the policy service to install a new endpoint's map.
DEFAULT_POLICY_WAIT_MS = 5000
MAX_POLICY_WAIT_MS = 60_000
MAX_READY_PER_CALL = 65536
MAX_EVENT_LIMITS = 64  # limits in one SetEventLimits
LOSS_REPORT_SECONDS = 1.0  # a follower hears of the datapath's losses at most this often

log = structlog.get_logger("weir.orchestrator")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Orchestrator"].full_name


Context = grpc.aio.ServicerContext[Any, Any]


def hook_from_proto(value: int) -> Hook:
    """Proto enum names are the datapath's names with a prefix (checked by a unit test)."""
    name = common_pb2.Hook.Name(common_pb2.Hook.ValueType(value)) if value in common_pb2.Hook.values() else ""
    if not name or value == common_pb2.HOOK_UNSPECIFIED:
        raise InvalidArgument(f"hook {value} is not one of {', '.join(common_pb2.Hook.keys()[1:])}")
    return Hook[name.removeprefix("HOOK_")]


def slot_from_proto(value: int) -> int:
    """A slot number as the datapath counts them; an unknown enum value is refused."""
    if value == common_pb2.SLOT_UNSPECIFIED:
        raise InvalidArgument(f"slot is required: one of {', '.join(common_pb2.Slot.keys()[1:])}")
    if value not in common_pb2.Slot.values():
        raise InvalidArgument(f"slot {value} is out of range: one of {', '.join(common_pb2.Slot.keys()[1:])}")
    return Slot[common_pb2.Slot.Name(common_pb2.Slot.ValueType(value)).removeprefix("SLOT_")]


def hook_to_proto(hook: Hook) -> common_pb2.Hook.ValueType:
    return common_pb2.Hook.Value(f"HOOK_{hook.name}")


def direction_to_proto(direction: Direction) -> common_pb2.Direction.ValueType:
    return common_pb2.Direction.Value(f"DIRECTION_{direction.name}")


def endpoint_to_proto(endpoint: Endpoint) -> pb.Endpoint:
    return pb.Endpoint(
        name=endpoint.name,
        id=endpoint.id,
        ipv4=endpoint.ipv4,
        ipv6=endpoint.ipv6,
        labels=endpoint.labels,
        netns=endpoint.netns,
        host_ifname=endpoint.host_ifname,
        host_ifindex=endpoint.host_ifindex,
        mac=endpoint.mac,
        adopted=endpoint.adopted,
        identity=endpoint.identity,
        namespace=endpoint.namespace,
        named_ports=[pb.NamedPort(name=p.name, port=p.port, protocol=p.protocol) for p in endpoint.named_ports],
        policy_pending=endpoint.policy_pending,
    )


def identity_to_proto(info: IdentityInfo) -> pb.Identity:
    return pb.Identity(id=info.id, labels=info.labels, prefixes=info.prefixes, owners=info.owners)


def identity_update(change: IdentityChange, packed_cidrs: bool) -> pb.IdentityUpdate:
    """A change as a watcher asked for it: CIDR identities packed (`cidrs`) or one message each."""
    if not packed_cidrs:
        return pb.IdentityUpdate(upserted=[identity_to_proto(i) for i in change.infos()], deleted=change.deleted)
    cidrs = change.cidrs
    return pb.IdentityUpdate(
        upserted=[identity_to_proto(i) for i in change.upserted],
        deleted=change.deleted,
        cidrs=pb.CidrIdentities(
            ids=cidrs.ids, cidrs=cidrs.cidrs, published=cidrs.published, owners=[",".join(o) for o in cidrs.owners]
        ),
    )


def peer_to_proto(peer: Peer) -> pb.FlowPeer:
    return pb.FlowPeer(
        address=peer.address,
        port=peer.port,
        identity=peer.identity,
        endpoint=peer.endpoint,
        endpoint_id=peer.endpoint_id,
        labels=peer.labels,
    )


def flow_to_proto(flow: Flow) -> pb.Flow:
    ev = flow.event
    message = pb.Flow(
        verdict=flow.verdict,
        reason=ev.reason,
        type=ev.type,
        hook=hook_to_proto(ev.hook),
        direction=direction_to_proto(Direction(ev.direction)),
        protocol=ev.protocol,
        source=peer_to_proto(flow.source),
        destination=peer_to_proto(flow.destination),
        src=ev.src,
        dst=ev.dst,
        src_port=ev.src_port,
        dst_port=ev.dst_port,
        src_identity=flow.source.identity,
        dst_identity=flow.destination.identity,
        endpoint_id=ev.endpoint_id,
        ifindex=ev.ifindex,
        length=ev.length,
        seq=flow.seq,
        rule=flow.rule,
        translated_address=ev.nat_addr,
        translated_port=ev.nat_port,
    )
    if ev.l7 is not None:
        l7 = ev.l7
        message.l7.CopyFrom(pb.L7Flow(method=l7.method, path=l7.path, host=l7.host, status=l7.status, rule=l7.rule))
    message.time.FromNanoseconds(flow.time_ns)
    return message


def kind_stats_to_proto(k: KindStats) -> pb.EventKindStats:
    return pb.EventKindStats(
        kind=k.kind,
        emitted=k.emitted,
        rate_limited=k.limited,
        sampled_out=k.sampled_out,
        lost=k.lost,
        rate=k.limit.rate,
        burst=k.limit.burst,
        sample=k.limit.sample,
        off=k.limit.off,
    )


class DatapathLoss:
    """A follower's view of the datapath's losses: what was held back or lost since it last asked.

    Read at most once per LOSS_REPORT_SECONDS, so a flood of flows costs no map reads per flow.
    """

    def __init__(self, worker: Worker, limits: EventLimits | None) -> None:
        self._worker, self._limits = worker, limits
        self._limited = self._lost = 0
        self._read_at = 0.0

    async def _totals(self) -> tuple[int, int]:
        assert self._limits is not None
        stats = await self._worker.call(self._limits.stats)
        return sum(s.limited for s in stats), sum(s.lost for s in stats)

    async def start(self) -> None:
        if self._limits is not None:
            self._limited, self._lost = await self._totals()
            self._read_at = time.monotonic()

    async def since_last(self) -> pb.FlowLoss | None:
        if self._limits is None or time.monotonic() - self._read_at < LOSS_REPORT_SECONDS:
            return None
        limited, lost = await self._totals()
        self._read_at = time.monotonic()
        if (limited, lost) == (self._limited, self._lost):
            return None
        loss = pb.FlowLoss(rate_limited=limited - self._limited, datapath_lost=lost - self._lost)
        self._limited, self._lost = limited, lost
        return loss


def cluster_status_to_proto(status: ClusterStatus) -> pb.ClusterStatus:
    return pb.ClusterStatus(
        enabled=True,
        node_name=status.node_name,
        kvstore_endpoints=status.endpoints,
        connected=status.connected,
        lease_id=status.lease_id,
        lease_ttl_seconds=status.lease_ttl,
        last_error=status.last_error,
        nodes=[
            pb.ClusterNode(
                name=n.name,
                node_id=n.node_id,
                addresses=n.addresses,
                cidrs=n.cidrs,
                routing=n.routing,
                key_index=n.key_index,
            )
            for n in status.nodes
        ],
        pending_changes=status.pending,
        remote_prefixes=status.remote_prefixes,
        identity_conflicts=status.conflicts,
    )


def slot_to_proto(state: SlotState) -> pb.SlotState:
    return pb.SlotState(
        hook=hook_to_proto(state.hook),
        slot=common_pb2.Slot.Value(f"SLOT_{state.slot.name}"),
        program_id=state.program_id,
        program_name=state.program_name,
        service=state.service,
        generation=state.generation,
    )


XDP_MODES = {
    pb.XDP_MODE_UNSPECIFIED: XdpMode.AUTO,
    pb.XDP_MODE_NATIVE: XdpMode.NATIVE,
    pb.XDP_MODE_GENERIC: XdpMode.GENERIC,
}


def xdp_mode_from_proto(value: int) -> XdpMode:
    if value not in XDP_MODES:
        raise InvalidArgument(f"XDP mode {value} is not one of {', '.join(pb.XdpMode.keys())}")
    return XDP_MODES[pb.XdpMode.ValueType(value)]


def xdp_to_proto(state: XdpState) -> pb.XdpAttachment:
    mode = pb.XDP_MODE_NATIVE if state.mode is XdpMode.NATIVE else pb.XDP_MODE_GENERIC
    return pb.XdpAttachment(interface=state.interface, ifindex=state.ifindex, mode=mode, program_id=state.program_id)


class OrchestratorServicer(NodeRpcs, pb_grpc.OrchestratorServicer):
    def __init__(
        self,
        worker: Worker,
        chain: Chain,
        endpoints: Endpoints,
        devices: Devices,
        events: EventHub,
        identities: Identities,
        conntrack: Conntrack,
        flows: Flows,
        nodes: NodeTable,
        event_limits: EventLimits | None = None,
        fill: MapFill | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        NodeRpcs.__init__(self, worker, nodes)
        self._flows = flows
        self._event_limits = event_limits
        self._fill = fill
        self._cluster = cluster
        self._worker = worker
        self._devices = devices
        self._watchers: set[asyncio.Queue[pb.EndpointChange]] = set()
        self._loop = asyncio.get_running_loop()
        endpoints.on_change(self.endpoint_changed)
        self._chain = chain
        self._endpoints = endpoints
        self._events = events
        self._identities = identities
        self._conntrack = conntrack
        self._identity_watchers: set[tuple[asyncio.Queue[pb.IdentityUpdate], bool]] = set()  # (queue, packed)
        identities.on_change(self.identities_changed)
        self._policy_waiters: dict[str, set[asyncio.Event]] = {}
        endpoints.on_policy_ready(self.policy_ready)

    async def CreateEndpoint(self, request: pb.CreateEndpointRequest, context: Context) -> pb.Endpoint:
        spec = EndpointSpec.parse(
            request.name,
            request.ipv4,
            request.ipv6,
            dict(request.labels),
            request.adopt_interface,
            request.namespace,
            tuple(NamedPort(p.name, p.port, p.protocol) for p in request.named_ports),
        )
        if request.policy_wait_ms > MAX_POLICY_WAIT_MS:
            raise InvalidArgument(f"policy_wait_ms {request.policy_wait_ms} is above the maximum of "
                                  f"{MAX_POLICY_WAIT_MS}")  # fmt: skip
        wait = (request.policy_wait_ms or DEFAULT_POLICY_WAIT_MS) / 1000
        # Waiting starts before the create: the policy service may answer before create returns here.
        ready = asyncio.Event()
        self._policy_waiters.setdefault(spec.name, set()).add(ready)
        try:
            endpoint = await self._worker.call(self._endpoints.create, spec)
            if endpoint.policy_pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ready.wait(), wait)
                endpoint = await self._worker.call(self._endpoints.get, spec.name)
        finally:
            waiters = self._policy_waiters.get(spec.name, set())
            waiters.discard(ready)
            if not waiters:
                self._policy_waiters.pop(spec.name, None)
        return endpoint_to_proto(endpoint)

    async def EndpointPolicyReady(
        self, request: pb.EndpointPolicyReadyRequest, context: Context
    ) -> pb.EndpointPolicyReadyResponse:
        if len(request.endpoints) > MAX_READY_PER_CALL:
            raise InvalidArgument(f"{len(request.endpoints)} endpoints in one call; at most {MAX_READY_PER_CALL}")
        ready = [(r.name, r.id) for r in request.endpoints]
        released = await self._worker.call(self._endpoints.policy_ready, ready, request.revision)
        return pb.EndpointPolicyReadyResponse(released=released)

    def policy_ready(self, name: str) -> None:
        """From the worker thread: wake the CreateEndpoint calls waiting for this endpoint's policy."""
        self._loop.call_soon_threadsafe(self._wake, name)

    def _wake(self, name: str) -> None:
        for event in self._policy_waiters.get(name, ()):
            event.set()

    async def GetEndpoint(self, request: pb.GetEndpointRequest, context: Context) -> pb.Endpoint:
        return endpoint_to_proto(await self._worker.call(self._endpoints.get, request.name))

    async def ListEndpoints(self, request: pb.ListEndpointsRequest, context: Context) -> pb.ListEndpointsResponse:
        page, token = await self._worker.call(
            self._endpoints.list_page, request.page.page_size, request.page.page_token
        )
        return pb.ListEndpointsResponse(endpoints=[endpoint_to_proto(e) for e in page], next_page_token=token)

    async def DeleteEndpoint(self, request: pb.DeleteEndpointRequest, context: Context) -> pb.DeleteEndpointResponse:
        await self._worker.call(self._endpoints.delete, request.name)
        return pb.DeleteEndpointResponse()

    async def WatchEndpoints(
        self, request: pb.WatchEndpointsRequest, context: Context
    ) -> AsyncIterator[pb.EndpointChange]:
        queue: asyncio.Queue[pb.EndpointChange] = asyncio.Queue()
        self._watchers.add(queue)  # before the snapshot: a change meanwhile is sent (again) after it
        try:
            if request.snapshot:
                for endpoint in await self._worker.call(self._endpoints.all):
                    yield pb.EndpointChange(kind="EXISTS", name=endpoint.name, endpoint=endpoint_to_proto(endpoint))
                yield pb.EndpointChange(kind="SYNCED")
            while True:
                yield await queue.get()
        finally:
            self._watchers.discard(queue)

    def endpoint_changed(self, kind: str, endpoint: Endpoint) -> None:
        """From the worker thread: hand the change to every watcher on the loop."""
        change = pb.EndpointChange(kind=kind, name=endpoint.name, endpoint=endpoint_to_proto(endpoint))
        for queue in list(self._watchers):
            self._loop.call_soon_threadsafe(queue.put_nowait, change)

    # ---- node state: identities, ipcache, conntrack ----

    async def ListIdentities(self, request: pb.ListIdentitiesRequest, context: Context) -> pb.ListIdentitiesResponse:
        infos = await self._worker.call(self._identities.all)
        return pb.ListIdentitiesResponse(identities=[identity_to_proto(i) for i in infos])

    async def WatchIdentities(
        self, request: pb.WatchIdentitiesRequest, context: Context
    ) -> AsyncIterator[pb.IdentityUpdate]:
        queue: asyncio.Queue[pb.IdentityUpdate] = asyncio.Queue()
        watcher = (queue, request.packed_cidrs)
        self._identity_watchers.add(watcher)  # before the snapshot, as in WatchEndpoints
        try:
            change = await self._worker.call(self._identities.snapshot)
            update = identity_update(change, request.packed_cidrs)
            update.snapshot = True
            yield update
            while True:
                yield await queue.get()
        finally:
            self._identity_watchers.discard(watcher)

    def identities_changed(self, change: IdentityChange) -> None:
        """From the worker thread: hand the change to every identity watcher on the loop
        (each form built once, and only if a watcher takes it)."""
        forms: dict[bool, pb.IdentityUpdate] = {}
        for queue, packed in list(self._identity_watchers):
            update = forms.get(packed)
            if update is None:
                update = forms[packed] = identity_update(change, packed)
            self._loop.call_soon_threadsafe(queue.put_nowait, update)

    async def AllocateCIDRIdentities(
        self, request: pb.AllocateCIDRIdentitiesRequest, context: Context
    ) -> pb.AllocateCIDRIdentitiesResponse:
        networks = parse_cidrs(request.cidrs)
        if request.ids_only:
            ids = await self._worker.call(
                self._identities.allocate_cidr_ids, request.owner, networks, request.reserve_only
            )
            return pb.AllocateCIDRIdentitiesResponse(ids=ids)
        infos = await self._worker.call(self._identities.allocate_cidrs, request.owner, networks, request.reserve_only)
        by_network = {info.labels[0]: info.id for info in infos}
        return pb.AllocateCIDRIdentitiesResponse(
            identities=[identity_to_proto(i) for i in infos], ids=[by_network[cidr_key(n)] for n in networks]
        )

    async def ReleaseCIDRIdentities(
        self, request: pb.ReleaseCIDRIdentitiesRequest, context: Context
    ) -> pb.ReleaseCIDRIdentitiesResponse:
        networks = parse_cidrs(request.cidrs)
        await self._worker.call(self._identities.release_cidrs, request.owner, networks)
        return pb.ReleaseCIDRIdentitiesResponse()

    async def CollectConntrack(
        self, request: pb.CollectConntrackRequest, context: Context
    ) -> pb.CollectConntrackResponse:
        return pb.CollectConntrackResponse(expired=await self._worker.call(self._conntrack.collect))

    # ---- end of node state ----

    # ---- the chain ----

    async def RegisterPrograms(
        self, request: pb.RegisterProgramsRequest, context: Context
    ) -> pb.RegisterProgramsResponse:
        if len(request.programs) > MAX_PROGRAMS:
            raise InvalidArgument(f"{len(request.programs)} programs in one registration; at most {MAX_PROGRAMS}")
        wanted = [(hook_from_proto(p.hook), slot_from_proto(p.slot), p.pin_path, 0) for p in request.programs]
        states = await self._worker.call(self._chain.register, request.service, wanted)
        return pb.RegisterProgramsResponse(slots=[slot_to_proto(s) for s in states])

    async def SetSlot(self, request: pb.SetSlotRequest, context: Context) -> pb.SlotState:
        hook = hook_from_proto(request.hook)
        slot = slot_from_proto(request.slot)
        state = await self._worker.call(self._chain.set_slot, hook, slot, request.pin_path, request.program_id)
        return slot_to_proto(state)

    async def ClearSlot(self, request: pb.ClearSlotRequest, context: Context) -> pb.SlotState:
        hook = hook_from_proto(request.hook)
        slot = slot_from_proto(request.slot)
        return slot_to_proto(await self._worker.call(self._chain.clear_slot, hook, slot))

    async def GetSlot(self, request: pb.GetSlotRequest, context: Context) -> pb.SlotState:
        hook = hook_from_proto(request.hook)
        slot = slot_from_proto(request.slot)
        return slot_to_proto(await self._worker.call(self._chain.slot, hook, slot))

    async def ListSlots(self, request: pb.ListSlotsRequest, context: Context) -> pb.ListSlotsResponse:
        hooks = [hook_from_proto(request.hook)] if request.hook else list(Hook)

        def slots() -> list[SlotState]:
            return [s for hook in hooks for s in self._chain.slots(hook)]

        return pb.ListSlotsResponse(slots=[slot_to_proto(s) for s in await self._worker.call(slots)])

    async def SwapChain(self, request: pb.SwapChainRequest, context: Context) -> pb.SwapChainResponse:
        hooks = [hook_from_proto(request.hook)] if request.hook else list(Hook)

        def swap() -> list[int]:
            return [self._chain.swap(hook) for hook in hooks]

        generations = await self._worker.call(swap)
        return pb.SwapChainResponse(hooks=[hook_to_proto(h) for h in hooks], generations=generations)

    async def AttachXdp(self, request: pb.AttachXdpRequest, context: Context) -> pb.XdpAttachment:
        mode = xdp_mode_from_proto(request.mode)
        return xdp_to_proto(await self._worker.call(self._devices.attach_xdp, request.interface, mode))

    async def DetachXdp(self, request: pb.DetachXdpRequest, context: Context) -> pb.DetachXdpResponse:
        await self._worker.call(self._devices.detach_xdp, request.interface)
        return pb.DetachXdpResponse()

    async def ListXdp(self, request: pb.ListXdpRequest, context: Context) -> pb.ListXdpResponse:
        states = await self._worker.call(self._devices.xdp_attachments)
        return pb.ListXdpResponse(attachments=[xdp_to_proto(s) for s in states])

    async def AttachDevice(self, request: pb.AttachDeviceRequest, context: Context) -> pb.Device:
        ifindex = await self._worker.call(self._devices.attach, request.interface)
        return pb.Device(interface=request.interface, ifindex=ifindex)

    async def DetachDevice(self, request: pb.DetachDeviceRequest, context: Context) -> pb.DetachDeviceResponse:
        await self._worker.call(self._devices.detach, request.interface)
        return pb.DetachDeviceResponse()

    async def ListDevices(self, request: pb.ListDevicesRequest, context: Context) -> pb.ListDevicesResponse:
        devices = await self._worker.call(self._devices.list)
        return pb.ListDevicesResponse(devices=[pb.Device(interface=n, ifindex=i) for n, i in devices])

    async def GetMetrics(self, request: pb.GetMetricsRequest, context: Context) -> pb.GetMetricsResponse:
        counts = await self._worker.call(self._chain.entry_counts)
        reason_counts = await self._worker.call(self._chain.reason_counts)
        entry = [
            pb.HookCounter(hook=hook_to_proto(hook), counter=common_pb2.Counter(packets=p, bytes=b))
            for hook, (p, b) in counts.items()
        ]
        reasons = [
            pb.ReasonCounter(
                reason=r.reason.name if hasattr(r.reason, "name") else str(r.reason),
                reason_code=int(r.reason),
                direction=direction_to_proto(r.direction),
                counter=common_pb2.Counter(packets=r.packets, bytes=r.bytes),
            )
            for r in reason_counts
        ]
        fills = await self._worker.call(self._fill.read) if self._fill is not None else []
        maps = [pb.MapFill(name=f.name, entries=f.entries, capacity=f.capacity) for f in fills]
        return pb.GetMetricsResponse(entry=entry, reasons=reasons, maps=maps)

    async def WatchEvents(self, request: pb.WatchEventsRequest, context: Context) -> AsyncIterator[pb.Event]:
        if len(request.types) > MAX_EVENT_TYPES:
            raise InvalidArgument(f"{len(request.types)} event types; at most {MAX_EVENT_TYPES}")
        wanted = {t.upper() for t in request.types}
        queue = self._events.subscribe()
        try:
            while True:
                event = await queue.get()
                if wanted and event.type not in wanted:
                    continue
                yield pb.Event(
                    type=event.type,
                    reason=event.reason,
                    hook=hook_to_proto(event.hook),
                    direction=direction_to_proto(Direction(event.direction)),
                    ifindex=event.ifindex,
                    endpoint_id=event.endpoint_id,
                    length=event.length,
                    src_identity=event.src_identity,
                    dst_identity=event.dst_identity,
                    protocol=event.protocol,
                    src=event.src,
                    dst=event.dst,
                    src_port=event.src_port,
                    dst_port=event.dst_port,
                )
        except asyncio.CancelledError:
            raise
        finally:
            self._events.unsubscribe(queue)

    async def GetFlows(self, request: pb.GetFlowsRequest, context: Context) -> AsyncIterator[pb.GetFlowsResponse]:
        flt = FlowFilter.parse(
            request.endpoints, request.labels, request.cidrs, request.ports,
            request.protocols, request.verdicts, request.reasons, request.rules,
        )  # fmt: skip
        if request.last > MAX_LAST:
            raise InvalidArgument(f"last: {request.last} is above the maximum of {MAX_LAST}")
        try:
            since = request.since.ToNanoseconds() if request.HasField("since") else None
        except ValueError as exc:  # outside years 1..9999, or nanos out of range
            raise InvalidArgument(f"since: {exc}") from None
        if since is not None and since < 0:
            raise InvalidArgument("since: a time before 1970")
        await self._events.caught_up()  # flows of traffic sent before the call are in the snapshot
        sub = self._flows.subscribe() if request.follow else None  # before the snapshot: nothing falls between
        try:
            buffered, evicted = self._flows.snapshot()
            replay = not request.follow or since is not None or request.last > 0
            wanted = [f for f in buffered if (since is None or f.time_ns >= since) and flt.match(f)] if replay else []
            if request.last:
                short = len(wanted) < request.last
                wanted = wanted[-request.last :]
            else:
                short = replay and (since is None or not buffered or buffered[0].time_ns > since)
            if evicted and short:
                yield pb.GetFlowsResponse(lost=pb.FlowLoss(evicted=evicted))
            for flow in wanted:
                yield pb.GetFlowsResponse(flow=flow_to_proto(flow))
            if sub is None:
                return
            newest = buffered[-1].seq if buffered else 0
            reported = 0
            datapath = DatapathLoss(self._worker, self._event_limits)
            await datapath.start()
            while True:
                try:
                    got: Flow | None = await asyncio.wait_for(sub.queue.get(), LOSS_REPORT_SECONDS)
                except TimeoutError:
                    got = None
                if sub.dropped > reported:
                    yield pb.GetFlowsResponse(lost=pb.FlowLoss(dropped=sub.dropped - reported))
                    reported = sub.dropped
                if (loss := await datapath.since_last()) is not None:
                    yield pb.GetFlowsResponse(lost=loss)
                if got is not None and got.seq > newest and flt.match(got):
                    yield pb.GetFlowsResponse(flow=flow_to_proto(got))
        finally:
            if sub is not None:
                self._flows.unsubscribe(sub)

    async def SetEventLimits(self, request: pb.SetEventLimitsRequest, context: Context) -> pb.FlowStats:
        if self._event_limits is None:
            raise FailedPrecondition("this orchestrator does not own the datapath's event limits")
        if not request.limits:
            raise InvalidArgument("limits: give at least one KIND=RATE[/BURST][:SAMPLE] or KIND=off")
        if len(request.limits) > MAX_EVENT_LIMITS:
            raise InvalidArgument(f"limits: {len(request.limits)} given; at most {MAX_EVENT_LIMITS}")
        wanted = {}
        for text in request.limits:
            try:
                kind, limit = parse_limit(text)
            except ValueError as exc:
                raise InvalidArgument(f"limits: {exc}") from None
            wanted[kind] = limit
        await self._worker.call(self._event_limits.change, wanted)
        log.info("event limits changed", limits=list(request.limits))
        return await self.GetFlowStats(pb.GetFlowStatsRequest(), context)

    async def GetClusterStatus(self, request: pb.GetClusterStatusRequest, context: Context) -> pb.ClusterStatus:
        if self._cluster is None:
            return pb.ClusterStatus(enabled=False)
        return cluster_status_to_proto(self._cluster.status())

    async def GetFlowStats(self, request: pb.GetFlowStatsRequest, context: Context) -> pb.FlowStats:
        kinds, lost = [], 0
        if self._event_limits is not None:
            limits = self._event_limits
            kinds = [kind_stats_to_proto(k) for k in await self._worker.call(limits.stats)]
            lost = await self._worker.call(limits.lost_since_start)
        return pb.FlowStats(
            capacity=self._flows.capacity,
            buffered=len(self._flows),
            seen=self._flows.seen,
            evicted=self._flows.evicted,
            subscriber_dropped=self._flows.subscriber_dropped,
            datapath_unreported=lost,
            event_kinds=kinds,
        )
