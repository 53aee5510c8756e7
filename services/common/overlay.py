"""The VXLAN overlay's shared facts: what the orchestrator creates and the ipsec service must know."""

from __future__ import annotations

import hashlib

__all__ = ["VXLAN6_OVERHEAD", "VXLAN_OVERHEAD", "overlay_ifname"]

VXLAN_OVERHEAD = 50  # outer IPv4 + UDP + VXLAN + inner Ethernet
VXLAN6_OVERHEAD = 70  # the same with an outer IPv6 header (40 bytes, not 20)


def overlay_ifname(instance: str) -> str:
    """The instance's VXLAN device: one per instance, named from the instance so two never collide."""
    digest = hashlib.sha256(f"overlay/{instance}".encode()).hexdigest()[:8]
    return f"wvx{digest}"
