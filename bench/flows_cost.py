"""What flow events cost: the chain per packet with events on and off, and a flood followed.

Part 1 (BPF_PROG_TEST_RUN, no traffic): the from-container entry program with the real
policy program in its slot, the endpoint's egress enforced by a deny entry for UDP 9000
(rule `deny-9000`) and an allow entry for UDP 8000. 64-byte UDP packets, side by side
in one run, with the DROP and VERDICT kinds' limits set as the orchestrator sets them:

  - denied, events off (the kind's OFF flag: one array lookup, no ring buffer);
  - denied, every drop an event (no limit; the ring buffer is drained between runs so
    every reservation succeeds and each packet pays for a whole record);
  - denied, rate-limited with the bucket empty (what a flood costs once the burst is
    spent: one clock read, no record);
  - denied, sampled one in 64 with no limit;
  - allowed, established (conntrack hit; no event either way): events on vs off;
  - each kind's default limit, as a flood meets it (the bucket is spent within a run);
  - the prefilter's XDP program dropping a listed source (the PREFILTER kind, the
    line-rate path): events off, its default, every drop, rate-limited, sampled.

Mean ns per packet of the best run, and the ratio to "denied, events off" (the XDP rows:
to "XDP prefilter drop, events off").

Part 2 (real traffic, with --flood): a node of the test harness (real orchestrator and
policy services), two endpoints, a deny rule for UDP 9000 into the server; trafgen floods
64-byte UDP from the client's namespace to it for a fixed window. Rows, interleaved over
a few rounds (medians), each with per second: the policy's drops, the flows the
orchestrator made, the events the limit held back (an "off" kind counts there too) and
those the full ring buffer lost; and the flows a `GetFlows --follow` read by this process
received over the whole run, warm-up included (no follower in the first row):

  - events off;
  - default rate limit (1000/s per CPU, burst 100), followed;
  - no limit, followed.

Everything (namespaces, pins, processes) is removed afterwards.

    sudo .venv/bin/python -m bench.flows_cost [--repeat N] [--runs N] [--flood] [--seconds S] [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ipaddress
import os
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from weir.orchestrator.v1 import orchestrator_pb2 as pb
from weir.policy.v1 import policy_pb2, policy_pb2_grpc

from bench.netbench import trafgen, trafgen_config
from bench.netbench import udp_frame as net_frame
from pybpf import Program, RingBuffer
from services.common.datapath import FIRST_LABEL_IDENTITY, Direction, EndpointInfo, EventKind
from services.orchestrator.eventlimits import EventLimits, Limit, default_limits
from services.policy.compute import MapEntry
from services.policy.defs import ConfigFlag
from services.prefilter.denylist import Capacity, Entry
from tests.e2e.test_policy import known, sel, udp
from tests.harness.bpfrun import LOOPBACK_IFINDEX, Datapath
from tests.harness.node import Node

ENDPOINT_ID = 1
DENIED_PORT, ALLOWED_PORT = 9000, 8000
TC_ACT_SHOT, TC_ACT_OK, XDP_DROP = 2, 0, 1


def udp_frame(dport: int, sport: int = 40000) -> bytes:
    """Ethernet + IPv4 + UDP from 198.18.0.10 to 198.18.0.11, 64 bytes in all."""
    payload = bytes(64 - 14 - 20 - 8)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, bytes([198, 18, 0, 10]), bytes([198, 18, 0, 11])
    )
    eth = bytes.fromhex("020000000002020000000001") + struct.pack("!H", 0x0800)
    return eth + ip + udp


@dataclass(frozen=True)
class Case:
    label: str
    port: int  # 0: the XDP prefilter case (a listed source)
    limit: Limit
    expect: int


CASES = [
    Case("denied, events off", DENIED_PORT, Limit(off=True), TC_ACT_SHOT),
    Case("denied, every drop an event", DENIED_PORT, Limit(rate=0), TC_ACT_SHOT),
    Case("denied, rate-limited (bucket empty)", DENIED_PORT, Limit(rate=1, burst=1), TC_ACT_SHOT),
    Case("denied, sampled 1 in 64", DENIED_PORT, Limit(rate=0, sample=64), TC_ACT_SHOT),
    Case("allowed, established, events off", ALLOWED_PORT, Limit(off=True), TC_ACT_OK),
    Case("allowed, established, events on", ALLOWED_PORT, Limit(rate=0), TC_ACT_OK),
    Case("denied, default limit (1000/s, burst 100)", DENIED_PORT, default_limits()[EventKind.DROP], TC_ACT_SHOT),
    Case("XDP prefilter drop, events off", 0, Limit(off=True), XDP_DROP),
    Case("XDP prefilter drop, default (100/s, 1 in 16)", 0, default_limits()[EventKind.PREFILTER], XDP_DROP),
    Case("XDP prefilter drop, every drop an event", 0, Limit(rate=0), XDP_DROP),
    Case("XDP prefilter drop, rate-limited", 0, Limit(rate=1, burst=1), XDP_DROP),
    Case("XDP prefilter drop, sampled 1 in 64", 0, Limit(rate=0, sample=64), XDP_DROP),
]


def measure(repeat: int, runs: int) -> dict[str, float]:
    dp = Datapath(Path(f"/sys/fs/bpf/weir-fbench-{os.getpid()}"))
    try:
        dp.open()
        maps = dp.load_policy()
        assert dp.entry is not None
        dp.shared("endpoints").typed(ctypes.c_uint32, EndpointInfo).update(
            LOOPBACK_IFINDEX, EndpointInfo(ENDPOINT_ID, FIRST_LABEL_IDENTITY, 0, 0)
        )
        entries = [
            MapEntry(Direction.EGRESS, 0, 17, DENIED_PORT, 16, True, ("deny-9000",)),
            MapEntry(Direction.EGRESS, 0, 17, ALLOWED_PORT, 16, False, ("allow-8000",)),
        ]
        maps.install(ENDPOINT_ID, entries, ConfigFlag.EGRESS_ENFORCED)
        prefilter = dp.load_prefilter(Capacity(hosts=64, prefixes=64))
        prefilter.install([Entry(ipaddress.ip_network("198.18.0.10/32"), False, 1)])
        limits = EventLimits(dp.entry.maps["event_limits"], dp.entry.maps["event_stats"])
        program: Program = dp.entry.programs["entry_from_container"]
        # The prefilter's own program: the XDP entry cannot be repeated by test_run (each
        # repetition moves data_meta again, without a reset, until the headroom runs out).
        xdp: Program = prefilter.program
        program.test_run(udp_frame(ALLOWED_PORT), repeat=1)  # the allowed flow's conntrack entry
        best: dict[str, float] = {case.label: float("inf") for case in CASES}
        with RingBuffer(dp.shared("events"), lambda _record: None) as ring:
            while ring.consume():
                pass
            for _ in range(runs):  # cases interleaved run by run, so drift hits them alike
                for case in CASES:
                    limits.configure(
                        {EventKind.DROP: case.limit, EventKind.VERDICT: case.limit, EventKind.PREFILTER: case.limit}
                    )
                    if case.port:
                        result = program.test_run(udp_frame(case.port), repeat=repeat)
                    else:
                        result = xdp.test_run(udp_frame(DENIED_PORT), repeat=repeat)
                    assert result.retval == case.expect, (case.label, result.retval)
                    best[case.label] = min(best[case.label], float(result.duration_ns))
                    while ring.consume():
                        pass
        stats = {s.kind: s for s in limits.stats()}
        assert stats["DROP"].lost == 0, "the ring buffer filled: lower --repeat"
        return best
    finally:
        dp.close()


# ---- part 2: a flood through a real node ----


@contextlib.contextmanager
def flood_node() -> Iterator[tuple[Node, pb.Endpoint, pb.Endpoint]]:
    name = f"wfb{os.getpid() % 100000}"
    workdir = tempfile.TemporaryDirectory(prefix=f"{name}-")
    node = Node(name, Path(workdir.name))
    try:
        node.setup()
        node.start("orchestrator")
        node.start("policy")
        client = node.create_endpoint("client", {"app": "client"}, ipv6=False)
        server = node.create_endpoint("server", {"app": "server"}, ipv6=False)
        policy = policy_pb2_grpc.PolicyStub(node.channel("policy"))
        known(policy, client, server)
        deny = policy_pb2.Rule(
            name="no-udp-9000",
            endpoint_selector=sel(app="server"),
            ingress_deny=[policy_pb2.PeerRule(endpoints=[sel(app="client")], ports=[udp(DENIED_PORT)])],
        )
        policy.ImportRules(policy_pb2.ImportRulesRequest(rules=[deny]), timeout=30)
        yield node, client, server
    finally:
        node.teardown()
        workdir.cleanup()


def _link(ns: str | None, dev: str) -> dict[str, str]:
    import json

    argv = ["ip", "-j", "link", "show", "dev", dev]
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]
    return dict(json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)[0])


@dataclass(frozen=True)
class FloodRow:
    label: str
    drops: float  # per second, the policy's drop counter
    flows: float  # per second, flows the orchestrator made
    limited: float  # per second, events the limit held back
    lost: float  # per second, events the full ring buffer lost
    followed: int  # flows the follower received over the run


FLOOD_SETUPS = (  # set through the orchestrator's SetEventLimits, as an operator would
    ("events off, not followed", "drop=off", False),
    ("rate limit 1000/s/CPU, followed", "drop=1000/100", True),
    ("no limit, followed", "drop=0", True),
)


def flood(seconds: float, rounds: int) -> list[FloodRow]:
    """Each setup `rounds` times, interleaved; the median of each column per setup."""
    runs: dict[str, list[FloodRow]] = {label: [] for label, _, _ in FLOOD_SETUPS}
    with flood_node() as (node, client, server), contextlib.ExitStack() as stack:
        gateway = _link(node.ns, client.host_ifname)["address"]
        own = _link(client.netns, "eth0")["address"]
        frame = net_frame(client.ipv4, server.ipv4, own, gateway)
        frame = frame[:36] + struct.pack("!H", DENIED_PORT) + frame[38:]  # UDP destination port
        frame = frame[:40] + b"\0\0" + frame[42:]  # no UDP checksum
        config = Path(f"/tmp/wfb{os.getpid()}.trafgen")
        config.write_text(trafgen_config(frame))
        stack.callback(config.unlink, missing_ok=True)
        stub = node.orchestrator()

        def sample() -> tuple[int, int, int, int, float]:
            reply = stub.GetMetrics(pb.GetMetricsRequest(), timeout=10)
            drops = sum(r.counter.packets for r in reply.reasons if r.reason == "POLICY_DENY_RULE")
            stats = stub.GetFlowStats(pb.GetFlowStatsRequest(), timeout=10)
            drop = next(k for k in stats.event_kinds if k.kind == EventKind.DROP.name)
            return (drops, stats.seen, drop.rate_limited, drop.lost, time.monotonic())

        for _ in range(rounds):
            for label, limit, follow in FLOOD_SETUPS:
                stub.SetEventLimits(pb.SetEventLimitsRequest(limits=[limit]), timeout=10)
                received = [0]
                stream = stub.GetFlows(pb.GetFlowsRequest(follow=True), timeout=seconds + 30) if follow else None

                def read(stream: Iterator[pb.GetFlowsResponse] | None = stream, received: list[int] = received) -> None:
                    with contextlib.suppress(grpc.RpcError):
                        for message in stream or ():
                            if message.HasField("flow"):
                                received[0] += 1

                reader = threading.Thread(target=read, daemon=True)
                if stream is not None:
                    reader.start()
                with trafgen(client.netns, "eth0", config):
                    time.sleep(1.0)  # warm-up
                    before = sample()
                    time.sleep(seconds)
                    after = sample()
                if stream is not None:
                    stream.cancel()
                    reader.join(timeout=5)
                took = after[4] - before[4]
                drops, flows, limited, lost = ((a - b) / took for a, b in zip(after[:4], before[:4], strict=True))
                runs[label].append(FloodRow(label, drops, flows, limited, lost, received[0]))
    return [
        FloodRow(
            label,
            statistics.median(r.drops for r in rows),
            statistics.median(r.flows for r in rows),
            statistics.median(r.limited for r in rows),
            statistics.median(r.lost for r in rows),
            int(statistics.median(r.followed for r in rows)),
        )
        for label, rows in runs.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5000, help="test_run repetitions per run (fit the ring buffer)")
    parser.add_argument("--runs", type=int, default=30, help="runs per case; the best is kept")
    parser.add_argument("--flood", action="store_true", help="also flood a real node (part 2)")
    parser.add_argument("--seconds", type=float, default=5.0, help="flood window per row")
    parser.add_argument("--rounds", type=int, default=3, help="flood rounds (medians are printed)")
    args = parser.parse_args()
    best = measure(args.repeat, args.runs)
    print(f"{'case (64-byte UDP)':<42}{'ns/packet':>10}{'ratio':>8}")
    for case in CASES:
        base = best[CASES[0].label] if case.port else best["XDP prefilter drop, events off"]
        ns = best[case.label]
        print(f"{case.label:<42}{ns:>10.1f}{ns / base:>8.2f}")
    if args.flood:
        print(
            f"\n{'flood (trafgen, 64-byte UDP, denied; per s)':<36}{'drops':>10}{'flows':>9}{'limited':>10}"
            f"{'lost':>9}{'followed':>10}"
        )
        for row in flood(args.seconds, args.rounds):
            print(
                f"{row.label:<36}{row.drops:>10,.0f}{row.flows:>9,.0f}{row.limited:>10,.0f}{row.lost:>9,.0f}"
                f"{row.followed:>10}"
            )


if __name__ == "__main__":
    main()
