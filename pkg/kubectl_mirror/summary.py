"""The run's result: counted as flows end, rendered for humans (stderr) or as stable JSON (--json)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from .errors import EXIT_DELIVERY, EXIT_OK, MirrorError
from .model import EndReason, FlowRecord, Outcome
from .replay import Delivery

# ---- the --json contract: add fields, never rename or remove them --------------------------------


class Connections(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seen: int = Field(default=0, ge=0)  # complete + incomplete + dropped + failed + skipped + tls
    complete: int = Field(default=0, ge=0)
    partial: int = Field(default=0, ge=0)  # joined mid-stream; also counted under its outcome
    incomplete: int = Field(default=0, ge=0)
    dropped: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    skipped: int = Field(default=0, ge=0)
    tls: int = Field(default=0, ge=0)  # opened with a TLS ClientHello: not replayed to a plaintext --to
    # Opened with a kubelet HTTP probe (User-Agent kube-probe/; in Istio also its agent's rewritten probes);
    # replayed like any connection and also counted under its outcome.
    probes: int = Field(default=0, ge=0)


class HttpSummary(BaseModel):
    """HTTP mode (--http and the options implying it): what happened to the requests the connections carried."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: int = Field(default=0, ge=0)  # request heads parsed: forwarded + filtered + rate_limited
    forwarded: int = Field(default=0, ge=0)  # sent to the local service
    filtered: int = Field(default=0, ge=0)  # did not match --match-*: not sent
    rate_limited: int = Field(default=0, ge=0)  # over --max-rps: held back, not sent
    sampled_out_connections: int = Field(default=0, ge=0)  # left out by --sample
    non_http_connections: int = Field(default=0, ge=0)  # not HTTP/1.x: passed on byte-exact (or left out by filters)
    parse_errors: int = Field(default=0, ge=0)  # connections whose HTTP broke off after a request started


class CompareSummary(BaseModel):
    """--compare: each forwarded request's production response (from the capture) against the local one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    same: int = Field(default=0, ge=0)
    different: int = Field(default=0, ge=0)
    # Forwarded requests with no pair: a side never answered, the capture lost production's bytes, or the
    # connection was joined mid-stream (its production responses cannot be told apart).
    unpaired: int = Field(default=0, ge=0)


class GrpcMethodSummary(BaseModel):
    """One gRPC method (`package.Service/Method`): calls forwarded, and with --compare how they compared."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seen: int = Field(default=0, ge=0)  # calls in the capture
    forwarded: int = Field(default=0, ge=0)
    same: int = Field(default=0, ge=0)
    different: int = Field(default=0, ge=0)
    unpaired: int = Field(default=0, ge=0)


class H2Summary(BaseModel):
    """HTTP mode: HTTP/2 connections (prior knowledge or h2c upgrade) and their streams; gRPC calls among them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connections: int = Field(default=0, ge=0)
    upgraded: int = Field(default=0, ge=0)  # ... by an HTTP/1.1 Upgrade: h2c
    undecodable: int = Field(default=0, ge=0)  # ... whose frames or header blocks stopped decoding
    streams: int = Field(default=0, ge=0)  # requests: forwarded + filtered + rate_limited + refused (+ sampled out)
    grpc_calls: int = Field(default=0, ge=0)
    forwarded: int = Field(default=0, ge=0)
    filtered: int = Field(default=0, ge=0)
    rate_limited: int = Field(default=0, ge=0)
    refused: int = Field(default=0, ge=0)  # the local server had sent GOAWAY, or rejected the captured headers
    retried: int = Field(default=0, ge=0)  # refused by the local server (REFUSED_STREAM) and sent again
    sampled_out_connections: int = Field(default=0, ge=0)
    # Forwarded streams reported unanswered early: too many newer ones waited for answers on their connection.
    abandoned: int = Field(default=0, ge=0)
    grpc_methods: dict[str, GrpcMethodSummary] = Field(default_factory=dict)


class TurnSummary(BaseModel):
    """Turn-taking (the default; not with --no-wait): whether the local service answered as production did.

    A turn is a point where the captured client waited for production's answer before it went on (sent more,
    or closed). Delivery waited there for the local service too, up to a limit (--answer-timeout).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    turns: int = Field(default=0, ge=0)  # answered + unanswered + not_waited
    answered: int = Field(default=0, ge=0)  # the local service answered within the limit
    unanswered: int = Field(default=0, ge=0)  # it did not (limit passed, or it closed first); delivery went on
    not_waited: int = Field(default=0, ge=0)  # on a connection that stopped waiting after an unanswered turn
    requests: int = Field(default=0, ge=0)  # HTTP/1.x requests delivered whole, on connections it followed
    requests_answered: int = Field(default=0, ge=0)  # ... with a complete response from the local service
    requests_unanswered: int = Field(default=0, ge=0)
    closed_early: int = Field(default=0, ge=0)  # connections the local service closed with a request still open
    # Answer times of the answered turns: the local service's (from our last byte to its answer) and
    # production's (the same, from the capture). None when no turn was answered.
    local_p50_ms: float | None = None
    local_p99_ms: float | None = None
    production_p50_ms: float | None = None
    production_p99_ms: float | None = None


