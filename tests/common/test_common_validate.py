"""Validation of addresses, CIDRs, ports, protocols and names, without a kernel."""

from __future__ import annotations

import ipaddress
import re

import pytest

from services.common import validate
from services.common.errors import InvalidArgument
from services.common.validate import CidrError, parse_cidr


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("192.0.2.7", "192.0.2.7/32"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:db8::1", "2001:db8::1/128"),
        (" 0.0.0.0/0 ", "0.0.0.0/0"),
    ],
)
def test_valid_cidrs(text: str, expected: str) -> None:
    assert parse_cidr(text) == ipaddress.ip_network(expected)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        ("10.1.2/24", "not an IPv4 or IPv6 address"),
        ("10.0.0.0/33", "out of range for IPv4 (0-32)"),
        ("2001:db8::/129", "out of range for IPv6 (0-128)"),
        ("10.0.0.0/x", "not a number"),
        ("10.1.2.3/16", "host bits set: the network of 10.1.2.3/16 is 10.1.0.0/16"),
    ],
)
def test_bad_cidrs_say_why(text: str, reason: str) -> None:
    with pytest.raises(CidrError, match=re.escape(reason)):
        parse_cidr(text)


def test_cidr_of_a_field_names_the_field() -> None:
    with pytest.raises(InvalidArgument, match=r"^rules\[2\]\.cidr: '10\.1\.2\.3/16' has host bits set"):
        validate.cidr("10.1.2.3/16", "rules[2].cidr")
    assert validate.is_host(validate.cidr("2001:db8::1", "x"))


@pytest.mark.parametrize(
    ("text", "kw", "reason"),
    [
        ("198.19.0.300", {}, "'198.19.0.300' is not an IP address"),
        ("2001:db8::1", {"versions": (4,)}, "2001:db8::1 is IPv6; only IPv4 is accepted here"),
        ("0.0.0.0", {"unicast": True}, "0.0.0.0 cannot be used"),
        ("224.0.0.1", {"unicast": True}, "224.0.0.1 cannot be used"),
        ("127.0.0.1", {"unicast": True}, "127.0.0.1 cannot be used"),
    ],
)
def test_bad_addresses_say_why(text: str, kw: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(f"backend: {reason}")):
        validate.address(text, "backend", **kw)  # type: ignore[arg-type]


def test_good_addresses_are_normalised() -> None:
    assert str(validate.address("2001:DB8::0:1", "x")) == "2001:db8::1"
    assert str(validate.address("198.18.0.10", "x", versions=(4,), unicast=True)) == "198.18.0.10"


def test_ports() -> None:
    assert validate.port(1, "p") == 1 and validate.port(65535, "p") == 65535
    assert validate.port(0, "p", allow_zero=True) == 0
    for bad in (0, -1, 65536):
        with pytest.raises(InvalidArgument, match=f"port {bad} is out of range"):
            validate.port(bad, "frontend")


def test_protocols() -> None:
    assert validate.protocol("", "svc") == "TCP"
    assert validate.protocol("udp", "svc") == "UDP"
    assert validate.protocol_number("UDP") == 17
    with pytest.raises(InvalidArgument, match="protocol 'SCTP' is not TCP or UDP"):
        validate.protocol("SCTP", "svc")


@pytest.mark.parametrize("good", ["web", "a", "web-1.prod", "0abc"])
def test_good_names(good: str) -> None:
    assert validate.name(good, "service") == good


@pytest.mark.parametrize("bad", ["", "Web", "-web", "web-", "a_b", "x" * 64])
def test_bad_names(bad: str) -> None:
    with pytest.raises(InvalidArgument, match=f"service name {re.escape(repr(bad))} is invalid"):
        validate.name(bad, "service")


@pytest.mark.parametrize("text", ["fe80::5%eth0", "fe80::%eth0/64", "2001:db8::1%1", "fe80::5%"])
def test_scoped_addresses_are_refused_as_cidrs_and_addresses(text: str) -> None:
    with pytest.raises(CidrError, match="scope"):
        parse_cidr(text)
    with pytest.raises(InvalidArgument, match=r"^entries\[0\]: .*scope"):
        validate.cidr(text, "entries[0]")
    with pytest.raises(InvalidArgument, match="scope"):
        validate.address(text.partition("/")[0], "backend")


def test_link_local_is_no_frontend_or_backend_but_may_be_a_cidr() -> None:
    for text in ("169.254.1.1", "fe80::1"):
        with pytest.raises(InvalidArgument, match="link-local"):
            validate.address(text, "backend", unicast=True)
        assert validate.address(text, "source")  # a neighbour's address is still an address
    with pytest.raises(InvalidArgument, match="broadcast"):
        validate.address("255.255.255.255", "backend", unicast=True)
    # A deny-list entry for a rogue host on the link is a reasonable thing to want.
    assert parse_cidr("169.254.0.0/16") and parse_cidr("fe80::/10") and parse_cidr("fe80::5")


@pytest.mark.parametrize("bad", ["web\n", "web\n\n", "\nweb", "web\x00", "w" * 100_000])
def test_names_are_matched_whole(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="service name") as err:
        validate.name(bad, "service")
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("good", ["eth0", "wnet0", "lxc1234567890ab", "veth-a.b_c@x"])
def test_good_interface_names(good: str) -> None:
    assert validate.interface(good) == good


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("", "required"),
        ("eth\x000", "NUL"),
        ("a/b", "'/'"),
        ("a:b", "':'"),
        ("eth0\n", "whitespace"),
        ("a b", "whitespace"),
        (".", "'.'"),
        ("..", "'..'"),
        ("x" * 16, "16 bytes; the kernel allows at most 15"),
        ("é" * 8, "16 bytes"),
        ("x" * 100_000, "100000 bytes"),
    ],
)
def test_bad_interface_names_say_why(bad: str, reason: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(reason)) as err:
        validate.interface(bad, "interface")
    assert str(err.value).startswith("interface: ") and len(str(err.value)) < 300


def test_unknown_enum_values_are_refused_naming_the_field() -> None:
    modes = {0: "deny", 1: "deny", 2: "audit"}
    assert validate.choice(2, modes, "entries[0].mode") == "audit"
    with pytest.raises(InvalidArgument, match=r"^entries\[3\]\.mode: unknown value 99; expected one of 0, 1, 2$"):
        validate.choice(99, modes, "entries[3].mode")
    with pytest.raises(InvalidArgument, match="unknown value -1"):
        validate.choice(-1, modes, "mode")


def test_limits_name_the_limit() -> None:
    validate.at_most(10, 10, "entries")
    with pytest.raises(InvalidArgument, match="11 entries in one request is over the limit of 10"):
        validate.at_most(11, 10, "entries")


def test_long_request_text_is_quoted_short() -> None:
    huge = "1" * 100_000
    for call in (lambda: parse_cidr(huge), lambda: validate.address(huge, "x"),
                 lambda: validate.protocol(huge, "svc")):  # fmt: skip
        with pytest.raises((CidrError, InvalidArgument)) as err:
            call()
        assert "100000 characters" in str(err.value) and len(str(err.value)) < 300
    assert validate.shown("short") == "'short'"
