"""Cluster mode against a real etcd (Debian's binary, started here on loopback ports).

Three `Cluster` members, each with its own etcd client, stand for three nodes; a recording
sink stands for each node's identities and ipcache (the e2e test drives the real ones).
"""

from __future__ import annotations

import argparse
import ipaddress
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument
from services.common.validate import Network
from services.orchestrator.cluster import IDS, LABELS, Cluster, NodeRecord, RemoteEntry, connect_or_exit
from services.orchestrator.endpoints import Endpoint
from services.orchestrator.kvstore import KvStore, KvStoreConfig, KvStoreUnavailable
from tests.harness.etcd import ETCD, MISSING, EtcdServer, TlsFiles, free_port

pytestmark = pytest.mark.skipif(ETCD is None, reason=MISSING)

TTL = 3  # seconds: the grace period before a silent node is dropped


class Recorder:
    """A node's side of the cluster: what it learned, as a sink and node listener would see it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.identities: dict[str, int] = {}
        self.remote: dict[Network, RemoteEntry] = {}
        self.nodes: dict[str, NodeRecord] = {}
        self.downs: list[Network] = []
        self.forgotten: list[tuple[str, int]] = []

    def learn_identity(self, pairs: list[tuple[str, int]]) -> None:
        with self.lock:
            self.identities.update(pairs)

    def forget_identity(self, pairs: list[tuple[str, int]]) -> None:
        with self.lock:
            self.forgotten.extend(pairs)
            for key, _ in pairs:
                self.identities.pop(key, None)

    def remote_up(self, entries: list[RemoteEntry]) -> None:
        with self.lock:
            self.remote.update({e.network: e for e in entries})

    def remote_down(self, networks: list[Network]) -> None:
        with self.lock:
            self.downs.extend(networks)
            for network in networks:
                self.remote.pop(network, None)

    def node_up(self, record: NodeRecord) -> None:
        with self.lock:
            self.nodes[record.name] = record

    def node_down(self, name: str) -> None:
        with self.lock:
            self.nodes.pop(name, None)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until check() holds; fails with `what` after timeout."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what} did not happen within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    server = EtcdServer().start()
    try:
        yield server
    finally:
        server.close()


Member = tuple[Cluster, Recorder]


@pytest.fixture
def members(etcd: EtcdServer) -> Iterator[Callable[..., Member]]:
    made: list[Cluster] = []

    def make(name: str, identity_gc: float = 900.0) -> Member:
        recorder = Recorder()
        kv = KvStore(KvStoreConfig((etcd.url,), timeout=2.0))
        cluster = Cluster(kv, NodeRecord(name), recorder, TTL, identity_gc)
        cluster.on_node(recorder.node_up, recorder.node_down)
        cluster.start({}, [])
        made.append(cluster)
        return cluster, recorder

    yield make
    for cluster in made:
        cluster.stop()


def has(seen: Recorder, prefix: str) -> Callable[[], bool]:
    return lambda: net(prefix) in seen.remote


def empty(seen: Recorder) -> Callable[[], bool]:
    return lambda: not seen.remote


def endpoint(name: str, ipv4: str, identity: int) -> Endpoint:
    return Endpoint(name=name, id=1, ipv4=ipv4, identity=identity)


def net(text: str) -> Network:
    return ipaddress.ip_network(text)


def test_same_labels_get_the_same_number_on_every_node_when_allocated_at_once(
    members: Callable[[str], Member], etcd: EtcdServer
) -> None:
    nodes = [members(n)[0] for n in ("a", "b", "c")]
    labels = [f"app=svc{i}" for i in range(20)]
    barrier = threading.Barrier(len(nodes))

    def allocate_all(cluster: Cluster) -> dict[str, int]:
        barrier.wait()
        return {key: cluster.allocate(key) for key in labels}

    with ThreadPoolExecutor(len(nodes)) as pool:
        results = list(pool.map(allocate_all, nodes))
    assert results[0] == results[1] == results[2]
    numbers = list(results[0].values())
    assert len(set(numbers)) == len(labels), "two label sets got one number"
    # etcd holds both directions, and they agree.
    kv = KvStore(KvStoreConfig((etcd.url,)))
    for key, number in results[0].items():
        assert kv.get(LABELS + key) == str(number).encode()
        assert kv.get(IDS + str(number)) == key.encode()
    kv.close()


def test_an_endpoint_published_on_one_node_reaches_the_others_and_leaves_them(
    members: Callable[[str], Member],
) -> None:
    a, _ = members("a")
    _, seen_b = members("b")
    _, seen_c = members("c")
    identity = a.allocate("app=web")
    a.endpoint_changed("CREATED", endpoint("web", "198.18.0.10", identity))
    for seen in (seen_b, seen_c):
        wait_for("the endpoint in the other node's view", has(seen, "198.18.0.10/32"), 15)
        entry = seen.remote[net("198.18.0.10/32")]
        assert (entry.identity, entry.node, entry.endpoint) == (identity, "a", "web")
        assert seen.identities.get("app=web") == identity
    a.endpoint_changed("DELETED", endpoint("web", "198.18.0.10", identity))
    for seen in (seen_b, seen_c):
        wait_for("the endpoint gone from the other node's view", empty(seen), 15)


def test_nodes_see_each_other_and_a_silent_node_is_dropped_after_its_lease(
    members: Callable[[str], Member],
) -> None:
    a, _ = members("a")
    b, seen_b = members("b")
    wait_for("b sees a", lambda: "a" in seen_b.nodes, 15)
    a.endpoint_changed("CREATED", endpoint("web", "198.18.0.11", a.allocate("app=web")))
    wait_for("b has a's endpoint", lambda: net("198.18.0.11/32") in seen_b.remote, 15)
    assert {n.name for n in b.status().nodes} == {"a", "b"}
    a.set_local(NodeRecord("a", node_id=7, addresses=("192.0.2.10",), cidrs=("198.18.0.0/24",), routing="direct"))
    wait_for("b sees a's new record", lambda: seen_b.nodes["a"].addresses == ("192.0.2.10",), 15)
    assert seen_b.nodes["a"] == NodeRecord("a", 7, ("192.0.2.10",), ("198.18.0.0/24",), "direct", 0)
    with pytest.raises(InvalidArgument, match="cannot publish"):
        a.set_local(NodeRecord("b"))
    a.stop()  # as a killed node: no more keepalives, nothing revoked
    stopped = time.monotonic()
    wait_for("a dropped by b", lambda: "a" not in seen_b.nodes, TTL + 5)
    gone_after = time.monotonic() - stopped
    assert gone_after >= TTL / 3, f"a was dropped {gone_after:.1f}s after it stopped, before its lease could end"
    wait_for("a's endpoint gone from b", lambda: not seen_b.remote, 15)


def test_etcd_down_keeps_what_is_known_and_publishes_local_changes_when_it_returns(
    members: Callable[[str], Member], etcd: EtcdServer
) -> None:
    a, _ = members("a")
    b, seen_b = members("b")
    identity = a.allocate("app=web")
    a.endpoint_changed("CREATED", endpoint("one", "198.18.0.1", identity))
    wait_for("b has the first endpoint", lambda: net("198.18.0.1/32") in seen_b.remote, 15)
    etcd.stop()
    wait_for("a notices etcd is gone", lambda: not a.status().connected, 10)
    a.endpoint_changed("CREATED", endpoint("two", "198.18.0.2", identity))
    assert a.status().pending >= 1
    with pytest.raises(KvStoreUnavailable, match="app=new"):
        a.allocate("app=new")  # a new label set needs the cluster
    time.sleep(TTL + 1)  # longer than a lease: nobody may drop anything while etcd is away
    assert net("198.18.0.1/32") in seen_b.remote and not seen_b.downs
    assert "a" in seen_b.nodes
    etcd.start()
    wait_for("b has the endpoint made while etcd was down", lambda: net("198.18.0.2/32") in seen_b.remote, 15)
    wait_for("a connected again", lambda: a.status().connected and a.status().pending == 0, 30)
    wait_for("b connected again", lambda: b.status().connected, 30)  # b retries on its own backoff
    assert "kvstore" in a.status().last_error  # the outage stays reported


def test_unreachable_kvstore_at_start_is_said_clearly() -> None:
    port = free_port()
    kv = KvStore(KvStoreConfig((f"http://127.0.0.1:{port}",), timeout=0.5))
    start = time.monotonic()
    with pytest.raises(KvStoreUnavailable, match=f"cannot reach the kvstore at http://127.0.0.1:{port} within 1s"):
        Cluster.wait_reachable(kv, 1.0)
    assert time.monotonic() - start < 5
    kv.close()


def test_orchestrator_exits_with_one_line_when_etcd_is_unreachable() -> None:
    port = free_port()
    code = (
        "import argparse; from services.orchestrator.cluster import connect_or_exit; "
        f"connect_or_exit(argparse.Namespace(kvstore='http://127.0.0.1:{port}', kvstore_ca=None, "
        "kvstore_cert=None, kvstore_key=None, kvstore_connect_timeout=1.0), 'orchestrator')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("weir-orchestrator: cannot reach the kvstore at")
    assert "run without --kvstore" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_standalone_without_kvstore_needs_nothing() -> None:
    args = argparse.Namespace(kvstore="", kvstore_ca=None, kvstore_cert=None, kvstore_key=None)
    assert connect_or_exit(args, "orchestrator") is None


@pytest.mark.parametrize(
    ("text", "extra", "message"),
    [
        ("", {}, "at least one etcd endpoint"),
        ("ftp://127.0.0.1:2379", {}, "is not http"),
        ("http://127.0.0.1", {}, "is not http"),
        ("https://127.0.0.1:2379", {}, "--kvstore-ca"),
        ("http://127.0.0.1:2379", {"cert": Path("/nonexistent.pem")}, "go together"),
        ("http://127.0.0.1:2379", {"ca": Path("/nonexistent-ca.pem")}, "not a readable file"),
    ],
)
def test_bad_kvstore_flags_are_refused(text: str, extra: dict[str, Path], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        KvStoreConfig.parse(text, ca=extra.get("ca"), cert=extra.get("cert"))


def test_bad_node_name_and_short_lease_are_refused(etcd: EtcdServer) -> None:
    kv = KvStore(KvStoreConfig((etcd.url,)))
    with pytest.raises(InvalidArgument, match="node name"):
        Cluster(kv, NodeRecord("Bad/Name"), Recorder())
    with pytest.raises(InvalidArgument, match="too short"):
        Cluster(kv, NodeRecord("ok"), Recorder(), lease_ttl=1)
    kv.close()


def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    tls = TlsFiles.make(tmp_path)
    server = EtcdServer(tls=tls).start()
    try:
        assert server.url.startswith("https://")
        good = KvStore(server.client_config())
        assert good.create({"weir/v1/tls-check": b"1"})
        assert good.get("weir/v1/tls-check") == b"1"
        good.close()
        # Without a client certificate etcd refuses the connection: the error says so.
        anonymous = KvStore(KvStoreConfig.parse(server.url, ca=tls.ca, timeout=1.0))
        with pytest.raises(KvStoreUnavailable, match=r"kvstore https://127\.0\.0\.1"):
            anonymous.get("weir/v1/tls-check")
        anonymous.close()
        plain = KvStore(KvStoreConfig((server.url.replace("https", "http"),), timeout=1.0))
        with pytest.raises(KvStoreUnavailable):
            plain.get("weir/v1/tls-check")
        plain.close()
    finally:
        server.close()


def test_a_dead_endpoint_in_the_list_is_skipped(etcd: EtcdServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for endpoints in [(dead, etcd.url), (etcd.url, dead)] * 4:  # the client starts on one at random
        kv = KvStore(KvStoreConfig(endpoints, timeout=1.0))
        for n in range(5):  # every call answers, whichever endpoint the client started on
            kv.put(f"weir/v1/failover/{n}", b"x")
            assert kv.get(f"weir/v1/failover/{n}") == b"x"
        kv.close()
    kv = KvStore(KvStoreConfig((dead,), timeout=1.0))
    with pytest.raises(KvStoreUnavailable, match=f"kvstore {dead}: get weir/v1/failover/0 failed"):
        kv.get("weir/v1/failover/0")
    kv.close()


def test_an_identity_no_endpoint_uses_is_released_after_the_grace_period(
    members: Callable[..., Member], etcd: EtcdServer
) -> None:
    grace = 2.0
    a, _ = members("a", grace)
    b, seen_b = members("b", grace)
    kv = KvStore(etcd.client_config())
    try:
        used, short = a.allocate("app=used"), a.allocate("app=short")
        wait_for("b learns both", lambda: {"app=used", "app=short"} <= seen_b.identities.keys())
        a.endpoint_changed("CREATED", endpoint("kept", "10.0.0.1", used))
        short_ep = endpoint("brief", "10.0.0.2", short)
        a.endpoint_changed("CREATED", short_ep)
        time.sleep(grace + 1.5)  # in use: nothing is collected, however long
        assert kv.get(IDS + str(short)) is not None and kv.get(IDS + str(used)) is not None
        a.endpoint_changed("DELETED", short_ep)
        gone_at = time.monotonic()
        took = wait_for("the unused identity leaves etcd", lambda: kv.get(LABELS + "app=short") is None, 3 * grace + 5)
        assert took >= grace * 0.9, f"released {took:.1f}s after its last endpoint went: before the grace period"
        assert kv.get(IDS + str(short)) is None
        wait_for("b forgets it", lambda: ("app=short", short) in seen_b.forgotten, 15)
        assert kv.get(LABELS + "app=used") == str(used).encode()  # the one in use stays
        print(f"released {time.monotonic() - gone_at:.1f}s after its endpoint was deleted (grace {grace}s)")
        # The labels get a number again when an endpoint needs them.
        again = b.allocate("app=short")
        assert kv.get(LABELS + "app=short") == str(again).encode()
    finally:
        kv.close()


def test_publishing_an_endpoint_puts_back_its_collected_identity(
    members: Callable[..., Member], etcd: EtcdServer
) -> None:
    """A node that publishes an endpoint of an identity collected meanwhile (it raced the
    collection, or etcd lost it) writes the identity's keys again."""
    a, _ = members("a")
    kv = KvStore(etcd.client_config())
    try:
        number = a.allocate("app=raced")
        kv.delete(LABELS + "app=raced")
        kv.delete(IDS + str(number))
        a.endpoint_changed("CREATED", endpoint("raced", "10.0.0.3", number))
        wait_for("the keys are back", lambda: kv.get(LABELS + "app=raced") == str(number).encode())
        assert kv.get(IDS + str(number)) == b"app=raced"
    finally:
        kv.close()
