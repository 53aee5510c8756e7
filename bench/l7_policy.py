"""L7 policy through the datapath redirect, side by side in one run: `python -m bench.l7_policy`.

A node (orchestrator, policy, l7 with its Envoy) with a client and a server endpoint; the
server runs an Envoy answering 200 itself on port 80 (a Python server would be the
bottleneck). wrk in the client drives, in turn:

- L4 only: the server's ingress rule allows the client on TCP 80, no HTTP rules (no proxy);
- L7 (weir): the same rule with HTTP rules: the policy program redirects the flows to the
  node's Envoy (hairpin + bpf_sk_assign), which enforces them and forwards;
- hand Envoy: an Envoy configured by hand with the same RBAC, run in the client's
  namespace and addressed directly (no redirect), forwarding to the server under the L4
  rule: Envoy's own cost, without ours; and the same with the gRPC access log that ours
  sends to the l7 service (so the redirect's cost is seen apart from the logging's).

Then the time from an L7 rule change (ImportRules called) to the first request it
governs, on one keep-alive connection through the proxy.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from weir.l7.v1 import l7_pb2 as l7pb
from weir.l7.v1 import l7_pb2_grpc as l7_grpc
from weir.policy.v1 import policy_pb2 as pb
from weir.policy.v1 import policy_pb2_grpc as pb_grpc

from bench.l7_proxy import Load, envoy_binary, static_rbac_config, upstream_config
from bench.l7_proxy import _ms as latency_ms
from tests.harness import netns
from tests.harness.node import Node

PORT = 80
HAND_PORT, LOGGED_PORT = 18080, 18081
HTTP_RULES = [
    pb.HttpRule(method="GET", path="/public(/.*)?"),
    pb.HttpRule(headers=[pb.HttpHeaderMatch(name="x-token", value="s3cret")]),
]


def _rule(http: list[pb.HttpRule], extra: list[pb.HttpRule] | None = None) -> pb.Rule:
    port = pb.PortRule(port=PORT, protocol="TCP", http=[*http, *(extra or [])])
    peer = pb.PeerRule(endpoints=[pb.EndpointSelector(match_labels={"app": "client"})], ports=[port])
    return pb.Rule(name="bench", endpoint_selector=pb.EndpointSelector(match_labels={"app": "server"}), ingress=[peer])


def _retarget(config: dict[str, object], listen: str, upstream: str | None = None) -> dict[str, object]:
    """The bench.l7_proxy configs with their loopback addresses replaced (listener, cluster)."""
    text = json.dumps(config)
    listener_addr = '"socket_address": {"address": "127.0.0.1", "port_value": '
    first, _, rest = text.partition(listener_addr)
    if upstream is not None:
        rest = rest.replace(listener_addr, listener_addr.replace("127.0.0.1", upstream))
    return dict(json.loads(first + listener_addr.replace("127.0.0.1", listen) + rest))


@contextlib.contextmanager
def envoy_in(ns: str, config: dict[str, object], workdir: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config))
    argv = [*netns.nsenter_argv(ns), envoy_binary(), "-c", str(path), "--disable-hot-restart",
            "--concurrency", "1", "--log-level", "error"]  # fmt: skip
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


def wrk_in(ns: str, address: str, port: int, seconds: int, connections: int) -> Load:
    """wrk from inside a namespace against http://address:port/public/x (allowed by the rules)."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run ./weir setup (it installs the Debian package)")
    url = f"http://{address}:{port}/public/x"
    argv = [*netns.nsenter_argv(ns), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    rps = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    if rps is None or p50 is None or p99 is None:
        raise SystemExit(f"wrk said:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if bad:
        raise SystemExit(f"wrk got {bad.group(1)} non-2xx answers from {url}")
    return Load(float(rps.group(1)), latency_ms(p50.group(1)), latency_ms(p99.group(1)))


def wait_listeners(stub: l7_grpc.L7Stub, count: int, after: int = -1) -> None:
    deadline = time.monotonic() + 30
    while True:
        state = stub.GetState(l7pb.GetStateRequest(endpoint="server"), timeout=5)
        have = sum(len(ep.listeners) for ep in state.endpoints)
        if have == count and state.acked_version == state.config_version and state.config_version > after:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the l7 service never served {count} listener(s): {state}")
        time.sleep(0.05)


def wait_http(ns: str, address: str, port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if status_once(ns, address, port, "/public") == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing answered 200 at {address}:{port} from {ns}")


def status_once(ns: str, address: str, port: int, path: str) -> int:
    with netns.entered(ns):
        sock = socket.create_connection((address, port), timeout=2)
    conn = http.client.HTTPConnection(address, port)
    conn.sock = sock
    try:
        conn.request("GET", path)
        reply = conn.getresponse()
        reply.read()
        return reply.status
    finally:
        conn.close()


def change_latency(policy: pb_grpc.PolicyStub, ns: str, address: str, rounds: int) -> list[float]:
    """ms from ImportRules (called) to the first request on an open connection that the new rule allows."""
    with netns.entered(ns):
        sock = socket.create_connection((address, PORT), timeout=5)
    conn = http.client.HTTPConnection(address, PORT)
    conn.sock = sock
    conn.auto_open = 0

    def status(path: str) -> int:
        conn.request("GET", path)
        reply = conn.getresponse()
        reply.read()
        return reply.status

    out = []
    try:
        for i in range(rounds):
            path = f"/round{i}"
            if status(path) != 403:
                raise SystemExit(f"round {i}: {path} was allowed before its rule")
            start = time.perf_counter()
            future = policy.ImportRules.future(
                pb.ImportRulesRequest(rules=[_rule(HTTP_RULES, [pb.HttpRule(path=path)])]), timeout=15
            )
            while status(path) != 200:
                if time.perf_counter() - start > 15:
                    raise SystemExit(f"round {i}: the new rule never governed a request")
            out.append((time.perf_counter() - start) * 1000)
            future.result()
    finally:
        conn.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix=f"weir-l7bench-{os.getpid()}-") as tmp:
        workdir = Path(tmp)
        node = Node(f"l7b{os.getpid() % 100000}", workdir / "node")
        try:
            node.setup()
            for service in ("orchestrator", "policy", "l7"):
                node.start(service)
            client = node.create_endpoint("client", {"app": "client"})
            server = node.create_endpoint("server", {"app": "server"})
            policy = pb_grpc.PolicyStub(node.channel("policy"))
            l7 = l7_grpc.L7Stub(grpc.insecure_channel(f"unix://{node.socket('l7')}"))
            up = _retarget(upstream_config(PORT), server.ipv4)
            hand = _retarget(static_rbac_config(HAND_PORT, PORT), "127.0.0.1", server.ipv4)
            als = node.run_dir / "l7" / "xds.sock"  # the l7 service's access log service, as ours logs to
            logged = _retarget(static_rbac_config(LOGGED_PORT, PORT, als), "127.0.0.1", server.ipv4)
            with (
                envoy_in(server.netns, up, workdir, "upstream"),
                envoy_in(client.netns, hand, workdir, "hand"),
                envoy_in(client.netns, logged, workdir, "logged"),
            ):
                results: dict[str, Load] = {}
                policy.ImportRules(pb.ImportRulesRequest(rules=[_rule([])]), timeout=15)
                wait_http(client.netns, server.ipv4, PORT)
                wait_http(client.netns, "127.0.0.1", HAND_PORT)
                results["L4 only (no proxy)"] = wrk_in(client.netns, server.ipv4, PORT, args.seconds, args.connections)
                results["hand Envoy, same RBAC (no redirect)"] = wrk_in(
                    client.netns, "127.0.0.1", HAND_PORT, args.seconds, args.connections
                )
                wait_http(client.netns, "127.0.0.1", LOGGED_PORT)
                results["hand Envoy + the same gRPC access log"] = wrk_in(
                    client.netns, "127.0.0.1", LOGGED_PORT, args.seconds, args.connections
                )
                policy.ImportRules(pb.ImportRulesRequest(rules=[_rule(HTTP_RULES)]), timeout=15)
                wait_listeners(l7, 1)
                wait_http(client.netns, server.ipv4, PORT)
                results["L7 rule (weir redirect + Envoy)"] = wrk_in(
                    client.netns, server.ipv4, PORT, args.seconds, args.connections
                )
                governs = change_latency(policy, client.netns, server.ipv4, args.rounds)
        finally:
            node.teardown()
    base = results["L4 only (no proxy)"].rps
    print(f"wrk -t1 -c{args.connections} -d{args.seconds}s GET /public/x, client endpoint -> server endpoint")
    print(f"{'path':40} {'req/s':>10} {'vs L4':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, load in results.items():
        print(f"{name:40} {load.rps:10.0f} {load.rps / base:8.2f} {load.p50_ms:8.3f} {load.p99_ms:8.3f}")
    weir, hand_rps = results["L7 rule (weir redirect + Envoy)"].rps, results["hand Envoy, same RBAC (no redirect)"].rps
    logged_rps = results["hand Envoy + the same gRPC access log"].rps
    print(f"L7 (weir) / hand Envoy: {weir / hand_rps:.2f}; / hand Envoy with the same access log: "
          f"{weir / logged_rps:.2f}")  # fmt: skip
    print(
        f"L7 rule change -> first request it governs (keep-alive connection, {args.rounds} rounds): "
        f"median {statistics.median(governs):.1f} ms, max {max(governs):.1f} ms"
    )


if __name__ == "__main__":
    main()
