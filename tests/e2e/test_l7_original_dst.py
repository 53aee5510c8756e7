"""Transparent forwarding: a redirected connection reaches its original destination through Envoy.

The datapath's redirect comes later (BPF); here iptables REDIRECT stands in for it, inside
a namespace the test makes: the client's connections (marked with SO_MARK, so Envoy's own
upstream connections are not redirected again) to 192.0.2.10:8080 land on the proxy port,
and the listener (use_original_dst, no upstream) forwards what its rules allow to the
address the client dialled, which Envoy reads back with SO_ORIGINAL_DST.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from weir.l7.v1 import l7_pb2 as pb

from tests.harness import netns
from tests.harness.l7 import INGRESS, Service, Upstream, rule, start_upstream
from tests.harness.node import pid_prefix

pytestmark = pytest.mark.root

SO_MARK = 36
MARK = 0x77
ORIGINAL = ("192.0.2.10", 8080)
PROXY_PORT = 15080


@pytest.fixture
def redirected(tmp_path: Path) -> Iterator[tuple[str, Upstream, Service]]:
    ns = f"{pid_prefix()}l7od"
    netns.create(ns)
    upstream: Upstream | None = None
    service: Service | None = None
    try:
        netns.run(ns, "ip", "link", "set", "lo", "up")
        netns.run(ns, "ip", "addr", "add", f"{ORIGINAL[0]}/32", "dev", "lo")
        netns.run(ns, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", ORIGINAL[0],
                  "--dport", str(ORIGINAL[1]), "-m", "mark", "--mark", str(MARK),
                  "-j", "REDIRECT", "--to-ports", str(PROXY_PORT))  # fmt: skip
        with netns.entered(ns):
            upstream = start_upstream(*ORIGINAL)
        service = Service(tmp_path, upstream, wrap=tuple(netns.nsenter_argv(ns)))
        service.start()
        yield ns, upstream, service
    finally:
        if service is not None and service.process is not None:
            service.stop()
            print(f"---- l7.log ----\n{service.tail(40)}")
        if upstream is not None:
            upstream.server.shutdown()
        netns.remove(ns)


def redirected_request(ns: str, method: str, path: str) -> tuple[int, str]:
    """A request to the original destination, from a marked socket (so iptables redirects it)."""
    with netns.entered(ns):
        sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
    sock.settimeout(5)
    sock.connect(ORIGINAL)
    conn = http.client.HTTPConnection(*ORIGINAL, timeout=5)
    conn.sock = sock
    try:
        conn.request(method, path)
        reply = conn.getresponse()
        return reply.status, reply.read().decode()
    finally:
        conn.close()


def test_a_redirected_connection_goes_to_its_original_destination(
    redirected: tuple[str, Upstream, Service],
) -> None:
    ns, upstream, service = redirected
    listener = pb.Listener(
        direction=INGRESS, port=ORIGINAL[1], proxy_port=PROXY_PORT, use_original_dst=True,
        rules=[rule("public", method="GET", path="/public")],
    )  # fmt: skip
    reply = service.stub().SetListeners(
        pb.SetListenersRequest(endpoint="od", listeners=[listener], wait_applied=True), timeout=10
    )
    assert reply.applied, reply
    assert redirected_request(ns, "GET", "/public") == (200, "upstream GET /public")
    assert redirected_request(ns, "POST", "/public") == (403, "RBAC: access denied")
    assert not upstream.got("POST", "/public")
    call = service.stub().WatchEvents(pb.WatchEventsRequest(endpoint="od", replay=True), timeout=10)
    first = next(iter(call))
    call.cancel()
    assert first.destination == f"{ORIGINAL[0]}:{ORIGINAL[1]}", "the event names the original destination"
    unmarked = subprocess.run(
        [*netns.nsenter_argv(ns), "python3", "-c",
         f"import socket; socket.create_connection({ORIGINAL!r}, timeout=2).close()"],
        capture_output=True, timeout=10,
    )  # fmt: skip
    assert unmarked.returncode == 0  # the upstream itself is there; only marked flows are redirected
