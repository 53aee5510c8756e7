"""`weir status`: is every service up and healthy, and what does the node's chain look like.

In cluster mode it also shows the kvstore connection and the nodes registered now.

Exit 0 when every service of the suite answers SERVING, 1 when one answers something else
(NOT_SERVING: waiting for the orchestrator, or held on a bad state file), 3 when one is
unreachable. The chain part (slots, XDP and tc attachments, the shared maps' fill) and the
object counts come from the orchestrator and the services' own list calls; they are left
out for a service that does not answer.
"""

from __future__ import annotations

from typing import Any

import click
from weir.lb.v1 import lb_pb2
from weir.orchestrator.v1 import orchestrator_pb2 as orch_pb
from weir.policy.v1 import policy_pb2
from weir.prefilter.v1 import prefilter_pb2

from services.cli.client import CliFailure, Node, Unreachable, current, page, paged
from services.cli.output import Column, emit, output_option, pick, table, to_dict
from services.orchestrator.suite import SERVICES


def _services(node: Node) -> list[dict[str, Any]]:
    names = list(SERVICES) + [s for s in node.services_found() if s not in SERVICES]
    return [
        {
            "service": name,
            "socket": str(node.socket(name)),
            "health": (health := node.health(name)),
            "reachable": health not in ("NO_SOCKET", "UNREACHABLE"),
            "pid": node.pid(name) if health not in ("NO_SOCKET",) else None,
        }
        for name in names
    ]


def _counts(node: Node, up: set[str]) -> dict[str, int]:
    """How many objects each service holds (the fill its list calls can tell)."""
    counts: dict[str, int] = {}
    if "orchestrator" in up:
        stub = node.stub("orchestrator")
        counts["endpoints"] = len(
            paged(lambda t: stub.ListEndpoints(orch_pb.ListEndpointsRequest(page=page(t))), "endpoints")
        )
        counts["identities"] = len(stub.ListIdentities(orch_pb.ListIdentitiesRequest()).identities)
    if "prefilter" in up:
        stub = node.stub("prefilter")
        counts["prefilter_entries"] = len(
            paged(lambda t: stub.ListEntries(prefilter_pb2.ListEntriesRequest(page=page(t))), "entries")
        )
    if "policy" in up:
        stub = node.stub("policy")
        counts["policy_rules"] = len(
            paged(lambda t: stub.ListRules(policy_pb2.ListRulesRequest(page=page(t))), "rules")
        )
    if "lb" in up:
        stub = node.stub("lb")
        counts["lb_services"] = len(
            paged(lambda t: stub.ListServices(lb_pb2.ListServicesRequest(page=page(t))), "services")
        )
    return counts


def _cluster(node: Node, document: dict[str, Any]) -> list[Any]:
    """Cluster mode (as `cilium status` shows its KVStore line): etcd, the lease, the nodes."""
    reply = node.call("orchestrator", "GetClusterStatus", orch_pb.GetClusterStatusRequest())
    if not reply.enabled:
        return []
    cluster = to_dict(reply)
    document["cluster"] = cluster
    state = "connected" if reply.connected else f"NOT connected ({reply.last_error or 'no answer yet'})"
    title = f"cluster: node {reply.node_name}, kvstore {','.join(reply.kvstore_endpoints)} {state}"
    return [
        table(
            title,
            [
                Column("NODE", pick("name")),
                Column("ADDRESSES", lambda r: ",".join(r.get("addresses", []))),
                Column("CIDRS", lambda r: ",".join(r.get("cidrs", []))),
            ],
            cluster.get("nodes", []),
        )
    ]


@click.command()
@output_option
def status() -> None:
    """Services (reachable, health, pid), chain slots, XDP and tc attachments, map fill, object counts."""
    node = current()
    services = _services(node)
    up = {s["service"] for s in services if s["health"] == "SERVING"}
    document: dict[str, Any] = {"instance": node.instance, "run_dir": str(node.run_dir), "services": services}
    tables = [
        table(
            f"node {node.instance} ({node.run_dir})",
            [
                Column("SERVICE", pick("service")),
                Column("REACHABLE", pick("reachable")),
                Column("HEALTH", pick("health")),
                Column("PID", pick("pid"), "right"),
            ],
            services,
        )
    ]
    if "orchestrator" in up:
        slots = [to_dict(s) for s in node.call("orchestrator", "ListSlots", orch_pb.ListSlotsRequest()).slots]
        filled = [s for s in slots if s["program_id"]]
        xdp = [to_dict(a) for a in node.call("orchestrator", "ListXdp", orch_pb.ListXdpRequest()).attachments]
        devices = [to_dict(d) for d in node.call("orchestrator", "ListDevices", orch_pb.ListDevicesRequest()).devices]
        maps = [to_dict(m) for m in node.call("orchestrator", "GetMetrics", orch_pb.GetMetricsRequest()).maps]
        document.update(slots=slots, xdp=xdp, devices=devices, maps=maps)
        tables += [
            table(
                "chain slots (filled)",
                [
                    Column("HOOK", lambda r: str(r["hook"]).removeprefix("HOOK_")),
                    Column("SLOT", lambda r: str(r["slot"]).removeprefix("SLOT_")),
                    Column("PROGRAM", pick("program_name")),
                    Column("ID", pick("program_id"), "right"),
                    Column("SERVICE", pick("service")),
                    Column("GEN", pick("generation"), "right"),
                ],
                filled,
            ),
            table(
                "xdp attachments",
                [
                    Column("INTERFACE", pick("interface")),
                    Column("IFINDEX", pick("ifindex"), "right"),
                    Column("MODE", pick("mode")),
                    Column("PROGRAM", pick("program_id"), "right"),
                ],
                xdp,
            ),
            table(
                "tc devices (from/to-network)",
                [Column("INTERFACE", pick("interface")), Column("IFINDEX", pick("ifindex"), "right")],
                devices,
            ),
            table(
                "maps (fill)",
                [
                    Column("MAP", pick("name")),
                    Column("ENTRIES", pick("entries"), "right"),
                    Column("CAPACITY", pick("capacity"), "right"),
                    Column("FILL", lambda m: f"{int(m['entries']) / max(int(m['capacity']), 1):.1%}", "right"),
                ],
                maps,
            ),
        ]
    if "orchestrator" in up:
        tables += _cluster(node, document)
    counts = _counts(node, up)
    document["counts"] = counts
    tables.append(
        table(
            "objects",
            [Column("WHAT", pick("what")), Column("COUNT", pick("count"), "right")],
            [{"what": k, "count": v} for k, v in counts.items()],
        )
    )
    emit(document, *tables)
    if any(not s["reachable"] for s in services if s["service"] in SERVICES):
        raise Unreachable("some services are unreachable")
    if any(s["health"] != "SERVING" for s in services if s["service"] in SERVICES):
        raise CliFailure("some services are not SERVING")
