"""XDP and tc attachments on a veth pair inside namespaces the tests create."""

from __future__ import annotations

import ctypes
import errno
import gc
import socket
import struct
from ctypes import c_uint32, c_uint64
from pathlib import Path

import pytest

import pybpf
from pybpf import (
    BpfError,
    RingBuffer,
    TcDirection,
    XdpMode,
    attach_tc,
    attach_xdp,
    detach_tc,
    detach_xdp,
    query_tc,
    query_xdp,
)

from .conftest import VethPair, in_netns, run

XDP_DROP = 1


class Pair(ctypes.Structure):
    _fields_ = [("packets", c_uint64), ("bytes", c_uint64)]


def clsact_present(dev: str) -> bool:
    return "clsact" in run("tc", "qdisc", "show", "dev", dev)


@pytest.mark.parametrize("mode", [XdpMode.GENERIC, XdpMode.NATIVE])
def test_xdp_attach_query_detach(maps_obj: pybpf.BpfObject, veth: VethPair, mode: XdpMode) -> None:
    program = maps_obj.programs["xdp_verdict"]
    with attach_xdp("veth1", program, mode) as attachment:
        assert attachment.mode is mode
        status = query_xdp("veth1")
        assert status.get(mode) == program.id
        assert [status.get(m) for m in (XdpMode.NATIVE, XdpMode.GENERIC) if m is not mode] == [None]
    assert query_xdp("veth1") == pybpf.XdpStatus(native=None, generic=None, offload=None)


def test_xdp_auto_prefers_native(maps_obj: pybpf.BpfObject, veth: VethPair) -> None:
    with attach_xdp("veth1", maps_obj.programs["xdp_verdict"]) as attachment:
        assert attachment.mode is XdpMode.NATIVE
        assert query_xdp("veth1").native == attachment.program_id


@pytest.mark.parametrize("mode", [XdpMode.GENERIC, XdpMode.NATIVE])
def test_xdp_program_sees_traffic(maps_obj: pybpf.BpfObject, veth: VethPair, mode: XdpMode) -> None:
    """The program is on the path of datagrams sent to veth1: it passes them, then drops them.

    Counting alone would not show it: link-up chatter (IPv6 DAD, MLD) crosses it too.
    """
    counters = maps_obj.maps["percpu_array"].typed(c_uint32, Pair)
    drop_flag = maps_obj.maps["array_map"].typed(c_uint32, c_uint32)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver,
        attach_xdp("veth1", maps_obj.programs["xdp_verdict"], mode),
    ):
        receiver.bind((veth.addr, 9))
        receiver.settimeout(2)
        with in_netns(veth.peer_ns):
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sender:
            for _ in range(3):
                sender.sendto(b"ping", (veth.addr, 9))
            assert [receiver.recv(16) for _ in range(3)] == [b"ping"] * 3  # passed
            assert counters.lookup_sum(0).packets >= 3
            records: list[bytes] = []
            drop_flag[0] = 1
            with RingBuffer(maps_obj.maps["events"], records.append) as ring:
                for _ in range(3):
                    sender.sendto(b"drop", (veth.addr, 9))
                receiver.settimeout(0.5)
                with pytest.raises(TimeoutError):
                    receiver.recv(16)  # dropped before the stack saw them
                ring.poll(timeout_ms=100)
    frame = 14 + 20 + 8 + len(b"drop")  # what XDP sees of each datagram
    assert [struct.unpack("<II", r) for r in records].count((frame, XDP_DROP)) == 3


def test_xdp_replace_and_ownership(maps_obj: pybpf.BpfObject, veth: VethPair) -> None:
    first, second = maps_obj.programs["xdp_verdict"], maps_obj.programs["xdp_tail_target"]
    a = attach_xdp("veth1", first, XdpMode.GENERIC)
    b = attach_xdp("veth1", second, XdpMode.GENERIC, replace=True)
    assert query_xdp("veth1").generic == second.id
    with pytest.raises(BpfError) as busy:
        attach_xdp("veth1", first, XdpMode.GENERIC, replace=False)
    assert busy.value.errno == errno.EBUSY and "replace=False" in str(busy.value)
    a.close()  # replaced: closing it must not remove the newer program
    assert query_xdp("veth1").generic == second.id
    b.close()
    b.close()  # idempotent
    assert query_xdp("veth1").generic is None


