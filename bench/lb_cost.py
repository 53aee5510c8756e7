"""What the load balancer's per-packet program costs as services grow: 10, 1k, 10k and 50k services.

Runs the orchestrator's from-container entry program, with `lb_from_container`
in slot LB, through BPF_PROG_TEST_RUN on 64-byte TCP packets from an endpoint,
with N services programmed (3 backends each), and prints ns per packet and
the ratio to N = 10. A flat row is the claim being tested: one hash lookup per
frontend, whatever N is.

test_run runs every repetition on the same skb, so a translated packet is
not the packet it started as: after the first repetition a packet to a VIP is
addressed to a backend and the rest of the loop measures the non-VIP path.
The looped VIP figure therefore uses two services whose backends are each
other's frontends (A:80 -> B:80 -> A:80 ...; a source port is searched so the
hash picks that backend on both): after the first two repetitions every
repetition is an established-flow translation (frontend lookup, conntrack hit,
backend lookup, reverse-NAT entry touched, counters, NAT). The service
counters confirm that no repetition was a new connection. Columns:

- VIP est. loop: the ping-pong above, best of --runs loops of --repeat;
- non-VIP loop: a packet to an endpoint address (no frontend), best of loops;
- VIP est. single / VIP new single: median of --singles one-repetition runs,
  an established flow, and a new one (a SYN from a never-used source port:
  table lookup, backend lookup, two conntrack inserts). A single run carries
  the kernel timer around one repetition, so compare single with single.

The first two services go through `LbMaps.write` (the service's own writer);
the other N - 2 are written in batches into the same maps in the same layout
(`write_services`), since one `LbMaps.write` costs an RCU grace period (its
hash-of-maps update) and 50k of them would take minutes. Everything lives in
a private bpffs root (/sys/fs/bpf/weir-lbench-<pid>) and a cgroup the socket
programs attach to (/sys/fs/cgroup/unified/wl<pid>-lbench), both removed
afterwards. test_run keeps the touched entries in cache, so this shows the
lookup structures stay flat, not what cache misses cost under real traffic.

    sudo .venv/bin/python -m bench.lb_cost [--sizes 10,1000,...] [--repeat N] [--runs N] [--singles N]
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import statistics
import struct
from dataclasses import dataclass
from pathlib import Path

from weir.lb.v1 import lb_pb2 as pb

from bench.netbench import exit_on_sigterm
from pybpf import BpfObject, Map, MapType, Program
from services.common.bpffs import ensure_bpffs, remove_pins
from services.lb import model
from services.lb.defs import LbBackend, LbRevNat, LbService, LbServiceKey
from services.lb.maglev import weighted_table
from services.lb.maps import BPF_F_INNER_MAP, Change, Frontend, LbMaps, backend_value
from services.orchestrator.chain import local_register

BPF_BUILD = Path(__file__).resolve().parents[1] / "bpf" / "build"
SIZES = (10, 1_000, 10_000, 50_000)
BACKENDS = 3
TC_ACT_OK = 0
TCP_SYN, TCP_ACK = 0x02, 0x10
TCP = 6
VIP_BASE = int(ipaddress.IPv4Address("10.96.0.1"))  # service i has VIP 10.96.0.1 + i, port 80
FILLER_BACKEND_BASE = int(ipaddress.IPv4Address("10.128.0.0"))
CLIENT = "198.18.0.10"
NON_VIP = "198.18.0.11"
PORT, BACKEND_PORT = 80, 8080
# Ids of services written in batches: far from the ones the LB allocates (it counts up from 1).
SERVICE_ID_BASE = 1_000_000
BACKEND_ID_BASE = 1_000_000
REV_NAT_BASE = 10_000  # a u16 in the frontend's value: REV_NAT_BASE + services must stay below 65536
CHUNK = 1_000  # services per batch (inner-map fds held open at once)
PING_PONG_SPORTS = range(20_000, 22_000)
NEW_FLOW_SPORT = 30_000


def vip(index: int) -> str:
    return str(ipaddress.IPv4Address(VIP_BASE + index))


def filler_backends(index: int, count: int) -> list[str]:
    """Backend addresses of service `index` (map keys only: nothing is sent to them)."""
    return [str(ipaddress.IPv4Address(FILLER_BACKEND_BASE + index * count + k)) for k in range(count)]


def tcp_frame(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    """Ethernet + IPv4 + TCP, 64 bytes (test_run checks no checksums)."""
    payload = bytes(64 - 14 - 20 - 20)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 65535, 0, 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(tcp),
        0,
        0x4000,
        64,
        TCP,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    eth = bytes.fromhex("020000000002020000000001") + struct.pack("!H", 0x0800)
    return eth + ip + tcp


def destination(frame: bytes) -> tuple[str, int]:
    """The IPv4 destination address and TCP port of a frame as the program left it."""
    return str(ipaddress.IPv4Address(frame[30:34])), int(struct.unpack("!H", frame[36:38])[0])


@dataclass(frozen=True)
class Spec:
    """One service written in batches: frontend, backends and ids."""

    index: int
    address: str
    backends: list[tuple[str, int]]

    @property
    def service_id(self) -> int:
        return SERVICE_ID_BASE + self.index

    @property
    def rev_nat(self) -> int:
        return REV_NAT_BASE + self.index

    def backend_id(self, k: int) -> int:
        return BACKEND_ID_BASE + self.index * 64 + k  # room for 64 backends per service


def filler(index: int, backends: int = BACKENDS) -> Spec:
    return Spec(index, vip(index), [(a, BACKEND_PORT) for a in filler_backends(index, backends)])


def write_services(pin_dir: Path, specs: list[Spec]) -> None:
    """Write cluster-IP TCP services into the LB maps pinned in `pin_dir`, in batches.

    The same entries `LbMaps.write` makes for a new service (backends, reverse
    NAT, a weighted selection table in its own inner map, then the frontend),
    with one syscall per map per chunk instead of per entry: the outer table
    map's RCU grace period is paid once per chunk.
    """
    with (
        Map.from_pin(pin_dir / "lb_backends", key_type=ctypes.c_uint32, value_type=LbBackend) as backends,
        Map.from_pin(pin_dir / "lb_rev_nat", key_type=ctypes.c_uint32, value_type=LbRevNat) as rev_nat,
        Map.from_pin(pin_dir / "lb_tables", key_type=ctypes.c_uint32, value_type=ctypes.c_uint32) as tables,
        Map.from_pin(pin_dir / "lb_services", key_type=LbServiceKey, value_type=LbService) as services,
    ):
        for start in range(0, len(specs), CHUNK):
            chunk = specs[start : start + CHUNK]
            backend_keys, backend_values = [], []
            for spec in chunk:
                for k, (address, port) in enumerate(spec.backends):
                    backend_keys.append(spec.backend_id(k))
                    backend_values.append(backend_value(model.Backend(address, port)))
            backends.update_batch(backend_keys, backend_values)
            rev_values = []
            for spec in chunk:
                value = LbRevNat()
                ctypes.memmove(value.addr, ipaddress.IPv4Address(spec.address).packed, 4)
                value.port = int.from_bytes(PORT.to_bytes(2, "big"), "little")
                value.family = 2
                rev_values.append(value)
            rev_nat.update_batch([spec.rev_nat for spec in chunk], rev_values)
            inners: list[Map] = []
            try:
                sizes = []
                for spec in chunk:
                    slots = weighted_table([(f"{a}:{p}", 1) for a, p in spec.backends])
                    inner = Map.create(
                        MapType.ARRAY,
                        4,
                        4,
                        len(slots),
                        flags=BPF_F_INNER_MAP,
                        name=f"lb_table_{spec.service_id}",
                        key_type=ctypes.c_uint32,
                        value_type=ctypes.c_uint32,
                    )
                    inners.append(inner)
                    inner.update_batch(list(range(len(slots))), [spec.backend_id(s) for s in slots])
                    sizes.append(len(slots))
                tables.update_batch([spec.service_id for spec in chunk], [inner.fd for inner in inners])
            finally:
                for inner in inners:
                    inner.close()
            services.update_batch(
                [Frontend(spec.address, PORT, TCP, spec.rev_nat).key() for spec in chunk],
                [
                    LbService(
                        service_id=spec.service_id,
                        table_size=size,
                        flags=0,
                        affinity_timeout=0,
                        rev_nat_index=spec.rev_nat,
                    )
                    for spec, size in zip(chunk, sizes, strict=True)
                ],
            )


@dataclass(frozen=True)
class Cost:
    """ns per packet for one number of services."""

    services: int
    est_loop: float
    miss_loop: float
    est_single: float
    new_single: float


class Bench:
    """The entry program with the LB in its slot, and the two ping-pong services."""

    def __init__(self, root: Path, cgroup: Path, backends: int) -> None:
        self.root = root
        self.backends = backends
        globals_dir = root / "globals"
        globals_dir.mkdir(mode=0o700)
        self.entry = BpfObject.open(BPF_BUILD / "entry.o", pin_root=globals_dir)
        self.entry.load()
        self.maps = LbMaps(BPF_BUILD, globals_dir, root / "lb", cgroup, register=local_register(self.entry))
        self.maps.load()
        self.program: Program = self.entry.programs["entry_from_container"]
        self.count = 0
        self.sport = 0
        self.new_sport = NEW_FLOW_SPORT

    def close(self) -> None:
        self.maps.close()
        self.entry.close()

    def _ping_pong(self) -> None:
        """Services 0 and 1 (A, B): each has the other's frontend among its backends."""
        for index, other in ((0, 1), (1, 0)):
            backends = [pb.Backend(address=vip(other), port=PORT)] + [
                pb.Backend(address=a, port=BACKEND_PORT) for a in filler_backends(index, self.backends - 1)
            ]
            service = model.from_proto(
                pb.Service(name=f"pp{index}", address=vip(index), port=PORT, protocol="TCP", backends=backends)
            )
            ids = {b.key: index * 64 + k + 1 for k, b in enumerate(service.backends)}
            order = list(ids.values())
            table = [order[i] for i in weighted_table([(b.key, b.weight) for b in service.backends])]
            self.maps.write(
                [Change(index + 1, service, [Frontend(vip(index), PORT, TCP, index + 1)], [], ids, [], table)]
            )
        for sport in PING_PONG_SPORTS:
            result = self.program.test_run(tcp_frame(CLIENT, vip(0), sport, PORT, TCP_ACK), repeat=2)
            if destination(result.data) == (vip(0), PORT):  # A chose B and B chose A: both flows pinned
                self.sport = sport
                return
        raise RuntimeError("no source port makes A and B pick each other; the set-up is broken")

    def grow(self, services: int) -> None:
        """Program services up to `services` in all (the ping-pong pair counts)."""
        if self.count == 0:
            self._ping_pong()
            self.count = 2
        specs = [filler(i, self.backends) for i in range(self.count, services)]
        write_services(self.root / "lb", specs)
        self.count = max(self.count, services)
        if specs:  # a packet to the newest frontend must reach one of its backends
            probe = specs[-1]
            result = self.program.test_run(tcp_frame(CLIENT, probe.address, 40_000, PORT, TCP_SYN), repeat=1)
            if destination(result.data) not in probe.backends:
                raise RuntimeError(f"a packet to {probe.address} went to {destination(result.data)}")

    def new_conns(self) -> int:
        return sum(self.maps.counts("lb_service_stats", i).new_conns for i in (1, 2))

    def measure(self, repeat: int, runs: int, singles: int) -> Cost:
        program = self.program
        established = tcp_frame(CLIENT, vip(0), self.sport, PORT, TCP_ACK)
        before = self.new_conns()
        est_loop = min(program.test_run(established, repeat=repeat).duration_ns for _ in range(runs))
        est_single = statistics.median(program.test_run(established, repeat=1).duration_ns for _ in range(singles))
        if self.new_conns() != before:
            raise RuntimeError("the established-flow runs opened new connections; the set-up is broken")
        miss = tcp_frame(CLIENT, NON_VIP, self.sport, PORT, TCP_ACK)
        miss_loop = min(program.test_run(miss, repeat=repeat).duration_ns for _ in range(runs))
        new = []
        for _ in range(singles):
            self.new_sport += 1
            frame = tcp_frame(CLIENT, vip(0), self.new_sport, PORT, TCP_SYN)
            result = program.test_run(frame, repeat=1)
            if result.retval != TC_ACT_OK:
                raise RuntimeError(f"a new flow got verdict {result.retval}")
            new.append(result.duration_ns)
        if self.new_conns() != before + singles:
            raise RuntimeError("not every new-flow run opened a connection; the set-up is broken")
        return Cost(self.count, float(est_loop), float(miss_loop), float(est_single), float(statistics.median(new)))


