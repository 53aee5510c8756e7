"""The rule model: CiliumNetworkPolicy-shaped L3/L4 rules, validated.

Rules arrive as protobuf messages or as YAML/JSON documents of
CiliumNetworkPolicy-style objects; both become the same frozen dataclasses,
and every problem is reported with its place ("rule web: ingress[0].ports[1]:
...") and refused before anything changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from weir.policy.v1 import policy_pb2 as pb

from services.common.errors import InvalidArgument
from services.common.validate import CidrError, Network, parse_cidr
from services.policy.limits import (
    MAX_CIDRS_PER_RULE,
    MAX_DESCRIPTION_CHARS,
    MAX_EXCEPTS_PER_CIDR,
    MAX_LABELS_PER_SELECTOR,
    MAX_PEERS_PER_SECTION,
    MAX_PORTS_PER_RULE,
    MAX_RULES_PER_REQUEST,
    MAX_SELECTORS_PER_PEER,
    MAX_VALUES_PER_EXPRESSION,
    at_most,
    load_documents,
    shown,
)

PROTOCOLS = {"TCP": 6, "UDP": 17, "ICMP": 1, "ANY": 0}
ENTITIES = {"host", "world", "all"}
OPERATORS = {"In", "NotIn", "Exists", "DoesNotExist"}
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
# What a CIDR may be made of (checked before parsing): no scope (%eth0), spaces or control characters.
CIDR_TEXT_RE = re.compile(r"[0-9A-Fa-f.:/]{1,64}")


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str]

    def matches(self, labels: dict[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values  # NotIn (absent keys match, as in Kubernetes)


@dataclass(frozen=True)
class Selector:
    """matchLabels and matchExpressions; empty selects everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.match_expressions
        )


@dataclass(frozen=True)
class CidrRule:
    network: Network
    excepts: tuple[Network, ...] = ()


