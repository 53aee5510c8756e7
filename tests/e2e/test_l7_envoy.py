"""The L7 service with a real Envoy and real HTTP on loopback.

One service process (which starts Envoy) serves the whole module; a Python HTTP server
on 127.0.0.1 is the upstream (see `tests.harness.l7`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from weir.l7.v1 import l7_pb2 as pb

from tests.harness.l7 import (
    INGRESS,
    WEB_RULES,
    Service,
    free_port,
    listener,
    request,
    rule,
    running,
    start_upstream,
)

BROKEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    upstream = start_upstream()
    service = Service(tmp_path_factory.mktemp("l7"), upstream)
    service.start()
    try:
        yield service
    finally:
        pid = _envoy_pid(service)
        with contextlib.suppress(Exception):
            service.stop()
        if service.process is not None and service.process.poll() is None:
            service.process.kill()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        print(f"---- l7.log ----\n{service.tail(80)}")
        upstream.server.shutdown()


def _envoy_pid(service: Service) -> int:
    try:
        return int(service.stub().GetState(pb.GetStateRequest(), timeout=5).envoy.pid)
    except grpc.RpcError:
        return 0


def set_web(svc: Service, port: int, rules: list[pb.HttpRule], endpoint: str = "web") -> pb.SetListenersResponse:
    reply = svc.stub().SetListeners(
        pb.SetListenersRequest(endpoint=endpoint, listeners=[listener(port, svc.upstream, rules)], wait_applied=True),
        timeout=10,
    )
    assert reply.applied, reply
    return reply


@pytest.fixture(scope="module")
def web(svc: Service) -> int:
    """The proxy port of endpoint "web", configured through the real grpcurl binary."""
    port = free_port()
    body = json.dumps({
        "endpoint": "web",
        "wait_applied": True,
        "listeners": [{
            "direction": "DIRECTION_INGRESS", "port": 80, "proxy_port": port, "upstream": svc.upstream.address,
            "rules": [json.loads(json.dumps(_rule_json(r))) for r in WEB_RULES],
        }],
    })  # fmt: skip
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    argv = ["grpcurl", "-plaintext", "-unix", "-d", body, str(svc.socket), "weir.l7.v1.L7/SetListeners"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["applied"] is True, result.stdout
    return port


def _rule_json(r: pb.HttpRule) -> dict[str, object]:
    from google.protobuf import json_format

    return json_format.MessageToDict(r)


def test_get_public_passes_and_post_admin_is_denied_by_envoy(svc: Service, web: int) -> None:
    status, _, body = request(web, "GET", "/public")
    assert (status, body) == (200, "upstream GET /public")
    status, headers, body = request(web, "POST", "/admin/first")
    assert status == 403
    assert headers.get("server") == "envoy" and body == "RBAC: access denied"
    assert not svc.upstream.got("POST", "/admin/first"), "a denied request reached the upstream"
    assert request(web, "GET", "/publicity")[0] == 403, "the path regex must match the whole path"
    assert request(web, "POST", "/public")[0] == 403, "the method regex must match"


def test_header_rule_allows_and_denies(svc: Service, web: int) -> None:
    assert request(web, "POST", "/admin", {"X-Token": "s3cret"})[0] == 200
    assert request(web, "POST", "/admin", {"X-Token": "wrong"})[0] == 403
    assert request(web, "POST", "/admin", {"X-Token": "s3cret-and-more"})[0] == 403
    assert request(web, "PUT", "/admin", {"x-trace": ""})[0] == 200, "a present header with an empty value"
    assert request(web, "PUT", "/admin")[0] == 403


def test_host_rule_allows_and_denies(svc: Service, web: int) -> None:
    assert request(web, "DELETE", "/x", {"Host": "api.example.com"})[0] == 200
    assert request(web, "DELETE", "/x", {"Host": "api.example.com:8080"})[0] == 200
    assert request(web, "DELETE", "/x", {"Host": "evil.example.com"})[0] == 403
    assert request(web, "DELETE", "/x", {"Host": "api.example.com.evil"})[0] == 403


def test_a_rule_with_sources_applies_only_to_connections_from_them(svc: Service) -> None:
    port = free_port()
    rules = [pb.HttpRule(name="from-two", method="GET", sources=["127.0.0.2/32", "2001:db8::/32"])]
    set_web(svc, port, rules, endpoint="sources")
    try:
        assert request(port, "GET", "/x", source="127.0.0.2")[0] == 200
        assert request(port, "GET", "/x", source="127.0.0.1")[0] == 403
        assert request(port, "POST", "/x", source="127.0.0.2")[0] == 403
    finally:
        svc.stub().SetListeners(pb.SetListenersRequest(endpoint="sources"), timeout=10)


def test_rule_change_applies_to_the_next_request_on_an_open_connection(svc: Service) -> None:
    port = free_port()
    set_web(svc, port, [rule("public", method="GET", path="/public")], endpoint="keepalive")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:

        def get() -> int:
            conn.request("GET", "/public")
            reply = conn.getresponse()
            reply.read()
            return reply.status

        assert get() == 200
        sock = conn.sock
        assert sock is not None
        local = sock.getsockname()
        set_web(svc, port, [rule("other", path="/other")], endpoint="keepalive")
        assert get() == 403
        set_web(svc, port, [rule("public-again", method="GET", path="/pub.*")], endpoint="keepalive")
        assert get() == 200
        assert conn.sock is sock and sock.getsockname() == local, "the connection was replaced"
    finally:
        conn.close()
        svc.stub().SetListeners(pb.SetListenersRequest(endpoint="keepalive"), timeout=10)


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("path", r"/(a)\1"),  # a backreference: Python's re takes it, RE2 does not
        ("path", "/(?=admin)"),  # lookahead
        ("method", "GET("),
        ("host", "(" * 3 + "a" + ")" * 3 + "{1000}"),  # RE2 compiles it, Envoy refuses its size
    ],
)
def test_a_regex_envoy_would_refuse_is_invalid_argument_and_changes_nothing(
    svc: Service, web: int, field: str, bad: str
) -> None:
    stub = svc.stub()
    before = stub.GetState(pb.GetStateRequest(), timeout=5)
    bad_rule = pb.HttpRule(name="bad")
    setattr(bad_rule, field, bad)
    broken = [*WEB_RULES, bad_rule]
    with pytest.raises(grpc.RpcError) as err:
        stub.SetListeners(pb.SetListenersRequest(endpoint="web", listeners=[listener(web, svc.upstream, broken)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"listeners[0].rules[4].{field}" in (err.value.details() or "")
    after = stub.GetState(pb.GetStateRequest(), timeout=5)
    assert (after.endpoints, after.config_version) == (before.endpoints, before.config_version)
    assert request(web, "GET", "/public")[0] == 200 and request(web, "POST", "/admin")[0] == 403


def test_a_nack_is_reported_and_the_old_config_stays_in_force(svc: Service, web: int) -> None:
    """Envoy refuses a listener whose port someone else holds; we report it and never retry."""
    stub = svc.stub()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        taken = holder.getsockname()[1]
        reply = stub.SetListeners(
            pb.SetListenersRequest(
                endpoint="db", listeners=[listener(taken, svc.upstream, [rule("any")], port=5432)], wait_applied=True
            ),
            timeout=10,
        )
        assert not reply.applied and "Address already in use" in reply.nack, reply
        state = stub.GetState(pb.GetStateRequest(), timeout=5)
        assert state.last_nack.version == reply.config_version
        assert state.last_nack.type_url.endswith("envoy.config.listener.v3.Listener")
        assert "cannot bind" in state.last_nack.message
        assert state.acked_version < reply.config_version
        assert request(web, "GET", "/public")[0] == 200 and request(web, "POST", "/admin")[0] == 403
        time.sleep(1.0)
        nacks = svc.tail(400).count('"xds.nack"')
        assert nacks == 1, f"Envoy's refusal was retried ({nacks} NACKs)"
    finally:
        holder.close()
        stub.SetListeners(pb.SetListenersRequest(endpoint="db", wait_applied=True), timeout=10)


def test_access_log_events_and_counters(svc: Service, web: int) -> None:
    stub = svc.stub()
    tag = uuid.uuid4().hex[:8]
    assert request(web, "GET", f"/public/{tag}")[0] == 200
    assert request(web, "POST", f"/admin/{tag}")[0] == 403
    wanted = {f"/public/{tag}", f"/admin/{tag}"}
    found: dict[str, pb.L7Event] = {}
    call = stub.WatchEvents(pb.WatchEventsRequest(endpoint="web", replay=True), timeout=10)
    for event in call:
        if event.path in wanted:
            found[event.path] = event
        if len(found) == len(wanted):
            call.cancel()
            break
    allowed, denied = found[f"/public/{tag}"], found[f"/admin/{tag}"]
    assert (allowed.method, allowed.status, allowed.rule, allowed.verdict) == ("GET", 200, "public", pb.VERDICT_ALLOWED)
    assert (denied.method, denied.status, denied.rule, denied.verdict) == ("POST", 403, "", pb.VERDICT_DENIED)
    assert "rbac_access_denied" in denied.details
    assert allowed.endpoint == "web" and allowed.port == 80 and allowed.direction == INGRESS
    assert allowed.source.startswith("127.0.0.1:") and allowed.destination == f"127.0.0.1:{web}"
    counters = {c.rule: c for c in stub.GetCounters(pb.GetCountersRequest(endpoint="web"), timeout=5).counters}
    assert counters["public"].allowed >= 1 and counters[""].denied >= 1


def test_envoy_killed_is_restarted_and_fails_closed_meanwhile(svc: Service, web: int) -> None:
    stub = svc.stub()
    before = stub.GetState(pb.GetStateRequest(), timeout=5).envoy
    assert before.pid and before.ready
    os.kill(before.pid, signal.SIGKILL)
    outcomes: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            status, _, body = request(web, "POST", "/admin", timeout=2)
            outcomes.append(str(status))
            assert status == 403, f"a denied request got {status} {body!r} while Envoy restarted"
            if request(web, "GET", "/public", timeout=2)[0] == 200:
                break
        except OSError as exc:
            outcomes.append(type(exc).__name__)
        time.sleep(0.02)
    else:
        pytest.fail(f"Envoy did not come back: {outcomes[-5:]}\n{svc.tail()}")
    assert "ConnectionRefusedError" in outcomes, f"the gap was not observed: {outcomes[:5]}"
    assert not svc.upstream.got("POST", "/admin/gap")
    after = stub.GetState(pb.GetStateRequest(), timeout=5)
    assert after.envoy.pid != before.pid and after.envoy.restarts == before.restarts + 1
    assert after.envoy.last_exit == "killed by SIGKILL"
    assert after.acked_version == after.config_version


def test_a_killed_service_leaves_envoy_enforcing_and_its_restart_adopts_it(svc: Service, web: int) -> None:
    before = svc.stub().GetState(pb.GetStateRequest(), timeout=5)
    assert svc.stop(signal.SIGKILL) == -signal.SIGKILL
    assert running(before.envoy.pid)
    assert request(web, "GET", "/public")[0] == 200 and request(web, "POST", "/admin")[0] == 403
    svc.start()
    deadline = time.monotonic() + 10
    while True:
        after = svc.stub().GetState(pb.GetStateRequest(), timeout=5)
        if after.envoy.connected and after.acked_version == before.config_version:
            break
        assert time.monotonic() < deadline, f"the adopted Envoy did not reconnect: {after}"
        time.sleep(0.05)
    assert after.envoy.pid == before.envoy.pid and after.envoy.restarts == 0, "Envoy was replaced, not adopted"
    set_web(svc, web, [*WEB_RULES, rule("admin", method="POST", path="/admin")])
    assert request(web, "POST", "/admin")[0] == 200, "the adopted Envoy does not take new rules"
    set_web(svc, web, WEB_RULES)


def test_a_restarted_service_serves_the_same_config_and_drains_envoy(svc: Service, web: int) -> None:
    before = svc.stub().GetState(pb.GetStateRequest(), timeout=5)
    assert svc.stop() == 0
    assert not running(before.envoy.pid), "Envoy outlived a clean stop of its service"
    svc.start()
    after = svc.stub().GetState(pb.GetStateRequest(), timeout=5)
    assert (after.endpoints, after.config_version) == (before.endpoints, before.config_version)
    deadline = time.monotonic() + 10
    while svc.stub().GetState(pb.GetStateRequest(), timeout=5).acked_version != after.config_version:
        assert time.monotonic() < deadline, "the restarted Envoy never acknowledged the stored config"
        time.sleep(0.05)
    assert request(web, "GET", "/public")[0] == 200 and request(web, "POST", "/admin")[0] == 403


TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=30)
REGEXES = st.one_of(st.sampled_from(["", "GET", "/a.*", r"(a)\1", "(?=x)", "[", "a{1001}", "\\", "x" * 2000]), TEXT)
NAMES = st.one_of(st.sampled_from(["fz", "fz-1", "", "Web", "a" * 64, "fz\n", "-x", "fz.b"]), TEXT)
headers = st.builds(
    lambda n, e, p: pb.HeaderMatch(name=n, exact=e) if e is not None else pb.HeaderMatch(name=n, present=p),
    st.one_of(st.sampled_from(["x-a", "X-Token", "", "bad header", ":path", "a\r\nb"]), TEXT),
    st.one_of(st.none(), st.sampled_from(["v", "", "a\r\nb", "\x00"]), TEXT),
    st.booleans(),
)
rules = st.builds(
    lambda n, m, p, h, hs: pb.HttpRule(name=n, method=m, path=p, host=h, headers=hs),
    st.one_of(st.sampled_from(["r", "r", "", "-r", "r" * 64]), TEXT),
    REGEXES, REGEXES, REGEXES, st.lists(headers, max_size=3),
)  # fmt: skip
listeners = st.builds(
    lambda d, port, proxy, proto, up, bind, rs, tr, od: pb.Listener(
        direction=d, port=port, proxy_port=proxy, protocol=proto, upstream=up, bind_address=bind,
        rules=rs, transparent=tr, use_original_dst=od,
    ),
    st.one_of(st.sampled_from([0, 1, 2]), st.integers(-(2**31), 2**31 - 1)),
    st.one_of(st.sampled_from([0, 80, 65535, 65536]), st.integers(0, 2**32 - 1)),
    st.one_of(st.sampled_from([0, 1, 65536]), st.integers(0, 2**32 - 1)),
    st.sampled_from(["", "TCP", "tcp", "UDP", "SCTP", "x"]),
    st.one_of(st.sampled_from(["", "127.0.0.1:9", "[::1]:9", "127.0.0.1", "host:80", "127.0.0.1:0", "1.2.3.4:99999"]),
              TEXT),
    st.sampled_from(["", "127.0.0.1", "::1", "not-an-ip", "fe80::1%lo", "::ffff:127.0.0.1"]),
    st.lists(rules, max_size=3), st.booleans(), st.booleans(),
)  # fmt: skip
calls = st.one_of(
    st.builds(lambda e, ls: ("SetListeners", pb.SetListenersRequest(endpoint=e, listeners=ls)), NAMES,
              st.lists(listeners, max_size=3)),
    st.builds(lambda e: ("GetState", pb.GetStateRequest(endpoint=e)), NAMES),
    st.builds(lambda e: ("GetCounters", pb.GetCountersRequest(endpoint=e)), NAMES),
    st.builds(lambda e: ("WatchEvents", pb.WatchEventsRequest(endpoint=e)), NAMES),
)  # fmt: skip


def test_hostile_requests_get_statuses_and_refusals_change_nothing(svc: Service, web: int) -> None:
    stub = svc.stub()

    def snapshot() -> tuple[object, ...]:
        state = stub.GetState(pb.GetStateRequest(), timeout=5)
        return (list(state.endpoints), state.config_version)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(call=calls)
    def run(call: tuple[str, object]) -> None:
        method, message = call
        before = snapshot()
        rpc: Callable[..., object] = getattr(stub, method)
        try:
            result = rpc(message, timeout=0.5 if method == "WatchEvents" else 10)
            if method == "WatchEvents":
                list(result)  # type: ignore[call-overload]
        except grpc.RpcError as exc:
            assert exc.code() not in BROKEN, f"{method}: {exc.code()} {exc.details()}"
            if method == "WatchEvents" and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return
            assert snapshot() == before, f"a refused {method} changed the state"

    try:
        run()
    finally:
        state = stub.GetState(pb.GetStateRequest(), timeout=5)
        for endpoint in state.endpoints:
            if endpoint.endpoint not in ("web",):
                stub.SetListeners(pb.SetListenersRequest(endpoint=endpoint.endpoint), timeout=10)
    assert request(web, "GET", "/public")[0] == 200 and request(web, "POST", "/admin")[0] == 403
