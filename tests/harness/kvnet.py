"""Several test nodes on one etcd: etcd in a namespace of its own, one veth to each node.

Each node's services run in the node's namespace, where 127.0.0.1 is the node's own
loopback; so etcd runs in a `<prefix>kv` namespace and each node gets a point-to-point
veth to it (`wkv0` in the node, link-local 169.254.<100+i>.2/30, etcd at .1). Nothing
leaves the namespaces the test made.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from tests.harness import netns
from tests.harness.etcd import EtcdServer
from tests.harness.node import Node

ETCD_PORT = 2379
IFNAME = "wkv0"


@dataclass
class KvNetwork:
    """etcd in its own namespace, reachable from each node joined to it."""

    ns: str
    etcd: EtcdServer = field(init=False)
    joined: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.etcd = EtcdServer(host="127.0.0.1", client_port=ETCD_PORT, peer_port=ETCD_PORT + 1, netns=self.ns)

    def setup(self) -> KvNetwork:
        netns.create(self.ns)
        self.etcd.start()
        return self

    def join(self, node: Node) -> str:
        """Link a node (set up, services not started yet) to etcd; returns its --kvstore URL."""
        index = len(self.joined)
        peer = f"kv{index}"
        netns.run(node.ns, "ip", "link", "add", IFNAME, "type", "veth", "peer", "name", peer, "netns", self.ns)
        netns.run(node.ns, "ip", "addr", "add", f"169.254.{100 + index}.2/30", "dev", IFNAME)
        netns.run(node.ns, "ip", "link", "set", IFNAME, "up")
        netns.run(self.ns, "ip", "addr", "add", f"169.254.{100 + index}.1/30", "dev", peer)
        netns.run(self.ns, "ip", "link", "set", peer, "up")
        self.joined.append(node.name)
        return f"http://169.254.{100 + index}.1:{ETCD_PORT}"

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.etcd.close()
        netns.remove(self.ns)
