"""The socket-layer object: its programs on the node's cgroup and sockhash, and its maps.

The object reads two kinds of foreign state: the node's globals (ipcache, the
events ring buffer; pinned by name) and the policy service's maps (reused from
the policy service's pin directory). Without those pins it still loads, but the
node word says the policy is not bound and nothing is accelerated (fail closed);
`rebind` loads again once they exist.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from pybpf import (
    AttachType,
    BpfError,
    BpfObject,
    KeyNotFoundError,
    Map,
    MapType,
    Program,
    ProgType,
    UpdateFlag,
    attach_cgroup,
    attach_sk_msg,
    detach_cgroup,
    has_map_type,
    has_prog_type,
    query_cgroup,
)
from services.common.objects import pin_programs
from services.common.pins import recover_service_pins
from services.sockaccel.defs import (
    DEFAULT_MAX_QUEUED,
    AddrInfo,
    AddrKey,
    ConfigIndex,
    Conn,
    ConnState,
    NodeFlag,
    SockKey,
    Stat,
)

log = structlog.get_logger("weir.sockaccel.maps")

OWN_MAPS = ["sockaccel_socks", "sockaccel_conns", "sockaccel_addrs", "sockaccel_config", "sockaccel_stats"]
POLICY_MAPS = ["policy_maps", "policy_config"]
SOCK_OPS = "sockaccel_sockops"
SK_MSG = "sockaccel_msg"
FAMILY = {4: 2, 6: 10}


def kernel_support() -> str:
    """Why this kernel cannot run the fast path, or "" when it can."""
    missing = [
        name
        for name, ok in (
            ("sock_ops programs", lambda: has_prog_type(ProgType.SOCK_OPS)),
            ("sk_msg programs", lambda: has_prog_type(ProgType.SK_MSG)),
            ("SOCKHASH maps", lambda: has_map_type(MapType.SOCKHASH)),
        )
        if not _probe(ok)
    ]
    return f"this kernel has no {', '.join(missing)}" if missing else ""


def _probe(check: object) -> bool:
    try:
        return bool(check())  # type: ignore[operator]
    except BpfError:
        return False


def addr_key(address: str) -> AddrKey:
    ip = ipaddress.ip_address(address)
    key = AddrKey()
    key.family = FAMILY[ip.version]
    ctypes.memmove(key.addr, ip.packed, len(ip.packed))
    return key


def _address(family: int, raw: bytes) -> str:
    return str(ipaddress.ip_address(raw[:4] if family == 2 else raw[:16]))


@dataclass(frozen=True)
class Socket:
    """One socket in the fast path's table, as user space reads it."""

    local: str
    local_port: int
    remote: str
    remote_port: int
    conn: Conn


