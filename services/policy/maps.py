"""The policy object's maps: per-endpoint policy maps and config; conntrack for listing.

`PolicyMaps` turns computed policy into map contents. An endpoint's policy
map is rebuilt whole and swapped into `policy_maps` with one update, so a
packet sees the old policy or the new one, never a mix; `save` keeps the map an
endpoint has now, so a failed change can swap it back with `restore`. A rebuilt map
starts with the hit counters of the map it replaces, key by key, so a restart or an
unrelated change never zeroes them. The
policy maps and enforcement flags are this service's own (pinned under
policy/); the ipcache and conntrack are the node's (the orchestrator writes the
ipcache and collects conntrack), read here. Every change of an endpoint's map or
flags ends with a new policy revision for it (policy_revisions): the datapath's
verdicts cached in conntrack under the old one are then looked up again.
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pybpf import BpfObject, KeyNotFoundError, Map, MapFullError, MapType, Program
from pybpf.batch import update_packed
from services.common.chain_client import Placement, Register
from services.common.datapath import CtKey, CtValue, Hook, RuleName, Slot
from services.common.objects import load_service_object, pin_programs
from services.policy.compute import MapEntry
from services.policy.defs import REVISION_KEY, ConfigFlag, EndpointPolicyConfig, PolicyEntry, PolicyFlag, PolicyKey

OWN_MAPS = ("policy_maps", "policy_config", "policy_revisions", "l7_hairpin")
RULE_NAMES = "policy_rule_names"  # the node's (globals): the orchestrator names flows' rules from it
PROGRAMS = {"policy_egress": Hook.FROM_CONTAINER, "policy_ingress": Hook.TO_CONTAINER}
HAIRPIN_PROGRAM = "l7_hairpin_ingress"  # attached by the service itself to its hairpin device (redirect.py)
BPF_F_NO_PREALLOC = 1


# PolicyKey and PolicyEntry as bytes, packed without a ctypes object per entry (a bulk
# import writes tens of thousands): prefixlen and dir in host order, identity, proto and port
# in network order; the entry all in host order.
_KEY_HEAD, _KEY_TAIL = struct.Struct("=IB"), struct.Struct(">IBH")
_ENTRY = struct.Struct("=BBHIQQ")
assert _KEY_HEAD.size + _KEY_TAIL.size == ctypes.sizeof(PolicyKey) and _ENTRY.size == ctypes.sizeof(PolicyEntry)


def policy_key_bytes(entry: MapEntry) -> bytes:
    """The entry's PolicyKey as the map stores it."""
    head = _KEY_HEAD.pack(entry.key_prefixlen, entry.direction)
    return head + _KEY_TAIL.pack(entry.identity, entry.proto, entry.port)


def policy_key(entry: MapEntry) -> PolicyKey:
    return PolicyKey.from_buffer_copy(policy_key_bytes(entry))


@dataclass(frozen=True)
class Hits:
    packets: int
    bytes: int


@dataclass(frozen=True)
class ConntrackEntry:
    key: CtKey
    value: CtValue
    expires_in: float


@dataclass
class Saved:
    """What an endpoint had before a change: its policy map (kept open) and its flags."""

    inner: Map | None
    flags: EndpointPolicyConfig | None

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
            self.inner = None


