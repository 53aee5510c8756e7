"""Netlink plumbing for endpoints: namespaces, veth pairs, addresses, routes.

Everything here runs in the orchestrator's own network namespace (the node's)
and in the endpoint namespaces it creates; it never looks at other interfaces
except to find the ones it tagged. Interfaces Weir makes carry an ifalias
`weir/<instance>/<endpoint>` so a restarted orchestrator can tell its own
leftovers from everything else.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import ipaddress
import os
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pybpf import TcDirection, XdpMode, _libbpf, query_tc, query_xdp
from pybpf._rtnl import count_tc_filters
from services.common import netns
from services.common.datapath import TcPriority
from services.common.errors import InvalidArgument
from services.orchestrator.limits import summary

# The endpoint's default gateway: a link-local address that exists nowhere. The
# endpoint reaches it through a permanent neighbour entry pointing at the host
# side of its veth, so no ARP/ND is ever needed for it.
GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::1"
CONTAINER_IFNAME = "eth0"
NUD_PERMANENT = 0x80
NUD_NOT_THERE = 0x01 | 0x20 | 0x40  # INCOMPLETE, FAILED, NOARP: nobody answered there
TC_HANDLE = 1
TC_PRIORITY = TcPriority.ENTRY  # where the entry programs sit on every interface
BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47  # enum bpf_attach_type
CLSACT_INGRESS, CLSACT_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_{IN,E}GRESS)
RT_SCOPE_LINK = 253


@dataclass(frozen=True)
class Veth:
    """What create_veth made: the host side in the node, the peer in the namespace."""

    host_ifname: str
    host_ifindex: int
    host_mac: str
    peer_mac: str


def host_ifname(instance: str, endpoint: str) -> str:
    """A stable, short (<= 15 bytes) interface name unique per instance and endpoint."""
    digest = hashlib.sha256(f"{instance}/{endpoint}".encode()).hexdigest()[:8]
    return f"lxc{digest}"


def alias(instance: str, endpoint: str) -> str:
    return f"weir/{instance}/{endpoint}"


def netns_name(instance: str, endpoint: str) -> str:
    return f"{instance}.{endpoint}"


def enable_forwarding() -> None:
    """The node routes between endpoints and the network (its own namespace only)."""
    for path in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"):
        with open(path, "w") as f:
            f.write("1")


def list_netns(prefix: str) -> list[str]:
    return netns.names(prefix)


def netns_exists(name: str) -> bool:
    return netns.exists(name)


def remove_netns(name: str) -> None:
    netns.remove(name)


def link_index(ifname: str) -> int | None:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def tagged_links(prefix: str) -> dict[str, int]:
    """Interfaces of this namespace whose ifalias starts with prefix: alias -> ifindex."""
    with IPRoute() as ipr:
        return {
            str(link.get("ifalias")): int(link["index"])
            for link in ipr.get_links()
            if str(link.get("ifalias") or "").startswith(prefix)
        }


def link_alias(ifindex: int) -> str:
    """The ifalias of an interface ("" when it has none or is gone)."""
    with IPRoute() as ipr:
        try:
            links = ipr.get_links(ifindex)
        except NetlinkError:
            return ""
    return str(links[0].get_attr("IFLA_IFALIAS") or "") if links else ""


def is_weir_link(ifindex: int) -> bool:
    """Whether an interface carries a Weir tag (an endpoint veth of any instance)."""
    return link_alias(ifindex).startswith("weir/")


def tagged_peers(prefix: str) -> dict[int, int]:
    """Tagged veths of this namespace (ifalias starting with prefix): host ifindex -> peer ifindex."""
    with IPRoute() as ipr:
        return {
            int(link["index"]): int(link.get_attr("IFLA_LINK") or 0)
            for link in ipr.get_links()
            if str(link.get_attr("IFLA_IFALIAS") or "").startswith(prefix)
        }


def namespace_links(name: str, crossing: bool = False) -> list[tuple[int, int, str]]:
    """(ifindex, IFLA_LINK, name) of the interfaces inside a namespace, loopback left out.

    With ``crossing``, only links whose other end is in another namespace (a veth peer
    with a link netnsid): an index pair inside one namespace says nothing about ours.
    """
    with netns.entered(name), IPRoute() as ipr:
        return [
            (int(link["index"]), int(link.get_attr("IFLA_LINK") or 0), str(link.get_attr("IFLA_IFNAME")))
            for link in ipr.get_links()
            if link.get_attr("IFLA_IFNAME") != "lo" and (not crossing or link.get_attr("IFLA_LINK_NETNSID") is not None)
        ]


def peered_namespaces(prefix: str, peers: dict[int, int]) -> dict[str, bool]:
    """Namespaces named with prefix: name -> whether one of `peers` (our veths) ends inside it.

    A namespace is tagged as ours by the veth we made into it: a user's look-alike namespace
    or another instance's (whose name may extend ours) holds no peer of this instance's veths.
    """
    out = {}
    for name in list_netns(prefix):
        try:
            inside = namespace_links(name, crossing=True)
        except OSError:
            out[name] = False
            continue
        out[name] = any(peers.get(link) == index and ifname == CONTAINER_IFNAME for index, link, ifname in inside)
    return out


def create_veth(ifname: str, tag: str, ns: str) -> Veth:
    """Make a veth pair with the peer (eth0) inside namespace ns, host side up."""
    if not netns_exists(ns):
        netns.create(ns)
    ns_fd = netns.fd(ns)
    try:
        with IPRoute() as ipr:
            ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": CONTAINER_IFNAME, "net_ns_fd": ns_fd})
            index = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=index, ifalias=tag, state="up")
            host_mac = str(ipr.get_links(index)[0].get("address"))
    finally:
        os.close(ns_fd)
    with netns.entered(ns), IPRoute() as nsr:
        peer = nsr.link_lookup(ifname=CONTAINER_IFNAME)[0]
        peer_mac = str(nsr.get_links(peer)[0].get("address"))
    return Veth(ifname, index, host_mac, peer_mac)


def configure_container(ns: str, host_mac: str, ipv4: str, ipv6: str) -> None:
    """Address eth0 in the endpoint namespace and route everything via the host side."""
    with netns.entered(ns), IPRoute() as nsr:
        lo = nsr.link_lookup(ifname="lo")[0]
        nsr.link("set", index=lo, state="up")
        eth = nsr.link_lookup(ifname=CONTAINER_IFNAME)[0]
        nsr.link("set", index=eth, state="up")
        if ipv4:
            nsr.addr("add", index=eth, address=ipv4, prefixlen=32)
            nsr.neigh("add", dst=GATEWAY_V4, lladdr=host_mac, ifindex=eth, state=NUD_PERMANENT)
            nsr.route("add", dst=f"{GATEWAY_V4}/32", oif=eth, scope=RT_SCOPE_LINK)
            nsr.route("add", dst="0.0.0.0/0", gateway=GATEWAY_V4, oif=eth)
        if ipv6:
            # nodad: the address is ours by construction; DAD would only delay it.
            nsr.addr("add", index=eth, address=ipv6, prefixlen=128, flags=0x02)
            nsr.neigh("add", dst=GATEWAY_V6, lladdr=host_mac, ifindex=eth, state=NUD_PERMANENT)
            nsr.route("add", dst="::/0", gateway=GATEWAY_V6, oif=eth)


def add_host_routes(ifindex: int, ipv4: str, ipv6: str, peer_mac: str) -> None:
    """Route the endpoint's addresses to its host-side interface (replace: idempotent)."""
    with IPRoute() as ipr:
        for address, plen in ((ipv4, 32), (ipv6, 128)):
            if not address:
                continue
            ipr.route("replace", dst=f"{address}/{plen}", oif=ifindex, scope=RT_SCOPE_LINK)
            if peer_mac:
                ipr.neigh("replace", dst=address, lladdr=peer_mac, ifindex=ifindex, state=NUD_PERMANENT)


