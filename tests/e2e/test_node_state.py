"""The node's shared state lives in the orchestrator: identities, the ipcache, conntrack GC.

Real processes and traffic for what users see (the endpoints map carries the identity the
orchestrator allocated, identities survive its restart, policy keeps enforcing and takes
changes while it restarts); the real classes in-process for the change protocol's
injected failures (a store write or commit that fails, a map that is full mid-change),
where the state before the call must be the state after it.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import itertools
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.policy.v1 import policy_pb2 as pb
from weir.policy.v1 import policy_pb2_grpc as pb_grpc

from pybpf import Map, MapFullError
from services.common.bpffs import remove_pins
from services.common.datapath import CtKey, CtValue, EndpointInfo, IpcacheKey, IpcacheValue
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.objects import load_service_object
from services.common.store import Store
from services.common.validate import Network
from services.orchestrator.identities import Identities
from services.orchestrator.ipcache import Ipcache, ipcache_network
from services.policy.compute import EndpointView, MapEntry
from services.policy.maps import PolicyMaps
from services.policy.policy import Policy
from services.policy.reserve import EARLY_MIN_CIDRS
from services.policy.sources import OWNER
from tests.e2e.test_policy import known, sel, tcp, three_tier
from tests.harness import traffic
from tests.harness.local_node import LocalNode
from tests.harness.node import BPF_BUILD, Node, pid_prefix

pytestmark = pytest.mark.root


def endpoints_map(node: Node) -> dict[int, int]:
    """host ifindex -> identity, as the datapath's entry programs read it."""
    with Map.from_pin(node.bpffs_root / "globals/endpoints", key_type=ctypes.c_uint32, value_type=EndpointInfo) as m:
        return {int(k): int(v.identity) for k, v in m.items()}


def ipcache_map(node: Node) -> dict[str, int]:
    with Map.from_pin(node.bpffs_root / "globals/ipcache", key_type=IpcacheKey, value_type=IpcacheValue) as m:
        return {str(ipcache_network(k)): int(v.identity) for k, v in m.items()}


def identities(node: Node) -> dict[str, tuple[int, tuple[str, ...], tuple[str, ...]]]:
    """labels text -> (id, prefixes, owners) from the orchestrator."""
    reply = node.orchestrator().ListIdentities(orch_pb.ListIdentitiesRequest(), timeout=5)
    return {",".join(i.labels): (i.id, tuple(i.prefixes), tuple(i.owners)) for i in reply.identities}


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# An endpoint created without a namespace is in "default" (as a pod), which is part of its labels.
WEB = "app=web,io.kubernetes.pod.namespace=default"
DB = "app=db,io.kubernetes.pod.namespace=default,tier=data"


