"""The prefilter: revisioned deny lists, their counters and the devices it filters.

`Prefilter` is the plain class the gRPC layer, the tests and the benchmarks
call. It validates a change completely (CIDRs, revision, capacity) before it
touches a map, writes the maps, then persists the desired state with the new
revision in one store transaction. On start it reinstalls the persisted list as
a fresh generation (so the maps equal the store exactly, with no window) and
re-attaches to the interfaces it was attached to.

The prefilter's program runs in the PREFILTER slot of the XDP chain; attaching
to an interface asks the orchestrator to run the XDP chain's entry there.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import structlog

from pybpf import XdpMode, query_xdp
from services.common.chain_client import XdpPlacement
from services.common.datapath import Counter
from services.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from services.common.store import Store
from services.prefilter.defs import IfStats
from services.prefilter.denylist import DenyList, Entry, parse_entries
from services.prefilter.maps import PrefilterMaps

log = structlog.get_logger("weir.prefilter")

ENTRY = "entry"
ATTACHMENT = "attachment"
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 100_000


@dataclass(frozen=True)
class Change:
    revision: int
    changed: int


@dataclass(frozen=True)
class AttachmentInfo:
    interface: str
    ifindex: int
    mode: XdpMode
    program_id: int


@dataclass(frozen=True)
class InterfaceCounters:
    interface: str
    ifindex: int
    stats: IfStats


class XdpDevices(Protocol):
    """Who runs the XDP chain on a device: the orchestrator (ChainClient), or in-process."""

    def attach_xdp(self, interface: str, mode: XdpMode) -> XdpPlacement: ...

    def detach_xdp(self, interface: str) -> None: ...


def _ifindex(interface: str) -> int:
    try:
        return socket.if_nametoindex(interface)
    except OSError:
        raise NotFound(f"interface {interface!r} does not exist on this node") from None


def _ifname(ifindex: int) -> str:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return ""


class Prefilter:
    """Deny lists by CIDR, enforced by an XDP program on the interfaces named."""

    def __init__(self, maps: PrefilterMaps, store: Store, devices: XdpDevices) -> None:
        self._maps = maps
        self._store = store
        self._devices = devices
        self._list = DenyList(maps.capacity)

    # ---- life cycle ----

    def start(self) -> None:
        """Load, reinstall the persisted list, re-attach; the datapath never runs unfiltered."""
        self._maps.load()
        self._list.restore(
            Entry(ipaddress.ip_network(key), bool(doc["audit"]), int(doc["id"]))
            for key, doc in self._store.items(ENTRY)
        )
        self._maps.install(list(self._list.entries.values()))
        for interface, doc in self._store.items(ATTACHMENT):
            try:
                self._attach(interface, XdpMode[doc["requested"]])
            except (NotFound, FailedPrecondition) as exc:
                log.warning("cannot re-attach; forgetting the attachment", interface=interface, error=str(exc))
                self._store.delete(ATTACHMENT, interface)

    def close(self) -> None:
        self._maps.close()

    @property
    def revision(self) -> int:
        return self._store.revision(ENTRY)

    # ---- entries ----

    def _check_revision(self, expected: int) -> None:
        current = self.revision
        if expected and expected != current:
            raise Aborted(
                f"expected revision {expected}, but the list is at revision {current}: "
                "someone else changed it; re-read the list and retry"
            )

    def add(self, items: Iterable[tuple[str, bool]], expected_revision: int = 0) -> Change:
        """Add (or switch the mode of) entries, all or none."""
        wanted = parse_entries(items)
        if not wanted:
            raise InvalidArgument("no entries given")
        self._check_revision(expected_revision)
        added, changed = self._list.plan_add(wanted)
        if not added and not changed:
            return Change(self.revision, 0)
        try:
            self._maps.reset_counters(e.id for e in added)
            self._maps.upsert([*added, *changed])
        except Exception:
            self._list.abort(added)
            raise
        with self._store.transaction():
            self._store.put_many(ENTRY, ((str(e.network), {"audit": e.audit, "id": e.id}) for e in [*added, *changed]))
            revision = self._store.bump_revision(ENTRY)
        self._list.commit(upserts=[*added, *changed])
        return Change(revision, len(added) + len(changed))

    def delete(self, cidrs: Iterable[str], expected_revision: int = 0) -> Change:
        """Delete entries, all or none; an entry not on the list is NOT_FOUND."""
        networks = list(parse_entries((c, False) for c in cidrs))
        if not networks:
            raise InvalidArgument("no entries given")
        self._check_revision(expected_revision)
        removed = self._list.plan_delete(networks)
        self._maps.remove(removed)
        with self._store.transaction():
            self._store.delete_many(ENTRY, (str(e.network) for e in removed))
            revision = self._store.bump_revision(ENTRY)
        self._list.commit(removed=removed)
        return Change(revision, len(removed))

    def replace(self, items: Iterable[tuple[str, bool]], expected_revision: int = 0) -> Change:
        """Make this the whole list, in one atomic switch of generations."""
        wanted = parse_entries(items)
        self._check_revision(expected_revision)
        before = self._list.entries
        new_list, leaving = self._list.plan_replace(wanted)
        fresh_ids = [e.id for e in new_list if before.get(e.network) is None]
        try:
            self._maps.reset_counters(fresh_ids)
            self._maps.install(new_list)
        except Exception:
            self._list.abort(new_list)
            raise
        with self._store.transaction():
            self._store.clear(ENTRY)
            self._store.put_many(ENTRY, ((str(e.network), {"audit": e.audit, "id": e.id}) for e in new_list))
            revision = self._store.bump_revision(ENTRY)
        changed = len(leaving) + sum(
            1 for e in new_list if e.network not in before or before[e.network].audit != e.audit
        )
        self._list.commit_replace(new_list, leaving)
        return Change(revision, changed)

    def list_page(self, page_size: int = 0, page_token: str = "") -> tuple[list[Entry], str, int]:
        """Entries ordered by CIDR text; the token is the last CIDR returned."""
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size {page_size} is above the maximum of {MAX_PAGE_SIZE}")
        size = page_size or DEFAULT_PAGE_SIZE
        keys = sorted(str(n) for n in self._list.entries)
        start = bisect.bisect_right(keys, page_token) if page_token else 0
        page = keys[start : start + size]
        token = page[-1] if start + size < len(keys) else ""
        entries = [self._list.entries[ipaddress.ip_network(k)] for k in page]
        return entries, token, self.revision

    def counters(self, cidrs: Iterable[str] = ()) -> list[tuple[Entry, Counter]]:
        """Hit counters (summed over CPUs) of the named entries, or of all of them."""
        names = list(cidrs)
        if names:
            wanted = parse_entries((c, False) for c in names)
            entries = []
            for network in wanted:
                if network not in self._list.entries:
                    raise NotFound(f"{network} is not on the deny list")
                entries.append(self._list.entries[network])
        else:
            entries = sorted(self._list.entries.values(), key=lambda e: str(e.network))
        return [(e, self._maps.hits(e.id)) for e in entries]

    def interface_counters(self) -> list[InterfaceCounters]:
        return [
            InterfaceCounters(_ifname(ifindex), ifindex, stats)
            for ifindex, stats in sorted(self._maps.interface_counters().items())
        ]

    # ---- attachments ----

    def attach(self, interface: str, mode: XdpMode = XdpMode.AUTO) -> AttachmentInfo:
        info = self._attach(interface, mode)
        self._store.put(ATTACHMENT, interface, {"requested": mode.name, "mode": info.mode.name})
        log.info("attached", interface=interface, mode=info.mode.name)
        return info

    def _attach(self, interface: str, mode: XdpMode) -> AttachmentInfo:
        _ifindex(interface)
        placed = self._devices.attach_xdp(interface, mode)
        return AttachmentInfo(interface, placed.ifindex, placed.mode, placed.program_id)

    def detach(self, interface: str) -> None:
        _ifindex(interface)
        if self._store.get(ATTACHMENT, interface) is None:
            raise NotFound(f"the prefilter is not attached to {interface}")
        self._devices.detach_xdp(interface)
        self._store.delete(ATTACHMENT, interface)
        log.info("detached", interface=interface)

    def attachments(self) -> list[AttachmentInfo]:
        out = []
        for interface, doc in self._store.items(ATTACHMENT):
            try:
                ifindex = _ifindex(interface)
            except NotFound:
                continue
            mode = XdpMode[doc["mode"]]
            out.append(AttachmentInfo(interface, ifindex, mode, query_xdp(ifindex).get(mode) or 0))
        return out
