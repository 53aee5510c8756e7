"""States take either inner family (XFRM_STATE_AF_UNSPEC); one made without it is made again, its count carried."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from pathlib import Path
from typing import Any

from services.common.datapath import XFRM_MARK_MASK, XfrmMark
from services.common.store import Store
from services.ipsec import xfrm
from services.ipsec.ipsec import Ipsec
from services.ipsec.keys import Cipher, Key


class FakeXfrm:
    """The kernel's states and policies as xfrm_user keeps them: by id, with a dump that reads them back."""

    def __init__(self) -> None:
        self.states_by_id: dict[tuple[str, int, int], xfrm.State] = {}
        self.policies_by_id: dict[tuple[Any, ...], xfrm.Policy] = {}
        self.deleted: list[xfrm.State] = []

    def states(self) -> list[xfrm.State]:
        return list(self.states_by_id.values())

    def policies(self) -> list[xfrm.Policy]:
        return list(self.policies_by_id.values())

    def add_state(self, state: xfrm.State, update: bool = False) -> None:
        key = (str(state.dst), state.spi, state.mark.value)
        assert update or key not in self.states_by_id, "NEWSA of an existing state: EEXIST"
        self.states_by_id[key] = dataclasses.replace(xfrm._state_of(xfrm.state_message(state)), oseq=state.oseq)

    def delete_state(self, state: xfrm.State) -> None:
        self.deleted.append(self.states_by_id.pop((str(state.dst), state.spi, state.mark.value)))

    def get_state(self, state: xfrm.State) -> xfrm.State:
        return self.states_by_id[(str(state.dst), state.spi, state.mark.value)]

    def add_policy(self, policy: xfrm.Policy, update: bool = True) -> None:
        self.policies_by_id[(policy.direction, str(policy.src), str(policy.dst), policy.mark.value)] = policy

    def delete_policy(self, policy: xfrm.Policy) -> None:
        self.policies_by_id.pop((policy.direction, str(policy.src), str(policy.dst), policy.mark.value), None)


class FakeMaps:
    def __init__(self) -> None:
        self.cidr_entries: dict[Any, Any] = {}
        self.underlay_entries: dict[Any, int] = {}

    def cidrs(self) -> dict[Any, Any]:
        return dict(self.cidr_entries)

    def put_cidr(self, network: Any, node_id: int, spi: int, block: bool) -> None:
        self.cidr_entries[network] = type("V", (), {"node_id": node_id, "spi": spi, "flags": int(block)})()

    def underlays(self) -> dict[Any, int]:
        return dict(self.underlay_entries)

    def put_underlay(self, address: Any, node_id: int) -> None:
        self.underlay_entries[address] = node_id

    def delete_underlay(self, address: Any) -> None:
        self.underlay_entries.pop(address, None)


def test_a_state_message_keeps_the_selector_family_open() -> None:
    alg = Key(1, Cipher.GCM, bytes(20)).pair_algorithm(1, 2)
    a, b = ipaddress.ip_address("10.99.0.1"), ipaddress.ip_address("10.99.0.2")
    msg = xfrm.state_message(xfrm.State(a, b, 1, 0x5EED, xfrm.Mark(0, 0), alg))
    assert msg["sel_family"] == 0 and msg["flags"] & xfrm.XFRM_STATE_AF_UNSPEC
    assert xfrm._state_of(msg).any_family
    msg["sel_family"] = socket.AF_INET  # what the kernel made of it without the flag
    assert not xfrm._state_of(msg).any_family


def test_states_made_without_the_flag_are_made_again_with_their_sequence_number(tmp_path: Path) -> None:
    kernel = FakeXfrm()
    ipsec = Ipsec(maps=FakeMaps(), store=Store(tmp_path / "store"), key_dir=tmp_path / "keys")  # type: ignore[arg-type]
    ipsec._xfrm = kernel  # type: ignore[assignment]
    ipsec._secrets = {1: Key(1, Cipher.GCM, bytes(range(20)))}
    ipsec._store.put("local", "node", {"name": "a", "node_id": 1, "underlay": "10.99.0.1"})
    ipsec.upsert_peer("b", 2, "10.99.0.2", ["198.18.2.0/24", "2001:db8:a2::/64"], 1)
    assert kernel.states_by_id and all(s.any_family for s in kernel.states())
    # as a node made them before the flag: the kernel read back an IPv4 selector; 500 packets sent
    for key, state in kernel.states_by_id.items():
        kernel.states_by_id[key] = dataclasses.replace(state, any_family=False, oseq=500)
    ipsec._apply()
    assert all(s.any_family for s in kernel.states()), "every state is made again, for either family"
    assert len(kernel.deleted) == 2 and not [s for s in kernel.deleted if s.any_family]
    out = [s for s in kernel.states() if s.mark.value & XFRM_MARK_MASK == XfrmMark.ENCRYPT]
    assert [s.oseq for s in out] == [500], "the OUT state goes on from its sequence number (no replays at the peer)"
    ipsec._apply()
    assert len(kernel.deleted) == 2, "a state with the flag stays"
