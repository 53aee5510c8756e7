"""The Policy class with real maps: named ports follow the endpoints, flags reach the map, Trace per connection.

In-process with the real pieces (the policy maps in a private bpffs root, the
orchestrator's identity classes and ipcache, sqlite stores), so what is checked is
read back from the kernel maps.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from weir.policy.v1 import policy_pb2 as pb

from services.common.bpffs import remove_pins
from services.common.datapath import Direction
from services.common.errors import InvalidArgument
from services.common.objects import load_service_object
from services.common.store import Store
from services.orchestrator.identities import Identities
from services.orchestrator.ipcache import Ipcache
from services.policy.compute import TCP, EndpointView, NamedPort
from services.policy.defs import ConfigFlag
from services.policy.maps import PolicyMaps
from services.policy.policy import Policy
from tests.harness.local_node import LocalNode
from tests.harness.node import BPF_BUILD, pid_prefix

pytestmark = pytest.mark.root

_counter = itertools.count()
EGRESS = int(Direction.EGRESS)


@dataclass
class Local:
    policy: Policy
    maps: PolicyMaps
    endpoints: dict[str, EndpointView]

    def entries(self, name: str) -> set[tuple[int, int, int, int]]:
        """(direction, identity, protocol, port) of the endpoint's map entries, read from the kernel."""
        return {(d, i, p, port) for (d, i, p, port, _), _ in self.maps.read(self.endpoints[name].id).items()}


@pytest.fixture
def local(tmp_path: Path, built: Path) -> Iterator[Local]:
    root = Path("/sys/fs/bpf") / f"{pid_prefix()}ps{next(_counter)}"
    globals_dir = root / "globals"
    node_maps = load_service_object(BPF_BUILD / "node.o", globals_dir, root / "orchestrator", [])
    orch_store, policy_store = Store(tmp_path / "orchestrator.db", any_thread=True), Store(tmp_path / "policy.db")
    maps = PolicyMaps(BPF_BUILD, globals_dir, root / "policy", 4096)
    try:
        ids = Identities(orch_store, Ipcache(node_maps.maps["ipcache"], node_maps.maps["ipcache_generation"]))
        endpoints = {}
        for n, app in enumerate(("client", "web", "api"), 1):
            labels = {"app": app}
            identity = ids.for_labels(labels)
            endpoints[app] = EndpointView(app, n, f"198.18.0.{n}", f"2001:db8:e::{n}", labels, identity)
            ids.endpoint_up(identity, [ipaddress.ip_network(f"198.18.0.{n}/32")])
        ids.sync_ipcache()
        policy = Policy(maps, policy_store, LocalNode(ids, list(endpoints.values())))
        policy.start(wait_for_node=0)
        yield Local(policy, maps, endpoints)
    finally:
        maps.close()
        node_maps.close()
        orch_store.close()
        policy_store.close()
        remove_pins(root)


def sel(app: str) -> pb.EndpointSelector:
    return pb.EndpointSelector(match_labels={"app": app})


def test_egress_named_port_follows_the_endpoints_named_ports(local: Local) -> None:
    """A rule on a port name is resolved again when an endpoint's named ports change (the stream says so)."""
    rule = pb.Rule(name="client-out", endpoint_selector=sel("client"), egress=[
        pb.PeerRule(endpoints=[pb.EndpointSelector()], ports=[pb.PortRule(name="http", protocol="TCP")]),
    ])  # fmt: skip
    local.policy.import_rules([rule])
    web, api = local.endpoints["web"], local.endpoints["api"]
    assert local.entries("client") == set()  # nobody defines "http" yet: nothing allowed
    web = replace(web, named_ports=(NamedPort("http", 8080, "TCP"),))
    api = replace(api, named_ports=(NamedPort("http", 9090, "TCP"),))
    changed = local.policy.on_endpoints(False, [web, api], [])
    assert "client" in changed
    assert local.entries("client") == {(EGRESS, web.identity, TCP, 8080), (EGRESS, api.identity, TCP, 9090)}
    api = replace(api, named_ports=(NamedPort("http", 9191, "TCP"),))
    local.policy.on_endpoints(False, [api], [])
    assert local.entries("client") == {(EGRESS, web.identity, TCP, 8080), (EGRESS, api.identity, TCP, 9191)}


def test_default_allow_reaches_the_endpoint_config(local: Local) -> None:
    loose = pb.Rule(name="loose", endpoint_selector=sel("web"), enable_default_deny=pb.DefaultDeny(ingress=False),
                    ingress_deny=[pb.PeerRule(endpoints=[sel("client")])])  # fmt: skip
    local.policy.import_rules([loose])
    web = local.endpoints["web"].id
    assert local.maps.flags(web) == ConfigFlag.INGRESS_ENFORCED | ConfigFlag.INGRESS_DEFAULT_ALLOW
    strict = pb.Rule(name="strict", endpoint_selector=sel("web"), ingress=[pb.PeerRule(endpoints=[sel("api")])])
    local.policy.import_rules([strict])
    assert local.maps.flags(web) == ConfigFlag.INGRESS_ENFORCED
    local.policy.delete_rules(["strict"])
    assert local.maps.flags(web) == ConfigFlag.INGRESS_ENFORCED | ConfigFlag.INGRESS_DEFAULT_ALLOW


def test_trace_by_connection(local: Local) -> None:
    client, web = local.endpoints["client"], local.endpoints["web"]
    local.policy.import_rules([
        pb.Rule(name="web-in", endpoint_selector=sel("web"),
                ingress=[pb.PeerRule(endpoints=[sel("client")], ports=[pb.PortRule(port=8080, protocol="TCP")])],
                ingress_deny=[pb.PeerRule(ports=[pb.PortRule(port=22, protocol="TCP")])]),
    ])  # fmt: skip
    new = local.policy.trace(client.ipv4, web.ipv4, 8080, "TCP")
    assert new.allowed and new.path == "policy" and new.rules == ["web-in"]
    assert any("web-in (ingress)" in s for s in new.steps)
    denied = local.policy.trace(client.ipv4, web.ipv4, 22, "TCP", "established")
    assert not denied.allowed and denied.path == "policy" and any("web-in (ingressDeny)" in s for s in denied.steps)
    reply = local.policy.trace(web.ipv4, client.ipv4, 8080, "TCP", "reply")
    assert reply.allowed and reply.path == "reply" and reply.rules == ["web-in"]
    # a reply to nothing: the client's port 9000 connection to web was never allowed, so web's packet is new
    no_reply = local.policy.trace(web.ipv4, client.ipv4, 9000, "TCP", "reply")
    assert no_reply.path == "policy" and "no reply path" in no_reply.steps[0]
    related = local.policy.trace(web.ipv4, client.ipv4, 8080, "TCP", "related")
    assert related.allowed and related.path == "related"
    # ICMPv6 into web is denied (web's ingress is enforced, no ICMPv6 rule); ICMP is IPv4's
    assert not local.policy.trace(client.ipv6, web.ipv6, 128, "ICMPV6").allowed
    with pytest.raises(InvalidArgument, match="ICMP is not IPv6's; use ICMPV6"):
        local.policy.trace(client.ipv6, web.ipv6, 128, "ICMP")
    with pytest.raises(InvalidArgument, match="connection 'soon' is not one of new, established, reply, related"):
        local.policy.trace(client.ipv4, web.ipv4, 80, "TCP", "soon")
    with pytest.raises(InvalidArgument, match="TCP, UDP, SCTP, ICMP, ICMPV6"):
        local.policy.trace(client.ipv4, web.ipv4, 80, "GRE")