class PodFigures(BaseModel):
    """Live runs: one pod mirrored during the run, in the order the run started on them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pod: str  # namespace/name
    packets: int = Field(default=0, ge=0)  # captured in this pod
    connections: int = Field(default=0, ge=0)  # to this pod's address, every outcome
    bytes_delivered: int = Field(default=0, ge=0)
    incomplete: int = Field(default=0, ge=0)


@dataclass
class ServerTally:
    """Per server address, inside the builder: live runs turn addresses into pods (one address per pod)."""

    connections: int = 0
    bytes_delivered: int = 0
    incomplete: int = 0


class Summary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str  # pcap path, "-" for stdin, or the pod (namespace/name)
    target: str  # the --to destination, e.g. 127.0.0.1:8080
    packets: int = Field(default=0, ge=0)
    bytes_captured: int = Field(default=0, ge=0)
    tcp_segments: int = Field(default=0, ge=0)
    connections: Connections = Field(default_factory=Connections)
    bytes_delivered: int = Field(default=0, ge=0)
    stream_gaps: int = Field(default=0, ge=0)  # times the live capture stream was interrupted and reconnected
    duration_seconds: float = Field(default=0.0, ge=0)
    direction_guessed: int = Field(default=0, ge=0)  # flows whose server side was a guess (no SYN, no --port)
    interrupted: bool = False
    warnings: list[str] = Field(default_factory=list)
    # The one-line error that ended the run (printed on stderr too), with the exit code it gives; null when none.
    # Before these, a script reading -o json after a failure saw only figures (often all zero) and exit code 0.
    error: str | None = None
    exit_code: int = Field(default=0, ge=0)
    http: HttpSummary | None = None  # HTTP mode only; left out of the JSON otherwise
    compare: CompareSummary | None = None  # --compare only; left out of the JSON otherwise
    h2: H2Summary | None = None  # HTTP mode only; left out of the JSON otherwise
    # HTTP mode: requests seen per protocol ("http/1.x", "h2", "grpc"; gRPC calls are HTTP/2 streams too).
    protocols: dict[str, int] | None = None
    # Live, in a service mesh: which mesh and where its plaintext was captured; left out of the JSON otherwise.
    mesh: str | None = None
    turns: TurnSummary | None = None  # turn-taking only (not --no-wait); left out of the JSON otherwise
    pods: list[PodFigures] | None = None  # live runs: every pod mirrored over the run; left out of the JSON otherwise
    # Progress snapshots only (flows still open mid-run); never part of the --json output.
    open_flows: int | None = Field(default=None, exclude=True)
    # Per server address (live runs map them to pods), and the live run's pods now and latest move: never in JSON.
    by_server: dict[str, ServerTally] = Field(default_factory=dict, exclude=True)
    pods_now: int | None = Field(default=None, exclude=True)
    latest_move: str | None = Field(default=None, exclude=True)


# ---- merging what the flow table and the replayer each know -------------------------------------

_SEVERITY: dict[Outcome, int] = {Outcome.COMPLETE: 0, Outcome.INCOMPLETE: 1, Outcome.DROPPED: 2, Outcome.FAILED: 3}


def merge_outcome(record: FlowRecord, delivery: Delivery | None, exact: bool = False) -> Outcome:
    """Worst wins: FAILED > DROPPED > INCOMPLETE > COMPLETE. A skipped or TLS flow was never replayed."""
    if record.outcome is Outcome.SKIPPED or record.outcome is Outcome.TLS:
        return record.outcome
    outcome: Outcome = record.outcome
    if delivery is not None and delivery.outcome is not None and _SEVERITY[delivery.outcome] > _SEVERITY[outcome]:
        outcome = delivery.outcome
    if outcome is Outcome.COMPLETE and record.end is EndReason.GAVE_UP:
        # The replayer stopped it but its verdict got lost: it was not delivered whole, whatever else is true.
        outcome = Outcome.INCOMPLETE
    if exact and outcome is Outcome.COMPLETE and delivery is not None and delivery.bytes_sent < record.bytes_delivered:
        # Byte mode sends every captured byte: a connection that delivered less was not delivered whole.
        outcome = Outcome.DROPPED
    return outcome


@dataclass
class SummaryBuilder:
    """Counts flows as they end; only flows still waiting for their other half are held in memory.

    The flow table's FlowRecord and the replayer's Delivery of one flow arrive separately and in either
    order: feed both (add_record / add_delivery) and they are paired by flow id, or pair them yourself
    with add_flow.
    """

    source: str
    target: str
    packets: int = 0
    bytes_captured: int = 0
    tcp_segments: int = 0
    stream_gaps: int = 0
    warnings: list[str] = field(default_factory=list)
    # Byte mode: every byte the flow table handed over must reach the target (HTTP mode may send fewer on purpose).
    exact: bool = False
    _counts: dict[Outcome, int] = field(init=False, default_factory=lambda: dict.fromkeys(Outcome, 0))
    _partial: int = field(init=False, default=0)
    _guessed: int = field(init=False, default=0)
    _delivered: int = field(init=False, default=0)
    _records: dict[int, FlowRecord] = field(init=False, default_factory=dict)
    _deliveries: dict[int, Delivery] = field(init=False, default_factory=dict)
    # HTTP mode: flows the replayer never heard of (no Delivery will come), and flows cut short on purpose.
    _no_delivery: set[int] = field(init=False, default_factory=set)
    _forced: dict[int, Outcome] = field(init=False, default_factory=dict)
    _servers: dict[str, ServerTally] = field(init=False, default_factory=dict)
    # Flows held back as TLS (tlsgate): the flow table's record of each is counted as tls, whatever it says.
    _tls: set[int] = field(init=False, default_factory=set)
    _probes: int = field(init=False, default=0)

    def add_capture(self, *, packets: int = 0, bytes_captured: int = 0, tcp_segments: int = 0) -> None:
        self.packets += packets
        self.bytes_captured += bytes_captured
        self.tcp_segments += tcp_segments

    def add_stream_gap(self) -> None:
        self.stream_gaps += 1

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def add_suppressed(self, flows: Iterable[int]) -> None:
        """Flows the HTTP layer never passed to the replayer (sampled out, no request matched): skipped, 0 bytes.

        Call it before their records arrive (the layer knows when their Close or Abort passes it, the flow table
        reports them after); one already waiting for a delivery is counted now.
        """
        for flow in flows:
            self._no_delivery.add(flow)
            record = self._records.pop(flow, None)
            if record is not None:
                self.add_flow(record, None)

    def add_probes(self, count: int) -> None:
        """Connections that opened with a kubelet probe (counted as found: each also ends with an outcome)."""
        self._probes += count

    def add_tls(self, flows: Iterable[int]) -> None:
        """Flows never replayed because they opened with a TLS ClientHello: tls, 0 bytes delivered.

        As add_suppressed: call it before their records arrive; one already waiting is counted now.
        """
        for flow in flows:
            self._tls.add(flow)
            record = self._records.pop(flow, None)
            if record is not None:
                self.add_record(record)

    def add_aborted(self, flows: Iterable[int]) -> None:
        """Flows the HTTP layer reset because a request broke off mid-stream: incomplete, whatever else says."""
        for flow in flows:
            self._forced[flow] = Outcome.INCOMPLETE

    def add_flow(self, record: FlowRecord, delivery: Delivery | None) -> Outcome:
        """Count one finished flow; returns its final outcome."""
        outcome = merge_outcome(record, delivery, self.exact)
        never_sent = False
        if self._forced or self._no_delivery:
            outcome, never_sent = self._override(record.flow, outcome)
        self._counts[outcome] += 1
        self._partial += record.partial
        self._guessed += record.direction_guessed
        sent = 0
        if outcome is not Outcome.SKIPPED and outcome is not Outcome.TLS and not never_sent:
            # What the target's kernel accepted, when the replayer says; else what was handed to it.
            sent = delivery.bytes_sent if delivery is not None else record.bytes_delivered
            self._delivered += sent
        _tally(self._servers, record.server.host, outcome, sent)
        return outcome

    def _override(self, flow: int, outcome: Outcome) -> tuple[Outcome, bool]:
        """HTTP mode's verdicts over the merged outcome; also whether the flow never reached the replayer."""
        never_sent = flow in self._no_delivery
        self._no_delivery.discard(flow)
        forced = self._forced.pop(flow, None)
        if forced is not None and (outcome is Outcome.SKIPPED or _SEVERITY[forced] > _SEVERITY[outcome]):
            return forced, never_sent
        return (Outcome.SKIPPED if never_sent else outcome), never_sent

    def add_record(self, record: FlowRecord) -> Outcome | None:
        """A flow ended in the flow table. Counted now if its delivery is known (or none will come)."""
        if self._tls and record.flow in self._tls:
            self._tls.discard(record.flow)
            record = dataclasses.replace(record, outcome=Outcome.TLS, bytes_delivered=0)
        if record.outcome is Outcome.SKIPPED or record.outcome is Outcome.TLS or record.flow in self._no_delivery:
            return self.add_flow(record, None)
        delivery = self._deliveries.pop(record.flow, None)
        if delivery is None:
            self._records[record.flow] = record
            return None
        return self.add_flow(record, delivery)

    def add_delivery(self, delivery: Delivery) -> Outcome | None:
        """The replayer finished a flow. Counted now if its record is known."""
        record = self._records.pop(delivery.flow, None)
        if record is None:
            self._deliveries[delivery.flow] = delivery
            return None
        return self.add_flow(record, delivery)

    def add_records(self, records: Iterable[FlowRecord]) -> None:
        for record in records:
            self.add_record(record)

    def add_deliveries(self, deliveries: Iterable[Delivery]) -> None:
        """Feed Replayer.pop_finished() here: final deliveries only, each once."""
        for delivery in deliveries:
            self.add_delivery(delivery)

    @property
    def pending(self) -> int:
        """Flows with only one half known so far."""
        return len(self._records) + len(self._deliveries)

    def build(
        self,
        *,
        duration_seconds: float,
        interrupted: bool = False,
        packets: int | None = None,
        bytes_captured: int | None = None,
        tcp_segments: int | None = None,
        stream_gaps: int | None = None,
        open_flows: int | None = None,
        http: HttpSummary | None = None,
        compare: CompareSummary | None = None,
        turns: TurnSummary | None = None,
        h2: H2Summary | None = None,
    ) -> Summary:
        """The summary so far; it does not consume anything, so it also serves progress snapshots.

        Capture figures given here replace what add_capture()/add_stream_gap() counted. Records still without
        a delivery count as handed over; lone deliveries are flows the flow table never reported, counted on
        the replayer's word alone.
        """
        counts = dict(self._counts)
        partial, guessed, delivered = self._partial, self._guessed, self._delivered
        servers = {host: dataclasses.replace(t) for host, t in self._servers.items()}
        for record in self._records.values():
            outcome = merge_outcome(record, None)
            counts[outcome] += 1
            partial += record.partial
            guessed += record.direction_guessed
            sent = record.bytes_delivered if outcome not in (Outcome.SKIPPED, Outcome.TLS) else 0
            delivered += sent
            _tally(servers, record.server.host, outcome, sent)
        for delivery in self._deliveries.values():
            counts[delivery.outcome or Outcome.COMPLETE] += 1
            delivered += delivery.bytes_sent
        return Summary(
            source=self.source,
            target=self.target,
            packets=self.packets if packets is None else packets,
            bytes_captured=self.bytes_captured if bytes_captured is None else bytes_captured,
            tcp_segments=self.tcp_segments if tcp_segments is None else tcp_segments,
            connections=Connections(
                seen=sum(counts.values()),
                complete=counts[Outcome.COMPLETE],
                partial=partial,
                incomplete=counts[Outcome.INCOMPLETE],
                dropped=counts[Outcome.DROPPED],
                failed=counts[Outcome.FAILED],
                skipped=counts[Outcome.SKIPPED],
                tls=counts[Outcome.TLS],
                probes=self._probes,
            ),
            bytes_delivered=delivered,
            stream_gaps=self.stream_gaps if stream_gaps is None else stream_gaps,
            duration_seconds=round(max(0.0, duration_seconds), 3),
            direction_guessed=guessed,
            interrupted=interrupted,
            warnings=list(self.warnings),
            http=http,
            compare=compare,
            turns=turns,
            h2=h2,
            protocols=None if http is None else {
                "http/1.x": http.requests, "h2": h2.streams if h2 else 0, "grpc": h2.grpc_calls if h2 else 0},
            open_flows=open_flows,
            by_server=servers,
        )


