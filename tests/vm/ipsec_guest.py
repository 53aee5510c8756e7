"""The VM tier's IPsec checks, run inside the VM: `python -m tests.vm.ipsec_guest RWDIR [--hold]`.

With `--hold` it sets up and then waits for the host's RWDIR/go before the timed phases:
the host boots it niced while its own tests run, and lets it go when the VM tests start.

It measures and writes facts to RWDIR/result.json after each phase (so a phase that
fails or times out still leaves the earlier ones); the pytest test on the host
(`tests/vm/test_ipsec_vm.py`) asserts on them. First, every BPF program of bpf/build
is loaded on this kernel's verifier (tests.vm.load_all). Phases, direct routing with peers set
through the ipsec API: encrypted path (IPv4 and IPv6 endpoints, ESP between the IPv4
underlay addresses), rotation under a counted stream, a wrong key, removing and
re-adding the peer under traffic, SIGKILLing the ipsec service under traffic (nothing
lost). Before them, the VXLAN overlay with peers from the orchestrators' node tables:
each orchestrator is told of the other node (UpsertNode, VXLAN, its key index) while a
stream runs (strict mode drops it until the peer is there: only ESP on the underlay),
the ipsec services follow, b's capture of the decrypted VXLAN packets shows each
sender's identity in the VNI, and a full-size TCP stream crosses unfragmented (the
overlay MTU leaves room for ESP). (b's policy service cannot judge it here: policy.bpf.c no longer
passes the 6.1 verifier, "BPF program is too large".)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from weir.ipsec.v1 import ipsec_pb2 as pb
from weir.ipsec.v1 import ipsec_pb2_grpc as pb_grpc
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc

from services.common.datapath import VXLAN_PORT
from services.common.overlay import overlay_ifname
from tests.harness import netns
from tests.harness.capture import Capture
from tests.harness.traffic import CountedStream
from tests.vm.ipsec_nodes import (
    START_TIMEOUT,
    UNDERLAY_IF,
    IpsecNode,
    counters,
    make_pair,
    parallel,
    peer,
    set_key,
    write_key,
)
from tests.vm.load_all import check_all

MARKER = b"WEIR-PLAINTEXT-MARKER-0123456789"
WORLD = "203.0.113.7"  # the outside namespace of node a: not a cluster address
GRACE = 5.0
RATE = 200  # datagrams per second of the counted streams (TCG is slow)
HOST_GONE = 300.0  # seconds without a heartbeat from the host before a held guest gives up


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _send(ns: str, address: str, port: int, payload: bytes, count: int) -> None:
    with netns.entered(ns):
        sock = socket.socket(_family(address), socket.SOCK_DGRAM)
    with sock:
        for _ in range(count):
            sock.sendto(payload, (address, port))
            time.sleep(0.02)


def _receiver(ns: str, address: str, port: int) -> socket.socket:
    with netns.entered(ns):
        sock = socket.socket(_family(address), socket.SOCK_DGRAM)
    sock.bind((address, port))
    sock.settimeout(0.5)
    return sock


def _drain(sock: socket.socket, marker: bytes) -> int:
    got = 0
    while True:
        try:
            data = sock.recv(65535)
        except TimeoutError:
            return got
        got += data == marker


def _addresses(a: IpsecNode, b: IpsecNode) -> set[str]:
    return {a.endpoint_ip, b.endpoint_ip}


def _stream(a: IpsecNode, b: IpsecNode, port: int) -> CountedStream:
    return CountedStream(a.endpoint_ns, b.endpoint_ns, b.endpoint_ip, port, rate=RATE).start()


def _loss(result: Any, since: int | None = None) -> dict[str, Any]:
    """Sent, received, lost; `resumed`: every datagram from `since` on arrived (default: the last half second).

    `since` counts datagrams: under a loaded VM the sender falls behind its rate, so "the
    last half second" of datagrams may reach back to before the datapath was whole again.
    """
    start = max(result.sent - RATE // 2, 0) if since is None else since
    tail = set(range(start, result.sent))
    return {
        "sent": result.sent,
        "received": result.received,
        "lost": len(result.missing),
        "resumed": bool(tail) and not tail & set(result.missing),
    }


def phase_encrypted(a: IpsecNode, b: IpsecNode) -> dict[str, Any]:
    before_a, before_b = counters(a), counters(b)
    rx = _receiver(b.endpoint_ns, b.endpoint_ip, 9000)
    rx6 = _receiver(b.endpoint_ns, b.endpoint_ip6, 9001)
    with rx, rx6, Capture(a.node.ns, UNDERLAY_IF) as underlay, Capture(a.node.outside, "eth0") as outside:
        _send(a.endpoint_ns, b.endpoint_ip, 9000, MARKER, 20)
        _send(a.endpoint_ns, b.endpoint_ip6, 9001, MARKER, 20)  # IPv6 endpoints, ESP between IPv4 underlays
        _send(a.endpoint_ns, WORLD, 9000, MARKER, 5)
        delivered = _drain(rx, MARKER)
        delivered6 = _drain(rx6, MARKER)
    after_a, after_b = counters(a), counters(b)
    return {
        "delivered": delivered,
        "delivered6": delivered6,
        "underlay_ipv6_packets": len(underlay.ipv6()),
        "underlay_plaintext6": underlay.plaintext6_between({a.endpoint_ip6, b.endpoint_ip6}),
        "underlay_protocols": sorted(underlay.ip_protocols()),
        "underlay_esp": len(underlay.esp()),
        "underlay_marker": underlay.contains(MARKER),
        "underlay_plaintext": underlay.plaintext_between(_addresses(a, b)),
        "outside_marker": outside.contains(MARKER),
        "encrypted_a": after_a.peers[0].encrypted.packets - before_a.peers[0].encrypted.packets,
        "decrypted_b": after_b.peers[0].decrypted.packets - before_b.peers[0].decrypted.packets,
        "spis": sorted(set(underlay.esp_spis())),
        "xfrm_errors_a": {k: v for k, v in after_a.xfrm_errors.items() if v},
        "xfrm_errors_b": {k: v for k, v in after_b.xfrm_errors.items() if v},
        "datapath_a": {k: v.packets for k, v in after_a.datapath.items()},
        "datapath_b": {k: v.packets for k, v in after_b.datapath.items()},
    }


def phase_rotation(a: IpsecNode, b: IpsecNode, keys: Path) -> dict[str, Any]:
    k2 = write_key(keys / "k2", 2, bytes(range(100, 120)))
    rotations = counters(a).rotations
    with Capture(a.node.ns, UNDERLAY_IF) as cap:
        stream = _stream(a, b, 9100)
        time.sleep(1.0)
        t0 = time.monotonic()
        parallel(lambda: set_key(a, k2), lambda: set_key(b, k2))  # installed everywhere before any use
        t_installed = time.monotonic()
        parallel(lambda: peer(a, b, 2), lambda: peer(b, a, 2))  # each side learns the other has key 2
        t_switched = time.monotonic()
        time.sleep(2.0)
        result = stream.finish()
    esp = cap.esp(src=a.underlay)
    last_old = max((t for t, spi in esp if spi == 1), default=t0)
    first_new = min((t for t, spi in esp if spi == 2), default=0.0)
    after_new = [spi for t, spi in esp if t > first_new]
    status_deadline = time.monotonic() + 60
    keys_left: list[int] = []
    while time.monotonic() < status_deadline:
        with a.node.channel("ipsec") as channel:
            status = pb_grpc.IpsecStub(channel).GetStatus(pb.GetStatusRequest(), timeout=60)
        keys_left = [k.spi for k in status.keys]
        if keys_left == [2]:
            break
        time.sleep(1)
    return {
        **_loss(result),
        "spis_in_order": [spi for i, (_, spi) in enumerate(esp) if i == 0 or esp[i - 1][1] != spi],
        "old_after_new": sum(1 for spi in after_new if spi == 1),
        "install_seconds": t_installed - t0,
        "switch_seconds": t_switched - t_installed,
        "rotation_seconds": max(last_old, first_new) - t0,
        "plaintext": cap.plaintext_between(_addresses(a, b)),
        "rotations": counters(a).rotations - rotations,
        "keys_after_grace": keys_left,
    }


def phase_wrong_key(a: IpsecNode, b: IpsecNode, keys: Path) -> dict[str, Any]:
    ka = write_key(keys / "k3a", 3, bytes(range(40, 60)))
    kb = write_key(keys / "k3b", 3, bytes(range(60, 80)))  # the same index, another key: a misconfigured node
    parallel(lambda: set_key(a, ka), lambda: set_key(b, kb))
    parallel(lambda: peer(a, b, 3), lambda: peer(b, a, 3))
    before = counters(b)
    rx = _receiver(b.endpoint_ns, b.endpoint_ip, 9200)
    with rx, Capture(a.node.ns, UNDERLAY_IF) as cap:
        _send(a.endpoint_ns, b.endpoint_ip, 9200, MARKER, 10)
        delivered = _drain(rx, MARKER)
    after = counters(b)
    # put it right: a new index with the same key on both sides
    k4 = write_key(keys / "k4", 4, bytes(range(140, 160)))
    parallel(lambda: set_key(a, k4), lambda: set_key(b, k4))
    parallel(lambda: peer(a, b, 4), lambda: peer(b, a, 4))
    rx = _receiver(b.endpoint_ns, b.endpoint_ip, 9201)
    with rx:
        _send(a.endpoint_ns, b.endpoint_ip, 9201, MARKER, 5)
        repaired = _drain(rx, MARKER)
    errors = {k: after.xfrm_errors[k] - before.xfrm_errors.get(k, 0) for k in after.xfrm_errors}
    return {
        "delivered": delivered,
        "esp_sent": len(cap.esp(src=a.underlay)),
        "xfrm_errors": {k: v for k, v in errors.items() if v},
        "integrity_failed": after.peers[0].integrity_failed - before.peers[0].integrity_failed,
        "plaintext": cap.plaintext_between(_addresses(a, b)),
        "delivered_after_repair": repaired,
    }


def phase_remove_readd(a: IpsecNode, b: IpsecNode) -> dict[str, Any]:
    before_b = counters(b).xfrm_errors
    with Capture(a.node.ns, UNDERLAY_IF) as cap:
        stream = _stream(a, b, 9300)
        time.sleep(1.0)
        first_absent = stream.sent  # from the DeletePeer call to the end of the re-adding call: an upper bound
        with a.node.channel("ipsec") as channel:
            pb_grpc.IpsecStub(channel).DeletePeer(pb.DeletePeerRequest(name=b.node.name), timeout=60)
        time.sleep(1.5)
        peer(a, b, 4)
        back = stream.sent
        time.sleep(2.0)
        result = stream.finish()
    after_b = counters(b).xfrm_errors
    return {
        **_loss(result, since=back),
        "plaintext": cap.plaintext_between(_addresses(a, b)),
        "esp": len(cap.esp()),
        "sent_while_absent": back - first_absent,
        "lost_before_delete": [n for n in result.missing if n < first_absent][:20],
        "lost_after_readd": [n for n in result.missing if n >= back][:20],
        "gaps": _gaps(result.missing),
        "xfrm_b": {k: v - before_b.get(k, 0) for k, v in after_b.items() if v != before_b.get(k, 0)},
    }


def _snmp(ns: str) -> dict[str, int]:
    """The Udp counters of a namespace (where a receive-buffer overflow is counted)."""
    lines = [line.split() for line in netns.run(ns, "cat", "/proc/net/snmp").stdout.splitlines()]
    rows = [row for row in lines if row and row[0] == "Udp:"]
    return {k: int(v) for k, v in zip(rows[0][1:], rows[1][1:], strict=False)} if len(rows) == 2 else {}


def _softnet_dropped() -> int:
    """Packets the per-CPU backlog queues dropped (second column of softnet_stat, hex)."""
    with open("/proc/net/softnet_stat") as f:
        return sum(int(line.split()[1], 16) for line in f if line.strip())


def _gaps(missing: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive missing sequence numbers (first, last), the first 20."""
    runs: list[tuple[int, int]] = []
    for n in sorted(missing):
        if runs and runs[-1][1] == n - 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return runs[:20]