class SockaccelMaps:
    """Owns the sockaccel object, its attachments and its maps."""

    def __init__(
        self,
        bpf_dir: Path,
        globals_dir: Path,
        pin_dir: Path,
        policy_pin_dir: Path,
        cgroup: Path,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        """``max_queued``: unread redirected bytes at which a socket goes to TCP (flow control)."""
        self.max_queued = max_queued
        self._path = bpf_dir / "sockaccel.o"
        self._globals_dir = globals_dir
        self._pin_dir = pin_dir
        self._policy_dir = policy_pin_dir
        self._cgroup = cgroup
        self._obj: BpfObject | None = None
        self.policy_bound = False
        self.policy_ids: tuple[int, ...] | None = None
        self._addrs: Map
        self._conns: Map
        self._config: Map
        self._stats: Map
        self.programs: dict[str, Program] = {}

    @property
    def loaded(self) -> bool:
        return self._obj is not None

    def policy_pins_exist(self) -> bool:
        return all((self._policy_dir / name).exists() for name in POLICY_MAPS)

    def pinned_policy_ids(self) -> tuple[int, ...] | None:
        """Ids of the maps the policy service has pinned now (None while any pin is missing)."""
        ids = []
        for name in POLICY_MAPS:
            try:
                with Map.from_pin(self._policy_dir / name) as pinned:
                    ids.append(pinned.id)
            except (BpfError, OSError):
                return None
        return tuple(ids)

    def policy_stale(self) -> bool:
        """Whether the policy service pins maps other than the ones this object reads (or, unbound, any)."""
        pinned = self.pinned_policy_ids()
        return pinned is not None and pinned != self.policy_ids

    def load(self) -> None:
        """Load (reusing our pins and the policy service's), pin, attach; replaces a loaded object.

        The node word is kept as it was, except POLICY_BOUND, which says whether this load
        reads the policy service's maps.
        """
        self._globals_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._pin_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        recover_service_pins(self._pin_dir, OWN_MAPS)
        obj = BpfObject.open(self._path, pin_root=self._globals_dir)
        try:
            for name in OWN_MAPS:
                if (self._pin_dir / name).exists():
                    obj.reuse_map(name, Map.from_pin(self._pin_dir / name))
            bound = self.policy_pins_exist()
            if bound:
                for name in POLICY_MAPS:
                    pinned = Map.from_pin(self._policy_dir / name)
                    obj.set_map_max_entries(name, pinned.max_entries)
                    obj.reuse_map(name, pinned)
            obj.load()
        except BaseException:
            obj.close()
            raise
        for name in OWN_MAPS:
            if not (self._pin_dir / name).exists():
                obj.maps[name].pin(self._pin_dir / name)
        previous = self._pinned_ids()
        old, self._obj = self._obj, obj
        self.programs = pin_programs(obj, [SOCK_OPS, SK_MSG], self._pin_dir)
        self._addrs = obj.typed_map("sockaccel_addrs", AddrKey, AddrInfo)
        self._conns = obj.typed_map("sockaccel_conns", SockKey, Conn)
        self._config = obj.typed_map("sockaccel_config", ctypes.c_uint32, ctypes.c_uint32)
        self._stats = obj.typed_map("sockaccel_stats", ctypes.c_uint32, ctypes.c_uint64)
        self.policy_bound = bound
        self.policy_ids = tuple(obj.maps[name].id for name in POLICY_MAPS) if bound else None
        word = self._word()
        self._config.update(ConfigIndex.NODE, (word & ~NodeFlag.POLICY_BOUND) | (NodeFlag.POLICY_BOUND if bound else 0))
        self._config.update(ConfigIndex.QUEUE_LIMIT, self.max_queued)
        self._attach(previous)
        if old is not None:
            old.close()

    def _pinned_ids(self) -> set[int]:
        ids = set()
        for name in (SOCK_OPS, SK_MSG):
            with contextlib.suppress(BpfError, OSError), Program.from_pin(self._pin_dir / name) as program:
                ids.add(program.id)
        return ids

    def _attach(self, previous: set[int]) -> None:
        """sock_ops on the cgroup (replacing only our older program), sk_msg on the sockhash.

        Sockets already in the sockhash keep the sk_msg program they were added with.
        """
        self._cgroup.mkdir(parents=True, exist_ok=True)
        kind = AttachType.CGROUP_SOCK_OPS
        program = self.programs[SOCK_OPS]
        stale = [i for i in query_cgroup(self._cgroup, kind) if i in previous and i != program.id]
        if program.id not in query_cgroup(self._cgroup, kind):
            attach_cgroup(self._cgroup, program, kind, multi=True)
        for prog_id in stale:
            with Program.from_id(prog_id) as old:
                detach_cgroup(self._cgroup, old, kind)
        assert self._obj is not None
        attach_sk_msg(self.programs[SK_MSG], self._obj.maps["sockaccel_socks"])

    def detach(self) -> bool:
        """Take sock_ops off the cgroup (for tests: connections in the fast path go on)."""
        if not self._cgroup.exists():
            return False
        return detach_cgroup(self._cgroup, self.programs[SOCK_OPS], AttachType.CGROUP_SOCK_OPS)

    def attached(self) -> bool:
        return self._cgroup.exists() and self.programs[SOCK_OPS].id in query_cgroup(
            self._cgroup, AttachType.CGROUP_SOCK_OPS
        )

    def close(self) -> None:
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    # ---- writing ----

    def _word(self) -> int:
        return int(self._config.lookup(ConfigIndex.NODE) or 0)

    def set_enabled(self, enabled: bool) -> None:
        word = self._word()
        self._config.update(ConfigIndex.NODE, (word | NodeFlag.ENABLED) if enabled else (word & ~NodeFlag.ENABLED))

    def enabled(self) -> bool:
        return bool(self._word() & NodeFlag.ENABLED)

    def replace_addresses(self, wanted: dict[str, AddrInfo]) -> None:
        """Make the address table hold exactly ``wanted`` (address -> info); new before stale."""
        current = {(int(k.family), bytes(k.addr)) for k in self._addrs}
        keys = {a: addr_key(a) for a in wanted}
        if wanted:
            self._addrs.update_batch([keys[a] for a in wanted], list(wanted.values()))
        keep = {(int(k.family), bytes(k.addr)) for k in keys.values()}
        for family, raw in current - keep:
            key = AddrKey()
            key.family = family
            ctypes.memmove(key.addr, raw, 16)
            with contextlib.suppress(KeyNotFoundError):
                self._addrs.delete(key)

    def retire_sockets(self) -> int:
        """Send every socket of the fast path to the normal path for good (reason: policy).

        For when the policy maps are replaced: a socket keeps the sk_msg program it was added
        with, which reads the old maps, so it cannot be trusted to see the new policy. Each
        record turns FALLBACK in one map write; the next message of the socket takes TCP, after
        everything redirected before (the order argument of the BPF object). Returns how many.
        """
        retired = 0
        for key, conn in list(self._conns.items()):
            if conn.state == ConnState.FALLBACK:
                continue
            conn.state, conn.reason = ConnState.FALLBACK, Stat.FALLBACK_POLICY
            with contextlib.suppress(KeyNotFoundError):
                self._conns.update(key, conn, UpdateFlag.EXIST)
                retired += 1
        return retired

    # ---- reading ----

    def stats(self) -> dict[Stat, int]:
        return {s: int(self._stats.lookup_sum(int(s)) or 0) for s in Stat}

    def sockets(self) -> Iterator[Socket]:
        for key, conn in self._conns.items():
            yield Socket(
                _address(key.family, bytes(key.local)),
                int(key.local_port),
                _address(key.family, bytes(key.remote)),
                int(key.remote_port),
                conn,
            )

    def addresses(self) -> Iterable[tuple[str, AddrInfo]]:
        for key, info in self._addrs.items():
            yield _address(key.family, bytes(key.addr)), info
