"""A packet capture on one interface of a test namespace (AF_PACKET), for what went on the wire.

Frames are kept raw; `Capture.ip_protocols()` and `Capture.contains()` answer the
questions the encryption tests ask: which IP protocols passed, and whether given
bytes appeared in any frame (plaintext that should not be there).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from types import TracebackType

from tests.harness import netns

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IP_MF, IP_OFFSET = 0x2000, 0x1FFF


class Capture:
    """Every frame seen on `ifname` inside namespace `ns` (both directions) while open."""

    def __init__(self, ns: str, ifname: str) -> None:
        with netns.entered(ns):
            self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self._sock.bind((ifname, 0))
        self._sock.settimeout(0.1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.frames: list[bytes] = []
        self.times: list[float] = []  # time.monotonic() of each frame
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
                frame = self._sock.recv(65535)
                self.times.append(time.monotonic())
                self.frames.append(frame)
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

    def timed_ipv4(self) -> list[tuple[float, bytes]]:
        """(time, IPv4 packet) of the frames captured so far."""
        pairs = list(zip(self.times, self.frames, strict=False))
        return [(t, f[14:]) for t, f in pairs if len(f) > 34 and struct.unpack("!H", f[12:14])[0] == ETH_P_IP]

    def esp(self, src: str = "") -> list[tuple[float, int]]:
        """(time, SPI) of every ESP packet (from `src` only, if given), in capture order."""
        want = socket.inet_aton(src) if src else b""
        out = []
        for t, p in self.timed_ipv4():
            if p[9] == 50 and (not want or p[12:16] == want):
                ihl = (p[0] & 0x0F) * 4
                out.append((t, struct.unpack("!I", p[ihl : ihl + 4])[0]))
        return out

    def esp_spis(self) -> list[int]:
        return [spi for _, spi in self.esp()]

    def plaintext_between(self, addresses: set[str]) -> int:
        """IPv4 packets that are not ESP and come from or go to one of `addresses`."""
        packed = {socket.inet_aton(a) for a in addresses}
        return sum(1 for p in self.ipv4() if p[9] != 50 and (p[12:16] in packed or p[16:20] in packed))

    def ipv6(self) -> list[bytes]:
        """The IPv6 packets (from their IP header on) of the frames captured so far."""
        return [f[14:] for f in list(self.frames) if len(f) > 54 and struct.unpack("!H", f[12:14])[0] == ETH_P_IPV6]

    def plaintext6_between(self, addresses: set[str]) -> int:
        """IPv6 packets (ESP or not: an IPv6 endpoint's packet is never on the underlay) to or from `addresses`."""
        packed = {socket.inet_pton(socket.AF_INET6, a) for a in addresses}
        return sum(1 for p in self.ipv6() if p[8:24] in packed or p[24:40] in packed)

    def fragments(self) -> int:
        """IPv4 packets that are fragments (more-fragments set, or an offset)."""
        return sum(1 for p in self.ipv4() if struct.unpack("!H", p[6:8])[0] & (IP_MF | IP_OFFSET))

    def largest_ipv4(self, protocol: int) -> int:
        """The largest total length of the IPv4 packets of `protocol` (0 when none)."""
        return max((struct.unpack("!H", p[2:4])[0] for p in self.ipv4() if p[9] == protocol), default=0)

    def contains(self, data: bytes) -> bool:
        return any(data in f for f in list(self.frames))
