"""A route Envoy refuses (a regex RE2 rejects), pushed past our validation: NACK recorded, old rules kept.

Our API never builds such a resource, so the test drives the plain class in this process
(`L7Proxy.publish_extra`) with the real xDS server, the real access log service and a real
Envoy started by the real `Sidecar`.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from services.common.store import Store
from services.l7.accesslog import AccessLog
from services.l7.envoy import Sidecar
from services.l7.model import HttpRule, Listener
from services.l7.proxy import L7Proxy
from services.l7.resources import ROUTE, build, route
from services.l7.xds import Ads, serve_control
from tests.harness.l7 import free_port, request, start_upstream


def test_an_injected_bad_route_is_nacked_and_the_old_rules_stay_in_force(tmp_path: Path) -> None:
    upstream = start_upstream()
    port = free_port()
    listener = Listener(
        "web", "ingress", 80, port, (HttpRule("public", method="GET", path="/public"),), upstream.address
    )

    async def main() -> None:
        store = Store(tmp_path / "l7.db")
        ads = Ads(build(0, []))
        proxy = L7Proxy(store, ads)
        proxy.start()
        control = await serve_control(tmp_path / "xds.sock", ads, AccessLog())
        sidecar = Sidecar("nack-test", tmp_path / "envoy", tmp_path / "xds.sock")
        await sidecar.start()
        try:
            good = proxy.set_listeners("web", [listener])
            assert await ads.wait_applied(good.version, 15) == (True, None)
            assert (await asyncio.to_thread(request, port, "GET", "/public"))[0] == 200
            unchecked = replace(listener, rules=(HttpRule("public", method="GET", path=r"/(a)\1"),))
            version = proxy.publish_extra(ROUTE, listener.name, route(unchecked))  # never through model.check_*
            applied, nack = await ads.wait_applied(version, 15)
            assert not applied and nack is not None and nack.version == version, nack
            assert nack.type_url == ROUTE and "invalid escape sequence" in nack.message, nack.message
            assert ads.status().acked_version == good.version
            assert (await asyncio.to_thread(request, port, "GET", "/public"))[0] == 200
            assert (await asyncio.to_thread(request, port, "POST", "/public"))[0] == 403
        finally:
            await sidecar.stop()
            await control.stop(0)
            store.close()

    try:
        asyncio.run(main())
    finally:
        upstream.server.shutdown()
