"""The orchestrator's identity classes standing in for its gRPC API, for in-process policy tests.

`Policy` talks to the node through the `NodeState` protocol; tests that drive the real
`Policy` class with real maps and stores (injected failures, size limits) give it this
instead of an orchestrator process.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from services.common.validate import Network
from services.orchestrator.identities import Identities, IdentityInfo
from services.policy.compute import EndpointView
from services.policy.sources import OWNER, IdentityView


def identity_view(info: IdentityInfo) -> IdentityView:
    """An identity as policy's stream would deliver it."""
    prefixes = tuple(ipaddress.ip_network(p) for p in info.prefixes)
    return IdentityView(info.id, ",".join(info.labels), prefixes, frozenset(info.owners))


@dataclass
class LocalNode:
    """The orchestrator's identity classes, called in-process instead of over gRPC.

    Calls may come from the policy's threads (a bulk import reserves on one of its own), one at
    a time, as the orchestrator's worker takes them: its store must be opened with `any_thread`.
    """

    identities: Identities
    endpoints: list[EndpointView]
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> tuple[list[EndpointView], list[IdentityView]]:
        with self._lock:
            return list(self.endpoints), [identity_view(i) for i in self.identities.all()]

    def allocate(self, networks: Iterable[Network], reserve_only: bool = False) -> dict[Network, int]:
        wanted = sorted(set(networks), key=str)
        with self._lock:
            infos = self.identities.allocate_cidrs(OWNER, wanted, reserve_only)
        return {n: i.id for n, i in zip(wanted, infos, strict=True)}

    def release(self, networks: Iterable[Network]) -> None:
        with self._lock:
            self.identities.release_cidrs(OWNER, sorted(set(networks), key=str))

    def policy_ready(self, installed: Iterable[tuple[str, int]], revision: int, resend: bool = False) -> None:
        """No endpoint waits for its policy here (there is no orchestrator)."""