def _where_lost(a: IpsecNode, b: IpsecNode) -> dict[str, Any]:
    """Every counter a lost datagram would show in: the receiver's socket, the backlog, xfrm, the BPF program."""
    ca, cb = counters(a), counters(b)
    return {
        "udp_b": {k: v for k, v in _snmp(b.endpoint_ns).items() if k in ("InDatagrams", "RcvbufErrors", "InErrors")},
        "softnet_dropped": _softnet_dropped(),
        "xfrm_a": dict(ca.xfrm_errors),
        "xfrm_b": dict(cb.xfrm_errors),
        "datapath_a": {k: v.packets for k, v in ca.datapath.items()},
    }


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in after.items():
        if isinstance(value, dict):
            grown = _grown(before.get(key, {}), value)
            if grown:
                out[key] = grown
        elif value - before.get(key, 0):
            out[key] = value - before.get(key, 0)
    return out


def phase_sigkill(a: IpsecNode, b: IpsecNode) -> dict[str, Any]:
    counted_before = _where_lost(a, b)
    with Capture(a.node.ns, UNDERLAY_IF) as cap:
        stream = _stream(a, b, 9400)
        time.sleep(1.0)
        a.node.kill("ipsec", signal.SIGKILL)
        killed_at = stream.sent
        time.sleep(2.0)
        a.node.start("ipsec", "--rotation-grace", str(GRACE), timeout=START_TIMEOUT)
        restarted_at = stream.sent
        time.sleep(2.0)
        result = stream.finish()
    after = counters(a)
    return {
        **_loss(result, since=restarted_at),
        "killed_at": killed_at,
        "restarted_at": restarted_at,
        "gaps": _gaps(result.missing),
        "counted": _delta(counted_before, _where_lost(a, b)),
        "sent_while_down": restarted_at - killed_at,
        "plaintext": cap.plaintext_between(_addresses(a, b)),
        "egress_spi_after_restart": after.peers[0].egress_spi,
    }


