"""Socket-layer acceleration: accelerated vs plain path between two endpoints, in one run.

A node (tests.harness.node.Node) runs the orchestrator, policy and sockaccel as processes,
with two endpoints (client, server) that policy allows to talk both ways, so the plain
path is the real chain: entry programs, policy, conntrack, veth. Every workload process
runs in the server's or the client's namespace and in the node's cgroup, as endpoint
processes do. Rounds alternate between the modes (mode is read when a connection is
established), so both see the same machine load.

1. Request/response: a small C client and server (compiled here with clang; sockperf needs
   14-byte messages at least) with TCP_NODELAY: one connection, one message of N bytes
   each way per transaction, for --seconds; transactions per second, p50 and p99 latency
   from every transaction's own clock_gettime. 1 B and 1 KiB.
2. Stream: iperf3, one stream, --seconds; received bits per second.
3. Establishing a connection: a C loop of connect/accept/close for --seconds, with the
   sock_ops program attached and mode on (each pair goes into the sockhash), attached and
   off (the program runs and refuses), and detached (no program): connections per second.

    sudo .venv/bin/python -m bench.sockaccel_pingpong [--seconds S] [--rounds R] [--max-queued BYTES]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.policy.v1 import policy_pb2 as pol_pb
from weir.policy.v1 import policy_pb2_grpc as pol_grpc
from weir.sockaccel.v1 import sockaccel_pb2 as pb
from weir.sockaccel.v1 import sockaccel_pb2_grpc as pb_grpc

from pybpf import AttachType, Program, attach_cgroup, detach_cgroup
from tests.harness import netns
from tests.harness.node import Node

PP_C = r"""
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static int cmp(const void *a, const void *b) { double x = *(double *)a, y = *(double *)b; return x < y ? -1 : x > y; }
static int full(int fd, char *buf, int n) {
    for (int got = 0; got < n;) { int r = read(fd, buf + got, n - got); if (r <= 0) return -1; got += r; }
    return 0;
}
static struct sockaddr_in addr_of(const char *ip, int port) {
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
    inet_pton(AF_INET, ip, &a.sin_addr); return a;
}
int main(int argc, char **argv) {
    int one = 1; static char buf[1 << 16];
    struct sockaddr_in a = addr_of(argv[2], atoi(argv[3]));
    if (!strcmp(argv[1], "server")) {  /* echo every connection, one at a time */
        int ls = socket(AF_INET, SOCK_STREAM, 0);
        setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(ls, (void *)&a, sizeof(a)) || listen(ls, 1024)) { perror("listen"); return 1; }
        printf("ready\n"); fflush(stdout);
        for (;;) {
            int c = accept(ls, 0, 0), r;
            if (c < 0) continue;
            setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            while ((r = read(c, buf, sizeof(buf))) > 0) if (write(c, buf, r) != r) break;
            close(c);
        }
    }
    double seconds = atof(argv[5]);
    if (!strcmp(argv[1], "connect")) {  /* connect, close; the server's accept loop closes its side */
        long n = 0; double start = now();
        while (now() - start < seconds) {
            int s = socket(AF_INET, SOCK_STREAM, 0);
            setsockopt(s, SOL_SOCKET, SO_LINGER, &(struct linger){1, 0}, sizeof(struct linger));
            if (connect(s, (void *)&a, sizeof(a))) { perror("connect"); return 1; }
            close(s); n++;
        }
        printf("{\"connections\": %ld, \"seconds\": %f}\n", n, now() - start);
        return 0;
    }
    int size = atoi(argv[4]), s = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(s, (void *)&a, sizeof(a))) { perror("connect"); return 1; }
    long cap = 20000000, n = 0; double *lat = malloc(cap * sizeof(double)), start = now(), t = start;
    memset(buf, 'x', size);
    while (t - start < seconds && n < cap) {
        if (write(s, buf, size) != size || full(s, buf, size)) { perror("transaction"); return 1; }
        double t2 = now(); lat[n++] = t2 - t; t = t2;
    }
    qsort(lat, n, sizeof(double), cmp);
    printf("{\"transactions\": %ld, \"seconds\": %f, \"p50_us\": %f, \"p99_us\": %f}\n",
           n, t - start, lat[n / 2] * 1e6, lat[(long)(n * 0.99)] * 1e6);
    return 0;
}
"""

PORT, IPERF_PORT, CONNECT_PORT = 7000, 7001, 7002


def in_endpoint(node: Node, ns: str, *argv: str) -> list[str]:
    cgroup = node.cgroup_root / "workloads"
    cgroup.mkdir(exist_ok=True)
    return ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$0" "$@"', *netns.nsenter_argv(ns), *argv]


def start_server(argv: list[str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if "iperf3" not in argv:
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
    else:
        time.sleep(0.5)
    return proc


class Bench:
    def __init__(self, node: Node, binary: Path, client: orch_pb.Endpoint, server: orch_pb.Endpoint) -> None:
        self.node, self.binary, self.client, self.server = node, binary, client, server
        self.accel = pb_grpc.SockAccelStub(node.channel("sockaccel"))

    def mode(self, on: bool) -> None:
        self.accel.SetMode(pb.SetModeRequest(mode=pb.MODE_ON if on else pb.MODE_OFF), timeout=10)

    def counters(self) -> pb.Counters:
        return self.accel.GetStatus(pb.GetStatusRequest(), timeout=10).counters

    def client_run(self, *argv: str, timeout: float = 120) -> dict[str, float]:
        result = subprocess.run(
            in_endpoint(self.node, self.client.netns, *argv), capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr)
        out: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1]) if "{" in result.stdout else {}
        return out

    def pingpong(self, size: int, seconds: float) -> dict[str, float]:
        r = self.client_run(str(self.binary), "client", self.server.ipv4, str(PORT), str(size), str(seconds))
        return {"tps": r["transactions"] / r["seconds"], "p50_us": r["p50_us"], "p99_us": r["p99_us"]}

    def stream(self, seconds: float) -> dict[str, float]:
        server = start_server(in_endpoint(self.node, self.server.netns, "iperf3", "-s", "-1", "-p", str(IPERF_PORT)))
        try:
            result = subprocess.run(
                in_endpoint(self.node, self.client.netns, "iperf3", "-c", self.server.ipv4, "-p", str(IPERF_PORT),
                            "-t", str(seconds), "-J"),
                capture_output=True, text=True, timeout=seconds + 60,
            )  # fmt: skip
        finally:
            server.wait(timeout=30)
        doc = json.loads(result.stdout)
        return {"gbps": doc["end"]["sum_received"]["bits_per_second"] / 1e9}

    def connects(self, seconds: float) -> dict[str, float]:
        r = self.client_run(str(self.binary), "connect", self.server.ipv4, str(CONNECT_PORT), "0", str(seconds))
        return {"cps": r["connections"] / r["seconds"]}


def ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(a) / statistics.median(b)


def run(seconds: float, rounds: int, max_queued: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="sockaccel-bench-"))
    binary = work / "pingpong"
    source = work / "pingpong.c"
    source.write_text(PP_C)
    subprocess.run(["clang", "-O2", "-o", str(binary), str(source)], check=True)
    node = Node(f"sab{abs(hash(work)) % 10000}", work / "node").setup()
    servers: list[subprocess.Popen[str]] = []
    try:
        node.start("orchestrator")
        node.start("policy")
        node.start("sockaccel", *(["--max-queued", max_queued] if max_queued else []))
        client = node.create_endpoint("client", {"app": "client"}, ipv6=False)
        server = node.create_endpoint("server", {"app": "server"}, ipv6=False)
        rules = [
            pol_pb.Rule(name="server-in", endpoint_selector=pol_pb.EndpointSelector(match_labels={"app": "server"}),
                        ingress=[pol_pb.PeerRule(endpoints=[pol_pb.EndpointSelector(match_labels={"app": "client"})])]),
            pol_pb.Rule(name="client-out", endpoint_selector=pol_pb.EndpointSelector(match_labels={"app": "client"}),
                        egress=[pol_pb.PeerRule(endpoints=[pol_pb.EndpointSelector(match_labels={"app": "server"})])]),
        ]  # fmt: skip
        pol_grpc.PolicyStub(node.channel("policy")).ImportRules(pol_pb.ImportRulesRequest(rules=rules), timeout=15)
        b = Bench(node, binary, client, server)
        deadline = time.monotonic() + 15
        while not b.accel.GetStatus(pb.GetStatusRequest(), timeout=5).policy_bound and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # the endpoint stream reaches sockaccel
        for port in (PORT, CONNECT_PORT):
            servers.append(start_server(in_endpoint(node, server.netns, str(binary), "server", server.ipv4, str(port))))
        results: dict[str, dict[bool, list[dict[str, float]]]] = {}

        def measure(name: str, fn: Callable[[], dict[str, float]]) -> None:
            for on in (True, False):
                b.mode(on)
                before = b.counters().messages_redirected
                r = fn()
                r["redirected"] = b.counters().messages_redirected - before
                results.setdefault(name, {True: [], False: []})[on].append(r)

        for _ in range(rounds):
            measure("rr 1 B", lambda: b.pingpong(1, seconds))
            measure("rr 1 KiB", lambda: b.pingpong(1024, seconds))
            measure("stream", lambda: b.stream(seconds))
        report(results)
        connect_cost(b, seconds, rounds)
        print(f"fallbacks: {dict(b.counters().fallbacks)}")
    finally:
        for proc in servers:
            proc.kill()
        node.teardown()


def report(results: dict[str, dict[bool, list[dict[str, float]]]]) -> None:
    for name, by_mode in results.items():
        on, off = by_mode[True], by_mode[False]
        assert all(r["redirected"] > 0 for r in on) and all(r["redirected"] == 0 for r in off), by_mode
        for metric in [k for k in on[0] if k != "redirected"]:
            a, p = [r[metric] for r in on], [r[metric] for r in off]
            print(
                f"{name:9} {metric:7} accelerated {statistics.median(a):12.2f}  plain {statistics.median(p):12.2f}"
                f"  accelerated/plain {ratio(a, p):6.2f}x"
            )


def connect_cost(b: Bench, seconds: float, rounds: int) -> None:
    pin = b.node.bpffs_root / "sockaccel" / "sockaccel_sockops"
    cgroup = b.node.cgroup_root
    rates: dict[str, list[float]] = {"attached, on": [], "attached, off": [], "detached": []}
    with Program.from_pin(pin) as program:
        for _ in range(rounds):
            for label in rates:
                b.mode(label == "attached, on")
                if label == "detached":
                    detach_cgroup(cgroup, program, AttachType.CGROUP_SOCK_OPS)
                try:
                    rates[label].append(b.connects(seconds)["cps"])
                finally:
                    if label == "detached":
                        attach_cgroup(cgroup, program, AttachType.CGROUP_SOCK_OPS)
    base = statistics.median(rates["detached"])
    for label, values in rates.items():
        cps = statistics.median(values)
        print(f"connect   {label:14} {cps:10.0f}/s  {1e6 / cps:7.1f} us each  vs detached {cps / base:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-queued", default="", help="sockaccel's --max-queued (default: its own)")
    args = parser.parse_args()
    run(args.seconds, args.rounds, args.max_queued)


if __name__ == "__main__":
    main()
