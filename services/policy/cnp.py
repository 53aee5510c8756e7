"""CiliumNetworkPolicy documents into rule messages: each field as Cilium means it, or refused.

The document is walked against Cilium's schema (pkg/policy/api: rule.go, ingress.go,
egress.go, l4.go, icmp.go, cidr.go; the cilium.io/v2 CRDs): at every place a key Cilium
does not know is INVALID_ARGUMENT, a key Cilium knows but this node does not implement
is UNIMPLEMENTED saying why, and a value is checked for its type and range. Nothing is
dropped: a field either shapes the rule or stops the import, so an unknown or
unsupported field can never widen what a policy allows. The combinations Cilium's
rule_validation.go refuses in one rule are refused here too.

Namespaces follow Cilium's ParseToCiliumRule (pkg/k8s/apis/cilium.io/utils): a
CiliumNetworkPolicy gets its namespace (metadata.namespace, or "default" as kubectl
would give it) and from_proto confines its selectors to it; a
CiliumClusterwideNetworkPolicy's peer selectors select only pods (the namespace label
must exist). A document without `kind` is Weir's plain rule: cluster-wide, its
selectors taken as written (the same as a rule message).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from weir.policy.v1 import policy_pb2 as pb

from services.common.errors import InvalidArgument, Unimplemented, WeirError
from services.policy import rules
from services.policy.limits import (
    MAX_ICMP_FIELDS,
    MAX_PEERS_PER_SECTION,
    MAX_PORTS_PER_PORT_RULE,
    MAX_RULES_PER_REQUEST,
    MAX_SPECS_PER_RULE,
    at_most,
    load_documents,
    shown,
)

API_VERSION = "cilium.io/v2"
CNP = "CiliumNetworkPolicy"
CCNP = "CiliumClusterwideNetworkPolicy"
LIST_KINDS = {"List": "", f"{CNP}List": CNP, f"{CCNP}List": CCNP}  # a list's items default to its kind
DEFAULT_NAMESPACE = "default"  # where kubectl puts a namespaced object given without one
TOPORTS_PROTOCOLS = ("TCP", "UDP", "SCTP", "ANY")
# Protocols without ports that Cilium accepts in toPorts behind --enable-extended-ip-protocols.
EXTENDED_PROTOCOLS = frozenset({"VRRP", "IGMP", "GRE", "IPIP", "IPV6", "ESP", "AH"})
PORT_NAME_RE = re.compile(r"([a-zA-Z0-9]-?)*[a-zA-Z](-?[a-zA-Z0-9])*")  # Cilium's iana.IsSvcName (any case)
DIGITS_RE = re.compile(r"[0-9]{1,6}")
LOG_VALUE_CHARS = 32

# Cilium's ICMP type names per family (pkg/policy/api/icmp.go).
ICMP_TYPES = {
    "IPv4": {
        "EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8, "EchoRequest": 8,
        "RouterAdvertisement": 9, "RouterSelection": 10, "TimeExceeded": 11, "ParameterProblem": 12,
        "Timestamp": 13, "TimestampReply": 14, "Photuris": 40, "ExtendedEchoRequest": 42, "ExtendedEchoReply": 43,
    },
    "IPv6": {
        "DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3, "ParameterProblem": 4,
        "EchoRequest": 128, "EchoReply": 129, "MulticastListenerQuery": 130, "MulticastListenerReport": 131,
        "MulticastListenerDone": 132, "RouterSolicitation": 133, "RouterAdvertisement": 134,
        "NeighborSolicitation": 135, "NeighborAdvertisement": 136, "RedirectMessage": 137, "RouterRenumbering": 138,
        "ICMPNodeInformationQuery": 139, "ICMPNodeInformationResponse": 140,
        "InverseNeighborDiscoverySolicitation": 141, "InverseNeighborDiscoveryAdvertisement": 142,
        "HomeAgentAddressDiscoveryRequest": 144, "HomeAgentAddressDiscoveryReply": 145,
        "MobilePrefixSolicitation": 146, "MobilePrefixAdvertisement": 147, "DuplicateAddressRequestCodeSuffix": 157,
        "DuplicateAddressConfirmationCodeSuffix": 158, "ExtendedEchoRequest": 160, "ExtendedEchoReply": 161,
    },
}  # fmt: skip
ICMP_PROTOCOL = {"IPv4": "ICMP", "IPv6": "ICMPV6"}


@dataclass(frozen=True)
class Place:
    """The keys a mapping may have at one place of the schema."""

    fields: frozenset[str]  # implemented, or ignored because they cannot change a verdict
    refused: dict[str, str] = field(default_factory=dict)  # Cilium's, not implemented here: why


TLS = "TLS interception (originating or terminating TLS) is not supported by this node's proxy"
NODES = "node selectors need node labels, which this node does not have; use the host or remote-node entity"
GROUPS = "groups (cloud provider security groups) are not supported; list the CIDRs"
REQUIRES = "requirements are not supported; add the labels to each fromEndpoints/toEndpoints selector instead"
AUTH = "mutual authentication is not supported by this node"
FQDNS = "toFQDNs needs DNS proxying (learning the names' addresses), which this node does not do; use toCIDR"
CIDR_GROUPS = "CiliumCIDRGroups are not known to this node; list the CIDRs"

OBJECT = Place(frozenset({"apiVersion", "kind", "metadata", "spec", "specs", "status"}))
LIST = Place(frozenset({"apiVersion", "kind", "metadata", "items"}))
# name and namespace decide the rule; the rest is bookkeeping of the Kubernetes API server
# (identification, ownership, history), which cannot change a verdict and is ignored.
METADATA = Place(
    frozenset({
        "name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
        "creationTimestamp", "managedFields", "selfLink", "finalizers", "ownerReferences", "generateName",
        "deletionTimestamp", "deletionGracePeriodSeconds",
    })
)  # fmt: skip
RULE = Place(
    # labels (rule labels, which only identify the rule) and log (a Hubble annotation) are
    # checked for their shape and ignored: neither changes a verdict.
    frozenset({
        "endpointSelector", "ingress", "ingressDeny", "egress", "egressDeny", "labels", "enableDefaultDeny",
        "description", "log",
    }),
    {"nodeSelector": "host policies (nodeSelector) are not supported: this node enforces policy on endpoints"},
)  # fmt: skip
DEFAULT_DENY = Place(frozenset({"ingress", "egress"}))
LOG = Place(frozenset({"value"}))
RULE_LABEL = Place(frozenset({"key", "value", "source"}))
_INGRESS_COMMON = frozenset({"fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities", "toPorts", "icmps"})
_INGRESS_REFUSED = {"fromRequires": REQUIRES, "fromGroups": GROUPS, "fromNodes": NODES}
_EGRESS_COMMON = frozenset({"toEndpoints", "toCIDR", "toCIDRSet", "toEntities", "toPorts", "icmps"})
_EGRESS_REFUSED = {
    "toRequires": REQUIRES, "toGroups": GROUPS, "toNodes": NODES,
    "toServices": "toServices needs the cluster's Service endpoints, which this node does not watch; use "
    "toEndpoints or toCIDR",
}  # fmt: skip
PEERS = {
    "ingress": Place(_INGRESS_COMMON, {**_INGRESS_REFUSED, "authentication": AUTH, "auth": AUTH}),
    "ingressDeny": Place(_INGRESS_COMMON, _INGRESS_REFUSED),
    "egress": Place(_EGRESS_COMMON, {**_EGRESS_REFUSED, "authentication": AUTH, "auth": AUTH, "toFQDNs": FQDNS}),
    "egressDeny": Place(_EGRESS_COMMON, _EGRESS_REFUSED),
}
PORT_RULE = Place(
    frozenset({"ports", "rules"}),
    {"serverNames": "serverNames (TLS SNI) need TLS inspection, which this node's proxy does not do",
     "listener": "listener (a CiliumEnvoyConfig reference) is not supported by this node",
     "originatingTLS": TLS, "terminatingTLS": TLS},
)  # fmt: skip
L7_RULES = Place(
    frozenset({"http"}),
    {"kafka": "Kafka rules are not supported by this node (only http)",
     "dns": "DNS rules need a DNS proxy, which this node does not run (only http)",
     "l7proto": "generic L7 parsers are not supported by this node (only http)",
     "l7": "generic L7 parsers are not supported by this node (only http)"},
)  # fmt: skip
HTTP_RULE = Place(frozenset({"method", "path", "host", "headers", "headerMatches"}))
HEADER_MATCH = Place(
    frozenset({"name", "value", "mismatch"}),
    {"secret": "header values from Kubernetes secrets are not supported by this node; give value"},
)
DENY_PORT_RULE = Place(frozenset({"ports"}))  # Cilium's PortDenyRule: no L7 fields at all
PORT = Place(frozenset({"port", "endPort", "protocol"}))
ICMP_RULE = Place(frozenset({"fields"}))
ICMP_FIELD = Place(frozenset({"type", "family"}))
CIDR_RULE = Place(frozenset({"cidr", "except"}), {"cidrGroupRef": CIDR_GROUPS, "cidrGroupSelector": CIDR_GROUPS})
SELECTOR = Place(frozenset({"matchLabels", "matchExpressions"}))
REQUIREMENT = Place(frozenset({"key", "operator", "values"}))

# Section key -> (message field, peer prefix); one L3 kind per rule (rule_validation.go).
SECTIONS = {
    "ingress": ("ingress", "from"),
    "egress": ("egress", "to"),
    "ingressDeny": ("ingress_deny", "from"),
    "egressDeny": ("egress_deny", "to"),
}
L3 = {
    "from": ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities", "fromNodes", "fromGroups"),
    "to": ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities", "toServices", "toGroups", "toNodes", "toFQDNs"),
}


@dataclass(frozen=True)
class Scope:
    """Where a policy applies: its kind and namespace ("" for cluster-wide)."""

    kind: str  # CNP, CCNP, or "" (Weir's plain rule)
    namespace: str


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if ": " in where else f"{where}: {key}"


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a decimal number", type(None): "empty"}.get(type(value), type(value).__name__)  # fmt: skip


def _fields(value: Any, place: Place, where: str) -> dict[str, Any]:
    """`value` as a mapping whose keys are all known at `place`; refuses the first that is not."""
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} must be a mapping, not {_kind(value)}")
    for key, item in value.items():
        if not isinstance(key, str):
            raise InvalidArgument(f"{where}: key {shown(key)} is not a string")
        if key in place.refused:
            if item is None or item == []:
                continue  # written out but empty: asks for nothing
            raise Unimplemented(f"{_at(where, key)}: {place.refused[key]}")
        if key not in place.fields:
            known = ", ".join(sorted(place.fields | place.refused.keys()))
            raise InvalidArgument(f"{where}: unknown field {shown(key)} (known here: {known})")
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


def _flag(value: Any, where: str) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument(f"{where} must be true or false, not {_kind(value)}")
    return value


def _number(value: Any, top: int, where: str) -> int:
    """A port, end port or ICMP type: a number, or its digits as a string (no leading zeros: Cilium reads octal)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgument(f"{where} must be a number, not {_kind(value)}")
    if isinstance(value, str):
        if not DIGITS_RE.fullmatch(value):
            raise InvalidArgument(f"{where}: {shown(value)} is not a number (0-{top})")
        if len(value) > 1 and value[0] == "0":
            raise InvalidArgument(f"{where}: write {shown(value)} without leading zeros (Cilium reads them as octal)")
    number = int(value)
    if not 0 <= number <= top:
        raise InvalidArgument(f"{where}: {shown(number)} is out of range (0-{top})")
    return number


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _label_key(key: Any, where: str) -> str:
    key = _text(key, f"{where} key")
    if key.startswith("$"):  # Cilium's short form of a reserved label: $host is reserved:host
        key = f"reserved:{key[1:]}"
    return rules.check_label_key(key, where)


