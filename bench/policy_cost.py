"""What endpoint policy costs per packet as an endpoint's policy map grows: 10 to 100k entries.

Runs the orchestrator's from-container entry program (with the policy
program in its slot, egress enforced) through BPF_PROG_TEST_RUN on 64-byte
TCP packets from the endpoint, with N = 10, 1k, 10k and 100k entries in the
endpoint's policy map. The entries are N peer identities, one per CIDR:
N /32 hosts in 10.0.0.0/8 each get a CIDR identity and one allow entry
(egress, TCP port 80); the packets go to the last host added, so they hit the
last entry written. Two layouts:

- "map + ipcache": the ipcache holds all N hosts too, as it would with N
  CIDR peers (both LPM tries grow);
- "map only": the ipcache holds just the endpoint and the one peer the packets
  go to, so only the policy map grows.

Two paths for every N:

- new flow (conntrack miss: two ipcache lookups, the policy lookup, a
  conntrack insert). test_run repeats one packet and its first repetition
  creates the connection, so "single" runs are one repetition each with a
  source port never used before (mean and median over many runs). "loop"
  repeats a SYN+FIN on one tuple: conntrack takes a SYN on a closing tuple
  for a new connection, so every repetition does the whole new-flow path
  (the first conntrack lookup hits instead of missing twice, and the insert
  overwrites); the policy entry's hit counter confirms it.
- established (conntrack hit): the same SYN again, as single runs and as a
  loop. Policy judges every packet of the original direction, but an allow
  verdict is cached in the conntrack entry under (policy revision, ipcache
  generation): while neither moves, the hit costs two array reads and no
  policy or ipcache lookup.

Single runs carry the kernel's timer around one repetition and a colder cache
than a loop: compare single with single and loop with loop. Ratios are to
N = 10. Everything lives in a private bpffs directory
(/sys/fs/bpf/weir-pbench-<pid>) that is removed afterwards.

With --compare BUILD (another bpf/build, e.g. of the previous datapath, whose
established flows skipped policy), only the established path is timed, through
both builds at once: each build under its own pin root with the same maps
contents, single runs and loops interleaved build by build, ns per packet of
each and their ratio (after / before).

    sudo .venv/bin/python -m bench.policy_cost [--sizes 10,1000,...] [--runs N] [--repeat N] [--loops N]
    sudo .venv/bin/python -m bench.policy_cost --compare /path/to/previous/bpf/build --sizes 10,100000
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import signal
import statistics
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import ClassVar

from pybpf import BpfObject, Map, MapType, Program
from services.common.bpffs import ensure_bpffs, remove_pins
from services.common.datapath import (
    FIRST_CIDR_IDENTITY,
    FIRST_LABEL_IDENTITY,
    CtKey,
    CtValue,
    Direction,
    EndpointInfo,
)
from services.common.validate import Network
from services.orchestrator.chain import local_register
from services.orchestrator.ipcache import Ipcache
from services.policy.compute import TCP, MapEntry
from services.policy.defs import PREFIX_FULL
from services.policy.maps import PolicyMaps, config_flags

BPF_BUILD = Path(__file__).resolve().parents[1] / "bpf" / "build"
SIZES = (10, 1_000, 10_000, 100_000)
TC_ACT_OK, TC_ACT_SHOT = 0, 2
TCP_FIN, TCP_SYN = 0x01, 0x02
LOOPBACK_IFINDEX = 1  # test_run gives the skb the loopback's ifindex when no ctx is passed
ENDPOINT_ID = 7
ENDPOINT_ADDR = "198.18.0.10"
PEER_BASE = int(ipaddress.IPv4Address("10.0.0.0"))
PORT = 80
FIRST_SPORT = 1024
LOOP_SPORT = 65000  # above every single-run source port
MAP_AND_IPCACHE, MAP_ONLY = "map + ipcache", "map only"
LAYOUTS = (MAP_AND_IPCACHE, MAP_ONLY)


@dataclass(frozen=True)
class Cost:
    """Figures for one layout and map size, in ns per packet."""

    layout: str
    entries: int
    new_mean: float
    new_median: float
    new_loop: float
    est_mean: float
    est_median: float
    est_loop: float


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` removes the pins as on Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def peer(index: int) -> str:
    return str(ipaddress.IPv4Address(PEER_BASE + index))


def tcp_frame(dst: str, sport: int, dport: int, flags: int = TCP_SYN) -> bytes:
    """Ethernet + IPv4 + TCP from the endpoint, 64 bytes (test_run checks no checksums)."""
    payload = bytes(64 - 14 - 20 - 20)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(tcp),
        0,
        0x4000,
        64,
        6,
        0,
        ipaddress.IPv4Address(ENDPOINT_ADDR).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    eth = bytes.fromhex("020000000002020000000001") + struct.pack("!H", 0x0800)
    return eth + ip + tcp


def entries(count: int) -> Iterator[MapEntry]:
    """One egress allow entry (TCP/80) for each of `count` CIDR identities."""
    for i in range(count):
        yield MapEntry(Direction.EGRESS, FIRST_CIDR_IDENTITY + i, TCP, PORT, 16, False, ("bench",))


def ipcache(count: int, layout: str) -> dict[Network, int]:
    """The endpoint's address and the peer hosts (all `count`, or the last only), each with its identity."""
    wanted: dict[Network, int] = {ipaddress.ip_network(f"{ENDPOINT_ADDR}/32"): FIRST_LABEL_IDENTITY}
    for i in range(count) if layout == MAP_AND_IPCACHE else [count - 1]:
        wanted[ipaddress.ip_network(f"{peer(i)}/32")] = FIRST_CIDR_IDENTITY + i
    return wanted


