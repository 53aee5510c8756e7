"""The socket-layer fast path's class without a kernel: refusals, and the shared layout."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.store import Store
from services.sockaccel.defs import FALLBACK_STATS, NUM_STATS, REFUSED_STATS, Conn, SockKey, Stat, c_header
from services.sockaccel.maps import SockaccelMaps
from services.sockaccel.sockaccel import EndpointView, SockAccel

NO_SK_MSG = "this kernel has no sk_msg programs"


def make(tmp_path: Path, support: str, start: bool = True) -> tuple[SockAccel, Store]:
    store = Store(tmp_path / "sockaccel.db")
    maps = SockaccelMaps(
        tmp_path / "bpf", tmp_path / "globals", tmp_path / "pins", tmp_path / "policy", tmp_path / "cg"
    )
    accel = SockAccel(maps, store, lambda: [], lambda: support)
    if start:
        accel.start()
    return accel, store


def test_a_kernel_without_sk_msg_is_failed_precondition_and_changes_nothing(tmp_path: Path) -> None:
    accel, store = make(tmp_path, NO_SK_MSG)
    accel.set_endpoints(True, [EndpointView("web", 1, "198.18.0.10", "")], [])
    with pytest.raises(FailedPrecondition, match="no sk_msg programs"):
        accel.set_mode(True)
    with pytest.raises(FailedPrecondition, match="no sk_msg programs"):
        accel.set_endpoint_mode("web", "off")
    status = accel.status()
    assert (status.supported, status.unsupported_reason, status.enabled) == (False, NO_SK_MSG, False)
    assert (status.revision, status.endpoints, status.policy_bound, status.attached) == (0, {}, False, False)
    assert store.items("node") == [] and store.items("endpoint") == []
    assert accel.connections(0, "") == ([], "")
    assert not (tmp_path / "pins").exists()  # nothing was loaded or pinned


def test_bad_input_is_refused_before_the_kernel_is_asked(tmp_path: Path) -> None:
    accel, _ = make(tmp_path, NO_SK_MSG)
    with pytest.raises(InvalidArgument, match="endpoint name"):
        accel.set_endpoint_mode("Web\n", "off")
    with pytest.raises(InvalidArgument, match="not one of on, off, inherit"):
        accel.set_endpoint_mode("web", "fast")
    with pytest.raises(InvalidArgument, match="page_size"):
        accel.connections(10**6, "")


def test_unknown_endpoint_is_not_found_and_says_when_endpoints_have_not_arrived(tmp_path: Path) -> None:
    accel, _ = make(tmp_path, "", start=False)  # nothing loaded: the refusal comes before any map write
    with pytest.raises(NotFound, match="have not arrived yet"):
        accel.set_endpoint_mode("web", "off")
    accel.set_endpoints(True, [EndpointView("db", 2, "198.18.0.11", "")], [])
    with pytest.raises(NotFound, match=r"'web' is not an endpoint of this node$"):
        accel.set_endpoint_mode("web", "off")


def test_every_reason_counter_has_one_name() -> None:
    named = [*FALLBACK_STATS.values(), *REFUSED_STATS.values()]
    assert len(named) == len(set(named))
    assert len(Stat) == NUM_STATS and max(Stat) == NUM_STATS - 1


def test_the_c_header_carries_the_layouts() -> None:
    header = c_header()
    assert f'_Static_assert(sizeof(struct weir_sock_key) == {ctypes.sizeof(SockKey)}, "layout of SockKey");' in header
    assert f'_Static_assert(sizeof(struct weir_conn) == {ctypes.sizeof(Conn)}, "layout of Conn");' in header
    assert "WEIR_STAT_FALLBACK_POLICY = 10," in header
