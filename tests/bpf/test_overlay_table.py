"""The overlay's programs (bpf/overlay.bpf.c) through test_run: which packets get a tunnel key, which drop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether

from pybpf import BpfObject, Map
from services.common.datapath import IpcacheKey, Reason, TunnelValue
from services.common.lpm import ipcache_key
from services.orchestrator.nodes import parse_record
from services.orchestrator.routing import tunnel_value
from tests.harness.bpfrun import TC_ACT_OK, TC_ACT_SHOT, Datapath
from tests.harness.node import BPF_BUILD

REMOTE = parse_record("node-b", 2, ["172.31.0.2"], ["10.2.0.0/24", "fd00:e:2::/64"], "vxlan", 0)
LOCAL_ENDPOINT, IDENTITY = "10.1.0.10", 300


@dataclass
class Overlay:
    dp: Datapath
    obj: BpfObject

    def run(self, program: str, frame: bytes) -> tuple[int, dict[Reason, int]]:
        before = self.dp.counted()
        verdict = self.obj.programs[program].test_run(frame).retval
        after = self.dp.counted()
        return verdict, {r: n - before.get(r, 0) for r, n in after.items() if n != before.get(r, 0)}


@pytest.fixture(scope="module")
def overlay(make_datapath: Callable[[], Datapath]) -> Iterator[Overlay]:
    dp = make_datapath()
    obj = BpfObject.open(BPF_BUILD / "overlay.o", pin_root=dp.globals_dir)
    obj.load()  # pins the ipcache it reads, as node.o does in a node
    try:
        dp.set_ipcache({f"{LOCAL_ENDPOINT}/32": IDENTITY})
        tunnels = obj.typed_map("tunnel_map", IpcacheKey, TunnelValue)
        for network in REMOTE.networks():
            tunnels.update(ipcache_key(network), tunnel_value(REMOTE))
        yield Overlay(dp, obj)
    finally:
        obj.close()


def eth() -> Ether:
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


ROWS = [
    ("to a remote node's IPv4 CIDR: a tunnel key, passed", "overlay_egress",
     eth() / IP(src=LOCAL_ENDPOINT, dst="10.2.0.5") / TCP(dport=80), TC_ACT_OK, {}),
    ("IPv6 over the node's IPv4 underlay: passed", "overlay_egress",
     eth() / IPv6(src="fd00:e:1::a", dst="fd00:e:2::5") / TCP(dport=80), TC_ACT_OK, {}),
    ("to no remote node: NO_TUNNEL_ENDPOINT", "overlay_egress",
     eth() / IP(src=LOCAL_ENDPOINT, dst="10.9.0.5") / TCP(dport=80), TC_ACT_SHOT,
     {Reason.NO_TUNNEL_ENDPOINT: 1}),
    ("ARP into a NOARP overlay: dropped, not counted", "overlay_egress",
     eth() / ARP(pdst="10.2.0.5"), TC_ACT_SHOT, {}),
    ("into the overlay's ingress without tunnel metadata: INVALID_PACKET", "overlay_ingress",
     eth() / IP(src="10.2.0.5", dst=LOCAL_ENDPOINT) / TCP(dport=80), TC_ACT_SHOT, {Reason.INVALID_PACKET: 1}),
]  # fmt: skip


@pytest.mark.parametrize(("what", "program", "frame", "verdict", "counted"), ROWS, ids=[r[0] for r in ROWS])
def test_overlay_rows(
    overlay: Overlay, what: str, program: str, frame: Ether, verdict: int, counted: dict[Reason, int]
) -> None:
    got, reasons = overlay.run(program, bytes(frame))
    assert (got, reasons) == (verdict, counted), what


def test_tunnel_map_is_pinned_with_the_node_maps(overlay: Overlay) -> None:
    """The encryption service of the next issue reads it from globals/."""
    with Map.from_pin(overlay.dp.globals_dir / "tunnel_map") as pinned:
        assert len(list(pinned.keys())) == 2
