"""A packet capture on one interface of a test namespace (AF_PACKET), for what went on the wire.

Frames are kept raw; `Capture.ip_protocols()` and `Capture.contains()` answer the
questions the encryption tests ask: which IP protocols passed, and whether given
bytes appeared in any frame (plaintext that should not be there).
"""

from __future__ import annotations

import socket
import struct
import threading
from types import TracebackType

from tests.harness import netns

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800


class Capture:
    """Every frame seen on `ifname` inside namespace `ns` (both directions) while open."""

    def __init__(self, ns: str, ifname: str) -> None:
        with netns.entered(ns):
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self._sock.bind((ifname, 0))
        self._sock.settimeout(0.1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Capture:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self._sock.recv(65535))
            except TimeoutError:
                continue
            except OSError:
                return

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(timeout=2)
            self._sock.close()

    def ipv4(self) -> list[bytes]:
        """The IPv4 packets (from their IP header on) of the frames captured so far."""
        return [f[14:] for f in list(self.frames) if len(f) > 34 and struct.unpack("!H", f[12:14])[0] == ETH_P_IP]

    def ip_protocols(self) -> set[int]:
        return {p[9] for p in self.ipv4()}

    def esp_spis(self) -> list[int]:
        """The SPI of every ESP packet, in capture order."""
        out = []
        for p in self.ipv4():
            if p[9] == 50:
                ihl = (p[0] & 0x0F) * 4
                out.append(struct.unpack("!I", p[ihl : ihl + 4])[0])
        return out

    def contains(self, data: bytes) -> bool:
        return any(data in f for f in list(self.frames))