def load_all_phase() -> dict[str, Any]:
    """Every program of every object in bpf/build, loaded alone on this kernel (tests.vm.load_all)."""
    return {"programs": check_all()}


def _create(n: IpsecNode, name: str, ipv4: str, app: str) -> orch_pb.Endpoint:
    with n.node.channel("orchestrator") as channel:
        request = orch_pb.CreateEndpointRequest(name=name, ipv4=ipv4, labels={"app": app})
        return orch_grpc.OrchestratorStub(channel).CreateEndpoint(request, timeout=120)


def _peers(n: IpsecNode) -> list[pb.Peer]:
    with n.node.channel("ipsec") as channel:
        return list(pb_grpc.IpsecStub(channel).ListPeers(pb.ListPeersRequest(), timeout=60).peers)


def phase_overlay(a: IpsecNode, b: IpsecNode, key_index: int) -> dict[str, Any]:
    """VXLAN between the nodes, peers from the node tables; only ESP on the underlay, the VNI identity intact.

    Afterwards the nodes go back to what the other phases expect: no remote node in the
    node tables (so no node-table peer), direct routes.
    """
    try:
        return _overlay(a, b, key_index)
    finally:
        for n, remote in ((a, b), (b, a)):
            with n.node.channel("orchestrator") as channel:
                orch = orch_grpc.OrchestratorStub(channel)
                with contextlib.suppress(grpc.RpcError):
                    orch.DeleteNode(orch_pb.DeleteNodeRequest(name=remote.node.name), timeout=120)
            netns.run(n.node.ns, "ip", "route", "replace", remote.cidr, "via", remote.underlay, "dev", UNDERLAY_IF)
        deadline = time.monotonic() + 60
        while (_peers(a) or _peers(b)) and time.monotonic() < deadline:
            time.sleep(0.5)