def _selector(doc: Any, where: str) -> pb.EndpointSelector:
    doc = _fields(doc, SELECTOR, where)
    out = pb.EndpointSelector()
    labels = doc.get("matchLabels")
    if labels is not None and not isinstance(labels, dict):
        raise InvalidArgument(f"{where}.matchLabels must be a mapping, not {_kind(labels)}")
    for raw, value in (labels or {}).items():
        key = _label_key(raw, f"{where}.matchLabels")
        if isinstance(value, (bool, int, float)):
            raise InvalidArgument(f"{where}.matchLabels[{shown(raw)}]: label values are strings: quote {shown(value)}")
        value = _text(value, f"{where}.matchLabels[{shown(raw)}]")
        rules.check_label_value(value, key, f"{where}.matchLabels")
        if key in out.match_labels:
            raise InvalidArgument(f"{where}.matchLabels: {shown(raw)} names {key} twice")
        out.match_labels[key] = value
    for i, expr in enumerate(_items(doc.get("matchExpressions"), f"{where}.matchExpressions")):
        place = f"{where}.matchExpressions[{i}]"
        expr = _fields(expr, REQUIREMENT, place)
        operator = _text(expr.get("operator"), f"{place}.operator")
        if operator not in rules.OPERATORS:
            raise InvalidArgument(f"{place}.operator: {shown(operator)} is not one of {', '.join(rules.OPERATORS)}")
        key = _label_key(expr.get("key"), f"{place}.key")
        values = [_text(v, f"{place}.values[{j}]") for j, v in enumerate(_items(expr.get("values"), place))]
        for value in values:
            rules.check_label_value(value, key, f"{place}.values")
        if operator in ("In", "NotIn") and not values:
            raise InvalidArgument(f"{place}: operator {operator} needs at least one value")
        if operator in ("Exists", "DoesNotExist") and values:
            raise InvalidArgument(f"{place}: operator {operator} takes no values")
        out.match_expressions.add(key=key, operator=operator, values=values)
    return out


