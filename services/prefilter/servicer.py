"""The prefilter's gRPC layer: convert, call one `Prefilter` method, fill the reply."""

from __future__ import annotations

from typing import Any

import grpc.aio
from weir.common.v1 import common_pb2
from weir.prefilter.v1 import prefilter_pb2 as pb
from weir.prefilter.v1 import prefilter_pb2_grpc as pb_grpc

from pybpf import XdpMode
from services.common import validate
from services.common.datapath import Counter
from services.common.worker import Worker
from services.prefilter.denylist import Entry, Packed
from services.prefilter.prefilter import AttachmentInfo, Change, Prefilter
from services.prefilter.valid_destinations import ValidDestinations

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Prefilter"].full_name
Context = grpc.aio.ServicerContext[Any, Any]

XDP_MODES = {
    pb.XDP_MODE_UNSPECIFIED: XdpMode.AUTO,
    pb.XDP_MODE_NATIVE: XdpMode.NATIVE,
    pb.XDP_MODE_GENERIC: XdpMode.GENERIC,
}
XDP_MODE_NAMES = {XdpMode.NATIVE: pb.XDP_MODE_NATIVE, XdpMode.GENERIC: pb.XDP_MODE_GENERIC}
AUDIT = {pb.MODE_UNSPECIFIED: False, pb.MODE_DENY: False, pb.MODE_AUDIT: True}  # mode -> audit?


def _items(entries: Any) -> list[tuple[str, bool]]:
    return [(e.cidr, validate.choice(e.mode, AUDIT, f"entries[{i}].mode")) for i, e in enumerate(entries)]


def _packed(blocks: Any) -> list[Packed]:
    out = []
    for i, block in enumerate(blocks):
        audit = validate.choice(block.mode, AUDIT, f"packed[{i}].mode")
        out += [Packed(4, block.ipv4, audit, f"packed[{i}].ipv4"), Packed(6, block.ipv6, audit, f"packed[{i}].ipv6")]
    return out


def _mode(entry: Entry) -> pb.Mode.ValueType:
    return pb.MODE_AUDIT if entry.audit else pb.MODE_DENY


def _counter(c: Counter) -> common_pb2.Counter:
    return common_pb2.Counter(packets=int(c.packets), bytes=int(c.bytes))


def _change(change: Change) -> pb.ChangeResponse:
    return pb.ChangeResponse(revision=change.revision, changed=change.changed)


def _attachment(info: AttachmentInfo) -> pb.Attachment:
    return pb.Attachment(
        interface=info.interface,
        ifindex=info.ifindex,
        mode=XDP_MODE_NAMES.get(info.mode, pb.XDP_MODE_UNSPECIFIED),
        program_id=info.program_id,
    )


class PrefilterServicer(pb_grpc.PrefilterServicer):
    def __init__(self, worker: Worker, prefilter: Prefilter) -> None:
        self._worker = worker
        self._prefilter = prefilter

    async def AddEntries(self, request: pb.AddEntriesRequest, context: Context) -> pb.ChangeResponse:
        self._prefilter.check_count(len(request.entries))
        return _change(await self._worker.call(self._prefilter.add, _items(request.entries), request.expected_revision))

    async def DeleteEntries(self, request: pb.DeleteEntriesRequest, context: Context) -> pb.ChangeResponse:
        self._prefilter.check_count(len(request.cidrs))
        return _change(await self._worker.call(self._prefilter.delete, list(request.cidrs), request.expected_revision))

    async def ReplaceEntries(self, request: pb.ReplaceEntriesRequest, context: Context) -> pb.ChangeResponse:
        packed_hosts = sum(len(p.ipv4) // 4 + len(p.ipv6) // 16 for p in request.packed)
        self._prefilter.check_count(len(request.entries) + packed_hosts)
        return _change(
            await self._worker.call(
                self._prefilter.replace, _items(request.entries), request.expected_revision, _packed(request.packed)
            )
        )

    async def ListEntries(self, request: pb.ListEntriesRequest, context: Context) -> pb.ListEntriesResponse:
        entries, token, revision = await self._worker.call(
            self._prefilter.list_page, request.page.page_size, request.page.page_token
        )
        return pb.ListEntriesResponse(
            entries=[pb.Entry(cidr=str(e.network), mode=_mode(e)) for e in entries],
            next_page_token=token,
            revision=revision,
        )

    async def GetCounters(self, request: pb.GetCountersRequest, context: Context) -> pb.GetCountersResponse:
        self._prefilter.check_count(len(request.cidrs))
        entries = await self._worker.call(self._prefilter.counters, list(request.cidrs))
        interfaces = await self._worker.call(self._prefilter.interface_counters)
        return pb.GetCountersResponse(
            entries=[pb.EntryCounter(cidr=str(e.network), mode=_mode(e), hits=_counter(c)) for e, c in entries],
            interfaces=[
                pb.InterfaceCounter(
                    interface=i.interface,
                    ifindex=i.ifindex,
                    dropped=_counter(i.stats.dropped),
                    audited=_counter(i.stats.audited),
                    passed=_counter(i.stats.passed),
                )
                for i in interfaces
            ],
        )

    async def Attach(self, request: pb.AttachRequest, context: Context) -> pb.Attachment:
        mode = validate.choice(request.mode, XDP_MODES, "mode")
        return _attachment(await self._worker.call(self._prefilter.attach, request.interface, mode))

    async def Detach(self, request: pb.DetachRequest, context: Context) -> pb.DetachResponse:
        await self._worker.call(self._prefilter.detach, request.interface)
        return pb.DetachResponse()

    async def ListAttachments(self, request: pb.ListAttachmentsRequest, context: Context) -> pb.ListAttachmentsResponse:
        attachments = await self._worker.call(self._prefilter.attachments)
        return pb.ListAttachmentsResponse(attachments=[_attachment(a) for a in attachments])

    async def SetValidDestinations(
        self, request: pb.SetValidDestinationsRequest, context: Context
    ) -> pb.ValidDestinations:
        state = await self._worker.call(self._prefilter.valid_destinations.set, request.enabled, list(request.cidrs))
        return _valid(state)

    async def GetValidDestinations(
        self, request: pb.GetValidDestinationsRequest, context: Context
    ) -> pb.ValidDestinations:
        return _valid(await self._worker.call(self._prefilter.valid_destinations.get))


def _valid(state: ValidDestinations) -> pb.ValidDestinations:
    return pb.ValidDestinations(enabled=state.enabled, cidrs=list(state.cidrs), frontends=list(state.frontends))
