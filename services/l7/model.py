"""L7 listeners and HTTP rules: the desired state, checked before anything reaches Envoy.

A rule's method, path and host are regexes matched against the whole value, as Cilium
configures Envoy (RE2 ``safe_regex`` on ``:method``, ``:path``, ``:authority``). Python's
``re`` is not RE2, so they are compiled here with RE2 itself (the ``google-re2`` wheel),
and a regex whose RE2 program is larger than Envoy's default limit is refused too: Envoy
would reject it, and a refusal here names the field instead of a NACK later.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

import re2

from services.common import validate
from services.common.errors import AlreadyExists, InvalidArgument

DIRECTIONS = ("ingress", "egress")
MAX_LISTENERS_PER_ENDPOINT = 64
MAX_RULES = 256
MAX_HEADERS = 32
MAX_SOURCES = 1024
MAX_REGEX_CHARS = 1024
MAX_HEADER_VALUE_CHARS = 4096
# Envoy refuses a google_re2 regex whose program is larger than this (runtime key
# re2.max_program_size.error_level, default 100).
ENVOY_MAX_PROGRAM_SIZE = 100
# Rule names: the policy service names a rule after its policy rule, `namespace/name#n`.
RULE_NAME_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_./#:]{0,318}[A-Za-z0-9])?")
# RFC 7230 token characters.
TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}")
DEFAULT_BIND = "127.0.0.1"

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # the refusal carries the reason; RE2 must not print it too


def check_regex(text: str, where: str) -> None:
    """Refuse what RE2 cannot compile (backreferences, lookaround, ...) or Envoy would refuse."""
    if len(text) > MAX_REGEX_CHARS:
        raise InvalidArgument(f"{where}: regex longer than {MAX_REGEX_CHARS} characters")
    try:
        compiled = re2.compile(text, _RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise InvalidArgument(f"{where}: {validate.shown(text)} is not an RE2 regex: {reason}") from None
    if compiled.programsize > ENVOY_MAX_PROGRAM_SIZE:
        raise InvalidArgument(
            f"{where}: {validate.shown(text)} compiles to an RE2 program of size {compiled.programsize}, "
            f"larger than Envoy accepts ({ENVOY_MAX_PROGRAM_SIZE}); simplify it"
        )


@dataclass(frozen=True)
class HeaderMatch:
    """A header that must be present (``exact`` None) or carry exactly ``exact``."""

    name: str
    exact: str | None = None

    def to_doc(self) -> dict[str, Any]:
        return {"name": self.name, "exact": self.exact}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> HeaderMatch:
        return cls(name=doc["name"], exact=doc.get("exact"))


@dataclass(frozen=True)
class HttpRule:
    """One allow rule; every field that is set must match (empty: anything)."""

    name: str
    method: str = ""
    path: str = ""
    host: str = ""
    headers: tuple[HeaderMatch, ...] = ()
    sources: tuple[str, ...] = ()  # CIDRs the connection must come from; empty: any
    destinations: tuple[str, ...] = ()  # CIDRs the connection must go to (its original destination); empty: any

    def to_doc(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "path": self.path,
            "host": self.host,
            "headers": [h.to_doc() for h in self.headers],
            "sources": list(self.sources),
            "destinations": list(self.destinations),
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> HttpRule:
        return cls(
            name=doc["name"],
            method=doc.get("method", ""),
            path=doc.get("path", ""),
            host=doc.get("host", ""),
            headers=tuple(HeaderMatch.from_doc(h) for h in doc.get("headers", [])),
            sources=tuple(doc.get("sources", [])),
            destinations=tuple(doc.get("destinations", [])),
        )


@dataclass(frozen=True)
class Listener:
    """The HTTP rules of one endpoint's port in one direction, on one Envoy proxy port."""

    endpoint: str
    direction: str
    port: int
    proxy_port: int
    rules: tuple[HttpRule, ...] = ()
    upstream: str = ""
    bind_address: str = DEFAULT_BIND
    transparent: bool = False
    use_original_dst: bool = False
    protocol: str = "TCP"
    upstream_mark: int = 0  # SO_MARK of Envoy's upstream sockets; 0: none

    @property
    def name(self) -> str:
        """The Envoy resource name: endpoint/direction/port."""
        return f"{self.endpoint}/{self.direction}/{self.port}"

    def to_doc(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "direction": self.direction,
            "port": self.port,
            "proxy_port": self.proxy_port,
            "rules": [r.to_doc() for r in self.rules],
            "upstream": self.upstream,
            "bind_address": self.bind_address,
            "transparent": self.transparent,
            "use_original_dst": self.use_original_dst,
            "protocol": self.protocol,
            "upstream_mark": self.upstream_mark,
        }

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> Listener:
        return cls(
            endpoint=doc["endpoint"],
            direction=doc["direction"],
            port=int(doc["port"]),
            proxy_port=int(doc["proxy_port"]),
            rules=tuple(HttpRule.from_doc(r) for r in doc.get("rules", [])),
            upstream=doc.get("upstream", ""),
            bind_address=doc.get("bind_address", DEFAULT_BIND),
            transparent=bool(doc.get("transparent", False)),
            use_original_dst=bool(doc.get("use_original_dst", False)),
            protocol=doc.get("protocol", "TCP"),
            upstream_mark=int(doc.get("upstream_mark", 0)),
        )


