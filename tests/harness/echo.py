"""A long-lived TCP connection echoing numbered messages, to show a datapath change lost nothing.

`EchoStream` connects from one namespace to a server in another and, at a steady rate,
sends a numbered message and waits for its echo (lock step), so a message that does not
come back, comes back wrong or a connection that breaks is seen at once. TCP hides a lost
segment by retransmitting it; the kernel's count of retransmissions on the client socket
(`tcp_info.tcpi_total_retrans`) and the slowest round trip (a retransmission waits 200 ms
or more) tell that it happened.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from tests.harness import netns

MESSAGE = struct.Struct("!Q8x")  # a sequence number, padded to 16 bytes
TCPI_TOTAL_RETRANS = struct.Struct("=I")
TCPI_TOTAL_RETRANS_OFFSET = 100  # in struct tcp_info: 8 bytes of u8 fields, then u32s; the 24th
TCP_INFO_SIZE = 104


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


@dataclass(frozen=True)
class EchoResult:
    sent: int
    echoed: int
    error: str
    retransmits: int
    slowest: float = 0.0


@dataclass
class EchoStream:
    """Numbered messages over one TCP connection from `src_ns` to `address:port` in `dst_ns`."""

    src_ns: str
    dst_ns: str
    address: str
    port: int
    rate: int = 50
    timeout: float = 10.0
    _sent: int = 0
    _echoed: int = 0
    _slowest: float = 0.0
    _error: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _listener: socket.socket | None = None
    _client: socket.socket | None = None

    def start(self) -> EchoStream:
        with netns.entered(self.dst_ns):
            listener = socket.socket(_family(self.address), socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.address, self.port))
        listener.listen(1)
        self._listener = listener
        server = threading.Thread(target=self._serve, daemon=True)
        server.start()
        with netns.entered(self.src_ns):
            client = socket.socket(_family(self.address), socket.SOCK_STREAM)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.settimeout(self.timeout)
        client.connect((self.address, self.port))
        self._client = client
        sender = threading.Thread(target=self._run, daemon=True)
        sender.start()
        self._threads = [server, sender]
        return self

    def _serve(self) -> None:
        assert self._listener is not None
        self._listener.settimeout(self.timeout)
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                return

    def _recv_exactly(self, size: int) -> bytes:
        assert self._client is not None
        chunks, got = [], 0
        while got < size:
            chunk = self._client.recv(size - got)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _run(self) -> None:
        assert self._client is not None
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                sent_at = time.monotonic()
                self._client.sendall(MESSAGE.pack(self._sent))
                self._sent += 1
                (number,) = MESSAGE.unpack(self._recv_exactly(MESSAGE.size))
                if number != self._echoed:
                    raise ValueError(f"echo {number} came back where {self._echoed} was expected")
                self._echoed += 1
                self._slowest = max(self._slowest, time.monotonic() - sent_at)
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
        except (OSError, ValueError, ConnectionError) as exc:
            self._error = f"after {self._echoed} echoes: {exc!r}"

    @property
    def echoed(self) -> int:
        return self._echoed

    def retransmits(self) -> int:
        """The kernel's count of segments the client retransmitted on this connection."""
        assert self._client is not None
        info = self._client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
        return int(TCPI_TOTAL_RETRANS.unpack_from(info, TCPI_TOTAL_RETRANS_OFFSET)[0])

    def finish(self) -> EchoResult:
        self._stop.set()
        self._threads[1].join(timeout=self.timeout + 2)
        assert self._client is not None and self._listener is not None
        retransmits = self.retransmits()
        self._client.close()
        self._threads[0].join(timeout=5)
        self._listener.close()
        return EchoResult(self._sent, self._echoed, self._error, retransmits, self._slowest)
