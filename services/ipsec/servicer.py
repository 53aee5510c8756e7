"""The ipsec service's gRPC layer: convert, call one `Ipsec` method, fill the reply (never a key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc.aio
from weir.common.v1 import common_pb2
from weir.ipsec.v1 import ipsec_pb2 as pb
from weir.ipsec.v1 import ipsec_pb2_grpc as pb_grpc

from services.common import validate
from services.common.errors import InvalidArgument
from services.common.worker import Worker
from services.ipsec.ipsec import InstalledKey, Ipsec, LocalNode, Peer
from services.ipsec.keys import Cipher, Key

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Ipsec"].full_name
Context = grpc.aio.ServicerContext[Any, Any]
MAX_PATH = 4096

CIPHERS = {pb.CIPHER_UNSPECIFIED: Cipher.GCM, pb.CIPHER_GCM: Cipher.GCM, pb.CIPHER_CBC_HMAC: Cipher.CBC_HMAC}
CIPHER_NAMES = {Cipher.GCM: pb.CIPHER_GCM, Cipher.CBC_HMAC: pb.CIPHER_CBC_HMAC}


def _local(local: LocalNode | None) -> pb.LocalNode | None:
    if local is None:
        return None
    return pb.LocalNode(name=local.name, node_id=local.node_id, underlay=str(local.underlay))


def _key(key: InstalledKey) -> pb.KeyInfo:
    return pb.KeyInfo(spi=key.spi, cipher=CIPHER_NAMES[key.cipher], installed_at=key.installed_at)


def _peer(peer: Peer) -> pb.Peer:
    return pb.Peer(
        name=peer.name,
        node_id=peer.node_id,
        underlay=str(peer.underlay),
        cidrs=[str(c) for c in peer.cidrs],
        spi=peer.spi,
        egress_spi=peer.egress_spi,
        vxlan=peer.vxlan,
        source=peer.source,
    )


def _counter(packets: int, nbytes: int) -> common_pb2.Counter:
    return common_pb2.Counter(packets=packets, bytes=nbytes)


class IpsecServicer(pb_grpc.IpsecServicer):
    def __init__(self, worker: Worker, ipsec: Ipsec) -> None:
        self._worker = worker
        self._ipsec = ipsec

    async def SetLocalNode(self, request: pb.SetLocalNodeRequest, context: Context) -> pb.LocalNode:
        local = await self._worker.call(self._ipsec.set_local, request.name, request.node_id, request.underlay)
        return pb.LocalNode(name=local.name, node_id=local.node_id, underlay=str(local.underlay))

    async def SetKey(self, request: pb.SetKeyRequest, context: Context) -> pb.KeyInfo:
        source = request.WhichOneof("source")
        if source == "key_file":
            if not request.key_file or len(request.key_file) > MAX_PATH or not request.key_file.startswith("/"):
                raise InvalidArgument("key_file must be an absolute path")
            return _key(await self._worker.call(self._ipsec.set_key_file, Path(request.key_file)))
        if source != "key":
            raise InvalidArgument("give the key inline (key) or as a file (key_file)")
        cipher = validate.choice(request.cipher, CIPHERS, "cipher")
        key = Key(request.spi, cipher, bytes(request.key))  # validates the SPI and the length
        return _key(await self._worker.call(self._ipsec.set_key, key))

    async def UpsertPeer(self, request: pb.Peer, context: Context) -> pb.Peer:
        peer = await self._worker.call(
            self._ipsec.upsert_peer,
            request.name,
            request.node_id,
            request.underlay,
            list(request.cidrs),
            request.spi,
            request.vxlan,
        )
        return _peer(peer)

    async def DeletePeer(self, request: pb.DeletePeerRequest, context: Context) -> pb.DeletePeerResponse:
        await self._worker.call(self._ipsec.delete_peer, request.name)
        return pb.DeletePeerResponse()

    async def ForgetCidrs(self, request: pb.ForgetCidrsRequest, context: Context) -> pb.ForgetCidrsResponse:
        validate.at_most(len(request.cidrs), 1024, "cidrs")
        return pb.ForgetCidrsResponse(forgotten=await self._worker.call(self._ipsec.forget_cidrs, list(request.cidrs)))

    async def ListPeers(self, request: pb.ListPeersRequest, context: Context) -> pb.ListPeersResponse:
        return pb.ListPeersResponse(peers=[_peer(p) for p in await self._worker.call(self._ipsec.peers)])

    async def GetStatus(self, request: pb.GetStatusRequest, context: Context) -> pb.Status:
        status = await self._worker.call(self._ipsec.status)
        return pb.Status(
            encrypting=status.encrypting,
            reason=status.reason,
            local=_local(status.local),
            keys=[_key(k) for k in status.keys],
            newest_spi=status.newest_spi,
            default_drop=status.xfrm_block,
        )

    async def GetCounters(self, request: pb.GetCountersRequest, context: Context) -> pb.Counters:
        counters = await self._worker.call(self._ipsec.counters)
        return pb.Counters(
            peers=[
                pb.PeerCounters(
                    name=p.name,
                    node_id=p.node_id,
                    egress_spi=p.egress_spi,
                    encrypted=_counter(p.encrypted_packets, p.encrypted_bytes),
                    decrypted=_counter(p.decrypted_packets, p.decrypted_bytes),
                    integrity_failed=p.integrity_failed,
                    replay=p.replay,
                )
                for p in counters.peers
            ],
            xfrm_errors=counters.xfrm_errors,
            rotations=counters.rotations,
            datapath={name: _counter(*pair) for name, pair in counters.datapath.items()},
        )
