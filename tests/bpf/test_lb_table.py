"""The load balancer's per-packet NAT, packet by packet, through the real chains.

`lb_from_container` / `lb_from_network` sit in the LB slot (DNAT to a backend),
`lb_to_container` / `lb_to_network` in LB_REPLY (the frontend back as the
source of replies). Services are written with the service's LbMaps:

    10.96.0.10:80/TCP  -> 10.0.1.1:8080         10.96.0.10:53/UDP -> 10.0.1.2:5353
    10.96.0.11:80/TCP  -> no backends           10.96.0.12:80/TCP -> one backend, in maintenance
    10.96.0.13:80/TCP  -> 10.0.1.5:80 or 10.0.1.6:80
    10.96.0.15:80/TCP  -> 10.0.1.7:80 (drained by a test)
    10.96.0.16:80/TCP  -> 10.0.1.10:80 or 10.0.1.11:80, session affinity

Every translated frame is compared with the input rewritten by scapy and every
checksum recomputed: the incremental checksum updates must give the same bytes.
The LB is IPv4-only today; IPv6 passes untouched. What it cannot parse it
passes untranslated (it judges nothing; the stack drops malformed IP).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Packet

from services.common.datapath import Hook, Reason
from services.lb.defs import BackendState
from services.lb.model import Backend, Service
from tests.bpf.packets import SAME, Row, checksums_valid, cut, dnat, eth, params, rebuilt, run_row, snat
from tests.harness.bpfrun import TC_ACT_OK, TC_ACT_SHOT, Datapath, lb_changes

CLIENT = "10.0.0.10"
VIP, VIP_EMPTY, VIP_MAINT, VIP_PAIR = "10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13"
VIP_DRAIN, VIP_STICKY = "10.96.0.15", "10.96.0.16"
DRAIN, STICKY_A, STICKY_B = ("10.0.1.7", 80), ("10.0.1.10", 80), ("10.0.1.11", 80)
WEB, DNS, PAIR_A, PAIR_B = ("10.0.1.1", 8080), ("10.0.1.2", 5353), ("10.0.1.5", 80), ("10.0.1.6", 80)
SPORT = 40000


def service(name: str, address: str, port: int, protocol: str, *backends: Backend) -> Service:
    return Service(name, False, address, port, protocol, tuple(backends))


SERVICES = [
    service("web", VIP, 80, "TCP", Backend(*WEB)),
    service("dns", VIP, 53, "UDP", Backend(*DNS)),
    service("empty", VIP_EMPTY, 80, "TCP"),
    service("maint", VIP_MAINT, 80, "TCP", Backend("10.0.1.4", 80, state=BackendState.MAINTENANCE)),
    service("pair", VIP_PAIR, 80, "TCP", Backend(*PAIR_A), Backend(*PAIR_B)),
    service("drain", VIP_DRAIN, 80, "TCP", Backend(*DRAIN)),
    replace(service("sticky", VIP_STICKY, 80, "TCP", Backend(*STICKY_A), Backend(*STICKY_B)), affinity_timeout=60),
]

E, N, TC, TN = Hook.FROM_CONTAINER, Hook.FROM_NETWORK, Hook.TO_CONTAINER, Hook.TO_NETWORK
OK, SHOT = TC_ACT_OK, TC_ACT_SHOT


def to(dst: str, l4: Packet, src: str = CLIENT) -> Packet:
    return eth() / IP(src=src, dst=dst) / l4


def syn(dport: int = 80, sport: int = SPORT) -> TCP:
    return TCP(sport=sport, dport=dport, flags="S")


def from_backend(backend: tuple[str, int], l4: Packet) -> Packet:
    return eth() / IP(src=backend[0], dst=CLIENT) / l4


WEB_SYN = to(VIP, syn())
WEB_REPLY = from_backend(WEB, TCP(sport=WEB[1], dport=SPORT, flags="SA"))
DNS_QUERY = to(VIP, UDP(sport=SPORT, dport=53) / b"query")
DNS_ANSWER = from_backend(DNS, UDP(sport=DNS[1], dport=SPORT) / b"answer")
OPTIONS_SYN = eth() / IP(src=CLIENT, dst=VIP, options=b"\x01" * 8) / syn()
FIRST_FRAGMENT = eth() / IP(src=CLIENT, dst=VIP, id=91, flags="MF") / UDP(sport=SPORT, dport=53) / bytes(32)
LATER_FRAGMENT = eth() / IP(src=CLIENT, dst=VIP, id=91, frag=5, proto=17) / bytes(24)

ROWS = [
    # ---- DNAT ----
    Row("TCP SYN to a frontend goes to its backend", E, WEB_SYN, OK, output=dnat(WEB_SYN, WEB)),
    Row(
        "TCP ACK of a translated connection keeps its backend",
        E,
        to(VIP, TCP(sport=SPORT, dport=80, flags="A")),
        OK,
        output=dnat(to(VIP, TCP(sport=SPORT, dport=80, flags="A")), WEB),
        prior=((E, WEB_SYN),),
    ),
    Row("UDP to a frontend goes to its backend", E, DNS_QUERY, OK, output=dnat(DNS_QUERY, DNS)),
    Row(
        "UDP without a checksum keeps none",
        E,
        to(VIP, UDP(sport=SPORT, dport=53, chksum=0) / b"q"),
        OK,
        output=dnat(to(VIP, UDP(sport=SPORT, dport=53, chksum=0) / b"q"), DNS),
    ),
    Row("TCP SYN from the network to a frontend goes to its backend", N, WEB_SYN, OK, output=dnat(WEB_SYN, WEB)),
    Row(
        "TCP SYN with IPv4 options goes to the backend, the port behind the options rewritten",
        E,
        OPTIONS_SYN,
        OK,
        output=dnat(OPTIONS_SYN, WEB),
    ),
    Row(
        "TCP SYN with payload goes to the backend",
        E,
        to(VIP, syn() / (b"x" * 100)),
        OK,
        output=dnat(to(VIP, syn() / (b"x" * 100)), WEB),
    ),
    Row(
        "TCP SYN to a two-backend frontend goes to one of them",
        E,
        to(VIP_PAIR, syn()),
        OK,
        output=(dnat(to(VIP_PAIR, syn()), PAIR_A), dnat(to(VIP_PAIR, syn()), PAIR_B)),
    ),
    Row("TCP SYN to a frontend without backends drops", E, to(VIP_EMPTY, syn()), SHOT, Reason.NO_SERVICE_BACKEND),
    Row(
        "TCP SYN to a frontend whose backend is in maintenance drops",
        E,
        to(VIP_MAINT, syn()),
        SHOT,
        Reason.NO_SERVICE_BACKEND,
    ),
    Row("TCP to a port the frontend address does not serve passes untouched", E, to(VIP, syn(81)), OK),
    Row("UDP to the port of a TCP frontend passes untouched", E, to(VIP, UDP(sport=SPORT, dport=80)), OK),
    Row("TCP to the port of a UDP frontend passes untouched", E, to(VIP, syn(53)), OK),
    Row("ICMP echo to a frontend address passes untouched", E, to(VIP, ICMP(type=8)), OK),
    Row("TCP to an address that is no frontend passes untouched", E, to("10.0.1.1", syn(8080)), OK),
    Row("v6 TCP passes untouched", E, eth() / IPv6(src="fd00::10", dst="fd00::96") / syn(), OK),
    Row(
        "ARP for a frontend address passes",
        E,
        Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=CLIENT, pdst=VIP),
        OK,
    ),
    # ---- reverse NAT ----
    Row(
        "TCP reply from the backend gets the frontend as its source",
        TC,
        WEB_REPLY,
        OK,
        output=snat(WEB_REPLY, (VIP, 80)),
        prior=((E, WEB_SYN),),
    ),
    Row(
        "UDP reply from the backend gets the frontend as its source",
        TC,
        DNS_ANSWER,
        OK,
        output=snat(DNS_ANSWER, (VIP, 53)),
        prior=((E, DNS_QUERY),),
    ),
    Row(
        "TCP reply to the network gets the frontend as its source",
        TN,
        WEB_REPLY,
        OK,
        output=snat(WEB_REPLY, (VIP, 80)),
        prior=((N, WEB_SYN),),
    ),
    Row(
        "TCP reply with IPv4 options gets the frontend as its source",
        TC,
        eth() / IP(src=WEB[0], dst=CLIENT, options=b"\x01" * 8) / TCP(sport=WEB[1], dport=SPORT, flags="SA"),
        OK,
        output=snat(
            eth() / IP(src=WEB[0], dst=CLIENT, options=b"\x01" * 8) / TCP(sport=WEB[1], dport=SPORT, flags="SA"),
            (VIP, 80),
        ),
        prior=((E, WEB_SYN),),
    ),
    Row("TCP from the backend without a translated connection passes untouched", TC, WEB_REPLY, OK),
    Row(
        "TCP reply to another client port passes untouched",
        TC,
        from_backend(WEB, TCP(sport=WEB[1], dport=SPORT + 1, flags="SA")),
        OK,
        prior=((E, WEB_SYN),),
    ),
    Row(
        "a direct SYN on the tuple of a translated connection ends its reverse NAT",
        TC,
        WEB_REPLY,
        OK,
        prior=((E, WEB_SYN), (E, to(WEB[0], syn(WEB[1])))),
    ),
    # ---- fragments ----
    Row(
        "UDP first fragment to a frontend goes to its backend", E, FIRST_FRAGMENT, OK, output=dnat(FIRST_FRAGMENT, DNS)
    ),
    Row(
        "UDP later fragment to a frontend goes to the first fragment's backend",
        E,
        LATER_FRAGMENT,
        OK,
        output=rebuilt(LATER_FRAGMENT, IP={"dst": DNS[0]}),
        prior=((E, FIRST_FRAGMENT),),
    ),
    # ---- malformed and truncated ----
    Row("Ethernet header cut short is refused by test_run", E, cut(WEB_SYN, 12), None, None),
    Row("v4 header cut short is refused by test_run", E, cut(WEB_SYN, 14 + 19), None, None),
    Row("v4 ihl below 5 to a frontend passes untranslated", E, eth() / IP(src=CLIENT, dst=VIP, ihl=4) / syn(), OK),
    Row(
        "v4 ihl past the end to a frontend passes untranslated", E, eth() / IP(src=CLIENT, dst=VIP, ihl=15) / syn(), OK
    ),
    Row("TCP cut short to a frontend passes untranslated", E, cut(WEB_SYN, 14 + 20 + 12), OK),
    Row(
        "TCP data offset past the end to a frontend passes untranslated",
        E,
        to(VIP, TCP(sport=SPORT, dport=80, flags="S", dataofs=15)),
        OK,
    ),
    Row(
        "TCP data offset below 5 to a frontend passes untranslated",
        E,
        to(VIP, TCP(sport=SPORT, dport=80, flags="S", dataofs=4)),
        OK,
    ),
    Row("UDP cut short to a frontend passes untranslated", E, cut(DNS_QUERY, 14 + 20 + 6), OK),
    Row("TCP reply cut short passes untranslated", TC, cut(WEB_REPLY, 14 + 20 + 10), OK, prior=((E, WEB_SYN),)),
]


@pytest.fixture(scope="module")
def lb_dp(make_datapath: Callable[[], Datapath], scratch_cgroup: Path) -> Datapath:
    dp = make_datapath()
    dp.load_lb(scratch_cgroup).write(lb_changes(SERVICES))
    return dp


@pytest.fixture
def dp(lb_dp: Datapath) -> Iterator[Datapath]:
    lb_dp.reset()
    yield lb_dp


@pytest.mark.parametrize("row", params(ROWS))
def test_lb(dp: Datapath, row: Row) -> None:
    outcome = run_row(dp, row)
    if outcome is not None and row.output is not SAME:
        assert checksums_valid(outcome.data), f"{row.desc}: a checksum of the translated frame is wrong"


def test_new_connections_count_once(dp: Datapath) -> None:
    """A SYN opens a connection on its service and backend; the packets after it open none."""
    assert dp.lb is not None
    before = dp.lb.counts("lb_service_stats", 1), dp.lb.counts("lb_backend_stats", 16)
    dp.run(E, bytes(WEB_SYN))
    dp.run(E, bytes(to(VIP, TCP(sport=SPORT, dport=80, flags="A"))))
    after = dp.lb.counts("lb_service_stats", 1), dp.lb.counts("lb_backend_stats", 16)
    assert [a.new_conns - b.new_conns for a, b in zip(after, before, strict=True)] == [1, 1]
    assert [a.packets - b.packets for a, b in zip(after, before, strict=True)] == [2, 2]


@pytest.mark.parametrize(
    ("state", "keeps"),
    [(BackendState.TERMINATING, True), (BackendState.MAINTENANCE, False)],
    ids=["terminating", "maintenance"],
)
def test_draining_backend(dp: Datapath, state: BackendState, keeps: bool) -> None:
    """A terminating backend keeps its connections and takes no new ones; one in maintenance loses both."""
    assert dp.lb is not None
    first, other = to(VIP_DRAIN, syn()), to(VIP_DRAIN, syn(80, SPORT + 1))
    ack = to(VIP_DRAIN, TCP(sport=SPORT, dport=80, flags="A"))
    run_row(dp, Row("SYN while the backend is active", E, first, OK, output=dnat(first, DRAIN)))
    drained = [replace(s, backends=(Backend(*DRAIN, state=state),)) if s.name == "drain" else s for s in SERVICES]
    dp.lb.write(lb_changes(drained))
    try:
        if keeps:
            run_row(dp, Row("ACK of the connection", E, ack, OK, output=dnat(ack, DRAIN)))
        else:
            run_row(dp, Row("ACK of the connection", E, ack, SHOT, Reason.NO_SERVICE_BACKEND))
        run_row(dp, Row("SYN of a new connection", E, other, SHOT, Reason.NO_SERVICE_BACKEND))
    finally:
        dp.lb.write(lb_changes(SERVICES))


def test_session_affinity_keeps_a_client_on_one_backend(dp: Datapath) -> None:
    """New connections of one client to an affinity service all go to the backend its first one got."""
    chosen = set()
    for sport in range(SPORT, SPORT + 8):
        frame = to(VIP_STICKY, syn(80, sport))
        outcome = run_row(
            dp, Row(f"SYN from port {sport}", E, frame, OK, output=(dnat(frame, STICKY_A), dnat(frame, STICKY_B)))
        )
        assert outcome is not None
        chosen.add(Ether(outcome.data)[IP].dst)
    assert len(chosen) == 1, f"one client's connections went to {sorted(chosen)}"
