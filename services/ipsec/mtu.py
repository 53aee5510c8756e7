"""The VXLAN device's MTU when its packets are encrypted: room for ESP as well as VXLAN.

The orchestrator makes the overlay device with the underlay's MTU less the VXLAN
overhead. An encrypted VXLAN packet is wrapped once more (ESP in tunnel mode), so a
full-size one would be fragmented on the underlay. While any overlay peer is
encrypted, the ipsec service lowers the device's MTU to what still fits after ESP,
for the most demanding cipher it holds a key of; senders learn it by path MTU
discovery. A device the orchestrator makes again gets it again (the periodic resync).
"""

from __future__ import annotations

from collections.abc import Iterable

from pyroute2 import IPRoute

from services.common.overlay import VXLAN6_OVERHEAD, VXLAN_OVERHEAD
from services.common.validate import Address
from services.ipsec.keys import Cipher

DEFAULT_UNDERLAY_MTU = 1500


def encrypted_overlay_mtu(underlay_mtu: int, outer_version: int, ciphers: Iterable[Cipher]) -> int:
    """The overlay MTU that leaves room for VXLAN and ESP, for every one of `ciphers`."""
    vxlan = VXLAN_OVERHEAD if outer_version == 4 else VXLAN6_OVERHEAD
    return min(c.max_inner(underlay_mtu, outer_version) for c in ciphers) - vxlan


def underlay_mtu(ipr: IPRoute, underlay: Address) -> int:
    """The MTU of the device holding the local underlay address (1500 when none holds it)."""
    for addr in ipr.get_addr():
        if str(addr.get_attr("IFA_ADDRESS")) == str(underlay):
            return int(ipr.get_links(addr["index"])[0].get_attr("IFLA_MTU"))
    return DEFAULT_UNDERLAY_MTU


def device_mtu(ipr: IPRoute, ifindex: int) -> int:
    return int(ipr.get_links(ifindex)[0].get_attr("IFLA_MTU"))


def fit_overlay(ifindex: int, underlay: Address, ciphers: Iterable[Cipher]) -> tuple[int, int]:
    """Set the overlay device's MTU for encryption if it is not that already; (before, after)."""
    with IPRoute() as ipr:
        wanted = encrypted_overlay_mtu(underlay_mtu(ipr, underlay), underlay.version, ciphers)
        current = device_mtu(ipr, ifindex)
        if current != wanted:
            ipr.link("set", index=ifindex, mtu=wanted)
    return current, wanted
