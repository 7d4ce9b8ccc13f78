"""The layers stacked, sans-I/O: captured segments and delivery's news in, commands for delivery out.

flow table -> TLS gate -> HTTP/2 layer -> HTTP layer -> shadow compare -> turn-taking -> delivery (HTTP/2
connections go from the HTTP/2 layer straight to turn-taking; their streams' records go to h2shadow). Each layer
takes events through `handle` (a batch through `handle_all`) and returns commands; this module only routes them:
actions go down to
the next layer, records (a flow ended, a request was seen, a flow held back as TLS, ...) go to the summary and
to the layers that pair them, and what delivery reports (a delivery finished or failed, the local service's
bytes) goes back up to the layers that wait for it. Nothing here reads a socket or a file; wall time comes from
the injected clock, capture time with the events. The engine (pipeline) feeds it and executes what it returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .h2layer import Direct, H2Command, H2Layer, H2Options, StreamDone, StreamSeen
from .h2shadow import H2Shadow, MessageDecoder
from .httpflow import HttpLayer
from .httpopts import HttpOptions
from .model import (
    PAYLOAD,
    Abort,
    Action,
    BrokenOff,
    Close,
    Delivered,
    DeliveryFailed,
    EndOfInput,
    FlowRecord,
    GiveUp,
    Interrupt,
    LocalClosed,
    LocalData,
    Open,
    Segment,
    Send,
    Suppressed,
    Tick,
    Turn,
)
from .reassemble import FlowConfig, FlowTable, TableCommand
from .replay import Delivery
from .shadow import Shadow, ShadowOptions
from .summary import CompareSummary, GrpcMethodSummary, H2Summary, HttpSummary, SummaryBuilder, TurnSummary
from .tlsgate import KubeletProbe, TlsFlow, TlsGate
from .turns import TurnOptions, TurnTaker, percentile

log = logging.getLogger(__name__)

# What delivery executes.
Command = Action | GiveUp


@dataclass
class StackOptions:
    flow: FlowConfig
    # HTTP mode (--http and what implies it); None: byte mode, where nothing below the flow table parses HTTP.
    http: ShadowOptions | None = None
    # Connections opening with a TLS ClientHello go to --to anyway (a local TLS server); else held back as tls.
    tls_passthrough: bool = False
    # Turn-taking (with FlowConfig.turns): how long a turn waits for the local answer.
    turns: TurnOptions | None = None
    target: str = ""  # --to, as the user wrote it: named in the one-off TLS notice


@dataclass(slots=True)
class DeliveryOver:
    """Delivery has drained: answers still missing will never come."""


def coalesce(actions: list[Action]) -> list[Action]:
    """Merge each flow's consecutive Sends into one, so a batch costs one send() per flow, not per segment.

    Only Sends with nothing else of the same flow between them merge; other flows' actions may sit between,
    since every flow has its own socket. The bytes and their order per flow stay exactly the same.
    """
    out: list[Action] = []
    open_send: dict[int, list[bytes]] = {}  # flow -> data parts of its latest Send, while nothing else came
    merged: list[tuple[int, list[bytes]]] = []
    for action in actions:
        if isinstance(action, Send):
            parts = open_send.get(action.flow)
            if parts is not None:
                parts.append(action.data)
                continue
            parts = [action.data]
            open_send[action.flow] = parts
            merged.append((len(out), parts))
        else:
            open_send.pop(action.flow, None)
        out.append(action)
    for index, parts in merged:
        if len(parts) > 1:
            first = out[index]
            out[index] = Send(first.flow, b"".join(parts), first.ts)
    return out


def _split_tail(commands: list[TableCommand] | list[object], kinds: tuple[type, ...]) -> int:
    """Where the trailing commands of these kinds start: layers put their records after their actions."""
    i = len(commands)
    while i and type(commands[i - 1]) in kinds:
        i -= 1
    return i


class Stack:
    """One run's layers, the routes between them, and their figures for the summary; see the module doc."""

    def __init__(self, options: StackOptions, builder: SummaryBuilder, clock: Callable[[], float],
                 notice: Callable[[str], None] | None = None, *, flow_buffer: int = 8 << 20) -> None:
        self.options = options
        self.builder = builder
        self._clock = clock
        self._notice = notice
        self.table = FlowTable(options.flow)
        self.tls = TlsGate(drop_tls=not options.tls_passthrough)
        self._tls_named = False
        self.http: HttpLayer | None = None
        self.shadow: Shadow | None = None
        self.h2: H2Layer | None = None
        self.h2shadow: H2Shadow | None = None
        if options.http is not None:
            self.http = HttpLayer(options.http.http, clock)
            self.shadow = Shadow(options.http, clock)
            h2opts = h2_options(options.http.http)
            # Local answers are decoded only when something reads them: --compare, or the request lines.
            h2opts.record = options.http.compare or options.http.request_lines
            self.h2 = H2Layer(h2opts, comparing=options.http.compare, clock=clock, admit=self.http.admit)
            descriptor = options.http.proto_descriptor
            self.h2shadow = H2Shadow(self.shadow, MessageDecoder(descriptor) if descriptor is not None else None)
        self.turns: TurnTaker | None = None
        if options.flow.turns:
            self.turns = TurnTaker(options.turns or TurnOptions(max_held=flow_buffer))
        # Checked once: logging per packet must cost nothing unless asked for.
        self._trace = log.isEnabledFor(logging.DEBUG)
        self._payload = log.isEnabledFor(PAYLOAD)

    @property
    def wants_local_data(self) -> bool:
        """Whether the local service's bytes matter to a layer (delivery need not report them otherwise)."""
        return self.turns is not None or self.shadow is not None

    # ---- events -----------------------------------------------------------------------------------------

    def segments(self, segments: Sequence[Segment], *, batch: bool = True) -> list[Command]:
        """Captured segments, in order. `batch`: one batch whose Sends may merge per flow (as fast as possible);
        else each segment's actions go down on their own, as paced delivery sends them."""
        trace = self._trace
        if batch:
            return self._down(self.table.handle_all(segments), merge=True, trace=trace)
        out: list[Command] = []
        for seg in segments:
            out += self._down(self.table.handle(seg), merge=False, trace=trace)
        return out

    def handle(self, event: Tick | Interrupt | EndOfInput | DeliveryFailed | Delivery | LocalData | LocalClosed
               | DeliveryOver) -> list[Command]:
        """Everything but segments: capture time (Tick), a gap (Interrupt), the end of input, and delivery's news."""
        kind = type(event)
        if kind is Tick or kind is Interrupt or kind is EndOfInput:
            return self._down(self.table.handle(event), merge=False, trace=False)  # type: ignore[arg-type]
        if kind is DeliveryFailed:
            assert isinstance(event, DeliveryFailed)
            self._records(self.table.handle(event))  # type: ignore[arg-type]
            if self.http is not None:
                self.http.handle(event)
            if self.turns is not None:
                self.turns.handle(event)
            if self.h2 is not None:
                self._h2_route(self.h2.handle(event))
            return []
        if kind is Delivery:
            assert isinstance(event, Delivery)
            self.builder.add_delivery(event)
            if self.turns is not None:
                self.turns.handle(Delivered(event.flow))
            if self.shadow is not None:
                self.shadow.handle(Delivered(event.flow))
            if self.h2 is not None:
                self._h2_route(self.h2.handle(Delivered(event.flow)))
            return []
        if kind is LocalData or kind is LocalClosed:
            assert isinstance(event, LocalData | LocalClosed)
            if self.shadow is not None:
                self.shadow.handle(event)
            out: list[Command] = []
            if self.h2 is not None:
                # An HTTP/2 connection of its own answers the local server (windows, SETTINGS, PING) at once.
                actions, gave_up = self._h2_route(self.h2.handle(event))
                out = self._through_turns(actions) if actions else []
                out += gave_up
            if self.turns is not None:
                out += self.turns.handle(event)
            return out
        if kind is DeliveryOver:
            if self.h2 is not None:
                self._h2_route(self.h2.handle(EndOfInput()))
            if self.shadow is not None:
                self.shadow.handle(EndOfInput())
            return []
        raise TypeError(f"the stack takes no {kind.__name__}")

    def tick(self) -> list[Command]:
        """Wall time passed: turns whose wait is over go on, HTTP/2 ends that waited long enough too."""
        out: list[Command] = []
        if self.h2 is not None and self.h2.holding:
            actions, gave_up = self._h2_out(self.h2.handle(Tick(self._clock())))
            out = self._through_turns(actions) if actions else []
            out += gave_up
        if self.turns is None:
            return out
        return out + self.turns.handle(Tick(self._clock()))

    def next_deadline(self) -> float | None:
        """When `tick` next has something to do (wall clock); None: not before the next event."""
        deadlines = [d for d in (self.turns.next_deadline() if self.turns is not None else None,
                                 self.h2.next_deadline() if self.h2 is not None else None) if d is not None]
        return min(deadlines) if deadlines else None

    @property
    def holding(self) -> bool:
        """Some connection still waits for the local answer before its next bytes (or its end)."""
        return (self.turns is not None and self.turns.holding) or (self.h2 is not None and self.h2.holding)

    def flush(self) -> list[Command]:
        """Stop waiting anywhere: everything held goes out now, in order."""
        out: list[Command] = []
        if self.h2 is not None:
            actions, gave_up = self._h2_out(self.h2.flush())
            out = self._through_turns(actions) if actions else []
            out += gave_up
        return out + (self.turns.flush() if self.turns is not None else [])

    # ---- figures -------------------------------------------------------------------------------------------

    def turn_summary(self) -> TurnSummary | None:
        """The layers' own figures for the summary (None: the layer is off)."""
        if self.turns is None:
            return None
        s = self.turns.stats

        def ms(values: list[float], q: float) -> float | None:
            p = percentile(values, q)
            return None if p is None else round(p * 1000, 3)

        return TurnSummary(
            turns=s.turns, answered=s.answered, unanswered=s.unanswered, not_waited=s.not_waited,
            requests=s.requests, requests_answered=s.requests_answered, requests_unanswered=s.requests_unanswered,
            closed_early=s.closed_early,
            local_p50_ms=ms(s.local_times, 50), local_p99_ms=ms(s.local_times, 99),
            production_p50_ms=ms(s.production_times, 50), production_p99_ms=ms(s.production_times, 99),
        )

    def h2_summary(self) -> H2Summary | None:
        h2, h2shadow = self.h2, self.h2shadow
        if h2 is None or h2shadow is None:
            return None
        s = h2.stats
        per = h2shadow.results.methods
        methods = {}
        for name, seen in s.grpc_methods.items():
            m = per.get(name)
            methods[name] = GrpcMethodSummary(seen=seen, forwarded=m.calls if m else 0, same=m.same if m else 0,
                                              different=m.different if m else 0, unpaired=m.unpaired if m else 0)
        return H2Summary(connections=s.connections, upgraded=s.upgraded, undecodable=s.undecodable,
                         streams=s.streams, grpc_calls=s.grpc_calls, forwarded=s.forwarded, filtered=s.filtered,
                         rate_limited=s.rate_limited, refused=s.refused, retried=s.retried,
                         sampled_out_connections=s.sampled_out_connections, abandoned=s.abandoned,
                         grpc_methods=methods)

    def http_summary(self) -> HttpSummary | None:
        if self.http is None:
            return None
        s = self.http.stats
        return HttpSummary(
            requests=s.requests, forwarded=s.forwarded, filtered=s.filtered, rate_limited=s.rate_limited,
            sampled_out_connections=s.sampled_out_connections, non_http_connections=s.non_http_connections,
            parse_errors=s.parse_errors,
        )

    def compare_summary(self) -> CompareSummary | None:
        sh = self.shadow
        if sh is None or not sh.comparing:
            return None
        return CompareSummary(same=sh.same, different=sh.different, unpaired=sh.unpaired)

    # ---- routes -----------------------------------------------------------------------------------------

    def _records(self, records: Sequence[object]) -> None:
        """FlowRecords: to the summary, which pairs each with its delivery, and to the shadow layer."""
        if records:
            self.builder.add_records(records)  # type: ignore[arg-type]
            if self.shadow is not None and self.shadow.comparing:
                self.shadow.handle_all(list(records))  # type: ignore[arg-type]

    def _down(self, commands: list[TableCommand], *, merge: bool, trace: bool) -> list[Command]:
        """The flow table's commands: its actions down through the layers, its records (last) to `_records`."""
        n = len(commands)
        i = _split_tail(commands, (FlowRecord,))
        actions: list[Action] = commands[:i] if i < n else commands  # type: ignore[assignment]
        out: list[Command] = []
        if actions:
            actions = self._through_tls(actions)
            if self.http is not None:
                assert self.h2 is not None
                # HTTP/2 connections first: they leave past the HTTP/1.x layer; the rest goes on to it, in order.
                rest: list[Action] = []
                direct, out = self._h2_route(self.h2.handle_all(actions), rest)
                # Before coalescing: the layer cuts requests at their own boundaries, whatever the segments.
                actions = self._through_http(rest) if rest else []
                if direct:
                    actions = direct + actions
            if trace:
                self._log_actions(actions)
            if merge:
                actions = coalesce(actions)
            out = self._through_turns(actions) + out
        if i < n:
            self._records(commands[i:])
        return out

    def _through_tls(self, actions: list[Action]) -> list[Action]:
        """Hold each new flow until its first bytes show whether it is TLS; TLS flows are not replayed."""
        out = self.tls.handle_all(actions, self.table.stats.flows)
        n = len(out)
        i = _split_tail(out, (TlsFlow, KubeletProbe))  # type: ignore[arg-type]
        if i == n:
            return out  # type: ignore[return-value]
        found: list[TlsFlow] = []
        probes = 0
        for c in out[i:]:
            if type(c) is TlsFlow:
                found.append(c)  # type: ignore[arg-type]
            else:
                probes += 1
        if probes:
            self.builder.add_probes(probes)
        if found:
            self.builder.add_tls([t.flow for t in found])  # before their records: the builder pairs them then
            for t in found:
                # Nothing more from the flow table, however long the connection lasts.
                self._records(self.table.handle(DeliveryFailed(t.flow)))
            if not self._tls_named:
                self._tls_named = True
                first = found[0]
                message = (f"{first.client} -> {first.server} opened with a TLS ClientHello: connections like it "
                           f"are not replayed to the plaintext --to {self.options.target} (counted as tls); mirror "
                           "the plaintext port (in a mesh, the sidecar's hop to the app), or pass --tls-passthrough "
                           "if --to is a TLS server")
                log.info("%s", message)
                if self._notice is not None:
                    self._notice(message)
        return out[:i]  # type: ignore[return-value]

    def _through_http(self, actions: list[Action]) -> list[Action]:
        """The HTTP layer's verdict on actions bound for delivery, then the shadow layer's (Replies end there)."""
        http, shadow = self.http, self.shadow
        assert http is not None and shadow is not None
        out = http.handle_all(actions)
        n = len(out)
        i = _split_tail(out, (Suppressed, BrokenOff))  # type: ignore[arg-type]
        if i < n:
            suppressed = [c.flow for c in out[i:] if type(c) is Suppressed]
            if suppressed:
                self.builder.add_suppressed(suppressed)
            aborted = [c.flow for c in out[i:] if type(c) is BrokenOff]
            if aborted:
                self.builder.add_aborted(aborted)
        # Actions and RequestRecords; then the suppressed flows: the local side of those is over already.
        return shadow.handle_all([*out[:i], *(c for c in out[i:] if type(c) is Suppressed)])  # type: ignore[list-item]

    def _h2_out(self, commands: list[H2Command]) -> tuple[list[Action], list[Command]]:
        """The HTTP/2 layer's commands outside a batch of captured actions (its waits over): a connection it
        decided is HTTP/1.x after all (a declined upgrade) goes through the HTTP/1.x layer, as in `_down`."""
        rest: list[Action] = []
        direct, gave_up = self._h2_route(commands, rest)
        if rest:
            direct += self._through_http(rest)
        return direct, gave_up

    def _h2_route(self, commands: list[H2Command], rest: list[Action] | None = None
                  ) -> tuple[list[Action], list[Command]]:
        """The HTTP/2 layer's commands: its own actions (Direct, unwrapped) and GiveUps for delivery; stream records
        to h2shadow, connections it never delivered to the summary; other connections' actions to `rest`."""
        direct: list[Action] = []
        gave_up: list[Command] = []
        for c in commands:
            kind = type(c)
            if kind is Direct:
                direct.append(c.action)  # type: ignore[union-attr]
            elif kind is StreamSeen or kind is StreamDone:
                assert self.h2shadow is not None
                self.h2shadow.record(c, self._clock())  # type: ignore[arg-type]
            elif kind is Suppressed:
                self.builder.add_suppressed([c.flow])  # type: ignore[union-attr]
            elif kind is GiveUp:
                gave_up.append(c)  # type: ignore[arg-type]
            elif rest is not None:
                rest.append(c)  # type: ignore[arg-type]
        return direct, gave_up

    def _through_turns(self, actions: list[Action]) -> list[Command]:
        turns = self.turns
        if turns is None:
            return actions  # type: ignore[return-value]
        out = turns.handle(Tick(self._clock()))
        out += turns.handle_all(actions)
        return out

    def _log_actions(self, actions: list[Action]) -> None:
        """-v=4: every flow's open and end; -v=9 also a preview of the bytes (secrets: never below 9)."""
        for a in actions:
            if isinstance(a, Open):
                log.debug("flow %d: open %s -> %s%s", a.flow, a.client, a.server, " (joined mid-stream)" * a.partial)
            elif isinstance(a, Close):
                log.debug("flow %d: client finished (FIN)", a.flow)
            elif isinstance(a, Abort):
                log.debug("flow %d: abort (%s)", a.flow, a.reason.value)
            elif isinstance(a, Turn):
                log.debug("flow %d: production answered %d bytes in %.1f ms: a turn", a.flow, a.answer_bytes,
                          a.answer_time * 1000)
            elif isinstance(a, Send) and self._payload:
                log.log(PAYLOAD, "flow %d: %d bytes %r", a.flow, len(a.data), a.data[:64])


def h2_options(http: HttpOptions) -> H2Options:
    """The HTTP/2 layer's share of HTTP mode's options: the same filters, rewrites, sample and rate, per stream."""
    return H2Options(match_method=http.match_method, match_path=http.match_path, match_header=http.match_header,
                     match_grpc=http.match_grpc, set_header=http.set_header, rewrite_host=http.rewrite_host,
                     sample=http.sample, max_rps=http.max_rps, seed=http.seed)


__all__ = ["Command", "DeliveryOver", "Stack", "StackOptions", "coalesce", "h2_options"]
