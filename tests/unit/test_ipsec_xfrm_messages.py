"""NETLINK_XFRM message encoding: the C layouts of include/uapi/linux/xfrm.h, byte for byte."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

from services.common.datapath import XfrmMark
from services.ipsec import xfrm
from services.ipsec.defs import STATE_MARK_MASK, decrypt_mark, encrypt_mark
from services.ipsec.keys import Cipher, Key

A, B = ipaddress.ip_address("10.99.0.1"), ipaddress.ip_address("10.99.0.2")
NLA_HDR = struct.Struct("=HH")


def _encode(msg: Any, msg_type: int) -> bytes:
    msg["header"] = {"type": msg_type, "flags": 5}
    msg.encode()
    return bytes(msg.data)


def _attrs(raw: bytes, offset: int) -> dict[int, bytes]:
    out = {}
    while offset + 4 <= len(raw):
        length, kind = NLA_HDR.unpack_from(raw, offset)
        out[kind] = raw[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    return out


def test_struct_sizes_match_the_kernel() -> None:
    sizes = {xfrm.UserSaInfo: 224, xfrm.UserSaId: 24, xfrm.UserPolicyInfo: 168, xfrm.UserPolicyId: 64}
    for cls, size in sizes.items():
        assert len(_encode(xfrm._new(cls), 0)) - 16 == size, cls.__name__


def test_marks_carry_the_spi_and_node_as_cilium_does() -> None:
    assert encrypt_mark(2, 3) == 0x23E00 and encrypt_mark(2, 3) & 0xF00 == XfrmMark.ENCRYPT
    assert decrypt_mark(7) == 0x70D00
    assert STATE_MARK_MASK == 0xFFFFFF00
    assert encrypt_mark(2, 3) & STATE_MARK_MASK != encrypt_mark(2, 4) & STATE_MARK_MASK  # a state per key


def test_a_state_message_is_tunnel_mode_esp_with_its_mark() -> None:
    alg = Key(3, Cipher.GCM, bytes(range(20))).pair_algorithm(1, 2)
    state = xfrm.State(A, B, 3, 0x5EED, xfrm.Mark(encrypt_mark(2, 3), STATE_MARK_MASK), alg)
    raw = _encode(xfrm.state_message(state), xfrm.XFRM_MSG_NEWSA)
    body = raw[16:]
    assert body[56:60] == B.packed and struct.unpack("!I", body[72:76])[0] == 3 and body[76] == 50  # id
    assert body[80:84] == A.packed  # saddr
    reqid, family, mode = struct.unpack_from("=IHB", body, 208)
    assert (reqid, family, mode) == (0x5EED, socket.AF_INET, xfrm.MODE_TUNNEL)
    attrs = _attrs(raw, 16 + 224)
    assert struct.unpack("=II", attrs[21]) == (0x23E00, STATE_MARK_MASK)
    assert attrs[18][:17] == b"rfc4106(gcm(aes))" and attrs[18][72:] == alg.key


def test_a_policy_message_has_its_selector_template_and_mark() -> None:
    policy = xfrm.Policy(
        xfrm.DIR_OUT,
        ipaddress.ip_network("0.0.0.0/0"),
        ipaddress.ip_network("198.18.2.0/24"),
        100,
        xfrm.Mark(encrypt_mark(2, 3), STATE_MARK_MASK),
        (A, B),
        0x5EED,
    )
    raw = _encode(xfrm.policy_message(policy), xfrm.XFRM_MSG_UPDPOLICY)
    body = raw[16:]
    assert body[0:4] == bytes([198, 18, 2, 0]) and body[42] == 24 and body[43] == 0  # daddr/24, saddr/0
    priority, _, direction, action = struct.unpack_from("=IIBB", body, 152)
    assert (priority, direction, action) == (100, xfrm.DIR_OUT, xfrm.ACTION_ALLOW)
    attrs = _attrs(raw, 16 + 168)
    dst, spi, proto, family, src, reqid, mode, _, optional, *algs = xfrm.TMPL.unpack(attrs[5])
    assert (dst[:4], spi, src[:4], proto, family, reqid, mode, optional) == (
        B.packed, 0, A.packed, 50, socket.AF_INET, 0x5EED, xfrm.MODE_TUNNEL, 0,
    )  # fmt: skip
    assert algs == [0xFFFFFFFF] * 3  # any algorithm, else an AEAD state never matches the template
    assert struct.unpack("=II", attrs[21]) == (0x23E00, STATE_MARK_MASK)


def test_a_block_policy_has_no_template() -> None:
    any4 = ipaddress.ip_network("0.0.0.0/0")
    policy = xfrm.Policy(xfrm.DIR_OUT, any4, any4, 200, xfrm.Mark(XfrmMark.ENCRYPT, 0xF00), None)
    raw = _encode(xfrm.policy_message(policy), xfrm.XFRM_MSG_UPDPOLICY)
    assert raw[16 + 152 + 9] == xfrm.ACTION_BLOCK
    assert 5 not in _attrs(raw, 16 + 168)


def test_states_never_expire_by_time_and_have_no_byte_or_packet_limit() -> None:
    alg = Key(1, Cipher.GCM, bytes(range(20))).pair_algorithm(1, 2)
    state = xfrm.State(A, B, 1, 0x5EED, xfrm.Mark(encrypt_mark(2, 1), STATE_MARK_MASK), alg)
    body = _encode(xfrm.state_message(state), xfrm.XFRM_MSG_NEWSA)[16:]
    limits = struct.unpack_from("=8Q", body, 96)  # struct xfrm_lifetime_cfg after sel, id, saddr
    assert limits[:4] == (xfrm.XFRM_INF,) * 4  # bytes and packets, soft and hard
    assert limits[4:] == (0, 0, 0, 0)  # add and use expiry: 0 is never (a huge value overflows: expired at once)


def test_a_vxlan_selector_carries_udp_and_the_destination_port_and_a_bypass_policy_allows_without_template() -> None:
    policy = xfrm.Policy(
        xfrm.DIR_OUT, ipaddress.ip_network(f"{A}/32"), ipaddress.ip_network(f"{B}/32"), 100,
        xfrm.Mark(encrypt_mark(2, 3), STATE_MARK_MASK), (A, B), 0x5EED, 17, 8472,
    )  # fmt: skip
    body = _encode(xfrm.policy_message(policy), xfrm.XFRM_MSG_UPDPOLICY)[16:]
    dport, dport_mask, sport, sport_mask = struct.unpack_from(">HHHH", body, 32)
    assert (dport, dport_mask, sport, sport_mask) == (8472, 0xFFFF, 0, 0)  # any source port (a hash of the flow)
    assert (body[42], body[43], body[44]) == (32, 32, 17)
    bypass = xfrm.Policy(
        xfrm.DIR_OUT, ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("198.18.2.0/24"), 110,
        xfrm.Mark(encrypt_mark(2, 3), STATE_MARK_MASK), None, bypass=True,
    )  # fmt: skip
    raw = _encode(xfrm.policy_message(bypass), xfrm.XFRM_MSG_UPDPOLICY)
    assert raw[16 + 152 + 9] == xfrm.ACTION_ALLOW and 5 not in _attrs(raw, 16 + 168)
    assert raw[16 + 44] == 0 and struct.unpack_from(">H", raw, 16 + 34)[0] == 0  # any protocol, any port
