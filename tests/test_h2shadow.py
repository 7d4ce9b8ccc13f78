"""h2shadow's comparison of two HTTP/2 answers (sans-I/O: exchanges as the decoder builds them)."""

from __future__ import annotations

import gzip

from kubectl_mirror.h2shadow import H2Shadow
from kubectl_mirror.h2wire import Exchange, Message
from kubectl_mirror.httpdiff import Absent
from kubectl_mirror.httpopts import HttpOptions
from kubectl_mirror.shadow import Shadow, ShadowOptions


def grpc_answer(messages: list[bytes], *, gzip_them: bool = False, status: str = "0") -> Exchange:
    body = b""
    for m in messages:
        data = gzip.compress(m, mtime=0) if gzip_them else m
        body += bytes([1 if gzip_them else 0]) + len(data).to_bytes(4, "big") + data
    headers = [(":status", "200"), ("content-type", "application/grpc")]
    if gzip_them:
        headers.append(("grpc-encoding", "gzip"))
    request = Message(headers=[(":method", "POST"), (":path", "/shop.Cart/List"),
                               ("content-type", "application/grpc")], ended=True)
    response = Message(headers=headers, trailers=[("grpc-status", status)], body=bytearray(body),
                       body_size=len(body), ended=True)
    return Exchange(1, request, response)


def shadow() -> H2Shadow:
    return H2Shadow(Shadow(ShadowOptions(HttpOptions(), compare=True)))


def test_gzip_compressed_messages_compare_by_their_content() -> None:
    prod = grpc_answer([b"one", b"two"], gzip_them=True)
    assert shadow().differences(prod, grpc_answer([b"one", b"two"])) == []
    [item] = shadow().differences(prod, grpc_answer([b"one", b"TWO"]))
    assert (item.field, item.prod, item.local) == ("message[1]", "two", "TWO")


def test_a_missing_message_and_a_status_are_named() -> None:
    items = shadow().differences(grpc_answer([b"a", b"b"]), grpc_answer([b"a"], status="14"))
    assert [(i.field, i.prod, i.local) for i in items] == [("grpc-status", 0, 14), ("message[1]", "b", Absent.ABSENT)]
