"""The VXLAN overlay's shared facts: what the orchestrator creates and the ipsec service must know."""

from __future__ import annotations

import hashlib

__all__ = ["overlay_ifname"]


def overlay_ifname(instance: str) -> str:
    """The instance's VXLAN device: one per instance, named from the instance so two never collide."""
    digest = hashlib.sha256(f"overlay/{instance}".encode()).hexdigest()[:8]
    return f"wvx{digest}"
