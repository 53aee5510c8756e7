"""What a deny-list lookup costs as the list grows: 1, 1k, 100k and 1M entries.

Runs the prefilter's XDP program through BPF_PROG_TEST_RUN on 64-byte
UDP/IPv4 frames from four sources: two on no list (the full miss: host hash,
then LPM trie), one on the list as a /32 host and one inside a listed prefix.
Lists are mostly /32 hosts plus 1% prefixes (at most 10k) of lengths /24../30
packed into 10.64.0.0/10; the deep miss comes from next to a listed /25, so the
trie walk goes all the way down, the shallow one from far away. Each
list is installed with `Prefilter.replace`, as the service would, in a prefilter of its
own, and the runs go round all lists in turn (a load burst hits every figure alike). Prints the
mean ns per packet (best of several runs) and the ratio to the 1-entry list.
The same packet is repeated, so the map entries it touches stay in cache.
Everything lives in a private bpffs directory and temp dir, removed afterwards.

With --compare DIR (another checkout, protos generated and BPF built, e.g. main
with the LPM trie for IPv4 prefixes), that checkout's benchmark runs first with the
same arguments, so both structures are measured in one run, one after the other.

    sudo .venv/bin/python -m bench.prefilter_cost [--repeat N] [--runs N] [--sizes 1,1000,...] [--compare DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.netbench import BPF_BUILD, bpffs, exit_on_sigterm, filler_list, temp_dir, udp_frame
from services.common.logs import setup_logging
from services.common.store import Store
from services.orchestrator.chain import Chain
from services.orchestrator.devices import Devices
from services.prefilter.denylist import Capacity
from services.prefilter.maps import PrefilterMaps
from services.prefilter.prefilter import Prefilter

XDP_DROP, XDP_PASS = 1, 2
DESTINATION = "198.18.0.2"
SIZES = (1, 1_000, 100_000, 1_000_000)


HOST_ENTRY = "10.15.255.254/32"
PREFIX_ENTRY = "10.128.5.0/24"


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    verdict: int


MISS = Case("miss, deep", "10.64.1.200", XDP_PASS)
FAR = Case("miss, shallow", "198.51.100.7", XDP_PASS)
HOST = Case("listed host", "10.15.255.254", XDP_DROP)
PREFIX = Case("listed prefix", "10.128.5.77", XDP_DROP)
CASES = (MISS, FAR, HOST, PREFIX)


def lists(size: int) -> list[tuple[list[str], tuple[Case, ...]]]:
    """The deny lists of one size and the cases each serves.

    A 1-entry list holds only the entry its case needs (a host for the misses); a
    longer list holds both probe entries plus fillers, and serves every case.
    """
    if size == 1:
        return [([HOST_ENTRY], (MISS, FAR, HOST)), ([PREFIX_ENTRY], (PREFIX,))]
    return [([HOST_ENTRY, PREFIX_ENTRY, *filler_list(size - 2)], CASES)]


@contextlib.contextmanager
def installed(root: Path, state: Path, entries: list[str], hosts: int) -> Iterator[PrefilterMaps]:
    """A prefilter of its own (own chain, bpffs subtree and store) holding `entries`, as the service would."""
    state.mkdir()
    # The orchestrator's chain in this process: it places the program and runs XDP on the device.
    orch_store = Store(state / "orchestrator.db")
    chain = Chain(BPF_BUILD, root / "globals", root / "orchestrator", orch_store)
    store = Store(state / "prefilter.db")
    prefilter: Prefilter | None = None
    try:
        chain.start()
        capacity = Capacity(hosts=max(hosts, 16), prefixes=64_000)
        maps = PrefilterMaps(
            BPF_BUILD, root / "globals", root / "prefilter", capacity, register=chain.registrar("prefilter")
        )
        prefilter = Prefilter(maps, store, Devices(chain, orch_store))
        prefilter.start()
        started = time.monotonic()
        prefilter.replace((cidr, False) for cidr in entries)
        print(f"  installed {len(entries):>9,} entries in {time.monotonic() - started:5.1f} s", flush=True)
        yield maps
    finally:
        if prefilter is not None:
            prefilter.close()
        store.close()
        chain.close()
        orch_store.close()


def measure(sizes: list[int], repeat: int, runs: int) -> dict[int, dict[str, float]]:
    """Best mean ns per packet by list size and case; each verdict is checked first.

    Every list is installed first, each in a prefilter of its own; then the runs go round
    all lists and cases in turn, so a burst of load on the shared machine hits every figure
    alike rather than one list size.
    """
    frames = {case.name: udp_frame(case.source, DESTINATION) for case in CASES}
    best: dict[tuple[int, str], float] = {}
    with bpffs() as root, temp_dir() as state, contextlib.ExitStack() as stack:
        rigs: list[tuple[int, PrefilterMaps, tuple[Case, ...]]] = []
        for size in sizes:
            for n, (entries, cases) in enumerate(lists(size)):
                maps = stack.enter_context(installed(root / f"l{size}-{n}", state / f"l{size}-{n}", entries, size))
                for case in cases:
                    verdict = maps.program.test_run(frames[case.name], repeat=1).retval
                    if verdict != case.verdict:
                        raise RuntimeError(f"{case.name} at size {size}: verdict {verdict}, wanted {case.verdict}")
                rigs.append((size, maps, cases))
        for _ in range(runs):
            for size, maps, cases in rigs:
                for case in cases:
                    ns = float(maps.program.test_run(frames[case.name], repeat=repeat).duration_ns)
                    best[(size, case.name)] = min(best.get((size, case.name), ns), ns)
    return {size: {case.name: best[(size, case.name)] for case in CASES} for size in sizes}


def summary_rows(quick: bool = False) -> list[tuple[str, float, float, float]]:
    """(measure, ns at the big list, ns at the 1-entry list, ratio) for bench.all."""
    top = 100_000 if quick else 1_000_000
    results = measure([1, top], repeat=200_000 if quick else 1_000_000, runs=3 if quick else 5)
    label = f"{top // 1000}k" if top < 1_000_000 else f"{top // 1_000_000}M"
    return [
        (f"prefilter {case.name} (ns/packet), {label} entries / 1 entry", results[top][case.name],
         results[1][case.name], results[top][case.name] / results[1][case.name])
        for case in (MISS, FAR, HOST)
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1_000_000, help="test_run repetitions per run")
    parser.add_argument("--runs", type=int, default=5, help="runs per configuration; the best is kept")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated list sizes")
    parser.add_argument("--compare", type=Path, help="another checkout whose benchmark runs first, same arguments")
    args = parser.parse_args()
    exit_on_sigterm()
    setup_logging("bench", "warning")
    if args.compare is not None:
        print(f"== {args.compare} (before)", flush=True)
        argv = [sys.executable, "-m", "bench.prefilter_cost", "--repeat", str(args.repeat), "--runs", str(args.runs),
                "--sizes", args.sizes]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=f"{args.compare}:{args.compare / 'build' / 'python'}")
        subprocess.run(argv, cwd=args.compare, env=env, check=True)
        print(f"== {Path(__file__).resolve().parents[1]} (after)", flush=True)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    results = measure(sizes, args.repeat, args.runs)
    base = results[sizes[0]]
    print(f"\nns per packet (best of {args.runs} runs of {args.repeat:,}); ratio to the {sizes[0]:,}-entry list")
    print(f"{'entries':>10}" + "".join(f"{case.name:>16}{'ratio':>7}" for case in CASES))
    for size, row in results.items():
        cells = "".join(f"{row[c.name]:>16.0f}{row[c.name] / base[c.name]:>7.2f}" for c in CASES)
        print(f"{size:>10,}{cells}")


if __name__ == "__main__":
    main()