def remove_host_routes(ifindex: int, ipv4: str, ipv6: str) -> None:
    """Undo add_host_routes on an adopted interface that stays in place."""
    with IPRoute() as ipr:
        for address, plen in ((ipv4, 32), (ipv6, 128)):
            if not address:
                continue
            with contextlib.suppress(NetlinkError):
                ipr.route("del", dst=f"{address}/{plen}", oif=ifindex)
            with contextlib.suppress(NetlinkError):
                ipr.neigh("del", dst=address, ifindex=ifindex)


def delete_link(ifindex: int) -> None:
    """Delete an interface (a veth takes its peer with it); absent is fine."""
    with IPRoute() as ipr:
        try:
            ipr.link("del", index=ifindex)
        except NetlinkError as exc:
            if exc.code != 19:  # ENODEV: already gone
                raise


IFNAMSIZ = 16  # the kernel's limit, with the terminating NUL


def valid_ifname(text: str, where: str = "interface") -> str:
    """An interface name as the kernel takes it: 1-15 bytes, no NUL, '/', ':' or whitespace."""
    raw = text.encode()
    if (
        not raw
        or len(raw) >= IFNAMSIZ
        or text in (".", "..")
        or any(c in text for c in "\0/:")
        or (any(c.isspace() for c in text))
    ):
        raise InvalidArgument(
            f"{where} {summary(text)} is not an interface name: 1-15 bytes, without NUL, '/', ':' or spaces"
        )
    return text


