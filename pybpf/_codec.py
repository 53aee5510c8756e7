"""Conversion between Python values and the raw bytes of map keys and values.

A map handle is given, for its keys and for its values, either a ctypes scalar
(``c_uint32``: Python ints in and out), a ctypes Structure, Union or Array
(instances in and out) or nothing (``bytes`` in and out). The size of the type
must equal the map's key or value size, checked once when the handle is made.
"""

from __future__ import annotations

import ctypes
from typing import Any, TypeAlias

from pybpf.errors import IncompatibleMapError

CType: TypeAlias = type
"""A ctypes type used for keys or values (``type`` is shadowed in classes with a ``.type``)."""

_Scalar: Any = ctypes._SimpleCData  # the one base of c_int, c_uint32...
_Aggregate: tuple[Any, ...] = (ctypes.Structure, ctypes.Union, ctypes.Array)


class Codec:
    """Encodes one kind of key or value of a fixed size."""

    def __init__(self, ctype: type | None, size: int, what: str) -> None:
        if ctype is not None:
            if not (issubclass(ctype, _Scalar) or issubclass(ctype, _Aggregate)):
                raise TypeError(f"{what}: {ctype!r} is not a ctypes type")
            if ctypes.sizeof(ctype) != size:
                raise IncompatibleMapError(
                    f"{what}: {ctype.__name__} is {ctypes.sizeof(ctype)} bytes, the map's is {size} bytes",
                    field=what.rsplit(" ", 1)[-1],
                )
        self.ctype = ctype
        self.size = size
        self.what = what
        self._scalar = ctype is not None and issubclass(ctype, _Scalar)

    def encode(self, value: Any) -> bytes:
        """Raw bytes for ``value``; raises TypeError/ValueError when it does not fit."""
        ctype = self.ctype
        if isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
        elif ctype is None:
            raise TypeError(f"{self.what}: expected bytes, got {type(value).__name__}")
        elif isinstance(value, ctype):
            raw = bytes(value)  # type: ignore[call-overload]
        elif self._scalar:
            raw = bytes(ctype(value))
            if ctype.from_buffer_copy(raw).value != value:  # type: ignore[attr-defined]
                raise ValueError(f"{self.what}: {value!r} does not fit {ctype.__name__}")
        else:
            raise TypeError(f"{self.what}: expected {ctype.__name__} or bytes, got {type(value).__name__}")
        if len(raw) != self.size:
            raise ValueError(f"{self.what}: {len(raw)} bytes given, the map's is {self.size}")
        return raw

    def decode(self, raw: bytes) -> Any:
        """The Python value held in ``raw``."""
        if self.ctype is None:
            return bytes(raw)
        inst = self.ctype.from_buffer_copy(raw)  # type: ignore[attr-defined]
        return inst.value if self._scalar else inst


def add_values(values: list[Any]) -> Any:
    """Sum per-CPU values: ints, or ctypes aggregates of integer fields, field by field."""
    first = values[0]
    if isinstance(first, int):
        return sum(values)
    if isinstance(first, ctypes.Array):
        array = type(first)()
        for i in range(len(first)):
            array[i] = add_values([v[i] for v in values])
        return array
    if isinstance(first, ctypes.Structure):
        struct = type(first)()
        for field in type(first)._fields_:
            name = field[0]
            setattr(struct, name, add_values([getattr(v, name) for v in values]))
        return struct
    raise TypeError(f"cannot sum per-CPU values of type {type(first).__name__}")
