"""The prefilter: revisioned deny lists, their counters and the devices it filters.

`Prefilter` is the plain class the gRPC layer, the tests and the benchmarks
call. It validates a change completely (CIDRs, revision, capacity) before it
touches a map, then follows the one change protocol: the desired state and the
new revision go into one store transaction, the maps are written with their
undo, and the transaction commits; a failure anywhere (a full map, a full disk)
undoes the map writes and gives back the counter ids, so the list, the maps and
the store are as they were. On start it reinstalls the persisted list as
a fresh generation (so the maps equal the store exactly, with no window) and
re-attaches to the interfaces it was attached to.

The prefilter's program runs in the PREFILTER slot of the XDP chain; attaching
to an interface asks the orchestrator to run the XDP chain's entry there.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import structlog

from pybpf import XdpMode, query_xdp
from services.common import paging
from services.common.chain_client import XdpPlacement
from services.common.change import Change as StoreChange
from services.common.collector import collector_paused
from services.common.datapath import Counter
from services.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from services.common.store import Store
from services.common.validate import at_most
from services.common.validate import interface as valid_interface
from services.prefilter.defs import IfStats
from services.prefilter.denylist import DenyList, Entry, parse_entries
from services.prefilter.maps import PrefilterMaps
from services.prefilter.valid_destinations import ValidDestinationMode

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


def _doc(entry: Entry) -> dict[str, object]:
    return {"audit": entry.audit, "id": entry.id}


class XdpDevices(Protocol):
    """Who runs the XDP chain on a device: the orchestrator (ChainClient), or in-process."""

    def attach_xdp(self, interface: str, mode: XdpMode) -> XdpPlacement: ...

    def detach_xdp(self, interface: str) -> None: ...


def _ifindex(interface: str) -> int:
    """The index of a named interface; a name the kernel could not hold is INVALID_ARGUMENT."""
    valid_interface(interface)
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
        self.valid_destinations = ValidDestinationMode(maps, store)
        self._listing: tuple[int, list[str], dict[str, Entry]] | None = None  # revision, sorted CIDRs, entries

    # ---- life cycle ----

    def start(self) -> None:
        """Load, reinstall the persisted list, re-attach; the datapath never runs unfiltered."""
        self._maps.load()
        self._reconcile()

    def adopt(self) -> None:
        """Start from a fresh store filled with the live generation's list (ids and modes kept).

        Attachments cannot be read back from the maps: the XDP chain stays where the
        orchestrator runs it, and `Attach` records it again.
        """
        self._maps.load()
        live = self._maps.live()
        with self._store.transaction():
            self._store.put_many(ENTRY, ((str(n), {"audit": audit, "id": i}) for n, (i, audit) in live.items()))
            self._store.bump_revision(ENTRY)
        log.warning("adopted the deny list from the live maps", entries=len(live))
        self._reconcile()

    def _reconcile(self) -> None:
        self._list.restore(
            Entry(ipaddress.ip_network(key), bool(doc["audit"]), int(doc["id"]))
            for key, doc in self._store.items(ENTRY)
        )
        self._maps.install(list(self._list.entries.values()))
        self.valid_destinations.reconcile()
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

    @property
    def max_entries(self) -> int:
        """Most entries one request may name: as many as the maps can hold at all."""
        return self._maps.capacity.ids

    def check_count(self, count: int) -> None:
        """Refuse a request naming more entries than ``max_entries``, before any is parsed."""
        at_most(count, self.max_entries, "entries")

    def _entries(self, items: Iterable[tuple[str, bool]]) -> list[tuple[str, bool]]:
        out = items if isinstance(items, list) else list(items)
        self.check_count(len(out))
        return out

    def _cidrs(self, cidrs: Iterable[str]) -> list[str]:
        out = cidrs if isinstance(cidrs, list) else list(cidrs)
        self.check_count(len(out))
        return out

    # ---- entries ----

    def _check_revision(self, expected: int) -> None:
        current = self.revision
        if expected and expected != current:
            raise Aborted(
                f"expected revision {expected}, but the list is at revision {current}: "
                "someone else changed it; re-read the list and retry"
            )

    @collector_paused()
    def add(self, items: Iterable[tuple[str, bool]], expected_revision: int = 0) -> Change:
        """Add (or switch the mode of) entries, all or none."""
        wanted = parse_entries(self._entries(items))
        if not wanted:
            raise InvalidArgument("no entries given")
        self._check_revision(expected_revision)
        added, changed = self._list.plan_add(wanted)
        if not added and not changed:
            return Change(self.revision, 0)
        previous = [self._list.entries[e.network] for e in changed]

        def undo() -> None:
            self._maps.remove(added, missing_ok=True)
            self._maps.upsert(previous)

        with StoreChange(self._store) as change:
            change.on_failure(lambda: self._list.abort(added))
            self._store.put_many(ENTRY, ((str(e.network), _doc(e)) for e in [*added, *changed]))
            revision = self._store.bump_revision(ENTRY)
            self._maps.reset_counters(e.id for e in added)  # ids no entry holds: nothing to undo
            change.attempt(lambda: self._maps.upsert([*added, *changed]), undo=undo)
        self._list.commit(upserts=[*added, *changed])
        return Change(revision, len(added) + len(changed))

    @collector_paused()
    def delete(self, cidrs: Iterable[str], expected_revision: int = 0) -> Change:
        """Delete entries, all or none; an entry not on the list is NOT_FOUND."""
        networks = list(parse_entries((c, False) for c in self._cidrs(cidrs)))
        if not networks:
            raise InvalidArgument("no entries given")
        self._check_revision(expected_revision)
        removed = self._list.plan_delete(networks)
        with StoreChange(self._store) as change:
            self._store.delete_many(ENTRY, (str(e.network) for e in removed))
            revision = self._store.bump_revision(ENTRY)
            change.attempt(lambda: self._maps.remove(removed, missing_ok=True),
                           undo=lambda: self._maps.upsert(removed))  # fmt: skip
        self._list.commit(removed=removed)
        return Change(revision, len(removed))

    @collector_paused()
    def replace(self, items: Iterable[tuple[str, bool]], expected_revision: int = 0) -> Change:
        """Make this the whole list, in one atomic switch of generations."""
        wanted = parse_entries(self._entries(items))
        self._check_revision(expected_revision)
        before = self._list.entries
        new_list, leaving = self._list.plan_replace(wanted)
        held = {e.id for e in before.values()}
        fresh_ids = [e.id for e in new_list if before.get(e.network) is None]
        target, previous = self._maps.idle, self._maps.active
        with StoreChange(self._store) as change:
            change.on_failure(lambda: self._list.abort(new_list))
            self._store.clear(ENTRY)
            self._store.put_many(ENTRY, ((str(e.network), _doc(e)) for e in new_list))
            revision = self._store.bump_revision(ENTRY)
            self._maps.reset_counters(i for i in fresh_ids if i not in held)
            change.attempt(lambda: self._maps.fill(target, new_list), undo=lambda: self._maps.drop(target))
            change.apply(lambda: self._maps.flip(target), undo=lambda: self._maps.flip(previous))
        self._maps.retire(previous)
        # Ids taken over from leaving entries start from zero once the old list is gone.
        self._maps.reset_counters(i for i in fresh_ids if i in held)
        changed = len(leaving) + sum(
            1 for e in new_list if e.network not in before or before[e.network].audit != e.audit
        )
        self._list.commit_replace(new_list, leaving)
        return Change(revision, changed)

    @collector_paused()
    def list_page(self, page_size: int = 0, page_token: str = "") -> tuple[list[Entry], str, int]:
        """Entries ordered by CIDR text; the token is the last CIDR returned."""
        revision = self.revision
        if self._listing is None or self._listing[0] != revision:
            # Sorted once per revision, not once per page: paging through n entries stays O(n log n).
            by_text = {str(n): e for n, e in self._list.entries.pairs()}
            self._listing = (revision, sorted(by_text), by_text)
        _, keys, by_text = self._listing
        entries, token = paging.page(keys, page_size, page_token, by_text.__getitem__,
                                     default_size=DEFAULT_PAGE_SIZE, max_size=MAX_PAGE_SIZE)  # fmt: skip
        return entries, token, revision

    def counters(self, cidrs: Iterable[str] = ()) -> list[tuple[Entry, Counter]]:
        """Hit counters (summed over CPUs) of the named entries, or of all of them."""
        names = self._cidrs(cidrs)
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
        """Attach to an interface and remember it; if the store fails, the interface is put back."""
        _ifindex(interface)
        was = self._store.get(ATTACHMENT, interface)

        def undo() -> None:
            if was is None:
                self._devices.detach_xdp(interface)
            else:
                self._attach(interface, XdpMode[was["requested"]])

        with StoreChange(self._store) as change:
            info = change.attempt(lambda: self._attach(interface, mode), undo=undo)
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
        doc = self._store.get(ATTACHMENT, interface) or {}
        requested = XdpMode[doc.get("requested", XdpMode.AUTO.name)]
        with StoreChange(self._store) as change:
            self._store.delete(ATTACHMENT, interface)
            change.attempt(lambda: self._devices.detach_xdp(interface),
                           undo=lambda: self._attach(interface, requested))  # fmt: skip
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
