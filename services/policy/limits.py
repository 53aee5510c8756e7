"""How much one policy request may ask for, and a YAML loader that stays inside it.

Every limit is checked on the request as it arrived (counts of repeated fields, the
document's length, the nodes a document expands to while it is composed), before a rule
is built, an identity allocated or a map written, so a request over a limit costs little
and changes nothing. The YAML loader counts nodes as it composes them, an alias counting
as the whole subtree it repeats: a small document with anchors that would expand to a
million CIDRs is refused after the budget, not after the million. Nesting depth is
bounded too (the composer recurses once per level).
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionStartEvent, NodeEvent

from services.common.errors import InvalidArgument

MAX_RULES_PER_REQUEST = 100_000  # rules in one ImportRules (messages and document together), names in one DeleteRules
MAX_DOCUMENT_CHARS = 4 * 1024 * 1024  # as gRPC's default message size
MAX_DOCUMENT_NODES = 500_000  # YAML nodes after alias expansion: 200k CIDRs fit, an alias bomb does not
MAX_DOCUMENT_ALIASES = 1_000
MAX_DOCUMENT_DEPTH = 32  # a policy object nests about 8 levels deep
MAX_PEERS_PER_SECTION = 1_000
MAX_CIDRS_PER_RULE = 50_000  # CIDRs and their excepts, all sections of one rule
MAX_CIDRS_PER_REQUEST = 200_000
MAX_EXCEPTS_PER_CIDR = 1_000
MAX_PORTS_PER_RULE = 1_000
MAX_SELECTORS_PER_PEER = 256
MAX_LABELS_PER_SELECTOR = 64  # match_labels and match_expressions together
MAX_VALUES_PER_EXPRESSION = 256
MAX_DESCRIPTION_CHARS = 4_096
MAX_SPECS_PER_RULE = 1_000  # specs of one policy (a CiliumNetworkPolicy's `specs:`)
# Cilium's own bounds (pkg/policy/api/rule_validation.go): ports of one toPorts entry, types of one icmps entry.
MAX_PORTS_PER_PORT_RULE = 40
MAX_ICMP_FIELDS = 40
MAX_HTTP_RULES_PER_PORT = 256  # as many as one Envoy listener takes (services/l7/model.py)
MAX_HTTP_HEADERS = 32
MAX_HTTP_HEADER_VALUE_CHARS = 4096
MAX_TEXT_SHOWN = 64  # characters of a refused value quoted back in an error or a log line


def shown(value: object) -> str:
    """A value quoted for a message, cut to MAX_TEXT_SHOWN characters (an error never echoes a huge input)."""
    text = repr(value)
    if len(text) <= MAX_TEXT_SHOWN:
        return text
    return f"{text[:MAX_TEXT_SHOWN]}... ({len(text)} characters)"


def brief(text: str, limit: int = 500) -> str:
    """Free text (an error from another service) cut for a log line."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def summary(names: list[str], first: int = 5) -> str:
    """Names for a log line: the first few and how many there are."""
    if len(names) <= first:
        return ", ".join(names)
    return f"{', '.join(names[:first])} and {len(names) - first} more"


def at_most(count: int, limit: int, what: str) -> None:
    """Refuse a request naming more than `limit` of `what`."""
    if count > limit:
        raise InvalidArgument(f"{what}: {count} given, at most {limit} are accepted in one request; split it")


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents expanding beyond the node budget or nesting too deep."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._aliases = 0
        self._depth = 0
        self._open: set[str] = set()
        self._sizes: dict[str, int] = {}

    def _charge(self, count: int) -> None:
        self._nodes += count
        if self._nodes > MAX_DOCUMENT_NODES:
            raise InvalidArgument(
                f"document expands to more than {MAX_DOCUMENT_NODES} YAML nodes (aliases counted as what they "
                "repeat); split it or write it without anchors"
            )

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        """A key given twice is refused: YAML would keep the last silently, dropping a section or rule."""
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the schema walk refuses it by name
                continue
            if duplicate:
                line = key_node.start_mark.line + 1
                raise InvalidArgument(f"document line {line}: key {shown(str(key))} is given twice in one mapping")
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, AliasEvent):
            alias = str(event.anchor)
            if alias in self._open:
                raise InvalidArgument(f"document: alias *{shown(alias)} refers to a node that contains it")
            self._aliases += 1
            if self._aliases > MAX_DOCUMENT_ALIASES:
                raise InvalidArgument(f"document uses more than {MAX_DOCUMENT_ALIASES} aliases")
            self._charge(self._sizes.get(alias, 1))
            return super().compose_node(parent, index)
        anchor: str | None = event.anchor if isinstance(event, NodeEvent) else None
        if isinstance(event, CollectionStartEvent):
            self._depth += 1
            if self._depth > MAX_DOCUMENT_DEPTH:
                raise InvalidArgument(f"document nests deeper than {MAX_DOCUMENT_DEPTH} levels")
        before = self._nodes
        self._charge(1)
        if anchor is not None:
            self._open.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            if anchor is not None:
                self._open.discard(anchor)
            if isinstance(event, CollectionStartEvent):
                self._depth -= 1
        if anchor is not None:
            self._sizes[anchor] = self._nodes - before
        return node


def load_documents(text: str) -> list[Any]:
    """The YAML (or JSON) documents of `text`, within the size, node, alias and depth budgets."""
    at_most(len(text), MAX_DOCUMENT_CHARS, "document characters")
    if "\x00" in text:
        raise InvalidArgument("document contains a NUL character")
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # the reader refuses unprintable characters here
        out = []
        while loader.check_data():  # type: ignore[no-untyped-call]
            out.append(loader.get_data())
        return out
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"document is not valid YAML or JSON: {brief(str(exc), 300)}") from None
    except RecursionError:
        raise InvalidArgument(f"document nests deeper than {MAX_DOCUMENT_DEPTH} levels") from None
    finally:
        if loader is not None:
            loader.dispose()