def test_the_endpoints_map_carries_the_orchestrators_identity_for_the_labels(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator", "policy")
    web1 = node.create_endpoint("web1", {"app": "web"})
    web2 = node.create_endpoint("web2", {"app": "web"})
    db = node.create_endpoint("db", {"app": "db", "tier": "data"})
    ids = identities(node)
    assert web1.identity == web2.identity == ids[WEB][0] >= 256
    assert db.identity == ids[DB][0] not in (0, web1.identity)
    assert ids["reserved:host"][0] == 1 and ids["reserved:world"][0] == 2
    in_map = endpoints_map(node)
    assert {in_map[ep.host_ifindex] for ep in (web1, web2)} == {web1.identity}
    assert in_map[db.host_ifindex] == db.identity
    # the ipcache (written by the orchestrator alone) maps each address to the same number
    cache = ipcache_map(node)
    assert cache[f"{db.ipv4}/32"] == cache[f"{db.ipv6}/128"] == db.identity
    assert set(ids[WEB][1]) == {f"{web1.ipv4}/32", f"{web1.ipv6}/128", f"{web2.ipv4}/32", f"{web2.ipv6}/128"}
    assert cache["192.0.2.1/32"] == 1  # the node's own address: host
    # the datapath sees that identity: a drop leaving db carries it as the source identity
    s = pb_grpc.PolicyStub(node.channel("policy"))
    known(s, web1, db)
    s.ImportRules(
        pb.ImportRulesRequest(
            rules=[pb.Rule(name="db-out", endpoint_selector=sel(app="db"), egress=[pb.PeerRule(ports=[tcp(5432)])])]
        ),
        timeout=10,
    )
    events = node.orchestrator().WatchEvents(orch_pb.WatchEventsRequest(types=["DROP"]), timeout=20)
    time.sleep(0.3)
    with traffic.server(web1.netns, web1.ipv4, 8080):
        assert not traffic.tcp_connects(db.netns, web1.ipv4, 8080, timeout=0.8)
    drop = next(e for e in events if e.protocol == "TCP")
    events.cancel()
    assert (drop.src, drop.src_identity) == (db.ipv4, db.identity)
    # policy's view (from the stream) is the orchestrator's
    listed = {",".join(i.labels): i.id for i in s.ListIdentities(pb.ListIdentitiesRequest()).identities}
    assert listed[WEB] == web1.identity and listed[DB] == db.identity
    # a deleted endpoint's addresses leave the ipcache; its labels keep their number
    node.orchestrator().DeleteEndpoint(orch_pb.DeleteEndpointRequest(name="web2"), timeout=15)
    cache = ipcache_map(node)
    assert f"{web2.ipv4}/32" not in cache and cache[f"{web1.ipv4}/32"] == web1.identity
    assert web2.host_ifindex not in endpoints_map(node)
    assert node.create_endpoint("web3", {"app": "web"}).identity == web1.identity


def test_identities_are_stable_across_an_orchestrator_restart(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator", "policy")
    fe = node.create_endpoint("frontend", {"app": "frontend"})
    be = node.create_endpoint("backend", {"app": "backend"})
    s = pb_grpc.PolicyStub(node.channel("policy"))
    known(s, fe, be)
    rule = pb.Rule(name="be-in", endpoint_selector=sel(app="backend"), ingress=[
        pb.PeerRule(endpoints=[sel(app="frontend")], ports=[tcp(8080)]),
        pb.PeerRule(cidrs=[pb.CidrRule(cidr="203.0.113.0/24")], ports=[tcp(8080)]),
    ])  # fmt: skip
    s.ImportRules(pb.ImportRulesRequest(rules=[rule]), timeout=10)

    def state() -> tuple[object, ...]:
        """Identities, the endpoints map, the ipcache; host addresses aside (link-local ones come and go)."""
        ids = {k: v if k != "reserved:host" else v[0] for k, v in identities(node).items()}
        return ids, endpoints_map(node), {p: i for p, i in ipcache_map(node).items() if i != 1}

    before = state()
    assert before[0]["cidr:203.0.113.0/24"][2] == (OWNER,)  # type: ignore[index]
    assert before[2]["203.0.113.0/24"] == before[0]["cidr:203.0.113.0/24"][0]  # type: ignore[index]
    node.kill("orchestrator")
    node.start("orchestrator")
    assert state() == before
    # a new endpoint with known labels gets the known number; new labels a new one
    fe2 = node.create_endpoint("frontend2", {"app": "frontend"})
    other = node.create_endpoint("other", {"app": "other"})
    assert fe2.identity == fe.identity and other.identity not in {fe.identity, be.identity}
    # policy still enforces by labels, for the endpoints it followed again after the restart
    known(s, fe2)
    with traffic.server(be.netns, be.ipv4, 8080):
        assert eventually(lambda: traffic.tcp_connects(fe2.netns, be.ipv4, 8080, timeout=0.8))
        assert not traffic.tcp_connects(other.netns, be.ipv4, 8080, timeout=0.8)
        assert traffic.tcp_connects(node.outside, be.ipv4, 8080, timeout=0.8, source="203.0.113.7")
        assert not traffic.tcp_connects(node.outside, be.ipv4, 8080, timeout=0.8, source="198.51.100.9")


def test_cidr_identities_are_allocated_per_owner_and_published_on_request(node: Node) -> None:
    o = node.orchestrator()

    def allocate(owner: str, *cidrs: str, reserve_only: bool = False) -> list[int]:
        request = orch_pb.AllocateCIDRIdentitiesRequest(owner=owner, cidrs=cidrs, reserve_only=reserve_only)
        return [i.id for i in o.AllocateCIDRIdentities(request, timeout=5).identities]

    def release(owner: str, *cidrs: str) -> None:
        o.ReleaseCIDRIdentities(orch_pb.ReleaseCIDRIdentitiesRequest(owner=owner, cidrs=cidrs), timeout=5)

    reserved = allocate("a", "10.1.0.0/16", "2001:db8:1::/48", reserve_only=True)
    assert all(i >= 1 << 24 for i in reserved) and len(set(reserved)) == 2
    assert "10.1.0.0/16" not in ipcache_map(node)  # reserved, not yet published
    assert allocate("a", "10.1.0.0/16", "2001:db8:1::/48") == reserved  # idempotent, now published
    assert ipcache_map(node)["10.1.0.0/16"] == reserved[0]
    assert allocate("b", "10.1.0.0/16") == reserved[:1]
    release("a", "10.1.0.0/16", "2001:db8:1::/48")
    assert ipcache_map(node)["10.1.0.0/16"] == reserved[0]  # b still holds it
    assert "2001:db8:1::/48" not in ipcache_map(node)
    release("b", "10.1.0.0/16")
    assert "10.1.0.0/16" not in ipcache_map(node)
    assert not any(k.startswith("cidr:") for k in identities(node))
    with pytest.raises(grpc.RpcError) as err:
        allocate("a", "10.0.0.1/8")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "10.0.0.1/8" in (err.value.details() or "")
    # a watcher gets every identity first, then the changes; one that asks for packed CIDR
    # identities gets the same identities, the CIDR ones as parallel lists
    stream = o.WatchIdentities(orch_pb.WatchIdentitiesRequest(), timeout=10)
    packed = o.WatchIdentities(orch_pb.WatchIdentitiesRequest(packed_cidrs=True), timeout=10)
    first, packed_first = next(stream), next(packed)
    assert first.snapshot and {i.id for i in first.upserted} >= {1, 2}
    assert packed_first.snapshot and unpacked(packed_first) == unpacked(first)
    allocate("a", "10.2.0.0/16", reserve_only=True)
    allocate("a", "10.2.0.0/16", "10.3.0.0/16")
    allocate("b", "10.3.0.0/16")
    changes = [next(stream) for _ in range(3)]
    packed_changes = [next(packed) for _ in range(3)]
    stream.cancel()
    packed.cancel()
    assert not changes[0].snapshot and [list(i.labels) for i in changes[0].upserted] == [["cidr:10.2.0.0/16"]]
    assert [unpacked(c) for c in packed_changes] == [unpacked(c) for c in changes]
    assert not any(c.upserted for c in packed_changes)
    ten_two, ten_three = (i.id for i in changes[1].upserted)
    assert unpacked(changes[0]) == {ten_two: (("cidr:10.2.0.0/16",), (), ("a",))}
    assert unpacked(changes[2]) == {ten_three: (("cidr:10.3.0.0/16",), ("10.3.0.0/16",), ("a", "b"))}


def unpacked(update: orch_pb.IdentityUpdate) -> dict[int, tuple[tuple[str, ...], ...]]:
    """id -> (labels, prefixes, owners) of every identity an update upserts, packed CIDRs included."""
    out: dict[int, tuple[tuple[str, ...], ...]] = {
        i.id: (tuple(i.labels), tuple(i.prefixes), tuple(i.owners)) for i in update.upserted
    }
    c = update.cidrs
    for identity, cidr, published, owners in zip(c.ids, c.cidrs, c.published, c.owners, strict=True):
        out[identity] = ((f"cidr:{cidr}",), (cidr,) if published else (), tuple(owners.split(",")) if owners else ())
    return out


def test_a_policy_change_while_the_orchestrator_restarts(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator", "policy")
    fe = node.create_endpoint("frontend", {"app": "frontend"})
    be = node.create_endpoint("backend", {"app": "backend"})
    db = node.create_endpoint("db", {"app": "db", "tier": "data"})
    s = pb_grpc.PolicyStub(node.channel("policy"))
    known(s, fe, be, db)
    s.ImportRules(pb.ImportRulesRequest(rules=three_tier()), timeout=10)
    servers = {be.ipv4: be.netns, db.ipv4: db.netns}
    node.kill("orchestrator")
    # label rules need nothing from the orchestrator: the change is taken and enforced at once
    widened = pb.Rule(
        name="backend-in",
        endpoint_selector=sel(app="backend"),
        ingress=[pb.PeerRule(endpoints=[sel(app="frontend")], ports=[tcp(9090)])],
    )
    reply = s.ImportRules(pb.ImportRulesRequest(rules=[widened]), timeout=10)
    assert list(reply.endpoints) == ["backend"]
    with traffic.server(servers[be.ipv4], be.ipv4, 9090):
        assert traffic.tcp_connects(fe.netns, be.ipv4, 9090, timeout=0.8)
    with traffic.server(servers[be.ipv4], be.ipv4, 8080):
        assert not traffic.tcp_connects(fe.netns, be.ipv4, 8080, timeout=0.8)
    # a rule naming a new CIDR needs its identity: refused with a reason, nothing changed
    before = (s.ListRules(pb.ListRulesRequest()), s.GetEndpointPolicy(pb.GetEndpointPolicyRequest(endpoint="db")))
    cidr_rule = pb.Rule(
        name="db-from-net",
        endpoint_selector=sel(app="db"),
        ingress=[pb.PeerRule(cidrs=[pb.CidrRule(cidr="203.0.113.0/24")], ports=[tcp(5432)])],
    )
    with pytest.raises(grpc.RpcError) as err:
        s.ImportRules(pb.ImportRulesRequest(rules=[cidr_rule]), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "orchestrator" in (err.value.details() or "")
    after = (s.ListRules(pb.ListRulesRequest()), s.GetEndpointPolicy(pb.GetEndpointPolicyRequest(endpoint="db")))
    assert [r.name for r in after[0].rules] == [r.name for r in before[0].rules]
    assert after[0].revision == before[0].revision and after[1].entries == before[1].entries
    # the orchestrator is back: the streams resume, the same change now goes through
    node.start("orchestrator")
    assert eventually(lambda: _imports(s, cidr_rule), timeout=10)
    with traffic.server(servers[db.ipv4], db.ipv4, 5432):
        # the CIDR's identity reaches the ipcache and db's map through the restarted streams
        assert eventually(lambda: traffic.tcp_connects(node.outside, db.ipv4, 5432, timeout=0.8, source="203.0.113.7"))
        assert traffic.tcp_connects(be.netns, db.ipv4, 5432, timeout=0.8)
        assert not traffic.tcp_connects(fe.netns, db.ipv4, 5432, timeout=0.8)
    late = node.create_endpoint("backend2", {"app": "backend"})  # followed after the restart
    known(s, late)
    with traffic.server(servers[db.ipv4], db.ipv4, 5432):
        assert eventually(lambda: traffic.tcp_connects(late.netns, db.ipv4, 5432, timeout=0.8))


def _imports(s: pb_grpc.PolicyStub, rule: pb.Rule) -> bool:
    try:
        s.ImportRules(pb.ImportRulesRequest(rules=[rule]), timeout=10)
        return True
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return False


def test_conntrack_is_collected_by_the_orchestrator(make_node: Callable[..., Node]) -> None:
    node = make_node()
    node.start("orchestrator", "--ct-gc-seconds", "3600")
    with Map.from_pin(node.bpffs_root / "globals/conntrack", key_type=CtKey, value_type=CtValue) as ct:
        stale, live = CtKey(proto=17, family=2, dir=0), CtKey(proto=17, family=2, dir=1)
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        ct.update(stale, CtValue(expires=1, packets=1))
        ct.update(live, CtValue(expires=now + 60 * 10**9, packets=1))
        reply = node.orchestrator().CollectConntrack(orch_pb.CollectConntrackRequest(), timeout=5)
        assert reply.expired == 1 and stale not in ct and live in ct


# ---- the change protocol with injected failures (real maps and stores, in-process) ----

_counter = itertools.count()


class FlakyMaps(PolicyMaps):
    """The real maps, with the n-th endpoint map built failing as a full map would."""

    fail_at: int | None = None
    fail_after_swap = False  # the batch goes through, then a flags write fails
    swaps = 0

    def install_many(self, installs: Sequence[tuple[int, Iterable[MapEntry], int]]) -> None:
        super().install_many(installs)
        if self.fail_after_swap:
            raise MapFullError(errno.E2BIG, "policy_config is full")

    def _build(
        self,
        endpoint_id: int,
        entries: Sequence[MapEntry],
        rule_ids: dict[str, int],
        counted: dict[bytes, tuple[int, int]],
    ) -> tuple[Map, list[bytes]]:
        self.swaps += 1
        if self.fail_at is not None and self.swaps == self.fail_at:
            raise MapFullError(errno.E2BIG, f"policy map of endpoint {endpoint_id} is full")
        return super()._build(endpoint_id, entries, rule_ids, counted)


@dataclass
class Local:
    policy: Policy
    maps: FlakyMaps
    store: Store
    identities: Identities
    ipcache: Ipcache
    endpoints: list[EndpointView]
    orch_store: Store
    node: LocalNode

    def state(self) -> dict[str, Any]:
        """Everything a change may touch: policy maps, both stores, identities, the ipcache."""
        return {
            "maps": {ep.id: (self.maps.flags(ep.id), self.maps.read(ep.id).keys()) for ep in self.endpoints},
            "rules": (self.store.items("rule"), self.store.revision("rule"), self.store.items("audit")),
            "identities": self.identities.all(),
            "ipcache": self.ipcache.read(),
        }


@pytest.fixture
def local(tmp_path: Path, built: Path) -> Iterator[Local]:
    root = Path("/sys/fs/bpf") / f"{pid_prefix()}fi{next(_counter)}"
    globals_dir = root / "globals"
    node_maps = load_service_object(BPF_BUILD / "node.o", globals_dir, root / "orchestrator", [])
    orch_store, policy_store = Store(tmp_path / "orchestrator.db", any_thread=True), Store(tmp_path / "policy.db")
    maps = FlakyMaps(BPF_BUILD, globals_dir, root / "policy", 256)
    try:
        ipcache = Ipcache(node_maps.maps["ipcache"], node_maps.maps["ipcache_generation"])
        ids = Identities(orch_store, ipcache)
        endpoints = []
        for n, labels in enumerate(({"app": "frontend"}, {"app": "backend"}, {"app": "db", "tier": "data"}), 1):
            identity = ids.for_labels(labels)
            endpoints.append(EndpointView(labels["app"], n, f"198.18.0.{n}", f"2001:db8:e::{n}", labels, identity))
            ids.endpoint_up(identity, [ipaddress.ip_network(f"198.18.0.{n}/32")])
        ids.sync_ipcache()
        node = LocalNode(ids, endpoints)
        policy = Policy(maps, policy_store, node)
        policy.start(wait_for_node=0)
        yield Local(policy, maps, policy_store, ids, ipcache, endpoints, orch_store, node)
    finally:
        maps.close()
        node_maps.close()
        orch_store.close()
        policy_store.close()
        remove_pins(root)


def _with_cidrs() -> list[pb.Rule]:
    return [*three_tier(), pb.Rule(name="fe-from-net", endpoint_selector=sel(app="frontend"), ingress=[
        pb.PeerRule(cidrs=[pb.CidrRule(cidr="203.0.113.0/24", **{"except": ["203.0.113.8/32"]})], ports=[tcp(80)]),
    ])]  # fmt: skip


def _fail_commit(store: Store) -> None:
    def commit() -> None:
        raise sqlite3.OperationalError("database or disk is full")

    store.commit = commit  # type: ignore[method-assign]


def _fail_write(store: Store) -> None:
    def put_many(*_: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    store.put_many = put_many  # type: ignore[method-assign,assignment]
    store.put_many_text = put_many  # type: ignore[method-assign,assignment]
    store.delete_many = put_many  # type: ignore[method-assign,assignment]


@pytest.mark.parametrize("failure", ["store write", "store commit", "map full mid-change", "map full after the swap"])
@pytest.mark.parametrize("call", ["import", "delete"])
def test_a_failed_rule_change_leaves_maps_stores_and_identities_as_they_were(
    local: Local, failure: str, call: str
) -> None:
    policy = local.policy
    if call == "import":
        policy.import_rules(three_tier()[:1])  # the frontend's CIDR rule and the db's rule come with the change
    else:
        policy.import_rules(_with_cidrs())  # the change deletes the CIDR rule (and a label rule)
    before = local.state()
    assert before["maps"][2][1], "backend has a policy map before the change"
    if failure == "store write":
        _fail_write(local.store)
    elif failure == "store commit":
        _fail_commit(local.store)
    elif failure == "map full mid-change":
        local.maps.swaps, local.maps.fail_at = 0, 2  # the second endpoint's new map fails to fill
    else:
        local.maps.fail_after_swap = True
    expected: type[BaseException] = MapFullError if failure.startswith("map full") else ResourceExhausted
    with pytest.raises(expected):
        if call == "import":
            policy.import_rules(_with_cidrs())
        else:
            policy.delete_rules(["fe-from-net", "db-in"])
    assert local.state() == before
    # and the service goes on: the same change succeeds once the fault is gone
    for name in ("commit", "put_many", "put_many_text", "delete_many"):
        vars(local.store).pop(name, None)
    local.maps.fail_at, local.maps.fail_after_swap = None, False
    if call == "import":
        _, changed = policy.import_rules(_with_cidrs())
        assert set(changed) == {"frontend", "db"}
        assert any(i.labels == ("cidr:203.0.113.8/32",) for i in local.identities.all())
    else:
        policy.delete_rules(["fe-from-net", "db-in"])
        assert not any(i.labels[0].startswith("cidr:") for i in local.identities.all() if i.labels)
    assert local.state() != before


def test_ipcache_precedence_and_a_failed_allocation_changes_nothing(local: Local) -> None:
    ids, cache = local.identities, local.ipcache
    address = ipaddress.ip_network("198.18.0.99/32")
    (cidr,) = ids.allocate_cidrs("lb", [address])
    assert cache.read()[address] == cidr.id
    ids.endpoint_up(local.endpoints[0].identity, [address])  # an endpoint's address beats a CIDR
    assert cache.read()[address] == local.endpoints[0].identity
    ids.set_hosts([address])  # ... and the host
    ids.endpoint_down([address])
    assert cache.read()[address] == 1
    ids.set_hosts([])
    assert cache.read()[address] == cidr.id  # the CIDR is back once nothing else claims the address
    ids.release_cidrs("lb", [address])
    assert address not in cache.read()
    # the orchestrator's own change protocol: a commit that fails leaves identities and ipcache alone
    before = (ids.all(), cache.read())
    _fail_commit(local.orch_store)
    with pytest.raises(ResourceExhausted):
        ids.allocate_cidrs("lb", [ipaddress.ip_network("10.9.0.0/16"), address])
    vars(local.orch_store).pop("commit")
    assert (ids.all(), cache.read()) == before


# ---- a bulk import's CIDRs are reserved while its rules are checked (services.policy.reserve) ----


def _bulk(count: int, bad_last: bool = False) -> list[pb.Rule]:
    """`count` rules over the three endpoints, each allowing egress to a /32 of its own; the last one
    refused (a label key with an unknown source) with `bad_last`."""
    apps = ("frontend", "backend", "db")
    out = [
        pb.Rule(name=f"bulk-{i}", endpoint_selector=sel(app=apps[i % 3]), egress=[
            pb.PeerRule(cidrs=[pb.CidrRule(cidr=f"10.7.{i // 256}.{i % 256}/32")], ports=[tcp(443)]),
        ])
        for i in range(count)
    ]  # fmt: skip
    if bad_last:
        out[-1].endpoint_selector.match_labels["nosuchsource:app"] = "db"
    return out


@dataclass
class Calls:
    """The policy service's calls to the node: (reserve_only, networks, on the caller's thread)."""

    allocations: list[tuple[bool, int, bool]]
    releases: list[int]


def _recording(local: Local, monkeypatch: pytest.MonkeyPatch, fail: Exception | None = None) -> Calls:
    calls = Calls([], [])
    caller = threading.get_ident()
    allocate, release = local.node.allocate, local.node.release

    def recorded_allocate(networks: Iterable[Network], reserve_only: bool = False) -> dict[Network, int]:
        wanted = list(networks)
        calls.allocations.append((reserve_only, len(wanted), threading.get_ident() == caller))
        if fail is not None:
            raise fail
        return allocate(wanted, reserve_only)

    def recorded_release(networks: Iterable[Network]) -> None:
        wanted = list(networks)
        calls.releases.append(len(wanted))
        release(wanted)

    monkeypatch.setattr(local.node, "allocate", recorded_allocate)
    monkeypatch.setattr(local.node, "release", recorded_release)
    return calls


def test_a_bulk_import_reserves_its_cidrs_on_a_thread_while_its_rules_are_checked(
    local: Local, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _recording(local, monkeypatch)
    _, changed = local.policy.import_rules(_bulk(EARLY_MIN_CIDRS + 44))
    assert set(changed) == {"frontend", "backend", "db"}
    # one reservation of every CIDR, made early on another thread; then one call publishes them
    assert calls.allocations == [(True, EARLY_MIN_CIDRS + 44, False), (False, EARLY_MIN_CIDRS + 44, True)]
    assert not calls.releases
    cidrs = [i for i in local.identities.all() if i.labels and i.labels[0].startswith("cidr:10.7.")]
    assert len(cidrs) == EARLY_MIN_CIDRS + 44 and all(OWNER in i.owners for i in cidrs)
    published = local.ipcache.read()
    assert all(published.get(ipaddress.ip_network(i.labels[0].removeprefix("cidr:"))) == i.id for i in cidrs)
    # a small import reserves after its rules are checked, on the caller's thread
    local.policy.import_rules([_with_cidrs()[-1]])
    assert calls.allocations[2] == (True, 2, True)


def test_a_refused_bulk_import_releases_what_it_reserved_early(local: Local, monkeypatch: pytest.MonkeyPatch) -> None:
    before = local.state()
    calls = _recording(local, monkeypatch)
    with pytest.raises(InvalidArgument, match="nosuchsource"):
        local.policy.import_rules(_bulk(EARLY_MIN_CIDRS + 44, bad_last=True))
    assert calls.allocations == [(True, EARLY_MIN_CIDRS + 44, False)]  # the early reservation did happen
    assert calls.releases == [EARLY_MIN_CIDRS + 44]
    assert local.state() == before


def test_a_failed_early_reservation_is_reported_by_the_reservation_after_the_check(
    local: Local, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = local.state()
    calls = _recording(local, monkeypatch, fail=ResourceExhausted("no identity left between 16777216 and 33554431"))
    with pytest.raises(ResourceExhausted, match="no identity left"):
        local.policy.import_rules(_bulk(EARLY_MIN_CIDRS))
    assert calls.allocations == [(True, EARLY_MIN_CIDRS, False), (True, EARLY_MIN_CIDRS, True)]
    assert not calls.releases  # nothing was reserved, so nothing is released
    assert local.state() == before
