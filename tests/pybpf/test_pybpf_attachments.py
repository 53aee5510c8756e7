"""Attachments are values that remove exactly what they placed: taken back after a
restart (found by program), they leave someone else's program in place, and a
pinned link outlives the process that made it."""

from __future__ import annotations

import errno
import gc
import subprocess
import sys
from ctypes import c_uint32, c_uint64
from pathlib import Path

import pytest

import pybpf
from pybpf import (
    AttachType,
    BpfError,
    CgroupAttachment,
    Link,
    TcAttachment,
    TcDirection,
    XdpAttachment,
    XdpMode,
    attach_cgroup,
    attach_tc,
    attach_xdp,
    link_cgroup,
    query_cgroup,
    query_tc,
    query_xdp,
)

from .conftest import VethPair
from .test_pybpf_sock import CONNECT4_SLOT, connect_from

LINK_AND_EXIT = """
import sys
import pybpf
obj = pybpf.BpfObject.load_file(sys.argv[1])
link = pybpf.link_cgroup(sys.argv[2], obj.programs["connect4_count"], pybpf.AttachType.CGROUP_INET4_CONNECT)
link.pin(sys.argv[3])
obj.maps["calls"].pin(sys.argv[4])
print(link.id, link.program_id)
"""


def test_xdp_found_after_a_restart_and_closed_only_while_ours(
    maps_obj: pybpf.BpfObject, veth: VethPair, pin_dir: Path
) -> None:
    ours, theirs = maps_obj.programs["xdp_verdict"], maps_obj.programs["xdp_tail_target"]
    attach_xdp("veth1", ours, XdpMode.GENERIC)
    gc.collect()  # the service "restarted": its attachment object is gone, the program stays
    assert XdpAttachment.find("veth1", ours, XdpMode.NATIVE) is None
    found = XdpAttachment.find("veth1", ours)
    assert found is not None and found.mode is XdpMode.GENERIC and found.program_id == ours.id
    assert XdpAttachment.find("veth1", theirs) is None
    assert found.attached

    with attach_xdp("veth1", theirs, XdpMode.GENERIC):  # someone else takes the hook
        assert not found.attached
        found.close()
        assert query_xdp("veth1").generic == theirs.id  # theirs stays
    assert query_xdp("veth1").generic is None


def test_tc_found_after_a_restart_and_closed_only_while_ours(
    maps_obj: pybpf.BpfObject, veth: VethPair, pin_dir: Path
) -> None:
    ours = maps_obj.programs["tc_verdict"]
    with pybpf.BpfObject.load_file(maps_obj.path, pin_root=pin_dir) as other:
        theirs = other.programs["tc_verdict"]
        placed = attach_tc("veth1", ours, TcDirection.INGRESS, handle=0, priority=0)  # the kernel chooses
        assert placed.handle != 0 and placed.priority != 0
        coordinates = (placed.handle, placed.priority)
        del placed
        gc.collect()
        assert TcAttachment.find("veth1", theirs, TcDirection.INGRESS, *coordinates) is None
        assert TcAttachment.find("veth1", ours, TcDirection.EGRESS, *coordinates) is None
        found = TcAttachment.find("veth1", ours, TcDirection.INGRESS, *coordinates)
        assert found is not None and found.attached and not found.created_hook

        replacement = attach_tc("veth1", theirs, TcDirection.INGRESS, *coordinates, replace=True)
        assert not found.attached
        found.close()
        assert query_tc("veth1", TcDirection.INGRESS, *coordinates) == theirs.id  # theirs stays
        replacement.close()
        assert query_tc("veth1", TcDirection.INGRESS, *coordinates) is None


def test_cgroup_attachment_found_and_closed_leaves_other_programs(
    sock_obj: pybpf.BpfObject, cgroup: Path, objects: dict[str, Path]
) -> None:
    ours = sock_obj.programs["connect4_count"]
    with pybpf.BpfObject.load_file(objects["pybpf_sock"]) as other:
        theirs = other.programs["connect4_count"]
        attach_cgroup(cgroup, ours, AttachType.CGROUP_INET4_CONNECT)
        kept = attach_cgroup(cgroup, theirs, AttachType.CGROUP_INET4_CONNECT)
        gc.collect()
        found = CgroupAttachment.find(cgroup, ours, AttachType.CGROUP_INET4_CONNECT)
        assert found is not None and found.attached
        assert CgroupAttachment.find(cgroup, ours, AttachType.CGROUP_UDP4_SENDMSG) is None
        found.close()
        assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == [theirs.id]
        kept.close()
    assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == []


