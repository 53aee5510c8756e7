"""The rule model: CiliumNetworkPolicy-shaped L3/L4 rules, validated.

Rules arrive as protobuf messages or as YAML/JSON documents of
CiliumNetworkPolicy-style objects (services.policy.cnp turns those into
messages); both become the same frozen dataclasses, and every problem is
reported with its place ("rule web: ingress[0].ports[1]: ...") and refused
before anything changes.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from google.protobuf import json_format
from weir.policy.v1 import policy_pb2 as pb

from services.common.errors import InvalidArgument, Unimplemented
from services.common.ipv4 import parse_ipv4_network
from services.common.validate import CidrError, Network, parse_cidr
from services.l7.model import TOKEN_RE as HTTP_TOKEN_RE
from services.l7.model import check_regex
from services.policy.limits import (
    MAX_CIDRS_PER_RULE,
    MAX_DESCRIPTION_CHARS,
    MAX_EXCEPTS_PER_CIDR,
    MAX_HTTP_HEADER_VALUE_CHARS,
    MAX_HTTP_HEADERS,
    MAX_HTTP_RULES_PER_PORT,
    MAX_LABELS_PER_SELECTOR,
    MAX_PEERS_PER_SECTION,
    MAX_PORTS_PER_RULE,
    MAX_SELECTORS_PER_PEER,
    MAX_SPECS_PER_RULE,
    MAX_VALUES_PER_EXPRESSION,
    at_most,
    shown,
)

PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132, "ICMP": 1, "ICMPV6": 58, "ANY": 0}
ICMP_PROTOCOLS = frozenset({"ICMP", "ICMPV6"})
ENTITIES = frozenset({"host", "world", "all", "cluster", "remote-node"})
# Entities Cilium knows (pkg/policy/api/entity.go) for which this node has no identity.
UNIMPLEMENTED_ENTITIES = frozenset(
    {"world-ipv4", "world-ipv6", "init", "ingress", "unmanaged", "health", "none", "kube-apiserver"}
)
OPERATORS = {"In", "NotIn", "Exists", "DoesNotExist"}
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a Kubernetes namespace (RFC 1123 label)
LABEL_KEY_RE = re.compile(r"^([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
# An IANA service name (RFC 6335 5.1), as Cilium's iana.IsSvcName, lowercase as Cilium stores it.
SERVICE_NAME_RE = re.compile(r"([a-z0-9]-?)*[a-z](-?[a-z0-9])*")
MAX_SERVICE_NAME_CHARS = 15
# What a CIDR may be made of (checked before parsing): no scope (%eth0), spaces or control characters.
CIDR_TEXT_RE = re.compile(r"[0-9A-Fa-f.:/]{1,64}")

# A rule message shorter than this cannot reach any per-rule count limit (_check_sizes).
SMALL_RULE_BYTES = 2 * min(MAX_PEERS_PER_SECTION, MAX_PORTS_PER_RULE, MAX_CIDRS_PER_RULE, MAX_EXCEPTS_PER_CIDR,
                           MAX_SELECTORS_PER_PEER, MAX_LABELS_PER_SELECTOR, MAX_VALUES_PER_EXPRESSION,
                           MAX_SPECS_PER_RULE, MAX_DESCRIPTION_CHARS)  # fmt: skip
WIRE = "wire"  # the stored document of a rule: {"wire": base64 of the enforced message}
MAX_CACHED_SELECTORS = 4096  # of each of selectors and port rules
_selectors: dict[bytes, Selector] = {}  # accepted selectors by their deterministic wire form
_ports: dict[tuple[bytes, bool], PortRule] = {}  # accepted port rules (no HTTP) by wire form and section kind

# Label sources a selector key may name ("k8s:app"); a key without one is "any" (Cilium's
# labels.ParseSelectLabel). An endpoint's label key without one is "k8s": endpoints model pods.
LABEL_SOURCES = frozenset({"any", "k8s", "reserved", "container", "cni", "unspec"})
# Sources Cilium gives identities this node labels otherwise (CIDRs have their own rules here).
UNIMPLEMENTED_SOURCES = frozenset({"cidr", "cidrgroup", "fqdn", "node", "gen", "directory"})
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
NAMESPACE_KEY = f"k8s:{NAMESPACE_LABEL}"
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels"  # labels of the pod's namespace
SECTIONS = ("ingress", "egress", "ingress_deny", "egress_deny")


def split_key(key: str, default: str = "any") -> tuple[str, str]:
    """(source, name) of a label key: "k8s:app" -> ("k8s", "app"); no source -> `default`."""
    source, colon, name = key.partition(":")
    return (source, name) if colon else (default, key)


def _labels_by_name(labels: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """An endpoint's labels as name -> [(source, value)]; a key without a source is a k8s label."""
    out: dict[str, list[tuple[str, str]]] = {}
    for key, value in labels.items():
        source, name = split_key(key, "k8s")
        out.setdefault(name, []).append((source, value))
    return out


