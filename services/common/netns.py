"""Named network namespaces without forking.

pyroute2's NetNS and netns.create fork a helper process, which crashes in a
process that already runs gRPC threads. Here a namespace is made and removed
with `ip netns` (fork+exec is safe), and entered per thread with setns(2):
the calling thread moves, the rest of the process stays where it is. Sockets
keep the namespace they were created in, so a netlink socket opened inside
`entered(name)` talks to that namespace for as long as it lives.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the calling thread inside namespace `name` for the block, then go back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_DIR / name, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def names(prefix: str = "") -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))


def create(name: str) -> None:
    """Make a named namespace with its loopback up."""
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, text=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True, text=True)


def remove(name: str) -> None:
    """Remove a named namespace; absent is fine."""
    if exists(name):
        subprocess.run(["ip", "netns", "del", name], check=True, capture_output=True, text=True)


def fd(name: str) -> int:
    """An open fd of the namespace, for netlink requests that move things into it."""
    return os.open(NETNS_DIR / name, os.O_RDONLY)
