"""HTTP mode's layer after the HTTP layer: each request's fate, the local answers, and shadow comparison.

Sans-I/O like the layers before it: `Shadow.handle(event)` (or `handle_all` for a batch) takes the HTTP layer's
commands (actions, RequestRecords, production's Replies), the flow table's FlowRecords, and what delivery tells
(`LocalData`, `LocalClosed`, `Delivered`, `Suppressed`, `EndOfInput`); it returns the actions for delivery, with
production's Replies taken out. Wall time comes from the injected clock. It keeps, per mirrored connection,
what is needed to pair requests with responses and nothing more, so memory stays bounded by what is in flight:

* `requests()` takes the layer's RequestRecords right before their bytes go out. Local response k of a
  connection answers the request with sent_index k (the local service only saw the forwarded ones).
* `local()` is the replayer's response hook: the local service's bytes, parsed with ResponseParser.
* `reply()` takes production's server->client bytes from the capture (--compare): production response i
  answers the request with index i (production saw every request, forwarded or not).
* Each forwarded request yields one RequestResult once its local answer is known (or known never to come);
  with --compare, each one whose both answers are known is compared, and every difference goes to the report.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from .errors import UsageError
from .httpdiff import compare
from .httpopts import HttpOptions
from .httpresponse import ResponseParser, ResponseRecord
from .jsonpath import JsonPath
from .model import (
    Action,
    Delivered,
    EndOfInput,
    FlowRecord,
    LocalClosed,
    LocalData,
    Open,
    Reply,
    RequestRecord,
    Suppressed,
)

ShadowEvent = Action | RequestRecord | FlowRecord | LocalData | LocalClosed | Delivered | Suppressed | EndOfInput


@dataclass
class ShadowOptions:
    http: HttpOptions
    compare: bool = False
    compare_headers: list[str] = field(default_factory=list)
    ignore_json_paths: list[str] = field(default_factory=list)
    report: str | None = None  # --compare-report: one JSON line per difference
    proto_descriptor: str | None = None  # --proto-descriptor: gRPC messages compared as JSON (HTTP/2, h2shadow)
    request_lines: bool = True  # on_request's lines are shown (-o json, or -v): each answer's status is wanted
    on_request: Callable[[RequestResult], None] | None = None

    def __post_init__(self) -> None:
        for path in self.ignore_json_paths:
            JsonPath(path)  # a typo must fail before anything runs, not at the first JSON body
        if self.compare:
            # Whole requests on the local side, or its answers cannot line up with production's.
            self.http.align = True


@dataclass(frozen=True, slots=True)
class RequestResult:
    """One request's line in HTTP mode's output."""

    flow: int
    index: int
    method: str
    target: str
    forwarded: bool
    status: int | None = None  # the local service's answer; None when not forwarded or never answered
    latency_ms: float | None = None  # from handing the request to the socket to the end of the local answer
    # HTTP/2 only: the stream id is `index`; a gRPC call names its method and the local grpc-status.
    protocol: str = "http/1.1"
    grpc_method: str | None = None
    grpc_status: int | None = None
    not_sent: str | None = None  # HTTP/2: why a stream was not forwarded (filtered, rate-limited, refused)

    def to_json(self) -> dict[str, object]:
        line: dict[str, object] = {
            "type": "request", "flow": self.flow, "index": self.index, "method": self.method, "path": self.target,
            "forwarded": self.forwarded, "status": self.status, "latency_ms": self.latency_ms}
        if self.protocol != "http/1.1":
            line["protocol"] = self.protocol
            if self.grpc_method is not None:
                line["grpc_method"] = self.grpc_method
                line["grpc_status"] = self.grpc_status
            if self.not_sent is not None:
                line["not_sent"] = self.not_sent
        return line


@dataclass
class _Conn:
    partial: bool = False
    requests: dict[int, RequestRecord] = field(default_factory=dict)  # forwarded ones, by index, until done with
    by_sent: list[int] = field(default_factory=list)  # sent_index -> index
    sent_at: dict[int, float] = field(default_factory=dict)  # index -> monotonic time handed to the replayer
    answered: set[int] = field(default_factory=set)  # indexes whose RequestResult went out
    local: ResponseParser | None = None
    prod: ResponseParser | None = None
    prod_resp: dict[int, ResponseRecord] = field(default_factory=dict)
    local_resp: dict[int, ResponseRecord] = field(default_factory=dict)
    local_done: bool = False
    prod_done: bool = False


class Shadow:
    """See the module doc. Feed it through `handle` / `handle_all`; the other public methods are what they run on."""

    def __init__(self, options: ShadowOptions, clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self._clock = clock
        self.comparing = options.compare
        self.same = 0
        self.different = 0
        self.unpaired = 0
        self._conns: dict[int, _Conn] = {}
        self._partial: set[int] = set()  # open flows joined mid-stream (--compare only)
        self._report: TextIO | None = None
        if options.report is not None:
            self._report = _open_report(options.report)

    # -- the interface ------------------------------------------------------------------------------------------

    def handle(self, event: ShadowEvent) -> list[Action]:
        return self.handle_all([event])

    def handle_all(self, events: list[ShadowEvent]) -> list[Action]:
        """A batch of the HTTP layer's commands (and the other events) in order: the actions for delivery.

        Production's Replies are compared here and go no further. Within a batch every request is noted before
        any Reply is read, and before delivery sends its bytes: a fast local answer must find it expected.
        """
        comparing = self.comparing
        out: list[Action] = []
        records: list[RequestRecord] = []
        replies: list[Reply] = []
        for e in events:
            kind = type(e)
            if kind is RequestRecord:
                records.append(e)  # type: ignore[arg-type]
            elif kind is Reply:
                if comparing:
                    replies.append(e)  # type: ignore[arg-type]
                else:
                    out.append(e)  # type: ignore[arg-type]
            elif kind is FlowRecord:
                assert isinstance(e, FlowRecord)
                if comparing:
                    self.prod_end(e.flow, e.last_ts, e.reply_complete and not e.partial)
            elif kind is Delivered or kind is Suppressed:
                self.local_end(e.flow, self._clock())  # type: ignore[union-attr]
            elif kind is LocalData:
                assert isinstance(e, LocalData)
                self.local(e.flow, e.data, e.at)
            elif kind is LocalClosed:
                assert isinstance(e, LocalClosed)
                self.local(e.flow, b"", e.at)
            elif kind is EndOfInput:
                self.finish(self._clock())
            else:
                if kind is Open and comparing:
                    self.opened(e.flow, e.partial)  # type: ignore[union-attr]
                out.append(e)  # type: ignore[arg-type]
        if records:
            self.requests(records, self._clock())
        for r in replies:
            self.reply(r.flow, r.data, r.ts)
        return out

    @property
    def tracked_flows(self) -> int:
        """Connections with requests still waiting for an answer (bounded by what is in flight)."""
        return len(self._conns)

    # -- the engine's calls -----------------------------------------------------------------------------------

    def opened(self, flow: int, partial: bool) -> None:
        if partial:
            self._partial.add(flow)

    def requests(self, records: list[RequestRecord], now: float) -> None:
        """Requests the layer just parsed, before their bytes are handed to the replayer."""
        touched: list[_Conn] = []
        for r in records:
            c = self._conns.get(r.flow)
            if c is None:
                c = self._conns[r.flow] = _Conn(partial=r.partial or r.flow in self._partial)
            if self.comparing and not c.partial:
                if c.prod is None:
                    c.prod = ResponseParser(r.flow)
                c.prod.expect(r.method, upgrade=r.upgrade)
                touched.append(c)
            if not r.forwarded:
                self._emit(RequestResult(r.flow, r.index, r.method, r.target, False))
                continue
            if c.local is None:
                c.local = ResponseParser(r.flow)
            c.local.expect(r.method, upgrade=r.upgrade)
            c.requests[r.index] = r
            c.by_sent.append(r.index)
            c.sent_at[r.index] = now
        for c in touched:
            # Production's bytes may already be held, waiting for the request they answer.
            assert c.prod is not None
            for rec in c.prod.feed(b"", now):
                self._prod_response(c, rec)

    def reply(self, flow: int, data: bytes, ts: float) -> None:
        c = self._conns.get(flow)
        if c is None or c.prod is None:
            return  # no request seen yet on it: production cannot be answering one
        for rec in c.prod.feed(data, ts):
            self._prod_response(c, rec)

    def local(self, flow: int, data: bytes, ts: float) -> None:
        """The replayer's on_response hook; b"" is the local service's end of stream."""
        c = self._conns.get(flow)
        if c is None or c.local is None:
            return
        for rec in c.local.feed(data, ts) if data else c.local.close(ts):
            self._local_response(c, rec)

    def local_end(self, flow: int, now: float) -> None:
        """The local connection is gone (or never existed): answers still missing will not come."""
        c = self._conns.get(flow)
        if c is None:
            return
        if c.local is not None and not c.local_done:
            for rec in c.local.close(now):
                self._local_response(c, rec)
        c.local_done = True
        for index in sorted(c.requests):
            if index not in c.answered:
                c.answered.add(index)
                r = c.requests[index]
                self._emit(RequestResult(flow, index, r.method, r.target, True))
        self._maybe_done(flow, c)

    def prod_end(self, flow: int, ts: float, reply_complete: bool) -> None:
        """The flow ended in the capture. Production's last answer may end with the connection itself."""
        self._partial.discard(flow)
        c = self._conns.get(flow)
        if c is None:
            return
        if c.prod is not None and reply_complete:
            # After a hole, what production sent is not known: no end of stream to complete a body with.
            for rec in c.prod.close(ts):
                self._prod_response(c, rec)
        c.prod_done = True
        self._maybe_done(flow, c)

    def finish(self, now: float) -> None:
        """End of run: whatever is still waiting will not be answered."""
        for flow in list(self._conns):
            c = self._conns[flow]
            c.prod_done = True
            self.local_end(flow, now)
        self._partial.clear()

    def write_report(self, line: dict[str, object]) -> None:
        """One line of --compare-report (another protocol's comparison, e.g. HTTP/2's)."""
        if self._report is not None:
            self._report.write(json.dumps(line, default=str) + "\n")

    def close(self) -> None:
        if self._report is not None:
            self._report.close()
            self._report = None

    # -- pairing ------------------------------------------------------------------------------------------------

    def _local_response(self, c: _Conn, rec: ResponseRecord) -> None:
        if rec.index >= len(c.by_sent):
            return  # an answer to no request (the local service spoke first, or twice): nothing to pair
        index = c.by_sent[rec.index]
        r = c.requests.get(index)
        if r is None:
            return
        c.answered.add(index)
        sent = c.sent_at.pop(index, rec.ts_end)
        self._emit(RequestResult(r.flow, index, r.method, r.target, True, rec.status,
                                 round(max(0.0, rec.ts_end - sent) * 1000.0, 3)))
        if not self.comparing:
            del c.requests[index]
            return
        if c.partial:
            return  # production's answers of a joined connection cannot be lined up: it stays unpaired
        c.local_resp[index] = rec
        self._pair(c, index)

    def _prod_response(self, c: _Conn, rec: ResponseRecord) -> None:
        if rec.index in c.requests:  # only forwarded requests have a local answer to compare with
            c.prod_resp[rec.index] = rec
            self._pair(c, rec.index)

    def _pair(self, c: _Conn, index: int) -> None:
        prod, local = c.prod_resp.get(index), c.local_resp.get(index)
        if prod is None or local is None:
            return
        r = c.requests.pop(index)
        del c.prod_resp[index], c.local_resp[index]
        diff = compare(prod, local, headers=self.options.compare_headers,
                       ignore_json_paths=self.options.ignore_json_paths)
        if diff is None:
            self.same += 1
            return
        self.different += 1
        if self._report is not None:
            line = {"method": r.method, "target": r.target, **diff.to_json()}
            self._report.write(json.dumps(line, default=str) + "\n")

    def _maybe_done(self, flow: int, c: _Conn) -> None:
        if not c.local_done or (self.comparing and not c.prod_done):
            return
        if self.comparing:
            self.unpaired += len(c.requests)  # forwarded, but one of the two answers never came
        del self._conns[flow]

    def _emit(self, result: RequestResult) -> None:
        if self.options.on_request is not None:
            self.options.on_request(result)


def _open_report(path: str) -> TextIO:
    """The report holds production's and the local answers' bodies: readable by the user only (0600)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    except OSError as exc:
        raise UsageError(f"cannot write --compare-report {path}: {exc.strerror or exc}") from None
    return os.fdopen(fd, "w", buffering=1, encoding="utf-8")
