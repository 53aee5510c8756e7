"""How long loading 1M deny entries takes through the gRPC API, next to `ipset restore`.

Starts the prefilter service as a real process beside an orchestrator (which
places its program; in a namespace made here, with capacity for 1M hosts and
their own bpffs root, sockets, state and cgroup subtree) and times,
from the client's side: one ReplaceEntries carrying 1M /32 hosts in the packed
form (`PackedHosts`, 4 bytes a host), the same list as 1M `Entry` messages, a
ReplaceEntries with no entries (emptying the list) and the same 1M hosts again
as AddEntries calls of 100k each. Requests are built before the clock starts;
serialising, sending, validating, persisting and writing the maps are all
inside. Beside it, `ipset restore` of the same list (create line included) into
a hash:net set inside the namespace. Prints seconds and the ratios.

With --compare DIR (another checkout, e.g. of main, with its protos generated
under DIR/build/python and its BPF objects built), that checkout's service is
started the same way and timed on the Entry-message ReplaceEntries in the same
run: before and after side by side.

Nothing goes on the wire: the hosts are map keys only. The namespace (and its
ipset), the processes, pins and temp files are removed afterwards.

    sudo .venv/bin/python -m bench.prefilter_load_time [--entries N] [--batch N] [--compare DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import Message
from weir.prefilter.v1 import prefilter_pb2 as pb
from weir.prefilter.v1 import prefilter_pb2_grpc as pb_grpc

from bench.netbench import (
    HOST_BASE,
    PREFIX,
    REPO,
    bpffs,
    exit_on_sigterm,
    filler_hosts,
    namespace,
    run,
    temp_dir,
)
from services.common.config import cgroup2_mount

IPSET = "weir_bench_load"
START_TIMEOUT = 60.0
CALL_TIMEOUT = 600.0
MAX_MESSAGE = 256 * 1024 * 1024


def _spawn(ns: str, what: str, root: Path, work: Path, repo: Path, extra: list[str]) -> subprocess.Popen[bytes]:
    """One service process of the checkout `repo`, inside `ns`, logging to work/<what>.log."""
    argv = [
        "nsenter", f"--net=/run/netns/{ns}", "--",
        sys.executable, "-m", f"services.{what}",
        "--instance", PREFIX,
        "--bpffs-root", str(root),
        "--run-dir", str(work / "run"),
        "--state-dir", str(work / "state"),
        "--cgroup-root", str(work_cgroup(work)),
        "--log-level", "warning",
        *extra,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=f"{repo}:{repo / 'build' / 'python'}")
    with open(work / f"{what}.log", "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=repo, env=env)


def work_cgroup(work: Path) -> Path:
    """This run's own cgroup2 subtree (the orchestrator's socket hooks go there), named after `work`."""
    return cgroup2_mount() / work.name


def _remove_cgroup(path: Path) -> None:
    if path.exists():
        for directory in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            directory.rmdir()
        path.rmdir()


@contextlib.contextmanager
def service(ns: str, root: Path, work: Path, hosts: int, repo: Path = REPO) -> Iterator[pb_grpc.PrefilterStub]:
    """The orchestrator and prefilter processes (of the checkout `repo`) inside `ns`; killed afterwards."""
    processes = [_spawn(ns, "orchestrator", root, work, repo, [])]
    channel = grpc.insecure_channel(
        f"unix://{work / 'run' / 'prefilter.sock'}",
        options=[("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)],
    )
    try:
        processes.append(_spawn(ns, "prefilter", root, work, repo,
                                ["--host-entries", str(hosts), "--bpf-dir", str(repo / "bpf" / "build")]))  # fmt: skip
        stub = pb_grpc.PrefilterStub(channel)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            for process, what in zip(processes, ("orchestrator", "prefilter"), strict=True):
                if process.poll() is not None:
                    log = (work / f"{what}.log").read_text()[-3000:]
                    raise RuntimeError(f"the {what} exited with {process.returncode}:\n{log}")
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
        for process in reversed(processes):
            process.kill()
            process.wait(timeout=15)
        _remove_cgroup(work_cgroup(work))


def timed(what: str, call: Callable[..., pb.ChangeResponse], request: Message) -> float:
    """Seconds one unary call takes, printed as it finishes."""
    started = time.perf_counter()
    reply = call(request, timeout=CALL_TIMEOUT)
    seconds = time.perf_counter() - started
    print(f"  {what}: {seconds:.2f} s (revision {reply.revision}, changed {reply.changed:,})", flush=True)
    return seconds


def packed_hosts(count: int) -> bytes:
    """The same hosts as `filler_hosts(count)`, packed 4 bytes each in network order."""
    addresses = array("I", range(HOST_BASE, HOST_BASE + count))
    if sys.byteorder == "little":
        addresses.byteswap()
    return addresses.tobytes()


@dataclass
class Times:
    packed: float = 0.0  # one ReplaceEntries, PackedHosts
    entries: float = 0.0  # one ReplaceEntries, Entry messages
    added: float = 0.0  # AddEntries in batches, after emptying the list
    ipset: float = 0.0
    before: float | None = None  # Entry-message ReplaceEntries of the --compare checkout


def entry_requests(cidrs: list[str]) -> pb.ReplaceEntriesRequest:
    return pb.ReplaceEntriesRequest(entries=[pb.Entry(cidr=cidr, mode=pb.MODE_DENY) for cidr in cidrs])


def grpc_times(stub: pb_grpc.PrefilterStub, cidrs: list[str], batch: int, times: Times) -> None:
    """Packed ReplaceEntries, Entry ReplaceEntries, then AddEntries in batches after emptying the list."""
    packed = pb.ReplaceEntriesRequest(packed=[pb.PackedHosts(ipv4=packed_hosts(len(cidrs)))])
    replace = entry_requests(cidrs)
    adds = [pb.AddEntriesRequest(entries=replace.entries[i : i + batch]) for i in range(0, len(cidrs), batch or 1)]
    adds = adds if batch else []
    print(f"  requests: packed {packed.ByteSize() / 1e6:.1f} MB, entries {replace.ByteSize() / 1e6:.1f} MB", flush=True)
    times.packed = timed(f"ReplaceEntries, {len(cidrs):,} packed hosts", stub.ReplaceEntries, packed)
    timed("ReplaceEntries, no entries (empties the list)", stub.ReplaceEntries, pb.ReplaceEntriesRequest())
    times.entries = timed(f"ReplaceEntries, {len(cidrs):,} Entry messages", stub.ReplaceEntries, replace)
    timed("ReplaceEntries, no entries (empties the list)", stub.ReplaceEntries, pb.ReplaceEntriesRequest())
    times.added = sum(  # batch 0: no AddEntries
        timed(f"AddEntries {n + 1}/{len(adds)}, {len(a.entries):,} entries", stub.AddEntries, a)
        for n, a in enumerate(adds)
    )


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


def measure(entries: int, batch: int, compare: Path | None = None, with_adds: bool = True) -> Times:
    """Every timing of one run: this checkout's service, the --compare one, ipset."""
    cidrs = filler_hosts(entries)
    times = Times()
    with namespace("load") as ns, bpffs() as root, temp_dir() as work:
        with service(ns, root, work, entries) as stub:
            grpc_times(stub, cidrs, batch if with_adds else 0, times)
        if compare is not None:
            with temp_dir() as before_work, service(ns, root / "before", before_work, entries, compare) as stub:
                times.before = timed(f"before ({compare}): ReplaceEntries, Entry messages", stub.ReplaceEntries,
                                     entry_requests(cidrs))  # fmt: skip
        times.ipset = ipset_time(ns, cidrs, work)
    return times


