"""Errors that carry their gRPC meaning, and the one interceptor that turns them into statuses.

Service code raises (``raise NotFound("endpoint 7 not found")``); only ``ErrorInterceptor``
decides what a client sees, so every service answers the same way for the same failure.
"""

# ruff: noqa: N818 -- the names mirror gRPC status codes (NotFound, not NotFoundError)

from __future__ import annotations

import asyncio
import errno
import inspect
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, NoReturn

import grpc
import grpc.aio
import structlog

from services.common import rpcmetrics

log = structlog.get_logger("weir.rpc")

INTERNAL_MESSAGE = "internal error"
# Longest message a client sees (and the log repeats): a message that quotes a huge
# request field is cut here, whatever raised it.
MAX_MESSAGE_CHARS = 1024


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut to about ``limit`` characters, saying how long it was."""
    if len(message) <= limit:
        return message
    return f"{message[:limit]}... (message cut: {len(message)} characters)"


class WeirError(Exception):
    """Base of the errors whose message is meant for the client; ``code`` is the gRPC status."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN


class InvalidArgument(WeirError):
    """The request is malformed or out of range; retrying it unchanged cannot succeed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(WeirError):
    """The named object does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(WeirError):
    """A create collided with an existing, different object."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(WeirError):
    """The caller or this process lacks a privilege the request needs."""

    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(WeirError):
    """The node is not in a state (or the kernel lacks a feature) the request needs."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(WeirError):
    """A valid request for something this node does not do (yet); the message names it."""

    code = grpc.StatusCode.UNIMPLEMENTED


class ResourceExhausted(WeirError):
    """A map, table or quota is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Aborted(WeirError):
    """A concurrent change won (e.g. a stale revision); the client may re-read and retry."""

    code = grpc.StatusCode.ABORTED


class Unavailable(WeirError):
    """A dependency (another service, the kernel) is briefly unreachable; retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class Internal(WeirError):
    """A broken invariant inside the service; the message is still safe to show."""

    code = grpc.StatusCode.INTERNAL


# pybpf is matched by class name so this module works before (or without) pybpf.
_PYBPF_CODES: dict[str, grpc.StatusCode] = {
    "KeyNotFoundError": grpc.StatusCode.NOT_FOUND,
    "KeyExistsError": grpc.StatusCode.ALREADY_EXISTS,
    "MapFullError": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "NotSupportedError": grpc.StatusCode.FAILED_PRECONDITION,
    "IncompatibleMapError": grpc.StatusCode.FAILED_PRECONDITION,
    "VerifierError": grpc.StatusCode.INTERNAL,
}

ENOTSUPP = 524  # kernel-internal "operation not supported", leaks out of the bpf syscall

_ERRNO_CODES: dict[int, grpc.StatusCode] = {
    errno.ENOENT: grpc.StatusCode.NOT_FOUND,
    errno.EEXIST: grpc.StatusCode.ALREADY_EXISTS,
    errno.E2BIG: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errno.EOPNOTSUPP: grpc.StatusCode.FAILED_PRECONDITION,
    ENOTSUPP: grpc.StatusCode.FAILED_PRECONDITION,
    errno.EPERM: grpc.StatusCode.PERMISSION_DENIED,
    errno.EACCES: grpc.StatusCode.PERMISSION_DENIED,
}


def _pybpf_code(exc: BaseException) -> grpc.StatusCode | None:
    """The code for a pybpf error class (or subclass of one), found by walking the MRO."""
    for cls in type(exc).__mro__:
        if cls.__module__.startswith("pybpf") and cls.__name__ in _PYBPF_CODES:
            return _PYBPF_CODES[cls.__name__]
    return None


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception to the status and message a client sees.

    Only errors that describe the request (WeirError, and OSErrors with a known errno) show
    their text, cut to ``MAX_MESSAGE_CHARS``; anything else is INTERNAL with a generic
    message, so internals never leak.
    """
    if isinstance(exc, WeirError):
        return exc.code, bounded(str(exc)) or exc.code.name.lower().replace("_", " ")
    code = _pybpf_code(exc)
    if code is None and isinstance(exc, OSError) and exc.errno is not None:
        code = _ERRNO_CODES.get(exc.errno)
    if code is None or code is grpc.StatusCode.INTERNAL:
        return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
    return code, bounded(str(exc))


_QUIET_PREFIXES = ("/grpc.health.", "/grpc.reflection.")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _request_id(details: grpc.HandlerCallDetails) -> str:
    """Reuse a caller's well-formed ``x-request-id`` so one id follows a request across services."""
    for key, value in details.invocation_metadata or ():
        if key == "x-request-id" and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex[:12]


