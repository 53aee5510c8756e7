"""The one-source rule: C header, Python enums and proto enums agree."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

from weir.common.v1 import common_pb2

from services.common import datapath

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "include" / "weir" / "defs.h"


def test_built_header_is_the_generated_one() -> None:
    assert HEADER.read_text() == datapath.c_header()


def test_header_carries_every_enum_member_and_struct_size() -> None:
    text = datapath.c_header()
    assert "WEIR_REASON_POLICY_DENIED = 3," in text
    assert "WEIR_CB_SLOT = 1," in text
    assert f"sizeof(struct weir_event) == {ctypes.sizeof(datapath.Event)}" in text
    assert re.search(r"struct weir_metric_key \{\n\t__u8 reason;\n\t__u8 dir;\n\t__u16 pad;\n\};", text)


def test_proto_enums_are_datapath_enums_plus_one() -> None:
    for enum, proto, prefix in (
        (datapath.Hook, common_pb2.Hook, "HOOK_"),
        (datapath.Slot, common_pb2.Slot, "SLOT_"),
        (datapath.Direction, common_pb2.Direction, "DIRECTION_"),
    ):
        from_proto = {name.removeprefix(prefix): value - 1 for name, value in proto.items() if value}
        assert from_proto == {m.name: m.value for m in enum}
