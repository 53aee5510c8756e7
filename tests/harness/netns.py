"""Network namespaces for tests: the service's own helpers plus commands inside one.

Sockets belong to the namespace they were created in, so `entered(name)` is all
a test needs to put a client or server into an endpoint: create the socket
inside the block and use it anywhere afterwards.
"""

from __future__ import annotations

import subprocess

from services.common.netns import create, entered, exists, names, remove

__all__ = ["create", "entered", "exists", "names", "nsenter_argv", "remove", "run"]


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