def _protocol(value: Any, where: str) -> str:
    if value is None:
        return "ANY"
    protocol = _text(value, where).upper() or "ANY"  # Cilium's ParseL4Proto ignores case
    if protocol in TOPORTS_PROTOCOLS:
        return protocol
    if protocol in rules.ICMP_PROTOCOLS:
        raise InvalidArgument(f"{where}: {shown(value)} is not a toPorts protocol; allow ICMP with icmps: "
                              "[{fields: [{type: ..., family: IPv4|IPv6}]}]")  # fmt: skip
    if protocol in EXTENDED_PROTOCOLS:
        raise Unimplemented(f"{where}: protocol {shown(value)} (one of Cilium's extended IP protocols) is not "
                            "supported by this node")  # fmt: skip
    raise InvalidArgument(f"{where}: protocol {shown(value)} is not one of {', '.join(TOPORTS_PROTOCOLS)}")


def _port(doc: Any, where: str) -> pb.PortRule:
    doc = _fields(doc, PORT, where)
    protocol = _protocol(doc.get("protocol"), f"{where}.protocol")
    raw = doc.get("port")
    if raw is None:
        raise InvalidArgument(f'{where}.port is required ("0" means every port)')
    end = 0 if doc.get("endPort") is None else _number(doc["endPort"], 65535, f"{where}.endPort")
    if isinstance(raw, str) and len(raw) <= rules.MAX_SERVICE_NAME_CHARS and PORT_NAME_RE.fullmatch(raw):
        if end:
            raise InvalidArgument(f"{where}.endPort: a named port ({shown(raw)}) takes no endPort")
        return pb.PortRule(name=raw.lower(), protocol=protocol)  # Cilium compares port names in lowercase
    if isinstance(raw, str) and not DIGITS_RE.fullmatch(raw):
        raise InvalidArgument(
            f"{where}.port: {shown(raw)} is neither a port number (0-65535) nor a port name (at most "
            f"{rules.MAX_SERVICE_NAME_CHARS} letters, digits and single inner '-', with a letter)"
        )
    port = _number(raw, 65535, f"{where}.port")
    if end and not port:
        raise InvalidArgument(f"{where}.endPort needs a port above 0 to start the range (port 0 is every port)")
    if end and end < port:
        raise InvalidArgument(f"{where}.endPort {end} is below port {port}")
    return pb.PortRule(port=port, end_port=end, protocol=protocol)


