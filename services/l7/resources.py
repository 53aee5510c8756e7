"""Listeners and rules -> Envoy resources (clusters, listeners, route configurations).

The rules live in the route configuration (RDS), as a per-route RBAC policy on the one
virtual host, not in the listener: Envoy applies a new route configuration to the next
request of an open connection, while a changed listener drains its connections. The
listener's own RBAC filter denies everything, so a route that somehow lacks the
per-route policy fails closed.

Each rule is one RBAC policy named after the rule: its permission is the AND of RE2
full-match header matchers on ``:method``, ``:path`` and ``:authority`` plus the rule's
headers (present or exact), as Cilium builds its HTTP rules; a rule with no field
matches any request. Any policy matching allows; none matching is Envoy's 403. The RBAC
filter records the policy that allowed a request in its dynamic metadata, which the
access log carries back to us (see ``accesslog``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2, grpc_service_pb2, socket_option_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.tracing.v3 import custom_tag_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from services.l7.model import HttpRule, Listener, parse_upstream

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
TYPES = (CLUSTER, LISTENER, ROUTE)  # the order a change is pushed in
RBAC_FILTER = "envoy.filters.http.rbac"
# The bootstrap's cluster that reaches our gRPC server (xDS and the access log service).
CONTROL_CLUSTER = "weir_l7_control"
LISTENER_TAG = "weir.listener"  # access log custom tag naming the listener
ACCESS_LOG_FLUSH = duration_pb2.Duration(nanos=50_000_000)
CONNECT_TIMEOUT = duration_pb2.Duration(seconds=2)
SOL_SOCKET, SO_MARK = 1, 36  # Linux


def _any(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def _regex(header: str, pattern: str) -> route_components_pb2.HeaderMatcher:
    return route_components_pb2.HeaderMatcher(
        name=header, string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=pattern))
    )


def rule_permission(rule: HttpRule) -> rbac_config.Permission:
    """The RBAC permission of one rule: all of its matchers (none: any request)."""
    matchers = [
        _regex(h, v) for h, v in ((":method", rule.method), (":path", rule.path), (":authority", rule.host)) if v
    ]
    for header in rule.headers:
        if header.exact is None:
            matchers.append(route_components_pb2.HeaderMatcher(name=header.name.lower(), present_match=True))
        else:
            matchers.append(
                route_components_pb2.HeaderMatcher(
                    name=header.name.lower(), string_match=string_pb2.StringMatcher(exact=header.exact)
                )
            )
    permissions = [rbac_config.Permission(header=m) for m in matchers]
    if rule.destinations:
        permissions.append(
            rbac_config.Permission(
                or_rules=rbac_config.Permission.Set(
                    rules=[rbac_config.Permission(destination_ip=_cidr(d)) for d in rule.destinations]
                )
            )
        )
    if not permissions:
        return rbac_config.Permission(any=True)
    return rbac_config.Permission(and_rules=rbac_config.Permission.Set(rules=permissions))


def _cidr(text: str) -> address_pb2.CidrRange:
    network = ipaddress.ip_network(text)
    cidr = address_pb2.CidrRange(address_prefix=str(network.network_address))
    cidr.prefix_len.value = network.prefixlen
    return cidr


def rule_principal(rule: HttpRule) -> rbac_config.Principal:
    """Who a rule applies to: connections from its source CIDRs (none: anyone)."""
    if not rule.sources:
        return rbac_config.Principal(any=True)
    ids = [rbac_config.Principal(direct_remote_ip=_cidr(source)) for source in rule.sources]
    return rbac_config.Principal(or_ids=rbac_config.Principal.Set(ids=ids))


def rbac_rules(rules: tuple[HttpRule, ...]) -> rbac_config.RBAC:
    """ALLOW with one policy per rule; with no rule nothing is allowed."""
    return rbac_config.RBAC(
        action=rbac_config.RBAC.ALLOW,
        policies={
            rule.name: rbac_config.Policy(permissions=[rule_permission(rule)], principals=[rule_principal(rule)])
            for rule in rules
        },
    )


def cluster_name(listener: Listener) -> str:
    return f"{listener.name}/upstream"


def cluster(listener: Listener) -> cluster_pb2.Cluster:
    """The listener's upstream: a fixed address, or the connection's original destination."""
    name = cluster_name(listener)
    if not listener.upstream:
        result = cluster_pb2.Cluster(
            name=name,
            type=cluster_pb2.Cluster.ORIGINAL_DST,
            lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
            connect_timeout=CONNECT_TIMEOUT,
        )
        _mark(result, listener.upstream_mark)
        return result
    host, port = parse_upstream(listener.upstream, "upstream")
    endpoint = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=_socket(host, port))
    )
    result = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=CONNECT_TIMEOUT,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name, endpoints=[endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[endpoint])]
        ),
    )
    _mark(result, listener.upstream_mark)
    return result


def _mark(cluster: cluster_pb2.Cluster, mark: int) -> None:
    """SO_MARK on the cluster's upstream sockets (set before connect), so the datapath knows them."""
    if not mark:
        return
    cluster.upstream_bind_config.CopyFrom(
        address_pb2.BindConfig(
            source_address=address_pb2.SocketAddress(address="0.0.0.0", port_value=0),
            socket_options=[
                socket_option_pb2.SocketOption(
                    description="weir upstream mark",
                    level=SOL_SOCKET,
                    name=SO_MARK,
                    int_value=mark,
                    state=socket_option_pb2.SocketOption.STATE_PREBIND,
                )
            ],
        )
    )


