"""Shared pieces of the prefilter benchmarks: frames, deny lists, namespaces, trafgen.

Everything a benchmark makes carries its process id (namespaces `wb<pid>-*`,
bpffs `/sys/fs/bpf/weir-bench-<pid>`, temp dirs `weir-bench-<pid>-*`) and is removed
by the context manager that made it, so a failed or interrupted run leaves
nothing behind and two runs never collide. Traffic only ever flows between
namespaces made here.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from services.common import netns
from services.common.bpffs import ensure_bpffs, remove_pins

REPO = Path(__file__).resolve().parents[1]
BPF_BUILD = REPO / "bpf" / "build"
PREFIX = f"wb{os.getpid()}"
FRAME_SIZE = 64

# Deny-list fillers: hosts count up from 10.0.0.0 (1M of them fit in 10.0.0.0/12); prefixes
# take one /24-aligned block each in 10.64.0.0/10 with lengths /24../30, so the trie is deep.
HOST_BASE = int(ipaddress.IPv4Address("10.0.0.0"))
PREFIX_BASE = int(ipaddress.IPv4Address("10.64.0.0"))
PREFIX_LENGTHS = (24, 25, 26, 27, 28, 29, 30)
MAX_FILLER_HOSTS = (1 << 20) - 16  # the top of 10.0.0.0/12 is left for probe addresses
MAX_FILLER_PREFIXES = 1 << 14


def bpffs_root() -> Path:
    """This run's private bpffs directory (the prefilter pins under <root>/prefilter)."""
    return Path(f"/sys/fs/bpf/weir-bench-{os.getpid()}")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so the `finally` blocks clean up as on Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# ---- frames and lists ----


def _checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(src: str, dst: str, src_mac: str = "02:00:00:00:00:01", dst_mac: str = "02:00:00:00:00:02") -> bytes:
    """Ethernet + IPv4 + UDP, 64 bytes in all, with a valid IPv4 header checksum
    (the receiving stack drops bad ones; UDP checksum 0 means none)."""
    payload = bytes(FRAME_SIZE - 14 - 20 - 8)
    udp = struct.pack("!HHHH", 40000, 9000, 8 + len(payload), 0) + payload
    fields = [
        0x45,
        0,
        20 + len(udp),
        0,
        0x4000,
        64,
        17,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    ]
    ip = struct.pack("!BBHHHBBH4s4s", *fields)
    fields[7] = _checksum(ip)
    ip = struct.pack("!BBHHHBBH4s4s", *fields)
    eth = bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", "")) + b"\x08\x00"
    return eth + ip + udp


def filler_hosts(count: int) -> list[str]:
    """`count` distinct /32s in 10.0.0.0/12 (map keys only: nothing is sent to them)."""
    if count > MAX_FILLER_HOSTS:
        raise ValueError(f"at most {MAX_FILLER_HOSTS} filler hosts")
    return [f"{ipaddress.IPv4Address(HOST_BASE + i)}/32" for i in range(count)]


def filler_prefixes(count: int) -> list[str]:
    """`count` disjoint prefixes of mixed lengths in 10.64.0.0/10."""
    if count > MAX_FILLER_PREFIXES:
        raise ValueError(f"at most {MAX_FILLER_PREFIXES} filler prefixes")
    return [
        f"{ipaddress.IPv4Address(PREFIX_BASE + (i << 8))}/{PREFIX_LENGTHS[i % len(PREFIX_LENGTHS)]}"
        for i in range(count)
    ]


def filler_list(total: int, prefix_share: float = 0.01, max_prefixes: int = 10_000) -> list[str]:
    """`total` entries, mostly hosts plus a share of prefixes (at least one when total > 1)."""
    prefixes = min(max_prefixes, max(1 if total > 1 else 0, round(total * prefix_share)))
    return filler_hosts(total - prefixes) + filler_prefixes(prefixes)


# ---- processes and namespaces ----


def run(*argv: str, ns: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command (inside namespace `ns` if given); a failure raises with its stderr."""
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    result = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def link_stats(ns: str, dev: str) -> dict[str, int]:
    """The interface's kernel counters (rx/tx packets...), read through netlink in `ns`."""
    info = json.loads(run("ip", "-n", ns, "-j", "-s", "link", "show", "dev", dev).stdout)[0]
    stats = info["stats64"]
    return {f"{way}_{key}": int(value) for way in ("rx", "tx") for key, value in stats[way].items()}


def udp_snmp(ns: str) -> dict[str, int]:
    """The namespace's UDP MIB (`Udp:` of /proc/net/snmp): NoPorts counts datagrams
    that reached UDP with no socket to take them."""
    lines = [
        line.split() for line in run("cat", "/proc/net/snmp", ns=ns).stdout.splitlines() if line.startswith("Udp:")
    ]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))


