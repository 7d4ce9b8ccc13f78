"""HTTP/2 and gRPC in HTTP mode, sans-I/O: the layer between the flow table and delivery for HTTP/2 connections.

It sits before the HTTP/1.x layer and takes every connection until its first client bytes tell what it is: the
HTTP/2 preface (prior knowledge), or an HTTP/1.1 request with `Upgrade: h2c`. An upgrade request alone decides
nothing: the server may decline it (answer on HTTP/1.1, as most HTTP/1.x servers do) and the client then goes on
in HTTP/1.1. Such a connection is held until what follows tells: the client's preface after its request (it sends
one only after a 101) makes it HTTP/2; its next HTTP/1.1 request, production's non-101 answer (when server bytes
are followed) or its end without a 101 make it HTTP/1.x. Anything not HTTP/2 goes on to the HTTP/1.x layer
unchanged, Open and all, every request with it; so does a connection joined mid-stream (its HPACK tables are
unknown: it cannot be decoded, see README).

For its HTTP/2 connections it decodes the client's frames and production's answers (h2wire) and:

* with no filter, rewrite or rate limit (`H2Options.reoriginate` false) passes every action on as it came: the
  local service gets the captured bytes exactly. `--sample` keeps or drops whole connections.
* with any of them, gives the local side a connection of its own, re-originated with the `h2` state machine: its
  own preface and SETTINGS, its own HPACK encoder, the kept streams renumbered 1, 3, 5, ... in their order; the
  local server's SETTINGS (concurrent streams, frame size), flow-control windows and GOAWAY are honoured, its PINGs
  answered, its DATA acknowledged at once so large answers never stall. Streams that are not sent are counted per
  reason: filtered, rate-limited, or refused (after the local GOAWAY). The captured client's end (FIN) is passed on
  once every sent stream is over locally, or `close_wait` seconds later.

Commands out: `Direct(action)` for delivery, past the HTTP/1.x layer; the actions of other connections unchanged;
`StreamSeen` for every stream the captured client opened (with its fate); `StreamDone` once a stream's production
and local answers are both known (or known never to come); `Suppressed` for a connection that ended without
delivery hearing of it; `GiveUp` when the local side broke the protocol.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import re
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from .h2wire import PREFACE, Direction, Exchange, Exchanges, Frame2, Headers, Kind, State, connection, is_grpc
from .model import (
    Abort,
    AbortReason,
    Action,
    Close,
    Delivered,
    DeliveryFailed,
    EndOfInput,
    GiveUp,
    LocalClosed,
    LocalData,
    Open,
    Reply,
    Send,
    Suppressed,
    Tick,
    Turn,
)

_MAX_HEAD = 64 << 10
# An upgrade request's bytes held before anything tells whether the server took it (a large request body): past
# this the connection is decided on what is known (a 101 seen, or not) rather than held without bound.
_MAX_UPGRADE_HOLD = 8 << 20
# Seconds an upgrade request waits for the client's preface. A client that got its 101 sends the preface at once
# (RFC 9113 3.2); one whose server declined and that keeps its connection idle would otherwise have its request
# held until its next request or its end. Past this, no 101 seen: the connection is HTTP/1.x.
UPGRADE_WAIT = 1.0
_MAX_METHODS = 1000  # gRPC methods counted by name; the rest together
# Forwarded streams of one connection still waiting for their answers (a local service that never replies, a
# long-lived gRPC connection): past this the oldest is reported unanswered and forgotten, and counted, so memory
# stays bounded by this many streams per connection, however long the connection lives.
MAX_WAITING_STREAMS = 1024
# A local server that refuses a stream (RST_STREAM REFUSED_STREAM) did not process it (RFC 9113 8.7): it is sent
# again on the same connection, as gRPC clients do. grpcio refuses the streams it counts over its concurrent-stream
# limit, and under load it still counts streams whose answer the client already has. To send a stream again, what
# was sent of it is kept until its answer starts, up to this many bytes (gRPC calls are small; a larger upload
# refused is reported unanswered, as before), and at most this many times.
RETRY_KEEP = 64 << 10
MAX_RETRIES = 5
_UPGRADE = re.compile(rb"^upgrade:[^\r\n]*\bh2c\b", re.I | re.M)
# The re-originated connection's own receive windows: large, so a local answer is never held back by them.
_WINDOW = (1 << 31) - 1 - 65535
_STREAM_WINDOW = 1 << 24


@dataclass
class H2Options:
    match_method: list[str] = field(default_factory=list)
    match_path: list[str] = field(default_factory=list)
    match_header: list[tuple[str, str]] = field(default_factory=list)
    match_grpc: list[str] = field(default_factory=list)  # SERVICE or SERVICE/METHOD regexes (any may match)
    set_header: list[tuple[str, str]] = field(default_factory=list)
    rewrite_host: str | None = None  # the new :authority
    sample: float = 1.0
    max_rps: float | None = None
    seed: int = 0
    close_wait: float = 5.0  # seconds the captured client's end waits for the local answers of its streams
    record: bool = True  # decode answers for StreamDone (results, --compare)

    @property
    def filtering(self) -> bool:
        return bool(self.match_method or self.match_path or self.match_header or self.match_grpc)

    @property
    def reoriginate(self) -> bool:
        """Anything that changes which streams go, or how they look: the local side gets its own connection."""
        return self.filtering or bool(self.set_header) or self.rewrite_host is not None or self.max_rps is not None


class Fate(str, enum.Enum):
    FORWARDED = "forwarded"
    FILTERED = "filtered"  # did not match a --match-* filter
    RATE_LIMITED = "rate-limited"  # over --max-rps
    REFUSED = "refused"  # the local server sent GOAWAY first, or broke the connection
    SAMPLED_OUT = "sampled-out"  # its connection was left out by --sample


# ---- commands -----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Direct:
    """Deliver this action as it is: it belongs to an HTTP/2 connection, not to the HTTP/1.x layer."""

    action: Action


@dataclass(frozen=True, slots=True)
class StreamSeen:
    flow: int
    stream: int  # the captured stream id
    method: str
    path: str
    authority: str | None
    grpc_method: str | None  # `package.Service/Method` of a gRPC call
    fate: Fate
    ts: float


@dataclass(slots=True)
class StreamDone:
    """A forwarded stream whose answers are known: production's (None without --compare, or when it never came
    whole) and the local one (None when it never came)."""

    flow: int
    stream: int
    prod: Exchange | None
    local: Exchange | None
    sent_at: float  # clock time the stream's headers went to delivery
    seen: StreamSeen  # what the captured request was


H2Command = Action | Direct | StreamSeen | StreamDone | Suppressed | GiveUp


@dataclass
class H2Stats:
    connections: int = 0  # HTTP/2 connections (prior knowledge or upgraded)
    upgraded: int = 0  # ... of them by an HTTP/1.1 Upgrade: h2c
    undecodable: int = 0  # ... whose frames or HPACK blocks could not be decoded to the end
    streams: int = 0  # streams the captured clients opened
    grpc_calls: int = 0  # ... of them gRPC (content-type application/grpc*)
    forwarded: int = 0
    filtered: int = 0
    rate_limited: int = 0
    refused: int = 0
    retried: int = 0  # streams the local server refused (REFUSED_STREAM) and that were sent again
    sampled_out_connections: int = 0
    abandoned: int = 0  # forwarded streams reported unanswered early: MAX_WAITING_STREAMS newer ones were waiting
    grpc_methods: Counter[str] = field(default_factory=Counter)


# ---- the layer ------------------------------------------------------------------------------------------------


class _Kind(enum.Enum):
    DECIDING = "deciding"
    UPGRADING = "upgrading"  # an HTTP/1.1 request asked for h2c: held until what follows tells whether it was taken
    H2 = "h2"
    OTHER = "other"


@dataclass(eq=False)
class _Flow:
    open: Open
    kind: _Kind = _Kind.DECIDING
    held: list[Action] = field(default_factory=list)
    first: bytes = b""
    probe: tuple[Direction, Direction] | None = None  # UPGRADING: both directions decoded, to see what follows
    probe_bytes: int = 0  # UPGRADING: client bytes held
    dropped: bool = False  # sampled out: nothing of it goes on
    prod: Exchanges | None = None  # the captured client's frames and production's answers
    local: Exchanges | None = None  # what went to the local service and its answers (recording)
    origin: _Origin | None = None
    fates: dict[int, Fate] = field(default_factory=dict)  # streams not yet reported done
    highest: int = 0  # the highest stream id the captured client opened
    sent_at: dict[int, float] = field(default_factory=dict)  # captured stream -> clock time sent
    seen: dict[int, StreamSeen] = field(default_factory=dict)  # forwarded streams, until reported done
    prod_done: dict[int, Exchange] = field(default_factory=dict)
    local_done: dict[int, Exchange] = field(default_factory=dict)
    ended: bool = False  # the captured connection ended (Close or Abort came)


class _Origin:
    """The re-originated local connection of one captured HTTP/2 connection."""

    def __init__(self) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=False)
        self.conn = h2.connection.H2Connection(config)
        self.conn.local_settings = h2.settings.Settings(client=True, initial_values={
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 20,
        })
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(_WINDOW)
        self.ids: dict[int, int] = {}  # captured stream -> local stream
        self.back: dict[int, int] = {}  # local -> captured
        self.pending: dict[int, bytearray] = {}  # local stream -> DATA waiting for window
        self.pending_end: set[int] = set()  # local streams to end once their pending DATA is out
        self.waiting: deque[tuple[int, Headers, bool]] = deque()  # (captured stream, headers, end): over the limit
        self.queued: dict[int, tuple[bytearray, bool]] = {}  # captured stream waiting -> (its DATA, ended)
        self.open: set[int] = set()  # local streams not yet over on the local side
        self.gone = False  # the local server sent GOAWAY: no new stream
        # Its SETTINGS came: streams start only then, so its limits (concurrent streams, windows) hold from the first.
        self.settled = False
        self.close_at: float | None = None  # when the captured client's end came (held until streams are over)
        self.end: Close | Abort | None = None  # that end
        self.trailers: dict[int, Headers] = {}  # captured stream -> the client's trailers, sent after its DATA
        self.opened = False
        self.sent: dict[int, _Sent] = {}  # local stream not answered yet -> what went out on it, to send again
        self.retries: dict[int, int] = {}  # captured stream -> times the local server refused it


@dataclass
class _Sent:
    """One request as the local connection was given it: enough to send it again if the server refuses it."""

    stream: int  # the captured stream
    headers: Headers
    end: bool  # the headers ended the stream
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False  # its DATA ended the stream
    trailers: Headers | None = None


class H2Layer:
    def __init__(self, options: H2Options, comparing: bool = False,
                 clock: Callable[[], float] | None = None, admit: Callable[[], bool] | None = None) -> None:
        """`clock`: wall time for the rate limit, answer times and held ends; without it only Ticks tell time.
        `admit`: the --max-rps bucket shared with the HTTP/1.x layer (else this layer keeps its own)."""
        self.options = options
        self._wall = clock
        self._admit = admit
        self.comparing = comparing
        self._reoriginate = options.reoriginate
        self._methods = {m.upper() for m in options.match_method}
        self._paths = [re.compile(p) for p in options.match_path]
        self._headers = [(n.lower(), re.compile(v)) for n, v in options.match_header]
        self._grpc = [re.compile(p) for p in options.match_grpc]
        self._set = [(n.lower(), v) for n, v in options.set_header]
        self._rate = options.max_rps
        self._tokens = max(1.0, options.max_rps or 0.0)
        self._last_take: float | None = None
        self._flows: dict[int, _Flow] = {}
        self._closing: dict[int, _Flow] = {}  # re-originated flows whose captured end waits for local answers
        self._upgrading: dict[int, tuple[_Flow, float]] = {}  # flows held on an upgrade request -> until when
        self._clock = 0.0
        self.stats = H2Stats()

    # -- the interface ------------------------------------------------------------------------------------------

    def handle(self, event: object) -> list[H2Command]:
        out: list[H2Command] = []
        self._one(event, out)
        return out

    def handle_all(self, events: list[Action]) -> list[H2Command]:
        out: list[H2Command] = []
        flows = self._flows
        for event in events:
            f = flows.get(event.flow)
            if f is not None and f.kind is _Kind.OTHER and type(event) is not Open:
                out.append(event)  # not HTTP/2: the HTTP/1.x layer's business
                if type(event) is Close or type(event) is Abort:
                    del flows[event.flow]
                continue
            self._one(event, out)
        return out

    @property
    def tracked_flows(self) -> int:
        return len(self._flows)

    @property
    def waiting_streams(self) -> int:
        """Forwarded streams whose answers are still awaited, over all connections (each at most
        MAX_WAITING_STREAMS)."""
        return sum(len(f.fates) for f in self._flows.values())

    @property
    def holding(self) -> bool:
        """A captured end waits for local answers, or an upgrade request for what follows it (the run's end must
        let it finish, or flush)."""
        return bool(self._closing) or bool(self._upgrading)

    def next_deadline(self) -> float | None:
        """When a held end or upgrade request stops waiting (clock of the Ticks); None: nothing held."""
        ends = [o.close_at + self.options.close_wait for f in self._closing.values()
                if (o := f.origin) is not None and o.close_at is not None]
        ends += [until for _, until in self._upgrading.values()]
        return min(ends) if ends else None

    def flush(self) -> list[H2Command]:
        """Stop waiting: every held end goes out now, every held upgrade request is decided on what is known.
        Actions of a connection decided HTTP/1.x come out bare: they belong to the HTTP/1.x layer."""
        out: list[H2Command] = []
        for f, _ in list(self._upgrading.values()):
            self._upgrade_decided(f, out)
        for f in list(self._closing.values()):
            self._finish_origin(f, out)
        return out

    # -- events -------------------------------------------------------------------------------------------------

    def _one(self, event: object, out: list[H2Command]) -> None:
        if self._wall is not None:
            self._clock = max(self._clock, self._wall())
        if isinstance(event, EndOfInput):
            # Delivery is over: answers still missing never come; every stream sent is reported now.
            for left in list(self._flows.values()):
                if left.kind is _Kind.H2:
                    self._emit_missing(left, out)
                self._forget(left)
            return
        if isinstance(event, Tick):
            self._clock = event.now
            for waiting, until in list(self._upgrading.values()):
                if event.now >= until:
                    self._upgrade_decided(waiting, out)
            for closing in list(self._closing.values()):
                o = closing.origin
                if o is not None and o.close_at is not None and event.now >= o.close_at + self.options.close_wait:
                    self._finish_origin(closing, out)
            return
        if isinstance(event, (LocalData, LocalClosed, Delivered, DeliveryFailed)):
            mine = self._flows.get(event.flow)
            if mine is None or mine.kind is not _Kind.H2:
                return
            if isinstance(event, LocalData):
                self._clock = max(self._clock, event.at)
                self._local(mine, event.data, event.at, out)
                return
            if isinstance(event, LocalClosed):
                self._clock = max(self._clock, event.at)
            self._local_over(mine, out, forget=not isinstance(event, LocalClosed))
            return
        if isinstance(event, Open):
            self._flows[event.flow] = _Flow(event)
            if event.partial:
                self._decide(self._flows[event.flow], _Kind.OTHER, out)
            return
        assert isinstance(event, (Send, Close, Abort, Reply, Turn))
        f = self._flows.get(event.flow)
        if f is None:
            out.append(event)  # a flow opened before this layer saw it
            return
        if f.kind is _Kind.DECIDING:
            f.held.append(event)
            if isinstance(event, Send):
                self._sniff(f, event.data, out)
            elif isinstance(event, (Close, Abort)):
                self._decide(f, _Kind.OTHER, out)
            return
        if f.kind is _Kind.UPGRADING:
            f.held.append(event)
            self._probe(f, event, out)
            return
        if f.kind is _Kind.OTHER:
            out.append(event)
            if isinstance(event, (Close, Abort)):
                del self._flows[event.flow]
            return
        self._h2_action(f, event, out)

    def _sniff(self, f: _Flow, data: bytes, out: list[H2Command]) -> None:
        seen = f.first + data
        n = min(len(seen), len(PREFACE))
        if seen[:n] == PREFACE[:n]:
            if n == len(PREFACE):
                self._decide(f, _Kind.H2, out)
            else:
                f.first = seen
            return
        end = seen.find(b"\r\n\r\n")
        if not seen[:1].isalpha() or (end < 0 and len(seen) > _MAX_HEAD):
            self._decide(f, _Kind.OTHER, out)
        elif end < 0:
            f.first = seen
        elif not _UPGRADE.search(seen, 0, end + 2):
            self._decide(f, _Kind.OTHER, out)
        else:
            f.kind, f.first, f.probe = _Kind.UPGRADING, b"", connection()
            self._upgrading[f.open.flow] = (f, self._clock + UPGRADE_WAIT)
            for action in f.held:
                self._probe(f, action, out)
                if f.kind is not _Kind.UPGRADING:
                    return

    def _probe(self, f: _Flow, action: Action, out: list[H2Command]) -> None:
        """An upgrade request's connection: decide once what follows it tells whether the server took it."""
        assert f.probe is not None
        client, server = f.probe
        if isinstance(action, Send):
            client.feed(action.data)
            f.probe_bytes += len(action.data)
        elif isinstance(action, Reply):
            server.feed(action.data)
        accepted = server.upgraded  # production answered 101 (seen only when its bytes are followed)
        if server.state is State.NOT_H2 or client.state is State.NOT_H2:
            # Declined (an HTTP/1.1 answer), or the client went on in HTTP/1.1: never HTTP/2.
            self._decide(f, _Kind.OTHER, out)
        elif client.state in (State.FRAMES, State.BROKEN):
            self._decide(f, _Kind.H2, out)  # its preface came after the request: only a 101 lets it send one
        elif isinstance(action, (Close, Abort)) or f.probe_bytes > _MAX_UPGRADE_HOLD:
            self._decide(f, _Kind.H2 if accepted else _Kind.OTHER, out)

    def _upgrade_decided(self, f: _Flow, out: list[H2Command]) -> None:
        """Waited long enough (or the run ends): HTTP/2 only if production's 101 was seen."""
        accepted = f.probe is not None and f.probe[1].upgraded
        self._decide(f, _Kind.H2 if accepted else _Kind.OTHER, out)

    def _decide(self, f: _Flow, kind: _Kind, out: list[H2Command]) -> None:
        f.kind, f.first, f.probe = kind, b"", None
        self._upgrading.pop(f.open.flow, None)
        held, f.held = f.held, []
        if kind is _Kind.OTHER:
            out.append(f.open)
            out += held
            if held and isinstance(held[-1], (Close, Abort)):
                del self._flows[f.open.flow]
            return
        stats = self.stats
        stats.connections += 1
        f.prod = Exchanges(max_body=1 << 20 if self.comparing else 0)
        if self.options.record:
            f.local = Exchanges(max_body=1 << 20 if self.comparing else 0)
        if not self._sampled(f.open.flow):
            f.dropped = True
            stats.sampled_out_connections += 1
        elif self._reoriginate:
            f.origin = _Origin()
        else:
            out.append(Direct(f.open))
        for action in held:
            self._h2_action(f, action, out)
        if f.prod.client.upgraded:
            stats.upgraded += 1

    # -- an HTTP/2 connection's actions -------------------------------------------------------------------------

    def _h2_action(self, f: _Flow, action: Action, out: list[H2Command]) -> None:
        prod = f.prod
        assert prod is not None
        if isinstance(action, Reply):
            if self.comparing:
                for ex in prod.server_bytes(action.data, action.ts):
                    self._prod_exchange(f, ex, out)
            return
        if isinstance(action, Send):
            before = prod.client.state
            frames, done = prod.client_frames(action.data, action.ts, assemble=self.comparing)
            if prod.client.state is State.BROKEN and before is not State.BROKEN:
                self.stats.undecodable += 1
            self._client_frames(f, frames, action, out)
            for ex in done:
                self._prod_exchange(f, ex, out)
            if f.dropped or f.origin is not None:
                return
            out.append(Direct(action))
            self._local_sent(f, action.data, out)
            return
        if isinstance(action, (Close, Abort)):
            f.ended = True
            if f.dropped:
                out.append(Suppressed(action.flow))
                self._forget(f)
                return
            o = f.origin
            if o is None:
                out.append(Direct(action))
                return
            if not o.opened:
                out.append(Suppressed(action.flow))
                self._forget(f)
            elif isinstance(action, Abort) and action.reason is not AbortReason.RESET:
                out.append(Direct(action))  # bytes were lost: the local side must not see a clean end
            else:
                # A clean end, or the client's reset once it had its answers (a client closing with unread bytes
                # resets): either waits until the local server has answered the streams sent, then goes as it came.
                o.end = action
                o.close_at = self._clock
                self._closing[f.open.flow] = f
                self._maybe_finish(f, out)
            return
        # Turn: a re-originated connection is paced by its own streams and windows, not by the captured turns.
        if f.origin is None and not f.dropped:
            out.append(Direct(action))

    def _client_frames(self, f: _Flow, frames: list[Frame2], action: Send, out: list[H2Command]) -> None:
        o = f.origin
        for fr in frames:
            if fr.kind is Kind.HEADERS:
                if fr.stream > f.highest:
                    f.highest = fr.stream
                    self._new_stream(f, fr.stream, fr.headers or [], fr.end_stream, action.ts, out)
                elif o is not None and f.fates.get(fr.stream) is Fate.FORWARDED:
                    self._o_trailers(f, fr.stream, fr.headers or [])
            elif fr.kind is Kind.DATA and o is not None and f.fates.get(fr.stream) is Fate.FORWARDED:
                self._o_data(f, fr.stream, fr.data, fr.end_stream)
            elif fr.kind is Kind.RESET and o is not None and f.fates.get(fr.stream) is Fate.FORWARDED:
                self._o_reset(f, fr.stream, fr.code)
        if o is not None:
            self._o_flush(f, out)

    def _new_stream(self, f: _Flow, stream: int, headers: Headers, end: bool, ts: float,
                    out: list[H2Command]) -> None:
        stats = self.stats
        stats.streams += 1
        hdr = dict(headers)
        grpc_method = hdr.get(":path", "").lstrip("/") if is_grpc(hdr.get("content-type")) else None
        if grpc_method is not None:
            stats.grpc_calls += 1
            # Bounded: a capture with endless distinct paths must not grow the summary without end.
            key = grpc_method if grpc_method in stats.grpc_methods or len(stats.grpc_methods) < _MAX_METHODS \
                else "(other methods)"
            stats.grpc_methods[key] += 1
        o = f.origin
        if f.dropped:
            fate = Fate.SAMPLED_OUT
        elif o is None:
            fate = Fate.FORWARDED
        elif not self._matches(headers, grpc_method):
            fate = Fate.FILTERED
        elif not self._take():
            fate = Fate.RATE_LIMITED
        elif o.gone:
            fate = Fate.REFUSED
        else:
            fate = Fate.FORWARDED
        seen = StreamSeen(f.open.flow, stream, hdr.get(":method", ""), hdr.get(":path", ""),
                          hdr.get(":authority", hdr.get("host")), grpc_method, fate, ts)
        if fate is Fate.FORWARDED:
            stats.forwarded += 1
            if o is None and not self.options.record:
                # Passed on as captured and nothing reads the answer: reported now, nothing kept per stream.
                out += [seen, StreamDone(f.open.flow, stream, None, None, self._clock, seen)]
                return
            # Only forwarded streams are kept (until reported done): others are told apart by their absence.
            while len(f.fates) >= MAX_WAITING_STREAMS:
                self._abandon(f, next(iter(f.fates)), out)  # the oldest (fates keeps arrival order)
            f.fates[stream] = fate
            f.seen[stream] = seen
            f.sent_at[stream] = self._clock
            if o is not None:
                self._o_start(f, stream, self._rewrite(headers), end)
                if stream not in f.fates:  # refused on the way (headers HTTP/2 forbids)
                    seen = StreamSeen(seen.flow, stream, seen.method, seen.path, seen.authority, grpc_method,
                                      Fate.REFUSED, ts)
        elif fate is Fate.FILTERED:
            stats.filtered += 1
        elif fate is Fate.RATE_LIMITED:
            stats.rate_limited += 1
        elif fate is Fate.REFUSED:
            stats.refused += 1
        out.append(seen)

    # -- the re-originated connection ---------------------------------------------------------------------------

    def _o_start(self, f: _Flow, stream: int, headers: Headers, end: bool, queued: bool = False) -> None:
        o = f.origin
        assert o is not None
        limit = o.conn.remote_settings.max_concurrent_streams
        # Before its SETTINGS, or over its limit: wait, in order, behind any stream already waiting.
        if not o.settled or (o.waiting and not queued) or (limit is not None and len(o.open) >= limit):
            o.waiting.append((stream, headers, end))
            o.queued[stream] = (bytearray(), end)
            return
        if o.gone:
            self._refuse(f, stream)
            return
        local = o.conn.get_next_available_stream_id()
        try:
            o.conn.send_headers(local, headers, end_stream=end)
        except (h2.exceptions.ProtocolError, ValueError, TypeError):
            # Captured headers HTTP/2 itself forbids (or a connection already closing): never sent, say so.
            self._refuse(f, stream)
            return
        o.ids[stream], o.back[local] = local, stream
        o.open.add(local)
        o.sent[local] = _Sent(stream, headers, end)

    def _abandon(self, f: _Flow, stream: int, out: list[H2Command]) -> None:
        """Stop waiting for a stream's answers: reported with what is known, forgotten everywhere, counted. A
        stream re-originated and still open is reset locally (CANCEL), so the local server may let it go too."""
        fate = f.fates.pop(stream)
        seen = f.seen.pop(stream, None)
        sent_at = f.sent_at.pop(stream, self._clock)
        prod, local = f.prod_done.pop(stream, None), f.local_done.pop(stream, None)
        key: int | None = stream
        o = f.origin
        if o is not None:
            o.trailers.pop(stream, None)
            if stream in o.queued:
                del o.queued[stream]
                o.waiting = deque(w for w in o.waiting if w[0] != stream)
            key = o.ids.pop(stream, None)
            o.retries.pop(stream, None)
            if key is not None:
                o.sent.pop(key, None)
                o.back.pop(key, None)
                o.pending.pop(key, None)
                o.pending_end.discard(key)
                if key in o.open:
                    o.open.discard(key)
                    with contextlib.suppress(h2.exceptions.ProtocolError):
                        o.conn.reset_stream(key, h2.errors.ErrorCodes.CANCEL)
        if f.local is not None and key is not None:
            f.local.forget(key)
        if f.prod is not None:
            f.prod.forget(stream)
        self.stats.abandoned += 1
        if fate is Fate.FORWARDED and seen is not None:
            out.append(StreamDone(f.open.flow, stream, prod, local, sent_at, seen))

    def _refuse(self, f: _Flow, stream: int) -> None:
        if f.fates.pop(stream, None) is Fate.FORWARDED:
            self.stats.forwarded -= 1
            self.stats.refused += 1
            f.sent_at.pop(stream, None)
            f.seen.pop(stream, None)

    def _o_data(self, f: _Flow, stream: int, data: bytes, end: bool) -> None:
        o = f.origin
        assert o is not None
        if stream in o.queued:
            buf, _ = o.queued[stream]
            buf += data
            o.queued[stream] = (buf, end)
            return
        local = o.ids.get(stream)
        if local is None or local not in o.open:
            return
        o.pending.setdefault(local, bytearray()).extend(data)
        if end:
            o.pending_end.add(local)
        sent = o.sent.get(local)
        if sent is not None:
            if len(sent.data) + len(data) > RETRY_KEEP:
                del o.sent[local]  # too large to keep twice: not sent again if refused
            else:
                sent.data += data
                sent.ended = sent.ended or end

    def _o_trailers(self, f: _Flow, stream: int, headers: Headers) -> None:
        """The client's trailers end its stream: after its DATA, which may still wait for a window or a start."""
        o = f.origin
        assert o is not None
        o.trailers[stream] = headers
        local = o.ids.get(stream)
        if local is not None and not o.pending.get(local):
            self._o_send_trailers(o, local)

    @staticmethod
    def _o_send_trailers(o: _Origin, local: int) -> None:
        stream = o.back.get(local)
        headers = o.trailers.pop(stream, None) if stream is not None else None
        if headers is None or local not in o.open:
            return
        o.pending_end.discard(local)
        sent = o.sent.get(local)
        if sent is not None:
            sent.trailers = headers
        try:
            o.conn.send_headers(local, headers, end_stream=True)
        except (h2.exceptions.ProtocolError, ValueError, TypeError):
            with contextlib.suppress(h2.exceptions.ProtocolError):
                o.conn.end_stream(local)  # trailers HTTP/2 forbids: the stream still ends

    def _o_reset(self, f: _Flow, stream: int, code: int) -> None:
        o = f.origin
        assert o is not None
        if stream in o.queued:
            del o.queued[stream]
            o.waiting = deque(w for w in o.waiting if w[0] != stream)
            return
        local = o.ids.get(stream)
        if local is not None and local in o.open:
            o.pending.pop(local, None)
            o.pending_end.discard(local)
            try:
                o.conn.reset_stream(local, code)
            except h2.exceptions.StreamClosedError:
                pass

    def _o_flush(self, f: _Flow, out: list[H2Command]) -> None:
        """Start waiting streams the local limit allows, send what the windows allow; hand the bytes on."""
        o = f.origin
        assert o is not None
        conn = o.conn
        if not o.gone and o.settled:
            limit = conn.remote_settings.max_concurrent_streams
            while o.waiting and (limit is None or len(o.open) < limit):
                stream, headers, end = o.waiting.popleft()
                buf, ended = o.queued.pop(stream)
                self._o_start(f, stream, headers, end, queued=True)
                if buf or (ended and not end):
                    self._o_data(f, stream, bytes(buf), ended)
                local = o.ids.get(stream)
                if local is not None and stream in o.trailers and not o.pending.get(local):
                    self._o_send_trailers(o, local)
        for local in list(o.pending):
            buf = o.pending[local]
            if local not in o.open:
                del o.pending[local]
                o.pending_end.discard(local)
                continue
            while buf:
                window = min(conn.local_flow_control_window(local), conn.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = bytes(buf[:window])
                del buf[:window]
                last = not buf and local in o.pending_end
                conn.send_data(local, chunk, end_stream=last)
                if last:
                    o.pending_end.discard(local)
            if not buf:
                del o.pending[local]
                self._o_send_trailers(o, local)
        for local in list(o.pending_end):
            if local not in o.pending:
                o.pending_end.discard(local)
                if local in o.open:
                    try:
                        conn.end_stream(local)
                    except h2.exceptions.StreamClosedError:
                        pass
        if not o.opened and not o.ids and not o.waiting:
            return  # nothing matched yet: the connection is not opened at all (its bytes wait in the buffer)
        data = conn.data_to_send()
        if data:
            if not o.opened:
                o.opened = True
                out.append(Direct(f.open))
            send = Send(f.open.flow, data, self._clock)
            out.append(Direct(send))
            self._local_sent(f, data, out)

    def _o_retry(self, f: _Flow, local: int) -> bool:
        """The local server refused a stream it did not process: queue it again, first in line, as it was sent.
        False when it cannot be (too large to have been kept, refused too often, the connection going away)."""
        o = f.origin
        assert o is not None
        sent = o.sent.pop(local, None)
        if sent is None or o.gone or o.back.get(local) != sent.stream:
            return False
        tries = o.retries.get(sent.stream, 0)
        if tries >= MAX_RETRIES:
            return False
        o.retries[sent.stream] = tries + 1
        stream = sent.stream
        del o.back[local], o.ids[stream]
        o.open.discard(local)
        o.pending.pop(local, None)
        o.pending_end.discard(local)
        if f.local is not None:
            f.local.forget(local)
        if sent.trailers is not None:
            o.trailers[stream] = sent.trailers
        o.waiting.appendleft((stream, sent.headers, sent.end))
        o.queued[stream] = (sent.data, sent.ended)
        self.stats.retried += 1
        return True

    def _o_done(self, f: _Flow, local: int, out: list[H2Command]) -> None:
        """Not recording: a stream the local server ended is reported now and forgotten."""
        o = f.origin
        assert o is not None
        stream = o.back.pop(local, None)
        if stream is None:
            return
        o.ids.pop(stream, None)
        if f.fates.pop(stream, None) is Fate.FORWARDED and stream in f.seen:
            out.append(StreamDone(f.open.flow, stream, None, None, f.sent_at.pop(stream, self._clock),
                                  f.seen.pop(stream)))

    def _maybe_finish(self, f: _Flow, out: list[H2Command]) -> None:
        o = f.origin
        if o is not None and o.close_at is not None and not o.open and not o.waiting:
            self._finish_origin(f, out)

    def _finish_origin(self, f: _Flow, out: list[H2Command]) -> None:
        o = f.origin
        assert o is not None
        o.close_at = None
        self._closing.pop(f.open.flow, None)
        end = o.end if o.end is not None else Close(f.open.flow, self._clock)
        if not o.gone and isinstance(end, Close):
            try:
                o.conn.close_connection()
            except h2.exceptions.ProtocolError:
                pass
            self._o_flush(f, out)
        if o.opened:
            out.append(Direct(end))
        else:
            out.append(Suppressed(f.open.flow))
            self._forget(f)

    # -- the local side -----------------------------------------------------------------------------------------

    def _local_sent(self, f: _Flow, data: bytes, out: list[H2Command]) -> None:
        if f.local is not None:
            for ex in f.local.client_bytes(data, self._clock):
                self._local_exchange(f, ex, out)

    def _local(self, f: _Flow, data: bytes, at: float, out: list[H2Command]) -> None:
        o = f.origin
        if o is not None:
            try:
                events = o.conn.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                out.append(GiveUp(f.open.flow, f"the local service broke HTTP/2: {exc}"))
                self._local_over(f, out, forget=True)
                return
            for ev in events:
                if isinstance(ev, h2.events.RemoteSettingsChanged):
                    o.settled = True
                if isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length:
                    o.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                if isinstance(ev, h2.events.ResponseReceived):
                    sent = o.sent.pop(ev.stream_id, None)  # answered: it can no longer be refused
                    if sent is not None:
                        o.retries.pop(sent.stream, None)
                elif (isinstance(ev, h2.events.StreamReset) and ev.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                      and self._o_retry(f, ev.stream_id)):
                    continue
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                    o.open.discard(ev.stream_id)
                    o.sent.pop(ev.stream_id, None)
                    if not self.options.record:
                        self._o_done(f, ev.stream_id, out)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    o.gone = True
                    last = ev.last_stream_id or 0
                    # Streams the local server will not process: refused, and waiting ones never go.
                    for local in [s for s in o.open if s > last]:
                        o.open.discard(local)
                    for stream, _, _ in o.waiting:
                        self._refuse(f, stream)
                    o.waiting.clear()
                    o.queued.clear()
            self._o_flush(f, out)
        if f.local is not None:
            for ex in f.local.server_bytes(data, at):
                self._local_exchange(f, ex, out)
        if o is not None:
            self._maybe_finish(f, out)

    def _local_exchange(self, f: _Flow, ex: Exchange, out: list[H2Command]) -> None:
        o = f.origin
        stream = o.back.get(ex.stream) if o is not None else ex.stream
        if stream is None or f.fates.get(stream) is not Fate.FORWARDED:
            return
        f.local_done[stream] = ex
        self._pair(f, stream, out)

    def _prod_exchange(self, f: _Flow, ex: Exchange, out: list[H2Command]) -> None:
        if f.fates.get(ex.stream) is Fate.FORWARDED:
            f.prod_done[ex.stream] = ex
            self._pair(f, ex.stream, out)

    def _pair(self, f: _Flow, stream: int, out: list[H2Command]) -> None:
        local = f.local_done.get(stream)
        prod = f.prod_done.get(stream)
        if local is None or (self.comparing and prod is None):
            return
        del f.local_done[stream]
        f.prod_done.pop(stream, None)
        del f.fates[stream]  # reported once; a connection's state stays bounded by its open streams
        o = f.origin
        if o is not None:
            local_id = o.ids.pop(stream, None)
            o.retries.pop(stream, None)
            if local_id is not None:
                o.back.pop(local_id, None)
                o.sent.pop(local_id, None)
        out.append(StreamDone(f.open.flow, stream, prod, local, f.sent_at.pop(stream, self._clock),
                              f.seen.pop(stream)))

    def _local_over(self, f: _Flow, out: list[H2Command], forget: bool) -> None:
        """The local side closed, or delivery is over: answers still missing will not come."""
        o = f.origin
        if o is not None and o.close_at is not None:
            o.open.clear()
            o.waiting.clear()
            self._finish_origin(f, out)
        if forget or f.ended:
            self._emit_missing(f, out)
            self._forget(f)

    def _emit_missing(self, f: _Flow, out: list[H2Command]) -> None:
        if f.local is not None:
            for ex in f.local.pending():
                self._local_exchange(f, ex, out)
        if f.prod is not None and self.comparing:
            for ex in f.prod.pending():
                self._prod_exchange(f, ex, out)
        for stream, fate in sorted(f.fates.items()):
            if fate is Fate.FORWARDED and stream in f.seen:
                out.append(StreamDone(f.open.flow, stream, f.prod_done.get(stream), f.local_done.get(stream),
                                      f.sent_at.get(stream, self._clock), f.seen[stream]))
        f.fates.clear()
        f.seen.clear()
        f.prod_done.clear()
        f.local_done.clear()

    def _forget(self, f: _Flow) -> None:
        self._flows.pop(f.open.flow, None)
        self._closing.pop(f.open.flow, None)
        self._upgrading.pop(f.open.flow, None)

    # -- decisions ----------------------------------------------------------------------------------------------

    def _sampled(self, flow: int) -> bool:
        sample = self.options.sample
        if sample >= 1.0:
            return True
        if sample <= 0.0:
            return False
        # The same verdict as the HTTP/1.x layer's for the same flow and seed.
        digest = hashlib.blake2b(f"{self.options.seed}/{flow}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") < sample * 2.0**64

    def _matches(self, headers: Headers, grpc_method: str | None) -> bool:
        hdr = dict(headers)
        if self._methods and hdr.get(":method", "").upper() not in self._methods:
            return False
        if self._paths and not all(p.search(hdr.get(":path", "")) for p in self._paths):
            return False
        for name, pattern in self._headers:
            if not any(n == name and pattern.search(v) for n, v in headers):
                return False
        if self._grpc:
            if grpc_method is None:
                return False
            service = grpc_method.rsplit("/", 1)[0]
            if not any(p.fullmatch(grpc_method) or p.fullmatch(service) for p in self._grpc):
                return False
        return True

    def _take(self) -> bool:
        if self._rate is None:
            return True
        if self._admit is not None:
            return self._admit()
        now = self._clock
        if self._last_take is not None:
            self._tokens = min(max(1.0, self._rate), self._tokens + max(0.0, now - self._last_take) * self._rate)
        self._last_take = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _rewrite(self, headers: Headers) -> Headers:
        out = [(n, v) for n, v in headers if n not in _HOP]
        if self.options.rewrite_host is not None:
            out = [(n, self.options.rewrite_host if n == ":authority" else v) for n, v in out if n != "host"]
            if not any(n == ":authority" for n, _ in out):
                out.insert(1, (":authority", self.options.rewrite_host))
        for name, value in self._set:
            at = [i for i, (n, _) in enumerate(out) if n == name]
            if at:
                out[at[0]] = (name, value)
                for i in reversed(at[1:]):
                    del out[i]
            else:
                out.append((name, value))
        return out


_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
