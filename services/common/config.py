"""Where one node (instance) of the suite keeps its things, from flags or WEIR_* env vars.

Every path is derived from the instance name unless set, so two nodes can run side by side
on one machine just by giving them different ``--instance`` values.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.common.logs import LEVELS

TLS_REQUIRED = "a TCP listener requires --tls-cert and --tls-key"

# flag -> env var; the env var supplies the flag's default.
ENV = {
    "instance": "WEIR_INSTANCE",
    "bpffs_root": "WEIR_BPFFS_ROOT",
    "run_dir": "WEIR_RUN_DIR",
    "state_dir": "WEIR_STATE_DIR",
    "cgroup_root": "WEIR_CGROUP_ROOT",
    "tcp_listen": "WEIR_TCP_LISTEN",
    "tls_cert": "WEIR_TLS_CERT",
    "tls_key": "WEIR_TLS_KEY",
    "tls_client_ca": "WEIR_TLS_CLIENT_CA",
    "log_level": "WEIR_LOG_LEVEL",
}


CGROUP2_CANDIDATES = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))


def cgroup2_mount(mounts: Path = Path("/proc/self/mounts")) -> Path:
    """Where the cgroup2 hierarchy is mounted (unified or hybrid layout).

    Read from the mount table; falls back to the hybrid layout's place when nothing says.
    """
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        lines = []
    rows = (line.split() for line in lines)
    found = {Path(fields[1]) for fields in rows if len(fields) > 2 and fields[2] == "cgroup2"}
    for candidate in CGROUP2_CANDIDATES:
        if candidate in found:
            return candidate
    return min(found, default=CGROUP2_CANDIDATES[1], key=lambda p: len(p.parts))


def _path(value: Path | str | None) -> Path | None:
    return None if value is None or value == "" else Path(value)


def _check_hostport(value: str) -> None:
    """Reject a TCP listen address that is not ``host:port`` (IPv6 as ``[addr]:port``)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--tcp-listen must be host:port, got {value!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"--tcp-listen: write an IPv6 address as [addr]:port, got {value!r}")


@dataclass(frozen=True, init=False)
class NodeConfig:
    """The paths and listeners of one node; unset paths derive from ``instance``."""

    instance: str
    bpffs_root: Path
    run_dir: Path
    state_dir: Path
    cgroup_root: Path
    tcp_listen: str | None
    tls_cert: Path | None
    tls_key: Path | None
    tls_client_ca: Path | None
    log_level: str
    adopt_datapath: bool
    reset_state: bool

    def __init__(
        self,
        instance: str = "weir",
        bpffs_root: Path | str | None = None,
        run_dir: Path | str | None = None,
        state_dir: Path | str | None = None,
        cgroup_root: Path | str | None = None,
        tcp_listen: str | None = None,
        tls_cert: Path | str | None = None,
        tls_key: Path | str | None = None,
        tls_client_ca: Path | str | None = None,
        log_level: str = "info",
        adopt_datapath: bool = False,
        reset_state: bool = False,
    ) -> None:
        """Fill derived defaults and validate; raises ValueError on an unusable combination."""
        if not instance or "/" in instance or instance in (".", ".."):
            raise ValueError(f"instance must be a plain name, got {instance!r}")
        if log_level.lower() not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {log_level!r}")
        tcp = tcp_listen or None
        if tcp is not None:
            _check_hostport(tcp)
            if not tls_cert or not tls_key:
                raise ValueError(TLS_REQUIRED)
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if adopt_datapath and reset_state:
            raise ValueError("--adopt-datapath and --reset exclude each other")
        values = {
            "instance": instance,
            "bpffs_root": _path(bpffs_root) or Path("/sys/fs/bpf") / instance,
            "run_dir": _path(run_dir) or Path("/run") / instance,
            "state_dir": _path(state_dir) or Path("/var/lib") / instance,
            "cgroup_root": _path(cgroup_root) or cgroup2_mount() / instance,
            "tcp_listen": tcp,
            "tls_cert": _path(tls_cert),
            "tls_key": _path(tls_key),
            "tls_client_ca": _path(tls_client_ca),
            "log_level": log_level.lower(),
            "adopt_datapath": adopt_datapath,
            "reset_state": reset_state,
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def socket_path(self, service: str) -> Path:
        """The unix socket a service listens on."""
        return self.run_dir / f"{service}.sock"

    def service_pin_dir(self, service: str) -> Path:
        """bpffs directory for the programs and maps one service owns."""
        return self.bpffs_root / service

    @property
    def globals_pin_dir(self) -> Path:
        """bpffs directory for maps shared across objects (call maps, conntrack, ipcache...)."""
        return self.bpffs_root / "globals"

    def state_db(self, service: str) -> Path:
        """The SQLite file holding a service's desired state."""
        return self.state_dir / f"{service}.db"

    @classmethod
    def from_args(
        cls,
        argv: list[str] | None,
        service: str,
        extra: Callable[[argparse.ArgumentParser], None] | None = None,
    ) -> tuple[NodeConfig, argparse.Namespace]:
        """Parse the common flags (plus a service's own, added by ``extra``).

        Flags override WEIR_* env vars, which override the instance-derived defaults. On bad
        input this exits with status 2 and a usage message, as argparse does.
        """
        parser = argparse.ArgumentParser(prog=f"weir-{service}", description=f"Weir {service} service")
        env = os.environ.get
        node = parser.add_argument_group("node")
        node.add_argument(
            "--instance",
            default=env(ENV["instance"], "weir"),
            help="node name; derives the default paths (env WEIR_INSTANCE)",
        )
        for flag, what in (
            ("bpffs_root", "bpffs directory of this node (default /sys/fs/bpf/<instance>)"),
            ("run_dir", "directory of the unix sockets (default /run/<instance>)"),
            ("state_dir", "directory of the state databases (default /var/lib/<instance>)"),
            ("cgroup_root", "cgroup2 subtree of this node's socket hooks (default <cgroup2 mount>/<instance>)"),
            ("tls_cert", "PEM server certificate for --tcp-listen"),
            ("tls_key", "PEM private key for --tcp-listen"),
            ("tls_client_ca", "PEM CA bundle; when set, TCP clients must present a certificate"),
        ):
            node.add_argument(
                "--" + flag.replace("_", "-"), type=Path, default=env(ENV[flag]), help=f"{what} (env {ENV[flag]})"
            )
        node.add_argument(
            "--tcp-listen",
            metavar="HOST:PORT",
            default=env(ENV["tcp_listen"]),
            help="also listen on TCP, with TLS (env WEIR_TCP_LISTEN)",
        )
        node.add_argument(
            "--log-level",
            choices=LEVELS,
            type=str.lower,
            default=env(ENV["log_level"], "info"),
            help="log level (env WEIR_LOG_LEVEL)",
        )
        lost = node.add_mutually_exclusive_group()
        lost.add_argument(
            "--adopt-datapath",
            action="store_true",
            help="the state database is missing, unreadable or from another version while this service's "
            "pins exist: rebuild the state from the pinned maps where the service can (see DESIGN.md)",
        )
        lost.add_argument(
            "--reset",
            dest="reset_state",
            action="store_true",
            help="the state database is missing, unreadable or from another version while this service's "
            "pins exist: start empty and make the datapath match (removes what it holds)",
        )
        if extra is not None:
            extra(parser)
        args = parser.parse_args(argv)
        try:
            config = cls(
                **{name: getattr(args, name) for name in ENV},
                adopt_datapath=args.adopt_datapath,
                reset_state=args.reset_state,
            )
        except ValueError as exc:
            parser.error(str(exc))
        return config, args