class PolicyMaps:
    """Owns the policy object, its programs in the chain and its maps."""

    own_maps: ClassVar[tuple[str, ...]] = OWN_MAPS

    def __init__(
        self, bpf_dir: Path, globals_dir: Path, pin_dir: Path, capacity: int, register: Register | None = None
    ) -> None:
        """`register` hands the pinned programs to the orchestrator (none: the caller places them)."""
        self._path = bpf_dir / "policy.o"
        self._register = register
        self._globals_dir = globals_dir
        self._pin_dir = pin_dir
        self.capacity = capacity
        self._obj: BpfObject | None = None
        self.programs: dict[str, Program] = {}
        self.maps: dict[str, Map] = {}
        self.rule_ids: RuleIds

    def load(self) -> None:
        """Load the programs (reusing this service's pins) and register them for their slots."""
        obj = load_service_object(self._path, self._globals_dir, self._pin_dir, self.own_maps)
        self._obj = obj
        self.maps = {name: obj.maps[name] for name in [*self.own_maps, "conntrack"]}
        self.rule_ids = RuleIds(obj.maps[RULE_NAMES].typed(ctypes.c_uint32, RuleName))
        self.programs = pin_programs(obj, [*PROGRAMS, HAIRPIN_PROGRAM], self._pin_dir)
        if self._register is not None:
            self._register([Placement(hook, Slot.POLICY, self._pin_dir / name) for name, hook in PROGRAMS.items()])

    def close(self) -> None:
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    # ---- endpoint policy ----

    def _outer(self) -> Map:
        return self.maps["policy_maps"].typed(ctypes.c_uint32, ctypes.c_uint32)

    def _config(self) -> Map:
        return self.maps["policy_config"].typed(ctypes.c_uint32, EndpointPolicyConfig)

    def _set_config(self, endpoint_id: int, flags: int) -> None:
        """Write an endpoint's flags, then give its policy a new revision.

        Called after the endpoint's map is in place: a packet that reads the new revision
        can only look up the new map and flags, so no verdict cached before outlives the change.
        """
        self._config().update(endpoint_id, EndpointPolicyConfig(flags))
        self._bump_revision(endpoint_id)

    def _bump_revision(self, endpoint_id: int) -> None:
        """A new node-wide revision for the endpoint's policy (see defs.REVISION_KEY)."""
        revisions = self.maps["policy_revisions"].typed(ctypes.c_uint32, ctypes.c_uint32)
        revision = next_revision(int(revisions.lookup(REVISION_KEY) or 0))
        revisions.update(REVISION_KEY, revision)
        revisions.update(endpoint_id, revision)

    def install(self, endpoint_id: int, entries: Iterable[MapEntry], flags: int) -> None:
        """`install_many` for one endpoint."""
        self.install_many([(endpoint_id, entries, flags)])

    def install_many(self, installs: Sequence[tuple[int, Iterable[MapEntry], int]]) -> None:
        """Swap in a freshly built policy map for each (endpoint, entries, flags); then set the flags.

        Turning enforcement on happens after the map is in place, turning it off
        before the map changes, so no packet is judged by a map it does not fit. The
        maps are swapped with one batch: each swap in a map of maps waits for running
        programs (an RCU grace period, ~10 ms here), and a batch waits once. On failure
        some endpoints may already have lowered flags or their new map: the caller
        puts back what it saved (`restore`).
        """
        listed = [(endpoint_id, list(entries), flags) for endpoint_id, entries, flags in installs]
        config = self._config()
        for endpoint_id, _, flags in listed:
            old = config.lookup(endpoint_id)
            if old is not None and (int(old.flags) & ~flags):
                self._set_config(endpoint_id, int(old.flags) & flags)
        rule_ids = self.rule_ids.ids_of({e.rules[0] for _, entries, _ in listed for e in entries if e.rules})
        with contextlib.ExitStack() as stack:
            built: list[tuple[Map, Map | None, list[bytes], dict[bytes, tuple[int, int]]]] = []
            for endpoint_id, entries, _ in listed:
                previous = self._current(endpoint_id)
                counted = {}
                if previous is not None:
                    stack.enter_context(previous)
                    counted = {bytes(k): (int(v.packets), int(v.bytes)) for k, v in previous.items()}
                inner, keys = self._build(endpoint_id, entries, rule_ids, counted)
                stack.enter_context(inner)
                built.append((inner, previous, keys, counted))
            if built:
                self._outer().update_batch([endpoint_id for endpoint_id, _, _ in listed], [b[0].fd for b in built])
            for inner, previous, keys, counted in built:
                if previous is not None:
                    _carry_late_hits(previous, inner, keys, counted)
        for endpoint_id, _, flags in listed:
            self._set_config(endpoint_id, flags)

    def _build(
        self,
        endpoint_id: int,
        entries: Sequence[MapEntry],
        rule_ids: dict[str, int],
        counted: dict[bytes, tuple[int, int]],
    ) -> tuple[Map, list[bytes]]:
        """A new policy map holding `entries` (with the hits `counted` so far), and its packed keys."""
        inner = Map.create(
            MapType.LPM_TRIE,
            ctypes.sizeof(PolicyKey),
            ctypes.sizeof(PolicyEntry),
            self.capacity,
            flags=BPF_F_NO_PREALLOC,
            name=f"policy_{endpoint_id}",
            key_type=PolicyKey,
            value_type=PolicyEntry,
        )
        try:
            keys = []
            values = []
            for entry in entries:
                key = policy_key_bytes(entry)
                packets, nbytes = counted.get(key, (0, 0)) if counted else (0, 0)
                rule = rule_ids[entry.rules[0]] if entry.rules else 0
                values.append(_ENTRY.pack(PolicyFlag.DENY if entry.deny else 0, 0, entry.proxy_port, rule, packets,
                                          nbytes))  # fmt: skip
                keys.append(key)
            if keys:  # one batch for the whole map, not one syscall per entry
                update_packed(inner, b"".join(keys), b"".join(values), len(keys))
        except BaseException:
            inner.close()
            raise
        return inner, keys

    def _current(self, endpoint_id: int) -> Map | None:
        """The endpoint's policy map now in place, opened (the caller closes it), or None."""
        map_id = self._outer().lookup(endpoint_id)
        return Map.from_id(map_id, key_type=PolicyKey, value_type=PolicyEntry) if map_id else None

    def save(self, endpoint_id: int) -> Saved:
        """Hold on to what the endpoint has now (the caller closes it)."""
        map_id = self._outer().lookup(endpoint_id)
        inner = Map.from_id(map_id) if map_id else None
        return Saved(inner, self._config().lookup(endpoint_id))

    def restore(self, endpoint_id: int, saved: Saved) -> None:
        """Put back what `save` held: flags off first, then the map, then the old flags."""
        config = self._config()
        if saved.inner is None or saved.flags is None:
            self.remove(endpoint_id)
            if saved.flags is not None:
                self._set_config(endpoint_id, int(saved.flags.flags))
            return
        current = config.lookup(endpoint_id)
        if current is not None:
            self._set_config(endpoint_id, int(current.flags) & int(saved.flags.flags))
        self._outer().update(endpoint_id, saved.inner.fd)
        self._set_config(endpoint_id, int(saved.flags.flags))

    def remove(self, endpoint_id: int) -> None:
        for m in (self._config(), self._outer()):
            with contextlib.suppress(KeyNotFoundError):
                m.delete(endpoint_id)
        self._bump_revision(endpoint_id)  # an endpoint that reuses the id inherits no cached verdict

    def endpoint_ids(self) -> set[int]:
        return {int(k) for k in self._outer()} | {int(k) for k in self._config()}

    def flags(self, endpoint_id: int) -> int:
        value = self._config().lookup(endpoint_id)
        return int(value.flags) if value is not None else 0

    def read(self, endpoint_id: int) -> dict[tuple[int, int, int, int, int], tuple[bool, Hits]]:
        """An endpoint's map as (dir, identity, proto, port, key prefixlen) -> (deny, hits)."""
        map_id = self._outer().lookup(endpoint_id)
        if not map_id:
            return {}
        out = {}
        with Map.from_id(map_id, key_type=PolicyKey, value_type=PolicyEntry) as inner:
            for key, value in inner.items():
                k = (
                    int(key.dir),
                    int.from_bytes(bytes(key.identity), "big"),
                    int(key.proto),
                    int.from_bytes(bytes(key.port), "big"),
                    int(key.prefixlen),
                )
                out[k] = (bool(value.flags & PolicyFlag.DENY), Hits(int(value.packets), int(value.bytes)))
        return out

    # ---- conntrack ----

    def conntrack(self, limit: int = 0) -> list[ConntrackEntry]:
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        ct = self.maps["conntrack"].typed(CtKey, CtValue)
        out = []
        for key, value in ct.items():
            out.append(ConntrackEntry(key, value, max(0.0, (int(value.expires) - now) / 1e9)))
            if limit and len(out) >= limit:
                break
        return out


