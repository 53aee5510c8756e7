"""CIDR identities reserved on a thread while the rules that name them are still being checked.

A bulk import spends about as long checking its rules (here, Python) as the orchestrator
spends reserving identities for their CIDRs (another process, the other CPU): started
together, the import waits for the longer of the two instead of their sum. Only what is
cheap to be sure of is reserved early: CIDRs in canonical IPv4 form that this service does
not hold yet. The import reserves whatever else it needs once the rules are checked, and
releases what it reserved early if the rules are refused, so a refused request still
changes nothing (a request smaller than EARLY_MIN_CIDRS reserves nothing early at all).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Protocol

from services.common.ipv4 import parse_ipv4_network
from services.common.validate import Network

EARLY_MIN_CIDRS = 256  # a smaller request checks its rules in less time than a thread and a call cost


class Reserver(Protocol):
    def allocate(self, networks: Iterable[Network], reserve_only: bool = False) -> dict[Network, int]: ...


class EarlyReservation:
    """One reservation under way; `result` waits for it."""

    def __init__(self, node: Reserver, texts: list[str], held: set[Network]) -> None:
        """Start reserving the canonical IPv4 CIDRs among `texts` that are not in `held`."""
        self._node = node
        self._texts = texts
        self._held = held
        self._reserved: dict[Network, int] = {}
        self._thread = threading.Thread(target=self._run, name="early-reserve", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wanted = {n for text in self._texts if (n := parse_ipv4_network(text)) is not None and n not in self._held}
        if not wanted:
            return
        try:
            self._reserved = self._node.allocate(wanted, reserve_only=True)
        except Exception:
            self._reserved = {}  # the reservation after the check meets the same fault and reports it

    def result(self) -> dict[Network, int]:
        """What was reserved ({} if the call failed: the import's own reservation then reports why)."""
        self._thread.join()
        return self._reserved


def reserve_early(node: Reserver, texts: list[str], held: Callable[[], set[Network]]) -> EarlyReservation | None:
    """An EarlyReservation for a bulk request's CIDRs, or None for a small one."""
    if len(texts) < EARLY_MIN_CIDRS:
        return None
    return EarlyReservation(node, texts, held())
