"""Programs under BPF_PROG_TEST_RUN: verdicts from maps, per-CPU counters,
tail calls, ring buffer records, identity and pinning."""

from __future__ import annotations

import ctypes
import errno
import struct
from ctypes import c_uint32
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

import pybpf
from pybpf import BpfError, ProgArray, Program, ProgType, RingBuffer

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX = 0, 1, 2, 3
TC_ACT_OK, TC_ACT_SHOT = 0, 2
PACKET = bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000, dport=2000) / (b"x" * 32))


class Pair(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class XdpMd(ctypes.Structure):
    """linux/bpf.h ``struct xdp_md``, the XDP context."""

    _fields_ = [
        ("data", c_uint32),
        ("data_end", c_uint32),
        ("data_meta", c_uint32),
        ("ingress_ifindex", c_uint32),
        ("rx_queue_index", c_uint32),
        ("egress_ifindex", c_uint32),
    ]


@pytest.mark.parametrize(
    ("description", "drop_flag", "verdict"),
    [
        ("flag unset: pass", 0, XDP_PASS),
        ("flag set: drop", 1, XDP_DROP),
        ("other value: pass", 7, XDP_PASS),
    ],
)
def test_xdp_verdict_comes_from_the_map(
    maps_obj: pybpf.BpfObject, description: str, drop_flag: int, verdict: int
) -> None:
    maps_obj.maps["array_map"].typed(c_uint32, c_uint32)[0] = drop_flag
    result = maps_obj.programs["xdp_verdict"].test_run(PACKET)
    assert result.retval == verdict, description
    assert result.data == PACKET


def test_tc_verdict_comes_from_the_map(maps_obj: pybpf.BpfObject) -> None:
    program = maps_obj.programs["tc_verdict"]
    assert program.test_run(PACKET).retval == TC_ACT_OK
    maps_obj.maps["array_map"].typed(c_uint32, c_uint32)[1] = 1
    assert program.test_run(PACKET).retval == TC_ACT_SHOT


def test_repeat_counts_into_percpu_map(maps_obj: pybpf.BpfObject) -> None:
    repeat = 250
    result = maps_obj.programs["xdp_verdict"].test_run(PACKET, repeat=repeat)
    assert result.duration_ns > 0
    counters = maps_obj.maps["percpu_array"].typed(c_uint32, Pair)
    per_cpu = counters.lookup_percpu(0)
    assert per_cpu is not None and len(per_cpu) == pybpf._libbpf.possible_cpus()
    total = counters.lookup_sum(0)
    assert (total.packets, total.bytes) == (repeat, repeat * len(PACKET))


def test_tail_call_through_prog_array(maps_obj: pybpf.BpfObject) -> None:
    entry = maps_obj.programs["xdp_tail_entry"]
    calls = ProgArray(maps_obj.maps["prog_array"])
    assert entry.test_run(PACKET).retval == XDP_PASS  # empty slot: falls through
    calls.set(0, maps_obj.programs["xdp_tail_target"])
    assert entry.test_run(PACKET).retval == XDP_TX
    calls.clear(0)
    assert entry.test_run(PACKET).retval == XDP_PASS


def test_ringbuf_record_reaches_callback(maps_obj: pybpf.BpfObject) -> None:
    records: list[bytes] = []
    maps_obj.maps["array_map"].typed(c_uint32, c_uint32)[0] = 1
    with RingBuffer(maps_obj.maps["events"], records.append) as ring:
        assert ring.consume() == 0
        maps_obj.programs["xdp_verdict"].test_run(PACKET)
        assert ring.poll(timeout_ms=1000) == 1
        assert ring.fileno() >= 0
    assert [struct.unpack("<II", r) for r in records] == [(len(PACKET), XDP_DROP)]


def test_ringbuf_callback_error_is_raised_from_poll(maps_obj: pybpf.BpfObject) -> None:
    def fail(record: bytes) -> None:
        raise RuntimeError(f"bad record of {len(record)} bytes")

    with RingBuffer(maps_obj.maps["events"], fail) as ring:
        maps_obj.programs["xdp_verdict"].test_run(PACKET)
        with pytest.raises(RuntimeError, match="bad record of 8 bytes"):
            ring.poll(timeout_ms=1000)
    with pytest.raises(ValueError, match="closed"):
        ring.poll(0)
    with pytest.raises(ValueError, match="not RINGBUF"):
        RingBuffer(maps_obj.maps["hash_map"], fail)


def test_context_in_and_out(maps_obj: pybpf.BpfObject) -> None:
    ctx = XdpMd(data=0, data_end=len(PACKET))
    result = maps_obj.programs["xdp_verdict"].test_run(PACKET, ctx=ctx)
    assert result.retval == XDP_PASS
    assert isinstance(result.ctx_out, XdpMd) and result.ctx_out.data_end == len(PACKET)
    raw = maps_obj.programs["xdp_verdict"].test_run(PACKET, ctx=bytes(ctx))
    assert raw.ctx_out == bytes(ctx)


def test_too_small_output_buffer(maps_obj: pybpf.BpfObject) -> None:
    with pytest.raises(BpfError) as small:
        maps_obj.programs["xdp_verdict"].test_run(PACKET, data_out_size=10)
    assert small.value.errno == errno.ENOSPC
    assert "test_run program xdp_verdict" in str(small.value)


def test_program_identity_pin_and_reopen(maps_obj: pybpf.BpfObject, pin_dir: Path) -> None:
    program = maps_obj.programs["xdp_verdict"]
    assert program.type == ProgType.XDP and program.name == "xdp_verdict"
    assert program.id > 0 and len(program.tag) == 16
    program.pin(pin_dir / "prog")
    with Program.from_pin(pin_dir / "prog") as pinned, Program.from_id(program.id) as by_id:
        assert pinned.id == by_id.id == program.id
        assert pinned.tag == program.tag and pinned.name == "xdp_verdict"[:15]
        assert pinned.test_run(PACKET).retval == XDP_PASS
    kept = program.clone()
    identity = (program.id, program.tag)
    maps_obj.close()
    with pytest.raises(ValueError, match="closed"):
        program.test_run(PACKET)
    assert kept.test_run(PACKET, repeat=3).retval == XDP_PASS
    info = kept.info()  # from the kernel, through the clone's own fd
    assert (info.id, info.type, info.tag, info.name) == (identity[0], ProgType.XDP, identity[1], "xdp_verdict")
    kept.close()
    with pytest.raises(BpfError) as bad_id:
        Program.from_id(0xFFFFFFF)
    assert bad_id.value.errno == errno.ENOENT
