"""A protobuf message as the dict ``json_format.MessageToDict(m, preserving_proto_field_name=True)`` gives.

Services store what they were given as that dict (the store's documents are JSON). For
bulk requests json_format, written for every corner of the JSON mapping, costs more than
the rest of the request; ``message_to_dict`` walks only the fields that are set, which is
what MessageToDict prints by default, and hands messages that use a well-known type
(Timestamp, Struct, wrappers...) or a float to json_format, whose JSON forms are special.
"""

from __future__ import annotations

import base64
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_STRING_INTS = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
                FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}  # fmt: skip
_SPECIAL = {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE}
_plain: dict[str, bool] = {}


def _is_plain(descriptor: Any, seen: frozenset[str] = frozenset()) -> bool:
    """No well-known type and no float anywhere below: the plain walk gives json_format's answer."""
    name = descriptor.full_name
    if name in _plain:
        return _plain[name]
    if name.startswith("google.protobuf."):
        return False
    plain = True
    for field in descriptor.fields:
        if field.type in _SPECIAL:
            plain = False
        elif field.message_type is not None and field.message_type.full_name not in seen | {name}:
            plain = plain and _is_plain(field.message_type, seen | {name})
    _plain[name] = plain
    return plain


def message_to_dict(message: Message) -> dict[str, Any]:
    """``MessageToDict(message, preserving_proto_field_name=True)``, faster for plain messages."""
    if not _is_plain(message.DESCRIPTOR):
        return json_format.MessageToDict(message, preserving_proto_field_name=True)
    return _walk(message)


def _walk(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {_key(k): _value(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, v) for v in value]
        else:
            out[field.name] = _value(field, value)
    return out


def _key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(key)


def _value(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None:
        return _walk(value)
    if field.type == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    if field.type in _STRING_INTS:
        return str(value)
    if field.type == FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("utf-8")
    return value
