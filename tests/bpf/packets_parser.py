"""The real policy, LB and prefilter objects, loaded in a private bpffs directory, for packet tables.

`Datapath` loads the objects with their shared maps pinned under its own
directory, fills the maps a table needs (an endpoint with an ingress policy,
one service, one denied source) and runs programs through BPF_PROG_TEST_RUN.
A program is run directly from its slot: the chain metadata it reads is given
in `skb->cb[]`, and since the test's call maps are empty, a packet that
passes leaves the chain as forwarded (TC_ACT_OK / XDP_PASS). The drop reason
of a packet is read from the shared metrics map, and its event from the ring
buffer, so every row says why, not only what.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pybpf import BpfObject, Map, MapType, Program, RingBuffer
from pybpf.batch import update_packed
from services.common import reasons
from services.common.bpffs import ensure_bpffs, remove_pins
from services.common.datapath import (
    Cb,
    Direction,
    Event,
    Family,
    Hook,
    IpcacheKey,
    IpcacheValue,
    IpProto,
    Reason,
    Slot,
)
from services.lb.defs import BackendState, LbBackend, LbRevNat, LbService, LbServiceKey
from services.policy.defs import (
    PREFIX_FULL,
    PREFIX_IDENTITY,
    ConfigFlag,
    EndpointPolicyConfig,
    PolicyEntry,
    PolicyFlag,
    PolicyKey,
)
from services.prefilter.defs import V4_SPANS, PrefilterEntry, V4Addr, V4Block, V4Span
from services.prefilter.gates import V4Gates

BPF_BUILD = Path(__file__).resolve().parents[2] / "bpf" / "build"
TC_ACT_OK, TC_ACT_SHOT = 0, 2
XDP_DROP, XDP_PASS = 1, 2
BPF_F_NO_PREALLOC = 1
BPF_F_INNER_MAP = 1 << 12
SKB_CB_OFFSET = 48  # offsetof(struct __sk_buff, cb); the fields before it stay zero
SKB_CTX_SIZE = 256  # at least sizeof(struct __sk_buff): the kernel copies it all back (zero tail allowed)

ENDPOINT_ID = 7
ENDPOINT_IDENTITY = 256
EP4, EP6 = "198.18.0.10", "2001:db8:e::a"
# Peer A is allowed everything but TCP/22; peer B only UDP/5353 and TCP/80.
PEER_A4, PEER_A6, PEER_A_IDENTITY = "198.18.0.20", "2001:db8:e::14", 300
PEER_B4, PEER_B6, PEER_B_IDENTITY = "198.18.0.21", "2001:db8:e::15", 301
ALLOWED_UDP, ALLOWED_TCP, DENIED_TCP = 5353, 80, 22
VIP, VIP_PORT = "10.96.0.10", 53
BACKEND, BACKEND_PORT, BACKEND_ID, SERVICE_ID = PEER_B4, 5353, 5, 1
DENIED_SOURCE = "203.0.113.9"


def skb_ctx(hook: Hook, slot: Slot, endpoint: int) -> bytes:
    """A `struct __sk_buff` prefix for test_run: zeros, then cb[] with the chain metadata."""
    cb = [0] * 5
    cb[Cb.HOOK], cb[Cb.SLOT], cb[Cb.ENDPOINT] = int(hook), int(slot), endpoint
    return (bytes(SKB_CB_OFFSET) + struct.pack("<5I", *cb)).ljust(SKB_CTX_SIZE, b"\0")


def _addr16(address: str) -> bytes:
    return ipaddress.ip_address(address).packed.ljust(16, b"\0")


def _net16(port: int) -> int:
    """A port as the u16 the BPF side reads in network order."""
    return int.from_bytes(port.to_bytes(2, "big"), "little")


@dataclass(frozen=True)
class Run:
    """What one packet did: the verdict, the reasons counted, the packet as it left."""

    retval: int
    reasons: dict[tuple[Reason, Direction], int]
    data: bytes

    @property
    def reason(self) -> Reason | None:
        """The one reason this packet was counted under (FORWARDED when it passed)."""
        return next(iter(self.reasons))[0] if len(self.reasons) == 1 else None


class Datapath:
    """The objects of one test, their maps filled for the tables, in /sys/fs/bpf/<name>."""

    def __init__(self, name: str) -> None:
        self.root = Path("/sys/fs/bpf") / name
        self._objects: list[BpfObject] = []
        self._inner: list[Map] = []
        self.events: list[Event] = []

    def __enter__(self) -> Datapath:
        ensure_bpffs(self.root)
        globals_dir = self.root / "globals"
        globals_dir.mkdir(mode=0o700)
        try:
            self.policy = self._load("policy.o", globals_dir)
            self.lb = self._load("lb.o", globals_dir)
            self.prefilter = self._load("prefilter.o", globals_dir)
            self.metrics = reasons.typed(self.policy.maps[reasons.MAP_NAME])
            self._ring = RingBuffer(self.policy.maps["events"], self._on_event)
            self._fill_policy()
            self._fill_lb()
            self._fill_prefilter()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for inner in self._inner:
            inner.close()
        for obj in self._objects:
            obj.close()
        if self.root.exists():
            remove_pins(self.root)

    def _load(self, name: str, globals_dir: Path) -> BpfObject:
        obj = BpfObject.open(BPF_BUILD / name, pin_root=globals_dir)
        self._objects.append(obj)
        return obj.load()

    def _on_event(self, record: bytes) -> None:
        self.events.append(Event.from_buffer_copy(record[: ctypes.sizeof(Event)]))

    # ---- map contents ----

    def _fill_policy(self) -> None:
        ipcache = self.policy.maps["ipcache"].typed(IpcacheKey, IpcacheValue)
        for address, identity in (
            (EP4, ENDPOINT_IDENTITY), (EP6, ENDPOINT_IDENTITY),
            (PEER_A4, PEER_A_IDENTITY), (PEER_A6, PEER_A_IDENTITY),
            (PEER_B4, PEER_B_IDENTITY), (PEER_B6, PEER_B_IDENTITY),
        ):  # fmt: skip
            ip = ipaddress.ip_address(address)
            where = IpcacheKey(prefixlen=32 + ip.max_prefixlen, family=Family.INET if ip.version == 4 else Family.INET6)
            ctypes.memmove(where.addr, ip.packed, len(ip.packed))
            ipcache.update(where, IpcacheValue(identity, 0))
        inner = Map.create(
            MapType.LPM_TRIE,
            ctypes.sizeof(PolicyKey),
            ctypes.sizeof(PolicyEntry),
            64,
            flags=BPF_F_NO_PREALLOC,
            name="parser_policy",
            key_type=PolicyKey,
            value_type=PolicyEntry,
        )
        self._inner.append(inner)
        for identity, proto, port, deny in (
            (PEER_A_IDENTITY, 0, 0, False),  # everything...
            (PEER_A_IDENTITY, IpProto.TCP, DENIED_TCP, True),  # ...but TCP/22
            (PEER_B_IDENTITY, IpProto.UDP, ALLOWED_UDP, False),
            (PEER_B_IDENTITY, IpProto.TCP, ALLOWED_TCP, False),
        ):
            key = PolicyKey(
                prefixlen=PREFIX_IDENTITY if proto == 0 else PREFIX_FULL, dir=Direction.INGRESS, proto=proto
            )
            ctypes.memmove(key.identity, identity.to_bytes(4, "big"), 4)
            ctypes.memmove(key.port, port.to_bytes(2, "big"), 2)
            inner.update(key, PolicyEntry(flags=PolicyFlag.DENY if deny else 0))
        self.policy.maps["policy_maps"].typed(ctypes.c_uint32, ctypes.c_uint32).update(ENDPOINT_ID, inner.fd)
        self.policy.maps["policy_config"].typed(ctypes.c_uint32, EndpointPolicyConfig).update(
            ENDPOINT_ID, EndpointPolicyConfig(ConfigFlag.INGRESS_ENFORCED)
        )

    def _fill_lb(self) -> None:
        key = LbServiceKey(port=_net16(VIP_PORT), proto=IpProto.UDP, family=Family.INET)
        ctypes.memmove(key.addr, _addr16(VIP), 16)
        self.lb.maps["lb_services"].typed(LbServiceKey, LbService).update(
            key, LbService(service_id=SERVICE_ID, table_size=1, rev_nat_index=SERVICE_ID)
        )
        backend = LbBackend(port=_net16(BACKEND_PORT), family=Family.INET, state=BackendState.ACTIVE, weight=1)
        ctypes.memmove(backend.addr, _addr16(BACKEND), 16)
        self.lb.maps["lb_backends"].typed(ctypes.c_uint32, LbBackend).update(BACKEND_ID, backend)
        table = Map.create(
            MapType.ARRAY,
            4,
            4,
            1,
            flags=BPF_F_INNER_MAP,
            name="parser_table",
            key_type=ctypes.c_uint32,
            value_type=ctypes.c_uint32,
        )
        self._inner.append(table)
        table.update(0, BACKEND_ID)
        self.lb.maps["lb_tables"].typed(ctypes.c_uint32, ctypes.c_uint32).update(SERVICE_ID, table.fd)
        rev = LbRevNat(port=_net16(VIP_PORT), family=Family.INET)
        ctypes.memmove(rev.addr, _addr16(VIP), 16)
        self.lb.maps["lb_rev_nat"].typed(ctypes.c_uint32, LbRevNat).update(SERVICE_ID, rev)

    def _fill_prefilter(self) -> None:
        hosts = Map.create(
            MapType.HASH,
            ctypes.sizeof(V4Addr),
            ctypes.sizeof(PrefilterEntry),
            16,
            name="parser_pf_v4",
            key_type=V4Addr,
            value_type=PrefilterEntry,
        )
        self._inner.append(hosts)
        key = V4Addr()
        ctypes.memmove(key.addr, ipaddress.ip_address(DENIED_SOURCE).packed, 4)
        hosts.update(key, PrefilterEntry(1, 0))
        self.prefilter.maps["pf_v4_host"].typed(ctypes.c_uint32, ctypes.c_uint32).update(0, hosts.fd)
        # Where the host is: its /16's span and its /24's block (as the service computes them).
        (span_keys, span_values), (block_keys, block_values), _ = V4Gates([bytes(key)]).packed()  # no pages
        spans = Map.create(MapType.ARRAY, 4, ctypes.sizeof(V4Span), V4_SPANS, name="parser_pf_span")
        blocks = Map.create(
            MapType.HASH, 4, ctypes.sizeof(V4Block), 16, flags=BPF_F_NO_PREALLOC, name="parser_pf_block"
        )
        self._inner += [spans, blocks]
        update_packed(spans, span_keys, span_values)
        update_packed(blocks, block_keys, block_values)
        self.prefilter.maps["pf_v4_span"].typed(ctypes.c_uint32, ctypes.c_uint32).update(0, spans.fd)
        self.prefilter.maps["pf_v4_block"].typed(ctypes.c_uint32, ctypes.c_uint32).update(0, blocks.fd)
        self.prefilter.maps["pf_active"].typed(ctypes.c_uint32, ctypes.c_uint32).update(0, 0)

    def reset(self) -> None:
        """Forget connections, fragmented datagrams and events (the map contents stay)."""
        self.policy.maps["conntrack"].clear()
        self.policy.maps["frag_datagrams"].clear()
        list(self.drain_events())

    # ---- running packets ----

    def _reasons(self) -> dict[tuple[int, int], int]:
        return {key: int(total.packets) for key, total in reasons.read_reason_counters(self.metrics).items()}

    def _run(self, program: Program, packet: bytes, ctx: bytes | None) -> Run:
        before = self._reasons()
        result = program.test_run(packet, ctx=ctx)
        after = self._reasons()
        counted = {
            (Reason(reason), Direction(direction)): n - before.get((reason, direction), 0)
            for (reason, direction), n in after.items()
            if n != before.get((reason, direction), 0)
        }
        return Run(result.retval, counted, result.data)

    def ingress(self, packet: bytes, endpoint: int = ENDPOINT_ID) -> Run:
        """Through policy in the to-container chain of the endpoint (its ingress policy)."""
        program = self.policy.programs["policy_ingress"]
        return self._run(program, packet, skb_ctx(Hook.TO_CONTAINER, Slot.POLICY, endpoint))

    def egress(self, packet: bytes) -> Run:
        """Through policy in the from-container chain of the endpoint (egress: not enforced)."""
        program = self.policy.programs["policy_egress"]
        return self._run(program, packet, skb_ctx(Hook.FROM_CONTAINER, Slot.POLICY, ENDPOINT_ID))

    def lb_forward(self, packet: bytes) -> Run:
        """Through the LB's from-container program (DNAT to the backend)."""
        program = self.lb.programs["lb_from_container"]
        return self._run(program, packet, skb_ctx(Hook.FROM_CONTAINER, Slot.LB, ENDPOINT_ID))

    def lb_reply(self, packet: bytes) -> Run:
        """Through the LB's to-container program (reverse NAT of replies)."""
        program = self.lb.programs["lb_to_container"]
        return self._run(program, packet, skb_ctx(Hook.TO_CONTAINER, Slot.LB_REPLY, ENDPOINT_ID))

    def xdp(self, packet: bytes) -> Run:
        """Through the prefilter at XDP."""
        return self._run(self.prefilter.programs["prefilter_xdp"], packet, None)

    def drain_events(self) -> Iterator[Event]:
        self._ring.consume()
        events, self.events = self.events, []
        yield from events


def datapath_name() -> str:
    """A bpffs directory name unique to this test process."""
    return f"wt{os.getpid() % 100000}-parser"
