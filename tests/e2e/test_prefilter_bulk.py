"""The bulk list form on the real kernel: packed hosts in, one store record per replace,
and the list rebuilt exactly after a restart (base record plus the changes made since)."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from weir.prefilter.v1 import prefilter_pb2 as pb
from weir.prefilter.v1 import prefilter_pb2_grpc as pb_grpc

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.store import Store
from services.prefilter.denylist import Capacity, Packed
from services.prefilter.maps import PrefilterMaps, dump_pinned
from services.prefilter.prefilter import BASE, ENTRY, Prefilter
from tests.e2e.test_kit import FlakyStore, NoDevices, bpffs_root, pf_state
from tests.harness.node import BPF_BUILD, Node

pytestmark = pytest.mark.root

HOSTS = 2000


@contextlib.contextmanager
def started(root: Path, state: Path) -> Iterator[tuple[Prefilter, Store, Path]]:
    store = FlakyStore(state / "prefilter.db")
    maps = PrefilterMaps(BPF_BUILD, root / "globals", root / "prefilter", Capacity(hosts=HOSTS, prefixes=16))
    pf = Prefilter(maps, store, NoDevices())
    try:
        pf.start()
        yield pf, store, root / "prefilter"
    finally:
        pf.close()
        store.close()


def v4(count: int, base: str = "10.0.0.0") -> list[str]:
    start = int(ipaddress.IPv4Address(base))
    return [str(ipaddress.IPv4Address(start + i)) for i in range(count)]


def packed(addresses: list[str], audit: bool = False) -> Packed:
    return Packed(4, b"".join(ipaddress.IPv4Address(a).packed for a in addresses), audit)


def listed(pf: Prefilter) -> dict[str, tuple[int, bool]]:
    return {str(e.network): (e.id, e.audit) for e in pf.list_page(page_size=100_000)[0]}


def test_packed_replace_fills_the_maps_and_one_store_record(tmp_path: Path) -> None:
    with bpffs_root() as root, started(root, tmp_path) as (pf, store, pins):
        v6 = ipaddress.IPv6Address("2001:db8::9").packed
        change = pf.replace([("10.9.0.0/16", True)], packed=[packed(v4(1500)), Packed(6, v6, True)])
        assert change.changed == 1502 and change.revision == 1
        in_maps = dump_pinned(pins)
        assert len(in_maps) == 1502 and len({i for i, _ in in_maps.values()}) == 1502  # one counter each
        assert in_maps[ipaddress.ip_network("10.0.5.219/32")][1] is False
        assert in_maps[ipaddress.ip_network("10.9.0.0/16")][1] is True
        assert in_maps[ipaddress.ip_network("2001:db8::9/128")][1] is True
        assert {str(n): v for n, v in in_maps.items()} == listed(pf)
        assert store.items(ENTRY) == [] and len(store.items(BASE)) == 1  # no row per entry


def test_restart_rebuilds_the_bulk_list_with_the_changes_made_since(tmp_path: Path) -> None:
    with bpffs_root() as root:
        with started(root, tmp_path) as (pf, _store, _pins):
            pf.replace([], packed=[packed(v4(1000))])
            pf.add([("10.1.0.0/16", False), ("10.0.0.5", True)])  # a new prefix, a bulk host switched to audit
            pf.delete(["10.0.0.7", "10.1.0.0/16"])  # a bulk host, and one added since
            pf.add([("10.0.0.7", True)])  # back, in another mode
            pf.delete(["10.0.0.8"])
            before, revision = listed(pf), pf.revision
            assert len(before) == 999 and before["10.0.0.5/32"][1] and before["10.0.0.7/32"][1]
            assert "10.0.0.8/32" not in before and "10.1.0.0/16" not in before
        # Damage the live list while the service is down: only the store can bring it back.
        with started(root, tmp_path) as (pf, _store, _pins):
            pf._maps.remove([pf._list.entries[ipaddress.ip_network("10.0.0.9/32")]])
        with started(root, tmp_path) as (pf, _store, pins):
            assert listed(pf) == before and pf.revision == revision
            assert {str(n): v for n, v in dump_pinned(pins).items()} == before
            # Changes after a restart still take ids no entry holds.
            pf.add([("10.2.0.0/16", False)])
            ids = [i for i, _ in listed(pf).values()]
            assert len(set(ids)) == len(ids) == 1000


def test_bad_packed_input_changes_nothing(tmp_path: Path) -> None:
    with bpffs_root() as root, started(root, tmp_path) as (pf, store, pins):
        pf.replace([("10.9.0.0/16", False)], packed=[packed(v4(10))])
        before = pf_state(pf, store, pins), store.items(BASE)
        for error, message, bad in (
            (InvalidArgument, "5 bytes is not a whole number", [Packed(4, b"\x0a\x00\x00\x01\x0a", False)]),
            (InvalidArgument, "10.0.0.3/32 is given twice", [packed(["10.0.0.3"], audit=True), packed(v4(10))]),
            (ResourceExhausted, f"{HOSTS + 1} IPv4 host", [packed(v4(HOSTS + 1, "10.1.0.0"))]),
        ):
            with pytest.raises(error, match=message):
                pf.replace([], packed=bad)
            assert (pf_state(pf, store, pins), store.items(BASE)) == before


def test_failed_store_commit_of_a_bulk_replace_changes_nothing(tmp_path: Path) -> None:
    with bpffs_root() as root, started(root, tmp_path) as (pf, store, pins):
        pf.replace([], packed=[packed(v4(100))])
        before = pf_state(pf, store, pins), store.items(BASE)
        assert isinstance(store, FlakyStore)
        store.failing = True
        with pytest.raises(Exception, match="disk is full"):
            pf.replace([], packed=[packed(v4(200, "10.0.0.50"))])
        store.failing = False
        assert (pf_state(pf, store, pins), store.items(BASE)) == before
        pf.replace([], packed=[packed(v4(200, "10.0.0.50"))])
        assert len(dump_pinned(pins)) == 200


def test_packed_hosts_over_grpc_and_bad_blocks_refused(make_node: Callable[..., Node]) -> None:
    node = make_node("orchestrator")
    node.start("prefilter", "--host-entries", "64", "--prefix-entries", "8")
    s = pb_grpc.PrefilterStub(node.channel("prefilter"))
    v6 = ipaddress.IPv6Address("2001:db8::5").packed
    reply = s.ReplaceEntries(pb.ReplaceEntriesRequest(
        entries=[pb.Entry(cidr="10.9.0.0/16", mode=pb.MODE_DENY)],
        packed=[pb.PackedHosts(ipv4=packed(v4(3)).addresses, ipv6=v6, mode=pb.MODE_AUDIT)],
    ), timeout=10)  # fmt: skip
    assert reply.changed == 5
    listed = {(e.cidr, e.mode) for e in s.ListEntries(pb.ListEntriesRequest(), timeout=5).entries}
    assert listed == {("10.9.0.0/16", pb.MODE_DENY), ("10.0.0.0/32", pb.MODE_AUDIT), ("10.0.0.1/32", pb.MODE_AUDIT),
                      ("10.0.0.2/32", pb.MODE_AUDIT), ("2001:db8::5/128", pb.MODE_AUDIT)}  # fmt: skip
    assert {str(n) for n in dump_pinned(node.bpffs_root / "prefilter")} == {c for c, _ in listed}
    for request, message in (
        (pb.PackedHosts(ipv4=b"\x0a\x00\x00"), "packed[0].ipv4: 3 bytes"),
        (pb.PackedHosts(ipv6=bytes(17)), "packed[0].ipv6: 17 bytes"),
        (pb.PackedHosts(ipv4=bytes(4), mode=7), "packed[0].mode"),  # type: ignore[arg-type]
        (pb.PackedHosts(ipv4=packed(v4(65, "10.1.0.0")).addresses), "65 IPv4 host"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            s.ReplaceEntries(pb.ReplaceEntriesRequest(packed=[request]), timeout=10)
        assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert message in (err.value.details() or ""), err.value.details()
    assert {(e.cidr, e.mode) for e in s.ListEntries(pb.ListEntriesRequest(), timeout=5).entries} == listed
