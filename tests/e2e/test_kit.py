"""The change protocol under injected failures, on the real kernel with the real classes.

Each test builds a prefilter or load balancer in this process (its own bpffs root, store
and cgroup), records the state of the pinned maps, the store and the id pools, makes one
part of a change fail (the store commit, a full disk, a full map halfway through a batch),
and checks that the state after the failed call is the state before it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from weir.lb.v1 import lb_pb2 as pb

from pybpf import Map, XdpMode
from services.common.bpffs import remove_pins
from services.common.chain_client import XdpPlacement
from services.common.errors import ResourceExhausted
from services.common.store import Store
from services.lb.defs import LbService, LbServiceKey
from services.lb.lb import LoadBalancer
from services.lb.maps import LbMaps
from services.prefilter.denylist import Capacity
from services.prefilter.maps import PrefilterMaps, dump_pinned
from services.prefilter.prefilter import ENTRY, Prefilter
from tests.conftest import PREFIX
from tests.harness.node import BPF_BUILD

pytestmark = pytest.mark.root

_count = iter(range(1_000_000))


class FlakyStore(Store):
    """A store whose commit fails with "disk full" while `failing` is set."""

    failing = False

    def commit(self) -> None:
        if self.failing:
            raise sqlite3.OperationalError("database or disk is full")
        super().commit()


@contextlib.contextmanager
def bpffs_root() -> Iterator[Path]:
    root = Path("/sys/fs/bpf") / f"{PREFIX}kit{next(_count)}"
    try:
        yield root
    finally:
        remove_pins(root)


# ---- prefilter ----


class NoDevices:
    """These tests change lists only; attaching to a device would need the orchestrator."""

    def attach_xdp(self, interface: str, mode: XdpMode) -> XdpPlacement:
        raise AssertionError(f"attach_xdp({interface}) is not part of these tests")

    def detach_xdp(self, interface: str) -> None:
        raise AssertionError(f"detach_xdp({interface}) is not part of these tests")


@contextlib.contextmanager
def prefilter(state: Path, store_class: type[Store] = FlakyStore) -> Iterator[tuple[Prefilter, Store, Path]]:
    with bpffs_root() as root:
        store = store_class(state / "prefilter.db")
        maps = PrefilterMaps(BPF_BUILD, root / "globals", root / "prefilter", Capacity(hosts=4, prefixes=4))
        pf = Prefilter(maps, store, NoDevices())
        pf.start()
        try:
            yield pf, store, root / "prefilter"
        finally:
            pf.close()
            store.close()


def pf_state(pf: Prefilter, store: Store, pins: Path) -> object:
    """Everything a failed change must leave alone: maps (read from the pins), store, list, free ids."""
    with Map.from_pin(pins / "pf_active", key_type=ctypes.c_uint32, value_type=ctypes.c_uint32) as active:
        generation = int(active[0])
    return (
        generation,
        dump_pinned(pins),
        store.items(ENTRY),
        store.revision(ENTRY),
        pf.list_page()[0],
        sorted(pf._list._free),
        pf._list._next_id,
    )


def add(pf: Prefilter, *cidrs: str, audit: bool = False) -> None:
    pf.add([(c, audit) for c in cidrs])


def test_prefilter_store_failure_leaves_maps_and_store_as_they_were(tmp_path: Path) -> None:
    with prefilter(tmp_path) as (pf, store, pins):
        add(pf, "203.0.113.7", "198.51.0.0/16", "2001:db8::/32")
        add(pf, "203.0.113.8", audit=True)
        before = pf_state(pf, store, pins)
        assert isinstance(store, FlakyStore)
        store.failing = True
        calls: list[tuple[str, Callable[[], object]]] = [
            ("add", lambda: add(pf, "10.0.0.1", "10.0.0.0/8", "2001:db8:1::1")),
            ("switch mode", lambda: add(pf, "203.0.113.8", "198.51.0.0/16", audit=True)),
            ("delete", lambda: pf.delete(["203.0.113.7", "2001:db8::/32"])),
            ("replace", lambda: pf.replace([("10.9.0.0/16", False), ("203.0.113.7", True)])),
        ]
        for what, call in calls:
            with pytest.raises(ResourceExhausted, match=r"prefilter\.db") as err:
                call()
            assert "free disk space" in str(err.value), what
            assert pf_state(pf, store, pins) == before, what
        store.failing = False
        for what, call in calls:  # the same calls change the state once the store works
            call()
            assert pf_state(pf, store, pins) != before, what
            before = pf_state(pf, store, pins)


def test_prefilter_map_full_midway_undoes_the_first_half(tmp_path: Path) -> None:
    with prefilter(tmp_path) as (pf, store, pins):
        add(pf, "203.0.113.7", "203.0.113.8", "198.51.0.0/16")
        # Someone else fills the live IPv4 host map (4 slots) behind the service's back.
        with Map.from_pin(pins / "pf_v4_host", key_type=ctypes.c_uint32, value_type=ctypes.c_uint32) as outer:
            inner_id = outer[int(pf._maps.active)]
        with Map.from_id(inner_id) as inner:
            for host in ("192.0.2.250", "192.0.2.251"):
                inner.update(ipaddress.ip_address(host).packed, bytes(8))
        before = pf_state(pf, store, pins)
        with pytest.raises(Exception) as err:  # the prefix is written first, then the host fails
            add(pf, "10.0.0.0/8", "172.16.0.0/12", "10.1.1.1", audit=True)
        assert type(err.value).__name__ == "MapFullError"
        assert pf_state(pf, store, pins) == before


def test_prefilter_disk_full_is_resource_exhausted_naming_the_file(tmp_path: Path) -> None:
    state = tmp_path / "tiny"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", f"{PREFIX}kit", str(state)], check=True)
    try:
        with prefilter(state, Store) as (pf, store, pins):
            add(pf, "203.0.113.7", "198.51.0.0/16")
            before = pf_state(pf, store, pins)
            _fill(state / "filler")
            with pytest.raises(ResourceExhausted) as err:
                add(pf, *[f"10.{i}.0.0/16" for i in range(3)], *[f"2001:db8:{i}::/48" for i in range(4)])
            assert str(state / "prefilter.db") in str(err.value)
            assert pf_state(pf, store, pins) == before
            (state / "filler").unlink()
            add(pf, "10.0.0.0/16")  # with room again, the same store works
    finally:
        subprocess.run(["umount", str(state)], check=True)


def _fill(path: Path) -> None:
    """Write until the filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


