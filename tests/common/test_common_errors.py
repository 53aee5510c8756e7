"""status_for: the one table from exceptions to gRPC statuses."""

from __future__ import annotations

import errno

import grpc
import pytest

from services.common import errors
from services.common.errors import INTERNAL_MESSAGE, status_for


def _pybpf(name: str, base: type[OSError] = OSError) -> type[OSError]:
    """A stand-in for a pybpf.errors class (matched by module and name, never imported)."""
    return type(name, (base,), {"__module__": "pybpf.errors"})


BpfError = _pybpf("BpfError")
KeyNotFoundError = _pybpf("KeyNotFoundError", BpfError)
KeyExistsError = _pybpf("KeyExistsError", BpfError)
MapFullError = _pybpf("MapFullError", BpfError)
NotSupportedError = _pybpf("NotSupportedError", BpfError)
IncompatibleMapError = _pybpf("IncompatibleMapError", BpfError)
VerifierError = _pybpf("VerifierError", BpfError)


class ServiceMissError(KeyNotFoundError):  # type: ignore[misc,valid-type]
    """A service's own subclass of a pybpf error keeps its meaning."""


SC = grpc.StatusCode

CASES: list[tuple[BaseException, grpc.StatusCode, str | None]] = [
    (errors.InvalidArgument("bad cidr 10.0.0.0/33"), SC.INVALID_ARGUMENT, "bad cidr 10.0.0.0/33"),
    (errors.NotFound("endpoint x not found"), SC.NOT_FOUND, "endpoint x not found"),
    (errors.AlreadyExists("vip taken"), SC.ALREADY_EXISTS, "vip taken"),
    (errors.PermissionDenied("need CAP_BPF"), SC.PERMISSION_DENIED, "need CAP_BPF"),
    (errors.FailedPrecondition("no ESP in this kernel"), SC.FAILED_PRECONDITION, "no ESP in this kernel"),
    (errors.ResourceExhausted("ct map full"), SC.RESOURCE_EXHAUSTED, "ct map full"),
    (errors.Aborted("revision 3 is stale"), SC.ABORTED, "revision 3 is stale"),
    (errors.Unavailable("orchestrator down"), SC.UNAVAILABLE, "orchestrator down"),
    (errors.Internal("chain slot mismatch"), SC.INTERNAL, "chain slot mismatch"),
    (errors.NotFound(), SC.NOT_FOUND, "not found"),
    (KeyNotFoundError(errno.ENOENT, "no such key"), SC.NOT_FOUND, None),
    (KeyExistsError(errno.EEXIST, "key exists"), SC.ALREADY_EXISTS, None),
    (MapFullError(errno.E2BIG, "map full"), SC.RESOURCE_EXHAUSTED, None),
    (NotSupportedError(errno.EOPNOTSUPP, "no tcx"), SC.FAILED_PRECONDITION, None),
    (IncompatibleMapError(errno.EINVAL, "pinned map differs"), SC.FAILED_PRECONDITION, None),
    (VerifierError(errno.EACCES, "R1 invalid mem access"), SC.INTERNAL, INTERNAL_MESSAGE),
    (ServiceMissError(errno.ENOENT, "miss"), SC.NOT_FOUND, None),
    (BpfError(errno.ENOSPC, "no space"), SC.RESOURCE_EXHAUSTED, None),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/sys/fs/bpf/x"), SC.NOT_FOUND, None),
    (FileExistsError(errno.EEXIST, "File exists"), SC.ALREADY_EXISTS, None),
    (OSError(errno.E2BIG, "Argument list too long"), SC.RESOURCE_EXHAUSTED, None),
    (OSError(errno.ENOSPC, "No space left on device"), SC.RESOURCE_EXHAUSTED, None),
    (OSError(errno.EOPNOTSUPP, "Operation not supported"), SC.FAILED_PRECONDITION, None),
    (OSError(524, "Unknown error 524"), SC.FAILED_PRECONDITION, None),
    (PermissionError(errno.EPERM, "Operation not permitted"), SC.PERMISSION_DENIED, None),
    (PermissionError(errno.EACCES, "Permission denied"), SC.PERMISSION_DENIED, None),
    (OSError(errno.EINVAL, "Invalid argument"), SC.INTERNAL, INTERNAL_MESSAGE),
    (OSError("no errno"), SC.INTERNAL, INTERNAL_MESSAGE),
    (RuntimeError("db password is hunter2"), SC.INTERNAL, INTERNAL_MESSAGE),
    (KeyError("x"), SC.INTERNAL, INTERNAL_MESSAGE),
    (ValueError("bad"), SC.INTERNAL, INTERNAL_MESSAGE),
]


@pytest.mark.parametrize(("exc", "code", "message"), CASES, ids=lambda v: getattr(v, "__name__", None) or repr(v)[:40])
def test_status_for(exc: BaseException, code: grpc.StatusCode, message: str | None) -> None:
    got_code, got_message = status_for(exc)
    assert got_code == code
    assert got_message == (str(exc) if message is None else message)


def test_every_weir_error_has_its_own_code() -> None:
    subclasses = errors.WeirError.__subclasses__()
    assert len({cls.code for cls in subclasses}) == len(subclasses)
    assert grpc.StatusCode.OK not in {cls.code for cls in subclasses}


def test_unexpected_errors_never_show_their_text() -> None:
    _, message = status_for(RuntimeError("secret detail"))
    assert "secret" not in message


def test_messages_are_bounded() -> None:
    code, message = status_for(errors.InvalidArgument("bad name " + "x" * 100_000))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("bad name xxx") and len(message) < 1100 and "100009 characters" in message
    code, message = status_for(OSError(errno.ENOENT, "y" * 50_000))
    assert code is grpc.StatusCode.NOT_FOUND and len(message) < 1100
