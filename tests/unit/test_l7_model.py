"""L7 rules: validation before Envoy, the Envoy resources they become, the xDS exchange, access log entries."""

from __future__ import annotations

import pytest
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config
from envoy.config.route.v3 import route_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from services.common.errors import AlreadyExists, InvalidArgument
from services.l7 import model, resources
from services.l7.accesslog import event_of
from services.l7.model import HeaderMatch, HttpRule, Listener
from services.l7.xds import Ads

UP = "127.0.0.1:8080"


def web(*rules: HttpRule, proxy_port: int = 15001, port: int = 80, endpoint: str = "web") -> Listener:
    return Listener(endpoint, "ingress", port, proxy_port, tuple(rules), UP)


@pytest.mark.parametrize(
    ("rule", "where"),
    [
        (HttpRule("r", path=r"(a)\1"), "rules[0].path"),
        (HttpRule("r", path="(?!x)"), "rules[0].path"),
        (HttpRule("r", method="("), "rules[0].method"),
        (HttpRule("r", host="a{1000}"), "rules[0].host"),  # compiles, but over Envoy's program size
        (HttpRule("r", path="x" * 2000), "rules[0].path"),
        (HttpRule("bad name"), "rules[0].name"),
        (HttpRule(""), "rules[0].name"),
        (HttpRule("r", headers=(HeaderMatch("bad header"),)), "rules[0].headers[0].name"),
        (HttpRule("r", headers=(HeaderMatch(":path"),)), "rules[0].headers[0].name"),
        (HttpRule("r", headers=(HeaderMatch("x-a", "a\r\nb"),)), "rules[0].headers[0].exact"),
        (HttpRule("r", sources=("10.1.2.3/16",)), "rules[0].sources[0]"),
        (HttpRule("r", sources=("10.0.0.0/8", "nope")), "rules[0].sources[1]"),
    ],
)
def test_bad_rules_are_refused_naming_the_field(rule: HttpRule, where: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        model.check_endpoint("web", [web(rule)])
    assert str(err.value).startswith(f"listeners[0].{where}:"), err.value


def test_rules_python_re_would_take_differently_are_judged_by_re2() -> None:
    model.check_endpoint(
        "web", [web(HttpRule("ok", method="GET|HEAD", path="/api/v[0-9]+/.*", host=r".*\.example\.com"))]
    )
    with pytest.raises(InvalidArgument, match="not an RE2 regex"):
        model.check_regex(r"(?<=a)b", "x")  # lookbehind: Python's re compiles it


def test_listener_fields_and_node_conflicts() -> None:
    with pytest.raises(InvalidArgument, match="upstream"):
        model.check_endpoint("web", [Listener("web", "ingress", 80, 15001)])
    model.check_endpoint("web", [Listener("web", "ingress", 80, 15001, use_original_dst=True)])
    with pytest.raises(InvalidArgument, match="protocol"):
        model.check_endpoint("web", [Listener("web", "ingress", 80, 15001, (), UP, protocol="UDP")])
    with pytest.raises(InvalidArgument, match="also listeners"):
        model.check_endpoint("web", [web(), web(proxy_port=15002)])
    with pytest.raises(InvalidArgument, match="proxy_port"):
        model.check_endpoint("web", [web(), web(port=81)])
    with pytest.raises(InvalidArgument, match="used twice"):
        model.check_endpoint("web", [web(HttpRule("a"), HttpRule("a"))])
    with pytest.raises(AlreadyExists, match="db/ingress/5432"):
        model.check_node("web", [web()], [web(port=5432, endpoint="db")])
    model.check_node("web", [web()], [web(endpoint="web")])  # its own old listener does not count


def test_a_rule_is_an_and_of_full_match_header_matchers() -> None:
    rule = HttpRule("r", method="GET", path="/p", host="h", headers=(HeaderMatch("X-A"), HeaderMatch("x-b", "v")))
    permission = resources.rule_permission(rule)
    matchers = [p.header for p in permission.and_rules.rules]
    assert [m.name for m in matchers] == [":method", ":path", ":authority", "x-a", "x-b"]
    assert matchers[1].string_match.safe_regex.regex == "/p"
    assert matchers[3].present_match and matchers[4].string_match.exact == "v"
    assert resources.rule_permission(HttpRule("any")).any
    assert resources.rule_principal(HttpRule("any")).any
    ids = resources.rule_principal(HttpRule("r", sources=("10.0.0.0/8", "2001:db8::1/128"))).or_ids.ids
    assert [(p.direct_remote_ip.address_prefix, p.direct_remote_ip.prefix_len.value) for p in ids] == [
        ("10.0.0.0", 8), ("2001:db8::1", 128),
    ]  # fmt: skip


def test_rules_live_in_the_route_and_the_listener_denies_by_default() -> None:
    built = resources.build(7, [web(HttpRule("pub", path="/public"))])
    route = route_pb2.RouteConfiguration()
    built.by_type[resources.ROUTE]["web/ingress/80"].Unpack(route)
    per_route = rbac_filter.RBACPerRoute()
    route.virtual_hosts[0].typed_per_filter_config[resources.RBAC_FILTER].Unpack(per_route)
    assert per_route.rbac.rules.action == rbac_config.RBAC.ALLOW
    assert list(per_route.rbac.rules.policies) == ["pub"]
    empty = resources.rbac_rules(())
    assert empty.action == rbac_config.RBAC.ALLOW and not empty.policies  # allow nothing
    assert set(built.by_type[resources.CLUSTER]) == {"web/ingress/80/upstream"}
    again = resources.build(8, [web(HttpRule("other", path="/other"))])
    key = "web/ingress/80"
    assert again.by_type[resources.LISTENER][key] == built.by_type[resources.LISTENER][key], (
        "a rule change must not change the listener (Envoy would drain its connections)"
    )


def _request(type_url: str, names: list[str] = (), nonce: str = "", error: str = "") -> discovery_pb2.DiscoveryRequest:  # type: ignore[assignment]
    request = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=list(names), response_nonce=nonce)
    request.node.id = "n"
    if error:
        request.error_detail.code = 3
        request.error_detail.message = error
    return request


