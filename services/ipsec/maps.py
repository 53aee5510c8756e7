"""The ipsec BPF object: its two programs (from-container, from-network) and its maps.

`IpsecMaps` turns peers into map entries; it knows nothing of keys or persistence.
"""

from __future__ import annotations

import ctypes
import ipaddress
from pathlib import Path

from pybpf import BpfObject, Map
from services.common.chain_client import Placement, Register
from services.common.datapath import Counter, Hook, Slot
from services.common.objects import load_service_object, pin_programs
from services.common.validate import Address, Network
from services.ipsec.defs import IpsecConfig, IpsecKey, IpsecStat, PeerCidrValue, PeerFlag, UnderlayValue

PROGRAMS = {"ipsec_from_container": Hook.FROM_CONTAINER, "ipsec_from_network": Hook.FROM_NETWORK}
OWN_MAPS = ["ipsec_cidrs", "ipsec_underlay", "ipsec_config", "ipsec_stats"]


def lpm_key(network: Network) -> IpsecKey:
    key = IpsecKey(prefixlen=32 + network.prefixlen, family=2 if network.version == 4 else 10)
    packed = network.network_address.packed
    ctypes.memmove(key.addr, packed, len(packed))
    return key


def host_key(address: Address) -> IpsecKey:
    return lpm_key(ipaddress.ip_network(address))


def network_of(key: IpsecKey) -> Network:
    raw = bytes(key.addr)
    address = ipaddress.ip_address(raw[:4] if key.family == 2 else raw)
    return ipaddress.ip_network(f"{address}/{key.prefixlen - 32}")


class IpsecMaps:
    """Owns the loaded object, the pinned maps and programs, and their registration."""

    def __init__(self, bpf_dir: Path, globals_dir: Path, pin_dir: Path, register: Register | None = None) -> None:
        self._path = bpf_dir / "ipsec.o"
        self._globals_dir = globals_dir
        self._pin_dir = pin_dir
        self._register = register
        self._obj: BpfObject | None = None
        self._cidrs: Map
        self._underlay: Map
        self._config: Map
        self._stats: Map

    def load(self) -> None:
        obj = load_service_object(self._path, self._globals_dir, self._pin_dir, OWN_MAPS)
        self._obj = obj
        self._cidrs = obj.typed_map("ipsec_cidrs", IpsecKey, PeerCidrValue)
        self._underlay = obj.typed_map("ipsec_underlay", IpsecKey, UnderlayValue)
        self._config = obj.typed_map("ipsec_config", ctypes.c_uint32, IpsecConfig)
        self._stats = obj.typed_map("ipsec_stats", ctypes.c_uint32, Counter)
        pin_programs(obj, list(PROGRAMS), self._pin_dir)
        if self._register is not None:
            self._register([Placement(hook, Slot.IPSEC, self._pin_dir / name) for name, hook in PROGRAMS.items()])

    def close(self) -> None:
        if self._obj is not None:
            self._obj.close()
            self._obj = None

    def set_config(self, xfrm_block: bool, strict: bool) -> None:
        """Whether the default-drop policy is in place; whether a node with a key index but no peer drops."""
        self._config[0] = IpsecConfig(xfrm_block=int(xfrm_block), strict=int(strict))

    def cidrs(self) -> dict[Network, PeerCidrValue]:
        return {network_of(k): v for k, v in self._cidrs.items()}

    def put_cidr(self, network: Network, node_id: int, spi: int, block: bool) -> None:
        self._cidrs[lpm_key(network)] = PeerCidrValue(node_id=node_id, spi=spi, flags=PeerFlag.BLOCK if block else 0)

    def delete_cidr(self, network: Network) -> None:
        self._cidrs.delete(lpm_key(network))

    def underlays(self) -> dict[Address, int]:
        return {network_of(k).network_address: int(v.node_id) for k, v in self._underlay.items()}

    def put_underlay(self, address: Address, node_id: int) -> None:
        self._underlay[host_key(address)] = UnderlayValue(node_id=node_id)

    def delete_underlay(self, address: Address) -> None:
        self._underlay.delete(host_key(address))

    def stats(self) -> dict[IpsecStat, Counter]:
        return {stat: self._stats.lookup_sum(int(stat)) for stat in IpsecStat}
