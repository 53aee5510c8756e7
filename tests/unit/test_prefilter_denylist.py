"""Deny-list planning, without a kernel (CIDR parsing is tested in tests/common/test_common_validate.py)."""

from __future__ import annotations

import ipaddress

import pytest

from services.common.errors import InvalidArgument, NotFound, ResourceExhausted
from services.prefilter.denylist import Capacity, DenyList, parse_entries, wanted_of


def test_same_cidr_twice_with_different_modes_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="twice"):
        parse_entries([("10.0.0.0/8", False), ("10.0.0.0/8", True)])


def test_plans_keep_ids_stable_and_reuse_freed_ones() -> None:
    deny = DenyList(Capacity(hosts=3, prefixes=2))
    added, changed = deny.plan_add(parse_entries([("10.0.0.1", False), ("10.0.0.0/8", False)]))
    assert [e.id for e in added] == [0, 1] and not changed
    deny.commit(upserts=added)
    added, changed = deny.plan_add(parse_entries([("10.0.0.1", True)]))
    assert not added and [(str(e.network), e.audit, e.id) for e in changed] == [("10.0.0.1/32", True, 0)]
    deny.commit(upserts=changed)
    removed = deny.plan_delete([ipaddress.ip_network("10.0.0.1/32")])
    deny.commit(removed=removed)
    added, _ = deny.plan_add(parse_entries([("10.0.0.2", False)]))
    assert [e.id for e in added] == [0]  # the freed id comes back


def test_capacity_is_checked_per_family_and_kind() -> None:
    deny = DenyList(Capacity(hosts=2, prefixes=1))
    deny.commit(upserts=deny.plan_add(parse_entries([("10.0.0.1", False), ("2001:db8::1", False)]))[0])
    with pytest.raises(ResourceExhausted, match="3 IPv4 host"):
        deny.plan_add(parse_entries([("10.0.0.2", False), ("10.0.0.3", False)]))
    with pytest.raises(ResourceExhausted, match="2 IPv6 prefix entries do not fit: the map holds 1"):
        deny.plan_replace(wanted_of(parse_entries([("2001:db8::/32", False), ("2001:db9::/32", False)])))
    assert len(deny.entries) == 2


def test_replace_plan_keeps_ids_of_kept_entries_and_abort_gives_ids_back() -> None:
    deny = DenyList(Capacity(hosts=4, prefixes=4))
    first, _ = deny.plan_add(parse_entries([("10.0.0.1", False), ("10.0.0.2", False)]))
    deny.commit(upserts=first)
    plan = deny.plan_replace(wanted_of(parse_entries([("10.0.0.2", False), ("10.9.0.0/16", False)])))
    ids = {str(e.network): e.id for e in plan.entries()}
    assert ids["10.0.0.2/32"] == 1 and ids["10.9.0.0/16"] == 0  # took the leaving entry's id
    assert plan.leaving_ids == [0] and plan.changed == 2
    deny.abort(plan.fresh_ids)
    assert set(map(str, deny.entries)) == {"10.0.0.1/32", "10.0.0.2/32"}
    # Both ids of that plan are still held by current entries: none may be handed out again.
    added, _ = deny.plan_add(parse_entries([("10.5.0.0/16", False)]))
    assert [e.id for e in added] == [2]
    # An aborted add gives its fresh id back: the next plan takes it again.
    deny.abort(e.id for e in added)
    again, _ = deny.plan_add(parse_entries([("10.6.0.0/16", False)]))
    assert [e.id for e in again] == [2]
    with pytest.raises(NotFound):
        deny.plan_delete([ipaddress.ip_network("10.7.0.0/16")])
