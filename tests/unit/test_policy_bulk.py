"""The bulk import path keeps the service's behaviour: what is stored reads back the same (old
stores too), a bulk of rules lands in every map with its rule names, a refused bulk changes
nothing, and the shortcuts (cached selectors and port rules, the hashed IPv4 prefixes, the
packed identity answer) give what the plain code gives.

Real parts as in test_policy_limits: the policy class over real maps, the orchestrator's
identity classes and ipcache, and SQLite stores, all in this process.
"""

from __future__ import annotations

import ctypes
import ipaddress
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from weir.policy.v1 import policy_pb2 as pb

from pybpf import Map
from services.common import ipv4
from services.common.bpffs import remove_pins
from services.common.datapath import RuleName
from services.common.errors import InvalidArgument
from services.common.ipv4 import parse_ipv4_network
from services.common.objects import load_service_object
from services.common.store import Store
from services.orchestrator.identities import Identities
from services.orchestrator.ipcache import Ipcache
from services.orchestrator.servicer import identity_update
from services.policy import rules as rules_mod
from services.policy.compute import EndpointView
from services.policy.maps import RULE_NAMES, PolicyMaps
from services.policy.policy import Policy
from services.policy.sources import identity_views
from tests.harness.local_node import LocalNode
from tests.harness.node import BPF_BUILD, pid_prefix

pytestmark = pytest.mark.root

_counter = itertools.count()
APPS = ("frontend", "backend", "db")


@dataclass
class Local:
    policy: Policy
    maps: PolicyMaps
    store: Store
    identities: Identities
    ipcache: Ipcache
    endpoints: list[EndpointView]
    node: LocalNode
    globals_dir: Path
    orch_store: Store

    def state(self) -> dict[str, Any]:
        return {
            "maps": {ep.id: (self.maps.flags(ep.id), sorted(self.maps.read(ep.id).items())) for ep in self.endpoints},
            "rules": (self.store.items("rule"), self.store.revision("rule")),
            "identities": self.identities.all(),
            "ipcache": self.ipcache.read(),
        }

    def restarted(self) -> Policy:
        """A second policy class over the same store and maps, started as after a restart."""
        policy = Policy(self.maps, self.store, self.node)
        policy.start(wait_for_node=0)
        return policy


@pytest.fixture
def local(tmp_path: Path, built: Path) -> Iterator[Local]:
    root = Path("/sys/fs/bpf") / f"{pid_prefix()}pb{next(_counter)}"
    globals_dir = root / "globals"
    node_maps = load_service_object(BPF_BUILD / "node.o", globals_dir, root / "orchestrator", [])
    orch_store, policy_store = Store(tmp_path / "orchestrator.db", any_thread=True), Store(tmp_path / "policy.db")
    maps = PolicyMaps(BPF_BUILD, globals_dir, root / "policy", 65536)
    try:
        ipcache = Ipcache(node_maps.maps["ipcache"], node_maps.maps["ipcache_generation"])
        ids = Identities(orch_store, ipcache)
        endpoints = []
        for n, app in enumerate(APPS, 1):
            labels = {"app": app}
            identity = ids.for_labels(labels)
            endpoints.append(EndpointView(app, n, f"198.18.0.{n}", "", labels, identity))
            ids.endpoint_up(identity, [ipaddress.ip_network(f"198.18.0.{n}/32")])
        ids.sync_ipcache()
        node = LocalNode(ids, endpoints)
        policy = Policy(maps, policy_store, node)
        policy.start(wait_for_node=0)
        yield Local(policy, maps, policy_store, ids, ipcache, endpoints, node, globals_dir, orch_store)
    finally:
        maps.close()
        node_maps.close()
        orch_store.close()
        policy_store.close()
        remove_pins(root)


def bulk(count: int, tag: str = "r") -> list[pb.Rule]:
    """As bench.policy_import: rule i selects one app and allows egress to its own /32 on TCP/443."""
    return [
        pb.Rule(
            name=f"{tag}-{i:05d}",
            endpoint_selector=pb.EndpointSelector(match_labels={"app": APPS[i % len(APPS)]}),
            egress=[
                pb.PeerRule(
                    cidrs=[pb.CidrRule(cidr=f"{ipaddress.IPv4Address(0x0A000000 + i)}/32")],
                    ports=[pb.PortRule(port=443, protocol="TCP")],
                )
            ],
        )
        for i in range(count)
    ]


