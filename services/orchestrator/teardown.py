"""Remove everything one node (instance) made: `./weir teardown [--instance NAME] [--purge-state]`.

Run it in the node's network namespace after its services stopped (it refuses, naming the
process, while any of them runs). It removes only what carries this instance's marks:

- interfaces whose ifalias is this instance's tag (endpoint veths) and the endpoint
  namespaces at their other end (or recorded in the orchestrator's store and left empty);
- tc and XDP programs on the node's interfaces whose ids are programs pinned under this
  instance's bpffs root, and cgroup programs of those ids in the instance's cgroup subtree;
- the cgroup directory, if this instance made it and it is empty;
- the bpffs root, the run directory and, with ``--purge-state``, the state directory;
- the forwarding sysctls, put back to the values recorded before the first change.

Programs, links and namespaces of other instances or of the user are never touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute

from pybpf import (
    BpfError,
    Program,
    TcDirection,
    XdpMode,
    detach_cgroup,
    detach_tc,
    detach_xdp,
    query_cgroup,
    query_tc,
    query_xdp,
)
from services.common import netns, sysctls
from services.common.bpffs import is_bpffs, remove_pins
from services.common.cgroup import ATTACH_TYPES, remove_cgroup_if_ours
from services.common.config import NodeConfig
from services.common.errors import FailedPrecondition
from services.common.instance_lock import holder, lock_path, release, try_lock
from services.l7.envoy import end_left_running
from services.orchestrator import netdev, routing
from services.orchestrator.suite import SERVICES
from services.policy import redirect

ROLE = "teardown"
# Every role that takes the instance's lock: while one runs, teardown refuses.
ROLES = ("suite", *SERVICES)
TC_HANDLE = TC_PRIORITY = 1  # where the orchestrator attaches its entry programs


@dataclass
class Report:
    """What teardown removed, for the operator and for tests."""

    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)

    def note(self, what: str) -> None:
        self.removed.append(what)


def pinned_program_ids(root: Path) -> set[int]:
    """Ids of every program pinned under the instance's bpffs root: what it attached."""
    ids: set[int] = set()
    if not root.is_dir() or not is_bpffs(root):
        return ids
    for path in root.rglob("*"):
        if path.is_dir():
            continue
        with contextlib.suppress(BpfError, OSError), Program.from_pin(path) as program:
            ids.add(program.id)
    return ids


def _links() -> list[tuple[int, str]]:
    with IPRoute() as ipr:
        return [(int(link["index"]), str(link.get_attr("IFLA_IFNAME"))) for link in ipr.get_links()]


def _detach_interface_programs(own: set[int], report: Report) -> None:
    """tc (the orchestrator's handle and priority) and XDP programs that are ours."""
    for ifindex, ifname in _links():
        for direction in (TcDirection.INGRESS, TcDirection.EGRESS):
            with contextlib.suppress(BpfError, OSError):
                if query_tc(ifindex, direction, TC_HANDLE, TC_PRIORITY) in own:
                    detach_tc(ifindex, direction, TC_HANDLE, TC_PRIORITY)
                    report.note(f"tc {direction.name.lower()} program on {ifname}")
        try:
            status = query_xdp(ifindex)
        except (BpfError, OSError):
            continue
        for mode in (XdpMode.NATIVE, XdpMode.GENERIC):
            if status.get(mode) in own:
                detach_xdp(ifindex, mode)
                report.note(f"xdp {mode.name.lower()} program on {ifname}")


def _recorded_namespaces(config: NodeConfig) -> set[str]:
    """Endpoint namespaces the orchestrator's store remembers (read-only; absent is fine)."""
    db = config.state_db("orchestrator")
    if not db.exists():
        return set()
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            rows = conn.execute("SELECT doc FROM docs WHERE kind = 'endpoint'").fetchall()
    except sqlite3.Error:
        return set()
    names = set()
    for (doc,) in rows:
        with contextlib.suppress(ValueError, AttributeError):
            names.add(str(json.loads(doc).get("netns") or ""))
    return names - {""}


def _own_namespaces(config: NodeConfig, peers: dict[int, int]) -> list[str]:
    """This instance's endpoint namespaces: the far end of one of our veths, or recorded and empty."""
    recorded = _recorded_namespaces(config)
    own = []
    for name, peered in netdev.peered_namespaces(netdev.netns_name(config.instance, ""), peers).items():
        if peered:
            own.append(name)
            continue
        with contextlib.suppress(OSError):
            if name in recorded and not netdev.namespace_links(name):
                own.append(name)
    return own


