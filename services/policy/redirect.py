"""The node's side of the L7 redirect: policy routing to the local stack and the hairpin device.

The policy program assigns a redirected packet to the proxy's socket (bpf_sk_assign) and
marks it `XfrmMark.L7_PROXY`; the stack must then deliver it locally although its
destination is another address. One policy-routing rule (`fwmark 0x0A00/0x0F00`) sends
such packets to a table whose only route is `local 0.0.0.0/0 dev lo`, as Cilium's proxy
routing does. Flows of ingress rules are judged at the host veth's egress, where no socket
can be assigned: the program sends them back into the stack through the ingress of a device
of the instance's own (`wl7<hash>`, one end of a veth pair tagged `weir-l7/<instance>`: any
device that receives will do, and veth is always built in), whose own program assigns them. Everything here is made with
pyroute2 and pybpf, never by running `ip`; it is idempotent, and left in place on stop so
the redirect keeps working while the service restarts. The sysctl it changes is recorded
for the node's teardown, which also removes the veth pair; the rule and the route, the same
for every instance of a namespace, stay.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import socket
import sys
from pathlib import Path

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pybpf import Map, Program, TcDirection, attach_tc
from services.common import sysctls
from services.common.config import NodeConfig
from services.common.datapath import L7_PROXY_ROUTE_TABLE, L7_PROXY_RULE_PRIORITY, XFRM_MARK_MASK, TcPriority, XfrmMark
from services.common.errors import FailedPrecondition

log = structlog.get_logger("weir.policy.redirect")

HAIRPIN_IFINDEX_KEY = 0  # keys of the l7_hairpin map (bpf/include/weir/l7.h)
PROXY_ADDRESS_KEY = 1
HAIRPIN_TAG = "weir-l7/"  # + the instance: the hairpin device's ifalias (not an endpoint tag)
EARLY_DEMUX = "/proc/sys/net/ipv4/tcp_early_demux"
RT_SCOPE_HOST = 254
RTN_LOCAL = 2


def hairpin_names(instance: str) -> tuple[str, str, str]:
    """The instance's hairpin device, its peer (up, otherwise unused) and its ifalias.

    Named per instance, so two instances in one namespace never share (or take over) one.
    """
    digest = hashlib.sha256(f"{instance}/l7-hairpin".encode()).hexdigest()[:8]
    return f"wl7{digest}", f"wl7p{digest}", f"{HAIRPIN_TAG}{instance}"


def proxy_address(instance: str) -> str:
    """The loopback address the instance's proxy listeners bind to (127.0.0.0/8 is all local).

    One per instance, never 127.0.0.1: the datapath finds the listener by (address, port), so
    two instances of one namespace, or any other program on the proxy port, can never
    receive the other's redirected flows.
    """
    digest = hashlib.sha256(f"{instance}/l7-proxy".encode()).digest()
    return f"127.{1 + digest[0] % 254}.{digest[1]}.{1 + digest[2] % 254}"


def remove_hairpin(instance: str) -> int:
    """Delete the instance's hairpin pair if it is there and tagged as ours; returns its ifindex or 0."""
    ifname, _peer, tag = hairpin_names(instance)
    with IPRoute() as ipr:
        for link in ipr.get_links(ifname=ifname):
            if str(link.get_attr("IFLA_IFALIAS") or "") == tag:
                ipr.link("del", index=link["index"])
                return int(link["index"])
    return 0


def _sysctl(path: str, value: str) -> None:
    Path("/proc/sys/net/ipv4", path).write_text(value)


def setup(config: NodeConfig, hairpin_program: Program, hairpin_map: Map) -> int:
    """Make the routing rule, the local table and the hairpin device (with its program); returns its ifindex."""
    with IPRoute() as ipr:
        rules = ipr.get_rules(family=socket.AF_INET, priority=L7_PROXY_RULE_PRIORITY)
        if not any(r.get_attr("FRA_TABLE") == L7_PROXY_ROUTE_TABLE for r in rules):
            ipr.rule(
                "add",
                family=socket.AF_INET,
                priority=L7_PROXY_RULE_PRIORITY,
                fwmark=int(XfrmMark.L7_PROXY),
                fwmask=XFRM_MARK_MASK,
                table=L7_PROXY_ROUTE_TABLE,
            )
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.route(
            "replace",
            dst="0.0.0.0/0",
            type=RTN_LOCAL,
            scope=RT_SCOPE_HOST,
            oif=lo,
            table=L7_PROXY_ROUTE_TABLE,
        )
        ifname, peer_name, tag = hairpin_names(config.instance)
        found = ipr.get_links(ifname=ifname) if ipr.link_lookup(ifname=ifname) else []
        if found and str(found[0].get_attr("IFLA_IFALIAS") or "") != tag:
            raise FailedPrecondition(f"interface {ifname} exists and is not this instance's L7 hairpin ({tag})")
        if not found:
            try:
                ipr.link("add", ifname=ifname, kind="veth", peer=peer_name)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
        index = int(ipr.link_lookup(ifname=ifname)[0])
        ipr.link("set", index=index, ifalias=tag)
        for peer in ipr.link_lookup(ifname=peer_name):
            ipr.link("set", index=peer, state="up")
        ipr.link("set", index=index, state="up")
    # A hairpinned packet's source is routed through another device: no reverse-path check here.
    _sysctl(f"conf/{ifname}/rp_filter", "0")
    # Once the proxy holds a connection's socket (its local address is the original
    # destination), TCP early demux would find that socket for the connection's next packets
    # on their first, forwarding pass through the node (to the destination endpoint, whose
    # hook hairpins them), and the kernel drops forwarded packets that carry a socket. The
    # packets the proxy must take are assigned their socket by the datapath anyway.
    # The old value is recorded, so the node's teardown puts it back.
    sysctls.set_recorded(config, {EARLY_DEMUX: "0"})
    attach_tc(index, hairpin_program, TcDirection.INGRESS, priority=int(TcPriority.L7_REDIRECT))
    config_map = hairpin_map.typed(ctypes.c_uint32, ctypes.c_uint32)
    config_map.update(HAIRPIN_IFINDEX_KEY, index)
    address = proxy_address(config.instance)
    config_map.update(PROXY_ADDRESS_KEY, int.from_bytes(socket.inet_aton(address), sys.byteorder))
    log.info("l7 redirect ready", hairpin=ifname, ifindex=index, table=L7_PROXY_ROUTE_TABLE)
    return index