@dataclass(frozen=True)
class PortRule:
    protocol: str  # TCP, UDP, SCTP, ICMP (IPv4), ICMPV6, ANY (TCP, UDP and SCTP)
    first: int  # 0 with last 65535 (or 255 for ICMP types): every port
    last: int
    name: str = ""  # a named port, resolved per endpoint (first and last are then 0)


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
    source: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def parts(self) -> tuple[Rule, ...]:
        """This spec and its further specs, each a rule of its own for computing maps."""
        return (self, *self.specs)

    @property
    def key(self) -> str:
        """The rule's unique name on the node: namespace/name, or the name of a cluster-wide rule."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    def cidrs(self) -> Iterable[Network]:
        """Every CIDR the rule names, excepts included: each gets an identity."""
        for section in (self.ingress, self.egress, self.ingress_deny, self.egress_deny):
            for peer in section:
                for c in peer.cidrs:
                    yield c.network
                    yield from c.excepts


# ---- from protobuf ----


def _label_key(key: str, where: str) -> str:
    if not LABEL_KEY_RE.fullmatch(key):
        raise InvalidArgument(f"{where}: label key {shown(key)} is not a valid label key")
    return key


def _label_value(value: str, key: str, where: str) -> str:
    if not LABEL_VALUE_RE.fullmatch(value):
        raise InvalidArgument(f"{where}: label value {shown(value)} of {shown(key)} is not a valid label value")
    return value


def _selector(msg: pb.EndpointSelector, where: str) -> Selector:
    for key, value in msg.match_labels.items():
        _label_value(value, _label_key(key, where), where)
    requirements = []
    for i, expr in enumerate(msg.match_expressions):
        place = f"{where}.match_expressions[{i}]"
        if expr.operator not in OPERATORS:
            raise InvalidArgument(
                f"{place}: operator {shown(expr.operator)} is not one of {', '.join(sorted(OPERATORS))}"
            )
        _label_key(expr.key, place)
        for value in expr.values:
            _label_value(value, expr.key, place)
        if expr.operator in ("In", "NotIn") and not expr.values:
            raise InvalidArgument(f"{place}: operator {expr.operator} needs at least one value")
        if expr.operator in ("Exists", "DoesNotExist") and expr.values:
            raise InvalidArgument(f"{place}: operator {expr.operator} takes no values")
        requirements.append(Requirement(expr.key, expr.operator, frozenset(expr.values)))
    return Selector(tuple(sorted(msg.match_labels.items())), tuple(requirements))


def _cidr(text: str, where: str) -> Network:
    if not CIDR_TEXT_RE.fullmatch(text):
        raise InvalidArgument(
            f"{where}: {shown(text)} is not a CIDR (an IPv4 or IPv6 prefix; a scope such as %eth0 is not accepted)"
        )
    try:
        return parse_cidr(text)
    except CidrError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None


def _port(msg: pb.PortRule, where: str) -> PortRule:
    protocol = (msg.protocol or "ANY").upper()
    if protocol not in PROTOCOLS:
        raise InvalidArgument(f"{where}: protocol {shown(msg.protocol)} is not one of TCP, UDP, ICMP, ANY")
    top = 255 if protocol == "ICMP" else 65535
    what = "ICMP type" if protocol == "ICMP" else "port"
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


def _peer(msg: pb.PeerRule, where: str) -> PeerRule:
    cidrs = []
    for i, c in enumerate(msg.cidrs):
        network = _cidr(c.cidr, f"{where}.cidrs[{i}]")
        excepts = tuple(_cidr(e, f"{where}.cidrs[{i}].except") for e in getattr(c, "except"))
        for e in excepts:
            if e.version != network.version or not e.subnet_of(network):  # type: ignore[arg-type]
                raise InvalidArgument(f"{where}.cidrs[{i}]: except {e} is not inside {network}")
        cidrs.append(CidrRule(network, excepts))
    for entity in msg.entities:
        if entity not in ENTITIES:
            raise InvalidArgument(f"{where}: entity {shown(entity)} is not one of {', '.join(sorted(ENTITIES))}")
    return PeerRule(
        endpoints=tuple(_selector(s, f"{where}.endpoints[{i}]") for i, s in enumerate(msg.endpoints)),
        cidrs=tuple(cidrs),
        entities=tuple(msg.entities),
        ports=tuple(_port(p, f"{where}.ports[{i}]") for i, p in enumerate(msg.ports)),
    )


def cidr_count(msg: pb.Rule) -> int:
    """The CIDRs (excepts included) a rule message names, counted without parsing them."""
    return sum(
        1 + len(getattr(c, "except"))
        for section in (msg.ingress, msg.egress, msg.ingress_deny, msg.egress_deny)
        for peer in section
        for c in peer.cidrs
    )


def check_name(name: str) -> str:
    """A rule name, matched whole (a trailing newline is not part of a valid name)."""
    if not NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"rule name {shown(name)} is invalid: use lowercase letters, digits, '-' and '.', at most 63"
        )
    return name


def _check_sizes(msg: pb.Rule, where: str) -> None:
    """The limits of one rule, from the message's counts alone (before anything is built)."""
    sections = (msg.ingress, msg.egress, msg.ingress_deny, msg.egress_deny)
    for name, section in zip(("ingress", "egress", "ingress_deny", "egress_deny"), sections, strict=True):
        at_most(len(section), MAX_PEERS_PER_SECTION, f"{where}: {name} peers")
    at_most(sum(len(p.ports) for s in sections for p in s), MAX_PORTS_PER_RULE, f"{where}: ports")
    at_most(cidr_count(msg), MAX_CIDRS_PER_RULE, f"{where}: CIDRs (excepts included)")
    at_most(len(msg.description), MAX_DESCRIPTION_CHARS, f"{where}: description characters")
    selectors = [("endpoint_selector", msg.endpoint_selector)]
    for name, section in zip(("ingress", "egress", "ingress_deny", "egress_deny"), sections, strict=True):
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


