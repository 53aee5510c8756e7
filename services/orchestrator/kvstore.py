"""A thin, typed wrapper over an etcd v3 client (the `etcd-sdk-python` package, `pyetcd`).

Cluster mode keeps nodes, identities and the ipcache in etcd, never in a store of our own
making. This module is the only place that knows the client library: it turns endpoint
URLs and TLS files into a client that fails over between endpoints and reconnects quickly
after an outage, and turns every client or transport error into `KvStoreUnavailable`
(gRPC UNAVAILABLE), so callers handle exactly one failure: "etcd cannot be reached now".
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import grpc
import pyetcd  # type: ignore[import-untyped]
from pyetcd import exceptions as etcd_exceptions

from services.common.errors import InvalidArgument, Unavailable

DEFAULT_TIMEOUT = 3.0
# A failed endpoint is tried again this soon (the library's default is five minutes).
RETRY_ENDPOINT_SECONDS = 0.5
# gRPC's reconnect back-off, capped so a returning etcd is seen within a second or two.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 3000),
]
T = TypeVar("T")
_ERRORS = (etcd_exceptions.Etcd3Exception, grpc.RpcError, ValueError, OSError)


class KvStoreUnavailable(Unavailable):
    """etcd could not be reached or did not answer in time."""


@dataclass(frozen=True)
class KvStoreConfig:
    """Where etcd is and how to reach it: `http(s)://host:port` endpoints, optional TLS files."""

    endpoints: tuple[str, ...]
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def parse(
        cls,
        text: str,
        ca: Path | None = None,
        cert: Path | None = None,
        key: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> KvStoreConfig:
        """Comma-separated endpoints; a bad URL or half a client certificate is refused."""
        endpoints = tuple(e.strip() for e in text.split(",") if e.strip())
        if not endpoints:
            raise InvalidArgument("--kvstore needs at least one etcd endpoint, e.g. http://127.0.0.1:2379")
        for endpoint in endpoints:
            url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
            if url.scheme not in ("http", "https") or not url.hostname or url.port is None:
                raise InvalidArgument(f"kvstore endpoint {endpoint!r} is not http(s)://host:port")
            if url.scheme == "https" and ca is None:
                raise InvalidArgument(f"kvstore endpoint {endpoint!r} is https: give the CA with --kvstore-ca")
        if (cert is None) != (key is None):
            raise InvalidArgument("--kvstore-cert and --kvstore-key go together (a client certificate and its key)")
        for flag, path in (("--kvstore-ca", ca), ("--kvstore-cert", cert), ("--kvstore-key", key)):
            if path is not None and not path.is_file():
                raise InvalidArgument(f"{flag} {path} is not a readable file")
        return cls(endpoints, ca, cert, key, timeout)

    @property
    def tls(self) -> bool:
        return self.ca is not None


@dataclass(frozen=True)
class Entry:
    """One key as read: its value, the lease it is bound to (0 if none), its revision."""

    key: str
    value: bytes
    lease: int
    mod_revision: int


@dataclass(frozen=True)
class WatchEvent:
    """A put (value set) or a delete (value None) seen by a watch."""

    key: str
    value: bytes | None
    revision: int


WatchCallback = Callable[[list[WatchEvent] | KvStoreUnavailable], None]


def _credentials(config: KvStoreConfig) -> grpc.ChannelCredentials | None:
    if config.ca is None:
        return None
    return grpc.ssl_channel_credentials(
        config.ca.read_bytes(),
        config.key.read_bytes() if config.key else None,
        config.cert.read_bytes() if config.cert else None,
    )


@dataclass
class KvStore:
    """An etcd v3 client; every method raises `KvStoreUnavailable` when etcd cannot answer."""

    config: KvStoreConfig
    _client: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        creds = _credentials(self.config)
        endpoints = []
        for text in self.config.endpoints:
            url = urlsplit(text if "://" in text else f"http://{text}")
            secure = url.scheme == "https" or creds is not None
            endpoints.append(
                pyetcd.Endpoint(
                    url.hostname,
                    url.port,
                    secure=secure,
                    creds=creds,
                    time_retry=RETRY_ENDPOINT_SECONDS,
                    opts=CHANNEL_OPTIONS,
                )
            )
        self._client = pyetcd.MultiEndpointEtcd3Client(endpoints, timeout=self.config.timeout, failover=True)

    def _fail(self, what: str, exc: BaseException) -> KvStoreUnavailable:
        detail = type(exc).__name__ if not str(exc) else str(exc).splitlines()[0][:200]
        return KvStoreUnavailable(f"kvstore {','.join(self.config.endpoints)}: {what} failed ({detail})")

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """fn() on the endpoint in use, then on each other one if it fails (the client marks a
        failed endpoint and moves on, but leaves retrying to its caller)."""
        for attempt in range(len(self.config.endpoints)):
            try:
                return fn()
            except _ERRORS as exc:
                if attempt == len(self.config.endpoints) - 1:
                    raise self._fail(what, exc) from None
        raise AssertionError("unreachable: a config has at least one endpoint")

    def version(self) -> str:
        """The etcd server's version (a cheap round trip: use it to check the connection)."""
        return self._call("status", lambda: str(self._client.status().version))

    def get(self, key: str) -> bytes | None:
        value, _ = self._call(f"get {key}", lambda: self._client.get(key))
        return None if value is None else bytes(value)

    def get_prefix(self, prefix: str) -> tuple[list[Entry], int]:
        """Every key under prefix, and the store's revision at that read (to watch from)."""
        response = self._call(f"list {prefix}", lambda: self._client.get_prefix_response(prefix))
        entries = [Entry(kv.key.decode(), bytes(kv.value), int(kv.lease), int(kv.mod_revision)) for kv in response.kvs]
        return entries, int(response.header.revision)

    def put(self, key: str, value: bytes, lease: int = 0) -> None:
        self._call(f"put {key}", lambda: self._client.put(key, value, lease=lease or None))

    def delete(self, key: str) -> bool:
        return bool(self._call(f"delete {key}", lambda: self._client.delete(key)))

    def create(self, pairs: Mapping[str, bytes], lease: int = 0) -> bool:
        """Put every pair only if none of the keys exists (one transaction); False if one did.

        Retried on another endpoint, a transaction that did go through answers False the
        second time: callers read the keys back to tell (as `Cluster.allocate` does)."""
        txn = self._client.transactions
        ok, _ = self._call(
            f"create {', '.join(pairs)}",
            lambda: self._client.transaction(
                compare=[txn.version(key) == 0 for key in pairs],
                success=[txn.put(key, value, lease=lease or None) for key, value in pairs.items()],
                failure=[],
            ),
        )
        return bool(ok)

    def delete_unchanged(self, revisions: Mapping[str, int]) -> bool:
        """Delete every key only if each is still at its mod revision (one transaction)."""
        txn = self._client.transactions
        ok, _ = self._call(
            f"delete {', '.join(revisions)}",
            lambda: self._client.transaction(
                compare=[txn.mod(key) == revision for key, revision in revisions.items()],
                success=[txn.delete(key) for key in revisions],
                failure=[],
            ),
        )
        return bool(ok)

    def put_if_value(self, key: str, value: bytes, pairs: Mapping[str, bytes]) -> bool:
        """Put every pair only if `key` holds `value` now (one transaction); False otherwise."""
        txn = self._client.transactions
        ok, _ = self._call(
            f"put {', '.join(pairs)} if {key}",
            lambda: self._client.transaction(
                compare=[txn.value(key) == value],
                success=[txn.put(k, v) for k, v in pairs.items()],
                failure=[],
            ),
        )
        return bool(ok)

    def grant(self, ttl: int) -> int:
        """A new lease of ttl seconds; keys put with it go when it expires."""
        return int(self._call("lease grant", lambda: self._client.lease(ttl).id))

    def keepalive(self, lease: int) -> int:
        """Refresh a lease; its TTL now, 0 when it has expired (its keys are gone)."""
        responses = self._call("lease keepalive", lambda: list(self._client.refresh_lease(lease)))
        return int(responses[0].TTL) if responses else 0

    def revoke(self, lease: int) -> None:
        self._call("lease revoke", lambda: self._client.revoke_lease(lease))

    def watch_prefix(self, prefix: str, start_revision: int, callback: WatchCallback) -> Callable[[], None]:
        """Call callback with the events under prefix from start_revision on (on the client's
        thread); with a `KvStoreUnavailable` when the stream breaks, after which nothing more
        comes. Returns the function that cancels the watch."""

        def on_response(response: Any) -> None:
            if isinstance(response, BaseException):
                callback(self._fail("watch", response))
                return
            events = []
            for event in response.events:
                deleted = isinstance(event, pyetcd.events.DeleteEvent)
                key = bytes(event.key).decode()
                events.append(WatchEvent(key, None if deleted else bytes(event.value), int(event.mod_revision)))
            callback(events)

        watch_id = self._call(
            f"watch {prefix}",
            lambda: self._client.add_watch_prefix_callback(prefix, on_response, start_revision=start_revision),
        )

        def cancel() -> None:
            with contextlib.suppress(*_ERRORS):  # the stream may be gone already
                self._client.cancel_watch(watch_id)

        return cancel

    def close(self) -> None:
        with contextlib.suppress(*_ERRORS):  # its channels may have failed already
            self._client.close()
