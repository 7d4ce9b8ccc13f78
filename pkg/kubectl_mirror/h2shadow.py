"""HTTP/2 and gRPC streams in HTTP mode's output and in shadow comparison.

The H2 layer reports each stream the captured client opened (`StreamSeen`) and, for the forwarded ones, both
answers once known (`StreamDone`). This turns them into HTTP mode's per-request lines and, with --compare, pairs
production's answer of the stream (decoded from the capture) with the local one:

* `:status`, the headers named with --compare-headers, and for gRPC `grpc-status` and `grpc-message` (from the
  trailers, or the headers of a Trailers-Only answer);
* the body: JSON-aware for JSON (as HTTP/1.x, `--ignore-json-path` applies), byte for byte otherwise;
* a gRPC body message by message (streaming calls compare each message in order): as bytes, or decoded to JSON
  with `--proto-descriptor` (a FileDescriptorSet), so `--ignore-json-path` applies to each message as `$`.

Counts go to the same same / different / unpaired as HTTP/1.x, and per gRPC method.
"""

from __future__ import annotations

import gzip
from collections import Counter
from dataclasses import dataclass, field

from .h2layer import StreamDone, StreamSeen
from .h2wire import Exchange, grpc_messages
from .httpdiff import MAX_DIFFERENCES, Absent, DiffItem, compare, diff_json
from .httpresponse import ResponseRecord
from .jsonpath import JsonPath
from .shadow import RequestResult, Shadow


@dataclass
class MethodCounts:
    calls: int = 0
    same: int = 0
    different: int = 0
    unpaired: int = 0


@dataclass
class H2Results:
    """Per gRPC method: calls forwarded and their comparison."""

    methods: dict[str, MethodCounts] = field(default_factory=dict)
    grpc_status: Counter[int] = field(default_factory=Counter)  # local grpc-status of forwarded calls


class H2Shadow:
    def __init__(self, shadow: Shadow, decoder: MessageDecoder | None = None) -> None:
        self.shadow = shadow
        self.decoder = decoder
        self.results = H2Results()
        self._ignore = [JsonPath(p) for p in shadow.options.ignore_json_paths]

    def record(self, c: StreamSeen | StreamDone, now: float) -> None:
        emit = self.shadow.options.on_request
        if isinstance(c, StreamSeen):
            if c.fate.value != "forwarded" and emit is not None:
                emit(RequestResult(c.flow, c.stream, c.method, c.path, False, protocol="h2",
                                   grpc_method=c.grpc_method, not_sent=c.fate.value))
            return
        seen, local = c.seen, c.local
        answered = local is not None and local.response.headers
        if emit is not None:
            latency = None
            if answered and local is not None and local.response.end_ts is not None:
                latency = round(max(0.0, local.response.end_ts - c.sent_at) * 1000.0, 3)
            emit(RequestResult(c.flow, c.stream, seen.method, seen.path, True,
                               local.status if local is not None else None, latency, protocol="h2",
                               grpc_method=seen.grpc_method,
                               grpc_status=local.grpc_status if local is not None else None))
        counts = None
        if seen.grpc_method is not None:
            counts = self.results.methods.setdefault(seen.grpc_method, MethodCounts())
            counts.calls += 1
            if local is not None and local.grpc_status is not None:
                self.results.grpc_status[local.grpc_status] += 1
        if not self.shadow.comparing:
            return
        sh = self.shadow
        if c.prod is None or local is None or not answered or not c.prod.response.headers:
            sh.unpaired += 1
            if counts is not None:
                counts.unpaired += 1
            return
        items = self.differences(c.prod, local)
        if not items:
            sh.same += 1
            if counts is not None:
                counts.same += 1
            return
        sh.different += 1
        if counts is not None:
            counts.different += 1
        entries: list[dict[str, object]] = []
        for item in items[:MAX_DIFFERENCES]:
            entry: dict[str, object] = {"field": item.field}
            if item.prod is not Absent.ABSENT:
                entry["prod"] = item.prod
            if item.local is not Absent.ABSENT:
                entry["local"] = item.local
            entries.append(entry)
        line: dict[str, object] = {"method": seen.method, "target": seen.path, "protocol": "h2", "flow": c.flow,
                                   "stream": c.stream, "differences": entries,
                                   "truncated": len(items) > MAX_DIFFERENCES}
        if seen.grpc_method is not None:
            line["grpc_method"] = seen.grpc_method
        sh.write_report(line)

    def differences(self, prod: Exchange, local: Exchange) -> list[DiffItem]:
        grpc = prod.grpc
        p_rec, l_rec = _record(prod, not grpc), _record(local, not grpc)
        diff = compare(p_rec, l_rec, headers=self.shadow.options.compare_headers,
                       ignore_json_paths=self.shadow.options.ignore_json_paths)
        items = list(diff.items) if diff is not None else []
        if not grpc:
            return items
        for name, p, loc in (("grpc-status", prod.grpc_status, local.grpc_status),
                             ("grpc-message", prod.grpc_message, local.grpc_message)):
            if p != loc:
                items.append(DiffItem(name, Absent.ABSENT if p is None else p, Absent.ABSENT if loc is None else loc))
        items += self._messages(prod, local)
        return items

    def _messages(self, prod: Exchange, local: Exchange) -> list[DiffItem]:
        p_msgs, l_msgs = _plain_messages(prod), _plain_messages(local)
        if p_msgs is None or l_msgs is None:
            if bytes(prod.response.body) != bytes(local.response.body) or \
                    prod.response.body_size != local.response.body_size:
                return [DiffItem("body", _preview(bytes(prod.response.body)), _preview(bytes(local.response.body)))]
            return []
        items: list[DiffItem] = []
        method = prod.grpc_method or ""
        for i in range(max(len(p_msgs), len(l_msgs))):
            field_name = f"message[{i}]"
            if i >= len(p_msgs) or i >= len(l_msgs):
                p = _preview(p_msgs[i][1]) if i < len(p_msgs) else Absent.ABSENT
                loc = _preview(l_msgs[i][1]) if i < len(l_msgs) else Absent.ABSENT
                items.append(DiffItem(field_name, p, loc))
                continue
            p_raw, l_raw = p_msgs[i][1], l_msgs[i][1]
            if self.decoder is not None:
                p_json, l_json = self.decoder.response(method, p_raw), self.decoder.response(method, l_raw)
                if p_json is not None and l_json is not None:
                    found: list[DiffItem] = []
                    diff_json(p_json, l_json, (), self._ignore, found)
                    items += [DiffItem(f"{field_name}:{it.field.removeprefix('body:')}", it.prod, it.local)
                              for it in found]
                    continue
            if p_raw != l_raw:
                items.append(DiffItem(field_name, _preview(p_raw), _preview(l_raw)))
        return items


