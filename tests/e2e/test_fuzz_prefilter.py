"""Generated bad and edge requests against a real prefilter: never INTERNAL, and a refusal changes nothing.

Every RPC gets well-formed messages whose fields hold odd values (malformed, scoped or
huge CIDRs, unknown enum numbers, bad interface names, stale revisions, odd page sizes).
After each call the status must be a deliberate one; after each refusal the list, the
attachments and the pinned maps must read exactly as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from weir.common.v1 import common_pb2
from weir.prefilter.v1 import prefilter_pb2 as pb
from weir.prefilter.v1 import prefilter_pb2_grpc as pb_grpc

from services.prefilter.maps import dump_pinned
from tests.harness.node import NET_IFNAME, Node

pytestmark = pytest.mark.root

BROKEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)  # protobuf strings are UTF-8

cidrs = st.one_of(
    st.sampled_from([
        "203.0.113.7", "198.51.0.0/16", "10.0.0.0/8", "0.0.0.0/0", "::/0", "2001:db8::/32", "2001:db8::1",
        "fe80::5", "169.254.0.0/16", "10.1.2.3/16", "10.0.0.0/33", "2001:db8::/129", "10.0.0.0/-1", "10.0.0.0/08",
        "fe80::5%eth0", "fe80::%1/64", "::ffff:10.0.0.1", " 10.0.0.0/8 ", "10.0.0.0/8\n", "10.0.0.0\x00/8", "",
        "/", "1.2.3.4/", "\uff11.\uff12.\uff13.\uff14", "1" * 10_000, "a" * 65, "ff02::1", "224.0.0.0/4",
    ]),
    TEXT,
    st.builds(lambda a, b, c, d, n: f"{a}.{b}.{c}.{d}/{n}", *[st.integers(0, 300)] * 4, st.integers(-1, 40)),
)  # fmt: skip
modes = st.one_of(st.sampled_from([0, 1, 2]), st.integers(-(2**31), 2**31 - 1))
revisions = st.one_of(st.just(0), st.integers(0, 2**64 - 1))
entry_lists = st.lists(st.builds(lambda c, m: pb.Entry(cidr=c, mode=m), cidrs, modes), max_size=8)
interfaces = st.one_of(
    st.sampled_from(["", "nope0", "lo", NET_IFNAME, NET_IFNAME + "\n", "a/b", "a:b", ".", "..", "x" * 16,
                     "wnet\x000", "é" * 8, "x" * 100_000]),
    TEXT,
)  # fmt: skip
pages = st.builds(lambda size, token: common_pb2.PageRequest(page_size=size, page_token=token),
                  st.one_of(st.sampled_from([0, 1, 100_000, 100_001]), st.integers(0, 2**32 - 1)),
                  st.one_of(st.sampled_from(["", "10.0.0.0/8", "zzz"]), TEXT))  # fmt: skip

calls = st.one_of(
    st.builds(lambda e, r: ("AddEntries", pb.AddEntriesRequest(entries=e, expected_revision=r)),
              entry_lists, revisions),
    st.builds(lambda c, r: ("DeleteEntries", pb.DeleteEntriesRequest(cidrs=c, expected_revision=r)),
              st.lists(cidrs, max_size=8), revisions),
    st.builds(lambda e, r: ("ReplaceEntries", pb.ReplaceEntriesRequest(entries=e, expected_revision=r)),
              entry_lists, revisions),
    st.builds(lambda c: ("DeleteEntries", pb.DeleteEntriesRequest(cidrs=c)),
              st.lists(st.sampled_from(["203.0.113.7", "198.51.0.0/16", "10.0.0.0/8", "fe80::5"]), max_size=2)),
    st.builds(lambda p: ("ListEntries", pb.ListEntriesRequest(page=p)), pages),
    st.builds(lambda c: ("GetCounters", pb.GetCountersRequest(cidrs=c)), st.lists(cidrs, max_size=8)),
    st.builds(lambda i, m: ("Attach", pb.AttachRequest(interface=i, mode=m)), interfaces, modes),
    st.builds(lambda m: ("Attach", pb.AttachRequest(interface=NET_IFNAME, mode=m)), st.sampled_from([0, 1, 2, 3])),
    st.just(("Detach", pb.DetachRequest(interface=NET_IFNAME))),
    st.builds(lambda i: ("Detach", pb.DetachRequest(interface=i)), interfaces),
    st.just(("ListAttachments", pb.ListAttachmentsRequest())),
    st.builds(lambda e, c: ("SetValidDestinations", pb.SetValidDestinationsRequest(enabled=e, cidrs=c)),
              st.booleans(), st.lists(cidrs, max_size=8)),
    st.just(("GetValidDestinations", pb.GetValidDestinationsRequest())),
    st.builds(lambda v4, v6, m, r: ("ReplaceEntries", pb.ReplaceEntriesRequest(
                  packed=[pb.PackedHosts(ipv4=v4, ipv6=v6, mode=m)], expected_revision=r)),
              st.binary(max_size=80), st.binary(max_size=80), modes, revisions),
)  # fmt: skip


def snapshot(s: pb_grpc.PrefilterStub, node: Node) -> tuple[Any, ...]:
    """Everything a client or a packet can observe of the deny list and the attachments."""
    listed = s.ListEntries(pb.ListEntriesRequest(page=common_pb2.PageRequest(page_size=100_000)), timeout=10)
    attachments = s.ListAttachments(pb.ListAttachmentsRequest(), timeout=10)
    valid = s.GetValidDestinations(pb.GetValidDestinationsRequest(), timeout=10)
    return (listed.revision, [(e.cidr, e.mode) for e in listed.entries],
            sorted((a.interface, a.mode, a.program_id) for a in attachments.attachments),
            valid.enabled, sorted(valid.cidrs), dump_pinned(node.bpffs_root / "prefilter"))  # fmt: skip


def test_fuzzed_requests_never_break_the_prefilter_and_refusals_change_nothing(
    make_node: Callable[..., Node],
) -> None:
    node = make_node("orchestrator")
    node.start("prefilter", "--host-entries", "16", "--prefix-entries", "8")
    s = pb_grpc.PrefilterStub(node.channel("prefilter"))
    s.AddEntries(pb.AddEntriesRequest(entries=[pb.Entry(cidr="203.0.113.7"), pb.Entry(cidr="198.51.0.0/16")]))
    seen: dict[str, set[str]] = {}

    @settings(max_examples=800, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(calls)
    def check(call: tuple[str, Any]) -> None:
        rpc, request = call
        before = snapshot(s, node)
        try:
            getattr(s, rpc)(request, timeout=30)
        except grpc.RpcError as err:
            code = err.code()
            assert code not in BROKEN, f"{rpc}({str(request)[:500]}) -> {code} {(err.details() or '')[:300]}"
            assert snapshot(s, node) == before, f"refused {rpc}({str(request)[:500]}) changed the state"
            seen.setdefault(rpc, set()).add(code.name)
        else:
            seen.setdefault(rpc, set()).add("OK")
            # An accepted change holds what was asked: no unknown mode mapped to DENY, no scope dropped.
            if rpc in ("AddEntries", "ReplaceEntries"):
                ok = all(e.mode in (0, 1, 2) and "%" not in e.cidr for e in request.entries)
                ok = ok and all(p.mode in (0, 1, 2) for p in getattr(request, "packed", ()))
                assert ok, f"{rpc} accepted {str(request)[:500]}"
            if rpc == "Attach":
                assert request.mode in (0, 1, 2), f"Attach accepted mode {request.mode}"

    check()
    # The generator reached every RPC, and refusals of the change RPCs were seen.
    assert set(seen) == set(pb.DESCRIPTOR.services_by_name["Prefilter"].methods_by_name), seen
    assert all(
        {"INVALID_ARGUMENT", "OK"} <= seen[rpc]
        for rpc in ("AddEntries", "DeleteEntries", "ReplaceEntries", "Attach", "Detach")
    ), seen
