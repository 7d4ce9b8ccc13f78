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

The flags are `httpopts`, the splitting of bytes into requests `httpsplit`; the response side is
`httpresponse` (`ResponseParser`) and the comparison of two responses `httpdiff`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import h11

from .httpopts import HttpOptions
from .httpsplit import Kind, Piece, Splitter
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
    splitter: Splitter
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
                if piece.kind is Kind.HEAD:
                    assert piece.request is not None
                    self._record(st, action.flow, piece.request, action.ts, True)
                elif piece.kind is Kind.NON_HTTP or piece.kind is Kind.BROKEN:
                    self._count_failure(piece.kind)
                    st.dropped = True  # nothing more to learn from it
        elif type(action) is Open:
            self._flows[action.flow] = _FlowState(Splitter(action.partial), action, opened=True)
        elif type(action) is Close or type(action) is Abort:
            self._flows.pop(action.flow, None)

    # -- deciding ------------------------------------------------------------------------------------------

    def _open(self, action: Open, out: list[Action]) -> None:
        st = _FlowState(Splitter(action.partial), action)
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

    def _pieces(self, st: _FlowState, pieces: list[Piece], flow: int, ts: float, out: list[Action]) -> None:
        for piece in pieces:
            kind = piece.kind
            if kind is Kind.BODY or kind is Kind.TUNNEL:
                if st.forwarding:
                    self._send(st, flow, piece.raw, ts, out)
            elif kind is Kind.HEAD:
                assert piece.request is not None
                self._head(st, flow, piece, ts, out)
            elif kind is Kind.OPAQUE:
                if st.pass_rest:
                    self._send(st, flow, piece.raw, ts, out)
            elif kind is Kind.SKIP:
                self._stats.skipped_bytes += len(piece.raw)
            elif kind is Kind.TAIL:
                # A request head the client never finished: as captured when nothing filters, else never.
                if not self._filtering:
                    self._send(st, flow, piece.raw, ts, out)
            else:  # NON_HTTP or BROKEN
                self._count_failure(kind)
                if not self._filtering:
                    st.pass_rest = True
                    self._send(st, flow, piece.raw, ts, out)
                elif kind is Kind.BROKEN:
                    # Part of a request may already be out: only a RST tells the target it is not whole.
                    if st.opened:
                        # No AbortReason says "protocol error"; RESET is what the target sees happen.
                        out.append(Abort(flow, AbortReason.RESET, ts))
                    self._aborted.append(flow)
                    st.dropped = True
                    return
                # NON_HTTP with filters: it cannot match any; nothing of it goes out (the Open is still held).

    def _head(self, st: _FlowState, flow: int, piece: Piece, ts: float, out: list[Action]) -> None:
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

    def _count_failure(self, kind: Kind) -> None:
        if kind is Kind.NON_HTTP:
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