@dataclass(frozen=True)
class VethPair:
    """Sender namespace and device, receiver namespace and device, with addresses."""

    tx_ns: str
    tx_dev: str
    tx_mac: str
    tx_addr: str
    rx_ns: str
    rx_dev: str
    rx_mac: str
    rx_addr: str


def _mac(ns: str, dev: str) -> str:
    return str(json.loads(run("ip", "-n", ns, "-j", "link", "show", "dev", dev).stdout)[0]["address"])


@contextlib.contextmanager
def veth_pair() -> Iterator[VethPair]:
    """Namespaces wb<pid>-tx and wb<pid>-rx joined by one veth pair (198.18.0.1 -> .2)."""
    tx_ns, rx_ns = f"{PREFIX}-tx", f"{PREFIX}-rx"
    tx_dev, rx_dev = f"{PREFIX}t", f"{PREFIX}r"
    try:
        netns.create(tx_ns)
        netns.create(rx_ns)
        run("ip", "link", "add", tx_dev, "netns", tx_ns, "type", "veth", "peer", "name", rx_dev, "netns", rx_ns)
        run("ip", "-n", tx_ns, "addr", "add", "198.18.0.1/24", "dev", tx_dev)
        run("ip", "-n", rx_ns, "addr", "add", "198.18.0.2/24", "dev", rx_dev)
        run("ip", "-n", tx_ns, "link", "set", tx_dev, "up")
        run("ip", "-n", rx_ns, "link", "set", rx_dev, "up")
        yield VethPair(
            tx_ns, tx_dev, _mac(tx_ns, tx_dev), "198.18.0.1", rx_ns, rx_dev, _mac(rx_ns, rx_dev), "198.18.0.2"
        )
    finally:
        netns.remove(tx_ns)
        netns.remove(rx_ns)


@contextlib.contextmanager
def namespace(suffix: str) -> Iterator[str]:
    """One empty namespace wb<pid>-<suffix>, removed afterwards."""
    name = f"{PREFIX}-{suffix}"
    try:
        netns.create(name)
        yield name
    finally:
        netns.remove(name)


@contextlib.contextmanager
def temp_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"weir-bench-{os.getpid()}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def bpffs() -> Iterator[Path]:
    """A private bpffs root for one benchmark, with every pin under it removed afterwards."""
    root = bpffs_root()
    ensure_bpffs(root)
    try:
        yield root
    finally:
        remove_pins(root)


# ---- traffic ----


def trafgen_config(frame: bytes) -> str:
    """A trafgen packet config that sends exactly `frame`."""
    return (
        "{\n  "
        + ",\n  ".join(", ".join(f"0x{b:02x}" for b in frame[i : i + 16]) for i in range(0, len(frame), 16))
        + "\n}\n"
    )


@contextlib.contextmanager
def trafgen(ns: str, dev: str, config: Path) -> Iterator[subprocess.Popen[bytes]]:
    """trafgen flooding `config` out of `dev` in `ns` with one sender process, until the block ends.

    --no-sock-mem and --notouch-irq keep it from changing the machine's socket
    memory sysctls and IRQ affinities.
    """
    argv = [
        "ip",
        "netns",
        "exec",
        ns,
        "trafgen",
        "--in",
        str(config),
        "--out",
        dev,
        "--cpus",
        "1",
        "--no-sock-mem",
        "--notouch-irq",
    ]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        yield process
        if process.poll() is not None:
            raise RuntimeError(
                f"trafgen exited early ({process.returncode}): {process.stderr.read().decode()}"
                if process.stderr
                else "trafgen exited early"
            )
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if process.stderr:
            process.stderr.close()


def rates(counters: dict[str, Callable[[], int]], seconds: float) -> dict[str, float]:
    """Per-second rates of several counters over the same `seconds`-long window."""
    before = {name: read() for name, read in counters.items()}
    start = time.monotonic()
    time.sleep(seconds)
    after = {name: read() for name, read in counters.items()}
    elapsed = time.monotonic() - start
    return {name: (after[name] - before[name]) / elapsed for name in counters}