def _tcx_programs(ifindex: int, attach_type: int) -> list[int]:
    """Program ids on an interface's tcx hook (kernels without tcx answer with none)."""
    ids = (ctypes.c_uint32 * 64)()
    count = ctypes.c_uint32(64)
    flags = ctypes.c_uint32(0)
    ret = _libbpf.bpf_prog_query(ifindex, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count))
    if ret == -errno.ENOSPC:
        return [0]  # more than 64: certainly someone else's
    if ret < 0:
        return []
    return list(ids[: count.value])


def foreign_programs(ifindex: int, own_ids: set[int]) -> list[str]:
    """Programs on an interface that are not in own_ids: tc filters (any priority), tcx and XDP."""
    found = []
    for direction, parent in ((TcDirection.INGRESS, CLSACT_INGRESS), (TcDirection.EGRESS, CLSACT_EGRESS)):
        filters = count_tc_filters(ifindex, parent)
        ours = query_tc(ifindex, direction, TC_HANDLE, TC_PRIORITY) in own_ids
        if filters > (1 if ours else 0):
            found.append(f"tc {direction.name.lower()} filter(s)")
    for direction, attach_type in ((TcDirection.INGRESS, BPF_TCX_INGRESS), (TcDirection.EGRESS, BPF_TCX_EGRESS)):
        if any(prog_id not in own_ids for prog_id in _tcx_programs(ifindex, attach_type)):
            found.append(f"tcx {direction.name.lower()} program(s)")
    status = query_xdp(ifindex)
    for mode in (XdpMode.NATIVE, XdpMode.GENERIC, XdpMode.OFFLOAD):
        prog_id = status.get(mode)
        if prog_id and prog_id not in own_ids:
            found.append(f"XDP program id {prog_id} ({mode.name.lower()})")
    return found


def valid_address(text: str, version: int) -> str:
    """Normalise an endpoint address of the given family; raises ValueError with a reason."""
    if "%" in text:
        raise ValueError(f"{summary(text)} has a scope (%zone); an endpoint address has none")
    address = ipaddress.ip_address(text)
    if address.version != version:
        raise ValueError(f"{text!r} is not an IPv{version} address")
    if address.is_multicast or address.is_unspecified or address.is_loopback:
        raise ValueError(f"{text!r} cannot be an endpoint address (multicast, unspecified or loopback)")
    if address.is_link_local:
        raise ValueError(f"{text!r} is link-local; endpoints reach their gateway there, give a routable address")
    if version == 4 and (address.is_reserved or address == ipaddress.IPv4Address("255.255.255.255")):
        raise ValueError(f"{text!r} is reserved or the broadcast address")
    if str(address) in (GATEWAY_V4, GATEWAY_V6):
        raise ValueError(f"{text!r} is the endpoints' gateway")
    return str(address)


def node_conflict(text: str, skip_ifindexes: set[int]) -> str:
    """Why an address cannot be an endpoint's on this node ("" when it can).

    It must not be one of the node's own addresses, the network or broadcast address of a
    subnet the node is on, or a neighbour that answered on a link that is not an endpoint's
    (skip_ifindexes, or any Weir-tagged veth: those entries are Weir's own).
    """
    address = ipaddress.ip_address(text)
    with IPRoute() as ipr:
        for entry in ipr.get_addr():
            own = entry.get_attr("IFA_ADDRESS") or entry.get_attr("IFA_LOCAL")
            if not own:
                continue
            interface = ipaddress.ip_interface(f"{own}/{entry['prefixlen']}")
            if interface.ip == address:
                return f"{address} is one of the node's own addresses"
            net = interface.network
            if address.version == 4 and net.prefixlen < 31 and address in (net.network_address, net.broadcast_address):
                return f"{address} is the network or broadcast address of the node's subnet {net}"
            if address.version == 6 and net.prefixlen < 127 and address == net.network_address:
                return f"{address} is the subnet-router anycast address of the node's subnet {net}"
        weir_links = {int(link["index"]) for link in ipr.get_links()
                      if str(link.get_attr("IFLA_IFALIAS") or "").startswith("weir/")}  # fmt: skip
        for neigh in ipr.get_neighbours():
            dst = neigh.get_attr("NDA_DST")
            ifindex = int(neigh["ifindex"])
            if not dst or ifindex in skip_ifindexes or ifindex in weir_links or neigh["state"] & NUD_NOT_THERE:
                continue
            if ipaddress.ip_address(dst) == address:
                return f"{address} is a neighbour of the node (on ifindex {ifindex})"
    return ""
