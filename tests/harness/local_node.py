"""The orchestrator's identity classes standing in for its gRPC API, for in-process policy tests.

`Policy` talks to the node through the `NodeState` protocol; tests that drive the real
`Policy` class with real maps and stores (injected failures, size limits) give it this
instead of an orchestrator process.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

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
    """The orchestrator's identity classes, called in-process instead of over gRPC."""

    identities: Identities
    endpoints: list[EndpointView]

    def snapshot(self) -> tuple[list[EndpointView], list[IdentityView]]:
        return list(self.endpoints), [identity_view(i) for i in self.identities.all()]

    def allocate(self, networks: Iterable[Network], reserve_only: bool = False) -> dict[Network, int]:
        wanted = sorted(set(networks), key=str)
        infos = self.identities.allocate_cidrs(OWNER, wanted, reserve_only)
        return {n: i.id for n, i in zip(wanted, infos, strict=True)}

    def release(self, networks: Iterable[Network]) -> None:
        self.identities.release_cidrs(OWNER, sorted(set(networks), key=str))

    def policy_ready(self, installed: Iterable[tuple[str, int]], revision: int, resend: bool = False) -> None:
        """No endpoint waits for its policy here (there is no orchestrator)."""
