"""Socket-level hooks: sk_msg on a sockhash, cgroup connect4 by attach and by link."""

from __future__ import annotations

import errno
import gc
import socket
import subprocess
import sys
from collections.abc import Iterator
from ctypes import c_uint32, c_uint64
from pathlib import Path

import pytest

import pybpf
from pybpf import (
    AttachType,
    BpfError,
    Link,
    SockHash,
    attach_cgroup,
    attach_sk_msg,
    detach_cgroup,
    link_cgroup,
    query_cgroup,
    query_sk_msg,
)

SK_MSG_SLOT, CONNECT4_SLOT = 0, 1
CONNECT_FROM_CGROUP = """
import os, socket, sys
with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as procs:
    procs.write(str(os.getpid()))
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.connect(("127.0.0.1", 9))
"""


def calls(obj: pybpf.BpfObject, slot: int) -> int:
    value: int = obj.maps["calls"].typed(c_uint32, c_uint64)[slot]
    return value


def connect_from(cgroup: Path) -> None:
    """Run a child process inside ``cgroup`` that connects a UDP socket."""
    subprocess.run([sys.executable, "-c", CONNECT_FROM_CGROUP, str(cgroup)], check=True, timeout=60)


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        yield client, server


def test_sk_msg_runs_on_sends_of_sockets_in_the_map(
    sock_obj: pybpf.BpfObject, tcp_pair: tuple[socket.socket, socket.socket]
) -> None:
    client, server = tcp_pair
    socks = SockHash(sock_obj.maps["sock_map"])
    program = sock_obj.programs["msg_pass"]
    with attach_sk_msg(program, socks) as attachment:
        assert query_sk_msg(socks) == [program.id] == [attachment.program_id]
        socks.update(1, client)  # after attaching: the socket picks up the program
        client.sendall(b"hello")
        assert server.recv(16) == b"hello"
        assert calls(sock_obj, SK_MSG_SLOT) >= 1
    assert query_sk_msg(socks) == []


def test_cgroup_attach_runs_and_detaches(sock_obj: pybpf.BpfObject, cgroup: Path) -> None:
    program = sock_obj.programs["connect4_count"]
    attachment = attach_cgroup(cgroup, program, AttachType.CGROUP_INET4_CONNECT)
    try:
        assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == [program.id]
        connect_from(cgroup)
        assert calls(sock_obj, CONNECT4_SLOT) == 1
    finally:
        attachment.close()
    assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == []
    connect_from(cgroup)
    assert calls(sock_obj, CONNECT4_SLOT) == 1  # detached: no longer counted


def test_cgroup_attachment_survives_gc_until_detached(sock_obj: pybpf.BpfObject, cgroup: Path) -> None:
    program = sock_obj.programs["connect4_count"]
    attach_cgroup(cgroup, program, AttachType.CGROUP_INET4_CONNECT)
    gc.collect()
    assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == [program.id]
    assert detach_cgroup(cgroup, program, AttachType.CGROUP_INET4_CONNECT) is True
    assert detach_cgroup(cgroup, program, AttachType.CGROUP_INET4_CONNECT) is False
    assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == []


def test_cgroup_attach_with_wrong_type_fails(sock_obj: pybpf.BpfObject, cgroup: Path) -> None:
    with pytest.raises(BpfError) as wrong:
        attach_cgroup(cgroup, sock_obj.programs["connect4_count"], AttachType.CGROUP_UDP4_SENDMSG)
    assert wrong.value.errno == errno.EINVAL
    assert "CGROUP_UDP4_SENDMSG" in str(wrong.value)


def test_cgroup_link_lives_while_held_or_pinned(sock_obj: pybpf.BpfObject, cgroup: Path, pin_dir: Path) -> None:
    program = sock_obj.programs["connect4_count"]
    link = link_cgroup(cgroup, program, AttachType.CGROUP_INET4_CONNECT)
    assert link.program_id == program.id
    assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == [program.id]
    link.pin(pin_dir / "link")
    link.close()  # the pin still holds it
    assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == [program.id]
    connect_from(cgroup)
    assert calls(sock_obj, CONNECT4_SLOT) == 1

    with Link.from_pin(pin_dir / "link") as reopened:
        assert reopened.id == link.id
        reopened.unpin()
    assert not (pin_dir / "link").exists()
    assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == []


def test_link_detach_cuts_even_when_pinned(sock_obj: pybpf.BpfObject, cgroup: Path, pin_dir: Path) -> None:
    link = link_cgroup(cgroup, sock_obj.programs["connect4_count"], AttachType.CGROUP_INET4_CONNECT)
    link.pin(pin_dir / "link")
    link.detach()
    assert query_cgroup(cgroup, AttachType.CGROUP_INET4_CONNECT) == []
    link.unpin()
    link.close()