def _values(by_name: dict[str, list[tuple[str, str]]], key: str) -> list[str]:
    """Values of the labels a selector key names: "any:" (or no source) takes every source."""
    source, name = split_key(key)
    return [v for s, v in by_name.get(name, ()) if source == "any" or s == source]


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str]

    def matches(self, labels: dict[str, str]) -> bool:
        return self._matches(_labels_by_name(labels))

    def _matches(self, by_name: dict[str, list[tuple[str, str]]]) -> bool:
        found = _values(by_name, self.key)
        if self.operator == "Exists":
            return bool(found)
        if self.operator == "DoesNotExist":
            return not found
        hit = any(v in self.values for v in found)
        return hit if self.operator == "In" else not hit  # NotIn: absent keys match, as in Kubernetes


@dataclass(frozen=True)
class Selector:
    """matchLabels and matchExpressions; empty selects everything. Keys may carry a label source."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        by_name = _labels_by_name(labels)
        return all(v in _values(by_name, k) for k, v in self.match_labels) and all(
            r._matches(by_name) for r in self.match_expressions
        )


@dataclass(frozen=True)
class CidrRule:
    network: Network
    excepts: tuple[Network, ...] = ()


@dataclass(frozen=True)
class HttpHeaderMatch:
    """A header that must be present (value None) or carry exactly value."""

    name: str
    value: str | None = None


@dataclass(frozen=True)
class HttpRule:
    """One request pattern (Cilium's PortRuleHTTP); empty fields match anything."""

    method: str = ""  # RE2, whole value
    path: str = ""  # RE2, whole value
    host: str = ""  # RE2, whole value
    headers: tuple[HttpHeaderMatch, ...] = ()


@dataclass(frozen=True)
class PortRule:
    protocol: str  # TCP, UDP, SCTP, ICMP (IPv4), ICMPV6, ANY (TCP, UDP and SCTP)
    first: int  # 0 with last 65535 (or 255 for ICMP types): every port
    last: int
    name: str = ""  # a named port, resolved per endpoint (first and last are then 0)
    http: tuple[HttpRule, ...] = ()  # L7 rules: the port's TCP flows go through Envoy


@dataclass(frozen=True)
class PeerRule:
    endpoints: tuple[Selector, ...] = ()
    cidrs: tuple[CidrRule, ...] = ()
    entities: tuple[str, ...] = ()
    ports: tuple[PortRule, ...] = ()

    @property
    def any_peer(self) -> bool:
        """Only ports given: every peer, on those ports (Cilium's L4-only rule)."""
        return not self.endpoints and not self.cidrs and not self.entities and bool(self.ports)


@dataclass(frozen=True)
class Rule:
    name: str
    selector: Selector
    ingress: tuple[PeerRule, ...] = ()
    egress: tuple[PeerRule, ...] = ()
    ingress_deny: tuple[PeerRule, ...] = ()
    egress_deny: tuple[PeerRule, ...] = ()
    description: str = ""
    namespace: str = ""  # "": cluster-wide; else the rule's selectors already carry the namespace
    default_deny_ingress: bool = True  # Cilium's enableDefaultDeny (unset is true)
    default_deny_egress: bool = True
    specs: tuple[Rule, ...] = ()  # further specs of the same policy (CNP `specs:`), same name and namespace
    wire: bytes = field(default=b"", compare=False, hash=False)  # the message as enforced, serialized

    @property
    def source(self) -> dict[str, Any]:
        """The message as enforced, as a stored document: its wire form in base64 (`from_stored`)."""
        return {WIRE: base64.b64encode(self.wire).decode("ascii")}

    @property
    def source_text(self) -> str:
        """`source` as the JSON text the store writes (base64 needs no escaping), for bulk writes."""
        return f'{{"{WIRE}":"{base64.b64encode(self.wire).decode("ascii")}"}}'

    def parts(self) -> tuple[Rule, ...]:
        """This spec and its further specs, each a rule of its own for computing maps."""
        return (self, *self.specs)

    @property
    def key(self) -> str:
        """The rule's unique name on the node: namespace/name, or the name of a cluster-wide rule."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def cidrs(self) -> Iterable[Network]:
        """Every CIDR the rule (all its specs) names, excepts included: each gets an identity."""
        for part in self.parts():
            for section in (part.ingress, part.egress, part.ingress_deny, part.egress_deny):
                for peer in section:
                    for c in peer.cidrs:
                        yield c.network
                        yield from c.excepts


# ---- namespaces, as Cilium's k8s/apis/cilium.io/utils (ParseToCiliumRule) ----


def peer_scope(keys: Sequence[str], namespace: str, selects_init: bool = False) -> str:
    """What a peer endpoint selector with these keys gets added, as Cilium's getEndpointSelector.

    "namespace": the requirement k8s:io.kubernetes.pod.namespace=<namespace> (a namespaced
    policy's peers default to its namespace); "exists": that label must exist (a cluster-wide
    policy's peers are pods, never reserved identities, unless its subject is reserved:init);
    "": nothing, because the selector names reserved labels, already constrains the namespace,
    or (namespaced) selects by namespace labels.
    """
    parsed = [split_key(k) for k in keys]
    if any(source == "reserved" for source, _ in parsed):
        return ""
    if any(name == NAMESPACE_LABEL and source in ("k8s", "any") for source, name in parsed):
        return ""
    if not namespace:
        return "" if selects_init else "exists"
    if any(name.startswith(NAMESPACE_LABELS_PREFIX) and source in ("k8s", "any") for source, name in parsed):
        return ""
    return "namespace"


def selector_keys(msg: pb.EndpointSelector) -> list[str]:
    return [*msg.match_labels, *(e.key for e in msg.match_expressions)]


def _confine(msg: pb.Rule, namespace: str, where: str) -> None:
    """Confine one spec of a namespaced rule to its namespace (idempotent: a stored rule already is)."""
    for key, value in msg.endpoint_selector.match_labels.items():
        source, name = split_key(key)
        if name == NAMESPACE_LABEL and source in ("k8s", "any") and value != namespace:
            raise InvalidArgument(
                f"{where}: endpoint_selector: {shown(key)} is {shown(value)}, but the rule is in namespace "
                f"{namespace!r}: a namespaced rule selects only endpoints of its own namespace"
            )
    msg.endpoint_selector.match_labels[NAMESPACE_KEY] = namespace
    for name in SECTIONS:
        for peer in getattr(msg, name):
            for selector in peer.endpoints:
                if peer_scope(selector_keys(selector), namespace) == "namespace":
                    selector.match_labels[NAMESPACE_KEY] = namespace


# ---- from protobuf ----


def check_label_key(key: str, where: str) -> str:
    """A selector key: an optional known source ("k8s:", "reserved:", ...) and a Kubernetes label key."""
    source, name = split_key(key)
    if source == "any" and ":" not in key and key.startswith("reserved."):
        raise InvalidArgument(
            f"{where}: label key {shown(key)} is ambiguous (Cilium may read it as a reserved label): "
            f"write reserved:{key.removeprefix('reserved.')} for a reserved label"
        )
    if source in UNIMPLEMENTED_SOURCES:
        raise Unimplemented(
            f"{where}: label key {shown(key)}: selecting {source}: labels is not supported by this node "
            "(CIDRs are selected with CIDR rules)"
        )
    if source not in LABEL_SOURCES:
        raise InvalidArgument(
            f"{where}: label key {shown(key)} has an unknown source {shown(source)}: use one of "
            f"{', '.join(sorted(LABEL_SOURCES))} (or none, which is any)"
        )
    if not LABEL_KEY_RE.fullmatch(name):
        raise InvalidArgument(f"{where}: label key {shown(key)} is not a valid label key")
    return key


def check_label_value(value: str, key: str, where: str) -> str:
    if not LABEL_VALUE_RE.fullmatch(value):
        raise InvalidArgument(f"{where}: label value {shown(value)} of {shown(key)} is not a valid label value")
    return value


def parse_selector(msg: pb.EndpointSelector, where: str) -> Selector:
    """A selector, checked; one that was accepted before comes from a cache (bulk imports repeat
    a few selectors thousands of times)."""
    wire = msg.SerializeToString(deterministic=True)
    known = _selectors.get(wire)
    if known is None:
        known = _parse_selector(msg, where)
        if len(_selectors) >= MAX_CACHED_SELECTORS:
            _selectors.clear()
        _selectors[wire] = known
    return known


def _parse_selector(msg: pb.EndpointSelector, where: str) -> Selector:
    for key, value in msg.match_labels.items():
        check_label_value(value, check_label_key(key, where), where)
    requirements = []
    for i, expr in enumerate(msg.match_expressions):
        place = f"{where}.match_expressions[{i}]"
        if expr.operator not in OPERATORS:
            raise InvalidArgument(
                f"{place}: operator {shown(expr.operator)} is not one of {', '.join(sorted(OPERATORS))}"
            )
        check_label_key(expr.key, place)
        for value in expr.values:
            check_label_value(value, expr.key, place)
        if expr.operator in ("In", "NotIn") and not expr.values:
            raise InvalidArgument(f"{place}: operator {expr.operator} needs at least one value")
        if expr.operator in ("Exists", "DoesNotExist") and expr.values:
            raise InvalidArgument(f"{place}: operator {expr.operator} takes no values")
        requirements.append(Requirement(expr.key, expr.operator, frozenset(expr.values)))
    return Selector(tuple(sorted(msg.match_labels.items())), tuple(requirements))


def check_cidr(text: str, where: str) -> Network:
    network = parse_ipv4_network(text)  # the common case, without the ipaddress parser
    if network is not None:
        return network
    if not CIDR_TEXT_RE.fullmatch(text):
        raise InvalidArgument(
            f"{where}: {shown(text)} is not a CIDR (an IPv4 or IPv6 prefix; a scope such as %eth0 is not accepted)"
        )
    try:
        return parse_cidr(text)
    except CidrError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None


def check_excepts(network: Network, excepts: Iterable[Network], where: str) -> None:
    for e in excepts:
        if e.version != network.version or not e.subnet_of(network):  # type: ignore[arg-type]
            raise InvalidArgument(f"{where}: except {e} is not inside {network}")


def check_service_name(name: str, where: str) -> str:
    """A named port: an IANA service name (at most 15 of a-z, 0-9 and single inner '-', one letter at least)."""
    if len(name) > MAX_SERVICE_NAME_CHARS or not SERVICE_NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"{where}: {shown(name)} is not a port name: at most {MAX_SERVICE_NAME_CHARS} lowercase letters, "
            "digits and single inner '-', with at least one letter (IANA service name syntax)"
        )
    return name


def _http(msg: pb.HttpRule, where: str) -> HttpRule:
    """One HTTP rule, checked as Envoy would check it (RE2, header syntax), so Envoy never refuses it."""
    for what in ("method", "path", "host"):
        value = getattr(msg, what)
        if value:
            check_regex(value, f"{where}.{what}")
    at_most(len(msg.headers), MAX_HTTP_HEADERS, f"{where}: headers")
    headers = []
    for i, h in enumerate(msg.headers):
        at = f"{where}.headers[{i}]"
        if not HTTP_TOKEN_RE.fullmatch(h.name):
            raise InvalidArgument(f"{at}.name: {shown(h.name)} is not an HTTP header name (RFC 7230 token)")
        if h.name.startswith(":"):
            raise InvalidArgument(f"{at}.name: pseudo-headers ({shown(h.name)}) are matched by method, path and host")
        value = h.value if h.HasField("value") else None
        if value is not None:
            if len(value) > MAX_HTTP_HEADER_VALUE_CHARS:
                raise InvalidArgument(f"{at}.value: longer than {MAX_HTTP_HEADER_VALUE_CHARS} characters")
            if any(c in value for c in "\r\n\x00"):
                raise InvalidArgument(f"{at}.value: a header value cannot hold CR, LF or NUL")
        headers.append(HttpHeaderMatch(h.name, value))
    return HttpRule(msg.method, msg.path, msg.host, tuple(headers))


def _port(msg: pb.PortRule, where: str, deny: bool = False) -> PortRule:
    port = _l4_port(msg, where)
    if not msg.http:
        return port
    # Cilium's PortRule validation: L7 rules only on TCP, never on port 0, never in deny sections.
    if deny:
        raise InvalidArgument(f"{where}.http: a deny section takes no L7 rules (Cilium's PortDenyRule has none)")
    if port.protocol != "TCP":
        raise InvalidArgument(f"{where}.http: L7 rules can only apply to TCP (not {port.protocol}); set protocol TCP")
    if not port.name and port.first == 0:
        raise InvalidArgument(f"{where}.http: L7 rules can not be used when a port is 0 (every port); name the port")
    if port.first != port.last:
        raise Unimplemented(f"{where}.http: L7 rules on a port range are not supported by this node; list the ports")
    at_most(len(msg.http), MAX_HTTP_RULES_PER_PORT, f"{where}: http rules")
    return replace(port, http=tuple(_http(h, f"{where}.http[{i}]") for i, h in enumerate(msg.http)))


def _l4_port(msg: pb.PortRule, where: str) -> PortRule:
    protocol = (msg.protocol or "ANY").upper()
    if protocol not in PROTOCOLS:
        raise InvalidArgument(f"{where}: protocol {shown(msg.protocol)} is not one of {', '.join(PROTOCOLS)}")
    if msg.name:
        check_service_name(msg.name, f"{where}.name")
        if protocol in ICMP_PROTOCOLS:
            raise InvalidArgument(f"{where}: a named port cannot be {protocol} (ICMP has types, not ports)")
        if msg.port or msg.end_port:
            raise InvalidArgument(f"{where}: a named port ({msg.name!r}) takes no port or end_port")
        return PortRule(protocol, 0, 0, msg.name)
    if msg.HasField("icmp_type"):
        if protocol not in ICMP_PROTOCOLS:
            raise InvalidArgument(f"{where}: icmp_type needs protocol ICMP or ICMPV6, not {protocol}")
        if msg.port or msg.end_port:
            raise InvalidArgument(f"{where}: icmp_type takes no port or end_port")
        if msg.icmp_type > 255:
            raise InvalidArgument(f"{where}: icmp_type {msg.icmp_type} is above 255")
        return PortRule(protocol, msg.icmp_type, msg.icmp_type)
    top = 255 if protocol in ICMP_PROTOCOLS else 65535
    what = "ICMP type" if protocol in ICMP_PROTOCOLS else "port"
    if msg.port > top:
        raise InvalidArgument(f"{where}: {what} {msg.port} is above {top}")
    if msg.end_port > top:
        raise InvalidArgument(f"{where}: end_port {msg.end_port} is above {top}")
    if msg.end_port and msg.end_port < msg.port:
        raise InvalidArgument(f"{where}: end_port {msg.end_port} is below port {msg.port}")
    if msg.end_port and not msg.port:
        raise InvalidArgument(f"{where}: end_port needs a port to start the range")
    if not msg.port:
        return PortRule(protocol, 0, top)
    return PortRule(protocol, msg.port, msg.end_port or msg.port)


def check_entity(entity: str, where: str) -> str:
    if entity in UNIMPLEMENTED_ENTITIES:
        raise Unimplemented(
            f"{where}: entity {shown(entity)} is not supported by this node (it has no such identity); "
            f"supported: {', '.join(sorted(ENTITIES))}"
        )
    if entity not in ENTITIES:
        raise InvalidArgument(f"{where}: entity {shown(entity)} is not one of {', '.join(sorted(ENTITIES))}")
    return entity


def _peer(msg: pb.PeerRule, where: str, deny: bool = False) -> PeerRule:
    cidrs = []
    for i, c in enumerate(msg.cidrs):
        excepts_text = getattr(c, "except")
        fast = None if excepts_text else parse_ipv4_network(c.cidr)  # the usual case, no place text built
        if fast is not None:
            cidrs.append(CidrRule(fast))
        else:
            network = check_cidr(c.cidr, f"{where}.cidrs[{i}]")
            excepts = tuple(check_cidr(e, f"{where}.cidrs[{i}].except") for e in excepts_text)
            check_excepts(network, excepts, f"{where}.cidrs[{i}]")
            cidrs.append(CidrRule(network, excepts))
    endpoints, entities, ports = msg.endpoints, msg.entities, msg.ports
    for entity in entities:
        check_entity(entity, where)
    return PeerRule(  # empty fields skipped: a bulk import's peers are mostly a CIDR and a port
        tuple([parse_selector(s, f"{where}.endpoints[{i}]") for i, s in enumerate(endpoints)]) if endpoints else (),
        tuple(cidrs),
        tuple(entities) if entities else (),
        tuple([_cached_port(p, where, i, deny) for i, p in enumerate(ports)]) if ports else (),
    )


def _cached_port(msg: pb.PortRule, where: str, index: int, deny: bool) -> PortRule:
    """`_port`, from a cache of accepted port rules without HTTP rules (bulk imports repeat a few)."""
    if msg.http:
        return _port(msg, f"{where}.ports[{index}]", deny)
    wire = (msg.SerializeToString(), deny)
    known = _ports.get(wire)
    if known is None:
        known = _port(msg, f"{where}.ports[{index}]", deny)
        if len(_ports) >= MAX_CACHED_SELECTORS:
            _ports.clear()
        _ports[wire] = known
    return known


def cidr_count(msg: pb.Rule) -> int:
    """The CIDRs (excepts included) a rule message names, its specs' too, counted without parsing them."""
    return len(cidr_texts(msg))


def cidr_texts(msg: pb.Rule) -> list[str]:
    """The CIDRs (excepts included) a rule message names, its specs' too, as given (not parsed)."""
    texts: list[str] = []
    for part in (msg, *msg.specs) if msg.specs else (msg,):
        for section in (part.ingress, part.egress, part.ingress_deny, part.egress_deny):
            for peer in section:
                for c in peer.cidrs:
                    texts.append(c.cidr)
                    texts.extend(getattr(c, "except"))
    return texts


def check_name(name: str) -> str:
    """A rule name, matched whole (a trailing newline is not part of a valid name)."""
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"rule name {shown(name)} is invalid: use lowercase letters, digits, '-' and '.', at most 63"
        )
    return name


def check_namespace(namespace: str, where: str) -> str:
    """A namespace: a DNS label (lowercase letters, digits and inner '-', at most 63), as Kubernetes'."""
    if not DNS_LABEL_RE.fullmatch(namespace):
        raise InvalidArgument(
            f"{where}: namespace {shown(namespace)} is invalid: use lowercase letters, digits and inner '-', at most 63"
        )
    return namespace


def _check_sizes(msg: pb.Rule, where: str) -> None:
    """The limits of one spec, from the message's counts alone (before anything is built).

    A message shorter than SMALL_RULE_BYTES cannot exceed any count limit (each counted item
    takes two bytes or more on the wire), so only its description's characters are looked at.
    """
    if msg.ByteSize() < SMALL_RULE_BYTES:
        if "\x00" in msg.description:
            raise InvalidArgument(f"{where}: description contains a NUL character")
        return
    sections = (msg.ingress, msg.egress, msg.ingress_deny, msg.egress_deny)
    for name, section in zip(SECTIONS, sections, strict=True):
        at_most(len(section), MAX_PEERS_PER_SECTION, f"{where}: {name} peers")
    at_most(sum(len(p.ports) for s in sections for p in s), MAX_PORTS_PER_RULE, f"{where}: ports")
    at_most(cidr_count(msg), MAX_CIDRS_PER_RULE, f"{where}: CIDRs (excepts included)")
    at_most(len(msg.description), MAX_DESCRIPTION_CHARS, f"{where}: description characters")
    selectors = [("endpoint_selector", msg.endpoint_selector)]
    for name, section in zip(SECTIONS, sections, strict=True):
        for i, peer in enumerate(section):
            at_most(len(peer.endpoints), MAX_SELECTORS_PER_PEER, f"{where}: {name}[{i}]: endpoint selectors")
            selectors += [(f"{name}[{i}].endpoints[{j}]", s) for j, s in enumerate(peer.endpoints)]
            for j, c in enumerate(peer.cidrs):
                at_most(len(getattr(c, "except")), MAX_EXCEPTS_PER_CIDR, f"{where}: {name}[{i}].cidrs[{j}]: excepts")
    for place, selector in selectors:
        at_most(len(selector.match_labels) + len(selector.match_expressions), MAX_LABELS_PER_SELECTOR,
                f"{where}: {place}: labels")  # fmt: skip
        for expr in selector.match_expressions:
            at_most(len(expr.values), MAX_VALUES_PER_EXPRESSION, f"{where}: {place}: values of {expr.key[:64]}")
    if "\x00" in msg.description:
        raise InvalidArgument(f"{where}: description contains a NUL character")


def _section(peers: Sequence[pb.PeerRule], field_name: str, where: str) -> tuple[PeerRule, ...]:
    if not peers:
        return ()
    deny = field_name.endswith("_deny")
    return tuple([_peer(p, f"{where}: {field_name}[{i}]", deny) for i, p in enumerate(peers)])


def _spec(msg: pb.Rule, name: str, namespace: str, where: str, specs: tuple[Rule, ...] = (), wire: bytes = b"") -> Rule:
    """One spec (the rule's own fields, or one of its `specs`) as a rule of the same name and namespace."""
    deny = msg.enable_default_deny
    return Rule(
        specs=specs,
        wire=wire,
        name=name,
        selector=parse_selector(msg.endpoint_selector, f"{where}: endpoint_selector"),
        ingress=_section(msg.ingress, "ingress", where),
        egress=_section(msg.egress, "egress", where),
        ingress_deny=_section(msg.ingress_deny, "ingress_deny", where),
        egress_deny=_section(msg.egress_deny, "egress_deny", where),
        description=msg.description,
        namespace=namespace,
        default_deny_ingress=deny.ingress if deny.HasField("ingress") else True,
        default_deny_egress=deny.egress if deny.HasField("egress") else True,
    )


def check_limits(msg: pb.Rule) -> None:
    """A rule message's name and the request limits on its sizes, from its counts alone."""
    check_name(msg.name)
    where = f"rule {msg.name}"
    at_most(len(msg.specs), MAX_SPECS_PER_RULE, f"{where}: specs")
    _check_sizes(msg, where)
    for i, spec in enumerate(msg.specs):
        _check_sizes(spec, f"{where}: specs[{i}]")


def from_proto(msg: pb.Rule, sized: bool = True) -> Rule:
    """Validate one rule message; raises InvalidArgument (or Unimplemented) naming the faulty field.

    `sized` applies the request limits too (`check_limits`); a stored rule (accepted when
    the limits may have been wider), or one whose limits were checked, goes without them.
    A namespaced rule's selectors are confined to its namespace here, as Cilium does for a
    CiliumNetworkPolicy; the rule's `source` is the message as enforced.
    """
    if sized:
        check_limits(msg)
    else:
        check_name(msg.name)
    where = f"rule {msg.name}"
    if msg.namespace:
        check_namespace(msg.namespace, where)
    for i, spec in enumerate(msg.specs):
        if spec.name or spec.namespace or spec.specs:
            raise InvalidArgument(
                f"{where}: specs[{i}]: a further spec takes its name and namespace from the rule and has no "
                "specs of its own; leave name, namespace and specs empty"
            )
    enforced = msg  # read, never changed, unless a namespace confines it (then a copy is)
    if msg.namespace:
        enforced = pb.Rule()
        enforced.CopyFrom(msg)
        _confine(enforced, msg.namespace, where)
        for i, spec in enumerate(enforced.specs):
            _confine(spec, msg.namespace, f"{where}: specs[{i}]")
    specs = tuple(_spec(s, msg.name, msg.namespace, f"{where}: specs[{i}]") for i, s in enumerate(enforced.specs))
    return _spec(enforced, msg.name, msg.namespace, where, specs, enforced.SerializeToString())


def from_stored(doc: dict[str, Any]) -> Rule:
    """A rule as `Rule.source` stored it (its wire form), or as a message's JSON (older stores)."""
    wire = doc.get(WIRE)
    if isinstance(wire, str) and len(doc) == 1:
        return from_proto(pb.Rule.FromString(base64.b64decode(wire, validate=True)), sized=False)
    return from_proto(json_format.ParseDict(doc, pb.Rule()), sized=False)


def to_proto(rule: Rule) -> pb.Rule:
    return pb.Rule.FromString(rule.wire)


def from_document(text: str) -> list[pb.Rule]:
    """Rule messages from a YAML or JSON document of CiliumNetworkPolicy objects (services.policy.cnp)."""
    from services.policy import cnp  # imported here: cnp builds on this module

    return cnp.from_document(text)