def _remove_endpoints(config: NodeConfig, report: Report) -> None:
    prefix = netdev.alias(config.instance, "")
    peers = netdev.tagged_peers(prefix)
    namespaces = _own_namespaces(config, peers)
    for ifindex in peers:
        with contextlib.suppress(OSError):
            netdev.delete_link(ifindex)
            report.note(f"link {ifindex}")
    for name in namespaces:
        netns.remove(name)
        report.note(f"netns {name}")
    for name in netns.names(netdev.netns_name(config.instance, "")):
        if name not in namespaces:
            report.kept.append(f"netns {name} (not tagged by this instance)")


def _remove_node_routing(config: NodeConfig, report: Report) -> None:
    """The VXLAN device and the routes to remote nodes (their route protocol and the instance's
    metric mark them; another instance's in the same namespace stay)."""
    device = routing.remove_overlay_device(config.instance)
    if device:
        report.note(f"link {device} (the VXLAN overlay)")
    for dst in routing.remove_own_routes(config.instance):
        report.note(f"route {dst} (to a remote node)")


def _cgroup_dirs(root: Path) -> Iterator[Path]:
    if root.is_dir():
        yield root
        yield from (p for p in root.rglob("*") if p.is_dir())


def _detach_cgroup_programs(config: NodeConfig, own: set[int], report: Report) -> None:
    for directory in _cgroup_dirs(config.cgroup_root):
        for attach_type in ATTACH_TYPES:
            try:
                attached = query_cgroup(directory, attach_type)
            except (BpfError, OSError):
                continue
            for prog_id in attached:
                if prog_id not in own:
                    continue
                with contextlib.suppress(BpfError), Program.from_id(prog_id) as program:
                    detach_cgroup(directory, program, attach_type)
                    report.note(f"cgroup {attach_type.name.lower()} program on {directory}")
    if remove_cgroup_if_ours(config):
        report.note(f"cgroup {config.cgroup_root}")
    elif config.cgroup_root.exists():
        report.kept.append(f"cgroup {config.cgroup_root} (not made by this instance, or not empty)")


@contextlib.contextmanager
def _instance_stopped(config: NodeConfig) -> Iterator[None]:
    """Hold every lock of the instance while tearing down; refuse if a service still runs."""
    taken = []
    try:
        for role in (ROLE, *ROLES):
            if try_lock(config, role) is None:
                raise FailedPrecondition(
                    f"instance {config.instance!r} is running: {lock_path(config, role)} is held by "
                    f"{holder(lock_path(config, role))}; stop it before teardown"
                )
            taken.append(role)
        yield
    finally:
        for role in taken:
            release(config, role)


def teardown(config: NodeConfig, purge_state: bool = False) -> Report:
    """Remove what the instance made (see the module doc); safe to repeat."""
    report = Report()
    if not config.run_dir.exists() and not config.bpffs_root.exists() and not config.state_dir.exists():
        return report
    with _instance_stopped(config):
        own = pinned_program_ids(config.bpffs_root)
        _detach_interface_programs(own, report)
        _remove_endpoints(config, report)
        _remove_node_routing(config, report)
        _detach_cgroup_programs(config, own, report)
        if config.bpffs_root.exists():
            remove_pins(config.bpffs_root)
            report.note(f"pins {config.bpffs_root}")
        for path, value in sysctls.restore(config).items():
            report.note(f"sysctl {path} back to {value}")
        if purge_state and config.state_dir.exists():
            shutil.rmtree(config.state_dir)
            report.note(f"state {config.state_dir}")
    hairpin = redirect.remove_hairpin(config.instance)
    if hairpin:
        report.note(f"link {hairpin} (the L7 hairpin)")
    envoy = end_left_running(config.run_dir / "l7")
    if envoy:
        report.note(f"envoy pid {envoy}")
    if config.run_dir.exists():
        shutil.rmtree(config.run_dir)
        report.note(f"run dir {config.run_dir}")
    return report


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--purge-state",
        action="store_true",
        help="also delete the state directory (desired state: endpoints, rules, services)",
    )


def main(argv: list[str]) -> int:
    config, args = NodeConfig.from_args(argv, ROLE, _flags)
    try:
        report = teardown(config, purge_state=args.purge_state)
    except FailedPrecondition as exc:
        print(f"weir-{ROLE}: {exc}", file=sys.stderr)
        return 1
    for what in report.removed:
        print(f"removed {what}")
    for what in report.kept:
        print(f"kept {what}")
    if not report.removed:
        print(f"nothing of instance {config.instance!r} was left")
    return 0


if __name__ == "__main__":
    os.umask(0o077)
    sys.exit(main(sys.argv[1:]))
