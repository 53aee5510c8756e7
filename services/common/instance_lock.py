"""One process per (instance, role): a lock file in the instance's run directory.

Two copies of a service (or two suites) with the same instance name would fight over the
same pins, sockets, namespaces and store; the second must fail before it touches any of
them. Each role (a service, the suite, teardown) takes ``<run_dir>/<role>.lock`` with
flock(2) on an fd held for the life of the process, so the kernel releases it however the
process ends, and writes its pid into the file so the refusal can say who holds it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from pathlib import Path

from services.common.config import NodeConfig
from services.common.errors import FailedPrecondition

LOCK_SUFFIX = ".lock"
MAX_COMMAND = 400  # characters of the holder's command line quoted in a refusal
# Held locks stay open until the process exits: the fd is the lock.
_held: dict[Path, int] = {}


def lock_path(config: NodeConfig, role: str) -> Path:
    """The lock file of one role of the instance."""
    return config.run_dir / f"{role}{LOCK_SUFFIX}"


def _command(pid: int) -> str:
    """The holder's command line, for the refusal message (empty if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    text = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    text = "".join(c if c.isprintable() else " " for c in text)  # the refusal stays one line
    return text if len(text) <= MAX_COMMAND else text[: MAX_COMMAND - 3] + "..."


def holder(path: Path) -> str:
    """Say who holds the lock at ``path``: "pid N (command)", as far as it is known."""
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    if not text.isdigit():
        return "an unknown process"
    pid = int(text)
    command = _command(pid)
    return f"pid {pid} ({command})" if command else f"pid {pid}"


def _ensure_run_dir(run_dir: Path) -> None:
    if not run_dir.exists():
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(run_dir, 0o700)


def try_lock(config: NodeConfig, role: str) -> int | None:
    """Take the role's lock and record our pid; None if another process holds it."""
    path = lock_path(config, role)
    if path in _held:
        return _held[path]
    _ensure_run_dir(config.run_dir)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[path] = fd
    return fd


def acquire(config: NodeConfig, role: str) -> None:
    """Hold the role's lock for the life of the process, or refuse naming the holder."""
    if try_lock(config, role) is None:
        path = lock_path(config, role)
        raise FailedPrecondition(f"instance {config.instance!r} already runs {role}: {path} is held by {holder(path)}")


def release(config: NodeConfig, role: str) -> None:
    """Give the lock up early (teardown, tests); the file stays, its pid no longer matters."""
    fd = _held.pop(lock_path(config, role), None)
    if fd is not None:
        os.close(fd)


def acquire_or_exit(config: NodeConfig, role: str) -> None:
    """``acquire`` for a process's main: on refusal print one line and exit with status 1."""
    try:
        acquire(config, role)
    except FailedPrecondition as exc:
        print(f"weir-{role}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