def _header(text: Any, where: str) -> pb.HttpHeaderMatch:
    """Cilium's `headers` entry: "Name" (present) or "Name: value" / "Name value" (exact), split at the first space."""
    text = _text(text, where)
    name, sep, value = text.partition(" ")
    if not sep:
        return pb.HttpHeaderMatch(name=name)
    return pb.HttpHeaderMatch(name=name.rstrip(":"), value=value)


def _header_match(doc: Any, where: str) -> pb.HttpHeaderMatch:
    doc = _fields(doc, HEADER_MATCH, where)
    mismatch = doc.get("mismatch")
    if mismatch not in (None, ""):
        raise Unimplemented(f"{where}.mismatch: {shown(mismatch)} (acting on a mismatch instead of denying) is not "
                            "supported by this node; leave it out so a mismatch denies")  # fmt: skip
    name = _text(doc.get("name"), f"{where}.name")
    if doc.get("value") is None:
        return pb.HttpHeaderMatch(name=name)
    return pb.HttpHeaderMatch(name=name, value=_text(doc["value"], f"{where}.value"))


def _http_rule(doc: Any, where: str) -> pb.HttpRule:
    """One PortRuleHTTP; an empty one ({}) allows every request, as in Cilium."""
    doc = _fields({} if doc is None else doc, HTTP_RULE, where)
    out = pb.HttpRule()
    for key in ("method", "path", "host"):
        if doc.get(key) is not None:
            setattr(out, key, _text(doc[key], f"{where}.{key}"))
    out.headers.extend(_header(h, f"{where}.headers[{i}]") for i, h in enumerate(_items(doc.get("headers"), where)))
    matches = _items(doc.get("headerMatches"), f"{where}.headerMatches")
    out.headers.extend(_header_match(m, f"{where}.headerMatches[{i}]") for i, m in enumerate(matches))
    return out


