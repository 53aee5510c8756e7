"""Flow events in user space: decoding rules and translations, rule filters, limit flags."""

from __future__ import annotations

import ctypes
import ipaddress
import re

import pytest

from services.common.datapath import Event, EventKind, EventLimitFlag, EventType, Hook, Reason
from services.common.errors import InvalidArgument
from services.orchestrator.eventlimits import DEFAULT_PREFILTER_RATE, Limit, default_limits, parse_limit
from services.orchestrator.events import decode
from services.orchestrator.flows import FlowFilter, Flows


def record(
    event_type: EventType, reason: Reason = Reason.FORWARDED, rule: int = 0, nat: str = "", nat_port: int = 0
) -> bytes:
    ev = Event()
    ev.type, ev.reason, ev.hook, ev.family, ev.proto = event_type, reason, Hook.FROM_CONTAINER, 2, 6
    ctypes.memmove(ev.saddr, ipaddress.ip_address("198.18.0.10").packed, 4)
    ctypes.memmove(ev.daddr, ipaddress.ip_address("198.19.0.1").packed, 4)
    ev.sport = int.from_bytes((40000).to_bytes(2, "big"), "little")
    ev.dport = int.from_bytes((80).to_bytes(2, "big"), "little")
    ev.rule = rule
    if nat:
        ctypes.memmove(ev.nat_addr, ipaddress.ip_address(nat).packed, 4)
        ev.nat_port = int.from_bytes(nat_port.to_bytes(2, "big"), "little")
    return bytes(ev)


def test_a_translation_decodes_with_its_backend_and_is_translated() -> None:
    event = decode(record(EventType.TRANSLATE, nat="198.18.0.11", nat_port=8080))
    assert (event.type, event.dst, event.dst_port) == ("TRANSLATE", "198.19.0.1", 80)
    assert (event.nat_addr, event.nat_port) == ("198.18.0.11", 8080)
    flow = Flows(4).add(event)
    assert flow.verdict == "TRANSLATED" and flow.rule == ""


def test_a_verdict_names_its_rule_through_the_rule_names_and_filters_by_it() -> None:
    names = {7: "default/web-in"}
    flows = Flows(8, lambda rule_id: names.get(rule_id, ""))
    allowed = flows.add(decode(record(EventType.VERDICT, rule=7)))
    denied = flows.add(decode(record(EventType.DROP, Reason.POLICY_DENY_RULE, rule=9)))
    unruled = flows.add(decode(record(EventType.DROP, Reason.POLICY_DENIED)))
    assert (allowed.verdict, allowed.rule) == ("FORWARDED", "default/web-in")
    assert (denied.verdict, denied.rule) == ("DROPPED", "#9")  # an id the map does not name: still shown
    assert unruled.rule == ""
    only = FlowFilter.parse(rules=["default/web-in"])
    assert [f for f in (allowed, denied, unruled) if only.match(f)] == [allowed]
    assert flows.policy_verdicts[("", "EGRESS", "FORWARDED")] == 1
    assert flows.policy_verdicts[("", "EGRESS", "DROPPED")] == 2


@pytest.mark.parametrize("bad", ["", "x" * 600])
def test_a_bad_rule_filter_is_refused_naming_the_field(bad: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^rules:"):
        FlowFilter.parse(rules=[bad])


def test_translated_is_a_verdict_filter() -> None:
    assert FlowFilter.parse(verdicts=["translated"]).verdicts == frozenset({"TRANSLATED"})


@pytest.mark.parametrize(
    ("text", "kind", "limit"),
    [
        ("drop=200/20", EventKind.DROP, Limit(200, 20, 1)),
        ("PREFILTER=50:64", EventKind.PREFILTER, Limit(50, 100, 64)),
        ("verdict=0", EventKind.VERDICT, Limit(0, 100, 1)),
        ("translate=off", EventKind.TRANSLATE, Limit(off=True)),
    ],
)
def test_limits_parse(text: str, kind: EventKind, limit: Limit) -> None:
    assert parse_limit(text) == (kind, limit)


@pytest.mark.parametrize("text", ["drop", "flows=10", "drop=fast", "drop=-1", "drop=10/0", "drop=10:0", "drop=2000000"])
def test_a_bad_limit_says_what_is_wrong(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_limit(text)


def test_limits_pack_as_the_datapath_reads_them() -> None:
    assert Limit(1000, 100).packed().interval_ns == 1_000_000
    assert Limit(0).packed().interval_ns == 0  # no limit
    assert Limit(off=True).packed().flags == EventLimitFlag.OFF
    assert default_limits()[EventKind.PREFILTER].rate == DEFAULT_PREFILTER_RATE
    assert set(default_limits()) == set(EventKind)
