"""IPsec between nodes: the plain class owning the keys, the xfrm states and policies, and the maps.

Peers come through `upsert_peer` (name, node id, underlay address, endpoint CIDRs, the
newest key index the peer has installed, and whether it is reached through the VXLAN
overlay): from the API, or from the orchestrator's node table (`services.ipsec.nodes`
follows WatchNodes). A peer the node table gave is the node table's: the API cannot
change or delete it while the service follows the node table.

Direct routing: the endpoint packet itself is encrypted (OUT policy on the peer's
endpoint CIDRs). VXLAN overlay: the endpoint packet, still marked, passes the OUT
lookup (a bypass policy on the peer's CIDRs for that mark), is routed into the VXLAN
device, and the VXLAN packet the device makes inherits skb->mark for its own route
lookup; an OUT policy on (local underlay -> peer underlay, UDP 8472) with that mark
encrypts it, as Cilium's encrypted overlay does. A VXLAN packet to the peer that carries
no such mark (the node's own traffic, a packet no slot marked) meets a block policy on
the same selector: never a plaintext VXLAN packet to a peer. Inbound, an IN policy
requires ESP for VXLAN from the peer's underlay address.

What the kernel holds is always derived from the desired state (local node, keys,
peers) and applied in an order that never lets a packet meant for encryption out
in plaintext, and never loses one during a rotation:

- the default-drop OUT policy (every packet marked ENCRYPT that no peer policy
  takes is blocked) is installed first, at start, and never removed;
- adding: states first (IN and OUT, every installed key), then the policies, then the
  underlay entry (ESP from the peer is marked for decryption), then the CIDR entries
  (the mark that sends endpoint traffic through the states);
- removing: CIDR entries turn into BLOCK entries first, then policies and states go.

Sequence numbers: a peer keeps its IN state (and its anti-replay window) when this
node removes the peer, so the OUT state of a re-added peer must not count from 1
again, or the peer drops its packets as replays until they pass the old count. Before
an OUT state goes, its output sequence number is read from the kernel and kept in the
store per (peer underlay, SPI); the OUT state made again for them starts after it.

Rotation: `set_key` installs a new key's states for every peer (IN and OUT) before
any node uses it. Towards each peer this node encrypts with the newest key both
have: the peer's published key index when this node holds that key, else the key
it used before. A key no peer is sent with any more is removed `grace` seconds after
a newer key came (`retire`). The peers' key indexes are published; keys never are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pyroute2.netlink.exceptions import NetlinkError

from services.common.datapath import VXLAN_PORT, XFRM_MARK_MASK, XfrmMark
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.common.store import Store
from services.common.validate import Address, Network, at_most
from services.common.validate import address as valid_address
from services.common.validate import cidr as valid_cidr
from services.common.validate import name as valid_name
from services.ipsec import mtu, xfrm
from services.ipsec.defs import (
    MAX_PEER_CIDRS,
    MAX_PEERS,
    STATE_MARK_MASK,
    decrypt_mark,
    encrypt_mark,
)
from services.ipsec.keys import Cipher, Key, check_node_id, check_spi, read_key_file, write_key_file
from services.ipsec.maps import IpsecMaps

log = structlog.get_logger("weir.ipsec")

LOCAL, KEY, PEER, COUNTER, OSEQ = "local", "key", "peer", "counter", "oseq"
REQID = 0x5EED  # every state and template of ours; nothing else in the node's netns uses it
PEER_PRIORITY = 100
OVERLAY_BYPASS_PRIORITY = 110  # the endpoint packet of an overlay peer passes (its VXLAN packet is encrypted)
OVERLAY_BLOCK_PRIORITY = 150  # VXLAN to an overlay peer without its encrypt mark is blocked
BLOCK_PRIORITY = 200  # after every peer's OUT policy
IPPROTO_UDP = 17
API, NODES = "api", "nodes"  # where a peer came from
MAX_CIDRS_PER_PEER = 256
DEFAULT_GRACE_SECONDS = 60.0
PROBE_ADDRESS = ipaddress.ip_address("192.0.2.254")  # a state made and removed at once, to probe the kernel
PROBE_SPI = 0xFEED0  # outside 1..15: never one of ours
ESP_OPTION = {4: "CONFIG_INET_ESP", 6: "CONFIG_INET6_ESP"}


@dataclass(frozen=True)
class LocalNode:
    name: str
    node_id: int
    underlay: Address


@dataclass(frozen=True)
class Peer:
    """A remote node: where it is, what it serves, and the newest key index it has."""

    name: str
    node_id: int
    underlay: Address
    cidrs: tuple[Network, ...]
    spi: int  # the newest key index the peer has installed (published with the node)
    egress_spi: int = 0  # the key this node encrypts with towards it (0: none usable yet)
    vxlan: bool = False  # reached through the VXLAN overlay: its VXLAN packets are encrypted
    source: str = API  # API (UpsertPeer) or NODES (the orchestrator's node table)


@dataclass(frozen=True)
class PeerCounters:
    name: str
    node_id: int
    egress_spi: int
    encrypted_packets: int
    encrypted_bytes: int
    decrypted_packets: int
    decrypted_bytes: int
    integrity_failed: int
    replay: int


@dataclass(frozen=True)
class Counters:
    peers: list[PeerCounters]
    xfrm_errors: dict[str, int]
    rotations: int
    datapath: dict[str, tuple[int, int]]


@dataclass(frozen=True)
class InstalledKey:
    spi: int
    cipher: Cipher
    installed_at: float
    seq: int  # install order: the highest is the newest


@dataclass(frozen=True)
class Status:
    encrypting: bool
    reason: str  # why not, when not
    local: LocalNode | None
    keys: list[InstalledKey]
    newest_spi: int
    xfrm_block: bool


@dataclass
class Desired:
    states: dict[tuple[str, int, int], xfrm.State] = field(default_factory=dict)
    policies: dict[tuple[int, str, str, int, int, int, int], xfrm.Policy] = field(default_factory=dict)


def _state_id(s: xfrm.State) -> tuple[str, int, int]:
    return (str(s.dst), s.spi, s.mark.value)


def _oseq_key(s: xfrm.State) -> str:
    """Where an OUT state's sequence number is kept: the peer's underlay address and the SPI."""
    return f"{s.dst}/{s.spi}"


def _policy_id(p: xfrm.Policy) -> tuple[int, str, str, int, int, int, int]:
    return (p.direction, str(p.src), str(p.dst), p.mark.value, p.proto, p.dport, p.ifindex)


def _ours_state(s: xfrm.State) -> bool:
    return s.reqid == REQID and s.mark.value & XFRM_MARK_MASK in (XfrmMark.ENCRYPT, XfrmMark.DECRYPT)


def _default_drop(p: xfrm.Policy) -> bool:
    return (
        p.tmpl is None
        and not p.bypass
        and p.mark == xfrm.Mark(XfrmMark.ENCRYPT, XFRM_MARK_MASK)
        and p.priority == BLOCK_PRIORITY
    )


def _ours_policy(p: xfrm.Policy) -> bool:
    if p.tmpl is not None:
        return p.reqid == REQID
    if p.bypass:
        return p.priority == OVERLAY_BYPASS_PRIORITY and p.mark.value & XFRM_MARK_MASK == XfrmMark.ENCRYPT
    if p.priority == OVERLAY_BLOCK_PRIORITY:
        return p.proto == IPPROTO_UDP and p.dport == VXLAN_PORT
    return _default_drop(p)


def _host(address: Address) -> Network:
    return ipaddress.ip_network(address)


def _any(version: int) -> Network:
    return ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0")


class Ipsec:
    """Keys, peers and the kernel objects that encrypt between this node and them."""

    def __init__(
        self,
        maps: IpsecMaps,
        store: Store,
        key_dir: Path,
        grace: float = DEFAULT_GRACE_SECONDS,
        follow_nodes: bool = False,
        overlay_device: str = "",
    ) -> None:
        """`follow_nodes`: peers the node table gave belong to it (the API may not change them).

        `overlay_device`: the orchestrator's VXLAN device; an overlay peer's endpoint packets
        pass xfrm unencrypted only on their way into it (their VXLAN packet is encrypted).
        """
        self._maps = maps
        self._overlay_device = overlay_device
        self.follow_nodes = follow_nodes
        self._store = store
        self._key_dir = key_dir
        self._grace = grace
        self._xfrm: xfrm.Xfrm | None = None
        self._xfrm_problem = ""
        self._block_installed = False
        self._secrets: dict[int, Key] = {}
        self._fitted_ifindex = 0  # the overlay device's index when the kernel was last made to match

    # ---- life cycle ----

    def start(self) -> None:
        """Load, put the default-drop policy in place, then make the kernel match the store."""
        self._maps.load()
        self._key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self._xfrm = xfrm.Xfrm()
        except xfrm.XfrmError as exc:
            self._xfrm_problem = f"the kernel has no xfrm netlink interface (CONFIG_XFRM_USER): {exc}"
            log.error("ipsec cannot encrypt", reason=self._xfrm_problem)
        self._install_block()
        for spi_text, doc in self._store.items(KEY):
            path = self._key_dir / spi_text
            try:
                key = read_key_file(path)
            except (InvalidArgument, FailedPrecondition) as exc:
                log.error("a stored key cannot be read: its traffic is blocked", spi=spi_text, error=str(exc))
                continue
            if key.spi != int(spi_text) or key.cipher.value != doc["cipher"]:
                log.error("a stored key file does not match its record: its traffic is blocked", spi=spi_text)
                continue
            self._secrets[key.spi] = key
        self._apply()

    def adopt(self) -> None:
        """A fresh store with pins present: keys cannot be read back from the kernel; block and wait for them."""
        self.start()

    def close(self) -> None:
        if self._xfrm is not None:
            self._xfrm.close()
            self._xfrm = None
        self._maps.close()

    def _install_block(self) -> None:
        self._block_installed = False
        if self._xfrm is not None:
            for version in (4, 6):
                any_net = _any(version)
                try:
                    self._xfrm.add_policy(self._block_policy(any_net))
                    self._block_installed = True
                except xfrm.XfrmError as exc:
                    log.error("cannot install the default-drop xfrm policy", family=version, error=str(exc))
        self._maps.set_config(self._block_installed, strict=self.follow_nodes)

    @staticmethod
    def _block_policy(any_net: Network) -> xfrm.Policy:
        mark = xfrm.Mark(XfrmMark.ENCRYPT, XFRM_MARK_MASK)
        return xfrm.Policy(xfrm.DIR_OUT, any_net, any_net, BLOCK_PRIORITY, mark, None)

    # ---- reading the desired state ----

    def local(self) -> LocalNode | None:
        doc = self._store.get(LOCAL, "node")
        if doc is None:
            return None
        return LocalNode(str(doc["name"]), int(doc["node_id"]), ipaddress.ip_address(doc["underlay"]))

    def keys(self) -> list[InstalledKey]:
        out = [
            InstalledKey(int(k), Cipher(doc["cipher"]), float(doc["installed_at"]), int(doc["seq"]))
            for k, doc in self._store.items(KEY)
        ]
        return sorted(out, key=lambda k: k.seq)

    def newest_spi(self) -> int:
        usable = [k for k in self.keys() if k.spi in self._secrets]
        return usable[-1].spi if usable else 0

    def _peer_of(self, name: str, doc: dict[str, object]) -> Peer:
        return Peer(
            name=name,
            node_id=int(str(doc["node_id"])),
            underlay=ipaddress.ip_address(str(doc["underlay"])),
            cidrs=tuple(ipaddress.ip_network(str(c)) for c in doc["cidrs"]),  # type: ignore[attr-defined]
            spi=int(str(doc["spi"])),
            egress_spi=int(str(doc.get("egress_spi", 0))),
            vxlan=bool(doc.get("vxlan", False)),
            source=str(doc.get("source", API)),
        )

    def peers(self) -> list[Peer]:
        return sorted((self._peer_of(n, d) for n, d in self._store.items(PEER)), key=lambda p: p.name)

    def peer(self, name: str) -> Peer:
        doc = self._store.get(PEER, name)
        if doc is None:
            raise NotFound(f"no peer named {name!r}: add it with UpsertPeer first")
        return self._peer_of(name, doc)

    def _egress_spi(self, peer_spi: int, current: int) -> int:
        """The newest key both sides have: the peer's newest if this node holds it, else the one in use."""
        if peer_spi in self._secrets:
            return peer_spi
        if current in self._secrets:
            return current
        return 0

    def status(self) -> Status:
        local = self.local()
        reason = ""
        if self._xfrm_problem:
            reason = self._xfrm_problem
        elif local is None:
            reason = "no local node: call SetLocalNode"
        elif not self._secrets:
            reason = "no key: call SetKey"
        return Status(not reason, reason, local, self.keys(), self.newest_spi(), self._block_installed)

    # ---- changes ----

    def set_local(self, name: str, node_id: int, underlay: str) -> LocalNode:
        valid_name(name, "node name")
        check_node_id(node_id)
        address = valid_address(underlay, "underlay", unicast=True)
        for peer in self.peers():
            if peer.node_id == node_id or peer.underlay == address:
                raise AlreadyExists(f"peer {peer.name!r} has node id {node_id} or underlay {address}")
        local = LocalNode(name, node_id, address)
        self._store.put(LOCAL, "node", {"name": name, "node_id": node_id, "underlay": str(address)})
        self._apply()
        return local

    def probe(self, cipher: Cipher, version: int = 4) -> None:
        """FAILED_PRECONDITION naming the kernel option if a state of this cipher cannot be made."""
        if self._xfrm is None:
            raise FailedPrecondition(f"cannot encrypt: {self._xfrm_problem}")
        probe_key = Key(1, cipher, bytes(cipher.key_lengths[0]))
        address = PROBE_ADDRESS if version == 4 else ipaddress.ip_address("2001:db8::fe")
        state = xfrm.State(address, address, PROBE_SPI, REQID, xfrm.Mark(0, 0), probe_key.pair_algorithm(0, 0))
        with contextlib.suppress(xfrm.XfrmError):  # a probe a crash left behind
            self._xfrm.delete_state(state)
        try:
            self._xfrm.add_state(state)
        except xfrm.XfrmError as exc:
            raise FailedPrecondition(self._missing(exc, cipher, version)) from None
        self._xfrm.delete_state(state)

    def _missing(self, exc: xfrm.XfrmError, cipher: Cipher, version: int) -> str:
        esp = ESP_OPTION[version]
        if exc.errno == 93:  # EPROTONOSUPPORT: "Requested type not found"
            return f"the kernel has no ESP ({esp} is not set): keys cannot be installed; nothing is encrypted"
        if exc.errno == 38:  # ENOSYS: the algorithm
            other = Cipher.CBC_HMAC if cipher is Cipher.GCM else Cipher.GCM
            also = ""
            try:
                self.probe(other, version)
            except FailedPrecondition as inner:
                if esp in str(inner):
                    also = f", and no ESP ({esp} is not set)"
            return (
                f"the kernel lacks the cipher {cipher.value} ({cipher.kernel_option} is not set){also}: "
                "keys cannot be installed; nothing is encrypted"
            )
        return f"the kernel refuses an ESP state: {exc}"

    def set_key(self, key: Key) -> InstalledKey:
        """Install a key index (rotation when another is installed): states first, use afterwards."""
        held = self._secrets.get(key.spi)
        if held is not None:
            if held == key:
                return next(k for k in self.keys() if k.spi == key.spi)
            raise AlreadyExists(
                f"key index {key.spi} is installed with another key: rotate to a new index "
                "(indexes are 1..15) and let this one retire"
            )
        if self._store.get(KEY, str(key.spi)) is not None and self.newest_spi() != 0:
            raise AlreadyExists(f"key index {key.spi} is still installed (retiring): use another index")
        local = self.local()
        self.probe(key.cipher, local.underlay.version if local else 4)
        seq = max((k.seq for k in self.keys()), default=0) + 1
        write_key_file(self._key_dir / str(key.spi), key)
        self._secrets[key.spi] = key
        rotation = len(self._secrets) > 1
        doc = {"cipher": key.cipher.value, "installed_at": time.time(), "seq": seq}
        try:
            with self._store.transaction():
                self._store.put(KEY, str(key.spi), doc)
                if rotation:
                    self._bump(1)
            self._apply()
        except Exception:
            self._secrets.pop(key.spi, None)
            self._store.delete(KEY, str(key.spi))
            (self._key_dir / str(key.spi)).unlink(missing_ok=True)
            self._apply()
            raise
        log.info("key installed", spi=key.spi, cipher=key.cipher.value, rotation=rotation)
        return InstalledKey(key.spi, key.cipher, float(doc["installed_at"]), seq)

    def set_key_file(self, path: Path) -> InstalledKey:
        return self.set_key(read_key_file(path))

    def _bump(self, n: int) -> None:
        doc = self._store.get(COUNTER, "rotations") or {"n": 0}
        self._store.put(COUNTER, "rotations", {"n": int(doc["n"]) + n})

    def _check_owner(self, name: str, source: str) -> None:
        doc = self._store.get(PEER, name)
        if source == API and self.follow_nodes and doc is not None and doc.get("source") == NODES:
            raise FailedPrecondition(
                f"peer {name!r} comes from the orchestrator's node table: change it there (UpsertNode/DeleteNode)"
            )

    def upsert_peer(
        self,
        name: str,
        node_id: int,
        underlay: str,
        cidrs: Iterable[str],
        spi: int,
        vxlan: bool = False,
        source: str = API,
    ) -> Peer:
        valid_name(name, "peer name")
        check_node_id(node_id)
        check_spi(spi)
        address = valid_address(underlay, "underlay", unicast=True)
        texts = list(cidrs)
        at_most(len(texts), MAX_CIDRS_PER_PEER, "cidrs")
        networks = tuple(valid_cidr(c, f"cidrs[{i}]") for i, c in enumerate(texts))
        if not networks:
            raise InvalidArgument("a peer needs at least one endpoint CIDR")
        local = self.local()
        if local is None:
            raise FailedPrecondition("set the local node first (SetLocalNode): its id and underlay address")
        if node_id == local.node_id or address == local.underlay:
            raise InvalidArgument(f"node id {node_id} / underlay {address} is this node's own")
        if address.version != local.underlay.version:
            raise InvalidArgument(f"underlay {address} is not of the local underlay's family ({local.underlay})")
        others = [p for p in self.peers() if p.name != name]
        if len(others) >= MAX_PEERS:
            raise InvalidArgument(f"at most {MAX_PEERS} peers")
        for other in others:
            if other.node_id == node_id or other.underlay == address:
                raise AlreadyExists(f"peer {other.name!r} already has node id {other.node_id} or underlay {address}")
            for n in networks:
                if any(n.overlaps(o) for o in other.cidrs):
                    raise AlreadyExists(f"cidr {n} overlaps peer {other.name!r}'s endpoint CIDRs")
        if sum(len(p.cidrs) for p in others) + len(networks) > MAX_PEER_CIDRS:
            raise InvalidArgument(f"at most {MAX_PEER_CIDRS} peer CIDRs in all")
        self._check_owner(name, source)
        previous = self._store.get(PEER, name)
        current = int(str(previous.get("egress_spi", 0))) if previous else 0
        doc = {
            "node_id": node_id,
            "underlay": str(address),
            "cidrs": [str(n) for n in networks],
            "spi": spi,
            "egress_spi": self._egress_spi(spi, current),
            "vxlan": bool(vxlan),
            "source": source,
        }
        if previous is not None and previous == doc:
            return self.peer(name)
        if previous is not None and int(str(previous.get("egress_spi", 0))) not in (0, doc["egress_spi"]):
            self._bump(1)
        self._store.put(PEER, name, doc)
        try:
            self._apply()
        except Exception:
            if previous is None:
                self._store.delete(PEER, name)
            else:
                self._store.put(PEER, name, previous)
            self._apply()
            raise
        return self.peer(name)

    def delete_peer(self, name: str, source: str = API) -> None:
        """Forget a peer; its CIDRs stay blocked (never plaintext) until another peer serves them."""
        peer = self.peer(name)
        self._check_owner(name, source)
        self._store.delete(PEER, name)
        for n in peer.cidrs:
            self._maps.put_cidr(n, 0, 0, block=True)
        self._apply()

    def forget_cidrs(self, cidrs: Iterable[str]) -> int:
        """Stop blocking ranges of removed peers: traffic there goes unencrypted afterwards."""
        networks = dict.fromkeys(valid_cidr(c, f"cidrs[{i}]") for i, c in enumerate(cidrs))  # once each, in order
        served = {n for p in self.peers() for n in p.cidrs}
        for n in networks:  # every check before the first delete: a refusal changes nothing
            if n in served:
                raise FailedPrecondition(f"cidr {n} belongs to a peer: delete the peer first")
        live = self._maps.cidrs()
        gone = [n for n in networks if n in live]
        for n in gone:
            self._maps.delete_cidr(n)
        return len(gone)

    def retire(self, now: float | None = None) -> list[int]:
        """Remove keys no peer is sent with, `grace` seconds after a newer key came; returns their SPIs."""
        now = time.time() if now is None else now
        keys = self.keys()
        if len(keys) < 2:
            return []
        in_use = {p.egress_spi for p in self.peers()} | {p.spi for p in self.peers()}
        newest = keys[-1]
        gone = [k.spi for k in keys[:-1] if k.spi not in in_use and now - newest.installed_at >= self._grace]
        if not gone:
            return []
        for spi in gone:
            self._secrets.pop(spi, None)
        self._store.delete_many(KEY, [str(s) for s in gone])
        self._apply()
        for spi in gone:
            (self._key_dir / str(spi)).unlink(missing_ok=True)
        log.info("keys retired", spis=gone)
        return gone

    # ---- applying ----

    def _desired(self, local: LocalNode | None, peers: list[Peer]) -> Desired:
        want = Desired()
        if local is None:
            return want
        for peer in peers:
            for spi, key in self._secrets.items():
                for state in (
                    xfrm.State(local.underlay, peer.underlay, spi, REQID,
                               xfrm.Mark(encrypt_mark(peer.node_id, spi), STATE_MARK_MASK),
                               key.pair_algorithm(local.node_id, peer.node_id)),
                    xfrm.State(peer.underlay, local.underlay, spi, REQID,
                               xfrm.Mark(decrypt_mark(peer.node_id), STATE_MARK_MASK),
                               key.pair_algorithm(peer.node_id, local.node_id)),
                ):  # fmt: skip
                    want.states[_state_id(state)] = state
                # xfrm finds an OUT state by the policy's mark, not the packet's: one OUT
                # policy per key, so the SPI the BPF program puts in the mark picks the state
                out_mark = xfrm.Mark(encrypt_mark(peer.node_id, spi), STATE_MARK_MASK)
                if peer.vxlan:
                    self._desire_overlay_out(want, local, peer, out_mark, self._overlay_ifindex())
                    continue
                for n in peer.cidrs:
                    policy = xfrm.Policy(xfrm.DIR_OUT, _any(n.version), n, PEER_PRIORITY, out_mark,
                                         (local.underlay, peer.underlay), REQID)  # fmt: skip
                    want.policies[_policy_id(policy)] = policy
            if peer.vxlan:
                self._desire_overlay_peer(want, local, peer)
                continue
            for n in peer.cidrs:
                any_net = _any(n.version)
                for policy in (
                    xfrm.Policy(xfrm.DIR_IN, n, any_net, PEER_PRIORITY, xfrm.Mark(0, 0),
                                (peer.underlay, local.underlay), REQID),
                    xfrm.Policy(xfrm.DIR_FWD, n, any_net, PEER_PRIORITY, xfrm.Mark(0, 0),
                                (peer.underlay, local.underlay), REQID),
                ):  # fmt: skip
                    want.policies[_policy_id(policy)] = policy
        return want

    def _overlay_ifindex(self) -> int:
        """The VXLAN device's index now, or 0 while it does not exist (then nothing passes: fail closed)."""
        if not self._overlay_device:
            return 0
        # a netlink dump, not if_nametoindex: SIOCGIFINDEX on a missing device makes the
        # kernel run modprobe for its name, a process per call (costly on a slow machine)
        return next((i for i, name in socket.if_nameindex() if name == self._overlay_device), 0)

    @staticmethod
    def _desire_overlay_out(want: Desired, local: LocalNode, peer: Peer, out_mark: xfrm.Mark, ifindex: int) -> None:
        """One key towards an overlay peer: its VXLAN packets encrypted, its endpoint packets passed to the device.

        The pass is bound to the VXLAN device: an endpoint packet that some other route (an
        operator's direct route, say) would send out of another device matches no pass and
        meets the default-drop policy, so it never leaves in plaintext. Without the device
        there is no pass at all.
        """
        vxlan = xfrm.Policy(xfrm.DIR_OUT, _host(local.underlay), _host(peer.underlay), PEER_PRIORITY, out_mark,
                            (local.underlay, peer.underlay), REQID, IPPROTO_UDP, VXLAN_PORT)  # fmt: skip
        want.policies[_policy_id(vxlan)] = vxlan
        if not ifindex:
            return
        for n in peer.cidrs:
            inner = xfrm.Policy(xfrm.DIR_OUT, _any(n.version), n, OVERLAY_BYPASS_PRIORITY, out_mark, None,
                                bypass=True, ifindex=ifindex)  # fmt: skip
            want.policies[_policy_id(inner)] = inner

    @staticmethod
    def _desire_overlay_peer(want: Desired, local: LocalNode, peer: Peer) -> None:
        """Whatever the keys: unmarked VXLAN to the peer is blocked, VXLAN from it must come through ESP."""
        block = xfrm.Policy(xfrm.DIR_OUT, _host(local.underlay), _host(peer.underlay), OVERLAY_BLOCK_PRIORITY,
                            xfrm.Mark(0, 0), None, 0, IPPROTO_UDP, VXLAN_PORT)  # fmt: skip
        inbound = xfrm.Policy(xfrm.DIR_IN, _host(peer.underlay), _host(local.underlay), PEER_PRIORITY,
                              xfrm.Mark(0, 0), (peer.underlay, local.underlay), REQID, IPPROTO_UDP,
                              VXLAN_PORT)  # fmt: skip
        # added before the per-key policies (dict order is the order of adding)
        want.policies = {_policy_id(block): block, _policy_id(inbound): inbound, **want.policies}

    def _apply(self) -> None:
        """Make the kernel and the maps match the store, adding before removing (see the module doc)."""
        local = self.local()
        peers = self.peers()
        usable = self._xfrm is not None and local is not None
        want = self._desired(local, peers) if usable else Desired()
        if self._xfrm is not None:
            have_states = {_state_id(s): s for s in self._xfrm.states() if _ours_state(s)}
            have_policies = {
                _policy_id(p): p for p in self._xfrm.policies() if _ours_policy(p) and not _default_drop(p)
            }
        else:
            have_states, have_policies = {}, {}
        # 0. a state made without XFRM_STATE_AF_UNSPEC (before it was set) has a selector of its
        # outer family, which mishandles the other family's packets: made again, its count carried
        for sid in [sid for sid in want.states if sid in have_states and not have_states[sid].any_family]:
            assert self._xfrm is not None
            self._remember_oseq(have_states[sid])
            self._xfrm.delete_state(have_states.pop(sid))
            log.info("a state is made again to take either inner family", peer=str(want.states[sid].dst),
                     spi=want.states[sid].spi)  # fmt: skip
        # 1. add: states, then policies (replaced in place), then the maps
        for sid, state in want.states.items():
            if sid not in have_states:
                assert self._xfrm is not None
                carried = self._carried_oseq(state)
                self._xfrm.add_state(dataclasses.replace(state, oseq=carried))
                if carried:
                    self._store.delete(OSEQ, _oseq_key(state))
        for pid, policy in want.policies.items():
            if have_policies.get(pid) != policy:
                assert self._xfrm is not None
                self._xfrm.add_policy(policy)
        if usable:
            self._fit_overlay(local, peers)  # before the first packet of an overlay peer is marked
        live_underlay = self._maps.underlays()
        for peer in peers:
            if usable and live_underlay.get(peer.underlay) != peer.node_id:
                self._maps.put_underlay(peer.underlay, peer.node_id)
        live_cidrs = self._maps.cidrs()
        served = set()
        for peer in peers:
            spi = peer.egress_spi if usable else 0
            for n in peer.cidrs:
                served.add(n)
                entry = live_cidrs.get(n)
                block = spi == 0
                if entry is None or (entry.node_id, entry.spi, bool(entry.flags)) != (
                    0 if block else peer.node_id, spi, block,
                ):  # fmt: skip
                    self._maps.put_cidr(n, 0 if block else peer.node_id, spi, block)
        # 2. remove: map entries no peer serves become BLOCK, then policies, then states
        for n, entry in live_cidrs.items():
            if n not in served and not entry.flags:
                self._maps.put_cidr(n, 0, 0, block=True)
        wanted_underlay = {p.underlay for p in peers} if usable else set()
        for address in live_underlay:
            if address not in wanted_underlay:
                self._maps.delete_underlay(address)
        if self._xfrm is not None:
            for pid, policy in have_policies.items():
                if pid not in want.policies:
                    self._xfrm.delete_policy(policy)
            for sid, state in have_states.items():
                if sid not in want.states:
                    self._remember_oseq(state)
                    self._xfrm.delete_state(state)
        self._forget_oseqs()
        self._refresh_egress(peers)

    def _fit_overlay(self, local: LocalNode | None, peers: list[Peer]) -> None:
        """With an overlay peer and a key: the VXLAN device's MTU leaves room for ESP (services.ipsec.mtu)."""
        ifindex = self._overlay_ifindex() if any(p.vxlan for p in peers) else 0
        self._fitted_ifindex = ifindex
        if not ifindex or local is None or not self._secrets:
            return
        try:
            before, after = mtu.fit_overlay(ifindex, local.underlay, {k.cipher for k in self._secrets.values()})
        except (NetlinkError, OSError) as exc:
            log.warning("cannot fit the overlay device's MTU for ESP", device=self._overlay_device, error=str(exc))
            return
        if before != after:
            log.info("overlay MTU set for ESP", device=self._overlay_device, mtu=after, was=before)

    def check_overlay(self) -> None:
        """Periodically: an overlay device made again (a new index, the orchestrator's MTU) is taken up again."""
        peers = self.peers()
        if not any(p.vxlan for p in peers):
            return
        if self._overlay_ifindex() != self._fitted_ifindex:
            self._apply()
        elif self._xfrm is not None:
            self._fit_overlay(self.local(), peers)

    def _carried_oseq(self, state: xfrm.State) -> int:
        """The sequence number an OUT state of the same peer and SPI reached before it was removed (0: none)."""
        if state.mark.value & XFRM_MARK_MASK != XfrmMark.ENCRYPT:
            return 0
        doc = self._store.get(OSEQ, _oseq_key(state))
        return int(doc["oseq"]) if doc else 0

    def _remember_oseq(self, state: xfrm.State) -> None:
        """Read an OUT state's sequence number just before deleting it (its policies are gone: it stays put)."""
        if state.mark.value & XFRM_MARK_MASK != XfrmMark.ENCRYPT or state.spi not in self._secrets:
            return  # an IN state, or a retired key's: no state of that key will be made again
        if self._xfrm is None:
            return
        try:
            oseq = self._xfrm.get_state(state).oseq
        except xfrm.XfrmError as exc:
            log.warning("cannot read an OUT state's sequence number", peer=str(state.dst), spi=state.spi,
                        error=str(exc))  # fmt: skip
            oseq = state.oseq
        oseq = max(oseq, self._carried_oseq(state))
        if oseq:
            self._store.put(OSEQ, _oseq_key(state), {"oseq": oseq})

    def _forget_oseqs(self) -> None:
        """Sequence numbers of keys this node no longer holds are of no use: a new key starts a new count."""
        stale = [k for k, _ in self._store.items(OSEQ) if int(k.rsplit("/", 1)[1]) not in self._secrets]
        if stale:
            self._store.delete_many(OSEQ, stale)

    def _refresh_egress(self, peers: list[Peer]) -> None:
        """After keys changed: move each peer to the newest key both have (a rotation per switch)."""
        changed = False
        for peer in peers:
            spi = self._egress_spi(peer.spi, peer.egress_spi)
            if spi != peer.egress_spi:
                doc = self._store.get(PEER, peer.name)
                assert doc is not None
                doc["egress_spi"] = spi
                self._store.put(PEER, peer.name, doc)
                if peer.egress_spi:
                    self._bump(1)
                changed = True
        if changed:
            self._apply()

    # ---- counters ----

    def counters(self) -> Counters:
        states = list(self._xfrm.states()) if self._xfrm is not None else []
        out = []
        for peer in self.peers():
            enc = [s for s in states if _ours_state(s) and s.mark.value >> 16 == peer.node_id
                   and s.mark.value & XFRM_MARK_MASK == XfrmMark.ENCRYPT]  # fmt: skip
            dec = [s for s in states if _ours_state(s) and s.mark.value >> 16 == peer.node_id
                   and s.mark.value & XFRM_MARK_MASK == XfrmMark.DECRYPT]  # fmt: skip
            out.append(
                PeerCounters(
                    peer.name,
                    peer.node_id,
                    peer.egress_spi,
                    sum(s.packets for s in enc),
                    sum(s.bytes for s in enc),
                    sum(s.packets for s in dec),
                    sum(s.bytes for s in dec),
                    sum(s.integrity_failed for s in dec),
                    sum(s.replay for s in dec),
                )
            )
        doc = self._store.get(COUNTER, "rotations") or {"n": 0}
        datapath = {stat.name: (int(c.packets), int(c.bytes)) for stat, c in self._maps.stats().items()}
        return Counters(out, xfrm.read_xfrm_stat(), int(doc["n"]), datapath)
