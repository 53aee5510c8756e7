"""Hostile requests against a real service: refusals are proper statuses and change nothing.

Each service's fuzz test (tests/e2e/test_fuzz_*.py) gives a hypothesis strategy of
(rpc name, request) pairs, a snapshot of the state a refusal must leave as it was, and
optionally a check of what an accepted request did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Statuses that mean the service broke rather than refused.
BROKEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
SHOWN = 500  # characters of a request quoted in a failure


def send_hostile_calls(
    stub: Any,
    calls: st.SearchStrategy[tuple[str, Any]],
    snapshot: Callable[[], object],
    max_examples: int,
    on_accepted: Callable[[str, Any, Any], None] | None = None,
) -> dict[str, set[str]]:
    """Run the generated calls; returns the status names (and "OK") seen per RPC."""
    seen: dict[str, set[str]] = {}

    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(calls)
    def check(call: tuple[str, Any]) -> None:
        rpc, request = call
        before = snapshot()
        try:
            reply = getattr(stub, rpc)(request, timeout=30)
        except grpc.RpcError as err:
            code = err.code()
            assert code not in BROKEN, f"{rpc}({str(request)[:SHOWN]}) -> {code} {(err.details() or '')[:300]}"
            assert snapshot() == before, f"refused {rpc}({str(request)[:SHOWN]}) changed the state"
            seen.setdefault(rpc, set()).add(code.name)
        else:
            seen.setdefault(rpc, set()).add("OK")
            if on_accepted is not None:
                on_accepted(rpc, request, reply)

    check()
    return seen