def _tally(servers: dict[str, ServerTally], host: str, outcome: Outcome, sent: int) -> None:
    t = servers.get(host)
    if t is None:
        t = servers[host] = ServerTally()
    t.connections += 1
    t.bytes_delivered += sent
    t.incomplete += outcome is Outcome.INCOMPLETE


def exit_code(summary: Summary) -> int:
    c = summary.connections
    return EXIT_DELIVERY if c.failed or c.dropped else EXIT_OK


def finished(summary: Summary, failure: MirrorError | None) -> Summary:
    """The final summary: with the error that ended the run, if one did, and the exit code the process gives."""
    if failure is not None:
        return summary.model_copy(update={"error": failure.message, "exit_code": failure.exit_code})
    return summary.model_copy(update={"exit_code": exit_code(summary)})


# ---- rendering -----------------------------------------------------------------------------------


def render_json(summary: Summary, *, one_line: bool = False) -> str:
    """The --json document. `http` and `compare` appear only in the modes that fill them.

    one_line: HTTP mode's -o json is JSON lines (one per request, then this summary as the last line).
    """
    exclude = {name for name in ("http", "compare", "mesh", "turns", "pods", "h2", "protocols")
               if getattr(summary, name) is None}
    return summary.model_dump_json(indent=None if one_line else 2, exclude=exclude)