def _l7_rules(doc: Any, where: str) -> list[pb.HttpRule]:
    if doc is None:
        return []
    doc = _fields(doc, L7_RULES, where)
    return [_http_rule(h, f"{where}.http[{i}]") for i, h in enumerate(_items(doc.get("http"), f"{where}.http"))]


def _port_rules(value: Any, place: Place, where: str) -> list[pb.PortRule]:
    out = []
    for i, doc in enumerate(_items(value, where)):
        at = f"{where}[{i}]"
        fields = _fields(doc, place, at)
        ports = _items(fields.get("ports"), f"{at}.ports")
        if not ports:
            raise InvalidArgument(f'{at}.ports is empty: list at least one port ("0" is every port)')
        if len(ports) > MAX_PORTS_PER_PORT_RULE:
            raise InvalidArgument(f"{at}.ports: {len(ports)} given, Cilium allows at most {MAX_PORTS_PER_PORT_RULE}; "
                                  "split them over several toPorts entries")  # fmt: skip
        http = _l7_rules(fields.get("rules"), f"{at}.rules")
        for j, p in enumerate(ports):
            port = _port(p, f"{at}.ports[{j}]")
            if http:
                _check_l7_port(port, f"{at}.ports[{j}]")
                port.http.extend(http)
            out.append(port)
    return out


