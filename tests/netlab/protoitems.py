"""A protobuf service for the gRPC tests, described in code (no protoc on the machine): `mirror.Items/Get`
takes and returns `mirror.Item {string name = 1; int64 ts = 2;}`. `descriptor_set()` is what
`protoc --descriptor_set_out` would write for it (a FileDescriptorSet), for `--proto-descriptor`."""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVICE = "mirror.Items"


def _file() -> descriptor_pb2.FileDescriptorProto:
    fd = descriptor_pb2.FileDescriptorProto(name="mirror/items.proto", package="mirror", syntax="proto3")
    item = fd.message_type.add(name="Item")
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    item.field.add(name="name", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING, label=optional)
    item.field.add(name="ts", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64, label=optional)
    fd.service.add(name="Items").method.add(name="Get", input_type=".mirror.Item", output_type=".mirror.Item")
    return fd


def descriptor_set() -> bytes:
    files = descriptor_pb2.FileDescriptorSet()
    files.file.append(_file())
    return files.SerializeToString()  # type: ignore[no-any-return]


def item_class() -> Any:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("mirror.Item"))