def measure(sizes: list[int], backends: int, repeat: int, runs: int, singles: int) -> list[Cost]:
    if max(sizes) + REV_NAT_BASE >= 1 << 16:
        raise ValueError(f"at most {(1 << 16) - REV_NAT_BASE - 1} services (reverse-NAT indexes are 16 bits)")
    if NEW_FLOW_SPORT + singles * len(sizes) >= 1 << 16:
        raise ValueError("--singles is too large: every new flow needs its own source port")
    if not 2 <= backends <= 64:
        raise ValueError("--backends must be 2..64")
    pid = os.getpid()
    root = Path(f"/sys/fs/bpf/weir-lbench-{pid}")
    cgroup = Path(f"/sys/fs/cgroup/unified/wl{pid}-lbench")
    bench: Bench | None = None
    try:
        ensure_bpffs(root)
        cgroup.mkdir()
        bench = Bench(root, cgroup, backends)
        out = []
        for size in sorted(sizes):
            bench.grow(size)
            out.append(bench.measure(repeat, runs, singles))
        return out
    finally:
        if bench is not None:
            bench.close()
        remove_pins(root)
        if cgroup.exists():
            cgroup.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="numbers of services (at least 10)")
    parser.add_argument("--backends", type=int, default=BACKENDS, help="backends per service")
    parser.add_argument("--repeat", type=int, default=1_000_000, help="test_run repetitions per loop")
    parser.add_argument("--runs", type=int, default=5, help="loops per figure; the best is kept")
    parser.add_argument("--singles", type=int, default=2_000, help="one-repetition runs per figure (median)")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.sizes.split(",")})
    if sizes[0] < 10:
        parser.error("every size must be at least 10")
    exit_on_sigterm()
    costs = measure(sizes, args.backends, args.repeat, args.runs, args.singles)
    heads = ("VIP est. loop", "non-VIP loop", "VIP est. single", "VIP new single")
    print(f"ns per packet through entry_from_container -> lb_from_container ({args.backends} backends per service)")
    print(f"{'services':>9}" + "".join(f"{h:>17}" for h in heads))
    for c in costs:
        print(
            f"{c.services:>9}" + "".join(f"{v:>17.1f}" for v in (c.est_loop, c.miss_loop, c.est_single, c.new_single))
        )
    base = costs[0]
    print(f"\nratio to N = {base.services}")
    print(f"{'services':>9}" + "".join(f"{h:>17}" for h in heads))
    for c in costs:
        ratios = (
            c.est_loop / base.est_loop,
            c.miss_loop / base.miss_loop,
            c.est_single / base.est_single,
            c.new_single / base.new_single,
        )
        print(f"{c.services:>9}" + "".join(f"{r:>17.2f}" for r in ratios))


if __name__ == "__main__":
    main()