def test_pinned_cgroup_link_outlives_its_process_and_is_reopened(
    cgroup: Path, pin_dir: Path, objects: dict[str, Path]
) -> None:
    pin, counts = pin_dir / "connect4", pin_dir / "calls"
    out = subprocess.run(
        [sys.executable, "-c", LINK_AND_EXIT, str(objects["pybpf_sock"]), str(cgroup), str(pin), str(counts)],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    link_id, program_id = map(int, out.stdout.split())
    try:
        # The process and its object are gone; the pinned link keeps the program attached.
        assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == [program_id]
        connect_from(cgroup)
        with pybpf.Map.from_pin(counts, key_type=c_uint32, value_type=c_uint64) as calls:
            assert calls[CONNECT4_SLOT] == 1  # and it runs

        reopened = Link.from_pin(pin)
        assert (reopened.id, reopened.program_id) == (link_id, program_id)
        assert reopened.attach_type is AttachType.CGROUP_INET4_CONNECT  # where it is, read from the kernel
        assert reopened.cgroup_id == cgroup.stat().st_ino
        reopened.close()  # releasing our fd: the pin still holds the link
        assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == [program_id]

        with Link.from_pin(pin) as again:
            again.unpin()  # the last holder goes when this block closes the fd
        assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == []
    finally:
        if pin.exists():
            Link.from_pin(pin).detach()
            pin.unlink()


def test_xdp_update_swaps_in_place_only_while_ours(maps_obj: pybpf.BpfObject, veth: VethPair) -> None:
    first, second, third = (maps_obj.programs[n] for n in ("xdp_verdict", "xdp_tail_target", "xdp_tail_entry"))
    attachment = attach_xdp("veth1", first, XdpMode.GENERIC)
    attachment.update(second)
    assert query_xdp("veth1").generic == second.id == attachment.program_id
    attach_xdp("veth1", third, XdpMode.GENERIC)  # someone else's program takes the hook
    with pytest.raises(BpfError) as stale:
        attachment.update(first)
    assert stale.value.errno == errno.EEXIST and "no longer runs our program" in str(stale.value)
    assert query_xdp("veth1").generic == third.id
    attachment.close()
    assert query_xdp("veth1").generic == third.id
    XdpAttachment(attachment.ifindex, third, XdpMode.GENERIC).close()
    assert query_xdp("veth1").generic is None


def test_tc_update_swaps_in_place_only_while_ours(maps_obj: pybpf.BpfObject, veth: VethPair, pin_dir: Path) -> None:
    with pybpf.BpfObject.load_file(maps_obj.path, pin_root=pin_dir) as other:
        first, second = maps_obj.programs["tc_verdict"], other.programs["tc_verdict"]
        with attach_tc("veth1", first, TcDirection.EGRESS) as attachment:
            attachment.update(second)
            assert query_tc("veth1", TcDirection.EGRESS) == second.id == attachment.program_id
            theirs = attach_tc("veth1", first, TcDirection.EGRESS, replace=True)
            with pytest.raises(BpfError) as stale:
                attachment.update(second)
            assert stale.value.errno == errno.EEXIST
            assert query_tc("veth1", TcDirection.EGRESS) == first.id
        assert query_tc("veth1", TcDirection.EGRESS) == first.id  # closing ours left theirs
        theirs.close()
        assert query_tc("veth1", TcDirection.EGRESS) is None


def test_cgroup_link_update_checks_the_expected_program(
    sock_obj: pybpf.BpfObject, cgroup: Path, objects: dict[str, Path]
) -> None:
    with pybpf.BpfObject.load_file(objects["pybpf_sock"]) as other:
        first, second = sock_obj.programs["connect4_count"], other.programs["connect4_count"]
        with link_cgroup(cgroup, first, AttachType.CGROUP_INET4_CONNECT) as link:
            link.update(second, expected=first)
            assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == [second.id] == [link.program_id]
            with pytest.raises(BpfError) as stale:
                link.update(first, expected=first)  # it runs `second` now
            assert stale.value.errno == errno.EPERM
            assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == [second.id]
    assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == []


def test_restart_takes_over_through_the_pinned_program(
    maps_obj: pybpf.BpfObject, veth: VethPair, pin_dir: Path
) -> None:
    """The flow a restarted service follows: find the old program by its pin, swap in the new one."""
    old = maps_obj.programs["xdp_verdict"]
    old.pin(pin_dir / "xdp_verdict")
    attach_xdp("veth1", old, XdpMode.GENERIC)
    gc.collect()
    with pybpf.BpfObject.load_file(maps_obj.path, pin_root=pin_dir) as restarted:
        new = restarted.programs["xdp_verdict"]
        assert XdpAttachment.find("veth1", new) is None  # a fresh load is another program
        with pybpf.Program.from_pin(pin_dir / "xdp_verdict") as pinned:
            found = XdpAttachment.find("veth1", pinned)
        assert found is not None
        found.update(new)
        assert query_xdp("veth1").generic == new.id
        found.close()
    assert query_xdp("veth1").generic is None