class _Call:
    """Per-call bookkeeping: context binding, the outcome log line and exception mapping."""

    def __init__(self, method: str, request_id: str) -> None:
        self.method = method
        self.request_id = request_id
        self.started = time.monotonic()
        self.quiet = method.startswith(_QUIET_PREFIXES) or method.rpartition("/")[2].startswith(("Get", "List"))

    def bind(self) -> None:
        """Bind rpc/request_id for every log line of this call.

        Each RPC runs in its own asyncio task (own context copy), so nothing leaks to other calls.
        """
        structlog.contextvars.bind_contextvars(rpc=self.method, request_id=self.request_id)

    def _log(self, code: grpc.StatusCode, **kw: Any) -> None:
        ms = round((time.monotonic() - self.started) * 1000, 2)
        if code is grpc.StatusCode.OK:
            emit = log.debug if self.quiet else log.info
        elif code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            emit = log.error
        else:
            emit = log.warning
        emit("rpc", code=code.name, duration_ms=ms, **kw)
        rpcmetrics.observe(self.method, code.name)

    def done(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Log a call that returned (possibly with a code the handler set itself)."""
        code = context.code()
        self._log(code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK)

    def aborted(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Log a call the handler aborted itself via ``context.abort``."""
        code = context.code()
        self._log(code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN)

    def cancelled(self) -> None:
        """Log a call the client cancelled (or that hit its deadline)."""
        self._log(grpc.StatusCode.CANCELLED)

    async def fail(self, exc: Exception, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        """Log ``exc`` and abort the call with its mapped status; never returns."""
        code, message = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            self._log(code, exc_info=exc)
            if message == INTERNAL_MESSAGE:
                message = f"{INTERNAL_MESSAGE} (request id {self.request_id}; see the service log)"
        else:
            self._log(code, error=message)
        await context.abort(code, message)


UnaryBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
StreamBehavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


def _wrap_unary(behavior: UnaryBehavior, call_for: Callable[[], _Call]) -> UnaryBehavior:
    """Wrap a coroutine handler (unary or streaming request, single response)."""

    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        call = call_for()
        call.bind()
        try:
            response = await behavior(request, context)
        except grpc.aio.AbortError:
            call.aborted(context)
            raise
        except asyncio.CancelledError:
            call.cancelled()
            raise
        except Exception as exc:
            await call.fail(exc, context)
        call.done(context)
        return response

    return handler


def _wrap_stream(behavior: StreamBehavior, call_for: Callable[[], _Call]) -> StreamBehavior:
    """Wrap an async-generator handler (streaming response)."""

    async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        call = call_for()
        call.bind()
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            call.aborted(context)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            call.cancelled()
            raise
        except Exception as exc:
            await call.fail(exc, context)
        call.done(context)

    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Logs every call and maps exceptions to statuses via ``status_for``.

    Weir servicers are async: coroutine handlers and async-generator streaming handlers are
    wrapped. Synchronous handlers (run by grpc in a thread) are passed through untouched.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def call_for() -> _Call:
            return _Call(method, _request_id(handler_call_details))

        makers: tuple[tuple[Any, Callable[..., grpc.RpcMethodHandler[Any, Any]]], ...] = (
            (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
            (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
            (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
            (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
        )
        for behavior, make in makers:
            if behavior is None:
                continue
            des, ser = handler.request_deserializer, handler.response_serializer
            if inspect.iscoroutinefunction(behavior):
                return make(_wrap_unary(behavior, call_for), des, ser)
            if inspect.isasyncgenfunction(behavior):
                return make(_wrap_stream(behavior, call_for), des, ser)
            break
        return handler
