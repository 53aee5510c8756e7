"""Render Python enums and ctypes structures as a C header.

Each module that owns constants or structs shared with BPF C declares them
once, in Python, and calls `render_header`; the Makefile writes the result
into bpf/include/weir/. Enums become `enum weir_<name>` with members
`WEIR_<NAME>_<MEMBER>`, structures become `struct weir_<name>` with a
`_Static_assert` on their size, constants become `#define WEIR_<NAME>`.

A structure may name fields that hold network-order values in a class
attribute `_network_order_` (a tuple of field names): Python keeps them as
plain integers (the bytes as they are on the wire), C declares them `__be16` /
`__be32`, so the byte order is part of the type on the C side.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from enum import IntEnum
from typing import Any

_C_TYPES: dict[Any, str] = {
    ctypes.c_uint8: "__u8",
    ctypes.c_uint16: "__u16",
    ctypes.c_uint32: "__u32",
    ctypes.c_uint64: "__u64",
    ctypes.c_int32: "__s32",
    ctypes.c_int64: "__s64",
}


def snake(name: str) -> str:
    """CamelCase -> camel_case."""
    out = "".join("_" + c.lower() if c.isupper() else c for c in name)
    return out.lstrip("_")


_BE_TYPES: dict[Any, str] = {ctypes.c_uint16: "__be16", ctypes.c_uint32: "__be32"}


def _c_field(name: str, ctype: Any, network_order: bool = False) -> str:
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Array):
        return f"\t{_C_TYPES[ctype._type_]} {name}[{ctype._length_}];"
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Structure):
        return f"\tstruct weir_{snake(ctype.__name__)} {name};"
    if network_order:
        return f"\t{_BE_TYPES[ctype]} {name};"
    return f"\t{_C_TYPES[ctype]} {name};"


def render_header(
    source: str,
    constants: Mapping[str, int],
    enums: Sequence[type[IntEnum]],
    structs: Sequence[type[ctypes.Structure]],
) -> str:
    lines = [
        f"/* Generated from {source}. Do not edit. */",
        "#pragma once",
        "#include <linux/types.h>",
        "",
    ]
    lines += [f"#define WEIR_{name} {value}" for name, value in constants.items()]
    lines.append("")
    for enum in enums:
        prefix = f"WEIR_{snake(enum.__name__).upper()}"
        lines.append(f"enum weir_{snake(enum.__name__)} {{")
        lines += [f"\t{prefix}_{member.name} = {member.value}," for member in enum]
        lines += ["};", ""]
    for struct in structs:
        c_name = f"struct weir_{snake(struct.__name__)}"
        lines.append(f"{c_name} {{")
        network_order = set(getattr(struct, "_network_order_", ()))
        lines += [_c_field(field[0], field[1], field[0] in network_order) for field in struct._fields_]
        lines.append("};")
        lines.append(f'_Static_assert(sizeof({c_name}) == {ctypes.sizeof(struct)}, "layout of {struct.__name__}");')
        lines.append("")
    return "\n".join(lines)
