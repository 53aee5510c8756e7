"""BPF objects tests place into the chain: a counting object loaded against a node's maps."""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

from pybpf import BpfObject
from services.common.datapath import Counter, Hook
from tests.harness.node import BPF_BUILD, Node


@contextmanager
def counter_object(node: Node, pin_name: str) -> Iterator[BpfObject]:
    """A counting object loaded against the node's shared maps, its programs pinned."""
    obj = BpfObject.open(BPF_BUILD / "counter.o", pin_root=node.bpffs_root / "globals")
    obj.load()
    pin_dir = node.bpffs_root / "test" / pin_name
    pin_dir.mkdir(parents=True, exist_ok=True)
    for name, program in obj.programs.items():
        program.pin(pin_dir / name)
    try:
        yield obj
    finally:
        for pin in pin_dir.iterdir():
            pin.unlink()
        pin_dir.rmdir()
        obj.close()


def counted(obj: BpfObject, hook: Hook) -> int:
    stats = obj.maps["counter_stats"].typed(ctypes.c_uint32, Counter)
    total = stats.lookup_sum(hook.value)
    return int(total.packets) if total else 0
