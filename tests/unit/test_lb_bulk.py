"""The LB's bulk shortcuts give exactly what the slow paths give: address checks and store documents."""

from __future__ import annotations

import ipaddress

import pytest
from google.protobuf import json_format
from weir.lb.v1 import lb_pb2 as pb

from services.common import validate
from services.common.errors import InvalidArgument
from services.common.ipv4 import parse_ipv4, parse_ipv4_network, plain_unicast
from services.lb import model
from services.lb.defs import BackendState
from services.lb.model import Backend, HealthCheck, Service

TEXTS = [
    "10.0.0.1", "192.168.255.254", "1.2.3.4", "0.0.0.0", "127.0.0.1", "169.254.1.1", "224.0.0.1",
    "239.255.255.255", "240.0.0.1", "255.255.255.255", "255.255.255.254", "9.9.9.9", "100.64.0.1",
    "010.0.0.1", "1.2.3", "1.2.3.4.5", "1.2.3.256", "1..3.4", " 1.2.3.4", "1.2.3.4 ", "\uff11.2.3.4",
    "1.2.3.+4", "1.2.3.-4", "", "::1", "2001:db8::1", "::ffff:1.2.3.4", "1.2.3.4/32", "1.2.3.4%eth0",
    "a.b.c.d", "1.2.3.0x1", "1_0.2.3.4",
]  # fmt: skip


@pytest.mark.parametrize("text", TEXTS)
def test_parse_ipv4_takes_only_canonical_dotted_quads(text: str) -> None:
    value = parse_ipv4(text)
    if value is None:
        with pytest.raises(ValueError):
            assert str(ipaddress.IPv4Address(text)) == text  # not canonical: ipaddress refuses or rewrites it
    else:
        assert value == int(ipaddress.IPv4Address(text))
        ip = ipaddress.IPv4Address(value)
        assert plain_unicast(value) == (
            not (ip.is_unspecified or ip.is_loopback or ip.is_link_local or ip.is_multicast)
            and text != "255.255.255.255"
        )


@pytest.mark.parametrize("text", TEXTS)
def test_lb_addresses_are_checked_as_the_full_check_does(text: str) -> None:
    """Same address accepted, or the same refusal message, with or without the shortcut."""
    try:
        want: str | Exception = str(validate.address(text, "where", versions=(4,), unicast=True))
    except InvalidArgument as exc:
        want = exc
    if isinstance(want, str):
        assert model._address(text, "where") == want
    else:
        with pytest.raises(InvalidArgument) as got:
            model._address(text, "where")
        assert str(got.value) == str(want)


SERVICES = [
    Service("a", False, "10.0.0.1", 80, "TCP", (Backend("10.1.0.1", 8080),)),
    Service(
        "b", True, "", 30000, "UDP",
        (Backend("10.1.0.1", 8080, 0, BackendState.TERMINATING, False),
         Backend("10.1.0.2", 1, 7, BackendState.MAINTENANCE)),
        True, 1021, 2**63 + 5, 300, HealthCheck(100, 50, 3, 4),
    ),
    Service("c", False, "10.0.0.2", 65535, "TCP", (), False, 4093, 0, 0, HealthCheck(0, 1000, 2, 2)),
]  # fmt: skip


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
def test_store_documents_equal_the_protobuf_json_form(service: Service) -> None:
    doc = model.to_doc(service)
    assert doc == json_format.MessageToDict(model.to_proto(service), preserving_proto_field_name=True)
    parsed = model.from_proto(json_format.ParseDict(doc, pb.Service()))  # what a restart reads back
    assert (parsed.name, parsed.address, parsed.port, parsed.seed) == (service.name, service.address, service.port,
                                                                        service.seed)  # fmt: skip
    assert [(b.key, b.weight, b.state) for b in parsed.backends] == [
        (b.key, b.weight, b.state) for b in service.backends
    ]


NETWORKS = [
    "10.0.0.0/8", "10.0.0.1/32", "0.0.0.0/0", "10.0.0.1/8", "10.0.0.0/08", "10.0.0.0/33", "10.0.0.0/",
    "10.0.0.0", "010.0.0.0/8", "::/0", "10.0.0.0/-1", "10.0.0.0/ 8", " 10.0.0.0/8", "255.255.255.255/32",
    "10.0.0.0/0", "192.168.0.0/16", "192.168.1.0/23", "1.2.3.4/31", "1.2.3.4/30",
]  # fmt: skip


@pytest.mark.parametrize("text", NETWORKS)
def test_parse_ipv4_network_takes_only_canonical_strict_prefixes(text: str) -> None:
    """Whatever it returns equals ipaddress's strict parse; None leaves the text to ipaddress."""
    network = parse_ipv4_network(text)
    if network is not None:
        assert network == ipaddress.ip_network(text) and str(network) == text
    else:  # not canonical IPv4: ipaddress refuses it, writes it otherwise, or it is IPv6
        try:
            parsed = ipaddress.ip_network(text)
        except ValueError:
            return
        assert parsed.version == 6 or str(parsed) != text
