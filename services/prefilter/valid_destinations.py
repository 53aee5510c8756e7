"""The prefilter's other mode: drop what is for no destination this node serves.

Off by default. When on, the XDP program passes a packet only if its destination is a
local endpoint or a node address (the ipcache says so: a label identity or the host's),
a service frontend, or a CIDR the operator added; everything else drops as
INVALID_DESTINATION (counted per reason, as every drop). Frontends come from the lb
service (`set_frontends`, called by the service's follower task); the mode and the
operator's CIDRs are persisted. Multicast, broadcast and non-IP frames always pass.
The ipcache's label identities are the node's own endpoints in a standalone node; in a
cluster they also cover remote endpoints, which this mode then lets through.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from services.common.change import Change
from services.common.store import Store
from services.common.validate import Network, at_most, cidr
from services.prefilter.defs import VALID_DST_MAX, PrefilterConfigFlag, ValidDestination
from services.prefilter.maps import PrefilterMaps

log = structlog.get_logger("weir.prefilter.valid")

KIND = "valid_destinations"
KEY = "config"
MAX_CIDRS = VALID_DST_MAX // 2  # the other half is for frontends


@dataclass(frozen=True)
class ValidDestinations:
    enabled: bool
    cidrs: tuple[str, ...]
    frontends: tuple[str, ...]


class ValidDestinationMode:
    """The mode bit, the operator's CIDRs and the frontends, kept in pf_config and pf_valid_dst."""

    def __init__(self, maps: PrefilterMaps, store: Store) -> None:
        self._maps = maps
        self._store = store
        self._frontends: set[Network] = set()

    def _doc(self) -> tuple[bool, list[Network]]:
        doc = self._store.get(KIND, KEY) or {}
        return bool(doc.get("enabled")), [cidr(c, "stored cidrs") for c in doc.get("cidrs", [])]

    def _wanted(self, extra: Iterable[Network]) -> dict[Network, int]:
        wanted = {n: int(ValidDestination.FRONTEND) for n in self._frontends}
        wanted.update({n: int(ValidDestination.EXTRA) for n in extra})
        return wanted

    def _install(self, enabled: bool, wanted: dict[Network, int]) -> None:
        """Entries first, then the mode bit: nothing valid is ever missing while the mode is on."""
        current = self._maps.valid_destinations()
        for network, kind in wanted.items():
            if current.get(network) != kind:
                self._maps.put_valid_destination(network, kind)
        for network in current.keys() - wanted.keys():
            self._maps.delete_valid_destination(network)
        self._maps.set_flags(int(PrefilterConfigFlag.VALID_DESTINATIONS) if enabled else 0)

    def reconcile(self) -> None:
        """After a (re)start: the maps as the store says (frontends follow from the lb service)."""
        enabled, extra = self._doc()
        self._install(enabled, self._wanted(extra))

    @property
    def enabled(self) -> bool:
        return self._doc()[0]

    def get(self) -> ValidDestinations:
        enabled, extra = self._doc()
        return ValidDestinations(enabled, tuple(map(str, extra)), tuple(sorted(map(str, self._frontends))))

    def set(self, enabled: bool, cidrs: list[str]) -> ValidDestinations:
        """Turn the mode on or off with the operator's extra CIDRs (all or nothing)."""
        at_most(len(cidrs), MAX_CIDRS, "cidrs")
        extra = list(dict.fromkeys(cidr(c, f"cidrs[{i}]") for i, c in enumerate(cidrs)))
        old_enabled, old_extra = self._doc()
        with Change(self._store) as change:
            self._store.put(KIND, KEY, {"enabled": enabled, "cidrs": [str(n) for n in extra]})
            change.attempt(
                lambda: self._install(enabled, self._wanted(extra)),
                undo=lambda: self._install(old_enabled, self._wanted(old_extra)),
            )
        log.info("valid-destination mode set", enabled=enabled, cidrs=len(extra))
        return self.get()

    def set_frontends(self, frontends: Iterable[Network]) -> None:
        """The lb service's frontends now (replaces the previous set)."""
        new = set(frontends)
        if len(new) > VALID_DST_MAX - MAX_CIDRS:
            log.warning("more frontends than pf_valid_dst holds; the rest are not valid destinations",
                        frontends=len(new))  # fmt: skip
            new = set(sorted(new, key=str)[: VALID_DST_MAX - MAX_CIDRS])
        if new == self._frontends:
            return
        self._frontends = new
        enabled, extra = self._doc()
        self._install(enabled, self._wanted(extra))
