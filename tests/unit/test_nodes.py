"""Remote node records: what a node record may hold, and the routes and tunnel entries it gives."""

from __future__ import annotations

import ipaddress

import pytest

from services.common.datapath import TunnelValue
from services.common.errors import InvalidArgument
from services.common.overlay import overlay_ifname
from services.orchestrator.ipcache import AF_INET, AF_INET6
from services.orchestrator.nodes import NodeRecord, local_record, parse_record
from services.orchestrator.routing import (
    Route,
    overlay_alias,
    overlay_mac,
    routes_of,
    tunnel_address,
    tunnel_value,
)


def record(**fields: object) -> NodeRecord:
    base: dict[str, object] = {
        "name": "node-b",
        "node_id": 2,
        "addresses": ["172.31.0.2", "fd00:31::2"],
        "cidrs": ["10.2.0.0/24", "fd00:e:2::/64"],
        "routing": "direct",
        "key_index": 0,
    }
    base.update(fields)
    return parse_record(**base)  # type: ignore[arg-type]


def test_a_valid_record_is_normalised_and_round_trips_through_the_store_document() -> None:
    r = record(addresses=["fd00:31:0::2", "172.31.0.2"], routing="VXLAN", key_index=15)
    assert r.addresses == ("fd00:31::2", "172.31.0.2")
    assert r.routing == "vxlan"
    assert NodeRecord.from_doc(r.to_doc()) == r


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"name": "Node_B"}, "node name"),
        ({"name": ""}, "node name"),
        ({"node_id": 0}, "out of range (1-65535)"),
        ({"node_id": 65536}, "out of range (1-65535)"),
        ({"routing": "bgp"}, "not one of direct, vxlan"),
        ({"key_index": 16}, "key_index 16"),
        ({"addresses": []}, "at least one underlay address"),
        ({"addresses": ["172.31.0.2", "172.31.0.3"]}, "two underlay addresses of one IP version"),
        ({"addresses": ["172.31.0.2", "fd00:31::2", "fd00:31::3"]}, "at most one IPv4 and one IPv6"),
        ({"addresses": ["224.0.0.1"]}, "multicast"),
        ({"addresses": ["fe80::1"]}, "link-local"),
        ({"addresses": ["fd00:31::2%eth0"]}, "scope"),
        ({"cidrs": ["10.2.0.1/24"]}, "host bits set"),
        ({"cidrs": ["0.0.0.0/0"]}, "default route"),
        ({"cidrs": ["10.2.0.0/24", "10.2.0.128/25"]}, "overlap"),
        ({"cidrs": ["172.31.0.0/24"]}, "lies in its endpoint CIDR"),
        ({"addresses": ["172.31.0.2"], "cidrs": ["fd00:e:2::/64"]}, "no IPv6 underlay address"),
    ],
)
def test_bad_records_are_refused_with_a_message_naming_the_problem(fields: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        record(**fields)
    assert words in str(err.value)


def test_vxlan_carries_any_family_over_a_single_underlay_address() -> None:
    r = record(addresses=["172.31.0.2"], routing="vxlan")
    assert routes_of(r) == {
        Route(ipaddress.ip_network("10.2.0.0/24"), ""),
        Route(ipaddress.ip_network("fd00:e:2::/64"), ""),
    }
    assert tunnel_address(r) == "172.31.0.2"


def test_direct_routes_go_via_the_underlay_address_of_their_family() -> None:
    r = record()
    assert routes_of(r) == {
        Route(ipaddress.ip_network("10.2.0.0/24"), "172.31.0.2"),
        Route(ipaddress.ip_network("fd00:e:2::/64"), "fd00:31::2"),
    }


def test_tunnel_value_holds_the_ipv4_address_first_and_the_key_index() -> None:
    v = tunnel_value(record(routing="vxlan", key_index=3))
    assert (v.family, v.key_index, v.node_id) == (AF_INET, 3, 2)
    assert bytes(v.addr)[:4] == ipaddress.ip_address("172.31.0.2").packed
    v6 = tunnel_value(record(addresses=["fd00:31::2"], routing="vxlan"))
    assert v6.family == AF_INET6 and bytes(v6.addr) == ipaddress.ip_address("fd00:31::2").packed
    assert TunnelValue.addr.size == 16


def test_the_local_record_may_lack_an_address_but_not_be_malformed() -> None:
    assert local_record("weir", 1, [], ["10.1.0.0/24"], "direct").addresses == ()
    with pytest.raises(InvalidArgument):
        local_record("weir", 70000, [], [], "direct")


def test_overlay_device_names_fit_ifnamsiz_and_macs_differ_per_instance() -> None:
    names = {overlay_ifname(f"node-{i}") for i in range(50)}
    assert len(names) == 50 and all(len(n) <= 15 for n in names)
    macs = {overlay_mac(f"node-{i}") for i in range(50)}
    assert len(macs) == 50 and all(m.startswith("02:") for m in macs)  # locally administered, unicast
    assert overlay_alias("a") != overlay_alias("b") and not overlay_alias("a").startswith("weir/a/")