def _socket(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def _stat_prefix(listener: Listener) -> str:
    return "l7_" + "".join(c if c.isalnum() else "_" for c in listener.name)


def access_log(listener: Listener) -> als_pb2.HttpGrpcAccessLogConfig:
    """Envoy's HTTP gRPC access logger, tagged with the listener's name."""
    return als_pb2.HttpGrpcAccessLogConfig(
        common_config=als_pb2.CommonGrpcAccessLogConfig(
            log_name="weir-l7",
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=CONTROL_CLUSTER)
            ),
            transport_api_version=config_source_pb2.V3,
            buffer_flush_interval=ACCESS_LOG_FLUSH,
            custom_tags=[
                custom_tag_pb2.CustomTag(
                    tag=LISTENER_TAG, literal=custom_tag_pb2.CustomTag.Literal(value=listener.name)
                )
            ],
        )
    )


def listener(item: Listener) -> listener_pb2.Listener:
    """The proxy port: HTTP connection manager, deny-all RBAC (overridden per route), router."""
    manager = hcm.HttpConnectionManager(
        stat_prefix=_stat_prefix(item),
        codec_type=hcm.HttpConnectionManager.AUTO,
        rds=hcm.Rds(
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
            ),
            route_config_name=item.name,
        ),
        http_filters=[
            hcm.HttpFilter(name=RBAC_FILTER, typed_config=_any(rbac_filter.RBAC(rules=rbac_rules(())))),
            hcm.HttpFilter(name="envoy.filters.http.router", typed_config=_any(router_pb2.Router())),
        ],
        access_log=[
            accesslog_pb2.AccessLog(name="envoy.access_loggers.http_grpc", typed_config=_any(access_log(item)))
        ],
    )
    result = listener_pb2.Listener(
        name=item.name,
        address=_socket(item.bind_address, item.proxy_port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=_any(manager)
                    )
                ]
            )
        ],
    )
    if item.transparent:
        result.transparent.CopyFrom(wrappers_pb2.BoolValue(value=True))
    if item.use_original_dst:
        # The connection was redirected (iptables REDIRECT, or a datapath that rewrites the
        # destination): this filter restores the local address from SO_ORIGINAL_DST, which
        # the ORIGINAL_DST cluster then connects to.
        result.listener_filters.append(
            listener_components_pb2.ListenerFilter(
                name="envoy.filters.listener.original_dst", typed_config=_any(original_dst_pb2.OriginalDst())
            )
        )
    return result


def route(item: Listener) -> route_pb2.RouteConfiguration:
    """One virtual host for every authority, one route to the upstream, the rules as RBAC."""
    per_route = rbac_filter.RBACPerRoute(rbac=rbac_filter.RBAC(rules=rbac_rules(item.rules)))
    return route_pb2.RouteConfiguration(
        name=item.name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="all",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        name=item.name,
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(cluster=cluster_name(item)),
                    )
                ],
                typed_per_filter_config={RBAC_FILTER: _any(per_route)},
            )
        ],
    )


@dataclass(frozen=True)
class Resources:
    """One generation of Envoy's configuration: per type URL, resource name -> packed resource."""

    version: int
    by_type: dict[str, dict[str, any_pb2.Any]]


def build(version: int, listeners: list[Listener]) -> Resources:
    """Every resource of every listener, ready to serve."""
    return Resources(
        version=version,
        by_type={
            CLUSTER: {cluster_name(x): _any(cluster(x)) for x in listeners},
            LISTENER: {x.name: _any(listener(x)) for x in listeners},
            ROUTE: {x.name: _any(route(x)) for x in listeners},
        },
    )
