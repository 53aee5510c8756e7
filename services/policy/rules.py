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

import yaml
from google.protobuf import json_format
from weir.policy.v1 import policy_pb2 as pb

from services.common.errors import InvalidArgument
from services.common.validate import CidrError, Network, parse_cidr

PROTOCOLS = {"TCP": 6, "UDP": 17, "ICMP": 1, "ANY": 0}
ENTITIES = {"host", "world", "all"}
OPERATORS = {"In", "NotIn", "Exists", "DoesNotExist"}
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$")
LABEL_KEY_RE = re.compile(r"^([a-z0-9.-]{1,253}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


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
    protocol: str  # TCP, UDP, ICMP, ANY
    first: int  # 0 with last 65535 (or 255 for ICMP types): every port
    last: int


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
    source: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def cidrs(self) -> Iterable[Network]:
        """Every CIDR the rule names, excepts included: each gets an identity."""
        for section in (self.ingress, self.egress, self.ingress_deny, self.egress_deny):
            for peer in section:
                for c in peer.cidrs:
                    yield c.network
                    yield from c.excepts


# ---- from protobuf ----


def _selector(msg: pb.EndpointSelector, where: str) -> Selector:
    for key, value in msg.match_labels.items():
        if not LABEL_KEY_RE.match(key):
            raise InvalidArgument(f"{where}: label key {key!r} is not a valid label key")
        if not LABEL_VALUE_RE.match(value):
            raise InvalidArgument(f"{where}: label value {value!r} of {key!r} is not a valid label value")
    requirements = []
    for i, expr in enumerate(msg.match_expressions):
        place = f"{where}.match_expressions[{i}]"
        if expr.operator not in OPERATORS:
            raise InvalidArgument(
                f"{place}: operator {expr.operator!r} is not one of {', '.join(sorted(OPERATORS))}"
            )
        if not LABEL_KEY_RE.match(expr.key):
            raise InvalidArgument(f"{place}: label key {expr.key!r} is not a valid label key")
        if expr.operator in ("In", "NotIn") and not expr.values:
            raise InvalidArgument(f"{place}: operator {expr.operator} needs at least one value")
        if expr.operator in ("Exists", "DoesNotExist") and expr.values:
            raise InvalidArgument(f"{place}: operator {expr.operator} takes no values")
        requirements.append(Requirement(expr.key, expr.operator, frozenset(expr.values)))
    return Selector(tuple(sorted(msg.match_labels.items())), tuple(requirements))


def _cidr(text: str, where: str) -> Network:
    try:
        return parse_cidr(text)
    except CidrError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None


def _port(msg: pb.PortRule, where: str) -> PortRule:
    protocol = (msg.protocol or "ANY").upper()
    if protocol not in PROTOCOLS:
        raise InvalidArgument(f"{where}: protocol {msg.protocol!r} is not one of TCP, UDP, ICMP, ANY")
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
            raise InvalidArgument(f"{where}: entity {entity!r} is not one of {', '.join(sorted(ENTITIES))}")
    return PeerRule(
        endpoints=tuple(_selector(s, f"{where}.endpoints[{i}]") for i, s in enumerate(msg.endpoints)),
        cidrs=tuple(cidrs),
        entities=tuple(msg.entities),
        ports=tuple(_port(p, f"{where}.ports[{i}]") for i, p in enumerate(msg.ports)),
    )


def from_proto(msg: pb.Rule) -> Rule:
    """Validate one rule message; raises InvalidArgument naming the faulty field."""
    if not NAME_RE.match(msg.name):
        raise InvalidArgument(
            f"rule name {msg.name!r} is invalid: use lowercase letters, digits, '-' and '.', at most 63"
        )
    where = f"rule {msg.name}"

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
    return from_proto(json_format.ParseDict(doc, pb.Rule()))


def to_proto(rule: Rule) -> pb.Rule:
    return json_format.ParseDict(rule.source, pb.Rule())


# ---- from CiliumNetworkPolicy-style documents ----

_SECTIONS = {
    "ingress": ("ingress", "from"),
    "egress": ("egress", "to"),
    "ingressDeny": ("ingress_deny", "from"),
    "egressDeny": ("egress_deny", "to"),
}


def _cnp_selector(doc: Any) -> dict[str, Any]:
    doc = doc or {}
    return {
        "match_labels": dict(doc.get("matchLabels", {})),
        "match_expressions": list(doc.get("matchExpressions", [])),
    }


def _cnp_peer(doc: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["endpoints"] = [_cnp_selector(s) for s in doc.get(f"{prefix}Endpoints", [])]
    cidrs = [{"cidr": c} for c in doc.get(f"{prefix}CIDR", [])]
    cidrs += [{"cidr": c.get("cidr", ""), "except": c.get("except", [])} for c in doc.get(f"{prefix}CIDRSet", [])]
    out["cidrs"] = cidrs
    out["entities"] = list(doc.get(f"{prefix}Entities", []))
    ports = []
    for port_rule in doc.get("toPorts", []):
        for p in port_rule.get("ports", []):
            ports.append({"port": int(p.get("port", 0)), "end_port": int(p.get("endPort", 0)),
                          "protocol": p.get("protocol", "ANY")})
    for icmp_rule in doc.get("icmps", []):
        for f in icmp_rule.get("fields", []):
            ports.append({"port": int(f.get("type", 0)), "protocol": "ICMP"})
    out["ports"] = ports
    return out


def _cnp_rule(obj: dict[str, Any], index: int) -> dict[str, Any]:
    spec = obj.get("spec", obj)
    name = obj.get("metadata", {}).get("name") or obj.get("name")
    if not name:
        raise InvalidArgument(f"document object {index}: metadata.name is required")
    if not isinstance(spec, dict):
        raise InvalidArgument(f"document object {index}: spec must be a mapping")
    out: dict[str, Any] = {
        "name": name,
        "endpoint_selector": _cnp_selector(spec.get("endpointSelector")),
        "description": spec.get("description", ""),
    }
    for key, (field_name, prefix) in _SECTIONS.items():
        out[field_name] = [_cnp_peer(p or {}, prefix) for p in spec.get(key, [])]
    return out


def from_document(text: str) -> list[pb.Rule]:
    """Parse YAML or JSON with one or more CiliumNetworkPolicy-style objects."""
    try:
        loaded = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"document is not valid YAML or JSON: {exc}") from None
    objects: list[Any] = []
    for item in loaded:
        if item is None:
            continue
        if isinstance(item, list):
            objects.extend(item)
        elif isinstance(item, dict) and item.get("kind") == "List":
            objects.extend(item.get("items", []))
        else:
            objects.append(item)
    rules = []
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise InvalidArgument(f"document object {i}: expected a mapping, got {type(obj).__name__}")
        try:
            rules.append(json_format.ParseDict(_cnp_rule(obj, i), pb.Rule()))
        except (json_format.ParseError, ValueError, TypeError) as exc:
            raise InvalidArgument(f"document object {i}: {exc}") from None
    return rules