def run_once(program: Program, frame: bytes, expect: int) -> int:
    """One repetition; returns its ns. A wrong verdict means the set-up is wrong, so it raises."""
    result = program.test_run(frame, repeat=1)
    if result.retval != expect:
        raise RuntimeError(f"verdict {result.retval}, expected {expect}: the benchmark's set-up is broken")
    return result.duration_ns


def hits(maps: PolicyMaps, identity: int) -> int:
    """Packets the policy map's entry for `identity` has counted."""
    key = (int(Direction.EGRESS), identity, TCP, PORT, PREFIX_FULL)
    return maps.read(ENDPOINT_ID)[key][1].packets


def measure_size(
    program: Program, maps: PolicyMaps, cache: Ipcache, layout: str, size: int, runs: int, repeat: int, loops: int
) -> Cost:
    """Fill the map (and the ipcache) with `size` entries, then time new and established flows."""
    maps.install(ENDPOINT_ID, entries(size), config_flags(ingress=False, egress=True, audit=False))
    cache.reconcile(ipcache(size, layout))
    conntrack: Map = maps.maps["conntrack"].typed(CtKey, CtValue)
    conntrack.clear()
    target = peer(size - 1)
    run_once(program, tcp_frame(target, FIRST_SPORT, PORT + 1), TC_ACT_SHOT)  # enforced: other ports drop
    new = [run_once(program, tcp_frame(target, FIRST_SPORT + 1 + i, PORT), TC_ACT_OK) for i in range(runs)]
    created = sum(1 for _ in conntrack)
    if created != runs:
        raise RuntimeError(f"N={size}: {created} conntrack entries after {runs} new flows; not every run was new")
    established_frame = tcp_frame(target, FIRST_SPORT + 1, PORT)
    established = [run_once(program, established_frame, TC_ACT_OK) for _ in range(runs)]
    est_loop = min(program.test_run(established_frame, repeat=repeat).duration_ns for _ in range(loops))
    reopen = tcp_frame(target, LOOP_SPORT, PORT, TCP_SYN | TCP_FIN)
    before = hits(maps, FIRST_CIDR_IDENTITY + size - 1)
    new_loop = min(program.test_run(reopen, repeat=repeat).duration_ns for _ in range(loops))
    looked_up = hits(maps, FIRST_CIDR_IDENTITY + size - 1) - before
    if looked_up != repeat * loops:
        raise RuntimeError(f"N={size}: {looked_up} policy lookups in {repeat * loops} re-opening repetitions")
    conntrack.clear()
    return Cost(
        layout, size,
        statistics.fmean(new), statistics.median(new), float(new_loop),
        statistics.fmean(established), statistics.median(established), float(est_loop),
    )  # fmt: skip


@dataclass
class Rig:
    """One build's entry and policy objects under their own pin root, with the endpoint in place."""

    build: Path
    program: Program
    maps: PolicyMaps
    cache: Ipcache