def varied() -> list[pb.Rule]:
    """Rules that take the slow paths: a namespace, excepts, IPv6, HTTP rules, a named port, specs."""
    web = pb.EndpointSelector(match_labels={"app": "backend"})
    return [
        pb.Rule(name="ns-rule", namespace="prod", endpoint_selector=web,
                ingress=[pb.PeerRule(endpoints=[pb.EndpointSelector(match_labels={"app": "frontend"})],
                                     ports=[pb.PortRule(port=80, protocol="TCP", http=[pb.HttpRule(method="GET")])])]),
        pb.Rule(name="excepts", endpoint_selector=web, description="with excepts",
                egress=[pb.PeerRule(cidrs=[pb.CidrRule(cidr="10.9.0.0/16", **{"except": ["10.9.1.0/24"]}),
                                           pb.CidrRule(cidr="2001:db8::/32")],
                                    ports=[pb.PortRule(name="http", protocol="TCP")])]),
        pb.Rule(name="specs", endpoint_selector=web, egress_deny=[pb.PeerRule(entities=["world"])],
                specs=[pb.Rule(endpoint_selector=pb.EndpointSelector(match_labels={"app": "db"}),
                               ingress=[pb.PeerRule(ports=[pb.PortRule(port=5432, end_port=5440)])])]),
    ]  # fmt: skip


def listed(policy: Policy) -> list[pb.Rule]:
    return [rules_mod.to_proto(r) for r in policy.list_rules(10_000)[0]]


def rule_names(local: Local) -> dict[int, str]:
    """The node's pinned rule-name map, as the orchestrator reads it."""
    with Map.from_pin(local.globals_dir / RULE_NAMES, key_type=ctypes.c_uint32, value_type=RuleName) as names:
        return {int(k): bytes(v.name).rstrip(b"\0").decode() for k, v in names.items()}


def test_stored_rules_read_back_the_same_after_a_restart(local: Local) -> None:
    local.policy.import_rules([*varied(), *bulk(30)])
    before = listed(local.policy)
    assert [r.name for r in before][:3] == ["excepts", "ns-rule", "r-00000"]
    confined = next(r for r in before if r.name == "ns-rule")
    assert confined.endpoint_selector.match_labels["k8s:io.kubernetes.pod.namespace"] == "prod"
    after = local.restarted()
    assert listed(after) == before
    for rule in map(rules_mod.from_proto, [*varied(), *bulk(3)]):  # the text written is the document's JSON
        assert rule.source_text == json.dumps(rule.source, sort_keys=True, separators=(",", ":"))
    assert {ep.id: after.endpoint_policy(ep.name)[0].entries for ep in local.endpoints} == {
        ep.id: local.policy.endpoint_policy(ep.name)[0].entries for ep in local.endpoints
    }


def test_a_store_written_as_message_json_still_loads(local: Local) -> None:
    """Stores written before rules were kept in their wire form hold the message's JSON."""
    for message in varied():
        enforced = rules_mod.to_proto(rules_mod.from_proto(message))
        doc = json_format.MessageToDict(enforced, preserving_proto_field_name=True)
        key = f"{message.namespace}/{message.name}" if message.namespace else message.name
        local.store.put("rule", key, doc)
        assert rules_mod.from_stored(doc) == rules_mod.from_proto(message)
    local.store.bump_revision("rule")
    assert [r.name for r in listed(local.restarted())] == ["excepts", "ns-rule", "specs"]


def test_a_bulk_import_fills_every_map_and_names_every_rule(local: Local) -> None:
    count = 600
    _, changed = local.policy.import_rules(bulk(count))
    assert changed == sorted(APPS)
    names = set(rule_names(local).values())
    assert {f"r-{i:05d}" for i in range(count)} <= names
    for n, ep in enumerate(local.endpoints):
        policy, _, _ = local.policy.endpoint_policy(ep.name)
        in_map = local.maps.read(ep.id)
        want = len(range(n, count, len(APPS)))
        assert len(policy.entries) == len(in_map) == want
        assert {e.rules for e in policy.entries} == {(f"r-{i:05d}",) for i in range(n, count, len(APPS))}
        for entry in policy.entries:
            key = (int(entry.direction), entry.identity, entry.proto, entry.port, entry.key_prefixlen)
            assert in_map[key][0] is False  # an allow, at the key compute gave
    published = local.ipcache.read()
    for i in range(count):
        assert ipaddress.ip_network(f"{ipaddress.IPv4Address(0x0A000000 + i)}/32") in published


def test_bulk_cidr_identities_read_back_from_the_orchestrator_store(local: Local) -> None:
    """CIDR identity documents are written as text for speed: they read back as the dicts they
    stand for, and an orchestrator restarted over the store knows the same identities."""
    local.policy.import_rules(bulk(40))
    local.identities.allocate_cidr_ids("other.owner-2", [ipaddress.ip_network("10.0.0.1/32")], reserve_only=True)
    docs = dict(local.orch_store.items("identity"))
    first = docs["cidr:10.0.0.1/32"]
    assert first == {"id": first["id"], "owners": ["other.owner-2", "policy"], "published": True}
    assert docs["cidr:10.0.0.2/32"]["owners"] == ["policy"] and docs["cidr:10.0.0.2/32"]["published"] is True
    assert Identities(local.orch_store, local.ipcache).all() == local.identities.all()


