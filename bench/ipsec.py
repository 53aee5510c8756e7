"""IPsec between two nodes, in the VM (real ESP): encrypted ÷ plain throughput and connection rate, rotation.

`python -m bench.ipsec [--seconds S] [--rounds N]` boots Debian's kernel with virtme-ng
(qemu TCG: absolute figures are an emulator's, the ratios are what count) and runs
`--guest` there. Inside: two nodes of `tests.vm.ipsec_nodes` (orchestrator + ipsec each,
joined by an underlay). Encrypted: node a's endpoint to node b's, both in peered ranges.
Plain: one more endpoint on each node, in ranges routed the same way over the underlay
but never peered. Rounds alternate
between the two, so both see the same load:

1. throughput: iperf3 TCP from node a's endpoint for S seconds;
2. connection rate: TCP connect, one byte each way, close, in a loop for S seconds;
3. rotation: a counted UDP stream while both nodes install key 2 and switch to it; the
   time from the first SetKey to the last packet on the old SPI, and the packets lost.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.orchestrator.v1 import orchestrator_pb2_grpc as orch_grpc

from tests.harness import netns
from tests.harness.capture import Capture
from tests.harness.traffic import CountedStream
from tests.vm.ipsec_nodes import UNDERLAY_IF, make_pair, parallel, peer, set_key, write_key
from tests.vm.vm import run_in_vm, unavailable

PLAIN_IP, PLAIN_CIDR = "198.18.3.10", "198.18.3.0/24"  # a server endpoint on b, in no peered range
CLIENT_IP, CLIENT_CIDR = "198.18.4.10", "198.18.4.0/24"  # a client endpoint on a, in no peered range


def iperf(client_ns: str, server_ns: str, address: str, seconds: float) -> float:
    """Bits per second of one iperf3 TCP stream."""
    server = subprocess.Popen([*netns.nsenter_argv(server_ns), "iperf3", "-s", "-1", "-B", address],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        time.sleep(2.0)
        out = subprocess.run(
            [*netns.nsenter_argv(client_ns), "iperf3", "-c", address, "-t", str(seconds), "-J"],
            capture_output=True, text=True, timeout=seconds + 120, check=True,
        )  # fmt: skip
        return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"])
    finally:
        server.kill()
        server.wait()


def connection_rate(client_ns: str, server_ns: str, address: str, seconds: float) -> float:
    """TCP connections per second (connect, one byte each way, close)."""
    with netns.entered(server_ns):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, 7001))
    listener.listen(512)
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.5)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(1)
                conn.sendall(b"y")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    done = 0
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    while time.monotonic() < deadline:
        with netns.entered(client_ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.settimeout(5)
            sock.connect((address, 7001))
            sock.sendall(b"x")
            sock.recv(1)
        done += 1
    elapsed = time.monotonic() - started
    stop.set()
    thread.join()
    listener.close()
    return done / elapsed


def guest(rwdir: Path, seconds: float, rounds: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="weir-bench-"))
    keys = work / "keys"
    keys.mkdir(mode=0o700)
    a, b = make_pair(work, "wb", grace=5.0)
    out: dict[str, Any] = {"seconds": seconds, "rounds": rounds}
    try:
        with b.node.channel("orchestrator") as channel:
            plain = orch_grpc.OrchestratorStub(channel).CreateEndpoint(
                orch_pb.CreateEndpointRequest(name="plain", ipv4=PLAIN_IP), timeout=120
            )
        with a.node.channel("orchestrator") as channel:
            client = orch_grpc.OrchestratorStub(channel).CreateEndpoint(
                orch_pb.CreateEndpointRequest(name="client", ipv4=CLIENT_IP), timeout=120
            )
        netns.run(a.node.ns, "ip", "route", "add", PLAIN_CIDR, "via", b.underlay, "dev", UNDERLAY_IF)
        netns.run(b.node.ns, "ip", "route", "add", CLIENT_CIDR, "via", a.underlay, "dev", UNDERLAY_IF)
        k1 = write_key(keys / "k1", 1, bytes(range(20)))
        parallel(lambda: set_key(a, k1), lambda: set_key(b, k1))
        parallel(lambda: peer(a, b, 1), lambda: peer(b, a, 1))
        # (client namespace, server namespace, server address): both ends of the plain pair
        # are outside the peered ranges, so neither direction is encrypted
        targets = {
            "encrypted": (a.endpoint_ns, b.endpoint_ns, b.endpoint_ip),
            "plain": (client.netns, plain.netns, PLAIN_IP),
        }
        results: dict[str, dict[str, list[float]]] = {k: {"bps": [], "cps": []} for k in targets}
        for _ in range(rounds):
            for name, (client_ns, ns, address) in targets.items():
                results[name]["bps"].append(iperf(client_ns, ns, address, seconds))
                results[name]["cps"].append(connection_rate(client_ns, ns, address, seconds))
        out["runs"] = results
        k2 = write_key(keys / "k2", 2, bytes(range(100, 120)))
        with Capture(a.node.ns, UNDERLAY_IF) as cap:
            stream = CountedStream(a.endpoint_ns, b.endpoint_ns, b.endpoint_ip, 9100, rate=200).start()
            time.sleep(1.0)
            t0 = time.monotonic()
            parallel(lambda: set_key(a, k2), lambda: set_key(b, k2))
            parallel(lambda: peer(a, b, 2), lambda: peer(b, a, 2))
            time.sleep(2.0)
            result = stream.finish()
        esp = cap.esp(src=a.underlay)
        last_old = max((t for t, spi in esp if spi == 1), default=t0)
        out["rotation"] = {"seconds": last_old - t0, "sent": result.sent, "lost": len(result.missing)}
    finally:
        (rwdir / "bench.json").write_text(json.dumps(out))
        a.node.teardown()
        b.node.teardown()


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.guest:
        guest(args.guest, args.seconds, args.rounds)
        return
    reason = unavailable()
    if reason:
        sys.exit(f"cannot boot the VM: {reason}")
    rwdir = Path(tempfile.mkdtemp(prefix="weir-ipsec-bench-"))
    body = f"exec {sys.executable} -u -m bench.ipsec --guest {rwdir} --seconds {args.seconds} --rounds {args.rounds}"
    started = time.monotonic()
    run = run_in_vm(body, rwdir, timeout=1800)
    path = rwdir / "bench.json"
    if not path.exists() or "runs" not in json.loads(path.read_text()):
        log = (rwdir / "guest.log").read_text(errors="replace")[-4000:] if (rwdir / "guest.log").exists() else ""
        sys.exit(f"the guest gave no figures (vng exit {run.returncode}):\n{run.stderr[-2000:]}\n{log}")
    data = json.loads(path.read_text())
    shutil.rmtree(rwdir, ignore_errors=True)
    enc, plain = data["runs"]["encrypted"], data["runs"]["plain"]
    print(f"VM (qemu TCG, 2 vCPUs), {args.rounds} alternating rounds of {args.seconds:g} s, medians; "
          f"wall {time.monotonic() - started:.0f} s")  # fmt: skip
    for label, key, unit, scale in (("throughput", "bps", "Mbit/s", 1e6), ("connections", "cps", "conn/s", 1.0)):
        e, p = _median(enc[key]), _median(plain[key])
        print(f"  {label:12s} encrypted {e / scale:10.1f} {unit}   plain {p / scale:10.1f} {unit}   "
              f"encrypted/plain {e / p:.2f}")  # fmt: skip
    rot = data["rotation"]
    print(f"  rotation     {rot['seconds']:.2f} s from the first SetKey to the last packet on the old key; "
          f"{rot['lost']} of {rot['sent']} packets lost")  # fmt: skip


if __name__ == "__main__":
    main()
