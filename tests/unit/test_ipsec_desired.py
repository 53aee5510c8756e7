"""What the Ipsec class asks of the kernel for a peer: states and policies per key, as xfrm looks them up."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

from services.common.datapath import VXLAN_PORT, XFRM_MARK_MASK, XfrmMark
from services.ipsec import xfrm
from services.ipsec.ipsec import Ipsec, LocalNode, Peer
from services.ipsec.keys import Cipher, Key

LOCAL = LocalNode("a", 1, ipaddress.ip_address("10.99.0.1"))
PEER = Peer("b", 2, ipaddress.ip_address("10.99.0.2"), (ipaddress.ip_network("198.18.2.0/24"),), spi=1)


def _ipsec(*spis: int, overlay_device: str = "lo") -> Ipsec:
    """`overlay_device` stands in for the VXLAN device (lo exists in every namespace, index 1)."""
    ipsec = Ipsec(maps=Any, store=Any, key_dir=Path("/nonexistent"), overlay_device=overlay_device)  # type: ignore[arg-type]
    ipsec._secrets = {spi: Key(spi, Cipher.GCM, bytes([spi]) * 20) for spi in spis}
    return ipsec


def test_each_key_has_an_out_policy_with_exactly_its_states_mark() -> None:
    """xfrm_state_find matches OUT states against the policy's mark, not the packet's."""
    want = _ipsec(1, 2)._desired(LOCAL, [PEER])
    out_states = [s for s in want.states.values() if s.mark.value & XFRM_MARK_MASK == XfrmMark.ENCRYPT]
    out_policies = [p for p in want.policies.values() if p.direction == xfrm.DIR_OUT]
    assert sorted(s.spi for s in out_states) == [1, 2]
    assert {p.mark for p in out_policies} == {s.mark for s in out_states}
    for state in out_states:
        assert state.mark.value == 2 << 16 | state.spi << 12 | XfrmMark.ENCRYPT
        assert (state.src, state.dst) == (LOCAL.underlay, PEER.underlay)


def test_in_states_are_found_by_the_decrypt_mark_of_the_peer_and_take_its_direction_key() -> None:
    ipsec = _ipsec(1)
    want = ipsec._desired(LOCAL, [PEER])
    in_states = [s for s in want.states.values() if s.mark.value & XFRM_MARK_MASK == XfrmMark.DECRYPT]
    assert len(in_states) == 1 and in_states[0].mark.value == 2 << 16 | XfrmMark.DECRYPT
    assert (in_states[0].src, in_states[0].dst) == (PEER.underlay, LOCAL.underlay)
    out_state = next(s for s in want.states.values() if s not in in_states)
    assert in_states[0].algorithm is not None and out_state.algorithm is not None
    assert in_states[0].algorithm.key != out_state.algorithm.key  # a key per direction
    assert in_states[0].algorithm.key == ipsec._secrets[1].pair_algorithm(2, 1).key  # what the peer sends with


def test_decrypted_traffic_has_required_in_and_fwd_policies_from_the_peers_range() -> None:
    want = _ipsec(1)._desired(LOCAL, [PEER])
    inbound = [p for p in want.policies.values() if p.direction in (xfrm.DIR_IN, xfrm.DIR_FWD)]
    assert sorted(p.direction for p in inbound) == [xfrm.DIR_IN, xfrm.DIR_FWD]
    assert all(p.src == PEER.cidrs[0] and p.tmpl == (PEER.underlay, LOCAL.underlay) for p in inbound)


def test_without_a_key_nothing_is_installed_for_the_peer_but_its_inbound_policies() -> None:
    want = _ipsec()._desired(LOCAL, [PEER])
    assert not want.states
    assert all(p.direction != xfrm.DIR_OUT for p in want.policies.values())


OVERLAY_PEER = Peer(
    "b", 2, ipaddress.ip_address("10.99.0.2"), (ipaddress.ip_network("198.18.2.0/24"),), spi=1, vxlan=True
)


def test_an_overlay_peer_has_its_vxlan_packets_encrypted_per_key_and_its_endpoint_packets_passed() -> None:
    """The endpoint packet keeps its mark into the VXLAN device; the VXLAN packet's lookup carries it."""
    want = _ipsec(1, 2)._desired(LOCAL, [OVERLAY_PEER])
    out = [p for p in want.policies.values() if p.direction == xfrm.DIR_OUT]
    vxlan = [p for p in out if p.tmpl is not None]
    assert sorted(p.mark.value >> 12 & 0xF for p in vxlan) == [1, 2]
    for p in vxlan:
        assert (p.src, p.dst) == (ipaddress.ip_network("10.99.0.1/32"), ipaddress.ip_network("10.99.0.2/32"))
        assert (p.proto, p.dport) == (17, VXLAN_PORT) and p.tmpl == (LOCAL.underlay, OVERLAY_PEER.underlay)
    bypass = [p for p in out if p.bypass]
    assert {p.mark for p in bypass} == {p.mark for p in vxlan}
    assert all(p.dst == OVERLAY_PEER.cidrs[0] and p.action == xfrm.ACTION_ALLOW for p in bypass)
    assert bypass and {p.ifindex for p in bypass} == {socket.if_nametoindex("lo")}  # only into the device
    # nothing encrypts the endpoint packet itself: it would leave as ESP without its VNI
    assert not [p for p in out if p.tmpl is not None and p.dst == OVERLAY_PEER.cidrs[0]]


def test_without_the_vxlan_device_an_overlay_peers_endpoint_packets_pass_nowhere() -> None:
    """Fail closed: with no device to bind the pass to, they meet the default-drop policy."""
    want = _ipsec(1, overlay_device="wvx-missing")._desired(LOCAL, [OVERLAY_PEER])
    assert not [p for p in want.policies.values() if p.bypass]
    assert [p for p in want.policies.values() if p.tmpl is not None and p.dport == VXLAN_PORT]


def test_an_overlay_peer_blocks_unmarked_vxlan_and_requires_esp_for_vxlan_from_it_even_without_keys() -> None:
    for spis in ((), (1,)):
        want = _ipsec(*spis)._desired(LOCAL, [OVERLAY_PEER])
        block = [p for p in want.policies.values() if p.direction == xfrm.DIR_OUT and p.action == xfrm.ACTION_BLOCK]
        assert len(block) == 1 and block[0].mark == xfrm.Mark(0, 0) and block[0].dport == VXLAN_PORT
        assert all(block[0].priority > p.priority for p in want.policies.values() if p.tmpl is not None)
        inbound = [p for p in want.policies.values() if p.direction != xfrm.DIR_OUT]
        assert len(inbound) == 1 and inbound[0].direction == xfrm.DIR_IN
        assert inbound[0].src == ipaddress.ip_network("10.99.0.2/32") and inbound[0].dport == VXLAN_PORT
        assert inbound[0].tmpl == (OVERLAY_PEER.underlay, LOCAL.underlay)
        # the block and IN policies come first: added before anything marked can use the peer's keys
        assert list(want.policies.values())[:2] == [block[0], inbound[0]]