# ---- load balancer ----


@dataclass
class Lb:
    lb: LoadBalancer
    store: FlakyStore
    pins: Path


@contextlib.contextmanager
def load_balancer(tmp_path: Path, sizes: dict[str, int] | None = None) -> Iterator[Lb]:
    cgroup = Path("/sys/fs/cgroup/unified") / f"{PREFIX}kit{next(_count)}"
    with bpffs_root() as root:
        store = FlakyStore(tmp_path / "lb.db")
        maps = LbMaps(BPF_BUILD, root / "globals", root / "lb", cgroup, sizes)
        lb = LoadBalancer(maps, store, lambda: ["192.0.2.1"], max_frontends=64)
        try:
            lb.start()
            yield Lb(lb, store, root / "lb")
        finally:
            with contextlib.suppress(Exception):
                maps.detach_sockets()
            lb.close()
            store.close()
            if cgroup.exists():
                cgroup.rmdir()


def lb_state(s: Lb) -> object:
    """Maps (read from the pins; tables by content), store and id pools."""
    out: dict[str, Any] = {}
    with Map.from_pin(s.pins / "lb_services", key_type=LbServiceKey, value_type=LbService) as services:
        out["frontends"] = sorted((bytes(k), bytes(v)) for k, v in services.items())
    with Map.from_pin(s.pins / "lb_tables", key_type=ctypes.c_uint32, value_type=ctypes.c_uint32) as tables:
        for service_id, map_id in tables.items():
            with Map.from_id(map_id, key_type=ctypes.c_uint32, value_type=ctypes.c_uint32) as inner:
                out[f"table{service_id}"] = [int(v) for _, v in sorted(inner.items())]
    for name in ("lb_backends", "lb_rev_nat"):
        with Map.from_pin(s.pins / name) as m:
            out[name] = sorted((bytes(k), bytes(v)) for k, v in m.items())
    out["store"] = s.store.items("service")
    lb = s.lb
    out["pools"] = [sorted(p._used) for p in (lb._service_ids, lb._backend_ids, lb._rev_nat_ids)]
    out["services"] = sorted((n, lb.get(n)) for n in lb._services)
    return out


def svc(name: str, address: str, backends: list[str], **kw: Any) -> pb.Service:
    return pb.Service(name=name, address=address, port=80, protocol="TCP",
                      backends=[pb.Backend(address=b, port=8080) for b in backends], **kw)  # fmt: skip


def test_lb_store_failure_leaves_maps_store_and_ids_as_they_were(tmp_path: Path) -> None:
    with load_balancer(tmp_path) as s:
        s.lb.upsert(svc("web", "198.19.0.1", ["198.18.0.10", "198.18.0.11"]))
        s.lb.upsert(svc("np", "", ["198.18.0.12"], kind=pb.KIND_NODE_PORT))
        before = lb_state(s)
        s.store.failing = True
        changed_web = svc(
            "web", "198.19.0.1", ["198.18.0.11", "198.18.0.13", "198.18.0.14"], algorithm=pb.ALGORITHM_MAGLEV
        )
        calls: list[tuple[str, Callable[[], object]]] = [
            ("upsert many", lambda: s.lb.upsert_many([changed_web, svc("new", "198.19.0.2", ["198.18.0.20"])])),
            ("move frontend", lambda: s.lb.upsert(svc("web", "198.19.0.3", ["198.18.0.10"]))),
            ("set backend", lambda: s.lb.set_backend("web", "198.18.0.10", 8080, 5, None)),
            ("delete", lambda: s.lb.delete("web")),
            ("delete node port", lambda: s.lb.delete("np")),
        ]
        for what, call in calls:
            with pytest.raises(ResourceExhausted, match=r"lb\.db"):
                call()
            assert lb_state(s) == before, what
        s.store.failing = False
        for what, call in calls:
            call()
            assert lb_state(s) != before, what
            before = lb_state(s)


def test_lb_map_full_midway_undoes_and_gives_ids_back(tmp_path: Path) -> None:
    with load_balancer(tmp_path, {"lb_backends": 4}) as s:
        s.lb.upsert(svc("web", "198.19.0.1", ["198.18.0.10", "198.18.0.11"]))
        before = lb_state(s)
        with pytest.raises(Exception) as err:  # web's backends are rewritten, then "new" runs out
            s.lb.upsert_many([
                svc("web", "198.19.0.1", ["198.18.0.10", "198.18.0.11"], algorithm=pb.ALGORITHM_MAGLEV),
                svc("new", "198.19.0.2", ["198.18.0.20", "198.18.0.21", "198.18.0.22"]),
            ])  # fmt: skip
        assert type(err.value).__name__ == "MapFullError"
        assert lb_state(s) == before
        s.lb.upsert(svc("new", "198.19.0.2", ["198.18.0.20", "198.18.0.21"]))  # what fits still goes in