def _plain_messages(ex: Exchange) -> list[tuple[bool, bytes]] | None:
    """The answer's gRPC messages, each uncompressed when it was compressed with gzip (grpc-encoding): two servers
    may compress the same message differently, or one not at all. None when the body is cut or its framing broken."""
    resp = ex.response
    if resp.body_size != len(resp.body):
        return None
    messages = grpc_messages(bytes(resp.body))
    if messages is None:
        return None
    encoding = (resp.header("grpc-encoding") or "identity").lower()
    out: list[tuple[bool, bytes]] = []
    for compressed, data in messages:
        if compressed and encoding == "gzip":
            try:
                data = gzip.decompress(data)
            except (OSError, EOFError):
                return None  # not what the header said: compared as the bytes they are
            compressed = False
        out.append((compressed, data))
    return out


def _record(ex: Exchange, with_body: bool) -> ResponseRecord:
    resp = ex.response
    headers = [(n, v) for n, v in resp.headers if not n.startswith(":")]
    body = bytes(resp.body) if with_body else b""
    size = resp.body_size if with_body else 0
    return ResponseRecord(0, ex.stream, ex.status or 0, headers, body, resp.first_ts or 0.0, resp.end_ts or 0.0,
                          size, size > len(body))


def _preview(data: bytes) -> str:
    text = data[:200].decode("utf-8", "replace") if data.isascii() else data[:100].hex()
    return text if len(data) <= 200 else f"{text}... ({len(data)} bytes)"


class MessageDecoder:
    """gRPC messages -> JSON with the types a FileDescriptorSet names (--proto-descriptor)."""

    def __init__(self, path: str) -> None:
        from google.protobuf import descriptor_pb2, descriptor_pool

        from .errors import UsageError

        try:
            with open(path, "rb") as f:
                files = descriptor_pb2.FileDescriptorSet.FromString(f.read())
        except Exception as exc:  # OSError, or protobuf's DecodeError (not exported alike in every version)
            raise UsageError(f"cannot read --proto-descriptor {path}: {exc}") from None
        self._pool = descriptor_pool.DescriptorPool()
        for fd in files.file:
            self._pool.Add(fd)
        self._types: dict[str, object] = {}

    def response(self, method: str, data: bytes) -> object | None:
        """The message as JSON (proto3 JSON mapping), or None when the method or the bytes are unknown to it."""
        from google.protobuf import json_format, message_factory

        cls = self._types.get(method)
        if cls is None:
            service, _, name = method.rpartition("/")
            try:
                desc = self._pool.FindServiceByName(service).FindMethodByName(name)
            except KeyError:
                return None
            if desc is None:
                return None
            cls = message_factory.GetMessageClass(desc.output_type)
            self._types[method] = cls
        try:
            msg = cls.FromString(data)  # type: ignore[attr-defined]
        except Exception:
            return None
        result: object = json_format.MessageToDict(msg, preserving_proto_field_name=True)
        return result
