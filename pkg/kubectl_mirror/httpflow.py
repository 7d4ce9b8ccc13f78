"""HTTP/1.x awareness for mirrored connections, sans-I/O: flow-table actions in, replayer actions out.

Shaped like a protocol layer of an intercepting proxy: no sockets, no threads, and time only from the clock
the caller injects, so a script of actions always yields the same actions (tests feed plain bytes).

`HttpLayer` sits between the flow table and the replayer. It splits each connection's client bytes into
requests with h11 (the HTTP/1.1 parser; never a hand-written one) and keeps, for every request, the exact
byte range it occupied in the capture, so what it forwards is the captured bytes themselves:

* With no filter, rewrite, sampling or rate limit set (`HttpOptions.active` false) it only observes: every
  action passes through unchanged, byte for byte, and requests are counted and recorded.
* Filters (`match_*`) drop non-matching requests; matching ones go out exactly as captured. A request
  matches when its method is any of `match_method`, every `match_path` regex is found in its target, and
  every `match_header` has an occurrence whose value the regex finds. With filters, a connection is opened
  at the target only when its first byte is sent: one whose requests all fail to match never appears.
  Rewrites (`set_header`, `rewrite_host`) re-serialize the request head only; the body and its framing
  (chunked or Content-Length) pass through byte-exact. An absolute-form target keeps its own host.
* A connection joined mid-stream starts at its first request boundary (a request line at a line start, or a
  standard method anywhere, that h11 then parses); the bytes before it are skipped and counted. Such a
  connection cannot be told from a non-HTTP one, so a mid-stream non-HTTP connection sends nothing.
* Sampling keeps or drops whole connections, deterministically from the seed and the flow id.
* `max_rps` is a token bucket on request starts; requests over the rate are dropped and counted.

What is not HTTP/1.x is left alone: a connection whose first bytes cannot start a request (TLS, a binary
protocol, HTTP/2 prior knowledge) passes through byte-exact, unless a filter is set, in which case it cannot
match and is not mirrored at all. A connection that breaks after a request started (garbage mid-stream)
passes the rest through unchanged when no filter is set; with a filter the flow is aborted, because part of
a request must never reach the target as if it were whole.

The response side (`ResponseParser`) turns the local target's response bytes into `ResponseRecord`s, and
`compare` tells how a production response and the local one differ, JSON-aware.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import h11

from .errors import UsageError
from .model import (
    Abort,
    AbortReason,
    Action,
    BrokenOff,
    Close,
    DeliveryFailed,
    Open,
    Reply,
    RequestRecord,
    Send,
    Suppressed,
)

# ---- options ------------------------------------------------------------------------------------------

# Body framing stays byte-exact, so the headers that describe it must not change under it.
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass
class HttpOptions:
    match_method: list[str] = field(default_factory=list)  # any of these methods (case-insensitive)
    match_path: list[str] = field(default_factory=list)  # regexes searched in the request target; all must match
    match_header: list[tuple[str, str]] = field(default_factory=list)  # (name, value regex); all must match
    # gRPC calls only (HTTP/2): SERVICE or SERVICE/METHOD regexes. An HTTP/1.x request is never a gRPC call.
    match_grpc: list[str] = field(default_factory=list)
    set_header: list[tuple[str, str]] = field(default_factory=list)  # (name, value): replace or add
    rewrite_host: str | None = None  # new Host header value, host[:port]; None keeps the captured one
    sample: float = 1.0  # fraction of connections mirrored, 0..1
    max_rps: float | None = None  # requests per second over all connections; None: unlimited
    seed: int = 0  # sampling seed: same seed, same capture -> same connections
    # Start mid-stream connections at their first request boundary even with nothing else set: shadow comparison
    # needs whole requests on the local side, where the observe-only mode would pass the captured bytes as they are.
    align: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample <= 1.0:
            raise UsageError(f"--sample {self.sample:g} is out of range: give a fraction 0..1 or a percentage")
        if self.max_rps is not None and not self.max_rps > 0:
            raise UsageError(f"--max-rps {self.max_rps:g} must be above 0 (leave it out for no limit)")
        for pattern in self.match_path:
            _compile(pattern, "--match-path")
        for name, pattern in self.match_header:
            _check_name(name, "--match-header")
            _compile(pattern, "--match-header")
        for pattern in self.match_grpc:
            _compile(pattern, "--match-grpc")
        for name, value in self.set_header:
            _check_set_header(name, value)
        if self.rewrite_host is not None:
            _check_value(self.rewrite_host, "--rewrite-host")

    @property
    def filtering(self) -> bool:
        """Some requests may not match: whole connections may end up with nothing to send."""
        return bool(self.match_method or self.match_path or self.match_header or self.match_grpc)

    @property
    def rewriting(self) -> bool:
        return bool(self.set_header) or self.rewrite_host is not None

    @property
    def active(self) -> bool:
        """Anything that changes what is sent; when false the layer only observes."""
        return self.filtering or self.rewriting or self.sample < 1.0 or self.max_rps is not None or self.align


def parse_header_match(text: str) -> tuple[str, str]:
    """`--match-header 'Name: REGEX'` -> (name, regex). The regex is searched in the header's value."""
    name, sep, pattern = text.partition(":")
    name, pattern = name.strip(), pattern.strip()
    if not sep or not name:
        raise UsageError(f"invalid --match-header {text!r}: expected 'Name: REGEX', for example 'X-Tenant: ^acme$'")
    _check_name(name, "--match-header")
    _compile(pattern, "--match-header")
    return name, pattern