def from_proto(msg: pb.Rule, sized: bool = True) -> Rule:
    """Validate one rule message; raises InvalidArgument naming the faulty field.

    `sized` applies the request limits too; a stored rule (accepted when the limits
    may have been wider) is loaded without them.
    """
    check_name(msg.name)
    where = f"rule {msg.name}"
    if sized:
        _check_sizes(msg, where)

    def section(peers: Iterable[pb.PeerRule], name: str) -> tuple[PeerRule, ...]:
        return tuple(_peer(p, f"{where}: {name}[{i}]") for i, p in enumerate(peers))

    return Rule(
        name=msg.name,
        selector=_selector(msg.endpoint_selector, f"{where}: endpoint_selector"),
        ingress=section(msg.ingress, "ingress"),
        egress=section(msg.egress, "egress"),
        ingress_deny=section(msg.ingress_deny, "ingress_deny"),
        egress_deny=section(msg.egress_deny, "egress_deny"),
        description=msg.description,
        source=json_format.MessageToDict(msg, preserving_proto_field_name=True),
    )


def from_stored(doc: dict[str, Any]) -> Rule:
    return from_proto(json_format.ParseDict(doc, pb.Rule()), sized=False)


def to_proto(rule: Rule) -> pb.Rule:
    return json_format.ParseDict(rule.source, pb.Rule())


# ---- from CiliumNetworkPolicy-style documents ----

_SECTIONS = {
    "ingress": ("ingress", "from"),
    "egress": ("egress", "to"),
    "ingressDeny": ("ingress_deny", "from"),
    "egressDeny": ("egress_deny", "to"),
}
_DIGITS = re.compile(r"[0-9]{1,5}")


def _mapping(value: Any, where: str, optional: bool = True) -> dict[str, Any]:
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} must be a mapping, not {_kind(value)}")
    return value