_RULE_ID = struct.Struct("=I")


class RuleIds:
    """Rule name -> the id its map entries carry, kept in the node's policy_rule_names map.

    An id is the name's CRC-32 (the next free number on a collision), so a name keeps its id
    across restarts; the map is read back at load, and names are never taken out of it while
    the service runs, so a flow read late still finds the name of a rule just replaced.
    """

    def __init__(self, names: Map) -> None:
        self._map = names
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        for key, value in names.items():
            name = bytes(value.name).rstrip(b"\0").decode(errors="replace")
            self._ids.setdefault(name, int(key))
            self._names[int(key)] = name

    def id_of(self, name: str) -> int:
        """The rule's id, written to the map on first use; 0 when the map is full."""
        return self.ids_of([name])[name]

    def ids_of(self, names: Iterable[str]) -> dict[str, int]:
        """`id_of` for many names: the new ones written in one batch (one at a time if it does not fit)."""
        out: dict[str, int] = {}
        new: dict[int, str] = {}
        taken: dict[int, str] = {}
        for name in names:
            known = self._ids.get(name)
            if known is not None:
                out[name] = known
                continue
            rule_id = zlib.crc32(name.encode()) or 1
            while self._names.get(rule_id, taken.get(rule_id, name)) != name:
                rule_id = rule_id % 0xFFFFFFFF + 1
            taken[rule_id] = name
            new[rule_id] = name
        if not new:
            return out
        size = ctypes.sizeof(RuleName)
        values = b"".join(name.encode()[:size].ljust(size, b"\0") for name in new.values())
        keys = b"".join(_RULE_ID.pack(rule_id) for rule_id in new)
        try:
            update_packed(self._map, keys, values, len(new))
            written = list(new.items())
        except MapFullError:
            written = [(rule_id, name) for rule_id, name in new.items() if self._write_one(rule_id, name)]
        for rule_id, name in written:
            self._ids[name] = rule_id
            self._names[rule_id] = name
        for name in new.values():
            out[name] = self._ids.get(name, 0)  # 0: the map is full, flows of this rule go unnamed
        return out

    def _write_one(self, rule_id: int, name: str) -> bool:
        value = RuleName()
        encoded = name.encode()[: ctypes.sizeof(value.name)]
        ctypes.memmove(value.name, encoded, len(encoded))
        try:
            self._map.update(rule_id, value)
        except MapFullError:
            return False
        return True