def summary_rows(quick: bool = False) -> list[tuple[str, float, float, float]]:
    """(measure, Weir seconds, ipset seconds, ratio) for bench.all."""
    entries = 100_000 if quick else 1_000_000
    t = measure(entries, 0, with_adds=False)
    label = f"{entries // 1000}k" if entries < 1_000_000 else f"{entries // 1_000_000}M"
    return [
        (f"load {label} /32 deny entries, packed ReplaceEntries (s) / ipset restore", t.packed, t.ipset,
         t.packed / t.ipset),
        (f"load {label} /32 deny entries, Entry ReplaceEntries (s) / ipset restore", t.entries, t.ipset,
         t.entries / t.ipset),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000, help="/32 hosts to load")
    parser.add_argument("--batch", type=int, default=100_000, help="entries per AddEntries call")
    parser.add_argument("--compare", type=Path, help="another checkout (protos generated, bpf built) to time too")
    args = parser.parse_args()
    exit_on_sigterm()
    t = measure(args.entries, args.batch, args.compare)
    print(f"\n{f'loading {args.entries:,} /32 hosts':<58}{'seconds':>9}{'/ ipset':>9}")
    rows = [
        ("prefilter gRPC ReplaceEntries, packed hosts", t.packed),
        ("prefilter gRPC ReplaceEntries, Entry messages", t.entries),
        (f"prefilter gRPC AddEntries, {args.batch:,} per call", t.added),
    ]
    if t.before is not None:
        rows.append(("before: ReplaceEntries, Entry messages (--compare)", t.before))
    rows.append(("ipset restore (hash:net)", t.ipset))
    for what, seconds in rows:
        print(f"{what:<58}{seconds:>9.2f}{seconds / t.ipset:>9.2f}")


if __name__ == "__main__":
    main()
