"""Turn-taking, sans-I/O: deliver each connection as its captured client did, waiting for the local answers.

It sits between the flow table (with FlowConfig.turns) and delivery. The flow table marks, with a `Turn`, the
client bytes (or the FIN/RST) that were sent only after production had answered. This layer holds whatever
follows a Turn until the local service has answered too:

* HTTP/1.x (told by the request parser, in byte mode too): every request delivered so far has a complete
  response from the local service.
* HTTP/2 (told by the client's connection preface): the local service has ended every stream that production's
  answer ended (the flow table reads them from the captured frames: `Turn.answer_streams`), and then has sent,
  in all, as many bytes as production had by the end of this turn, or fell quiet. A multiplexed server answers
  one turn's requests during the next, and its SETTINGS, ACKs, PINGs and WINDOW_UPDATEs come and go with timing,
  so neither the bytes after a turn nor a byte count alone tell its answer: the local server often answers the
  client's SETTINGS ACK before the client sent it, and sends PINGs production did not. Where production's frames
  are unknown (a gap in its bytes), every stream the client has finished sending must be ended instead.
* Anything else: the local service sent bytes since the client's last ones, and either as many as production
  did or then fell quiet for `quiet` seconds (or for as long as production took to answer, up to a second: a
  slow handler behind a quick acknowledgement is not over yet).

Bytes the captured client sent without waiting (a pipelining client) go out together, as captured. Every wait is
bounded by `max(floor, factor x production's answer time)`, counted from when the client's previous bytes went
out. A turn that times out is unanswered and the connection stops waiting: from then on it goes at the
capture's pace, so a service that never answers (a sink) costs one limit per connection, all of them at once.

Events in: the flow table's actions (Open, Send, Close, Abort, Turn; Reply passes through), `LocalData`,
`LocalClosed`, `Delivered` (the delivery of a flow is over), `DeliveryFailed` and `Tick(now)`. Commands out:
the actions for delivery, in order, and `GiveUp` for a flow that holds more than `max_held` bytes. Time only
comes in with events, so a test is a list of events in and the exact commands out.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

from .h2frames import PREFACE, StreamEnds
from .httpresponse import ResponseParser
from .httpsplit import Kind, Splitter
from .model import (
    Abort,
    AbortReason,
    Action,
    Close,
    Delivered,
    DeliveryFailed,
    GiveUp,
    LocalClosed,
    LocalData,
    Open,
    Send,
    Tick,
    Turn,
)

# Samples kept for the answer-time percentiles: enough for stable p99s, bounded for endless live runs.
_MAX_SAMPLES = 50_000
_MAX_LOCAL_ENDED = 65_536


@dataclass(frozen=True, slots=True)
class TurnOptions:
    floor: float = 1.0  # --answer-timeout: the least time a turn waits for the local answer
    factor: float = 10.0  # ... and this many times production's own answer time, when that is longer
    quiet: float = 0.02  # not HTTP: an answer shorter than production's is over after this much silence

    def silence(self, production: float) -> float:
        """How long a local service must be quiet before a short answer counts as whole."""
        return max(self.quiet, min(production, 1.0))
    max_held: int = 8 << 20  # bytes held for one connection; beyond it the connection is given up

    def limit(self, production: float) -> float:
        # A long poll that took production minutes gets its own time and one more minute, not ten times it.
        return max(self.floor, min(self.factor * production, production + 60.0))


Event = Action | LocalData | LocalClosed | Delivered | DeliveryFailed | Tick


Command = Action | GiveUp


# ---- what the layer counts ----------------------------------------------------------------------------------


@dataclass
class TurnStats:
    turns: int = 0  # turns the capture showed (client bytes or ends that waited for production's answer)
    answered: int = 0  # ... the local service answered within the limit
    unanswered: int = 0  # ... it did not (the limit passed, or it closed first): delivery went on
    not_waited: int = 0  # ... on a connection that had stopped waiting after an unanswered turn
    requests: int = 0  # HTTP/1.x requests delivered whole
    requests_answered: int = 0  # ... with a complete response from the local service
    closed_early: int = 0  # connections the local service closed while a request or turn was open
    local_times: list[float] = field(default_factory=list)  # seconds: local answer time per answered turn
    production_times: list[float] = field(default_factory=list)  # seconds: production's, same turns

    @property
    def requests_unanswered(self) -> int:
        return self.requests - self.requests_answered


class _Proto(enum.Enum):
    UNKNOWN = "unknown"  # no client byte delivered yet
    HTTP = "http"
    H2 = "h2"
    OPAQUE = "opaque"


@dataclass(eq=False, slots=True)
class _H2State:
    """Which streams the client has finished sending and the local service has not yet ended."""

    client: StreamEnds = field(default_factory=StreamEnds)
    local: StreamEnds = field(default_factory=StreamEnds)
    waiting: set[int] = field(default_factory=set)  # client ended, local not yet
    ended_first: set[int] = field(default_factory=set)  # local ended before the client did (an early error)
    # Streams the local service ended that no answered turn has asked for yet (insertion-ordered, bounded).
    local_ended: dict[int, None] = field(default_factory=dict)

    def client_sent(self, data: bytes) -> None:
        for stream in self.client.feed(data):
            if stream in self.ended_first:
                self.ended_first.discard(stream)
            else:
                self.waiting.add(stream)

    def local_sent(self, data: bytes) -> None:
        for stream in self.local.feed(data):
            if stream in self.waiting:
                self.waiting.discard(stream)
            else:
                self.ended_first.add(stream)
            self.local_ended[stream] = None
            if len(self.local_ended) > _MAX_LOCAL_ENDED:  # ended streams production never answered in a turn
                del self.local_ended[next(iter(self.local_ended))]

    def ended_all(self, streams: tuple[int, ...]) -> bool:
        ended = self.local_ended
        return all(s in ended for s in streams)

    def forget(self, streams: tuple[int, ...]) -> None:
        for s in streams:
            self.local_ended.pop(s, None)


@dataclass(eq=False, slots=True)
class _Conn:
    flow: int
    partial: bool
    held: deque[Action] = field(default_factory=deque)
    held_bytes: int = 0
    proto: _Proto = _Proto.UNKNOWN
    splitter: Splitter | None = None
    parser: ResponseParser | None = None
    h2: _H2State | None = None
    first: bytes = b""  # the client's first bytes while they may still be the HTTP/2 preface
    requests: int = 0  # whole HTTP requests delivered
    responses: int = 0  # complete local responses
    released_at: float = 0.0  # when the client's latest bytes went out (or the connection opened)
    local_bytes: int = 0  # local bytes since then
    # All the local service's bytes, and production's answers of the turns already past: a multiplexed protocol
    # (HTTP/2) answers one turn's requests during the next, so a turn is whole when the totals are, too.
    local_total: int = 0
    production_total: int = 0
    local_at: float = 0.0  # when the latest local byte came
    stopped_waiting: bool = False  # a turn went unanswered: the rest goes at the capture's pace
    local_closed: bool = False
    ended: bool = False  # its Close or Abort went out
    deadline: float | None = None  # the head Turn's limit (or its quiet check), while waiting
    token: int = 0


class TurnTaker:
    """One run's turn-taking; see the module doc. Feed every event to `handle`, execute the commands in order."""

    def __init__(self, options: TurnOptions | None = None) -> None:
        self.options = options if options is not None else TurnOptions()
        self._conns: dict[int, _Conn] = {}
        self._timers: list[tuple[float, int, _Conn]] = []
        self._tokens = itertools.count(1)
        self._clock = 0.0  # the latest time an event told: actions carry capture time, not the clock
        self.stats = TurnStats()

    # -- the interface -------------------------------------------------------------------------------------

    def handle(self, event: Event) -> list[Command]:
        out: list[Command] = []
        self._one(event, out)
        return out

    def handle_all(self, events: list[Action]) -> list[Command]:
        """`handle` over a batch of flow-table actions: flows with nothing held pay one lookup per action."""
        out: list[Command] = []
        conns = self._conns
        for event in events:
            c = conns.get(event.flow)
            if c is not None and not c.held and type(event) is Send and (c.stopped_waiting or c.proto is _Proto.OPAQUE):
                # The common case of bytes between turns, when no request parser needs them: straight on.
                out.append(event)
                c.released_at = self._clock
                c.local_bytes = 0
                continue
            self._one(event, out)
        return out

    @property
    def holding(self) -> bool:
        """Some connection still holds actions (waiting for an answer)."""
        return any(c.held for c in self._conns.values())

    def next_deadline(self) -> float | None:
        timers = self._timers
        while timers and timers[0][2].token != timers[0][1]:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def flush(self) -> list[Command]:
        """Stop waiting anywhere (Ctrl-C, or the run's end): everything held goes out now, in order."""
        out: list[Command] = []
        for c in list(self._conns.values()):
            c.stopped_waiting = True
            self._pump(c, float("inf"), out)
        return out

    # -- events -------------------------------------------------------------------------------------------

    def _one(self, event: Event, out: list[Command]) -> None:
        kind = type(event)
        if kind is Tick:
            assert isinstance(event, Tick)
            self._tick(event.now, out)
            return
        if kind is Open:
            assert isinstance(event, Open)
            # A service that speaks first (a greeting) answers the connection itself: wait from now.
            self._conns[event.flow] = _Conn(event.flow, event.partial, released_at=self._clock)
            out.append(event)
            return
        c = self._conns.get(event.flow)  # type: ignore[union-attr]
        if kind is LocalData:
            assert isinstance(event, LocalData)
            if c is not None:
                self._local(c, event.data, event.at, out)
            return
        if kind is LocalClosed:
            assert isinstance(event, LocalClosed)
            if c is not None:
                self._closed(c, event.at, out)
            return
        if kind is Delivered or kind is DeliveryFailed:
            if c is not None:
                self._forget(c)
            return
        if c is None:  # a flow opened before turn-taking started, or already forgotten
            out.append(event)  # type: ignore[arg-type]
            return
        assert not isinstance(event, (LocalData, LocalClosed, Delivered, DeliveryFailed, Tick))
        if kind is Turn:
            self.stats.turns += 1
            if c.stopped_waiting or c.local_closed:
                self.stats.not_waited += 1
                return
        elif kind is Abort:
            assert isinstance(event, Abort)
            if event.reason is not AbortReason.RESET:
                # Lost bytes: nothing will be answered whole. What is held goes first, the reset right after.
                c.stopped_waiting = True
        elif kind is Send:
            assert isinstance(event, Send)
            c.held_bytes += len(event.data)
        c.held.append(event)
        self._pump(c, self._clock, out)
        if c.held_bytes > self.options.max_held and c.held:
            out.append(GiveUp(c.flow, f"more than {self.options.max_held} bytes held waiting for the local "
                                      "service's answers (--flow-buffer)"))
            self._forget(c)

    def _tick(self, now: float, out: list[Command]) -> None:
        self._clock = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, token, c = heapq.heappop(timers)
            if c.token == token:
                c.token = 0
                c.deadline = None
                self._pump(c, now, out)

    def _local(self, c: _Conn, data: bytes, at: float, out: list[Command]) -> None:
        self._clock = max(self._clock, at)
        if not data:
            return
        c.local_bytes += len(data)
        c.local_total += len(data)
        c.local_at = at
        parser = c.parser
        if parser is not None:
            done = len(parser.feed(data, at))
            if parser.error is not None:
                c.parser = None
                c.proto = _Proto.OPAQUE
            c.responses += done
            self.stats.requests_answered += done
        elif c.h2 is not None:
            c.h2.local_sent(data)
        if c.held and type(c.held[0]) is Turn:
            self._pump(c, at, out)

    def _closed(self, c: _Conn, at: float, out: list[Command]) -> None:
        self._clock = max(self._clock, at)
        if c.local_closed:
            return
        if c.parser is not None:
            done = len(c.parser.close(at))  # a response delimited by the close is whole now
            c.responses += done
            self.stats.requests_answered += done
            c.parser = None
        self._pump(c, at, out)  # a turn that the close answered goes as usual
        stats = self.stats
        head = c.held[0] if c.held else None
        # Not HTTP: bytes and then the close are an answer, however short.
        closing_answer = isinstance(head, Turn) and c.proto is not _Proto.HTTP and c.local_bytes > 0
        open_requests = c.proto is _Proto.HTTP and c.responses < c.requests
        if open_requests or (isinstance(head, Turn) and not closing_answer):
            stats.closed_early += 1
        if isinstance(head, Turn):
            c.held.popleft()
            c.production_total += head.answer_bytes
            if closing_answer:
                stats.answered += 1
            else:
                stats.unanswered += 1
        c.local_closed = True
        # Nothing more will be answered: what is held goes on as captured (delivery reports what it cannot send).
        self._pump(c, at, out)

    def _forget(self, c: _Conn) -> None:
        c.token = 0
        c.held.clear()
        c.parser = c.splitter = c.h2 = None
        self._conns.pop(c.flow, None)

    # -- releasing held actions ------------------------------------------------------------------------------

    def _pump(self, c: _Conn, now: float, out: list[Command]) -> None:
        held = c.held
        stats = self.stats
        while held:
            action = held[0]
            if type(action) is Turn:
                assert isinstance(action, Turn)
                if c.stopped_waiting or c.local_closed:
                    stats.not_waited += 1
                elif self._answered(c, action, now):
                    stats.answered += 1
                    if c.h2 is not None and action.answer_streams:
                        c.h2.forget(action.answer_streams)
                    if len(stats.local_times) < _MAX_SAMPLES:
                        stats.local_times.append(max(0.0, c.local_at - c.released_at))
                        stats.production_times.append(action.answer_time)
                else:
                    limit = c.released_at + self.options.limit(action.answer_time)
                    if now < limit:
                        wake = limit
                        quiet_from = self._quiet_from(c, action)
                        if quiet_from is not None:
                            wake = min(wake, quiet_from + self.options.silence(action.answer_time))
                        self._arm(c, max(wake, now))
                        return
                    stats.unanswered += 1
                    c.stopped_waiting = True
                    c.parser = c.splitter = c.h2 = None
                held.popleft()
                c.production_total += action.answer_bytes
                continue
            held.popleft()
            if type(action) is Send:
                assert isinstance(action, Send)
                c.held_bytes -= len(action.data)
                self._sent(c, action.data)
                c.released_at = now
                c.local_bytes = 0
            elif type(action) is Close or type(action) is Abort:
                c.ended = True
            out.append(action)
        if c.token:
            c.token = 0
            c.deadline = None

    def _arm(self, c: _Conn, when: float) -> None:
        if c.token and c.deadline == when:
            return
        c.token = next(self._tokens)
        c.deadline = when
        heapq.heappush(self._timers, (when, c.token, c))

    def _answered(self, c: _Conn, turn: Turn, now: float) -> bool:
        if c.proto is _Proto.HTTP:
            return c.local_bytes > 0 and c.responses >= c.requests
        h2 = c.h2
        if h2 is not None and turn.answer_streams and not h2.ended_all(turn.answer_streams):
            return False  # the streams production's answer ended are not all over here yet
        if c.local_total >= c.production_total + turn.answer_bytes and (
                h2 is not None or c.local_bytes >= turn.answer_bytes):
            return True
        # The same sum as the wake-up time in _pump: a timer that fires at it must find the turn answered.
        quiet_from = self._quiet_from(c, turn)
        return quiet_from is not None and now >= quiet_from + self.options.silence(turn.answer_time)

    @staticmethod
    def _quiet_from(c: _Conn, turn: Turn) -> float | None:
        """Since when a silent local service would have answered the turn; None while it must still speak."""
        if c.proto is _Proto.HTTP:
            return None
        h2 = c.h2
        if h2 is not None:
            # What is left once the streams are over (ACKs, WINDOW_UPDATEs) may already have come.
            # Production's frames unknown: every request the client finished must be answered.
            done = h2.ended_all(turn.answer_streams) if turn.answer_streams is not None else not h2.waiting
            return max(c.local_at, c.released_at) if done else None
        return c.local_at if c.local_bytes else None

    def _sent(self, c: _Conn, data: bytes) -> None:
        """Follow the client's requests in what goes out, so responses can be counted against them."""
        if c.proto is _Proto.OPAQUE or c.stopped_waiting or c.local_closed:
            return
        if c.proto is _Proto.H2:
            assert c.h2 is not None
            c.h2.client_sent(data)
            return
        if c.proto is _Proto.UNKNOWN:
            if c.partial:
                c.proto = _Proto.OPAQUE
                return
            seen = c.first + data
            n = min(len(seen), len(PREFACE))
            if seen[:n] == PREFACE[:n]:
                if n < len(PREFACE):
                    c.first = seen
                    return
                c.first = b""
                c.proto = _Proto.H2
                c.h2 = _H2State()
                c.h2.client_sent(seen[n:])
                return
            data, c.first = seen, b""
            c.proto = _Proto.HTTP
            c.splitter = Splitter(False)
            c.parser = ResponseParser(c.flow, max_body=0)
        splitter, parser = c.splitter, c.parser
        assert splitter is not None and parser is not None
        for piece in splitter.feed(data):
            if piece.kind is Kind.HEAD:
                request = piece.request
                assert request is not None
                upgrade = request.method == b"CONNECT" or any(n == b"upgrade" for n, _ in request.headers)
                parser.expect(request.method.decode("latin-1"), upgrade=upgrade)
            elif piece.end:
                c.requests += 1
                self.stats.requests += 1
            elif piece.kind in (Kind.NON_HTTP, Kind.BROKEN, Kind.TUNNEL):
                # Not (or no longer) HTTP/1.x: answers are told by bytes and silence from here on.
                c.proto = _Proto.OPAQUE
                c.splitter = c.parser = None
                return


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) by nearest rank; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


__all__ = [
    "Delivered", "DeliveryFailed", "GiveUp", "LocalClosed", "LocalData", "Tick", "TurnOptions", "TurnStats",
    "TurnTaker", "percentile",
]
