"""The policy service's gRPC layer: convert, call one `Policy` method, fill the reply."""

from __future__ import annotations

import ipaddress
from typing import Any

import grpc.aio
from weir.common.v1 import common_pb2
from weir.policy.v1 import policy_pb2 as pb
from weir.policy.v1 import policy_pb2_grpc as pb_grpc

from services.common.datapath import CtFlag, CtScope, Direction
from services.common.worker import Worker
from services.policy import rules as rules_mod
from services.policy.maps import ConntrackEntry
from services.policy.policy import Policy, protocol_name

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Policy"].full_name
Context = grpc.aio.ServicerContext[Any, Any]


POLICY_SCOPES = {int(CtScope.INGRESS), int(CtScope.EGRESS)}
CT_SCOPES = {int(s) for s in CtScope}


def _direction(d: Direction) -> common_pb2.Direction.ValueType:
    return common_pb2.Direction.Value(f"DIRECTION_{d.name}")


def _conntrack(entry: ConntrackEntry) -> pb.ConntrackEntry:
    k, v = entry.key, entry.value
    scope = int(k.dir)
    size = 4 if k.family == 2 else 16
    ports = k.proto in (6, 17)
    return pb.ConntrackEntry(
        protocol=protocol_name(int(k.proto)),
        source=str(ipaddress.ip_address(bytes(k.saddr)[:size])),
        destination=str(ipaddress.ip_address(bytes(k.daddr)[:size])),
        source_port=int.from_bytes(int(k.sport).to_bytes(2, "little"), "big") if ports else 0,
        destination_port=int.from_bytes(int(k.dport).to_bytes(2, "little"), "big") if ports else 0,
        direction=_direction(Direction(scope)) if scope in POLICY_SCOPES else common_pb2.DIRECTION_UNSPECIFIED,
        scope=CtScope(scope).name if scope in CT_SCOPES else str(scope),
        backend_id=int(v.backend_id),
        source_identity=int(v.src_identity),
        packets=int(v.packets),
        bytes=int(v.bytes),
        expires_in_seconds=int(entry.expires_in),
        flags=[f.name for f in CtFlag if int(v.flags) & f],
        rev_nat_index=int(v.rev_nat_index),
    )


class PolicyServicer(pb_grpc.PolicyServicer):
    def __init__(self, worker: Worker, policy: Policy) -> None:
        self._worker = worker
        self._policy = policy

    async def ImportRules(self, request: pb.ImportRulesRequest, context: Context) -> pb.ImportRulesResponse:
        revision, endpoints = await self._worker.call(self._policy.import_rules, list(request.rules), request.document)
        return pb.ImportRulesResponse(revision=revision, endpoints=endpoints)

    async def DeleteRules(self, request: pb.DeleteRulesRequest, context: Context) -> pb.ImportRulesResponse:
        revision, endpoints = await self._worker.call(self._policy.delete_rules, list(request.names))
        return pb.ImportRulesResponse(revision=revision, endpoints=endpoints)

    async def ListRules(self, request: pb.ListRulesRequest, context: Context) -> pb.ListRulesResponse:
        rules, token, revision = await self._worker.call(
            self._policy.list_rules, request.page.page_size, request.page.page_token
        )
        return pb.ListRulesResponse(
            rules=[rules_mod.to_proto(r) for r in rules], next_page_token=token, revision=revision
        )

    async def GetRule(self, request: pb.GetRuleRequest, context: Context) -> pb.Rule:
        return rules_mod.to_proto(await self._worker.call(self._policy.get_rule, request.name))

    async def ListIdentities(self, request: pb.ListIdentitiesRequest, context: Context) -> pb.ListIdentitiesResponse:
        identities = await self._worker.call(self._policy.identities)
        return pb.ListIdentitiesResponse(
            identities=[
                pb.Identity(id=i, labels=text.split(",") if text else [], prefixes=p) for i, text, p in identities
            ]
        )

    async def _endpoint_policy(self, name: str) -> pb.EndpointPolicy:
        policy, audit, hits = await self._worker.call(self._policy.endpoint_policy, name)
        return pb.EndpointPolicy(
            endpoint=policy.endpoint.name,
            endpoint_id=policy.endpoint.id,
            identity=policy.endpoint.identity,
            ingress_enforced=policy.ingress_enforced,
            egress_enforced=policy.egress_enforced,
            audit=audit,
            entries=[
                pb.PolicyEntry(
                    direction=_direction(e.direction),
                    identity=e.identity,
                    protocol=e.proto,
                    port=e.port,
                    port_prefix=e.port_prefix if e.proto else 0,
                    deny=e.deny,
                    proxy_port=e.proxy_port,
                    hits=common_pb2.Counter(packets=hits[e].packets, bytes=hits[e].bytes),
                    rules=list(e.rules),
                )
                for e in policy.entries
            ],
        )

    async def GetEndpointPolicy(self, request: pb.GetEndpointPolicyRequest, context: Context) -> pb.EndpointPolicy:
        return await self._endpoint_policy(request.endpoint)

    async def SetAuditMode(self, request: pb.SetAuditModeRequest, context: Context) -> pb.EndpointPolicy:
        await self._worker.call(self._policy.set_audit, request.endpoint, request.audit)
        return await self._endpoint_policy(request.endpoint)

    async def Trace(self, request: pb.TraceRequest, context: Context) -> pb.TraceResponse:
        result = await self._worker.call(
            self._policy.trace, request.source, request.destination, request.port, request.protocol, request.connection
        )
        return pb.TraceResponse(
            allowed=result.allowed,
            verdict=result.verdict,
            source_identity=result.source_identity,
            destination_identity=result.destination_identity,
            steps=result.steps,
            deciding_rules=result.rules,
            path=result.path,
        )

    async def ListConntrack(self, request: pb.ListConntrackRequest, context: Context) -> pb.ListConntrackResponse:
        entries = await self._worker.call(self._policy.conntrack, request.limit)
        return pb.ListConntrackResponse(entries=[_conntrack(e) for e in entries])
