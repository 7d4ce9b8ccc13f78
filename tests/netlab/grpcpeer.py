"""A grpcio server and client for turn-taking tests, without generated code (raw-bytes generic handlers).

The service has all four call kinds: unary `Get` (the server counts calls it completed and calls cancelled),
server streaming `List`, client streaming `Put` and bidirectional `Chat`. The handler of each takes `delay`
seconds. grpc-core cancels every call still open when the client's side of the connection closes, so a mirror
that closes too early shows up as cancelled calls.

`python -m tests.netlab.grpcpeer server --port P [--delay S]` prints `listening PORT`, serves until SIGTERM, then
prints its counts as JSON. `... client --host H --port P` makes 301 unary calls (100 at a time) and one call of
each streaming kind on one channel, then prints `{"errors": [...]}`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from tests.netlab import protoitems

SERVICE = "mirror.Test"
UNARY_CALLS = 301


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values = {"get_done": 0, "get_cancelled": 0, "list": 0, "put": 0, "chat": 0}

    def add(self, name: str) -> None:
        with self.lock:
            self.values[name] += 1


def make_server(port: int, delay: float, counts: Counts, host: str = "127.0.0.1",
                variant: bool = False) -> tuple[grpc.Server, int]:
    """`variant`: a server that answers differently (shadow comparison): every tenth Get's answer differs, Get of
    b"13" fails with NOT_FOUND, and the last message of List differs."""

    def get(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(delay)
        if not context.is_active():
            counts.add("get_cancelled")
            return b""
        counts.add("get_done")
        if variant and request == b"13":
            context.abort(grpc.StatusCode.NOT_FOUND, "no item 13")
        if variant and request.endswith(b"0"):
            return b"ITEM:" + request
        return b"item:" + request

    def list_(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(5):
            time.sleep(delay / 5)
            yield b"%s-%d%s" % (request, i, b"!" if variant and i == 4 else b"")
        counts.add("list")

    def put(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        total = sum(len(r) for r in requests)
        time.sleep(delay)
        counts.add("put")
        return b"%d" % total

    def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for r in requests:
            time.sleep(delay / 5)
            yield b"re:" + r
        counts.add("chat")

    handlers = {
        "Get": grpc.unary_unary_rpc_method_handler(get),
        "List": grpc.unary_stream_rpc_method_handler(list_),
        "Put": grpc.stream_unary_rpc_method_handler(put),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    }
    item = protoitems.item_class()

    def items_get(request: bytes, context: grpc.ServicerContext) -> bytes:
        # A protobuf answer with a volatile field (ts): differs between any two servers, unless ignored.
        asked = item.FromString(request)
        return item(name=f"item {asked.name}", ts=time.time_ns()).SerializeToString()  # type: ignore[no-any-return]

    items = {"Get": grpc.unary_unary_rpc_method_handler(items_get)}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=128),
                         handlers=[grpc.method_handlers_generic_handler(SERVICE, handlers),
                                   grpc.method_handlers_generic_handler(protoitems.SERVICE, items)],
                         options=[("grpc.max_concurrent_streams", 200)])
    bound = server.add_insecure_port(f"{host}:{port}")
    server.start()
    return server, bound


def run_proto_client(host: str, port: int) -> list[str]:
    """Five protobuf calls of mirror.Items/Get on one channel."""
    item = protoitems.item_class()
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        get = channel.unary_unary(f"/{protoitems.SERVICE}/Get")
        names = [item.FromString(get(item(name=str(i)).SerializeToString(), timeout=30)).name for i in range(5)]
    return [] if names == [f"item {i}" for i in range(5)] else [f"Items.Get gave {names}"]


def run_client(host: str, port: int, metadata: bool = False) -> list[str]:
    """`metadata`: each unary call carries its own 120-byte `x-call` value, so the HPACK dynamic tables (4 KiB)
    evict entries many times over."""
    errors: list[str] = []
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        get = channel.unary_unary(f"/{SERVICE}/Get")

        def call(i: int) -> bytes:
            extra = [("x-call", f"{i:04d}-" + "v" * 115)] if metadata else None
            return get(b"%d" % i, timeout=30, metadata=extra)  # type: ignore[no-any-return]

        with futures.ThreadPoolExecutor(max_workers=100) as pool:
            results = list(pool.map(call, range(UNARY_CALLS)))
        if results != [b"item:%d" % i for i in range(UNARY_CALLS)]:
            errors.append("unary answers differ")
        listed = list(channel.unary_stream(f"/{SERVICE}/List")(b"l", timeout=30))
        if len(listed) != 5:
            errors.append(f"List gave {len(listed)}")
        if channel.stream_unary(f"/{SERVICE}/Put")(iter([b"a" * 10] * 4), timeout=30) != b"40":
            errors.append("Put")
        chat = list(channel.stream_stream(f"/{SERVICE}/Chat")(iter([b"x", b"y", b"z"]), timeout=30))
        if chat != [b"re:x", b"re:y", b"re:z"]:
            errors.append(f"Chat gave {chat}")
    return errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("role", choices=["server", "client"])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--metadata", action="store_true", help="client: distinct metadata per call (HPACK eviction)")
    p.add_argument("--variant", action="store_true", help="server: answer some calls differently")
    p.add_argument("--proto", action="store_true", help="client: five protobuf calls of mirror.Items/Get instead")
    a = p.parse_args(argv)
    if a.role == "client":
        errors = run_proto_client(a.host, a.port) if a.proto else run_client(a.host, a.port, a.metadata)
        print(json.dumps({"errors": errors}), flush=True)
        return 1 if errors else 0
    counts = Counts()
    server, port = make_server(a.port, a.delay, counts, a.host, a.variant)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"listening {port}", flush=True)
    stop.wait(300)
    server.stop(grace=1.0).wait(5)
    result: dict[str, Any] = dict(counts.values)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