def _check_l7_port(port: pb.PortRule, where: str) -> None:
    """Cilium's rule validation for a port with L7 rules: TCP only (ANY is refused too), never port 0."""
    if port.protocol != "TCP":
        raise InvalidArgument(f"{where}.protocol: L7 rules can only apply to TCP (not {port.protocol}); "
                              "write protocol: TCP")  # fmt: skip
    if not port.name and port.port == 0:
        raise InvalidArgument(f"{where}.port: L7 rules can not be used when a port is 0")
    if port.end_port:
        raise Unimplemented(f"{where}.endPort: L7 rules on a port range are not supported by this node; list the ports")


def _icmp_field(doc: Any, where: str) -> pb.PortRule:
    doc = _fields(doc, ICMP_FIELD, where)
    family = "IPv4" if doc.get("family") is None else _text(doc["family"], f"{where}.family")
    if family not in ICMP_TYPES:
        raise InvalidArgument(f"{where}.family: {shown(family)} is not IPv4 or IPv6")
    raw = doc.get("type")
    if raw is None:
        raise InvalidArgument(f"{where}.type is required")
    names = ICMP_TYPES[family]
    if isinstance(raw, str) and raw in names:
        code = names[raw]
    elif isinstance(raw, int) or (isinstance(raw, str) and DIGITS_RE.fullmatch(raw)):
        code = _number(raw, 255, f"{where}.type")
    else:
        raise InvalidArgument(
            f"{where}.type: {shown(raw)} is not an {family} ICMP type: use 0-255 or one of {', '.join(names)}"
        )
    return pb.PortRule(icmp_type=code, protocol=ICMP_PROTOCOL[family])


def _icmps(value: Any, where: str) -> list[pb.PortRule]:
    out = []
    for i, doc in enumerate(_items(value, where)):
        at = f"{where}[{i}]"
        fields = _items(_fields(doc, ICMP_RULE, at).get("fields"), f"{at}.fields")
        if not fields:
            raise InvalidArgument(f"{at}.fields is empty: list at least one ICMP type")
        if len(fields) > MAX_ICMP_FIELDS:
            raise InvalidArgument(f"{at}.fields: {len(fields)} given, Cilium allows at most {MAX_ICMP_FIELDS}")
        out += [_icmp_field(f, f"{at}.fields[{j}]") for j, f in enumerate(fields)]
    return out


def _peer(doc: Any, section: str, scope: Scope, selects_init: bool, where: str) -> pb.PeerRule:
    """One rule of a section; Cilium's one-L3-kind and ICMP-or-ports limits apply."""
    doc = _fields(doc, PEERS[section], where)
    prefix = SECTIONS[section][1]
    given = [k for k in L3[prefix] if doc.get(k)]
    if len(given) > 1:
        raise InvalidArgument(f"{where}: {given[0]} and {given[1]} cannot be combined in one rule (as in Cilium); "
                              "write a rule for each")  # fmt: skip
    if doc.get("icmps") and doc.get("toPorts"):
        raise InvalidArgument(f"{where}: icmps and toPorts cannot be combined in one rule (as in Cilium); "
                              "write a rule for each")  # fmt: skip
    out = pb.PeerRule()
    key = f"{prefix}Endpoints"
    for i, item in enumerate(_items(doc.get(key), _at(where, key))):
        selector = _selector(item, f"{_at(where, key)}[{i}]")
        if scope.kind == CCNP and rules.peer_scope(rules.selector_keys(selector), "", selects_init) == "exists":
            selector.match_expressions.add(key=rules.NAMESPACE_KEY, operator="Exists")
        out.endpoints.append(selector)  # a namespaced rule's peers are confined by rules.from_proto
    key = f"{prefix}CIDR"
    for i, item in enumerate(_items(doc.get(key), _at(where, key))):
        at = f"{_at(where, key)}[{i}]"
        rules.check_cidr(_text(item, at), at)
        out.cidrs.add(cidr=item)
    key = f"{prefix}CIDRSet"
    for i, item in enumerate(_items(doc.get(key), _at(where, key))):
        at = f"{_at(where, key)}[{i}]"
        item = _fields(item, CIDR_RULE, at)
        if item.get("cidr") is None:
            raise InvalidArgument(f"{at}.cidr is required")
        excepts = [_text(e, f"{at}.except[{j}]") for j, e in enumerate(_items(item.get("except"), f"{at}.except"))]
        network = rules.check_cidr(_text(item["cidr"], f"{at}.cidr"), f"{at}.cidr")
        rules.check_excepts(network, (rules.check_cidr(e, f"{at}.except") for e in excepts), at)
        out.cidrs.add(cidr=item["cidr"], **{"except": excepts})
    key = f"{prefix}Entities"
    for i, item in enumerate(_items(doc.get(key), _at(where, key))):
        out.entities.append(rules.check_entity(_text(item, f"{_at(where, key)}[{i}]"), f"{_at(where, key)}[{i}]"))
    place = PORT_RULE if section in ("ingress", "egress") else DENY_PORT_RULE
    out.ports.extend(_port_rules(doc.get("toPorts"), place, _at(where, "toPorts")))
    out.ports.extend(_icmps(doc.get("icmps"), _at(where, "icmps")))
    return out