class PreviousPolicyMaps(PolicyMaps):
    """PolicyMaps for a build from before policy revisions (no policy_revisions map)."""

    own_maps: ClassVar[tuple[str, ...]] = ("policy_maps", "policy_config")

    def _bump_revision(self, endpoint_id: int) -> None:
        """Nothing to bump: that build looks policy up only for new flows."""


@contextmanager
def rig(build: Path, root: Path, capacity: int, maps_class: type[PolicyMaps] = PolicyMaps) -> Iterator[Rig]:
    """Load `build`'s entry.o and policy.o under `root`; everything is removed afterwards."""
    ensure_bpffs(root)
    globals_dir = root / "globals"
    entry: BpfObject | None = None
    maps: PolicyMaps | None = None
    try:
        globals_dir.mkdir(mode=0o700)
        entry = BpfObject.open(build / "entry.o", pin_root=globals_dir)
        entry.load()
        maps = maps_class(build, globals_dir, root / "policy", capacity=capacity, register=local_register(entry))
        maps.load()
        endpoints = entry.maps["endpoints"].typed(ctypes.c_uint32, EndpointInfo)
        endpoints.update(LOOPBACK_IFINDEX, EndpointInfo(ENDPOINT_ID, FIRST_LABEL_IDENTITY, 0, 0))
        generation_pin = globals_dir / "ipcache_generation"  # a previous build may have none: a stand-in
        with (  # the orchestrator writes them in a node
            Map.from_pin(globals_dir / "ipcache") as pinned,
            Map.from_pin(generation_pin)
            if generation_pin.exists()
            else Map.create(MapType.ARRAY, 4, 4, 1) as generation,
        ):
            yield Rig(build, entry.programs["entry_from_container"], maps, Ipcache(pinned, generation))
    finally:
        if maps is not None:
            maps.close()
        if entry is not None:
            entry.close()
        remove_pins(root)


def measure(sizes: list[int], runs: int, repeat: int, loops: int) -> list[Cost]:
    if FIRST_SPORT + runs >= LOOP_SPORT:
        raise ValueError(f"--runs must stay below {LOOP_SPORT - FIRST_SPORT} (one source port per run)")
    with rig(BPF_BUILD, Path(f"/sys/fs/bpf/weir-pbench-{os.getpid()}"), max(sizes)) as r:
        return [
            measure_size(r.program, r.maps, r.cache, layout, size, runs, repeat, loops)
            for layout in LAYOUTS
            for size in sizes
        ]


@dataclass(frozen=True)
class Side:
    """Established-flow figures of one build at one size, ns per packet."""

    median: float  # single runs
    loop: float  # best loop


@dataclass(frozen=True)
class Comparison:
    layout: str
    entries: int
    before: Side
    after: Side


def establish(r: Rig, layout: str, size: int) -> bytes:
    """Fill the rig's maps for `size` and open one connection; returns its next packet."""
    r.maps.install(ENDPOINT_ID, entries(size), config_flags(ingress=False, egress=True, audit=False))
    r.cache.reconcile(ipcache(size, layout))
    r.maps.maps["conntrack"].clear()  # untyped: the previous build's entries are smaller
    target = peer(size - 1)
    run_once(r.program, tcp_frame(target, FIRST_SPORT, PORT + 1), TC_ACT_SHOT)  # enforced: other ports drop
    frame = tcp_frame(target, FIRST_SPORT + 1, PORT)
    run_once(r.program, frame, TC_ACT_OK)  # creates the connection
    return frame


def compare_size(rigs: dict[str, Rig], layout: str, size: int, runs: int, repeat: int, loops: int) -> Comparison:
    """Both builds with the same maps contents; single runs and loops interleaved packet by packet."""
    frames = {name: establish(r, layout, size) for name, r in rigs.items()}
    singles: dict[str, list[int]] = {name: [] for name in rigs}
    for _ in range(runs):
        for name, r in rigs.items():
            singles[name].append(run_once(r.program, frames[name], TC_ACT_OK))
    best: dict[str, int] = {}
    for _ in range(loops):
        for name, r in rigs.items():
            ns = r.program.test_run(frames[name], repeat=repeat).duration_ns
            best[name] = min(best.get(name, ns), ns)
    sides = {name: Side(statistics.median(singles[name]), float(best[name])) for name in rigs}
    return Comparison(layout, size, sides["before"], sides["after"])


