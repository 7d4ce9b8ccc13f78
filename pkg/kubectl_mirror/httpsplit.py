"""Splitting one connection's client bytes into HTTP/1.x requests, with h11, keeping each request's exact bytes.

`Splitter.feed` turns bytes into `Piece`s: a request head (with its parsed h11 request and its raw bytes), body
bytes, a tunnel after an Upgrade or CONNECT, bytes skipped before a mid-stream connection's first request, or
the verdict that the bytes are not (or no longer) HTTP/1.x. What is forwarded is always the captured bytes
themselves. Used by the HTTP layer (httpflow) and by turn-taking (turns), which counts requests with it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import h11

# ---- splitting a client byte stream into requests ------------------------------------------------------

# Heads larger than this are not HTTP requests we will parse (h11's own default is 16 KiB).
_MAX_HEAD = 64 << 10
# The resync heuristic: where a request could start. h11 has the final word; this only finds candidates and
# rejects binary protocols before h11 has to wait for a blank line that never comes.
_REQUEST_LINE = re.compile(rb"[A-Z][A-Z_-]{0,31} [\x21-\x7e]+ HTTP/1\.[01]\r?\n")
# A line still arriving that could become a request line (loose on purpose: the full line is checked above).
_VIABLE = re.compile(rb"[A-Z][A-Z_-]{0,31}(?: [\x21-\x7e]*(?: [HTP/01.]{0,8}\r?)?)?")
_MAX_LINE = 8 << 10
_METHOD_ANYWHERE = re.compile(rb"(?:GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH|TRACE|CONNECT) ")
_METHOD_TAIL = len(b"OPTIONS ")


class Kind(enum.Enum):
    HEAD = "head"  # a complete request head; `request` is set
    BODY = "body"  # body bytes of the current request, framing included; `end` on its last piece
    SKIP = "skip"  # before a mid-stream connection's first request boundary
    NON_HTTP = "non-http"  # the connection never was HTTP/1.x: these and all later bytes are OPAQUE
    BROKEN = "broken"  # parsing failed after a request started: these and all later bytes are OPAQUE
    OPAQUE = "opaque"  # after NON_HTTP or BROKEN
    TUNNEL = "tunnel"  # after an accepted Upgrade, or a CONNECT request: they belong to that request's fate
    TAIL = "tail"  # the stream ended inside a request head: bytes of a request that never completed


@dataclass(slots=True)
class Piece:
    kind: Kind
    raw: bytes
    request: h11.Request | None = None
    end: bool = False


class _Phase(enum.Enum):
    SYNC = "sync"  # mid-stream join: looking for where the first whole request starts
    START = "start"  # at a request boundary: waiting for a plausible request line
    PARSE = "parse"  # h11 is parsing a request (head or body)
    OPAQUE = "opaque"
    # After an Upgrade request: a server may decline it (answer it on HTTP/1.1), and the client then goes on with
    # its next request. Its next bytes tell: a request line (declined: parse on), anything else (the tunnel).
    UPGRADED = "upgraded"
    TUNNEL = "tunnel"


class Splitter:
    """One connection's client bytes -> pieces that cover every byte exactly once, in order.

    A fresh h11 connection parses each request: h11 would otherwise want a response between requests, refuses
    anything after `Connection: close` or HTTP/1.0 (whose keep-alive it does not implement) and rejects the
    blank lines RFC 9112 2.2 tells servers to ignore between requests. The raw bytes a request occupied are
    what h11 consumed: what we hold minus h11's trailing data.
    """

    def __init__(self, partial: bool) -> None:
        self._partial = partial
        self._phase = _Phase.SYNC if partial else _Phase.START
        self._raw = bytearray()  # bytes received and not yet handed out as a piece
        self._conn: h11.Connection | None = None
        self._line_start = True  # SYNC: whether _raw[0] starts a line (a join may fall on a boundary)
        self._scan_from = 0  # SYNC: candidates before this offset were refused already
        self._seen_request = False  # a request head was parsed on this connection
        self._in_body = False
        self._upgrade = False
        self._connect = False

    def feed(self, data: bytes) -> list[Piece]:
        if not data:
            return []
        if self._phase is _Phase.OPAQUE:
            return [Piece(Kind.OPAQUE, data)]
        if self._phase is _Phase.TUNNEL:
            return [Piece(Kind.TUNNEL, data)]
        out: list[Piece] = []
        self._raw += data
        if self._phase is _Phase.PARSE:
            assert self._conn is not None
            self._conn.receive_data(data)
        self._run(out)
        return out

    def end(self) -> list[Piece]:
        """The client finished: whatever is still held belongs to a request that never completed."""
        raw, self._raw = bytes(self._raw), bytearray()
        if not raw:
            return []
        if self._phase is _Phase.SYNC:
            return [Piece(Kind.SKIP, raw)]
        if self._phase is _Phase.UPGRADED:
            return [Piece(Kind.TUNNEL, raw)]
        return [Piece(Kind.BODY if self._in_body else Kind.TAIL, raw)]

    def _run(self, out: list[Piece]) -> None:
        step = {_Phase.SYNC: self._sync, _Phase.START: self._start, _Phase.PARSE: self._parse,
                _Phase.UPGRADED: self._upgraded}
        while True:
            run = step.get(self._phase)
            if run is None or not run(out):
                return

    def _take(self, n: int) -> bytes:
        raw = bytes(self._raw[:n])
        del self._raw[:n]
        return raw

    def _sync(self, out: list[Piece]) -> bool:
        """Skip to the first candidate holding a request line; False when more bytes are needed."""
        raw = self._raw
        at, self._scan_from = self._scan_from, 0
        while True:
            cand = self._candidate(raw, at)
            if cand < 0:
                # Keep a tail that may be the start of a method name; what is before it cannot start a request.
                self._skip(out, max(at, len(raw) - _METHOD_TAIL))
                return False
            verdict = _plausible(raw, cand)
            if verdict is None:  # hold the candidate line until it is complete
                self._skip(out, cand)
                return False
            if verdict:
                self._skip(out, cand)
                self._phase = _Phase.START
                return True
            at = cand + 1

    def _candidate(self, raw: bytearray, at: int) -> int:
        """Where a request could start, at or after `at`: a line start, or a well-known method anywhere.

        Bodies seldom end in a newline, so after a join inside one the next request usually starts mid-line;
        only the standard methods are looked for there, so a body ending in capitals ("...OK") cannot glue
        itself to the method.
        """
        if at == 0 and self._line_start:
            return 0
        line = _next_line(raw, at - 1) if at > 0 else -1
        found = _METHOD_ANYWHERE.search(raw, at)
        starts = [p for p in (line, found.start() if found else -1) if 0 <= p < len(raw)]
        return min(starts) if starts else -1

    def _skip(self, out: list[Piece], n: int) -> None:
        if n:
            self._line_start = self._raw[n - 1] == 0x0A
            out.append(Piece(Kind.SKIP, self._take(n)))

    def _start(self, out: list[Piece]) -> bool:
        raw = self._raw
        lead = 0
        while lead < len(raw) and raw[lead] in b"\r\n":
            lead += 1
        if lead == len(raw):
            return self._fail(out) if lead > _MAX_LINE else False
        verdict = _plausible(raw, lead)
        if verdict is None:
            return False
        if not verdict:
            return self._fail(out)
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        self._conn.receive_data(bytes(raw[lead:]))  # blank lines go with the head's raw bytes, unseen by h11
        self._phase = _Phase.PARSE
        return True

    def _parse(self, out: list[Piece]) -> bool:
        conn = self._conn
        assert conn is not None
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return self._fail(out)
            if event is h11.NEED_DATA:
                return False
            consumed = len(self._raw) - len(conn.trailing_data[0])
            if isinstance(event, h11.Request):
                self._seen_request = self._in_body = True
                self._connect = event.method == b"CONNECT"
                self._upgrade = self._connect or any(n == b"upgrade" for n, _ in event.headers)
                out.append(Piece(Kind.HEAD, self._take(consumed), request=event))
            elif isinstance(event, h11.Data):
                # Where body bytes are cut does not matter (they all share the request's fate); only the
                # request's end must be exact, and EndOfMessage's is.
                out.append(Piece(Kind.BODY, self._take(consumed)))
            elif isinstance(event, h11.EndOfMessage):
                out.append(Piece(Kind.BODY, self._take(consumed), end=True))
                self._conn = None
                self._in_body = False
                if self._upgrade and not self._connect:
                    self._phase = _Phase.UPGRADED
                    return True
                if self._upgrade:
                    self._phase = _Phase.TUNNEL
                    if self._raw:
                        out.append(Piece(Kind.TUNNEL, self._take(len(self._raw))))
                    return False
                self._phase = _Phase.START
                return True
            else:  # PAUSED or ConnectionClosed cannot come before EndOfMessage on a server connection
                return self._fail(out)

    def _upgraded(self, out: list[Piece]) -> bool:
        """After an Upgrade request: a request line next means the server declined it (the client went on in
        HTTP/1.x); anything else (an HTTP/2 preface, WebSocket frames) is the upgraded protocol's tunnel."""
        if not self._raw:
            return False
        verdict = _plausible(self._raw, 0)
        if verdict is None:
            return False  # a line still arriving that may be a request line
        if verdict:
            self._phase = _Phase.START
            return True
        self._phase = _Phase.TUNNEL
        out.append(Piece(Kind.TUNNEL, self._take(len(self._raw))))
        return False

    def _fail(self, out: list[Piece]) -> bool:
        """The bytes at the current request boundary (or inside a request) are not HTTP/1.x."""
        self._conn = None
        if self._partial and not self._seen_request:
            # A mid-stream candidate that only looked like a request line: search on from the next line.
            self._phase = _Phase.SYNC
            self._scan_from = 1
            return True
        kind = Kind.BROKEN if self._seen_request else Kind.NON_HTTP
        self._phase = _Phase.OPAQUE
        self._in_body = False
        out.append(Piece(kind, self._take(len(self._raw))))
        return False


def _next_line(raw: bytearray, at: int) -> int:
    """Offset of the line start after `at`, or -1 when no newline follows."""
    nl = raw.find(b"\n", at)
    return nl + 1 if nl >= 0 else -1


def _plausible(raw: bytearray, at: int) -> bool | None:
    """Whether a request line starts at `at`: True, False, or None while the line is still arriving."""
    nl = raw.find(b"\n", at, at + _MAX_LINE)
    if nl < 0:
        if len(raw) - at >= _MAX_LINE:
            return False
        return None if _VIABLE.fullmatch(raw, at) else False
    return _REQUEST_LINE.fullmatch(raw, at, nl + 1) is not None
