"""NETLINK_XFRM message encoding: the C layouts of include/uapi/linux/xfrm.h, byte for byte."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

import pytest

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
        xfrm.Mark(encrypt_mark(2, 3), STATE_MARK_MASK), None, bypass=True, ifindex=7,
    )  # fmt: skip
    raw = _encode(xfrm.policy_message(bypass), xfrm.XFRM_MSG_UPDPOLICY)
    assert raw[16 + 152 + 9] == xfrm.ACTION_ALLOW and 5 not in _attrs(raw, 16 + 168)
    assert raw[16 + 44] == 0 and struct.unpack_from(">H", raw, 16 + 34)[0] == 0  # any protocol, any port
    # the selector's ifindex (after family, lengths, proto and padding): only packets routed out of device 7
    assert struct.unpack_from("=i", raw, 16 + 48)[0] == 7 and struct.unpack_from("=i", body, 48)[0] == 0
    deleted = _encode(xfrm.policy_id_message(bypass), xfrm.XFRM_MSG_DELPOLICY)
    assert struct.unpack_from("=i", deleted, 16 + 48)[0] == 7  # a delete names the same selector


def _state(spi: int = 3, **kw: Any) -> xfrm.State:
    alg = Key(spi, Cipher.GCM, bytes(range(20))).pair_algorithm(1, 2)
    return xfrm.State(A, B, spi, 0x5EED, xfrm.Mark(encrypt_mark(2, spi), STATE_MARK_MASK), alg, **kw)


def test_a_state_has_a_1024_packet_bitmap_replay_window_and_the_legacy_field_zero() -> None:
    raw = _encode(xfrm.state_message(_state()), xfrm.XFRM_MSG_NEWSA)
    _, _, _, replay_window, flags = struct.unpack_from("=IHBBB", raw, 16 + 208)
    assert replay_window == 0  # the kernel refuses an ESN attribute beside a legacy window
    # no ESN flag; AF_UNSPEC keeps the selector's family 0: an IPv6 packet may cross an IPv4 tunnel
    assert flags == xfrm.XFRM_STATE_AF_UNSPEC
    esn = _attrs(raw, 16 + 224)[23]  # XFRMA_REPLAY_ESN_VAL
    bmp_len, oseq, seq, oseq_hi, seq_hi, window = struct.unpack_from("=6I", esn)
    assert (bmp_len, oseq, seq, oseq_hi, seq_hi, window) == (32, 0, 0, 0, 0, 1024)
    assert esn[24:] == bytes(128)  # the whole bitmap: the kernel copies bmp_len words from the attribute
    assert 10 not in _attrs(raw, 16 + 224)  # no legacy XFRMA_REPLAY_VAL


def test_a_carried_sequence_number_is_where_the_new_state_starts() -> None:
    esn = _attrs(_encode(xfrm.state_message(_state(oseq=52_464)), xfrm.XFRM_MSG_NEWSA), 16 + 224)[23]
    assert struct.unpack_from("=6I", esn)[1] == 52_464
    esn = _attrs(_encode(xfrm.state_message(_state(oseq=(7 << 32) + 9)), xfrm.XFRM_MSG_NEWSA), 16 + 224)[23]
    assert struct.unpack_from("=6I", esn)[1:4] == (9, 0, 7)  # oseq, seq, oseq_hi


def test_replay_protection_cannot_be_turned_off_or_exceed_the_kernel_bitmap() -> None:
    for window in (0, -1, 4096 * 8 + 1):
        with pytest.raises(ValueError, match="replay window"):
            xfrm.state_message(_state(replay_window=window))
    esn = _attrs(_encode(xfrm.state_message(_state(replay_window=100)), xfrm.XFRM_MSG_NEWSA), 16 + 224)[23]
    assert struct.unpack_from("=I", esn)[0] == 4 and len(esn) == 24 + 16  # rounded up to whole 32-bit words


def _decoded(raw: bytes) -> xfrm.State:
    msg = xfrm.UserSaInfo(raw)
    msg.decode()
    return xfrm._state_of(msg)


def test_the_sequence_number_is_read_back_from_the_bitmap_or_the_legacy_replay_state() -> None:
    got = _decoded(_encode(xfrm.state_message(_state(oseq=1234)), xfrm.XFRM_MSG_NEWSA))
    assert (got.oseq, got.replay_window, got.spi, got.dst) == (1234, 1024, 3, B)
    assert got.algorithm is None  # a reply's key is never parsed
    legacy = xfrm.state_message(_state())
    legacy["replay_window"] = 32
    legacy["attrs"] = [("XFRMA_MARK", {"v": encrypt_mark(2, 3), "m": STATE_MARK_MASK}),
                       ("XFRMA_REPLAY_VAL", xfrm.REPLAY.pack(4321, 0, 0))]  # fmt: skip
    got = _decoded(_encode(legacy, xfrm.XFRM_MSG_NEWSA))
    assert (got.oseq, got.replay_window) == (4321, 32)  # a state an older version installed


def test_reading_one_state_names_it_by_daddr_spi_and_mark() -> None:
    raw = _encode(xfrm.state_id_message(_state()), xfrm.XFRM_MSG_GETSA)
    assert raw[16:20] == B.packed and struct.unpack_from(">I", raw, 32)[0] == 3  # daddr, spi (network order)
    assert struct.unpack_from("=HB", raw, 36) == (socket.AF_INET, 50)  # family, ESP
    assert struct.unpack("=II", _attrs(raw, 16 + 24)[21]) == (encrypt_mark(2, 3), STATE_MARK_MASK)