def compare(sizes: list[int], before: Path, runs: int, repeat: int, loops: int) -> list[Comparison]:
    """Established flows through this build and the one at `before`, side by side."""
    pid = os.getpid()
    with (
        rig(before, Path(f"/sys/fs/bpf/weir-pbench-{pid}-before"), max(sizes), PreviousPolicyMaps) as old,
        rig(BPF_BUILD, Path(f"/sys/fs/bpf/weir-pbench-{pid}-after"), max(sizes)) as new,
    ):
        rigs = {"before": old, "after": new}
        return [compare_size(rigs, layout, size, runs, repeat, loops) for layout in LAYOUTS for size in sizes]


def report_comparison(rows: list[Comparison], before: Path) -> None:
    print(f"\nestablished flow (conntrack hit), ns per packet: before = {before}, after = {BPF_BUILD}")
    print(f"{'layout':>14} {'entries':>8} | {'single median':^23} | {'loop (best)':^23}")
    print(f"{'':>14} {'':>8} | {'before':>7}{'after':>8}{'ratio':>8} | {'before':>7}{'after':>8}{'ratio':>8}")
    for c in rows:
        print(
            f"{c.layout:>14} {c.entries:>8} | {c.before.median:>7.0f}{c.after.median:>8.0f}"
            f"{c.after.median / c.before.median:>8.2f} | {c.before.loop:>7.0f}{c.after.loop:>8.0f}"
            f"{c.after.loop / c.before.loop:>8.2f}"
        )


def report(costs: list[Cost]) -> None:
    for layout in LAYOUTS:
        rows = [c for c in costs if c.layout == layout]
        base, top = rows[0], rows[-1]
        print(f"\n{layout}: ns per packet; ratios to N={base.entries}")
        print(f"{'':>8} | {'new flow':^22} | {'established':^22} | {'ratio to N=' + str(base.entries):^26}")
        print(
            f"{'entries':>8} | {'mean':>7}{'median':>7}{'loop':>8} | {'mean':>7}{'median':>7}{'loop':>8} | "
            f"{'new med':>8}{'new loop':>9}{'est loop':>9}"
        )
        for c in rows:
            print(
                f"{c.entries:>8} | {c.new_mean:>7.0f}{c.new_median:>7.0f}{c.new_loop:>8.0f} | "
                f"{c.est_mean:>7.0f}{c.est_median:>7.0f}{c.est_loop:>8.0f} | "
                f"{c.new_median / base.new_median:>8.2f}{c.new_loop / base.new_loop:>9.2f}"
                f"{c.est_loop / base.est_loop:>9.2f}"
            )
        print(
            f"{layout}: from N={base.entries} to N={top.entries} a new flow costs "
            f"{top.new_median / base.new_median:.2f}x (single, median) / {top.new_loop / base.new_loop:.2f}x "
            f"(loop), an established one {top.est_loop / base.est_loop:.2f}x (loop); "
            f"new vs established at N={top.entries}: {top.new_loop / top.est_loop:.2f}x (loop)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", default=",".join(map(str, SIZES)), help="policy map sizes, comma-separated (default %(default)s)"
    )
    parser.add_argument("--runs", type=int, default=5000, help="single runs per path and size (default 5000)")
    parser.add_argument("--repeat", type=int, default=200_000, help="repetitions per loop (default 200000)")
    parser.add_argument("--loops", type=int, default=5, help="loops per path and size; the best is kept (default 5)")
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="BUILD",
        help="another bpf/build directory (e.g. of the previous datapath): time established flows through both",
    )
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    exit_on_sigterm()
    if args.compare is not None:
        report_comparison(compare(sizes, args.compare, args.runs, args.repeat, args.loops), args.compare)
        return
    costs = measure(sizes, args.runs, args.repeat, args.loops)
    print(
        "from-container chain (entry_from_container + policy_egress), 64-byte IPv4 TCP, "
        "N CIDR identities x 1 allow entry (TCP/80) in the endpoint's map"
    )
    print(f"single: {args.runs} one-repetition runs; loop: best of {args.loops} x {args.repeat} repetitions")
    report(costs)


if __name__ == "__main__":
    main()