def _overlay(a: IpsecNode, b: IpsecNode, key_index: int) -> dict[str, Any]:
    made = {app: _create(a, app, f"198.18.1.{i}", app) for i, app in ((11, "client"), (12, "other"))}
    client, other = made["client"], made["other"]
    for n, remote in ((a, b), (b, a)):  # the direct routes go: the only route to b is the one UpsertNode makes
        netns.run(n.node.ns, "ip", "route", "del", remote.cidr, "via", remote.underlay, "dev", UNDERLAY_IF)
    before_window = counters(a)
    with Capture(a.node.ns, UNDERLAY_IF) as window:
        stream = CountedStream(client.netns, b.endpoint_ns, b.endpoint_ip, 9504, rate=RATE).start()
        time.sleep(0.5)
        t0 = time.monotonic()
        for n, remote in ((a, b), (b, a)):
            with n.node.channel("orchestrator") as channel:
                orch_grpc.OrchestratorStub(channel).UpsertNode(
                    orch_pb.UpsertNodeRequest(node=remote.node_record(key_index)), timeout=120
                )
        deadline = time.monotonic() + 60
        peers: list[pb.Peer] = []
        while time.monotonic() < deadline:
            peers = _peers(a) + _peers(b)
            if len(peers) == 2 and all(p.source == "nodes" and p.vxlan and p.egress_spi == key_index for p in peers):
                break
            time.sleep(0.2)
        followed = time.monotonic() - t0
        peered_at = stream.sent
        time.sleep(2.0)  # the stream goes on, encrypted
        result = stream.finish()
    after_window = counters(a)
    new_node = {
        **_loss(result, since=peered_at),
        "underlay_protocols": sorted(window.ip_protocols()),
        "underlay_not_esp": _sent_not_esp(window, a.underlay),
        "underlay_esp": len(window.esp()),
        "pending_drops": after_window.datapath["PENDING"].packets - before_window.datapath["PENDING"].packets,
    }
    # an operator's direct route (metric 0) wins over the overlay's while it is there
    netns.run(a.node.ns, "ip", "route", "add", b.cidr, "via", b.underlay, "dev", UNDERLAY_IF)
    misrouted = _misrouted(a, b, client)
    netns.run(a.node.ns, "ip", "route", "del", b.cidr, "via", b.underlay, "dev", UNDERLAY_IF)
    before_a, before_b = counters(a), counters(b)
    rx_client = _receiver(b.endpoint_ns, b.endpoint_ip, 9500)
    rx_other = _receiver(b.endpoint_ns, b.endpoint_ip, 9501)
    rx_node = _receiver(b.endpoint_ns, b.endpoint_ip, 9502)
    with (
        rx_client,
        rx_other,
        rx_node,
        Capture(a.node.ns, UNDERLAY_IF) as underlay,
        Capture(b.node.ns, UNDERLAY_IF) as received,
    ):
        _send(client.netns, b.endpoint_ip, 9500, MARKER, 20)
        _send(other.netns, b.endpoint_ip, 9501, MARKER, 10)
        try:  # the node's own packets: no slot marks them, so the VXLAN packet carries no encrypt mark
            _send(a.node.ns, b.endpoint_ip, 9502, MARKER, 5)
            node_send = "sent"
        except OSError as exc:
            node_send = f"refused: {exc}"
        delivered = [_drain(rx, MARKER) for rx in (rx_client, rx_other, rx_node)]
    after_a, after_b = counters(a), counters(b)
    block = "XfrmOutPolBlock"
    return {
        "new_node": new_node,
        "tcp": _full_size_tcp(a, b, client),
        "misrouted": misrouted,
        "peers": [{"name": p.name, "source": p.source, "vxlan": p.vxlan, "egress_spi": p.egress_spi} for p in peers],
        "follow_seconds": round(followed, 2),
        "identities": {app: ep.identity for app, ep in made.items()},
        "received_vnis": _vnis(received),
        "delivered_client": delivered[0],
        "delivered_other": delivered[1],
        "delivered_node": delivered[2],
        "node_send": node_send,
        "underlay_protocols": sorted(underlay.ip_protocols()),
        "underlay_esp": len(underlay.esp()),
        "underlay_marker": underlay.contains(MARKER),
        "underlay_plaintext": underlay.plaintext_between({client.ipv4, other.ipv4, b.endpoint_ip}),
        "spis": sorted(set(underlay.esp_spis())),
        "encrypted_a": after_a.peers[0].encrypted.packets - before_a.peers[0].encrypted.packets,
        "decrypted_b": after_b.peers[0].decrypted.packets - before_b.peers[0].decrypted.packets,
        "blocked_a": after_a.xfrm_errors.get(block, 0) - before_a.xfrm_errors.get(block, 0),
        "xfrm_errors_b": _grown(before_b.xfrm_errors, after_b.xfrm_errors),
    }


