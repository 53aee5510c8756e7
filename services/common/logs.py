"""Structured JSON logs on stderr, one object per line, with secrets redacted.

Every service logs the same shape (timestamp, level, service, event, bound context) so the
suite's logs can be merged and filtered by machine. IPsec keys and other secrets must never
reach a log, so ``redact`` runs on every event, including nested values. A line is
bounded: ``bound`` cuts long strings and long lists, so a huge request can never become a
huge log line (a traceback may be longer, but is cut too).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, WrappedLogger

REDACTED = "<redacted>"
LEVELS = ("debug", "info", "warning", "error", "critical")
MAX_FIELD_CHARS = 512  # one string value
MAX_FIELD_ITEMS = 16  # one list, tuple or dict
MAX_TRACEBACK_CHARS = 16384

# Deliberately broad: over-redacting a log field costs a little, leaking a key costs a lot.
_SECRET_KEY = re.compile(r"key|secret|psk|passw|auth|token|credential", re.IGNORECASE)


def _scrub(value: Any) -> Any:
    """Redact secret-named keys at any depth of dicts, lists and tuples."""
    if isinstance(value, Mapping):
        return {k: REDACTED if isinstance(k, str) and _SECRET_KEY.search(k) else _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(v) for v in value)
    return value


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: replace values of keys named like key/secret/psk/password/auth."""
    for k in list(event_dict):
        if k == "event":
            continue
        event_dict[k] = REDACTED if _SECRET_KEY.search(k) else _scrub(event_dict[k])
    return event_dict


def _cut(value: Any, limit: int = MAX_FIELD_CHARS) -> Any:
    """Strings over ``limit`` and containers over MAX_FIELD_ITEMS cut, saying how much there was.

    Values inside a container get a sixteenth of the budget, so a list of long strings stays short too.
    """
    inner = max(32, limit // 16)
    if isinstance(value, str):
        return value if len(value) <= limit else f"{value[:limit]}... ({len(value)} characters)"
    if isinstance(value, Mapping):
        items = list(value.items())
        out = {_cut(k, inner) if isinstance(k, str) else k: _cut(v, inner) for k, v in items[:MAX_FIELD_ITEMS]}
        if len(items) > MAX_FIELD_ITEMS:
            out["..."] = f"{len(items) - MAX_FIELD_ITEMS} more"
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        seq = list(value)
        head = [_cut(v, inner) for v in seq[:MAX_FIELD_ITEMS]]
        return head if len(seq) <= MAX_FIELD_ITEMS else [*head, f"... {len(seq) - MAX_FIELD_ITEMS} more"]
    if isinstance(value, (bytes, bytearray)) and len(value) > limit:
        return f"{bytes(value[:limit])!r}... ({len(value)} bytes)"
    return value


def bound(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: cut long values, so a log line stays a few KB at most."""
    for k in list(event_dict):
        limit = MAX_TRACEBACK_CHARS if k in ("exception", "stack") else MAX_FIELD_CHARS
        event_dict[k] = _cut(event_dict[k], limit)
    return event_dict


def _add_service(service: str) -> structlog.typing.Processor:
    """A processor that stamps the service name (not a contextvar, so it is on every line)."""

    def add(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("service", service)
        return event_dict

    return add


_FIRST = ("timestamp", "level", "service", "event")


def _lead_with_essentials(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Put timestamp, level, service and event first so lines read well in a terminal."""
    head = {k: event_dict.pop(k) for k in _FIRST if k in event_dict}
    return {**head, **event_dict}


def setup_logging(service: str, level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog (and the stdlib root logger, for grpc's own messages) for a service.

    ``stream`` defaults to stderr; tests pass a buffer.
    """
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}")
    numeric = logging.getLevelNamesMapping()[level.upper()]
    out = stream if stream is not None else sys.stderr
    stamp: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_service(service),
    ]
    render: list[structlog.typing.Processor] = [
        redact,
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        bound,
        _lead_with_essentials,
        structlog.processors.JSONRenderer(default=str),
    ]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *stamp, *render],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    # grpc and asyncio log through the stdlib; render them as the same JSON lines.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.contextvars.merge_contextvars, *stamp],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # grpc's debug lines (event-loop bookkeeping on every call) drown out the service's own.
    logging.getLogger("grpc").setLevel(max(numeric, logging.INFO))