def _rule(doc: Any, scope: Scope, where: str) -> pb.Rule:
    """One spec of a policy (its `spec` or one of its `specs`)."""
    doc = _fields(doc, RULE, where)
    if doc.get("endpointSelector") is None:
        raise InvalidArgument(f"{_at(where, 'endpointSelector')} is required ({{}} selects every endpoint)")
    out = pb.Rule()
    out.endpoint_selector.CopyFrom(_selector(doc["endpointSelector"], _at(where, "endpointSelector")))
    selects_init = ("reserved", "init") in map(rules.split_key, rules.selector_keys(out.endpoint_selector))
    if doc.get("description") is not None:
        description = _text(doc["description"], _at(where, "description"))
        if not description.isascii() and not _encodable(description):
            raise InvalidArgument(f"{_at(where, 'description')} is not valid Unicode text (a lone surrogate)")
        out.description = description
    for i, label in enumerate(_items(doc.get("labels"), _at(where, "labels"))):
        if not isinstance(label, str):
            _fields(label, RULE_LABEL, f"{_at(where, 'labels')}[{i}]")
    if doc.get("log") is not None:
        value = _fields(doc["log"], LOG, _at(where, "log")).get("value")
        if value is not None and len(_text(value, _at(where, "log.value"))) > LOG_VALUE_CHARS:
            raise InvalidArgument(f"{_at(where, 'log.value')} is longer than {LOG_VALUE_CHARS} characters")
    if doc.get("enableDefaultDeny") is not None:
        place = _at(where, "enableDefaultDeny")
        deny = _fields(doc["enableDefaultDeny"], DEFAULT_DENY, place)
        for direction in ("ingress", "egress"):
            flag = _flag(deny.get(direction), f"{place}.{direction}")
            if flag is not None:
                setattr(out.enable_default_deny, direction, flag)
    for key, (field_name, _) in SECTIONS.items():
        peers = _items(doc.get(key), _at(where, key))
        at_most(len(peers), MAX_PEERS_PER_SECTION, f"{_at(where, key)} peers")
        getattr(out, field_name).extend(
            _peer(p, key, scope, selects_init, f"{_at(where, key)}[{i}]") for i, p in enumerate(peers)
        )
    if not any(doc.get(k) for k in SECTIONS):
        raise InvalidArgument(f"{where}: a spec needs at least one of {', '.join(SECTIONS)} (Cilium refuses one "
                              "without; ingress: [{}] turns on default deny and allows nothing)")  # fmt: skip
    return out


def _scope(obj: dict[str, Any], kind: str, metadata: dict[str, Any], where: str) -> Scope:
    namespace = metadata.get("namespace")
    if namespace is not None and namespace != "":  # "" is no namespace, as in Kubernetes
        namespace = rules.check_namespace(_text(namespace, f"{where}: metadata.namespace"), f"{where}: metadata")
    if kind == CCNP:
        if namespace:
            raise InvalidArgument(f"{where}: metadata.namespace: a {CCNP} is cluster-wide and has no namespace; "
                                  f"use a {CNP} for a namespaced policy")  # fmt: skip
        return Scope(CCNP, "")
    if kind == CNP:
        return Scope(CNP, namespace or DEFAULT_NAMESPACE)
    return Scope("", namespace or "")


