"""Packets through the real chain with BPF_PROG_TEST_RUN, for the bpf tier's tables.

A `Datapath` is a node's datapath without the services: the orchestrator's
entry programs (entry.o) with their shared maps pinned under a private bpffs
root, plus whichever objects a test loads through the services' own map classes
(`PrefilterMaps`, `PolicyMaps`, `LbMaps`), their programs put in the contract's
slots as the orchestrator does. `run` hands a frame to a hook's entry program,
so the packet takes the real tail-call chain, and returns the verdict, the
bytes that came out and the reasons the metrics map counted.

test_run gives a tc program the loopback device, so the one endpoint a
`Datapath` knows sits at the loopback's ifindex.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pybpf import BpfObject, Map
from services.common import reasons
from services.common.bpffs import ensure_bpffs, remove_pins
from services.common.chain_client import Register
from services.common.datapath import CtKey, CtValue, EndpointInfo, Hook, Reason, XdpMeta
from services.common.validate import parse_cidr
from services.lb.maglev import weighted_table
from services.lb.maps import Change, Frontend, LbMaps
from services.lb.model import Service
from services.orchestrator.chain import ENTRY_PROGRAMS, local_register
from services.orchestrator.ipcache import Ipcache
from services.policy.maps import PolicyMaps
from services.prefilter.denylist import Capacity
from services.prefilter.maps import PrefilterMaps
from tests.harness.node import BPF_BUILD

TC_ACT_OK, TC_ACT_SHOT = 0, 2
XDP_DROP, XDP_PASS = 1, 2
LOOPBACK_IFINDEX = 1  # the device test_run gives an skb when no context is passed
BPFFS = Path("/sys/fs/bpf")

VERDICT_NAMES: dict[Hook, dict[int, str]] = {
    Hook.XDP: {XDP_DROP: "XDP_DROP", XDP_PASS: "XDP_PASS"},
    **{hook: {TC_ACT_OK: "TC_ACT_OK", TC_ACT_SHOT: "TC_ACT_SHOT"} for hook in Hook if hook is not Hook.XDP},
}


@dataclass(frozen=True)
class Outcome:
    """What one packet did: the verdict, the frame as it left, and the metrics it bumped."""

    hook: Hook
    verdict: int
    data: bytes
    counted: dict[Reason, int]

    @property
    def reason(self) -> Reason | None:
        """The one reason other than FORWARDED the packet was counted under, else FORWARDED.

        None when nothing was counted at all (a program returned without the chain's accounting).
        """
        others = [r for r in self.counted if r is not Reason.FORWARDED]
        if len(others) > 1:
            raise AssertionError(f"one packet was counted under several reasons: {self.counted}")
        if others:
            return others[0]
        return Reason.FORWARDED if self.counted else None

    def describe(self) -> str:
        return describe(self.hook, self.verdict, self.reason)


def describe(hook: Hook, verdict: int, reason: Reason | None) -> str:
    """A verdict and a reason as a person reads them: "TC_ACT_SHOT, reason POLICY_DENIED"."""
    name = VERDICT_NAMES[hook].get(verdict, str(verdict))
    return f"{name}, reason {reason.name if reason is not None else None}"


class Datapath:
    """Entry programs and their shared maps under a private pin root, plus the objects loaded."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.globals_dir = root / "globals"
        self.entry: BpfObject | None = None
        self.register: Register | None = None
        self.prefilter: PrefilterMaps | None = None
        self.policy: PolicyMaps | None = None
        self.lb: LbMaps | None = None

    def open(self) -> None:
        ensure_bpffs(self.root)
        self.globals_dir.mkdir(mode=0o700, exist_ok=True)
        self.entry = BpfObject.open(BPF_BUILD / "entry.o", pin_root=self.globals_dir)
        self.entry.load()
        self.register = local_register(self.entry)

    def close(self) -> None:
        for maps in (self.lb, self.policy, self.prefilter):
            if maps is not None:
                maps.close()
        if self.entry is not None:
            self.entry.close()
            self.entry = None
        remove_pins(self.root)

    def _entry(self) -> BpfObject:
        if self.entry is None:
            raise RuntimeError("the datapath is not open")
        return self.entry

    def shared(self, name: str) -> Map:
        """One of the node's shared maps (metrics, endpoints, conntrack, ...)."""
        return self._entry().maps[name]

    # ---- objects, loaded through the services' own map classes ----

    def load_prefilter(self, capacity: Capacity) -> PrefilterMaps:
        self.prefilter = PrefilterMaps(
            BPF_BUILD, self.globals_dir, self.root / "prefilter", capacity, register=self.register
        )
        self.prefilter.load()
        return self.prefilter

    def load_policy(self, capacity: int = 1024) -> PolicyMaps:
        self.policy = PolicyMaps(BPF_BUILD, self.globals_dir, self.root / "policy", capacity, register=self.register)
        self.policy.load()
        return self.policy

    def load_lb(self, cgroup: Path) -> LbMaps:
        """The LB's socket programs attach to `cgroup`, which the caller makes and removes."""
        self.lb = LbMaps(BPF_BUILD, self.globals_dir, self.root / "lb", cgroup, register=self.register)
        self.lb.load()
        return self.lb

    # ---- node state ----

    def set_endpoint(self, endpoint_id: int, identity: int) -> None:
        """The endpoint at the device test_run uses (both directions see the same one)."""
        endpoints = self.shared("endpoints").typed(ctypes.c_uint32, EndpointInfo)
        endpoints.update(LOOPBACK_IFINDEX, EndpointInfo(endpoint_id, identity, 0, 0))

    def set_ipcache(self, wanted: Mapping[str, int]) -> None:
        """The identities of these CIDRs (and no others) in the node's ipcache."""
        ipcache = self.globals_dir / "ipcache"  # pinned by the first object that uses it
        with Map.from_pin(ipcache) as pinned, Map.from_pin(self.globals_dir / "ipcache_generation") as generation:
            Ipcache(pinned, generation).reconcile({parse_cidr(cidr): identity for cidr, identity in wanted.items()})

    def clear_endpoint(self) -> None:
        self.shared("endpoints").typed(ctypes.c_uint32, EndpointInfo).clear()

    def reset(self) -> None:
        """Forget per-packet state, so every row starts from the same datapath."""
        conntrack = self.globals_dir / "conntrack"  # pinned by the first object that uses it
        if conntrack.exists():
            with Map.from_pin(conntrack, key_type=CtKey, value_type=CtValue) as ct:
                ct.clear()
        reasons.zero_reason_counters(reasons.typed(self.shared(reasons.MAP_NAME)))
        if self.lb is not None:
            self.lb.maps["lb_affinity"].clear()

    def counted(self) -> dict[Reason, int]:
        """Packets per reason in the metrics map (both directions)."""
        out: dict[Reason, int] = {}
        for (code, _), total in reasons.read_reason_counters(reasons.typed(self.shared(reasons.MAP_NAME))).items():
            out[Reason(code)] = out.get(Reason(code), 0) + int(total.packets)
        return out

    # ---- packets ----

    def run(self, hook: Hook, frame: bytes) -> Outcome:
        """One packet through `hook`'s entry program; metrics are read as the difference it made."""
        before = self.counted()
        result = self._entry().programs[ENTRY_PROGRAMS[hook]].test_run(frame, repeat=1)
        after = self.counted()
        counted = {r: n - before.get(r, 0) for r, n in after.items() if n != before.get(r, 0)}
        data = result.data
        if hook is Hook.XDP:
            data = strip_xdp_meta(data, len(frame))
        return Outcome(hook, result.retval, data, counted)


def strip_xdp_meta(data: bytes, sent: int) -> bytes:
    """XDP's test_run returns the frame from data_meta on; the entry program put an XdpMeta there."""
    meta = ctypes.sizeof(XdpMeta)
    return data[meta:] if len(data) == sent + meta else data


def lb_changes(services: list[Service]) -> list[Change]:
    """Services as the LB service writes them: the n-th (from 1) gets service and reverse-NAT
    index n and backend ids 16n.., and a weighted table of its selectable backends."""
    out = []
    for index, svc in enumerate(services, start=1):
        ids = {b.key: index * 16 + k for k, b in enumerate(svc.backends)}
        order = list(ids.values())
        table = [order[i] for i in weighted_table([(b.key, b.weight if b.selectable else 0) for b in svc.backends])]
        out.append(Change(index, svc, [Frontend(svc.address, svc.port, svc.proto, index)], [], ids, [], table))
    return out


@contextmanager
def datapath(name: str) -> Iterator[Datapath]:
    """A Datapath under /sys/fs/bpf/<name>, removed at the end even when the test fails."""
    dp = Datapath(BPFFS / name)
    try:
        dp.open()
        yield dp
    finally:
        dp.close()
