"""L7 HTTP rules through the rule API (ImportRules' messages): what is taken, and what is refused where.

Checked here so that nothing Envoy would refuse (a regex RE2 cannot compile, a header that is
not a token) ever reaches it, and so that L7 rules never sit where Cilium refuses them.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from weir.policy.v1 import policy_pb2 as pb

from services.common.errors import InvalidArgument, Unimplemented, WeirError
from services.policy.rules import HttpHeaderMatch, HttpRule, PortRule, from_proto

SEL = pb.EndpointSelector(match_labels={"app": "web"})


def rule(port: pb.PortRule, section: str = "ingress") -> pb.Rule:
    msg = pb.Rule(name="web", endpoint_selector=SEL)
    getattr(msg, section).append(pb.PeerRule(ports=[port]))
    return msg


def tcp(port: int = 80, *http: pb.HttpRule, **fields: object) -> pb.PortRule:
    return pb.PortRule(port=port, protocol=str(fields.pop("protocol", "TCP")), http=list(http), **fields)  # type: ignore[arg-type]


def test_http_rules_are_carried_whole() -> None:
    http = [
        pb.HttpRule(method="GET", path="/public(/.*)?"),
        pb.HttpRule(host="api\\.example\\.com", headers=[pb.HttpHeaderMatch(name="x-token", value="s3cret")]),
        pb.HttpRule(headers=[pb.HttpHeaderMatch(name="x-present"), pb.HttpHeaderMatch(name="x-empty", value="")]),
        pb.HttpRule(),
    ]
    parsed = from_proto(rule(tcp(80, *http)))
    assert parsed.ingress[0].ports == (
        PortRule(
            "TCP",
            80,
            80,
            "",
            (
                HttpRule("GET", "/public(/.*)?"),
                HttpRule("", "", "api\\.example\\.com", (HttpHeaderMatch("x-token", "s3cret"),)),
                HttpRule("", "", "", (HttpHeaderMatch("x-present"), HttpHeaderMatch("x-empty", ""))),
                HttpRule(),
            ),
        ),
    )
    named = from_proto(rule(pb.PortRule(name="http", protocol="TCP", http=[pb.HttpRule(method="GET")])))
    assert named.ingress[0].ports[0].http == (HttpRule("GET"),)


GET = pb.HttpRule(method="GET")
REFUSED: dict[str, tuple[pb.Rule, type[WeirError], str]] = {
    "ANY protocol": (rule(tcp(80, GET, protocol="")), InvalidArgument, "L7 rules can only apply to TCP (not ANY)"),
    "UDP": (rule(tcp(53, GET, protocol="UDP")), InvalidArgument, "L7 rules can only apply to TCP (not UDP)"),
    "port 0": (rule(tcp(0, GET)), InvalidArgument, "L7 rules can not be used when a port is 0"),
    "range": (rule(tcp(80, GET, end_port=90)), Unimplemented, "L7 rules on a port range"),
    "deny section": (rule(tcp(80, GET), "ingress_deny"), InvalidArgument, "a deny section takes no L7 rules"),
    "bad path regex": (
        rule(tcp(80, pb.HttpRule(path="/(a"))),
        InvalidArgument,
        "ingress[0].ports[0].http[0].path: '/(a' is not an RE2 regex",
    ),
    "lookahead": (rule(tcp(80, pb.HttpRule(method="(?=GET)GET"))), InvalidArgument, "http[0].method"),
    "regex Envoy finds too big": (rule(tcp(80, pb.HttpRule(host="a{1,1000}"))), InvalidArgument, "larger than Envoy"),
    "header name": (
        rule(tcp(80, pb.HttpRule(headers=[pb.HttpHeaderMatch(name="bad name")]))),
        InvalidArgument,
        "http[0].headers[0].name: 'bad name' is not an HTTP header name",
    ),
    "pseudo-header": (
        rule(tcp(80, pb.HttpRule(headers=[pb.HttpHeaderMatch(name=":path")]))),
        InvalidArgument,
        "headers[0].name",
    ),
    "header value CRLF": (
        rule(tcp(80, pb.HttpRule(headers=[pb.HttpHeaderMatch(name="x", value="a\r\nb")]))),
        InvalidArgument,
        "headers[0].value: a header value cannot hold CR, LF or NUL",
    ),
    "too many rules": (rule(tcp(80, *[GET] * 257)), InvalidArgument, "http rules"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_refused_http_rule_names_its_place(case: str) -> None:
    msg, status, place = REFUSED[case]
    with pytest.raises(status) as err:
        from_proto(msg)
    assert place in str(err.value), str(err.value)


TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    method=TEXT,
    path=TEXT,
    host=TEXT,
    headers=st.lists(st.tuples(TEXT, st.none() | TEXT), max_size=4),
    protocol=st.sampled_from(["TCP", "UDP", "ANY", "SCTP", "ICMP", "", "tcp"]),
    port=st.integers(0, 70000),
    end_port=st.integers(0, 70000),
    section=st.sampled_from(["ingress", "egress", "ingress_deny", "egress_deny"]),
)
def test_any_http_rule_input_is_taken_or_refused_with_a_status(
    method: str,
    path: str,
    host: str,
    headers: list[tuple[str, str | None]],
    protocol: str,
    port: int,
    end_port: int,
    section: str,
) -> None:
    matches = [pb.HttpHeaderMatch(name=n) if v is None else pb.HttpHeaderMatch(name=n, value=v) for n, v in headers]
    http = pb.HttpRule(method=method, path=path, host=host, headers=matches)
    msg = rule(pb.PortRule(port=port, end_port=end_port, protocol=protocol, http=[http]), section)
    try:
        parsed = from_proto(msg)
    except (InvalidArgument, Unimplemented):
        return
    [peer] = getattr(parsed, section)
    [taken] = peer.ports
    assert not section.endswith("_deny") and taken.protocol == "TCP" and taken.first == taken.last != 0
    assert taken.http[0].method == method and taken.http[0].path == path and taken.http[0].host == host
