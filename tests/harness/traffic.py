"""Real traffic between namespaces: ICMP via ping, TCP and UDP via sockets.

Every helper is bounded in time and count, and only ever sends to addresses
of namespaces the test made.
"""

from __future__ import annotations

import errno
import ipaddress
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.harness import netns

TIMEOUT = 3.0


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def ping(ns: str, address: str, count: int = 3, interval: float = 0.05, wait: float = 1.0, source: str = "") -> int:
    """Echo replies received by `count` pings from ns to address (from `source` if given).

    A ping that could not run (no such namespace, source address not configured)
    raises: it must not pass for "every echo was dropped".
    """
    result = netns.run(
        ns,
        "ping",
        "-c",
        str(count),
        "-i",
        str(interval),
        "-W",
        str(wait),
        "-q",
        *(["-I", source] if source else []),
        address,
        check=False,
    )
    for line in result.stdout.splitlines():
        if "received" in line:
            return int(line.split(",")[1].split()[0])
    raise RuntimeError(f"ping {address} from {ns} did not run (exit {result.returncode}): {result.stderr.strip()}")


@dataclass
class Server:
    """A TCP or UDP server thread inside a namespace; TCP echoes, UDP records."""

    ns: str
    address: str
    port: int
    proto: str = "tcp"
    reply: bytes = b""
    idle: float | None = TIMEOUT  # a TCP connection silent this long is closed; None: kept until stop()
    received: list[tuple[bytes, tuple[str, int]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None

    def start(self) -> Server:
        kind = socket.SOCK_STREAM if self.proto == "tcp" else socket.SOCK_DGRAM
        with netns.entered(self.ns):
            sock = socket.socket(_family(self.address), kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.address, self.port))
        sock.settimeout(0.2)
        if self.proto == "tcp":
            sock.listen(128)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                if self.proto == "tcp":
                    conn, _ = self._sock.accept()
                    threading.Thread(target=self._echo, args=(conn,), daemon=True).start()
                else:
                    data, peer = self._sock.recvfrom(65535)
                    self.received.append((data, peer[:2]))
                    if self.reply:
                        self._sock.sendto(self.reply + data, peer)
            except (TimeoutError, OSError):
                continue

    def _echo(self, conn: socket.socket) -> None:
        """Echo until the peer closes or the connection is silent for `idle` seconds.

        With `idle=None` a silent connection is kept until the server stops: a test
        that holds one across slow steps (a service restart on a loaded machine)
        must not see it closed by the server.
        """
        conn.settimeout(TIMEOUT)
        prefix = self.reply  # once per connection, before the echoed bytes
        last = time.monotonic()
        readable = select.poll()
        readable.register(conn, select.POLLIN)
        with conn:
            try:
                while True:
                    if not readable.poll(200):
                        if self.idle is None and self._stop.is_set():
                            return
                        if self.idle is not None and time.monotonic() - last >= self.idle:
                            return
                        continue
                    data = conn.recv(65536)
                    if not data:
                        return
                    conn.sendall(prefix + data)
                    prefix = b""
                    last = time.monotonic()
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()


@contextmanager
def server(
    ns: str, address: str, port: int, proto: str = "tcp", reply: bytes = b"", idle: float | None = TIMEOUT
) -> Iterator[Server]:
    srv = Server(ns, address, port, proto, reply, idle).start()
    try:
        yield srv
    finally:
        srv.stop()


def tcp_exchange(ns: str, address: str, port: int, payload: bytes, timeout: float = TIMEOUT, source: str = "") -> bytes:
    """Connect from ns (from `source` if given), send payload, return the answer (raises on failure)."""
    with netns.entered(ns):
        sock = socket.socket(_family(address), socket.SOCK_STREAM)
    with sock:
        if source:
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect((address, port))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


# What a connection the datapath does not let through looks like to the client.
# Anything else (no such namespace, a source address that is not configured, no
# route) is a broken test set-up and raises, so it cannot pass for "denied".
_NOT_THROUGH = {
    errno.ECONNREFUSED,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.EHOSTUNREACH,
    errno.ETIMEDOUT,
    errno.EPIPE,
}


def tcp_connects(ns: str, address: str, port: int, timeout: float = 1.0, source: str = "") -> bool:
    """Whether a TCP connection from ns carrying data succeeds within timeout."""
    try:
        return tcp_exchange(ns, address, port, b"probe", timeout, source).endswith(b"probe")
    except TimeoutError:
        return False
    except OSError as err:
        if err.errno in _NOT_THROUGH:
            return False
        raise


def udp_exchange(
    ns: str, address: str, port: int, payload: bytes, timeout: float = 1.0, source: str = ""
) -> bytes | None:
    """Send one datagram from ns and wait for an answer; None when nothing came back."""
    with netns.entered(ns):
        sock = socket.socket(_family(address), socket.SOCK_DGRAM)
    with sock:
        if source:
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.sendto(payload, (address, port))
        try:
            return sock.recvfrom(65535)[0]
        except TimeoutError:
            return None


@dataclass(frozen=True)
class StreamResult:
    sent: int
    received: int
    missing: list[int]
    duplicates: int


SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # as root: beyond net.core.rmem_max
RECEIVE_BUFFER = 8 << 20


class CountedStream:
    """Numbered UDP datagrams from one namespace to another, to detect loss.

    The receiver records sequence numbers; `result()` says which never arrived.
    Run `start()`, do something to the datapath, then `finish()`.
    """

    def __init__(self, src_ns: str, dst_ns: str, dst: str, port: int, rate: int = 2000, source: str = "") -> None:
        self._dst = dst
        self._port = port
        self._interval = 1.0 / rate
        self._stop = threading.Event()
        self._seen: list[int] = []
        self._sent = 0
        with netns.entered(dst_ns):
            self._rx = socket.socket(_family(dst), socket.SOCK_DGRAM)
        # room for seconds of datagrams: a receiver thread starved of CPU (a slow VM while a
        # service starts) must not turn into "loss" of the datapath under test
        self._rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
        self._rx.bind((dst, port))
        self._rx.settimeout(0.2)
        with netns.entered(src_ns):
            self._tx = socket.socket(_family(dst), socket.SOCK_DGRAM)
        if source:
            self._tx.bind((source, 0))
        self._threads = [
            threading.Thread(target=self._send, daemon=True),
            threading.Thread(target=self._receive, daemon=True),
        ]
        self._rx_done = threading.Event()
        self._send_error: OSError | None = None

    def start(self) -> CountedStream:
        for t in self._threads:
            t.start()
        return self

    def _send(self) -> None:
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                self._tx.sendto(struct.pack("!Q", self._sent), (self._dst, self._port))
                self._sent += 1
                next_at += self._interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        except OSError as err:
            self._send_error = err  # finish() raises it: a stream that stopped sending lost nothing

    def _receive(self) -> None:
        while not self._rx_done.is_set():
            try:
                data = self._rx.recv(64)
            except TimeoutError:
                continue
            self._seen.append(struct.unpack("!Q", data[:8])[0])

    @property
    def sent(self) -> int:
        return self._sent

    def received_so_far(self) -> int:
        return len(self._seen)

    def finish(self, drain: float = 0.5) -> StreamResult:
        self._stop.set()
        self._threads[0].join(timeout=2)
        time.sleep(drain)
        self._rx_done.set()
        self._threads[1].join(timeout=2)
        self._tx.close()
        self._rx.close()
        if self._send_error is not None:
            raise RuntimeError(f"the sender stopped after {self._sent} datagrams") from self._send_error
        seen = set(self._seen)
        missing = [n for n in range(self._sent) if n not in seen]
        return StreamResult(self._sent, len(seen), missing, len(self._seen) - len(seen))