def parse_upstream(text: str, where: str) -> tuple[str, int]:
    """``address:port`` (IPv6 as ``[addr]:port``) with a unicast address and a non-zero port."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or len(text) > 64:
        raise InvalidArgument(f"{where}: {validate.shown(text)} is not address:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    addr = validate.address(host, where)
    if addr.is_unspecified or addr.is_multicast:
        raise InvalidArgument(f"{where}: {addr} cannot be an upstream (unspecified or multicast)")
    return str(addr), validate.port(int(port), where)


def check_listener(listener: Listener, where: str) -> None:
    """Every field of one listener, naming the first bad one."""
    if listener.direction not in DIRECTIONS:
        raise InvalidArgument(f"{where}.direction: give DIRECTION_INGRESS or DIRECTION_EGRESS")
    validate.port(listener.port, f"{where}.port")
    validate.port(listener.proxy_port, f"{where}.proxy_port")
    if listener.protocol != "TCP":
        raise InvalidArgument(f"{where}.protocol: L7 rules cover TCP only, got {validate.shown(listener.protocol)}")
    addr = validate.address(listener.bind_address, f"{where}.bind_address")
    if addr.version == 6 and addr.ipv4_mapped is not None:
        raise InvalidArgument(f"{where}.bind_address: give the IPv4 address itself")
    original = listener.transparent or listener.use_original_dst
    if listener.upstream:
        parse_upstream(listener.upstream, f"{where}.upstream")
    elif not original:
        raise InvalidArgument(
            f"{where}.upstream: give address:port, or set use_original_dst or transparent "
            "to forward to the original destination"
        )
    validate.at_most(len(listener.rules), MAX_RULES, f"{where}.rules")
    seen: set[str] = set()
    for i, rule in enumerate(listener.rules):
        at = f"{where}.rules[{i}]"
        if not RULE_NAME_RE.fullmatch(rule.name):
            raise InvalidArgument(
                f"{at}.name: {validate.shown(rule.name)} must be 1-63 letters, digits, '-', '_' or '.', "
                "starting and ending with a letter or digit"
            )
        if rule.name in seen:
            raise InvalidArgument(f"{at}.name: {rule.name!r} is used twice in this listener")
        seen.add(rule.name)
        for what in ("method", "path", "host"):
            value = getattr(rule, what)
            if value:
                check_regex(value, f"{at}.{what}")
        validate.at_most(len(rule.headers), MAX_HEADERS, f"{at}.headers")
        for j, header in enumerate(rule.headers):
            hat = f"{at}.headers[{j}]"
            if not TOKEN_RE.fullmatch(header.name):
                raise InvalidArgument(
                    f"{hat}.name: {validate.shown(header.name)} is not an HTTP header name (RFC 7230 token)"
                )
            if header.exact is not None:
                if len(header.exact) > MAX_HEADER_VALUE_CHARS:
                    raise InvalidArgument(f"{hat}.exact: longer than {MAX_HEADER_VALUE_CHARS} characters")
                if any(c in header.exact for c in "\r\n\x00"):
                    raise InvalidArgument(f"{hat}.exact: a header value cannot hold CR, LF or NUL")
        validate.at_most(len(rule.sources), MAX_SOURCES, f"{at}.sources")
        for j, source in enumerate(rule.sources):
            validate.cidr(source, f"{at}.sources[{j}]")
        validate.at_most(len(rule.destinations), MAX_SOURCES, f"{at}.destinations")
        for j, destination in enumerate(rule.destinations):
            validate.cidr(destination, f"{at}.destinations[{j}]")


def check_endpoint(endpoint: str, listeners: list[Listener]) -> None:
    """One endpoint's new listeners: each valid, and no (direction, port) or proxy port twice."""
    validate.name(endpoint, "endpoint")
    validate.at_most(len(listeners), MAX_LISTENERS_PER_ENDPOINT, "listeners")
    keys: dict[tuple[str, int], int] = {}
    ports: dict[int, int] = {}
    for i, listener in enumerate(listeners):
        check_listener(listener, f"listeners[{i}]")
        key = (listener.direction, listener.port)
        if key in keys:
            raise InvalidArgument(
                f"listeners[{i}]: {listener.direction} port {listener.port} is also listeners[{keys[key]}]"
            )
        keys[key] = i
        if listener.proxy_port in ports:
            raise InvalidArgument(
                f"listeners[{i}].proxy_port: {listener.proxy_port} is also listeners[{ports[listener.proxy_port]}]'s"
            )
        ports[listener.proxy_port] = i


def check_node(endpoint: str, listeners: list[Listener], others: list[Listener]) -> None:
    """The new listeners against the other endpoints': a proxy port serves one listener."""
    taken = {(_family(o.bind_address), o.proxy_port): o for o in others if o.endpoint != endpoint}
    for i, listener in enumerate(listeners):
        other = taken.get((_family(listener.bind_address), listener.proxy_port))
        if other is not None:
            raise AlreadyExists(
                f"listeners[{i}].proxy_port: {listener.proxy_port} already serves listener {other.name}"
            )


def _family(address: str) -> int:
    return ipaddress.ip_address(address).version


def same(a: list[Listener], b: list[Listener]) -> bool:
    """Whether two listener lists say the same thing (order of listeners aside)."""
    return sorted(a, key=lambda x: x.name) == sorted(b, key=lambda x: x.name)


@dataclass
class Desired:
    """Every endpoint's listeners, as the store holds them."""

    endpoints: dict[str, list[Listener]] = field(default_factory=dict)

    def all(self) -> list[Listener]:
        return [x for name in sorted(self.endpoints) for x in self.endpoints[name]]
