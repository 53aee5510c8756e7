"""Errors that callers can catch by meaning while keeping the kernel's errno.

Every error is a ``BpfError``, itself an ``OSError``, so ``err.errno`` holds the
errno libbpf or the kernel returned. The message starts with a short prefix
naming the operation and the object (``"update map calls: key exists (EEXIST)"``)
so a log line says what failed without a traceback.
"""

from __future__ import annotations

import errno as _errno

from pybpf import _libbpf

ENOTSUPP = 524
"""The kernel-internal "operation not supported" that bpf() leaks to user space."""

_LIBBPF_ERRNOS = (
    "LIBELF FORMAT KVERSION ENDIAN INTERNAL RELOC LOAD VERIFY PROG2BIG KVER PROGTYPE WRNGPID INVSEQ NLPARSE"
)
_NAMES = {ENOTSUPP: "ENOTSUPP", _errno.EOPNOTSUPP: "EOPNOTSUPP"} | {
    4000 + i: f"LIBBPF_ERRNO__{name}" for i, name in enumerate(_LIBBPF_ERRNOS.split())
}
_VERIFIER_TAIL_LINES = 20


def errno_name(err: int) -> str:
    """Symbolic name of an errno (``"ENOENT"``), or its number when unknown."""
    return _NAMES.get(err) or _errno.errorcode.get(err) or str(err)


def describe(err: int) -> str:
    """Human text plus symbolic name: ``"No such file or directory (ENOENT)"``."""
    text = "operation not supported" if err == ENOTSUPP else _libbpf.strerror(err)
    return f"{text} ({errno_name(err)})"


class BpfError(OSError):
    """A failed BPF operation; ``errno`` is the kernel's or libbpf's error code."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)

    def __str__(self) -> str:
        return str(self.strerror)


class KeyNotFoundError(BpfError, KeyError):
    """The key is not in the map (ENOENT from a lookup, delete or update with EXIST).

    Also a ``KeyError``, so a map can be used where a mapping is expected.
    """


class KeyExistsError(BpfError):
    """The key is already in the map (EEXIST from an update with NOEXIST)."""


class MapFullError(BpfError):
    """The map has no room for another key (E2BIG from an update)."""


class NotSupportedError(BpfError):
    """The running kernel or libbpf lacks the feature (EOPNOTSUPP or ENOTSUPP)."""


class IncompatibleMapError(BpfError):
    """A map (or a pin to reuse) differs from what the caller declared.

    ``field`` names what differs (``"max_entries"``, ``"key_size"``...) when known.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(_errno.EINVAL, message)
        self.field = field


class VerifierError(BpfError):
    """The kernel refused a program; ``log`` holds the verifier's whole output.

    ``str()`` shows the message, the verifier's reason and the log's last lines.
    """

    def __init__(self, err: int, message: str, log: str) -> None:
        super().__init__(err, message)
        self.log = log

    @property
    def reason(self) -> str:
        """The verifier's last complaint: the line before its "processed N insns" summary."""
        lines = [line for line in self.log.splitlines() if line.strip()]
        for i, line in enumerate(lines):
            if line.startswith("processed ") and i > 0:
                return lines[i - 1]
        return lines[-1] if lines else ""

    def __str__(self) -> str:
        tail = self.log.splitlines()[-_VERIFIER_TAIL_LINES:]
        head = f"{self.strerror}: {self.reason}" if self.reason else str(self.strerror)
        return "\n".join([head, *("  " + line for line in tail)])


_KEY_ERRORS: dict[int, tuple[type[BpfError], str]] = {
    _errno.ENOENT: (KeyNotFoundError, "key not found"),
    _errno.EEXIST: (KeyExistsError, "key exists"),
    _errno.E2BIG: (MapFullError, "map is full"),
}

_HINTS = {
    _errno.EPERM: "are you root (CAP_BPF, CAP_NET_ADMIN)? is RLIMIT_MEMLOCK too low?",
}


def error_for(err: int, what: str, *, key_op: bool = False, kernel_says: str = "") -> BpfError:
    """Build the ``BpfError`` subclass that matches ``err`` for the operation ``what``.

    ``key_op`` says the errno came from a map key operation, where ENOENT, EEXIST
    and E2BIG mean key-not-found, key-exists and map-full. ``kernel_says`` is the
    kernel's own explanation (netlink extack), when there is one.
    """
    if key_op and err in _KEY_ERRORS:
        cls, text = _KEY_ERRORS[err]
        return cls(err, f"{what}: {text} ({errno_name(err)})")
    message = f"{what}: {describe(err)}"
    if kernel_says:
        message += f": {kernel_says}"
    if err in _HINTS:
        message += f" ({_HINTS[err]})"
    if err in (_errno.EOPNOTSUPP, ENOTSUPP):
        return NotSupportedError(err, message)
    return BpfError(err, message)


def check(ret: int, what: str, *, key_op: bool = False, kernel_says: str = "") -> int:
    """Return ``ret`` when it is not negative, else raise the error for ``-ret``."""
    if ret < 0:
        raise error_for(-ret, what, key_op=key_op, kernel_says=kernel_says)
    return ret
