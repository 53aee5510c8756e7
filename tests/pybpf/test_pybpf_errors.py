"""Errors are matchable by meaning, keep their errno and say what failed."""

from __future__ import annotations

import errno

import pytest

from pybpf import (
    BpfError,
    KeyExistsError,
    KeyNotFoundError,
    MapFullError,
    NotSupportedError,
    VerifierError,
)
from pybpf.errors import ENOTSUPP, check, error_for


@pytest.mark.parametrize(
    ("err", "key_op", "cls", "text"),
    [
        (errno.ENOENT, True, KeyNotFoundError, "op: key not found (ENOENT)"),
        (errno.EEXIST, True, KeyExistsError, "op: key exists (EEXIST)"),
        (errno.E2BIG, True, MapFullError, "op: map is full (E2BIG)"),
        (errno.ENOENT, False, BpfError, "op: No such file or directory (ENOENT)"),
        (errno.EOPNOTSUPP, False, NotSupportedError, "op: Operation not supported (EOPNOTSUPP)"),
        (ENOTSUPP, True, NotSupportedError, "op: operation not supported (ENOTSUPP)"),
        (4001, False, BpfError, "op: BPF object format invalid (LIBBPF_ERRNO__FORMAT)"),
    ],
)
def test_errno_maps_to_meaning(err: int, key_op: bool, cls: type[BpfError], text: str) -> None:
    exc = error_for(err, "op", key_op=key_op)
    assert type(exc) is cls
    assert isinstance(exc, OSError) and exc.errno == err
    assert str(exc) == text


def test_check_passes_results_and_raises_errors() -> None:
    assert check(3, "op") == 3
    with pytest.raises(KeyNotFoundError) as caught:
        check(-errno.ENOENT, "lookup map m", key_op=True)
    assert isinstance(caught.value, KeyError)


def test_eperm_carries_a_hint() -> None:
    assert "RLIMIT_MEMLOCK" in str(error_for(errno.EPERM, "load"))


def test_verifier_error_shows_reason_and_last_lines() -> None:
    log = "\n".join(f"{i}: insn" for i in range(100)) + "\nR1 invalid mem access\nprocessed 100 insns\n"
    exc = VerifierError(errno.EACCES, "load program p: Permission denied (EACCES)", log)
    lines = str(exc).splitlines()
    assert exc.reason == "R1 invalid mem access"
    assert lines[0] == "load program p: Permission denied (EACCES): R1 invalid mem access"
    assert len(lines) == 21 and lines[-1] == "  processed 100 insns"
    assert exc.log == log
