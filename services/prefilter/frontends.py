"""The lb service's frontend addresses, for the valid-destination mode.

Read with the lb service's ListServices over its unix socket. The lb service not
running (or not answering) leaves the last known frontends in place and is not the
prefilter's failure: the follower logs it once and keeps the prefilter SERVING.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc
import grpc.aio
import structlog
from weir.common.v1 import common_pb2
from weir.lb.v1 import lb_pb2, lb_pb2_grpc

from services.common.validate import Network

log = structlog.get_logger("weir.prefilter.frontends")

PAGE = 1000
TIMEOUT = 5.0


def frontend_address(text: str) -> Network | None:
    """The address of an "addr:port" frontend as a host prefix (None when it does not parse)."""
    address = text.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_network(address)
    except ValueError:
        return None


async def read_frontends(socket: Path) -> set[Network] | None:
    """Every frontend address the lb service serves; None when it cannot be asked."""
    if not socket.exists():
        return None
    out: set[Network] = set()
    token = ""
    try:
        async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
            stub = lb_pb2_grpc.LoadBalancerStub(channel)
            while True:
                page = common_pb2.PageRequest(page_size=PAGE, page_token=token)
                reply = await stub.ListServices(lb_pb2.ListServicesRequest(page=page), timeout=TIMEOUT)
                for service in reply.services:
                    out.update(n for n in map(frontend_address, service.frontends) if n is not None)
                token = reply.next_page_token
                if not token:
                    return out
    except grpc.RpcError as exc:
        log.info("lb service not answering; keeping the frontends known", error=str(exc.code()))
        return None