# What a non-zero count means, and what to do about it.
_HINTS = {
    "incomplete": ("the capture missed bytes: cut at the hole with a reset, never delivered with holes",
                   "raise --hole-timeout if packets arrive late"),
    "dropped": ("your service read too slowly and its buffer overflowed",
                "raise --flow-buffer or slow down with --speed"),
    "failed": ("your service refused or reset the connection",
               "check its logs, and that it is still up at --to"),
    "tls": ("opened with a TLS ClientHello: not replayed (a plaintext --to sees only garbage)",
            "mirror the plaintext port (in a mesh, the sidecar's hop), or --tls-passthrough for a TLS --to"),
    "unanswered": ("turns your service did not answer in time: what followed was sent without waiting",
                   "raise --answer-timeout if it is just slow; --no-wait sends without waiting at all"),
    "closed early": ("connections your service closed while a request was still open",
                     "check its logs: it cut those requests off"),
}
_LABEL = 13
_FIGURE = 10


def render_text(summary: Summary) -> str:
    """A few aligned lines for stderr: what went where, how much, and what to do about anything wrong."""
    c = summary.connections
    header = f"{summary.source} -> {summary.target}"
    lines = [header + ("  (interrupted)" if summary.interrupted else ""), ""]

    def row(label: str, figure: str, detail: str = "") -> None:
        lines.append(f"  {label:<{_LABEL}}{figure:>{_FIGURE}}   {detail}".rstrip())

    segments = f"{_count(summary.tcp_segments)} TCP segment{_s(summary.tcp_segments)}"
    row("packets", _count(summary.packets), f"{_size(summary.bytes_captured)} captured, {segments}")
    outcomes = [("complete", c.complete), ("incomplete", c.incomplete), ("dropped", c.dropped),
                ("failed", c.failed), ("skipped", c.skipped), ("tls", c.tls)]
    counted = ", ".join(f"{_count(n)} {name}" for name, n in outcomes if n or name == "complete")
    row("connections", _count(c.seen), counted)
    notes = []
    if c.partial:
        notes.append(f"{_count(c.partial)} joined mid-stream")
    if c.probes:
        notes.append(f"{_count(c.probes)} from kubelet probes")
    if summary.direction_guessed:
        notes.append(f"{_count(summary.direction_guessed)} with a guessed server side (use --port)")
    if notes:
        row("", "", ", ".join(notes))
    row("delivered", _size(summary.bytes_delivered), f"in {_duration(summary.duration_seconds)}")
    if summary.mesh:
        row("mesh", "", summary.mesh)
    if summary.stream_gaps:
        row("stream gaps", _count(summary.stream_gaps), "the live capture reconnected; flows across a gap are cut")
    if summary.pods is not None and len(summary.pods) > 1:
        row("pods", _count(len(summary.pods)), "mirrored over the run (the workload changed)")
        for p in summary.pods:
            incomplete = f", {_count(p.incomplete)} incomplete" if p.incomplete else ""
            row("", "", f"{p.pod}: {_count(p.connections)} connection{_s(p.connections)}, "
                        f"{_size(p.bytes_delivered)}{incomplete}")
    h = summary.http
    only_h2 = h is not None and not h.requests and summary.h2 is not None and summary.h2.connections > 0
    if h is not None and not only_h2:  # a capture of HTTP/2 only needs no "requests 0" row
        held = [("filtered", h.filtered), ("rate-limited", h.rate_limited)]
        detail = ", ".join([f"{_count(h.forwarded)} forwarded"] + [f"{_count(n)} {name}" for name, n in held if n])
        row("requests", _count(h.requests), detail)
        conns = [("sampled out", h.sampled_out_connections), ("not HTTP", h.non_http_connections),
                 ("HTTP broke off", h.parse_errors)]
        if any(n for _, n in conns):
            row("", "", "connections: " + ", ".join(f"{_count(n)} {name}" for name, n in conns if n))
    h2 = summary.h2
    if h2 is not None and h2.connections:
        held = [("filtered", h2.filtered), ("rate-limited", h2.rate_limited), ("refused", h2.refused),
                ("given up unanswered", h2.abandoned)]
        detail = ", ".join([f"{_count(h2.forwarded)} forwarded"] + [f"{_count(n)} {name}" for name, n in held if n])
        if h2.retried:
            detail += f" ({_count(h2.retried)} sent again: the local server refused them unprocessed)"
        row("HTTP/2 streams", _count(h2.streams), detail)
        conns = [("upgraded from HTTP/1.1", h2.upgraded), ("sampled out", h2.sampled_out_connections),
                 ("undecodable", h2.undecodable)]
        row("", "", f"{_count(h2.connections)} connection{_s(h2.connections)}" + "".join(
            f", {_count(n)} {name}" for name, n in conns if n))
        if h2.grpc_calls:
            row("gRPC calls", _count(h2.grpc_calls), f"{len(h2.grpc_methods)} method{_s(len(h2.grpc_methods))}")
            for name, m in sorted(h2.grpc_methods.items(), key=lambda kv: -kv[1].seen)[:10]:
                compared = m.same + m.different
                detail = f"{name}: {_count(m.seen)}, {_count(m.forwarded)} forwarded"
                if compared or m.unpaired:
                    detail += f", {_count(m.same)} same, {_count(m.different)} different"
                row("", "", detail)
    cmp = summary.compare
    if cmp is not None:
        detail = f"{_count(cmp.same)} same, {_count(cmp.different)} different"
        row("compared", _count(cmp.same + cmp.different), detail + (f", {_count(cmp.unpaired)} unpaired"
                                                                    if cmp.unpaired else ""))

    t = summary.turns
    if t is not None:
        detail = f"{_count(t.answered)} answered, {_count(t.unanswered)} unanswered"
        if t.not_waited:
            detail += f", {_count(t.not_waited)} not waited for"
        row("turns", _count(t.turns), detail)
        if t.requests:
            row("requests", _count(t.requests),
                f"{_count(t.requests_answered)} answered, {_count(t.requests_unanswered)} unanswered")
        if t.local_p50_ms is not None and t.local_p99_ms is not None:
            times = f"local p50 {_ms(t.local_p50_ms)}, p99 {_ms(t.local_p99_ms)}"
            if t.production_p50_ms is not None and t.production_p99_ms is not None:
                times += f"; production p50 {_ms(t.production_p50_ms)}, p99 {_ms(t.production_p99_ms)}"
                times += _versus(t.local_p99_ms, t.production_p99_ms)
            row("answer time", "", times)

    problems = [(name, n) for name, n in outcomes if n and name in _HINTS]
    if t is not None:
        problems += [(name, n) for name, n in (("unanswered", t.unanswered), ("closed early", t.closed_early)) if n]
    if problems or summary.warnings:
        lines.append("")
    for name, n in problems:
        meaning, action = _HINTS[name]
        row(name, _count(n), meaning)
        row("", "", f"-> {action}")
    for warning in summary.warnings:
        row("warning", "", warning)
    return "\n".join(lines) + "\n"


def _ms(value: float) -> str:
    return f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.2f} s"


def _versus(local: float, production: float) -> str:
    """"(18x slower at p99)" when the gap is worth saying; production's time is the yardstick."""
    if production <= 0.05 or local <= 0:
        return ""
    ratio = local / production
    if ratio >= 1.5:
        return f" ({ratio:.0f}x slower at p99)" if ratio >= 10 else f" ({ratio:.1f}x slower at p99)"
    if ratio <= 1 / 1.5:
        return f" ({1 / ratio:.1f}x faster at p99)"
    return ""


def _count(n: int) -> str:
    return f"{n:,}"


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
