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

import base64
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from pybpf import XdpMode, query_xdp
from services.common import paging
from services.common.chain_client import XdpPlacement
from services.common.change import Change as StoreChange
from services.common.collector import collector_paused
from services.common.datapath import Counter
from services.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from services.common.store import Store, StoreError
from services.common.validate import at_most
from services.common.validate import interface as valid_interface
from services.prefilter.defs import IfStats
from services.prefilter.denylist import (
    VALUE,
    DenyList,
    Entry,
    Packed,
    Table,
    empty_table,
    flags_of,
    parse_entries,
    parse_wanted,
    split,
)
from services.prefilter.keys import KINDS, Kind, kind_of
from services.prefilter.maps import PrefilterMaps
from services.prefilter.valid_destinations import ValidDestinationMode

log = structlog.get_logger("weir.prefilter")

ENTRY = "entry"  # one document per CIDR changed since the last replace: {"audit", "id"} or {"deleted": true}
BASE = "entry-base"  # one document: the list the last replace (or adopt) wrote, packed per map
BASE_KEY = "list"
BASE_FORMAT = 1
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


TOMBSTONE = {"deleted": True}


def _base_doc(table: Table) -> dict[str, object]:
    """A whole list as one document: per map, its raw keys and values joined, in base64
    (values in the host's byte order, as the maps hold them; the store is node-local)."""
    lists = {
        kind.outer: {
            "keys": base64.b64encode(b"".join(raws.keys())).decode(),
            "values": base64.b64encode(b"".join(raws.values())).decode(),
        }
        for kind, raws in table.items()
        if raws
    }
    return {"format": BASE_FORMAT, "lists": lists}


def _base_table(doc: dict[str, Any]) -> Table:
    if doc.get("format") != BASE_FORMAT:
        raise ValueError(f"format {doc.get('format')!r}, this build reads {BASE_FORMAT}")
    table = empty_table()
    for kind in KINDS:
        packed = doc["lists"].get(kind.outer)
        if packed:
            keys = base64.b64decode(packed["keys"])
            size = kind.address_size + (0 if kind.host else 4)
            table[kind] = dict(zip(split(keys, size), split(base64.b64decode(packed["values"]), VALUE.size),
                                   strict=True))  # fmt: skip
    return table


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
        self._listing: tuple[int, list[str], dict[str, tuple[Kind, bytes]]] | None = None  # revision, sorted, keys

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
        live = self._maps.live_table()
        with self._store.transaction():
            self._store.clear(ENTRY)
            self._store.put(BASE, BASE_KEY, _base_doc(live))
            self._store.bump_revision(ENTRY)
        log.warning("adopted the deny list from the live maps", entries=sum(len(r) for r in live.values()))
        self._reconcile()

    def _persisted(self) -> Table:
        """The list the store holds: the last bulk list, then the changes made since."""
        doc = self._store.get(BASE, BASE_KEY)
        try:
            table = empty_table() if doc is None else _base_table(doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(self._store.path, f"holds a deny list it cannot read ({exc})") from None
        for key, change in self._store.items(ENTRY):
            network = ipaddress.ip_network(key)
            kind = kind_of(network)
            if change.get("deleted"):
                table[kind].pop(kind.key(network), None)
            else:
                table[kind][kind.key(network)] = VALUE.pack(int(change["id"]), flags_of(bool(change["audit"])))
        return table

    def _reconcile(self) -> None:
        self._list.restore_table(self._persisted())
        self._maps.install(self._list.table)
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
            change.on_failure(lambda: self._list.abort(e.id for e in added))
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
            if self._store.get(BASE, BASE_KEY) is None:
                self._store.delete_many(ENTRY, (str(e.network) for e in removed))
            else:  # the entry may be in the bulk list: record that it is gone
                self._store.put_many(ENTRY, ((str(e.network), TOMBSTONE) for e in removed))
            revision = self._store.bump_revision(ENTRY)
            change.attempt(lambda: self._maps.remove(removed, missing_ok=True),
                           undo=lambda: self._maps.upsert(removed))  # fmt: skip
        self._list.commit(removed=removed)
        return Change(revision, len(removed))

    @collector_paused()
    def replace(
        self, items: Iterable[tuple[str, bool]], expected_revision: int = 0, packed: Iterable[Packed] = ()
    ) -> Change:
        """Make this the whole list, in one atomic switch of generations.

        `packed` adds blocks of hosts given as packed addresses (the bulk form): no
        Python object is made per entry on the way to the maps and the store, which
        gets the whole list as one document.
        """
        blocks = list(packed)
        text = items if isinstance(items, list) else list(items)
        self.check_count(len(text) + sum(len(b.addresses) // (4 if b.version == 4 else 16) for b in blocks))
        wanted = parse_wanted(text, blocks)
        self._check_revision(expected_revision)
        plan = self._list.plan_replace(wanted)
        target, previous = self._maps.idle, self._maps.active
        with StoreChange(self._store) as change:
            change.on_failure(lambda: self._list.abort(plan.fresh_ids))
            self._store.clear(ENTRY)
            self._store.put(BASE, BASE_KEY, _base_doc(plan.table))
            revision = self._store.bump_revision(ENTRY)
            reused = plan.reused_ids
            self._maps.reset_counters([i for i in plan.fresh_ids if i not in reused] if reused else plan.fresh_ids)
            change.attempt(lambda: self._maps.fill(target, plan.table), undo=lambda: self._maps.drop(target))
            change.apply(lambda: self._maps.flip(target), undo=lambda: self._maps.flip(previous))
        self._maps.retire(previous)
        # Ids taken over from leaving entries start from zero once the old list is gone.
        self._maps.reset_counters(plan.reused_ids)
        self._list.commit_replace(plan)
        return Change(revision, plan.changed)

    @collector_paused()
    def list_page(self, page_size: int = 0, page_token: str = "") -> tuple[list[Entry], str, int]:
        """Entries ordered by CIDR text; the token is the last CIDR returned."""
        revision = self.revision
        if self._listing is None or self._listing[0] != revision:
            # Sorted once per revision, not once per page: paging through n entries stays O(n log n).
            # Entries (with their network objects) are made for the page only.
            by_text = {kind.text(raw): (kind, raw) for kind, raws in self._list.table.items() for raw in raws}
            self._listing = (revision, sorted(by_text), by_text)
        _, keys, by_text = self._listing
        entries, token = paging.page(keys, page_size, page_token, lambda text: self._list.entry(*by_text[text]),
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
