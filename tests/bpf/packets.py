"""Rows of the packet tables and how one is run, in the shape of Katran's test fixtures.

A row is a description, the hook the packet enters through, the packet (built
with scapy, or raw bytes for frames scapy would repair), the verdict and the
reason the metrics map must count, and the frame that must come out: the
input itself unless the row says otherwise. Rows that need state first (a
connection to reply to) list the packets sent before, whose verdicts are not
judged. A row whose verdict is None expects the kernel to refuse the frame
(test_run answers EINVAL for frames too short for the headers it reads itself).
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from pybpf import BpfError
from services.common.datapath import Hook, Reason
from tests.harness.bpfrun import Datapath, Outcome, describe

MAC_LOCAL = "02:00:00:00:00:01"
MAC_PEER = "02:00:00:00:00:02"


Frame = Packet | bytes


def eth() -> Packet:
    return Ether(src=MAC_LOCAL, dst=MAC_PEER)


def raw(frame: Frame) -> bytes:
    return frame if isinstance(frame, bytes) else bytes(frame)


def cut(frame: Packet, keep: int) -> bytes:
    """The first `keep` bytes of a frame: headers cut short, length fields left claiming more."""
    data = bytes(frame)
    if keep >= len(data):
        raise ValueError(f"cutting a {len(data)}-byte frame to {keep} bytes cuts nothing")
    return data[:keep]


def _fresh_checksums(frame: Packet) -> bytes:
    """The frame's bytes with every IP, TCP, UDP and ICMP checksum computed by scapy.

    A UDP checksum of 0 (none sent) stays 0, as the datapath keeps it.
    """
    out = frame.copy()
    for layer in (IP, TCP, UDP, ICMP):
        if layer in out and not (layer is UDP and out[UDP].chksum == 0):
            out[layer].chksum = None
    return bytes(out)


def rebuilt(frame: Packet, **changes: dict[str, Any]) -> Packet:
    """A copy of `frame` with fields changed per layer and its checksums recomputed by scapy.

    `changes` maps a layer name (IP, TCP, UDP) to its new field values, e.g.
    rebuilt(p, IP={"dst": "10.0.1.1"}, TCP={"dport": 8080}).
    """
    out = frame.copy()
    layers = {"IP": IP, "TCP": TCP, "UDP": UDP, "ICMP": ICMP}
    for name, values in changes.items():
        for key, value in values.items():
            setattr(out[layers[name]], key, value)
    return Ether(_fresh_checksums(out))


def dnat(frame: Packet, backend: tuple[str, int]) -> Packet:
    """The frame as it must leave when sent to `backend`: destination rewritten, checksums right."""
    l4 = "TCP" if TCP in frame else "UDP"
    return rebuilt(frame, IP={"dst": backend[0]}, **{l4: {"dport": backend[1]}})


def snat(frame: Packet, frontend: tuple[str, int]) -> Packet:
    """A reply as the client must see it: the frontend as its source, checksums right."""
    l4 = "TCP" if TCP in frame else "UDP"
    return rebuilt(frame, IP={"src": frontend[0]}, **{l4: {"sport": frontend[1]}})


def checksums_valid(data: bytes) -> bool:
    """Whether scapy, recomputing every checksum of the frame, gets the bytes that are there."""
    return _fresh_checksums(Ether(data)) == data


SAME = object()  # the frame comes out as it went in


@dataclass(frozen=True)
class Row:
    """One packet and what must become of it (see the module docstring)."""

    desc: str
    hook: Hook
    packet: Frame
    verdict: int | None
    reason: Reason | None = Reason.FORWARDED
    output: Frame | tuple[Frame, ...] | object = SAME  # a tuple: any one of these frames
    prior: tuple[tuple[Hook, Frame], ...] = ()
    marks: tuple[Any, ...] = ()
    setup: str = ""  # a table's own variation of its maps (e.g. "audit"); "" is the table's default


def params(rows: Iterable[Row]) -> list[Any]:
    """Rows as pytest parameters, named by their descriptions, with their marks."""
    out = []
    seen: set[str] = set()
    for row in rows:
        if row.desc in seen:
            raise ValueError(f"two rows are described as {row.desc!r}")
        seen.add(row.desc)
        out.append(pytest.param(row, id=row.desc, marks=row.marks))
    return out


def _show(data: bytes) -> str:
    try:
        return str(Ether(data).summary())
    except Exception:  # scapy cannot dissect every malformed frame; the hex still says it
        return data.hex()


def _alternatives(output: object) -> list[Frame]:
    if isinstance(output, tuple):
        return list(output)
    assert isinstance(output, Packet | bytes), f"a row's output is a frame or a tuple of frames, not {output!r}"
    return [output]


def run_row(dp: Datapath, row: Row) -> Outcome | None:
    """Send the row's prior packets and its packet; assert verdict, reason and output."""
    for hook, frame in row.prior:
        dp.run(hook, raw(frame))
    data = raw(row.packet)
    if row.verdict is None:
        with pytest.raises(BpfError) as refused:
            dp.run(row.hook, data)
        assert refused.value.errno == errno.EINVAL
        return None
    outcome = dp.run(row.hook, data)
    assert (outcome.verdict, outcome.reason) == (row.verdict, row.reason), (
        f"{row.desc}: got {outcome.describe()}, expected {describe(row.hook, row.verdict, row.reason)}"
    )
    wants = [data] if row.output is SAME else [raw(f) for f in _alternatives(row.output)]
    assert outcome.data in wants, (
        f"{row.desc}: out came {_show(outcome.data)}, expected {' or '.join(_show(w) for w in wants)}"
    )
    return outcome
