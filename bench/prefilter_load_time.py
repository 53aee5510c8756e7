"""How long loading 1M deny entries takes through the gRPC API, next to `ipset restore`.

Starts the prefilter service as a real process (in a namespace made here, with
capacity for 1M hosts and its own bpffs root, sockets and state) and times,
from the client's side, one ReplaceEntries call carrying 1M /32 hosts (the
request is built before the clock starts; serialising, sending, validating,
persisting and writing the maps are all inside), then a ReplaceEntries with no
entries (emptying the list) and the same 1M hosts again as AddEntries calls of
100k each. Beside it, `ipset restore` of the same list (create line included)
into a hash:net set inside the namespace. Prints seconds and the ratios.
Nothing goes on the wire: the hosts are map keys only. The namespace (and its
ipset), the process, pins and temp files are removed afterwards.

    sudo .venv/bin/python -m bench.prefilter_load_time [--entries N] [--batch N]
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
from google.protobuf.message import Message
from weir.prefilter.v1 import prefilter_pb2 as pb
from weir.prefilter.v1 import prefilter_pb2_grpc as pb_grpc

from bench.netbench import PREFIX, REPO, bpffs, exit_on_sigterm, filler_hosts, namespace, run, temp_dir

IPSET = "weir_bench_load"
START_TIMEOUT = 60.0
CALL_TIMEOUT = 600.0
MAX_MESSAGE = 256 * 1024 * 1024


@contextlib.contextmanager
def service(ns: str, root: Path, work: Path, hosts: int) -> Iterator[pb_grpc.PrefilterStub]:
    """The prefilter process inside `ns`, answering on its unix socket; killed afterwards."""
    argv = [
        "nsenter", f"--net=/run/netns/{ns}", "--",
        sys.executable, "-m", "services.prefilter",
        "--instance", PREFIX,
        "--bpffs-root", str(root),
        "--run-dir", str(work / "run"),
        "--state-dir", str(work / "state"),
        "--host-entries", str(hosts),
        "--log-level", "warning",
    ]  # fmt: skip
    log = work / "prefilter.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    channel = grpc.insecure_channel(
        f"unix://{work / 'run' / 'prefilter.sock'}",
        options=[("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)],
    )
    try:
        stub = pb_grpc.PrefilterStub(channel)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the prefilter exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                stub.ListEntries(pb.ListEntriesRequest(), timeout=1)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the prefilter did not answer in {START_TIMEOUT:g} s") from None
                time.sleep(0.1)
        yield stub
    finally:
        channel.close()
        process.kill()
        process.wait(timeout=15)


def timed(what: str, call: Callable[..., pb.ChangeResponse], request: Message) -> float:
    """Seconds one unary call takes, printed as it finishes."""
    started = time.perf_counter()
    reply = call(request, timeout=CALL_TIMEOUT)
    seconds = time.perf_counter() - started
    print(f"  {what}: {seconds:.2f} s (revision {reply.revision}, changed {reply.changed:,})", flush=True)
    return seconds


def grpc_times(stub: pb_grpc.PrefilterStub, cidrs: list[str], batch: int) -> tuple[float, float]:
    """(one ReplaceEntries of everything, AddEntries in batches after emptying the list)."""
    entries = [pb.Entry(cidr=cidr, mode=pb.MODE_DENY) for cidr in cidrs]
    replace = pb.ReplaceEntriesRequest(entries=entries)
    adds = [pb.AddEntriesRequest(entries=entries[i : i + batch]) for i in range(0, len(entries), batch)]
    print(f"  request: {replace.ByteSize() / 1e6:.1f} MB", flush=True)
    replaced = timed(f"ReplaceEntries, {len(entries):,} entries", stub.ReplaceEntries, replace)
    timed("ReplaceEntries, no entries (empties the list)", stub.ReplaceEntries, pb.ReplaceEntriesRequest())
    added = sum(
        timed(f"AddEntries {n + 1}/{len(adds)}, {len(a.entries):,} entries", stub.AddEntries, a)
        for n, a in enumerate(adds)
    )
    return replaced, added


def ipset_time(ns: str, cidrs: list[str], work: Path) -> float:
    """Seconds `ipset restore` takes to create a hash:net set and add every entry, inside `ns`."""
    restore = work / "deny.ipset"
    restore.write_text(
        f"create {IPSET} hash:net family inet hashsize {1 << 20} maxelem {2 * len(cidrs)}\n"
        + "".join(f"add {IPSET} {cidr}\n" for cidr in cidrs)
    )
    started = time.perf_counter()
    run("ipset", "restore", "-file", str(restore), ns=ns, timeout=CALL_TIMEOUT)
    seconds = time.perf_counter() - started
    listed = run("ipset", "list", IPSET, "-terse", ns=ns).stdout
    count = next(line.split(":")[1].strip() for line in listed.splitlines() if line.startswith("Number of entries"))
    print(f"  ipset restore, {int(count):,} entries: {seconds:.2f} s", flush=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000, help="/32 hosts to load")
    parser.add_argument("--batch", type=int, default=100_000, help="entries per AddEntries call")
    args = parser.parse_args()
    exit_on_sigterm()
    cidrs = filler_hosts(args.entries)
    with namespace("load") as ns, bpffs() as root, temp_dir() as work:
        with service(ns, root, work, args.entries) as stub:
            replaced, added = grpc_times(stub, cidrs, args.batch)
        restored = ipset_time(ns, cidrs, work)
    print(f"\n{f'loading {args.entries:,} /32 hosts':<51}{'seconds':>9}{'/ ipset':>9}")
    for what, seconds in (
        ("prefilter gRPC ReplaceEntries, one call", replaced),
        (f"prefilter gRPC AddEntries, {args.batch:,} per call", added),
        ("ipset restore (hash:net)", restored),
    ):
        print(f"{what:<51}{seconds:>9.2f}{seconds / restored:>9.1f}")


if __name__ == "__main__":
    main()