def parse_set_header(text: str) -> tuple[str, str]:
    """`--set-header 'Name: value'` -> (name, value)."""
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not name:
        raise UsageError(f"invalid --set-header {text!r}: expected 'Name: value', for example 'X-Mirror: 1'")
    _check_set_header(name, value)
    return name, value


def parse_sample(text: str) -> float:
    """`--sample 10%` or `--sample 0.1` -> 0.1."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UsageError(f"invalid --sample {text!r}: expected a percentage like 10% or a fraction like 0.1") from None
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"invalid --sample {text!r}: it must be between 0% and 100%")
    return value


def _compile(pattern: str, flag: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"invalid {flag} regex {pattern!r}: {exc}") from None


def _check_name(name: str, flag: str) -> None:
    if not _TOKEN.fullmatch(name):
        raise UsageError(f"invalid {flag} header name {name!r}: letters, digits and -_. only")


def _check_value(value: str, flag: str) -> None:
    if any(c in value for c in "\r\n\0") or not value.isascii():
        raise UsageError(f"invalid {flag} value {value!r}: printable ASCII on one line only")


def _check_set_header(name: str, value: str) -> None:
    _check_name(name, "--set-header")
    _check_value(value, "--set-header")
    if name.lower() in _FRAMING:
        raise UsageError(f"--set-header cannot change {name}: bodies are mirrored byte-exact with their own framing")


# ---- what the layer reports -----------------------------------------------------------------------------


@dataclass
class HttpStats:
    requests: int = 0  # request heads parsed (forwarded + filtered + rate_limited)
    forwarded: int = 0  # sent to the target (as captured, or with the head rewritten)
    filtered: int = 0  # did not match a --match-* filter: not sent
    rate_limited: int = 0  # over --max-rps: not sent
    sampled_out_connections: int = 0  # left out by --sample: nothing of them was sent
    non_http_connections: int = 0  # first bytes could not start an HTTP/1.x request
    parse_errors: int = 0  # connections that stopped parsing after a request started
    skipped_bytes: int = 0  # bytes not sent because they preceded a mid-stream connection's first request


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


class _Kind(enum.Enum):
    HEAD = "head"  # a complete request head; `request` is set
    BODY = "body"  # body bytes of the current request, framing included; `end` on its last piece
    SKIP = "skip"  # before a mid-stream connection's first request boundary
    NON_HTTP = "non-http"  # the connection never was HTTP/1.x: these and all later bytes are OPAQUE
    BROKEN = "broken"  # parsing failed after a request started: these and all later bytes are OPAQUE
    OPAQUE = "opaque"  # after NON_HTTP or BROKEN
    TUNNEL = "tunnel"  # after an Upgrade/CONNECT request: they belong to that request's fate
    TAIL = "tail"  # the stream ended inside a request head: bytes of a request that never completed


@dataclass(slots=True)
class _Piece:
    kind: _Kind
    raw: bytes
    request: h11.Request | None = None
    end: bool = False


class _Phase(enum.Enum):
    SYNC = "sync"  # mid-stream join: looking for where the first whole request starts
    START = "start"  # at a request boundary: waiting for a plausible request line
    PARSE = "parse"  # h11 is parsing a request (head or body)
    OPAQUE = "opaque"
    TUNNEL = "tunnel"


class _Splitter:
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

    def feed(self, data: bytes) -> list[_Piece]:
        if not data:
            return []
        if self._phase is _Phase.OPAQUE:
            return [_Piece(_Kind.OPAQUE, data)]
        if self._phase is _Phase.TUNNEL:
            return [_Piece(_Kind.TUNNEL, data)]
        out: list[_Piece] = []
        self._raw += data
        if self._phase is _Phase.PARSE:
            assert self._conn is not None
            self._conn.receive_data(data)
        self._run(out)
        return out

    def end(self) -> list[_Piece]:
        """The client finished: whatever is still held belongs to a request that never completed."""
        raw, self._raw = bytes(self._raw), bytearray()
        if not raw:
            return []
        if self._phase is _Phase.SYNC:
            return [_Piece(_Kind.SKIP, raw)]
        return [_Piece(_Kind.BODY if self._in_body else _Kind.TAIL, raw)]

    def _run(self, out: list[_Piece]) -> None:
        step = {_Phase.SYNC: self._sync, _Phase.START: self._start, _Phase.PARSE: self._parse}
        while True:
            run = step.get(self._phase)
            if run is None or not run(out):
                return

    def _take(self, n: int) -> bytes:
        raw = bytes(self._raw[:n])
        del self._raw[:n]
        return raw

    def _sync(self, out: list[_Piece]) -> bool:
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

    def _skip(self, out: list[_Piece], n: int) -> None:
        if n:
            self._line_start = self._raw[n - 1] == 0x0A
            out.append(_Piece(_Kind.SKIP, self._take(n)))

    def _start(self, out: list[_Piece]) -> bool:
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

    def _parse(self, out: list[_Piece]) -> bool:
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
                self._upgrade = event.method == b"CONNECT" or any(n == b"upgrade" for n, _ in event.headers)
                out.append(_Piece(_Kind.HEAD, self._take(consumed), request=event))
            elif isinstance(event, h11.Data):
                # Where body bytes are cut does not matter (they all share the request's fate); only the
                # request's end must be exact, and EndOfMessage's is.
                out.append(_Piece(_Kind.BODY, self._take(consumed)))
            elif isinstance(event, h11.EndOfMessage):
                out.append(_Piece(_Kind.BODY, self._take(consumed), end=True))
                self._conn = None
                self._in_body = False
                if self._upgrade:
                    self._phase = _Phase.TUNNEL
                    if self._raw:
                        out.append(_Piece(_Kind.TUNNEL, self._take(len(self._raw))))
                    return False
                self._phase = _Phase.START
                return True
            else:  # PAUSED or ConnectionClosed cannot come before EndOfMessage on a server connection
                return self._fail(out)

    def _fail(self, out: list[_Piece]) -> bool:
        """The bytes at the current request boundary (or inside a request) are not HTTP/1.x."""
        self._conn = None
        if self._partial and not self._seen_request:
            # A mid-stream candidate that only looked like a request line: search on from the next line.
            self._phase = _Phase.SYNC
            self._scan_from = 1
            return True
        kind = _Kind.BROKEN if self._seen_request else _Kind.NON_HTTP
        self._phase = _Phase.OPAQUE
        self._in_body = False
        out.append(_Piece(kind, self._take(len(self._raw))))
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
# ---- the layer ----------------------------------------------------------------------------------------------


class _TokenBucket:
    """`rate` request starts per second, bursts up to one second's worth (at least one request)."""

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._burst = max(1.0, rate)
        self._tokens = self._burst
        self._last: float | None = None

    def take(self, now: float) -> bool:
        if self._last is not None:
            # A clock that steps back must not mint tokens nor take them away.
            self._tokens = min(self._burst, self._tokens + max(0.0, now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass
class _FlowState:
    splitter: _Splitter
    open: Open | None  # held back until the first byte is sent (filters on) or already passed on
    opened: bool = False  # the replayer has seen the Open
    dropped: bool = False  # sampled out, or aborted here: nothing more of it is passed on
    forwarding: bool = False  # the fate of the current request (and of a tunnel after it)
    pass_rest: bool = False  # after NON_HTTP / BROKEN: the remaining bytes pass unchanged
    index: int = 0  # requests parsed so far
    sent: int = 0  # requests forwarded so far


HttpEvent = Action | DeliveryFailed
HttpCommand = Action | RequestRecord | Suppressed | BrokenOff


class HttpLayer:
    """Per-connection HTTP/1.x request handling between the flow table and the replayer (see the module doc).

    Feed it every action of the flow table, in order, through `handle` (or `handle_all` for a batch), and
    DeliveryFailed when the replayer gives a flow up; give the replayer the actions it returns, and the records
    after them to whoever counts. (`process`, `forget` and the `pop_*` queues are what `handle` runs on.)
    """

    def __init__(self, options: HttpOptions, clock: Callable[[], float]) -> None:
        self.options = options
        self._clock = clock
        self._active = options.active
        self._filtering = options.filtering
        self._methods = {m.upper() for m in options.match_method}
        self._paths = [re.compile(p) for p in options.match_path]
        self._headers = [(n.lower().encode("ascii"), re.compile(v)) for n, v in options.match_header]
        self._set = [(n.encode("ascii"), v.encode("ascii")) for n, v in options.set_header]
        if options.rewrite_host is not None:
            self._set.append((b"Host", options.rewrite_host.encode("ascii")))
        self._bucket = _TokenBucket(options.max_rps) if options.max_rps is not None else None
        self._flows: dict[int, _FlowState] = {}
        self._stats = HttpStats()
        self._requests: list[RequestRecord] = []
        self._suppressed: list[int] = []
        self._aborted: list[int] = []

    # -- the interface -------------------------------------------------------------------------------------

    def handle(self, event: HttpEvent) -> list[HttpCommand]:
        """One event: an action of the layer below, or DeliveryFailed (the flow table then ends it silently)."""
        if type(event) is DeliveryFailed:
            self._flows.pop(event.flow, None)
            return []
        assert not isinstance(event, DeliveryFailed)
        return self.handle_all([event])

    def handle_all(self, actions: list[Action]) -> list[HttpCommand]:
        """`handle` over a batch of actions, in order: the actions for delivery, then what was learnt on the way.

        The commands after the actions are, in this order: a RequestRecord for every request parsed (before
        delivery sends its bytes, so a fast local answer finds it expected), `Suppressed` for each ended flow that
        delivery never heard of, and `BrokenOff` for each flow aborted because a request broke off.
        """
        out: list[HttpCommand] = list(self.process(actions))
        if self._requests:
            out += self.pop_requests()
        if self._suppressed:
            out += [Suppressed(flow) for flow in self.pop_suppressed()]
        if self._aborted:
            out += [BrokenOff(flow) for flow in self.pop_aborted()]
        return out

    def admit(self) -> bool:
        """One request start against --max-rps: True when it may go. The HTTP/2 layer draws on the same bucket, so
        the rate holds for HTTP/1.x requests and HTTP/2 streams together."""
        return self._bucket is None or self._bucket.take(self._clock())

    @property
    def tracked_flows(self) -> int:
        """Connections the layer keeps state for (bounded by the open ones)."""
        return len(self._flows)

    # -- the older entry points, which handle() runs on ----------------------------------------------------

    def process(self, actions: list[Action]) -> list[Action]:
        if not self._active:
            # Observe only: the replayer gets the very same actions; parsing just counts and records.
            for action in actions:
                self._observe(action)
            return actions
        out: list[Action] = []
        for action in actions:
            if type(action) is Send:
                st = self._flows.get(action.flow)
                if st is None:
                    out.append(action)  # a flow this layer never saw open: nothing to decide for it
                elif not st.dropped:
                    self._pieces(st, st.splitter.feed(action.data), action.flow, action.ts, out)
            elif type(action) is Open:
                self._open(action, out)
            elif type(action) is Close or type(action) is Abort:
                self._end(action, out)
            elif type(action) is Reply:
                out.append(action)  # production's answer: for the shadow layer after this one, whatever the fate
            else:
                # Anything else (a Turn) is not the client's bytes: it goes on as it is, except for a connection
                # left out entirely.
                st = self._flows.get(action.flow)
                if st is None or not st.dropped or st.opened:
                    out.append(action)
        return out

    def forget(self, flow: int) -> None:
        """The replayer gave the flow up: the flow table ends it silently, so its state goes now."""
        self._flows.pop(flow, None)

    @property
    def stats(self) -> HttpStats:
        s = self._stats
        return HttpStats(
            s.requests, s.forwarded, s.filtered, s.rate_limited, s.sampled_out_connections,
            s.non_http_connections, s.parse_errors, s.skipped_bytes,
        )

    def pop_requests(self) -> list[RequestRecord]:
        """Every request parsed since the last call, in order per connection."""
        out, self._requests = self._requests, []
        return out

    def pop_suppressed(self) -> list[int]:
        """Ended flows the replayer never heard of (sampled out, or nothing matched): it has no Delivery for them."""
        out, self._suppressed = self._suppressed, []
        return out

    def pop_aborted(self) -> list[int]:
        """Flows this layer aborted because a request broke off mid-stream while filtering."""
        out, self._aborted = self._aborted, []
        return out

    # -- observing ----------------------------------------------------------------------------------------

    def _observe(self, action: Action) -> None:
        if type(action) is Send:
            st = self._flows.get(action.flow)
            if st is None or st.dropped:
                return
            for piece in st.splitter.feed(action.data):
                if piece.kind is _Kind.HEAD:
                    assert piece.request is not None
                    self._record(st, action.flow, piece.request, action.ts, True)
                elif piece.kind is _Kind.NON_HTTP or piece.kind is _Kind.BROKEN:
                    self._count_failure(piece.kind)
                    st.dropped = True  # nothing more to learn from it
        elif type(action) is Open:
            self._flows[action.flow] = _FlowState(_Splitter(action.partial), action, opened=True)
        elif type(action) is Close or type(action) is Abort:
            self._flows.pop(action.flow, None)

    # -- deciding ------------------------------------------------------------------------------------------

    def _open(self, action: Open, out: list[Action]) -> None:
        st = _FlowState(_Splitter(action.partial), action)
        self._flows[action.flow] = st
        if not self._sampled(action.flow):
            st.dropped = True
            self._stats.sampled_out_connections += 1
        elif not self._filtering:
            # Without filters every connection sends something (or ends) as captured: open it right away.
            self._pass_open(st, out)
        # With filters the Open waits for the first byte that is sent: a connection whose requests all
        # fail to match must not reach the target at all, not even as an empty connection.

    def _end(self, action: Action, out: list[Action]) -> None:
        st = self._flows.pop(action.flow, None)
        if st is None:
            out.append(action)
            return
        if not st.dropped and type(action) is Close:
            # An Abort ends the flow with a RST anyway; a Close may first owe the target held bytes.
            self._pieces(st, st.splitter.end(), action.flow, action.ts, out)
        if st.opened and not st.dropped:
            out.append(action)
        elif not st.opened:
            self._suppressed.append(action.flow)

    def _pieces(self, st: _FlowState, pieces: list[_Piece], flow: int, ts: float, out: list[Action]) -> None:
        for piece in pieces:
            kind = piece.kind
            if kind is _Kind.BODY or kind is _Kind.TUNNEL:
                if st.forwarding:
                    self._send(st, flow, piece.raw, ts, out)
            elif kind is _Kind.HEAD:
                assert piece.request is not None
                self._head(st, flow, piece, ts, out)
            elif kind is _Kind.OPAQUE:
                if st.pass_rest:
                    self._send(st, flow, piece.raw, ts, out)
            elif kind is _Kind.SKIP:
                self._stats.skipped_bytes += len(piece.raw)
            elif kind is _Kind.TAIL:
                # A request head the client never finished: as captured when nothing filters, else never.
                if not self._filtering:
                    self._send(st, flow, piece.raw, ts, out)
            else:  # NON_HTTP or BROKEN
                self._count_failure(kind)
                if not self._filtering:
                    st.pass_rest = True
                    self._send(st, flow, piece.raw, ts, out)
                elif kind is _Kind.BROKEN:
                    # Part of a request may already be out: only a RST tells the target it is not whole.
                    if st.opened:
                        # No AbortReason says "protocol error"; RESET is what the target sees happen.
                        out.append(Abort(flow, AbortReason.RESET, ts))
                    self._aborted.append(flow)
                    st.dropped = True
                    return
                # NON_HTTP with filters: it cannot match any; nothing of it goes out (the Open is still held).

    def _head(self, st: _FlowState, flow: int, piece: _Piece, ts: float, out: list[Action]) -> None:
        request = piece.request
        assert request is not None
        stats = self._stats
        if not self._matches(request):
            stats.filtered += 1
            st.forwarding = False
        elif self._bucket is not None and not self._bucket.take(self._clock()):
            stats.rate_limited += 1
            st.forwarding = False
        else:
            st.forwarding = True
            self._send(st, flow, self._rewrite(request) if self._set else piece.raw, ts, out)
        self._record(st, flow, request, ts, st.forwarding)

    def _record(self, st: _FlowState, flow: int, request: h11.Request, ts: float, forwarded: bool) -> None:
        self._stats.requests += 1
        self._stats.forwarded += forwarded
        host = next((v.decode("latin-1") for n, v in request.headers if n == b"host"), None)
        upgrade = request.method == b"CONNECT" or any(n == b"upgrade" for n, _ in request.headers)
        self._requests.append(
            RequestRecord(
                flow, st.index, request.method.decode("latin-1"), request.target.decode("latin-1"), host, ts,
                forwarded, st.sent if forwarded else None, upgrade, st.open is not None and st.open.partial,
            )
        )
        st.index += 1
        st.sent += forwarded

    def _count_failure(self, kind: _Kind) -> None:
        if kind is _Kind.NON_HTTP:
            self._stats.non_http_connections += 1
        else:
            self._stats.parse_errors += 1

    def _send(self, st: _FlowState, flow: int, data: bytes, ts: float, out: list[Action]) -> None:
        if not data:
            return
        if not st.opened:
            self._pass_open(st, out)
        out.append(Send(flow, data, ts))

    @staticmethod
    def _pass_open(st: _FlowState, out: list[Action]) -> None:
        assert st.open is not None
        out.append(st.open)
        st.opened = True

    def _sampled(self, flow: int) -> bool:
        sample = self.options.sample
        if sample >= 1.0:
            return True
        if sample <= 0.0:
            return False
        # A hash, not a random generator: the verdict of one flow must not depend on which flows came before.
        digest = hashlib.blake2b(f"{self.options.seed}/{flow}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") < sample * 2.0**64

    def _matches(self, request: h11.Request) -> bool:
        if self.options.match_grpc:
            return False  # gRPC runs on HTTP/2 only
        if self._methods and request.method.decode("latin-1").upper() not in self._methods:
            return False
        if self._paths:
            target = request.target.decode("latin-1")
            if not all(p.search(target) for p in self._paths):
                return False
        for name, pattern in self._headers:
            # One occurrence of the header with a matching value is enough (headers may repeat).
            if not any(n == name and pattern.search(v.decode("latin-1")) for n, v in request.headers):
                return False
        return True

    def _rewrite(self, request: h11.Request) -> bytes:
        """The head again, with --set-header / --rewrite-host applied; names keep their captured case."""
        headers = list(request.headers.raw_items())
        for name, value in self._set:
            lower = name.lower()
            at = [i for i, (n, _) in enumerate(headers) if n.lower() == lower]
            if at:
                headers[at[0]] = (headers[at[0]][0], value)
                for i in reversed(at[1:]):
                    del headers[i]
            elif lower == b"host":
                headers.insert(0, (name, value))  # where RFC 9110 7.2 wants it: first
            else:
                headers.append((name, value))
        lines = [request.method + b" " + request.target + b" HTTP/" + request.http_version]
        lines += [n + b": " + v for n, v in headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"


# ---- responses ----------------------------------------------------------------------------------------------

MAX_BODY = 1 << 20  # response body bytes kept for comparison; the rest is counted, not stored


@dataclass(frozen=True, slots=True)
class ResponseRecord:
    flow: int
    index: int  # position among this connection's final (non-1xx) responses, 0-based
    status: int
    headers: list[tuple[str, str]]  # as received, names in their own case
    body: bytes  # the first max_body bytes, transfer coding removed
    ts_first_byte: float
    ts_end: float
    body_size: int = 0  # the whole body's size
    truncated: bool = False  # body holds only the first max_body bytes


class ResponseParser:
    """One connection's response bytes -> ResponseRecords (h11 in the client role, fed what the server sent).

    Whether a response has a body depends on the request (HEAD, CONNECT), so call `expect(method)` for every
    request sent on the connection, in order, before its response bytes are fed. `feed(b"", ts)` only
    processes what is held; the server's end of stream is `close(ts)`, which completes a body delimited by it.
    """

    def __init__(self, flow: int, *, max_body: int = MAX_BODY) -> None:
        self.flow = flow
        self.max_body = max_body
        self.error: str | None = None  # why parsing stopped (not HTTP, or the connection switched protocols)
        self._conn = h11.Connection(h11.CLIENT)
        self._methods: list[tuple[bytes, bool]] = []  # requests whose response has not started, in order
        self._waiting = False  # a dummy request was sent to h11 and its response is not complete
        self._index = 0
        self._first_ts: float | None = None
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()
        self._size = 0
        self._done = False

    def expect(self, method: str, *, upgrade: bool = False) -> None:
        """A request with this method went out on the connection (upgrade: it asked to switch protocols)."""
        self._methods.append((method.encode("ascii", "replace"), upgrade))

    def feed(self, data: bytes, ts: float) -> list[ResponseRecord]:
        if self._done:
            return []
        if data:
            if self._first_ts is None:
                self._first_ts = ts
            self._conn.receive_data(data)
        return self._run(ts)

    def close(self, ts: float) -> list[ResponseRecord]:
        if self._done:
            return []
        self._conn.receive_data(b"")
        out = self._run(ts)
        self._done = True
        return out

    def _run(self, ts: float) -> list[ResponseRecord]:
        out: list[ResponseRecord] = []
        while not self._done:
            if not self._waiting:
                rest, closed = self._conn.trailing_data
                if not self._methods or not (rest or closed):
                    return out  # nothing to parse, or no request to pair it with yet
                self._send_dummy()
            try:
                event = self._conn.next_event()
            except h11.ProtocolError as exc:
                self._stop(f"not an HTTP/1.x response: {exc}")
                return out
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                if isinstance(event, h11.ConnectionClosed):
                    self._done = True
                return out
            if event is h11.PAUSED or (isinstance(event, h11.InformationalResponse) and event.status_code == 101):
                # 101 Switching Protocols or an accepted CONNECT: what follows is not HTTP/1.x any more.
                if isinstance(event, h11.InformationalResponse):
                    self._status, self._headers = 101, _str_headers(event)
                if self._status:
                    out.append(self._finish(ts))
                self._stop("the connection switched protocols")
                return out
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and friends precede the real response
            if isinstance(event, h11.Response):
                self._status, self._headers = event.status_code, _str_headers(event)
            elif isinstance(event, h11.Data):
                self._size += len(event.data)
                room = self.max_body - len(self._body)
                if room > 0:
                    self._body += event.data[:room]
            elif isinstance(event, h11.EndOfMessage):
                out.append(self._finish(ts))
                self._next_cycle()
        return out

    def _send_dummy(self) -> None:
        # h11 decides body framing from the request it thinks it sent: give it one with the real method.
        method, upgrade = self._methods.pop(0)
        headers = [("Host", "mirror")]
        if upgrade and method != b"CONNECT":
            headers += [("Connection", "upgrade"), ("Upgrade", "mirror")]
        self._conn.send(h11.Request(method=method, target="/" if method != b"CONNECT" else "mirror:1",
                                    headers=headers))
        self._conn.send(h11.EndOfMessage())
        self._waiting = True

    def _finish(self, ts: float) -> ResponseRecord:
        record = ResponseRecord(
            self.flow, self._index, self._status, self._headers, bytes(self._body),
            self._first_ts if self._first_ts is not None else ts, ts, self._size, self._size > len(self._body),
        )
        self._index += 1
        self._body = bytearray()
        self._size = 0
        self._headers = []
        self._status = 0
        self._waiting = False
        # Bytes already held belong to the next response: it started no later than now.
        self._first_ts = ts if self._conn.trailing_data[0] else None
        return record

    def _next_cycle(self) -> None:
        conn = self._conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return
        # The server will close (Connection: close, HTTP/1.0): a server that goes on anyway gets a fresh parser.
        rest, closed = conn.trailing_data
        self._conn = h11.Connection(h11.CLIENT)
        if rest:
            self._conn.receive_data(rest)
        if closed:
            self._conn.receive_data(b"")

    def _stop(self, why: str) -> None:
        self.error = why
        self._done = True
        self._waiting = False


def _str_headers(event: h11.Response | h11.InformationalResponse) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers.raw_items()]


# ---- comparing a production response with the local one -------------------------------------------------

MAX_DIFFERENCES = 50  # items listed per response pair; a rewrite that breaks everything needs no 10,000 lines
_PREVIEW = 200  # characters of a non-JSON body shown in a difference


class Absent(enum.Enum):
    """A side of a difference that has no value at all (a JSON key or a header that is not there)."""

    ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class DiffItem:
    field: str  # "status", "header:<name>", "body", or "body:<JSON path>" such as "body:$.items[0].id"
    prod: object  # a JSON value, or Absent.ABSENT
    local: object


@dataclass(frozen=True, slots=True)
class Difference:
    flow: int
    index: int
    items: list[DiffItem]
    truncated: bool = False  # more than MAX_DIFFERENCES items differed; only the first are listed

    def to_json(self) -> dict[str, object]:
        """One `--compare-report` line (json.dumps it). An absent side is left out of its item."""
        items: list[dict[str, object]] = []
        for item in self.items:
            entry: dict[str, object] = {"field": item.field}
            if item.prod is not Absent.ABSENT:
                entry["prod"] = item.prod
            if item.local is not Absent.ABSENT:
                entry["local"] = item.local
            items.append(entry)
        return {"flow": self.flow, "index": self.index, "differences": items, "truncated": self.truncated}


def compare(
    prod: ResponseRecord, local: ResponseRecord, *, headers: list[str], ignore_json_paths: list[str]
) -> Difference | None:
    """How `local` differs from `prod`: status, the named headers (case-insensitive), then the body.

    Bodies that both parse as JSON are compared structurally, skipping `ignore_json_paths` (syntax in
    `JsonPath`); any other bodies must be byte-equal. A body cut at max_body is compared as far as it was kept,
    plus its full size. None when nothing differs.
    """
    items: list[DiffItem] = []
    if prod.status != local.status:
        items.append(DiffItem("status", prod.status, local.status))
    for name in headers:
        p, loc = _header(prod.headers, name), _header(local.headers, name)
        if p != loc:
            items.append(DiffItem(f"header:{name.lower()}", p, loc))
    items += _diff_bodies(prod, local, [JsonPath(p) for p in ignore_json_paths])
    if not items:
        return None
    return Difference(prod.flow, prod.index, items[:MAX_DIFFERENCES], len(items) > MAX_DIFFERENCES)


def _header(headers: list[tuple[str, str]], name: str) -> object:
    lower = name.lower()
    values = [v for n, v in headers if n.lower() == lower]
    # Repeated headers compare as their comma-joined list, which is what they mean (RFC 9110 5.3).
    return ", ".join(values) if values else Absent.ABSENT


def _diff_bodies(prod: ResponseRecord, local: ResponseRecord, ignore: list[JsonPath]) -> list[DiffItem]:
    if not prod.truncated and not local.truncated:
        p_json, l_json = _json(prod.body), _json(local.body)
        if p_json is not Absent.ABSENT and l_json is not Absent.ABSENT:
            items: list[DiffItem] = []
            _diff_json(p_json, l_json, (), ignore, items)
            return items
    if prod.body == local.body and prod.body_size == local.body_size:
        return []
    return [DiffItem("body", _preview(prod), _preview(local))]


def _json(body: bytes) -> object:
    # Parsing decides, not Content-Type: a JSON API that labels itself text/plain is still compared as JSON,
    # and a body labelled JSON that does not parse is compared byte for byte.
    if not body.strip():
        return Absent.ABSENT
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return Absent.ABSENT


def _preview(record: ResponseRecord) -> str:
    text = record.body[: _PREVIEW * 4].decode("utf-8", "replace")
    if len(text) > _PREVIEW or record.body_size > len(text.encode()):
        return f"{text[:_PREVIEW]}... ({record.body_size} bytes)"
    return text


_JsonKey = str | int


def _diff_json(p: object, loc: object, path: tuple[_JsonKey, ...], ignore: list[JsonPath], out: list[DiffItem]) -> None:
    if len(out) > MAX_DIFFERENCES or any(i.matches(path) for i in ignore):
        return
    if isinstance(p, dict) and isinstance(loc, dict):
        for key in list(p) + [k for k in loc if k not in p]:
            _diff_json(p.get(key, Absent.ABSENT), loc.get(key, Absent.ABSENT), (*path, key), ignore, out)
    elif isinstance(p, list) and isinstance(loc, list):
        for i in range(max(len(p), len(loc))):
            a = p[i] if i < len(p) else Absent.ABSENT
            b = loc[i] if i < len(loc) else Absent.ABSENT
            _diff_json(a, b, (*path, i), ignore, out)
    elif not _same(p, loc):
        out.append(DiffItem("body:" + _format_path(path), p, loc))


def _same(p: object, loc: object) -> bool:
    # JSON true and 1 are different values, though Python finds them equal; 1 and 1.0 are the same number.
    if isinstance(p, bool) or isinstance(loc, bool):
        return type(p) is type(loc) and p == loc
    if isinstance(p, int | float) and isinstance(loc, int | float):
        return p == loc
    return type(p) is type(loc) and p == loc


def _format_path(path: tuple[_JsonKey, ...]) -> str:
    parts = ["$"]
    for key in path:
        if isinstance(key, int):
            parts.append(f"[{key}]")
        elif _NAME.fullmatch(key):
            parts.append(f".{key}")
        else:
            parts.append(f"[{json.dumps(key)}]")
    return "".join(parts)


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


class _Seg(enum.Enum):
    KEY = "key"  # one named member
    INDEX = "index"  # one array element
    ANY = "any"  # `*`: any one member or element
    DEEP = "deep"  # `..`: zero or more levels, then the next step


class JsonPath:
    """A small JSONPath subset naming JSON values to leave out of a comparison (with everything below them).

    Syntax: an optional `$`, then steps: `.name` or `["name"]` (a member; the first `.` may be left out:
    `data.meta.requestId` is `$.data.meta.requestId`), `[3]` (an array element), `.*` or `[*]` (any member or
    element), and `..` (any depth: `$..id` is every `id` anywhere). Names may hold any character but `.`, `[`
    and `]`; quote them in brackets otherwise.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self._steps = _parse_path(text)

    def matches(self, path: tuple[_JsonKey, ...]) -> bool:
        """Whether the value at `path` (member names and element indexes from the root) is named."""
        return _match(self._steps, 0, path, 0)

    def __repr__(self) -> str:
        return f"JsonPath({self.text!r})"


_Step = tuple[_Seg, _JsonKey]


def _parse_path(text: str) -> list[_Step]:
    bad = UsageError(f"invalid JSON path {text!r}: expected e.g. $.timestamp, $.items[*].id, data.meta.requestId")
    s = text.strip()
    if s.startswith("$"):
        s = s[1:]
    elif s and s[0] not in ".[":
        s = "." + s
    steps: list[_Step] = []
    i = 0
    while i < len(s):
        if s.startswith("..", i):
            steps.append((_Seg.DEEP, ""))
            i += 2
            if i < len(s) and s[i] == "[":
                continue
            i, name = _read_name(s, i)
            if not name:
                raise bad
            steps.append((_Seg.ANY, "") if name == "*" else (_Seg.KEY, name))
        elif s[i] == ".":
            i, name = _read_name(s, i + 1)
            if not name:
                raise bad
            steps.append((_Seg.ANY, "") if name == "*" else (_Seg.KEY, name))
        elif s[i] == "[":
            end = s.find("]", i)
            if end < 0:
                raise bad
            inner = s[i + 1 : end].strip()
            if inner == "*":
                steps.append((_Seg.ANY, ""))
            elif inner.isdigit():
                steps.append((_Seg.INDEX, int(inner)))
            elif len(inner) >= 2 and inner[0] == inner[-1] and inner[0] in "'\"":
                steps.append((_Seg.KEY, inner[1:-1]))
            else:
                raise bad
            i = end + 1
        else:
            raise bad
    if not steps or steps[-1][0] is _Seg.DEEP:
        raise bad
    return steps


def _read_name(s: str, i: int) -> tuple[int, str]:
    j = i
    while j < len(s) and s[j] not in ".[]":
        j += 1
    return j, s[i:j]


def _match(steps: list[_Step], i: int, path: tuple[_JsonKey, ...], j: int) -> bool:
    if i == len(steps):
        return j == len(path)
    seg, key = steps[i]
    if seg is _Seg.DEEP:
        return any(_match(steps, i + 1, path, k) for k in range(j, len(path)))
    if j == len(path):
        return False
    here = path[j]
    if seg is _Seg.KEY:
        ok = isinstance(here, str) and here == key
    elif seg is _Seg.INDEX:
        ok = isinstance(here, int) and here == key
    else:
        ok = True
    return ok and _match(steps, i + 1, path, j + 1)
