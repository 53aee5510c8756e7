"""NETLINK_XFRM messages on pyroute2's netlink machinery (pyroute2 0.9 has no xfrm API).

Only what the ipsec service needs: add/update/delete/get/dump ESP states in tunnel mode
with a mark and a bitmap replay state (a window wider than the legacy field's 32),
add/update/delete/dump policies (OUT, IN, FWD, and a block policy), and a probe for
what the kernel lacks. The wire formats are those of `include/uapi/linux/xfrm.h`; each
struct is declared once as data below with the C layout quoted. Keys travel only inside
messages to the kernel: nothing here logs a message, and a dumped state's key attributes
are never parsed.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, nla, nlmsg
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nlsocket import NetlinkSocket

from services.common.validate import Address, Network

NETLINK_XFRM = 6
M = TypeVar("M")

XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A

DIR_IN, DIR_OUT, DIR_FWD = 0, 1, 2
ACTION_ALLOW, ACTION_BLOCK = 0, 1
MODE_TUNNEL = 1
# A state flag: keep the selector's family 0 (any inner family). Without it the kernel
# gives the selector the state's own family, and an IPv6 packet in an IPv4 tunnel (or the
# reverse) is taken for one of the outer family: not encrypted, or not decrypted, right.
XFRM_STATE_AF_UNSPEC = 32
IPPROTO_ESP = 50
ALL_ALGS = 0xFFFFFFFF


def _addr(address: Address | None) -> bytes:
    """An xfrm_address_t: 16 bytes, IPv4 in the first 4."""
    if address is None:
        return bytes(16)
    return address.packed.ljust(16, b"\0")


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


# struct xfrm_selector { xfrm_address_t daddr, saddr; __be16 dport, dport_mask, sport,
#   sport_mask; __u16 family; __u8 prefixlen_d, prefixlen_s, proto; int ifindex; __kernel_uid32_t user; }
SELECTOR_FIELDS = (
    ("sel_daddr", "16s"), ("sel_saddr", "16s"),
    ("sel_dport", ">H"), ("sel_dport_mask", ">H"), ("sel_sport", ">H"), ("sel_sport_mask", ">H"),
    ("sel_family", "H"), ("sel_prefixlen_d", "B"), ("sel_prefixlen_s", "B"), ("sel_proto", "B"),
    ("__sel_pad", "3x"), ("sel_ifindex", "i"), ("sel_user", "I"),
)  # fmt: skip
# struct xfrm_lifetime_cfg { __u64 soft/hard byte, packet limits, add and use expiry }
LIFETIME_CFG_FIELDS = tuple((f"lft_{n}", "Q") for n in ("sb", "hb", "sp", "hp", "sae", "hae", "sue", "hue"))
# struct xfrm_lifetime_cur { __u64 bytes, packets, add_time, use_time; }
LIFETIME_CUR_FIELDS = (("cur_bytes", "Q"), ("cur_packets", "Q"), ("cur_add_time", "Q"), ("cur_use_time", "Q"))


class _XfrmAttrs(nlmsg):  # type: ignore[misc]  # pyroute2 has no type hints
    """The attributes both states and policies carry."""

    nla_map = (
        (1, "XFRMA_ALG_AUTH", "cdata"),
        (2, "XFRMA_ALG_CRYPT", "cdata"),
        (5, "XFRMA_TMPL", "cdata"),
        (10, "XFRMA_REPLAY_VAL", "cdata"),
        (18, "XFRMA_ALG_AEAD", "cdata"),
        (20, "XFRMA_ALG_AUTH_TRUNC", "cdata"),
        (21, "XFRMA_MARK", "XfrmMarkAttr"),
        (23, "XFRMA_REPLAY_ESN_VAL", "cdata"),
        (16, "XFRMA_POLICY_TYPE", "cdata"),
    )

    class XfrmMarkAttr(nla):  # type: ignore[misc]
        fields = (("v", "I"), ("m", "I"))


def _new(cls: type[M]) -> M:
    """A message of `cls` with every field zero (pyroute2 leaves byte strings unset)."""
    msg: Any = cls()
    for name, fmt in cls.fields:  # type: ignore[attr-defined]
        if fmt.endswith("s"):
            msg[name] = bytes(int(fmt[:-1]))
        elif not fmt.endswith("x"):
            msg[name] = 0
    return msg  # type: ignore[no-any-return]


class UserSaInfo(_XfrmAttrs):
    """struct xfrm_usersa_info { sel; struct xfrm_id id (daddr, __be32 spi, __u8 proto); saddr;
    lft; curlft; struct xfrm_stats (replay_window, replay, integrity_failed); seq, reqid;
    __u16 family; __u8 mode, replay_window, flags; } (224 bytes on 64-bit)."""

    fields = (
        *SELECTOR_FIELDS,
        ("id_daddr", "16s"), ("id_spi", ">I"), ("id_proto", "B"), ("__id_pad", "3x"),
        ("saddr", "16s"),
        *LIFETIME_CFG_FIELDS,
        *LIFETIME_CUR_FIELDS,
        ("stats_replay_window", "I"), ("stats_replay", "I"), ("stats_integrity_failed", "I"),
        ("seq", "I"), ("reqid", "I"), ("family", "H"), ("mode", "B"), ("replay_window", "B"),
        ("flags", "B"), ("__pad", "7x"),
    )  # fmt: skip


class UserSaId(_XfrmAttrs):
    """struct xfrm_usersa_id { xfrm_address_t daddr; __be32 spi; __u16 family; __u8 proto; } (24 bytes)."""

    fields = (("daddr", "16s"), ("spi", ">I"), ("family", "H"), ("proto", "B"), ("__pad", "x"))


class UserPolicyInfo(_XfrmAttrs):
    """struct xfrm_userpolicy_info { sel; lft; curlft; __u32 priority, index; __u8 dir, action,
    flags, share; } (168 bytes on 64-bit)."""

    fields = (
        *SELECTOR_FIELDS,
        *LIFETIME_CFG_FIELDS,
        *LIFETIME_CUR_FIELDS,
        ("priority", "I"), ("index", "I"), ("dir", "B"), ("action", "B"), ("flags", "B"), ("share", "B"),
        ("__pad", "4x"),
    )  # fmt: skip


class UserPolicyId(_XfrmAttrs):
    """struct xfrm_userpolicy_id { struct xfrm_selector sel; __u32 index; __u8 dir; } (64 bytes)."""

    fields = (*SELECTOR_FIELDS, ("index", "I"), ("dir", "B"), ("__pad", "3x"))


# struct xfrm_user_tmpl { struct xfrm_id id; __u16 family; xfrm_address_t saddr; __u32 reqid;
#   __u8 mode, share, optional; __u32 aalgos, ealgos, calgos; } (64 bytes)
TMPL = struct.Struct("=16sIB3xH2x16sIBBBxIII")
# struct xfrm_algo_aead { char alg_name[64]; unsigned int alg_key_len, alg_icv_len; char alg_key[]; }
AEAD_HEAD = struct.Struct("=64sII")
# struct xfrm_algo { char alg_name[64]; unsigned int alg_key_len; char alg_key[]; }
ALGO_HEAD = struct.Struct("=64sI")
# struct xfrm_algo_auth { char alg_name[64]; unsigned int alg_key_len, alg_trunc_len; char alg_key[]; }
AUTH_HEAD = AEAD_HEAD
# struct xfrm_replay_state { __u32 oseq, seq, bitmap; } (XFRMA_REPLAY_VAL: the legacy replay state)
REPLAY = struct.Struct("=III")
# struct xfrm_replay_state_esn { unsigned int bmp_len; __u32 oseq, seq, oseq_hi, seq_hi, replay_window;
#   __u32 bmp[]; } (XFRMA_REPLAY_ESN_VAL; bmp_len counts 32-bit words)
REPLAY_ESN_HEAD = struct.Struct("=IIIIII")
# The kernel takes at most XFRMA_REPLAY_ESN_MAX (4096) bytes of bitmap, 32768 packets; the legacy
# xfrm_usersa_info.replay_window is capped at 32, too narrow for packets two CPUs reorder under load.
REPLAY_WINDOW = 1024
MAX_REPLAY_WINDOW = 4096 * 8

assert TMPL.size == 64 and AEAD_HEAD.size == 72 and REPLAY_ESN_HEAD.size == 24


class XfrmError(OSError):
    """The kernel refused an xfrm request; `.errno` is its answer."""


@dataclass(frozen=True)
class Mark:
    value: int
    mask: int


@dataclass(frozen=True)
class Algorithm:
    """How a state encrypts: an AEAD (name, key, ICV bits) or a cipher and an authenticator."""

    name: str
    key: bytes = field(repr=False)
    icv_bits: int = 0  # AEAD only
    auth_name: str = ""  # cipher + auth only
    auth_key: bytes = field(default=b"", repr=False)
    auth_trunc_bits: int = 0

    def attrs(self) -> list[tuple[str, bytes]]:
        if self.icv_bits:
            head = AEAD_HEAD.pack(self.name.encode(), len(self.key) * 8, self.icv_bits)
            return [("XFRMA_ALG_AEAD", head + self.key)]
        crypt = ALGO_HEAD.pack(self.name.encode(), len(self.key) * 8) + self.key
        auth = AUTH_HEAD.pack(self.auth_name.encode(), len(self.auth_key) * 8, self.auth_trunc_bits) + self.auth_key
        return [("XFRMA_ALG_CRYPT", crypt), ("XFRMA_ALG_AUTH_TRUNC", auth)]


@dataclass(frozen=True)
class State:
    """An ESP state in tunnel mode between two underlay addresses, found by its mark."""

    src: Address
    dst: Address
    spi: int
    reqid: int
    mark: Mark
    algorithm: Algorithm | None = field(default=None, repr=False)  # None: a dumped state (keys not read)
    replay_window: int = REPLAY_WINDOW  # packets the anti-replay bitmap covers (never 0: replay protection stays on)
    oseq: int = 0  # the last output sequence number: a new state's packets go out from oseq + 1
    packets: int = 0
    bytes: int = 0
    integrity_failed: int = 0
    replay: int = 0
    any_family: bool = True  # its selector takes either inner family (read back: the kernel's selector family is 0)


@dataclass(frozen=True)
class Policy:
    """A policy: `tmpl` is (src, dst) of the ESP tunnel, or None for a block (or, `bypass`, a pass) policy.

    `proto` and `dport` narrow the selector (0: any), e.g. to the VXLAN packets between two nodes.
    """

    direction: int
    src: Network
    dst: Network
    priority: int
    mark: Mark
    tmpl: tuple[Address, Address] | None
    reqid: int = 0
    proto: int = 0
    dport: int = 0
    bypass: bool = False  # no template and ALLOW: matching packets pass untransformed
    ifindex: int = 0  # only packets routed out of this device (0: any)

    @property
    def action(self) -> int:
        return ACTION_ALLOW if self.tmpl is not None or self.bypass else ACTION_BLOCK


def _selector(msg: nlmsg, src: Network, dst: Network, proto: int = 0, dport: int = 0, ifindex: int = 0) -> None:
    msg["sel_daddr"] = _addr(dst.network_address)
    msg["sel_saddr"] = _addr(src.network_address)
    msg["sel_family"] = _family(dst.version)
    msg["sel_prefixlen_d"] = dst.prefixlen
    msg["sel_prefixlen_s"] = src.prefixlen
    msg["sel_proto"] = proto
    msg["sel_ifindex"] = ifindex  # matched against the route's output device (flowi_oif)
    if dport:
        msg["sel_dport"] = dport
        msg["sel_dport_mask"] = 0xFFFF


XFRM_INF = 0xFFFFFFFFFFFFFFFF


def _no_limits(msg: nlmsg) -> None:
    """No byte or packet limit (XFRM_INF); the expiry times stay 0 (never): a huge time would overflow."""
    for name in ("lft_sb", "lft_hb", "lft_sp", "lft_hp"):
        msg[name] = XFRM_INF


def _any(version: int) -> Network:
    return ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0")


def replay_esn(window: int, oseq: int = 0) -> bytes:
    """An XFRMA_REPLAY_ESN_VAL without the ESN flag: the kernel's bitmap replay mode (XFRM_REPLAY_MODE_BMP).

    The kernel accepts it when xfrm_usersa_info.replay_window is 0 and the window fits the
    bitmap (verify_replay, xfrm_alloc_replay_state_esn, xfrm_init_replay); the bitmap is
    sent whole (zeros), as the kernel copies bmp_len words from the attribute.
    """
    if not 0 < window <= MAX_REPLAY_WINDOW:
        raise ValueError(f"replay window {window} is outside 1..{MAX_REPLAY_WINDOW} (0 would turn anti-replay off)")
    words = (window + 31) // 32
    return REPLAY_ESN_HEAD.pack(words, oseq & 0xFFFFFFFF, 0, oseq >> 32, 0, window) + bytes(4 * words)


def state_message(state: State) -> UserSaInfo:
    """The XFRM_MSG_NEWSA / UPDSA payload of a state (carries its key: never log it)."""
    if state.algorithm is None:
        raise ValueError("a state to install needs its algorithm")
    msg = _new(UserSaInfo)
    any_net = _any(state.dst.version)
    _selector(msg, any_net, any_net)
    msg["sel_family"] = 0  # a tunnel-mode state: the selector matches any inner family
    msg["id_daddr"] = _addr(state.dst)
    msg["id_spi"] = state.spi
    msg["id_proto"] = IPPROTO_ESP
    msg["saddr"] = _addr(state.src)
    _no_limits(msg)
    msg["reqid"] = state.reqid
    msg["family"] = _family(state.dst.version)
    msg["mode"] = MODE_TUNNEL
    msg["replay_window"] = 0  # the window is the bitmap's (XFRMA_REPLAY_ESN_VAL): the kernel wants 0 here
    msg["flags"] = XFRM_STATE_AF_UNSPEC
    msg["attrs"] = [
        *state.algorithm.attrs(),
        ("XFRMA_MARK", {"v": state.mark.value, "m": state.mark.mask}),
        ("XFRMA_REPLAY_ESN_VAL", replay_esn(state.replay_window, state.oseq)),
    ]
    return msg


def state_id_message(state: State) -> UserSaId:
    msg = _new(UserSaId)
    msg["daddr"] = _addr(state.dst)
    msg["spi"] = state.spi
    msg["family"] = _family(state.dst.version)
    msg["proto"] = IPPROTO_ESP
    msg["attrs"] = [("XFRMA_MARK", {"v": state.mark.value, "m": state.mark.mask})]
    return msg


def policy_message(policy: Policy) -> UserPolicyInfo:
    msg = _new(UserPolicyInfo)
    _selector(msg, policy.src, policy.dst, policy.proto, policy.dport, policy.ifindex)
    _no_limits(msg)
    msg["priority"] = policy.priority
    msg["dir"] = policy.direction
    msg["action"] = policy.action
    attrs: list[tuple[str, Any]] = [("XFRMA_MARK", {"v": policy.mark.value, "m": policy.mark.mask})]
    if policy.tmpl is not None:
        src, dst = policy.tmpl
        tmpl = TMPL.pack(
            _addr(dst), 0, IPPROTO_ESP, _family(dst.version), _addr(src), policy.reqid, MODE_TUNNEL, 0, 0,
            ALL_ALGS, ALL_ALGS, ALL_ALGS,
        )  # fmt: skip
        attrs.insert(0, ("XFRMA_TMPL", tmpl))
    msg["attrs"] = attrs
    return msg


def policy_id_message(policy: Policy) -> UserPolicyId:
    msg = _new(UserPolicyId)
    _selector(msg, policy.src, policy.dst, policy.proto, policy.dport, policy.ifindex)
    msg["dir"] = policy.direction
    msg["attrs"] = [("XFRMA_MARK", {"v": policy.mark.value, "m": policy.mark.mask})]
    return msg


def _address(raw: bytes, family: int) -> Address:
    return ipaddress.ip_address(raw[:4] if family == socket.AF_INET else raw)


def _network(raw: bytes, family: int, prefixlen: int) -> Network:
    return ipaddress.ip_network(f"{_address(raw, family)}/{prefixlen}", strict=False)


def _mark(msg: nlmsg) -> Mark:
    mark = msg.get_attr("XFRMA_MARK")
    return Mark(int(mark["v"]), int(mark["m"])) if mark else Mark(0, 0)


def _replay_of(msg: UserSaInfo) -> tuple[int, int]:
    """(window, oseq) of a state from the kernel: the bitmap replay state if it has one, else the legacy one."""
    esn = msg.get_attr("XFRMA_REPLAY_ESN_VAL")
    if esn and len(bytes(esn)) >= REPLAY_ESN_HEAD.size:
        _, oseq, _, oseq_hi, _, window = REPLAY_ESN_HEAD.unpack(bytes(esn)[: REPLAY_ESN_HEAD.size])
        return int(window), int(oseq_hi) << 32 | int(oseq)
    legacy = msg.get_attr("XFRMA_REPLAY_VAL")
    oseq = REPLAY.unpack(bytes(legacy)[: REPLAY.size])[0] if legacy and len(bytes(legacy)) >= REPLAY.size else 0
    return int(msg["replay_window"]), int(oseq)


def _state_of(msg: UserSaInfo) -> State:
    family = int(msg["family"])
    window, oseq = _replay_of(msg)
    return State(
        src=_address(msg["saddr"], family),
        dst=_address(msg["id_daddr"], family),
        spi=int(msg["id_spi"]),
        reqid=int(msg["reqid"]),
        mark=_mark(msg),
        replay_window=window,
        oseq=oseq,
        packets=int(msg["cur_packets"]),
        bytes=int(msg["cur_bytes"]),
        integrity_failed=int(msg["stats_integrity_failed"]),
        replay=int(msg["stats_replay"]),
        any_family=int(msg["sel_family"]) == 0,
    )


def _policy_of(msg: UserPolicyInfo) -> Policy:
    family = int(msg["sel_family"])
    tmpl_hex = msg.get_attr("XFRMA_TMPL")
    tmpl = None
    reqid = 0
    if tmpl_hex and int(msg["action"]) == ACTION_ALLOW:
        raw = bytes(tmpl_hex)
        dst, _, _, tfamily, src, reqid, *_ = TMPL.unpack(raw[: TMPL.size])
        tmpl = (_address(src, tfamily), _address(dst, tfamily))
    return Policy(
        direction=int(msg["dir"]),
        src=_network(msg["sel_saddr"], family, int(msg["sel_prefixlen_s"])),
        dst=_network(msg["sel_daddr"], family, int(msg["sel_prefixlen_d"])),
        priority=int(msg["priority"]),
        mark=_mark(msg),
        tmpl=tmpl,
        reqid=reqid,
        proto=int(msg["sel_proto"]),
        dport=int(msg["sel_dport"]) if int(msg["sel_dport_mask"]) else 0,
        bypass=tmpl is None and int(msg["action"]) == ACTION_ALLOW,
        ifindex=int(msg["sel_ifindex"]),
    )


class Xfrm:
    """One NETLINK_XFRM socket in the caller's network namespace."""

    def __init__(self) -> None:
        try:
            self._sock = NetlinkSocket(family=NETLINK_XFRM, ext_ack=True)
        except OSError as exc:  # EPROTONOSUPPORT: no xfrm_user in the kernel
            raise XfrmError(exc.errno, f"cannot open a NETLINK_XFRM socket: {exc.strerror}") from None
        self._sock.bind()
        self._sock.marshal.msg_map.update({XFRM_MSG_NEWSA: UserSaInfo, XFRM_MSG_NEWPOLICY: UserPolicyInfo})

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Xfrm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, msg: nlmsg, msg_type: int, flags: int) -> list[nlmsg]:
        try:
            return list(self._sock.nlm_request(msg, msg_type=msg_type, msg_flags=flags))
        except NetlinkError as exc:
            raise XfrmError(exc.code, f"{_NAMES.get(msg_type, msg_type)}: {errno.errorcode.get(exc.code, exc.code)} "
                            f"({exc.code}: {exc.args[1] if len(exc.args) > 1 else ''})") from None  # fmt: skip

    def add_state(self, state: State, update: bool = False) -> None:
        """Install a state; `update` replaces one with the same (daddr, spi, mark) in place."""
        flags = NLM_F_REQUEST | NLM_F_ACK | (0 if update else NLM_F_CREATE | NLM_F_EXCL)
        self._request(state_message(state), XFRM_MSG_UPDSA if update else XFRM_MSG_NEWSA, flags)

    def delete_state(self, state: State) -> None:
        self._request(state_id_message(state), XFRM_MSG_DELSA, NLM_F_REQUEST | NLM_F_ACK)

    def get_state(self, state: State) -> State:
        """The kernel's copy of one state (found by daddr, SPI and mark), with its counters and oseq."""
        for reply in self._request(state_id_message(state), XFRM_MSG_GETSA, NLM_F_REQUEST):
            if reply["header"]["type"] == XFRM_MSG_NEWSA:
                return _state_of(reply)
        raise XfrmError(errno.ESRCH, "getting an xfrm state: the kernel sent no state")

    def states(self) -> Iterator[State]:
        msg = _new(UserSaId)
        for reply in self._request(msg, XFRM_MSG_GETSA, NLM_F_REQUEST | NLM_F_DUMP):
            if reply["header"]["type"] == XFRM_MSG_NEWSA:
                yield _state_of(reply)

    def add_policy(self, policy: Policy, update: bool = True) -> None:
        """Install or replace a policy (selector, direction and mark name it)."""
        flags = NLM_F_REQUEST | NLM_F_ACK | (0 if update else NLM_F_CREATE | NLM_F_EXCL)
        self._request(policy_message(policy), XFRM_MSG_UPDPOLICY if update else XFRM_MSG_NEWPOLICY, flags)

    def delete_policy(self, policy: Policy) -> None:
        self._request(policy_id_message(policy), XFRM_MSG_DELPOLICY, NLM_F_REQUEST | NLM_F_ACK)

    def policies(self) -> Iterator[Policy]:
        msg = _new(UserPolicyId)
        for reply in self._request(msg, XFRM_MSG_GETPOLICY, NLM_F_REQUEST | NLM_F_DUMP):
            if reply["header"]["type"] == XFRM_MSG_NEWPOLICY:
                yield _policy_of(reply)


_NAMES = {
    XFRM_MSG_NEWSA: "adding an xfrm state",
    XFRM_MSG_UPDSA: "updating an xfrm state",
    XFRM_MSG_DELSA: "deleting an xfrm state",
    XFRM_MSG_GETSA: "reading xfrm states",
    XFRM_MSG_NEWPOLICY: "adding an xfrm policy",
    XFRM_MSG_UPDPOLICY: "updating an xfrm policy",
    XFRM_MSG_DELPOLICY: "deleting an xfrm policy",
    XFRM_MSG_GETPOLICY: "listing xfrm policies",
}


def read_xfrm_stat(path: str = "/proc/self/net/xfrm_stat") -> dict[str, int]:
    """The kernel's xfrm error counters of the caller's network namespace (empty without xfrm)."""
    try:
        with open(path) as f:
            return {name: int(value) for name, value in (line.split() for line in f if line.strip())}
    except FileNotFoundError:
        return {}