def _items(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(f"{where} must be a list, not {_kind(value)}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{where} must be a string, not {_kind(value)}")
    return value


def _number(value: Any, where: str) -> int:
    """A port or ICMP type: an integer, or a string of digits (as Kubernetes writes ports)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgument(f"{where} must be a number, not {_kind(value)}")
    if isinstance(value, str):
        if not _DIGITS.fullmatch(value):
            raise InvalidArgument(f"{where}: {shown(value)} is not a port number (named ports are not supported)")
        value = int(value)
    number = int(value)
    if not 0 <= number <= 65535:
        raise InvalidArgument(f"{where}: {shown(number)} is out of range (0-65535)")
    return number


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "empty"}.get(type(value), type(value).__name__)  # fmt: skip


def _cnp_selector(doc: Any, where: str) -> dict[str, Any]:
    doc = _mapping(doc, where)
    labels = _mapping(doc.get("matchLabels"), f"{where}.matchLabels")
    expressions = []
    for i, expr in enumerate(_items(doc.get("matchExpressions"), f"{where}.matchExpressions")):
        place = f"{where}.matchExpressions[{i}]"
        expr = _mapping(expr, place, optional=False)
        expressions.append({
            "key": _text(expr.get("key", ""), f"{place}.key"),
            "operator": _text(expr.get("operator", ""), f"{place}.operator"),
            "values": [_text(v, f"{place}.values[{j}]") for j, v in enumerate(_items(expr.get("values"), place))],
        })  # fmt: skip
    return {
        "match_labels": {_text(k, f"{where}.matchLabels key"): _text(v, f"{where}.matchLabels[{shown(k)}]")
                         for k, v in labels.items()},
        "match_expressions": expressions,
    }  # fmt: skip


def _cnp_peer(doc: Any, prefix: str, where: str) -> dict[str, Any]:
    doc = _mapping(doc, where)
    out: dict[str, Any] = {}
    key = f"{prefix}Endpoints"
    out["endpoints"] = [
        _cnp_selector(s, f"{where}.{key}[{i}]") for i, s in enumerate(_items(doc.get(key), f"{where}.{key}"))
    ]
    key = f"{prefix}CIDR"
    cidrs: list[dict[str, Any]] = [
        {"cidr": _text(c, f"{where}.{key}[{i}]")} for i, c in enumerate(_items(doc.get(key), f"{where}.{key}"))
    ]
    key = f"{prefix}CIDRSet"
    for i, c in enumerate(_items(doc.get(key), f"{where}.{key}")):
        place = f"{where}.{key}[{i}]"
        c = _mapping(c, place, optional=False)
        excepts = [_text(e, f"{place}.except[{j}]") for j, e in enumerate(_items(c.get("except"), place))]
        cidrs.append({"cidr": _text(c.get("cidr", ""), f"{place}.cidr"), "except": excepts})
    out["cidrs"] = cidrs
    key = f"{prefix}Entities"
    out["entities"] = [_text(e, f"{where}.{key}[{i}]") for i, e in enumerate(_items(doc.get(key), f"{where}.{key}"))]
    ports = []
    for i, port_rule in enumerate(_items(doc.get("toPorts"), f"{where}.toPorts")):
        place = f"{where}.toPorts[{i}]"
        for j, p in enumerate(_items(_mapping(port_rule, place, optional=False).get("ports"), f"{place}.ports")):
            at = f"{place}.ports[{j}]"
            p = _mapping(p, at, optional=False)
            ports.append({"port": _number(p.get("port", 0), f"{at}.port"),
                          "end_port": _number(p.get("endPort", 0), f"{at}.endPort"),
                          "protocol": _text(p.get("protocol", "ANY"), f"{at}.protocol")})  # fmt: skip
    for i, icmp_rule in enumerate(_items(doc.get("icmps"), f"{where}.icmps")):
        place = f"{where}.icmps[{i}]"
        for j, f in enumerate(_items(_mapping(icmp_rule, place, optional=False).get("fields"), f"{place}.fields")):
            at = f"{place}.fields[{j}]"
            ports.append({"port": _number(_mapping(f, at, optional=False).get("type", 0), f"{at}.type"),
                          "protocol": "ICMP"})  # fmt: skip
    out["ports"] = ports
    return out


def _cnp_rule(obj: dict[str, Any], index: int) -> dict[str, Any]:
    where = f"document object {index}"
    spec = obj.get("spec", obj)
    metadata = _mapping(obj.get("metadata"), f"{where}: metadata")
    name = metadata.get("name") or obj.get("name")
    if not name:
        raise InvalidArgument(f"{where}: metadata.name is required")
    name = _text(name, f"{where}: metadata.name")
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{where}: spec must be a mapping, not {_kind(spec)}")
    out: dict[str, Any] = {
        "name": name,
        "endpoint_selector": _cnp_selector(spec.get("endpointSelector"), f"{where}: spec.endpointSelector"),
        "description": _text(spec.get("description", ""), f"{where}: spec.description"),
    }
    for key, (field_name, prefix) in _SECTIONS.items():
        peers = _items(spec.get(key), f"{where}: spec.{key}")
        at_most(len(peers), MAX_PEERS_PER_SECTION, f"{where}: spec.{key} peers")
        out[field_name] = [_cnp_peer(p, prefix, f"{where}: spec.{key}[{i}]") for i, p in enumerate(peers)]
    return out


def from_document(text: str) -> list[pb.Rule]:
    """Parse YAML or JSON with one or more CiliumNetworkPolicy-style objects.

    Every value is checked for its type on the way (a `spec` that is a list, a port that
    is a mapping), and the document is loaded within the limits of services.policy.limits.
    """
    objects: list[Any] = []
    for item in load_documents(text):
        if item is None:
            continue
        if isinstance(item, list):
            objects.extend(item)
        elif isinstance(item, dict) and item.get("kind") == "List":
            objects.extend(_items(item.get("items"), "document: items"))
        else:
            objects.append(item)
        at_most(len(objects), MAX_RULES_PER_REQUEST, "document rules")
    rules = []
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise InvalidArgument(f"document object {i}: expected a mapping, got {_kind(obj)}")
        try:
            rules.append(json_format.ParseDict(_cnp_rule(obj, i), pb.Rule()))
        except (json_format.ParseError, ValueError, TypeError) as exc:
            raise InvalidArgument(f"document object {i}: {shown(str(exc))}") from None
    return rules
