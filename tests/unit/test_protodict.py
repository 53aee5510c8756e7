"""message_to_dict gives exactly json_format.MessageToDict's dict, on every message of the APIs."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from weir.lb.v1 import lb_pb2
from weir.orchestrator.v1 import orchestrator_pb2
from weir.policy.v1 import policy_pb2

from services.common.protodict import message_to_dict

MODULES = (policy_pb2, lb_pb2, orchestrator_pb2)


def _sample(field: Any, n: int) -> Any:
    """A value for a scalar field that differs from its default (and so is printed)."""
    kind = field.type
    if kind == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
        values = [v.number for v in field.enum_type.values]
        return values[n % len(values)] or values[-1]
    if kind == FieldDescriptor.TYPE_STRING:
        return f"v{n}"
    if kind == FieldDescriptor.TYPE_BYTES:
        return bytes([n, 255])
    if kind == FieldDescriptor.TYPE_BOOL:
        return True
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return 0.5 + n
    big = kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_FIXED64)
    return (1 << 40) + n if big else n + 1


def _fill(message: Message, depth: int = 0) -> Message:
    """Set every field (two elements of each repeated one, both keys of each map) down to depth 4."""
    for field in message.DESCRIPTOR.fields:
        if field.containing_oneof is not None and field.containing_oneof.fields[0] is not field:
            continue
        if field.message_type is not None and field.message_type.full_name.startswith("google.protobuf."):
            continue  # well-known types go to json_format as a whole (their messages are tested empty)
        target = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for n in range(2):
                key = f"k{n}" if field.message_type.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING else n
                if value_field.message_type is not None:
                    if depth < 4:
                        _fill(target[key], depth + 1)
                else:
                    target[key] = _sample(value_field, n)
        elif field.is_repeated:
            for n in range(2):
                if field.message_type is not None:
                    if depth < 4:
                        _fill(target.add(), depth + 1)
                else:
                    target.append(_sample(field, n))
        elif field.message_type is not None:
            if depth < 4:
                _fill(target, depth + 1)
        else:
            setattr(message, field.name, _sample(field, depth))
    return message


MESSAGES = [cls for module in MODULES for cls in module.__dict__.values() if isinstance(cls, type)
            and issubclass(cls, Message) and cls.DESCRIPTOR.file.package.startswith("weir.")]  # fmt: skip


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.DESCRIPTOR.full_name)
def test_same_dict_as_json_format(cls: type[Message]) -> None:
    for message in (cls(), _fill(cls())):
        assert message_to_dict(message) == json_format.MessageToDict(message, preserving_proto_field_name=True)


def test_optional_fields_set_to_their_default_are_printed() -> None:
    rule = policy_pb2.Rule(name="r", enable_default_deny=policy_pb2.DefaultDeny(ingress=False))
    assert message_to_dict(rule)["enable_default_deny"] == {"ingress": False}
    assert message_to_dict(rule) == json_format.MessageToDict(rule, preserving_proto_field_name=True)