def _exchange(
    ads: Ads, stream: object, request: discovery_pb2.DiscoveryRequest
) -> list[discovery_pb2.DiscoveryResponse]:
    types = ads._on_request(stream, request)  # type: ignore[arg-type]
    return [r for t in types if (r := ads._response(stream, t)) is not None]  # type: ignore[arg-type]


def test_xds_acks_nacks_and_never_resends_a_refused_generation() -> None:
    from services.l7.xds import _Stream

    ads = Ads(resources.build(1, [web(HttpRule("a"))]))
    stream = _Stream(node="")
    ads._streams.append(stream)
    (cds,) = _exchange(ads, stream, _request(resources.CLUSTER))
    assert cds.version_info == "1" and len(cds.resources) == 1
    assert _exchange(ads, stream, _request(resources.CLUSTER, nonce=cds.nonce)) == []  # ACK
    (lds,) = _exchange(ads, stream, _request(resources.LISTENER))
    assert _exchange(ads, stream, _request(resources.LISTENER, nonce=lds.nonce)) == []
    (rds,) = _exchange(ads, stream, _request(resources.ROUTE, ["web/ingress/80", "unknown"]))
    assert len(rds.resources) == 1
    assert _exchange(ads, stream, _request(resources.ROUTE, ["web/ingress/80"], nonce=rds.nonce)) == []
    assert ads.status().acked_version == 1
    ads._current = resources.build(2, [web(HttpRule("b"))])
    (rds2,) = [r for t in resources.TYPES if (r := ads._response(stream, t)) and t == resources.ROUTE]
    refused = _request(resources.ROUTE, ["web/ingress/80"], nonce=rds2.nonce, error="bad regex")
    assert _exchange(ads, stream, refused) == [], "a NACK must not be answered with the same generation"
    status = ads.status()
    assert status.last_nack is not None and status.last_nack.version == 2 and status.last_nack.message == "bad regex"
    stale = _request(resources.ROUTE, ["web/ingress/80"], nonce=rds.nonce)
    assert _exchange(ads, stream, stale) == []  # answers a replaced response: ignored


def test_an_access_log_entry_becomes_an_event() -> None:
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.common_properties.custom_tags[resources.LISTENER_TAG] = "web/ingress/80"
    entry.common_properties.downstream_remote_address.socket_address.address = "127.0.0.1"
    entry.common_properties.downstream_remote_address.socket_address.port_value = 4000
    entry.common_properties.metadata.filter_metadata[resources.RBAC_FILTER].CopyFrom(
        struct_pb2.Struct(fields={"enforced_effective_policy_id": struct_pb2.Value(string_value="pub")})
    )
    entry.request.request_method = 1  # GET
    entry.request.path = "/public"
    entry.response.response_code.value = 200
    event = event_of(entry)
    assert (event.endpoint, event.method, event.path, event.status, event.rule, event.allowed) == (
        "web", "GET", "/public", 200, "pub", True,
    )  # fmt: skip
    assert event.source == "127.0.0.1:4000"
    entry.common_properties.metadata.Clear()
    entry.response.response_code.value = 403
    entry.response.response_code_details = "rbac_access_denied_matched_policy[none]"
    denied = event_of(entry)
    assert (denied.allowed, denied.rule, denied.status) == (False, "", 403)
