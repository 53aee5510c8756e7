"""What a tail-call chain costs: entry program alone vs. entry + 1, 2, 4 objects,
and an established packet through the from-container chain, slot by slot.

Runs the from-container entry program through BPF_PROG_TEST_RUN on a 64-byte
UDP/IPv4 frame, with 0, 1, 2 and 4 counting objects in its call map, and prints
the mean ns per packet (best of several runs) and the ratio to the entry alone.

Then the established packet, one stage at a time (each the best of several loops
of test_run): an empty TC program (the floor), the entry program with no slot
filled, the entry with a counting object in the policy slot, and the entry with
the real policy object in its slot on an established TCP connection (conntrack
hit, cached verdict; the rig of bench.policy_cost). The difference between two
stages is what that stage adds. Everything lives in private bpffs directories
that are removed afterwards.

    sudo .venv/bin/python -m bench.chain_cost [--repeat N] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import struct
from pathlib import Path

from bench.policy_cost import MAP_ONLY, TC_ACT_OK, establish, rig
from pybpf import BpfObject, ProgArray, Program
from services.common.bpffs import ensure_bpffs, remove_pins
from services.common.datapath import Hook, Slot
from services.orchestrator.chain import Generations

BPF_BUILD = Path(__file__).resolve().parents[1] / "bpf" / "build"


def udp_frame() -> bytes:
    """Ethernet + IPv4 + UDP, 64 bytes in all (checksums are not checked by test_run)."""
    payload = bytes(64 - 14 - 20 - 8)
    udp = struct.pack("!HHHH", 40000, 9000, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, bytes([198, 18, 0, 10]), bytes([198, 18, 0, 11])
    )
    eth = bytes.fromhex("020000000002020000000001") + struct.pack("!H", 0x0800)
    return eth + ip + udp


def measure(repeat: int, runs: int, depths: tuple[int, ...] = (0, 1, 2, 4)) -> dict[int, float]:
    root = Path(f"/sys/fs/bpf/weir-bench-{os.getpid()}")
    ensure_bpffs(root)
    globals_dir = root / "globals"
    globals_dir.mkdir(parents=True)
    objects: list[BpfObject] = []
    try:
        entry = BpfObject.open(BPF_BUILD / "entry.o", pin_root=globals_dir)
        entry.load()
        objects.append(entry)
        calls = ProgArray(entry.maps["calls_from_container"])
        generations = Generations({Hook.FROM_CONTAINER: calls}, entry.maps["chain_state"])
        placed: dict[Slot, Program] = {}
        program = entry.programs["entry_from_container"]
        frame = udp_frame()
        results: dict[int, float] = {}
        for depth in depths:
            while len(objects) - 1 < depth:
                counter = BpfObject.open(BPF_BUILD / "counter.o", pin_root=globals_dir)
                counter.load()
                objects.append(counter)
                placed[Slot(len(objects) - 2)] = counter.programs["count_from_container"]
            generations.install(Hook.FROM_CONTAINER, placed)
            best = min(program.test_run(frame, repeat=repeat).duration_ns for _ in range(runs))
            results[depth] = float(best)
            assert depth == 0 or generations.program_id(Hook.FROM_CONTAINER, Slot(depth - 1))
        return results
    finally:
        for obj in objects:
            obj.close()
        remove_pins(root)


STAGES = ("empty program", "entry, no slot", "entry + counting object", "entry + policy, established")


def established_stages(repeat: int, runs: int) -> dict[str, float]:
    """Best ns per packet of each stage of an established packet's path (STAGES, in order)."""

    def best(program: Program, frame: bytes) -> float:
        return float(min(program.test_run(frame, repeat=repeat).duration_ns for _ in range(runs)))

    out: dict[str, float] = {}
    root = Path(f"/sys/fs/bpf/weir-bench-{os.getpid()}-est")
    with rig(BPF_BUILD, root, 16) as r:
        frame = establish(r, MAP_ONLY, 10)
        counter = BpfObject.open(BPF_BUILD / "counter.o", pin_root=root / "globals")
        try:
            counter.load()
            empty = counter.programs["empty_tc"]
            if empty.test_run(frame, repeat=1).retval != TC_ACT_OK:
                raise RuntimeError("the empty program did not pass the packet")
            out[STAGES[0]] = best(empty, frame)
            out[STAGES[3]] = best(r.program, frame)
        finally:
            counter.close()
    depth = measure(repeat, runs, depths=(0, 1))
    out[STAGES[1]], out[STAGES[2]] = depth[0], depth[1]
    return {stage: out[stage] for stage in STAGES}


def summary_rows(quick: bool = False) -> list[tuple[str, float, float, float]]:
    """(measure, Weir ns, reference ns, ratio) for bench.all."""
    repeat, runs = (200_000, 3) if quick else (1_000_000, 5)
    stages = established_stages(repeat, runs)
    chain, empty = stages[STAGES[3]], stages[STAGES[0]]
    return [
        ("established packet through the from-container chain / empty program (ns)", chain, empty, chain / empty),
        ("entry program, no slot / empty program (ns)", stages[STAGES[1]], empty, stages[STAGES[1]] / empty),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1_000_000, help="test_run repetitions per run")
    parser.add_argument("--runs", type=int, default=5, help="runs per configuration; the best is kept")
    args = parser.parse_args()
    results = measure(args.repeat, args.runs)
    base = results[0]
    print(f"{'chain':<22}{'ns/packet':>10}{'ratio':>8}")
    for depth, ns in results.items():
        label = "entry alone" if depth == 0 else f"entry + {depth} object{'s' if depth > 1 else ''}"
        print(f"{label:<22}{ns:>10.1f}{ns / base:>8.2f}")
    stages = established_stages(args.repeat, args.runs)
    floor = stages[STAGES[0]]
    print(f"\n{'established packet, stage by stage':<34}{'ns/packet':>10}{'added':>8}{'/ empty':>9}")
    previous = 0.0
    for stage, ns in stages.items():
        print(f"{stage:<34}{ns:>10.1f}{ns - previous:>8.1f}{ns / floor:>9.2f}")
        previous = ns


if __name__ == "__main__":
    main()
