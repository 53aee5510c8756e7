"""Logging: JSON lines with the common fields, and secrets never reach the output."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from services.common.logs import REDACTED, setup_logging


@pytest.fixture
def out() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    setup_logging("ipsec", "debug", stream=buf)
    yield buf
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_line_with_common_fields(out: io.StringIO) -> None:
    structlog.contextvars.bind_contextvars(request_id="r1")
    structlog.get_logger().info("sa installed", spi=0x100)
    (line,) = lines(out)
    assert line["event"] == "sa installed"
    assert line["level"] == "info"
    assert line["service"] == "ipsec"
    assert line["request_id"] == "r1"
    assert line["spi"] == 256
    assert line["timestamp"].endswith("Z")


def test_psk_is_redacted(out: io.StringIO) -> None:
    structlog.get_logger().info("key rotation", psk="0123456789abcdef", node="n2")
    (line,) = lines(out)
    assert line["psk"] == REDACTED
    assert line["node"] == "n2"
    assert "0123456789abcdef" not in out.getvalue()


@pytest.mark.parametrize(
    "field", ["psk", "PSK", "aead_key", "keys", "secret", "client_secret", "password", "auth", "Authorization", "token"]
)
def test_secret_like_names_are_redacted(out: io.StringIO, field: str) -> None:
    structlog.get_logger().info("x", **{field: "hunter2"})
    assert "hunter2" not in out.getvalue()
    (line,) = lines(out)  # the line was written, with the field masked (not dropped)
    assert line[field] == REDACTED


def test_nested_secrets_are_redacted(out: io.StringIO) -> None:
    structlog.contextvars.bind_contextvars(peer={"auth": "ctx-secret"})
    structlog.get_logger().info("sa", sa={"spi": 7, "key": "nested-secret", "algs": [{"psk": "deep"}]})
    text = out.getvalue()
    for secret in ("nested-secret", "deep", "ctx-secret"):
        assert secret not in text
    (line,) = lines(out)
    assert line["sa"]["spi"] == 7
    assert line["sa"]["key"] == REDACTED


def test_level_filters(out: io.StringIO) -> None:
    setup_logging("ipsec", "warning", stream=out)
    structlog.get_logger().info("hidden")
    structlog.get_logger().warning("shown")
    assert [line["event"] for line in lines(out)] == ["shown"]


def test_stdlib_logs_are_json_too(out: io.StringIO) -> None:
    logging.getLogger("some.library").warning("from stdlib %s", "here")
    (line,) = lines(out)
    assert line["event"] == "from stdlib here"
    assert line["service"] == "ipsec"
    assert line["level"] == "warning"


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("x", "loud")


def test_long_values_are_cut_so_a_line_stays_small(out: io.StringIO) -> None:
    huge = "x" * 100_000
    structlog.get_logger().warning("rpc", error=huge, names=[huge] * 1000)
    logging.getLogger("grpc").warning("grpc says %s", huge)
    structlog.get_logger().warning("many", a=huge, b={"c": [huge] * 100}, data=b"y" * 5000, d={huge: 1})
    raw = out.getvalue().splitlines()
    assert len(raw) == 3 and all(len(line) < 2048 for line in raw[:2]), [len(line) for line in raw]
    assert len(raw[2]) < 4096
    first = lines(out)[0]
    assert first["error"].endswith("(100000 characters)")
    assert first["names"][-1] == "... 984 more"