def _sent_not_esp(cap: Capture, underlay: str) -> int:
    """Packets this node sent on the underlay that are not ESP (plain VXLAN, say).

    By source address: the capture also sees what xfrm decrypted come in again on the
    device (the peer's packets, from its underlay address), which never crossed the wire so.
    """
    src = socket.inet_aton(underlay)
    return sum(1 for p in cap.ipv4() if p[9] != 50 and p[12:16] == src)


def _full_size_tcp(a: IpsecNode, b: IpsecNode, client: Any, size: int = 1 << 20) -> dict[str, Any]:
    """A TCP stream of full-size segments through the encrypted overlay: none fragmented on the underlay.

    The overlay device's MTU leaves room for VXLAN and ESP (services.ipsec.mtu), so the
    sender's path MTU keeps each ESP packet within the underlay's 1500 bytes.
    """
    data = os.urandom(size)
    got = hashlib.sha256()
    received = [0]
    with netns.entered(b.endpoint_ns):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((b.endpoint_ip, 9600))
    listener.listen(1)
    listener.settimeout(60)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(60)
            while chunk := conn.recv(65536):
                got.update(chunk)
                received[0] += len(chunk)

    server = threading.Thread(target=serve, daemon=True)
    t0 = time.monotonic()
    with listener, Capture(a.node.ns, UNDERLAY_IF) as cap:
        server.start()
        with netns.entered(client.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(60)
            sock.connect((b.endpoint_ip, 9600))
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            server.join(90)
    link = json.loads(netns.run(a.node.ns, "ip", "-j", "link", "show", overlay_ifname(a.node.name)).stdout)
    return {
        "bytes": received[0],
        "intact": received[0] == size and got.digest() == hashlib.sha256(data).digest(),
        "seconds": round(time.monotonic() - t0, 2),
        "fragments": cap.fragments(),
        "underlay_esp": len(cap.esp()),
        "underlay_not_esp": _sent_not_esp(cap, a.underlay),
        "largest_esp": cap.largest_ipv4(50),
        "overlay_mtu": int(link[0]["mtu"]),
    }


def _misrouted(a: IpsecNode, b: IpsecNode, client: Any) -> dict[str, Any]:
    """An overlay peer's endpoint packets while a direct route (metric 0) still wins over the overlay's.

    The pass for endpoint packets is bound to the VXLAN device, so these meet the
    default-drop policy instead of leaving in plaintext on the underlay.
    """
    before = counters(a)
    with _receiver(b.endpoint_ns, b.endpoint_ip, 9503) as rx, Capture(a.node.ns, UNDERLAY_IF) as underlay:
        _send(client.netns, b.endpoint_ip, 9503, MARKER, 5)
        delivered = _drain(rx, MARKER)
    block = "XfrmOutPolBlock"
    return {
        "delivered": delivered,
        "underlay_marker": underlay.contains(MARKER),
        "underlay_plaintext": underlay.plaintext_between({client.ipv4, b.endpoint_ip}),
        "blocked": counters(a).xfrm_errors.get(block, 0) - before.xfrm_errors.get(block, 0),
    }


def _vnis(cap: Capture) -> dict[int, int]:
    """VNI -> count of the VXLAN packets in a capture (on the receiver: the ones xfrm decrypted and re-injected)."""
    out: dict[int, int] = {}
    for p in cap.ipv4():
        ihl = (p[0] & 0xF) * 4
        if p[9] == 17 and len(p) >= ihl + 16 and int.from_bytes(p[ihl + 2 : ihl + 4], "big") == VXLAN_PORT:
            vni = int.from_bytes(p[ihl + 12 : ihl + 15], "big")
            out[vni] = out.get(vni, 0) + 1
    return out


def _grown(before: Any, after: Any) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def hold(rwdir: Path) -> float:
    """Wait for the host's RWDIR/go before the timed phases; give up once the host stops beating.

    The host boots the VM niced at the start of its session and lets it go when the VM
    tests start. Its heartbeat (RWDIR/host-alive, rewritten every few seconds) ends the
    wait, and the VM, if the host process died without stopping it.
    """
    started = last_change = time.monotonic()
    beat = ""
    while not (rwdir / "go").exists():
        with contextlib.suppress(OSError):
            now = (rwdir / "host-alive").read_text()
            if now != beat:
                beat, last_change = now, time.monotonic()
        if time.monotonic() - last_change > HOST_GONE:
            raise RuntimeError(f"no heartbeat from the host for {HOST_GONE:.0f} s while holding: it is gone")
        time.sleep(0.5)
    return round(time.monotonic() - started, 1)


def main(rwdir: Path, held: bool) -> None:
    results: dict[str, Any] = {"started": time.time()}
    out = rwdir / "result.json"

    def save() -> None:
        out.write_text(json.dumps(results, indent=1, sort_keys=True))
        print(f"[{time.monotonic():.0f}] saved: {sorted(results)}", flush=True)

    def phase(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t = time.monotonic()
        try:
            results[name] = fn()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = round(time.monotonic() - t, 1)
        save()

    phase("load_all", load_all_phase)
    work = Path("/tmp/weir-vm")
    keys = work / "keys"
    keys.mkdir(parents=True, mode=0o700)
    t = time.monotonic()
    try:
        a, b = make_pair(work, "wv", GRACE)
    except Exception:
        results["setup_error"] = traceback.format_exc()
        save()
        raise
    try:
        k1 = write_key(keys / "k1", 1, bytes(range(20)))
        parallel(lambda: set_key(a, k1), lambda: set_key(b, k1))
        results["setup_seconds"] = round(time.monotonic() - t, 1)
        save()
        if held:
            results["held_seconds"] = hold(rwdir)
            save()
        phase("overlay", lambda: phase_overlay(a, b, 1))  # then back to direct routing, peers from the API
        parallel(lambda: peer(a, b, 1), lambda: peer(b, a, 1))
        phase("encrypted", lambda: phase_encrypted(a, b))
        phase("rotation", lambda: phase_rotation(a, b, keys))
        phase("wrong_key", lambda: phase_wrong_key(a, b, keys))
        phase("remove_readd", lambda: phase_remove_readd(a, b))
        phase("sigkill", lambda: phase_sigkill(a, b))
    except Exception:
        results["setup_error"] = traceback.format_exc()
    finally:
        results["done"] = True
        save()
        a.node.teardown()
        b.node.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), held="--hold" in sys.argv[2:])
