"""L7 policy cost, side by side in one run: `python -m bench.l7_proxy [--seconds 5 --connections 16]`.

The upstream is an Envoy answering 200 itself (a Python server would be the bottleneck).
wrk drives, over loopback, in turn:

- direct: straight to the upstream (what an L4-only policy costs: nothing in user space);
- weir: through the Envoy the l7 service runs and configures over xDS, with our rules;
- static: through an Envoy configured by hand (static listener, the same RBAC policies),
  without and with the gRPC access log ours sends (to the l7 service, as ours does).

Then it measures how long a rule change takes to govern requests: from the start of
SetListeners to the first request that gets the new answer, polling on one keep-alive
connection. Everything runs on 127.0.0.1 with ports the kernel hands out, and stops.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from weir.common.v1 import common_pb2
from weir.l7.v1 import l7_pb2 as pb
from weir.l7.v1 import l7_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
RULES = [
    pb.HttpRule(name="public", method="GET", path="/public(/.*)?"),
    pb.HttpRule(name="token", headers=[pb.HeaderMatch(name="x-token", exact="s3cret")]),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def envoy_binary() -> str:
    found = shutil.which("envoy", path=f"{os.environ.get('PATH', '')}:{Path(sys.executable).parent}")
    if found is None:
        raise SystemExit("no envoy binary: run ./weir setup")
    return found


def _hcm(
    route: dict[str, object], filters: list[dict[str, object]], access_log: list[dict[str, object]] | None = None
) -> dict[str, object]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager",
            "stat_prefix": "bench",
            "access_log": access_log or [],
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]},
            "http_filters": [
                *filters,
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                },
            ],
        },
    }


def _listener(port: int, hcm: dict[str, object]) -> dict[str, object]:
    return {
        "name": f"l{port}",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [hcm]}],
    }


def upstream_config(port: int) -> dict[str, object]:
    """An Envoy that answers every request 200 "ok" itself."""
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
    return {"static_resources": {"listeners": [_listener(port, _hcm(route, []))]}}


def static_rbac_config(port: int, upstream: int, als_socket: Path | None = None) -> dict[str, object]:
    """The hand-written equivalent of our rules: RBAC in the listener, one cluster.

    With ``als_socket``, it also sends its access log over gRPC there, as ours does.
    """

    def regex(header: str, value: str) -> dict[str, object]:
        return {"header": {"name": header, "string_match": {"safe_regex": {"regex": value}}}}

    rbac: dict[str, object] = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {
                "action": "ALLOW",
                "policies": {
                    "public": {
                        "permissions": [
                            {"and_rules": {"rules": [regex(":method", "GET"), regex(":path", "/public(/.*)?")]}}
                        ],
                        "principals": [{"any": True}],
                    },
                    "token": {
                        "permissions": [{"header": {"name": "x-token", "string_match": {"exact": "s3cret"}}}],
                        "principals": [{"any": True}],
                    },
                },
            },
        },
    }
    route: dict[str, object] = {"match": {"prefix": "/"}, "route": {"cluster": "up"}}
    cluster: dict[str, object] = {
        "name": "up",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "up",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}
                    ]
                }
            ],
        },
    }
    clusters: list[dict[str, object]] = [cluster]
    access_log: list[dict[str, object]] = []
    if als_socket is not None:
        clusters.append(
            {
                "name": "als",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {}},
                    }
                },
                "load_assignment": {
                    "cluster_name": "als",
                    "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(als_socket)}}}}]}],
                },
            }
        )
        access_log.append(
            {
                "name": "envoy.access_loggers.http_grpc",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                    "common_config": {
                        "log_name": "bench",
                        "grpc_service": {"envoy_grpc": {"cluster_name": "als"}},
                        "transport_api_version": "V3",
                        "buffer_flush_interval": "0.05s",
                    },
                },
            }
        )
    listener = _listener(port, _hcm(route, [rbac], access_log))
    return {"static_resources": {"listeners": [listener], "clusters": clusters}}


@contextlib.contextmanager
def envoy(config: dict[str, object], workdir: Path, name: str) -> Iterator[subprocess.Popen[bytes]]:
    path = workdir / f"{name}.json"
    path.write_text(json.dumps(config))
    argv = [envoy_binary(), "-c", str(path), "--disable-hot-restart", "--concurrency", "1", "--log-level", "error"]
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def l7_service(workdir: Path) -> Iterator[pb_grpc.L7Stub]:
    argv = [
        sys.executable, "-m", "services.l7", "--instance", f"l7b{os.getpid()}",
        "--run-dir", str(workdir / "run"), "--state-dir", str(workdir / "state"),
        "--bpffs-root", str(workdir / "bpffs"), "--cgroup-root", str(workdir / "cgroup"), "--log-level", "warning",
    ]  # fmt: skip
    with open(workdir / "l7.log", "ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        sock = workdir / "run" / "l7.sock"
        deadline = time.monotonic() + 30
        while not sock.exists():
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"the l7 service did not start; see {workdir / 'l7.log'}")
            time.sleep(0.1)
        yield pb_grpc.L7Stub(grpc.insecure_channel(f"unix://{sock}"))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)


def wait_http(port: int, path: str = "/public", timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                conn.close()
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing answered 200 on port {port}")


@dataclass(frozen=True)
class Load:
    rps: float
    p50_ms: float
    p99_ms: float


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(f"wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(port: int, seconds: int, connections: int, path: str = "/public/x") -> Load:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run ./weir setup (it installs the Debian package)")
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=seconds + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if non2xx:
        raise SystemExit(f"wrk got {non2xx.group(1)} non-2xx answers on port {port}")
    return Load(rps, p50, p99)


def set_rules(
    stub: pb_grpc.L7Stub, proxy_port: int, upstream: int, rules: list[pb.HttpRule]
) -> pb.SetListenersResponse:
    listener = pb.Listener(
        direction=common_pb2.DIRECTION_INGRESS, port=80, proxy_port=proxy_port,
        upstream=f"127.0.0.1:{upstream}", rules=rules,
    )  # fmt: skip
    return stub.SetListeners(
        pb.SetListenersRequest(endpoint="bench", listeners=[listener], wait_applied=True), timeout=10
    )


def change_latency(
    stub: pb_grpc.L7Stub, proxy_port: int, upstream: int, rounds: int
) -> tuple[list[float], list[float]]:
    """(ms from SetListeners to the first request it governs, ms the acknowledged call took)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=5)

    def status(path: str) -> int:
        conn.request("GET", path)
        reply = conn.getresponse()
        reply.read()
        return reply.status

    governs, acked = [], []
    for i in range(rounds):
        path = f"/round{i}"
        assert status(path) == 403
        rules = [*RULES, pb.HttpRule(name=f"round{i}", path=path)]
        listener = pb.Listener(
            direction=common_pb2.DIRECTION_INGRESS, port=80, proxy_port=proxy_port,
            upstream=f"127.0.0.1:{upstream}", rules=rules,
        )  # fmt: skip
        start = time.perf_counter()
        future = stub.SetListeners.future(
            pb.SetListenersRequest(endpoint="bench", listeners=[listener], wait_applied=True), timeout=10
        )
        while status(path) != 200:
            if time.perf_counter() - start > 10:
                raise SystemExit(f"round {i}: the new rule never governed a request")
        governs.append((time.perf_counter() - start) * 1000)
        reply = future.result()
        acked.append((time.perf_counter() - start) * 1000)
        assert reply.applied, reply
    conn.close()
    return governs, acked


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix=f"weir-bench-{os.getpid()}-") as tmp:
        workdir = Path(tmp)
        up, static, logged, proxy = free_port(), free_port(), free_port(), free_port()
        als = workdir / "run" / "l7" / "xds.sock"  # the l7 service's access log service
        with (
            envoy(upstream_config(up), workdir, "upstream"),
            envoy(static_rbac_config(static, up), workdir, "static"),
            l7_service(workdir) as stub,
            envoy(static_rbac_config(logged, up, als), workdir, "static-als"),
        ):
            wait_http(up)
            wait_http(static)
            wait_http(logged)
            deadline = time.monotonic() + 30
            while not set_rules(stub, proxy, up, RULES).applied:
                if time.monotonic() > deadline:
                    raise SystemExit("Envoy never acknowledged the rules")
            wait_http(proxy)
            results = {
                "direct (L4 only)": wrk(up, args.seconds, args.connections),
                "weir (xDS, per-route RBAC)": wrk(proxy, args.seconds, args.connections),
                "static Envoy (hand-written RBAC)": wrk(static, args.seconds, args.connections),
                "static Envoy + gRPC access log": wrk(logged, args.seconds, args.connections),
            }
            governs, acked = change_latency(stub, proxy, up, args.rounds)
        base = results["direct (L4 only)"].rps
        print(f"wrk -t1 -c{args.connections} -d{args.seconds}s, GET /public/x (allowed by rule 'public'), loopback")
        print(f"{'path':36} {'req/s':>10} {'vs direct':>10} {'p50 ms':>8} {'p99 ms':>8}")
        for name, load in results.items():
            print(f"{name:36} {load.rps:10.0f} {load.rps / base:10.2f} {load.p50_ms:8.3f} {load.p99_ms:8.3f}")
        weir_rps, static_rps = (
            results["weir (xDS, per-route RBAC)"].rps,
            results["static Envoy (hand-written RBAC)"].rps,
        )
        logged_rps = results["static Envoy + gRPC access log"].rps
        print(f"weir / static Envoy: {weir_rps / static_rps:.2f}; weir / static with the same access log: "
              f"{weir_rps / logged_rps:.2f}")  # fmt: skip
        print(
            f"rule change -> first governed request over {args.rounds} rounds: "
            f"median {statistics.median(governs):.1f} ms, max {max(governs):.1f} ms; "
            f"SetListeners with wait_applied returned after median {statistics.median(acked):.1f} ms"
        )


if __name__ == "__main__":
    main()
