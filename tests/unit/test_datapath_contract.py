"""The one-source rule: C header, Python enums and proto enums agree."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

from weir.common.v1 import common_pb2

from services.common import datapath, reasons

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "include" / "weir" / "defs.h"


def test_built_header_is_the_generated_one() -> None:
    assert HEADER.read_text() == datapath.c_header()


def test_header_carries_every_enum_member_and_struct_size() -> None:
    text = datapath.c_header()
    assert "WEIR_REASON_POLICY_DENIED = 3," in text
    assert "WEIR_CB_SLOT = 1," in text
    assert f"sizeof(struct weir_event) == {ctypes.sizeof(datapath.Event)}" in text
    assert re.search(r"struct weir_counter \{\n\t__u64 packets;\n\t__u64 bytes;\n\};", text)
    assert f"#define WEIR_REASON_COUNTER_DIR_SHIFT {datapath.REASON_COUNTER_DIR_SHIFT}\n" in text


def test_every_reason_and_direction_has_its_own_counter_slot() -> None:
    slots = {reasons.reason_index(r, d) for r in datapath.Reason for d in datapath.Direction}
    assert len(slots) == len(datapath.Reason) * len(datapath.Direction)
    assert max(slots) < datapath.REASON_COUNTERS
    assert max(datapath.Reason) < 1 << datapath.REASON_COUNTER_DIR_SHIFT  # the C side keeps reasons in a __u8


def test_proto_enums_are_datapath_enums_plus_one() -> None:
    for enum, proto, prefix in (
        (datapath.Hook, common_pb2.Hook, "HOOK_"),
        (datapath.Slot, common_pb2.Slot, "SLOT_"),
        (datapath.Direction, common_pb2.Direction, "DIRECTION_"),
    ):
        from_proto = {name.removeprefix(prefix): value - 1 for name, value in proto.items() if value}
        assert from_proto == {m.name: m.value for m in enum}
