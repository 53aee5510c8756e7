"""The Policy class against bad, huge and hostile input: refused cleanly, cheaply, leaving nothing.

In-process with the real pieces (the policy object's maps in a private bpffs root, the
orchestrator's identity classes and ipcache, sqlite stores), so "nothing changed" is read
from the kernel maps and both stores, and a growth check times the real control plane.
"""

from __future__ import annotations

import ipaddress
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from weir.policy.v1 import policy_pb2 as pb

from services.common.bpffs import remove_pins
from services.common.errors import InvalidArgument, WeirError
from services.common.objects import load_service_object
from services.common.store import Store
from services.common.validate import Network
from services.orchestrator.identities import Identities
from services.orchestrator.ipcache import Ipcache
from services.policy import limits
from services.policy.compute import EndpointView
from services.policy.maps import PolicyMaps
from services.policy.policy import Policy
from services.policy.sources import OWNER, IdentityView
from tests.harness.node import BPF_BUILD, pid_prefix

pytestmark = pytest.mark.root

_counter = itertools.count()


@dataclass
class LocalNode:
    """The orchestrator's identity classes, called in-process instead of over gRPC."""

    identities: Identities
    endpoints: list[EndpointView]

    def snapshot(self) -> tuple[list[EndpointView], list[IdentityView]]:
        views = [IdentityView(i.id, ",".join(i.labels), tuple(ipaddress.ip_network(p) for p in i.prefixes),
                              frozenset(i.owners)) for i in self.identities.all()]  # fmt: skip
        return list(self.endpoints), views

    def allocate(self, networks: Iterable[Network], reserve_only: bool = False) -> dict[Network, int]:
        wanted = sorted(set(networks), key=str)
        infos = self.identities.allocate_cidrs(OWNER, wanted, reserve_only)
        return {n: i.id for n, i in zip(wanted, infos, strict=True)}

    def release(self, networks: Iterable[Network]) -> None:
        self.identities.release_cidrs(OWNER, sorted(set(networks), key=str))


@dataclass
class Local:
    policy: Policy
    maps: PolicyMaps
    store: Store
    identities: Identities
    ipcache: Ipcache
    endpoints: list[EndpointView]

    def state(self) -> dict[str, Any]:
        """Everything a refused request must leave alone: maps, store, identities, ipcache."""
        return {
            "maps": {ep.id: (self.maps.flags(ep.id), sorted(self.maps.read(ep.id).items())) for ep in self.endpoints},
            "rules": (self.store.items("rule"), self.store.revision("rule")),
            "identities": self.identities.all(),
            "ipcache": self.ipcache.read(),
            "listed": [r.name for r in self.policy.list_rules(10_000)[0]],
        }


@pytest.fixture
def local(tmp_path: Path, built: Path) -> Iterator[Local]:
    root = Path("/sys/fs/bpf") / f"{pid_prefix()}pl{next(_counter)}"
    globals_dir = root / "globals"
    node_maps = load_service_object(BPF_BUILD / "node.o", globals_dir, root / "orchestrator", [])
    orch_store, policy_store = Store(tmp_path / "orchestrator.db"), Store(tmp_path / "policy.db")
    maps = PolicyMaps(BPF_BUILD, globals_dir, root / "policy", 65536)
    try:
        ipcache = Ipcache(node_maps.maps["ipcache"])
        ids = Identities(orch_store, ipcache)
        endpoints = []
        for n, labels in enumerate(({"app": "frontend"}, {"app": "backend"}, {"app": "db"}), 1):
            identity = ids.for_labels(labels)
            endpoints.append(EndpointView(labels["app"], n, f"198.18.0.{n}", "", labels, identity))
            ids.endpoint_up(identity, [ipaddress.ip_network(f"198.18.0.{n}/32")])
        ids.sync_ipcache()
        policy = Policy(maps, policy_store, LocalNode(ids, endpoints))
        policy.start(wait_for_node=0)
        yield Local(policy, maps, policy_store, ids, ipcache, endpoints)
    finally:
        maps.close()
        node_maps.close()
        orch_store.close()
        policy_store.close()
        remove_pins(root)


def cidr_rule(name: str, count: int, base: str = "10.0.0.0", app: str = "frontend") -> pb.Rule:
    start = int(ipaddress.IPv4Address(base))
    cidrs = [pb.CidrRule(cidr=f"{ipaddress.IPv4Address(start + i)}/32") for i in range(count)]
    return pb.Rule(name=name, endpoint_selector=pb.EndpointSelector(match_labels={"app": app}),
                   egress=[pb.PeerRule(cidrs=cidrs, ports=[pb.PortRule(port=443, protocol="TCP")])])


def small_rule(name: str) -> pb.Rule:
    return pb.Rule(name=name, endpoint_selector=pb.EndpointSelector(match_labels={"app": "backend"}),
                   ingress=[pb.PeerRule(endpoints=[pb.EndpointSelector(match_labels={"app": "frontend"})],
                                        ports=[pb.PortRule(port=8080, protocol="TCP")])])  # fmt: skip