def test_packed_cidr_identities_give_the_policy_what_messages_give(local: Local) -> None:
    """The identity stream's packed CIDR form (WatchIdentities packed_cidrs) and one message per
    identity convert to the same views: reserved, published, several owners, IPv6, label ones."""
    local.policy.import_rules([*varied(), *bulk(20)])
    local.identities.allocate_cidr_ids("other", [ipaddress.ip_network("10.9.9.0/24")], reserve_only=True)
    local.identities.allocate_cidr_ids("other", [ipaddress.ip_network("10.0.0.3/32")])
    change = local.identities.snapshot()
    assert len(change.cidrs.ids) > 20 and not any(i.labels[0].startswith("cidr:") for i in change.upserted)
    packed, plain = (identity_views(identity_update(change, packed)) for packed in (True, False))
    assert sorted(packed, key=lambda v: v.id) == sorted(plain, key=lambda v: v.id)
    assert [i.id for i in change.infos()] == [i.id for i in local.identities.all()]
    assert change.infos() == local.identities.all()


def test_a_refused_bulk_changes_nothing(local: Local) -> None:
    local.policy.import_rules(bulk(50, "keep"))
    before = local.state()
    for bad in ("10.0.0.1/8", "10.0.0.256/32", "10.0.0.1/32%eth0", " 10.0.0.1/32"):
        rules = bulk(200)
        rules[-1].egress[0].cidrs[0].cidr = bad
        with pytest.raises(InvalidArgument, match=r"rule r-00199: egress\[0\]\.cidrs\[0\]"):
            local.policy.import_rules(rules)
        assert local.state() == before


def test_cached_selectors_and_ports_give_what_parsing_gives() -> None:
    bad = pb.Rule(name="bad", endpoint_selector=pb.EndpointSelector(match_labels={"app": "a b"}))
    for _ in range(2):  # a refusal is never cached as an answer
        with pytest.raises(InvalidArgument, match="label value"):
            rules_mod.from_proto(bad)
    first, second = (rules_mod.from_proto(r) for r in bulk(4)[::3])
    assert first.selector == second.selector and first.egress[0].ports == second.egress[0].ports
    plain = rules_mod._parse_selector(bulk(1)[0].endpoint_selector, "x")
    assert first.selector == plain and first.selector.matches({"app": "frontend"})
    l7_port = pb.PortRule(port=80, protocol="TCP", http=[pb.HttpRule()])
    deny = pb.Rule(name="deny", endpoint_selector=pb.EndpointSelector(), egress_deny=[pb.PeerRule(ports=[l7_port])])
    with pytest.raises(InvalidArgument, match="deny section takes no L7 rules"):
        rules_mod.from_proto(deny)


def test_fast_ipv4_prefixes_equal_the_standard_ones() -> None:
    """Built without ipaddress's constructor (IPv4Network.of), they behave as its objects do."""
    for text in ("10.0.0.1/32", "10.0.0.2/31", "10.0.0.0/8", "0.0.0.0/0", "192.168.4.0/22", "255.255.255.255/32"):
        fast, plain = parse_ipv4_network(text), ipaddress.IPv4Network(text)
        assert fast is not None
        assert fast == plain and hash(fast) == hash(plain) and str(fast) == text and repr(fast) == repr(plain)
        assert {plain: 1}[fast] == 1 and fast.supernet() == plain.supernet()
        assert list(fast.subnets())[:1] == list(plain.subnets())[:1]
        assert (fast.netmask, fast.hostmask, fast.prefixlen) == (plain.netmask, plain.hostmask, plain.prefixlen)
        assert (fast.broadcast_address, fast.num_addresses) == (plain.broadcast_address, plain.num_addresses)
        assert fast.subnet_of(plain) and plain.supernet_of(fast) and fast.is_private == plain.is_private
        assert not fast < plain and not plain < fast and sorted([fast, plain]) == [plain, plain]
        if fast.prefixlen >= 22:
            assert list(fast.hosts()) == list(plain.hosts())
        assert fast == ipv4.IPv4Network.of(int(plain.network_address), plain.prefixlen)
    assert str(ipv4.IPv4Network.of(0x0A000100, 24)) == "10.0.1.0/24"


def test_packed_identity_answers_follow_the_request(local: Local) -> None:
    nets = [ipaddress.ip_network(t) for t in ("10.7.0.0/16", "2001:db8:7::/48", "10.7.0.0/16", "10.8.0.0/16")]
    ids = local.identities.allocate_cidr_ids("test", nets, reserve_only=True)
    assert ids[0] == ids[2] and len(set(ids)) == 3
    infos = local.identities.allocate_cidrs("test", nets)
    assert [i.id for i in infos] == [ids[0], ids[1], ids[3]]
    assert local.ipcache.read()[nets[3]] == ids[3]