def _policy(obj: Any, default_kind: str, where: str) -> pb.Rule:
    """One policy object: a CNP, a CCNP, or Weir's plain rule (no kind)."""
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{where}: expected a mapping, got {_kind(obj)}")
    obj = _fields(obj, OBJECT, where)
    if obj.get("apiVersion") is not None and _text(obj["apiVersion"], f"{where}: apiVersion") != API_VERSION:
        raise InvalidArgument(f"{where}: apiVersion {shown(obj['apiVersion'])} is not {API_VERSION}")
    kind = default_kind if obj.get("kind") is None else _text(obj["kind"], f"{where}: kind")
    if kind == "NetworkPolicy":
        raise Unimplemented(f"{where}: kind NetworkPolicy (Kubernetes) is not supported; write a {CNP}")
    if kind not in ("", CNP, CCNP):
        raise InvalidArgument(f"{where}: kind {shown(kind)} is not {CNP}, {CCNP} or List")
    if obj.get("metadata") is None:
        raise InvalidArgument(f"{where}: metadata.name is required")
    metadata = _fields(obj["metadata"], METADATA, f"{where}: metadata")
    if metadata.get("name") is None:
        raise InvalidArgument(f"{where}: metadata.name is required")
    name = rules.check_name(_text(metadata["name"], f"{where}: metadata.name"))
    scope = _scope(obj, kind, metadata, where)
    if obj.get("status") is not None and not isinstance(obj["status"], dict):  # the API server's report: ignored
        raise InvalidArgument(f"{where}: status must be a mapping, not {_kind(obj['status'])}")
    specs = _items(obj.get("specs"), f"{where}: specs")
    parts = ([(obj["spec"], f"{where}: spec")] if obj.get("spec") is not None else []) + [
        (s, f"{where}: specs[{i}]") for i, s in enumerate(specs)
    ]
    if not parts:
        raise InvalidArgument(f"{where}: a policy needs spec or a non-empty specs list")
    at_most(len(parts), MAX_SPECS_PER_RULE + 1, f"{where}: specs")
    first, *rest = (_rule(doc, scope, place) for doc, place in parts)
    first.name = name
    first.namespace = scope.namespace
    first.specs.extend(rest)
    return first


def _objects(text: str) -> list[tuple[Any, str]]:
    """The policy objects of a document (YAML documents, YAML lists, List kinds), each with its default kind."""
    objects: list[tuple[Any, str]] = []
    for item in load_documents(text):
        if item is None:
            continue
        kind = item.get("kind") if isinstance(item, dict) else None
        if isinstance(item, list):
            objects += [(x, "") for x in item]
        elif isinstance(kind, str) and kind in LIST_KINDS:
            item = _fields(item, LIST, "document")
            objects += [(x, LIST_KINDS[kind]) for x in _items(item.get("items"), "document: items")]
        else:
            objects.append((item, ""))
        at_most(len(objects), MAX_RULES_PER_REQUEST, "document rules")
    return objects


def from_document(text: str) -> list[pb.Rule]:
    """Rule messages, one per policy object of a YAML or JSON document (its specs inside it).

    Refuses, naming the field's place, anything Cilium would not accept or this node does
    not implement; every message returned is valid for rules.from_proto.
    """
    messages = []
    for i, (obj, kind) in enumerate(_objects(text)):
        where = f"document object {i}"
        try:
            message = _policy(obj, kind, where)
            rules.from_proto(message)
        except WeirError as exc:
            if str(exc).startswith(where):
                raise
            raise type(exc)(f"{where}: {exc}") from None
        messages.append(message)
    return messages