def _carry_late_hits(previous: Map, inner: Map, keys: list[bytes], counted: dict[bytes, tuple[int, int]]) -> None:
    """Add what the replaced map counted between the copy and the swap (a packet in flight may be lost)."""
    for packed in keys:
        before = counted.get(packed)
        if before is None:
            continue
        key = PolicyKey.from_buffer_copy(packed)
        now = previous.lookup(key)
        if now is None or before is None or (int(now.packets), int(now.bytes)) == before:
            continue
        value = inner.lookup(key)
        if value is not None:
            value.packets += int(now.packets) - before[0]
            value.bytes += int(now.bytes) - before[1]
            inner.update(key, value)


def next_revision(last: int) -> int:
    """The revision after `last`, never 0; the first one (no last) starts from the boot clock.

    Starting from milliseconds since boot rather than 1 keeps a restarted service whose
    policy_config pin was lost from issuing a revision a live conntrack entry still holds.
    """
    if last == 0:
        last = time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000_000
    return last % 0xFFFFFFFF + 1


def config_flags(
    ingress: bool, egress: bool, audit: bool, ingress_default_allow: bool = False, egress_default_allow: bool = False
) -> int:
    """An endpoint's config word; a default-allow flag counts only in an enforced direction."""
    return (
        (ConfigFlag.INGRESS_ENFORCED if ingress else 0)
        | (ConfigFlag.EGRESS_ENFORCED if egress else 0)
        | (ConfigFlag.AUDIT if audit else 0)
        | (ConfigFlag.INGRESS_DEFAULT_ALLOW if ingress and ingress_default_allow else 0)
        | (ConfigFlag.EGRESS_DEFAULT_ALLOW if egress and egress_default_allow else 0)
    )