def test_xdp_attachment_survives_garbage_collection(maps_obj: pybpf.BpfObject, veth: VethPair) -> None:
    program = maps_obj.programs["xdp_verdict"]
    attach_xdp("veth1", program, XdpMode.GENERIC)
    gc.collect()
    assert query_xdp("veth1").generic == program.id
    assert detach_xdp("veth1") is True
    assert detach_xdp("veth1") is False
    assert query_xdp("veth1").generic is None


def test_tc_attach_query_detach(maps_obj: pybpf.BpfObject, veth: VethPair) -> None:
    program = maps_obj.programs["tc_verdict"]
    assert not clsact_present("veth1")
    assert query_tc("veth1", TcDirection.INGRESS) is None
    with attach_tc("veth1", program, TcDirection.INGRESS) as attachment:
        assert attachment.created_hook
        assert query_tc("veth1", TcDirection.INGRESS) == program.id
        assert query_tc("veth1", TcDirection.EGRESS) is None
        assert clsact_present("veth1")
    assert query_tc("veth1", TcDirection.INGRESS) is None
    assert not clsact_present("veth1")  # we created it, nothing else used it: removed


def test_tc_replace_and_refuse(maps_obj: pybpf.BpfObject, veth: VethPair, pin_dir: Path) -> None:
    first = maps_obj.programs["tc_verdict"]
    with pybpf.BpfObject.load_file(maps_obj.path, pin_root=pin_dir) as other:
        second = other.programs["tc_verdict"]
        a = attach_tc("veth1", first, TcDirection.EGRESS, handle=7, priority=3)
        b = attach_tc("veth1", second, TcDirection.EGRESS, handle=7, priority=3, replace=True)
        assert not b.created_hook
        assert query_tc("veth1", TcDirection.EGRESS, handle=7, priority=3) == second.id
        with pytest.raises(BpfError) as exists:
            attach_tc("veth1", first, TcDirection.EGRESS, handle=7, priority=3, replace=False)
        assert exists.value.errno == errno.EEXIST
        b.close()
        assert query_tc("veth1", TcDirection.EGRESS, handle=7, priority=3) is None
        a.close()
    assert not clsact_present("veth1")


def test_tc_keeps_a_clsact_it_did_not_create(maps_obj: pybpf.BpfObject, veth: VethPair) -> None:
    run("tc", "qdisc", "add", "dev", "veth1", "clsact")
    attachment = attach_tc("veth1", maps_obj.programs["tc_verdict"], TcDirection.INGRESS)
    assert not attachment.created_hook
    attachment.close()
    assert query_tc("veth1", TcDirection.INGRESS) is None
    assert clsact_present("veth1")


def test_tc_hook_stays_while_another_filter_remains(maps_obj: pybpf.BpfObject, veth: VethPair) -> None:
    program = maps_obj.programs["tc_verdict"]
    ingress = attach_tc("veth1", program, TcDirection.INGRESS)
    egress = attach_tc("veth1", program, TcDirection.EGRESS)
    ingress.close()  # created the hook, but the egress filter still needs it
    assert clsact_present("veth1")
    assert query_tc("veth1", TcDirection.EGRESS) == program.id
    gc.collect()
    assert detach_tc("veth1", TcDirection.EGRESS) is True
    assert detach_tc("veth1", TcDirection.EGRESS) is False
    egress.close()  # already gone: a quiet no-op


def test_unknown_interface(maps_obj: pybpf.BpfObject, veth: VethPair) -> None:
    with pytest.raises(BpfError) as missing:
        attach_tc("nope0", maps_obj.programs["tc_verdict"], TcDirection.INGRESS)
    assert missing.value.errno == errno.ENODEV


def test_close_after_the_interface_vanished(maps_obj: pybpf.BpfObject, veth: VethPair) -> None:
    xdp = attach_xdp("veth1", maps_obj.programs["xdp_verdict"], XdpMode.GENERIC)
    tc = attach_tc("veth1", maps_obj.programs["tc_verdict"], TcDirection.INGRESS)
    run("ip", "link", "del", "veth1")
    xdp.close()
    tc.close()
    assert xdp.closed and tc.closed
