"""Network namespaces for tests: made by the test, entered per thread, removed after.

Sockets belong to the namespace they were created in, so `entered(name)` is all
a test needs to put a client or server into an endpoint: create the socket
inside the block and use it anywhere afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator

from pyroute2 import netns

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block's calling thread inside namespace `name`, then go back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(own)
        os.close(own)
        os.close(target)


def create(name: str) -> None:
    netns.create(name)
    run(name, "ip", "link", "set", "lo", "up")


def remove(name: str) -> None:
    if os.path.exists(f"/run/netns/{name}"):
        netns.remove(name)


def names(prefix: str) -> list[str]:
    return [n for n in netns.listnetns() if n.startswith(prefix)]


def run(name: str, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command inside a namespace (`ip netns exec`), capturing its output."""
    return subprocess.run(
        ["ip", "netns", "exec", name, *argv],
        check=check,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def nsenter_argv(name: str) -> list[str]:
    """A prefix that runs a command in the namespace's network only.

    Unlike `ip netns exec`, nsenter leaves the mount namespace alone, so the
    command still sees /sys/fs/bpf (ip netns exec remounts /sys).
    """
    return ["nsenter", f"--net=/run/netns/{name}", "--"]
