"""The engine's main loop: capture bytes in, mirrored connections out.

One thread runs a selectors loop over tshark's output and every local socket, so a slow target can only
ever cost its own flow (the replayer drops it) and never stalls reading the capture. The stages it wires
are free of each other: dissect yields Segments, the flow table turns them into actions, the replayer
executes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import FrameType
from typing import BinaryIO

from .capture import Gap
from .dissect import HANDOVER_EVERY, Dissector, TsharkInfo, TsharkProcess
from .errors import EXIT_INTERRUPTED, InputError, MirrorError
from .httpflow import HttpOptions
from .model import DeliveryFailed, EndOfInput, Interrupt, LocalClosed, LocalData, Segment, Tick
from .pcap import PcapWriter
from .progress import StatusLine
from .reassemble import FlowConfig
from .replay import Destination, ReplayConfig, Replayer
from .shadow import RequestResult, ShadowOptions
from .stack import Command, DeliveryOver, Stack, StackOptions
from .summary import (
    CompareSummary,
    HttpSummary,
    Summary,
    SummaryBuilder,
    TurnSummary,
    exit_code,
    finished,
    render_json,
    render_text,
)
from .turns import TurnOptions, percentile

log = logging.getLogger(__name__)

# How often the flow table's timers run, in capture seconds (offline) or wall seconds (live).
TICK_EVERY = 0.25
# Longest the loop sleeps when nothing happens: bounds how late timers and Ctrl-C are noticed.
IDLE_WAIT = 0.1


@dataclass
class EngineOptions:
    dest: Destination
    flow: FlowConfig
    replay: ReplayConfig
    tshark: TsharkInfo
    # A tshark started ahead for the first stream (start_tshark): the engine takes it over and closes it.
    first_tshark: TsharkProcess | None = None
    speed: float = 0.0  # 0: as fast as possible; 1: the capture's own timing; 2: twice as fast
    live: bool = False
    handover_every: int = HANDOVER_EVERY
    dissectors: int = 1  # tsharks side by side, dealt records by connection
    tee: PcapWriter | None = None
    # Live runs stop by themselves after this many seconds / packets (None: never).
    duration: float | None = None
    max_packets: int | None = None
    progress: Callable[[Summary], None] | None = None
    progress_every: float = 1.0
    # Live: gaps in a pod's stream (flows to that pod end as incomplete), and how a stop reaches the capture.
    gaps: Callable[[], list[Gap]] | None = None
    on_stop: Callable[[], None] | None = None
    # The run's Ctrl-C flag when the caller installed it earlier (live: before it says "mirroring").
    stop: StopFlag | None = None
    stop_grace: float = 10.0  # after on_stop, how long the rest of the stream may take to arrive
    # HTTP mode (--http and what implies it); None: byte mode, where nothing below the flow table parses HTTP.
    http: ShadowOptions | None = None
    # Connections opening with a TLS ClientHello go to --to anyway (a local TLS server); else held back as tls.
    tls_passthrough: bool = False
    # Said once, as it happens, to the user (stderr): the first connection held back as TLS, and what to do.
    notice: Callable[[str], None] | None = None
    # Turn-taking (with FlowConfig.turns): how long a turn waits for the local answer; None: the defaults.
    turns: TurnOptions | None = None


@dataclass
class _Pacer:
    """Holds segments back so they leave at the capture's own pace (scaled by --speed)."""

    speed: float
    _first_ts: float | None = None
    _start: float = 0.0

    def due(self, ts: float) -> float:
        if self.speed <= 0:
            return 0.0
        if self._first_ts is None:
            self._first_ts, self._start = ts, time.monotonic()
        return self._start + max(0.0, ts - self._first_ts) / self.speed


@dataclass
class StopFlag:
    """Ctrl-C once asks the run to stop cleanly; twice exits at once."""

    requested: bool = False
    reason: str = ""
    on_first: Callable[[], None] | None = None  # called from the signal handler: must only start things
    # Called on the second Ctrl-C, just before the process exits: says what the hurry leaves behind.
    on_force: Callable[[], None] | None = None
    _previous: object = field(default=None, repr=False)
    _installed: int = field(default=0, repr=False)  # install() calls not yet undone: only the outermost counts

    def request(self, reason: str) -> None:
        if not self.requested:
            self.requested, self.reason = True, reason

    @property
    def interrupted(self) -> bool:
        return self.requested and self.reason == "interrupted"

    def install(self) -> None:
        def on_sigint(signum: int, frame: FrameType | None) -> None:
            if self.requested and self.reason == "interrupted":
                # The second Ctrl-C: the user wants out now, whatever is still buffered.
                if self.on_force is not None:
                    try:
                        self.on_force()
                    except Exception:  # leaving now matters more than a hint
                        pass
                os._exit(EXIT_INTERRUPTED)
            self.requested, self.reason = True, "interrupted"
            if self.on_first is not None:
                self.on_first()

        self._installed += 1
        if self._installed > 1:
            return
        try:
            self._previous = signal.signal(signal.SIGINT, on_sigint)
        except ValueError:  # not the main thread (tests running the engine in a thread)
            self._previous = None

    def uninstall(self) -> None:
        self._installed = max(0, self._installed - 1)
        if self._installed == 0 and self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
            self._previous = None


class Engine:
    """Runs one mirroring session over one or more capture streams.

    Several streams happen in live mode when the exec stream drops and is reopened: the gap between them
    ends every open flow as incomplete, because bytes may have been lost in between.
    """

    def __init__(self, options: EngineOptions, source_name: str) -> None:
        self.options = options
        self.builder = SummaryBuilder(source=source_name, target=str(options.dest), exact=options.http is None)
        self.stack = Stack(
            StackOptions(options.flow, options.http, options.tls_passthrough, options.turns, str(options.dest)),
            self.builder, time.monotonic, options.notice, flow_buffer=options.replay.flow_buffer,
        )
        replay = options.replay
        # The local service's bytes and closes, as the replayer reads them: events for the layers that wait on them.
        self._local_events: list[LocalData | LocalClosed] = []
        if self.stack.wants_local_data:
            replay = dataclasses.replace(replay, on_response=self._local_reader())
        self.replayer = Replayer(options.dest, replay)
        self.stop = options.stop if options.stop is not None else StopFlag()
        self._pacer = _Pacer(options.speed)
        self._last_ts: float | None = None
        self._last_tick_ts: float = 0.0
        self._last_seg_wall = time.monotonic()
        self._started = time.monotonic()
        self._last_progress = self._started
        self._gaps = 0
        self._packets_before = 0  # packets of streams already finished
        self._bytes_before = 0
        self._segments_before = 0
        self._input_error: MirrorError | None = None
        self._fatal: MirrorError | None = None
        self._pending_gaps: list[Gap] = []
        self._gap_seen_at = 0.0

    def _local_reader(self) -> Callable[[int, bytes, float], None]:
        events = self._local_events

        def on_response(flow: int, data: bytes, at: float) -> None:
            # Called inside the replayer's poll: only noted here, handed to the layers once the poll is over.
            events.append(LocalData(flow, data, at) if data else LocalClosed(flow, at))

        return on_response

    # ---- public --------------------------------------------------------------------------------

    def run(self, sources: Iterable[BinaryIO]) -> Summary:
        self.stop.install()
        try:
            try:
                for index, source in enumerate(sources):
                    if index > 0:
                        self._gaps += 1
                        self._execute(self.stack.handle(Interrupt(self._capture_now())))
                    self._run_stream(source)
                    if self.stop.requested or self._input_error is not None:
                        break
            except MirrorError as exc:  # tshark died, -w failed, ...: still end every flow properly
                self._fatal = exc
            if self._cut_short():
                # The rest of these connections exists (in the file, or in the cluster past a failure) but will
                # not be delivered: a clean FIN would tell the local service they ended. Reset them instead.
                self._execute(self.stack.handle(Interrupt(self._capture_now())))
            self._apply_late_gaps()
            self._execute(self.stack.handle(EndOfInput()))
            self._collect()
            self._settle()
            self.replayer.drain(self.options.replay.drain_timeout)
            self._collect()
            self.stack.handle(DeliveryOver())
        finally:
            self.stop.uninstall()
            self.replayer.close()
            if self.stack.shadow is not None:
                self.stack.shadow.close()
        return self.summary()

    def _cut_short(self) -> bool:
        """True when open flows end because of damage or a failure, not because the capture ended."""
        if self._fatal is not None or self._input_error is not None:
            return True
        # Offline, Ctrl-C stops in the middle of a file that holds the rest; live, the capture simply ends.
        return self.stop.interrupted and not self.options.live

    @property
    def fatal_error(self) -> MirrorError | None:
        """A failure that stopped the run (tshark died, ...): raised after the summary is shown."""
        return self._fatal

    @property
    def gap_count(self) -> int:
        return self._gaps

    @property
    def input_error(self) -> MirrorError | None:
        """The capture's own damage (truncated, malformed): raised after the summary is shown."""
        return self._input_error

    def summary(self, running: Dissector | None = None) -> Summary:
        """The run's figures; given the stream still being read, a snapshot for the status line."""
        stats = running.stats if running is not None else None
        return self.builder.build(
            packets=self._packets_before + (stats.packets if stats else 0),
            bytes_captured=self._bytes_before + (stats.bytes_captured if stats else 0),
            tcp_segments=self._segments_before + (stats.tcp_segments if stats else 0),
            stream_gaps=self._gaps,
            duration_seconds=time.monotonic() - self._started,
            interrupted=stats is None and self.stop.interrupted,
            open_flows=self.stack.table.open_flows if stats is not None else None,
            http=self._http_summary(),
            compare=self._compare_summary(),
            turns=self._turn_summary(),
        )

    def _turn_summary(self) -> TurnSummary | None:
        if self.stack.turns is None:
            return None
        s = self.stack.turns.stats

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

    def _http_summary(self) -> HttpSummary | None:
        if self.stack.http is None:
            return None
        s = self.stack.http.stats
        return HttpSummary(
            requests=s.requests, forwarded=s.forwarded, filtered=s.filtered, rate_limited=s.rate_limited,
            sampled_out_connections=s.sampled_out_connections, non_http_connections=s.non_http_connections,
            parse_errors=s.parse_errors,
        )

    def _compare_summary(self) -> CompareSummary | None:
        sh = self.stack.shadow
        if sh is None or not sh.comparing:
            return None
        return CompareSummary(same=sh.same, different=sh.different, unpaired=sh.unpaired)

    # ---- the loop ------------------------------------------------------------------------------

    def _run_stream(self, source: BinaryIO) -> None:
        opts = self.options
        dissector = Dissector(
            source, opts.tshark, handover_every=opts.handover_every, tee=opts.tee, live=opts.live,
            dissectors=opts.dissectors,
        )
        held: deque[Segment] = deque()
        grace_until: float | None = None
        first, self.options.first_tshark = self.options.first_tshark, None
        try:
            dissector.start(first)
            while True:
                if self.stop.requested:
                    if opts.on_stop is None:
                        break
                    if grace_until is None:
                        # Live: the remote tcpdump is told to stop and flushes; what it still sends is used.
                        opts.on_stop()
                        grace_until = time.monotonic() + opts.stop_grace
                    elif time.monotonic() >= grace_until:
                        break
                if held:
                    self._release(held)
                    continue
                if dissector.done:
                    break
                self._poll(0.0 if dissector.lines_waiting else IDLE_WAIT, dissector.fileno())
                segments = dissector.read_segments()
                if segments:
                    held.extend(segments)
                    self._release(held)
                self._housekeeping(dissector)
            held.clear()
            try:
                dissector.raise_if_failed()
            except InputError as exc:
                self._input_error = exc
        finally:
            stats = dissector.stats
            dissector.close()
            for warning in stats.warnings():  # frames the run could not use: said once, with their count
                self.builder.warn(warning)
            self._packets_before += stats.packets
            self._bytes_before += stats.bytes_captured
            self._segments_before += stats.tcp_segments

    def _release(self, held: deque[Segment]) -> None:
        """Feed held segments to the layers, as fast as --speed allows.

        As fast as possible, the segments up to the next gap go as one batch, whose Sends merge per flow (one
        send() per flow instead of per segment); paced, each segment goes once the capture's clock allows.
        """
        paced = self._pacer.speed > 0
        gaps = self._pending_gaps
        batch: list[Segment] = []
        while held:
            seg = held[0]
            if gaps and seg.frame > gaps[0].after_frame:
                # Everything the pod sent before its stream dropped has been fed: end its flows now.
                self._deliver(batch)
                batch = []
                self._apply_gap(gaps.pop(0))
            if paced:
                wait = self._pacer.due(seg.ts) - time.monotonic()
                if wait > 0:
                    # Keep serving sockets while the capture's clock catches up.
                    self._poll(min(wait, IDLE_WAIT))
                    return
            held.popleft()
            self._last_ts = seg.ts
            batch.append(seg)
            if paced:
                self._deliver(batch)
                batch = []
        self._deliver(batch)
        self._last_seg_wall = time.monotonic()
        self._timers()

    def _deliver(self, segments: list[Segment]) -> None:
        if segments:
            self._execute(self.stack.segments(segments, batch=self._pacer.speed <= 0))

    def _apply_gap(self, gap: Gap) -> None:
        if gap.dropped:
            log.info("stream gap in %s (%s): its open flows end as incomplete", gap.pod, gap.reason)
            self._gaps += 1
        elif gap.retired:
            log.info("%s left the run (%s): its capture ended, flows still open end as incomplete", gap.pod,
                     gap.reason)
        else:
            log.info("%s: %s: flows still open may have lost their end, so they end as incomplete", gap.pod,
                     gap.reason)
        self._execute(self.stack.handle(Interrupt(self._capture_now(), gap.servers or None)))

    def _apply_late_gaps(self) -> None:
        """Gaps told after the last segment (a loss tcpdump reported as it exited): they follow everything."""
        if self.options.gaps is not None:
            self._pending_gaps.extend(self.options.gaps())
        while self._pending_gaps:
            self._apply_gap(self._pending_gaps.pop(0))

    def _housekeeping(self, dissector: Dissector) -> None:
        self._timers()
        opts = self.options
        if opts.gaps is not None:
            new = opts.gaps()
            if new:
                self._pending_gaps.extend(new)
                self._gap_seen_at = time.monotonic()
            elif self._pending_gaps and time.monotonic() - self._gap_seen_at > 1.0:
                # No later segment came to order it against: whatever preceded the gap has been fed by now.
                while self._pending_gaps:
                    self._apply_gap(self._pending_gaps.pop(0))
        if opts.duration is not None and time.monotonic() - self._started >= opts.duration:
            if not self.stop.requested:
                log.info("--duration reached: stopping")
            self.stop.request("duration")
        if opts.max_packets is not None and self._packets_before + dissector.stats.packets >= opts.max_packets:
            self.stop.request("count")
        if opts.progress is not None:
            now = time.monotonic()
            if now - self._last_progress >= opts.progress_every:
                self._last_progress = now
                opts.progress(self.summary(dissector))

    def _capture_now(self) -> float:
        """The capture clock: the last segment's time, advanced by wall time in live mode when idle."""
        if self._last_ts is None:
            return 0.0
        if self.options.live:
            return self._last_ts + (time.monotonic() - self._last_seg_wall)
        return self._last_ts

    def _timers(self) -> None:
        for flow in self.replayer.pop_gave_up():
            self.stack.handle(DeliveryFailed(flow))
        now = self._capture_now()
        if now - self._last_tick_ts >= TICK_EVERY:
            self._last_tick_ts = now
            self._execute(self.stack.handle(Tick(now)))
        self._collect()

    def _execute(self, commands: list[Command]) -> None:
        if commands:
            self.replayer.execute(commands)

    def _poll(self, timeout: float, fd: int | None = None) -> None:
        """One round of the replayer's sockets, no longer than the next turn's deadline; then their answers."""
        deadline = self.stack.next_deadline()
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        self.replayer.poll(timeout, fd)
        if self.stack.turns is not None:
            self._answers()

    def _answers(self) -> None:
        """Hand what the local service sent (and closed) to the layers; execute what they release."""
        out = self._local()
        out += self.stack.tick()
        self._execute(out)

    def _local(self) -> list[Command]:
        events = self._local_events
        out: list[Command] = []
        if events:
            batch = events[:]
            events.clear()
            for event in batch:
                out += self.stack.handle(event)
        return out

    def _settle(self) -> None:
        """The input is over: let every connection still waiting for an answer finish its turns (each bounded)."""
        if self.stack.turns is None:
            return
        # Offline, Ctrl-C has reset every open flow by now (nothing is held); live, the capture has ended and these
        # last turns still deserve their answers. Each wait is bounded; a second Ctrl-C leaves at once.
        while self.stack.holding:
            self._poll(IDLE_WAIT)
            self._collect()
        self._execute(self.stack.flush())

    def _collect(self) -> None:
        # A flow can end in the table while its bytes are still queued for the target, so records and
        # deliveries arrive separately; the summary pairs them by flow id. The local service's last bytes of a
        # flow go to the layers before its delivery's end.
        self._execute(self._local())
        for delivery in self.replayer.pop_finished():
            self.stack.handle(delivery)


# ---- `kubectl mirror replay` -----------------------------------------------------------------------


def flow_config(args: argparse.Namespace, server_port: int | None) -> FlowConfig:
    return FlowConfig(
        server_port=server_port,
        skip_partial=args.skip_partial,
        hole_timeout=args.hole_timeout,
        idle_timeout=args.idle_timeout,
        # Production's answers are in the capture: --compare reads them, nothing else pays for them.
        server_stream=comparing(args),
        turns=not getattr(args, "no_wait", False),
    )


def turn_options(args: argparse.Namespace) -> TurnOptions:
    return TurnOptions(floor=getattr(args, "answer_timeout", 1.0), max_held=args.flow_buffer)


def comparing(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "compare", False) or getattr(args, "compare_report", None)
                or getattr(args, "compare_headers", None) or getattr(args, "ignore_json_path", None))


def shadow_options(args: argparse.Namespace) -> ShadowOptions | None:
    """HTTP mode's options, or None for byte mode: --http, or any option that only means something in it."""
    compare = comparing(args)
    implied = [getattr(args, name, None) for name in ("match_method", "match_path", "match_header", "set_header",
                                                      "rewrite_host", "sample", "max_rps")]
    if not (getattr(args, "http", False) or compare or any(v is not None and v != [] for v in implied)):
        return None
    methods = [m.strip() for text in args.match_method or [] for m in text.split(",") if m.strip()]
    http = HttpOptions(
        match_method=methods,
        match_path=list(args.match_path or []),
        match_header=list(args.match_header or []),
        set_header=list(args.set_header or []),
        rewrite_host=args.rewrite_host,
        sample=1.0 if args.sample is None else args.sample,
        max_rps=args.max_rps,
        seed=args.sample_seed,
    )
    headers = [h.strip() for text in args.compare_headers or [] for h in text.split(",") if h.strip()]
    options = ShadowOptions(http, compare=compare, compare_headers=headers,
                            ignore_json_paths=list(args.ignore_json_path or []), report=args.compare_report)
    options.on_request = request_printer(args)
    return options


def request_printer(args: argparse.Namespace) -> Callable[[RequestResult], None]:
    """-o json: one JSON line per request on stdout, the summary last; text: a line per request at -v."""
    if getattr(args, "output", "text") == "json":
        stream = sys.stdout if getattr(args, "write", None) != "-" else sys.stderr

        def print_json(result: RequestResult) -> None:
            print(json.dumps(result.to_json()), file=stream, flush=True)

        return print_json

    def log_line(result: RequestResult) -> None:
        if not result.forwarded:
            log.info("%s %s: not forwarded", result.method, result.target)
        elif result.status is None:
            log.info("%s %s: no answer from the local service", result.method, result.target)
        else:
            log.info("%s %s -> %d in %.1f ms", result.method, result.target, result.status, result.latency_ms or 0.0)

    return log_line


def replay_config(args: argparse.Namespace) -> ReplayConfig:
    return ReplayConfig(flow_buffer=args.flow_buffer, max_buffer=max(args.max_buffer, args.flow_buffer))


def report(summary: Summary, args: argparse.Namespace) -> None:
    """The final summary: JSON on stdout for scripts, a table on stderr for people.

    With `-w -` stdout carries the pcap and nothing else, so even JSON goes to stderr then.
    """
    stdout_free = getattr(args, "write", None) != "-"
    if getattr(args, "output", "text") == "json":
        # HTTP mode's stdout is JSON lines (requests first), so its summary is one line too: the last.
        one_line = summary.http is not None
        print(render_json(summary, one_line=one_line), file=sys.stdout if stdout_free else sys.stderr, flush=True)
    elif not getattr(args, "quiet", False):
        # render_text ends with its own newline: one, so the prompt gets the next line and no blank one before.
        print(render_text(summary), file=sys.stderr, end="", flush=True)


def notice_printer(args: argparse.Namespace, status: StatusLine | None) -> Callable[[str], None] | None:
    """A one-off warning line on stderr, above the status line (redrawn at its next tick)."""
    if getattr(args, "quiet", False):
        return None

    def say(message: str) -> None:
        if status is not None:
            status.clear()
        print(f"warning: {message}", file=sys.stderr, flush=True)

    return say


def status_line(args: argparse.Namespace, http: ShadowOptions | None = None) -> StatusLine | None:
    if getattr(args, "quiet", False):
        return None
    return CompareStatusLine(sys.stderr) if http is not None and http.compare else StatusLine(sys.stderr)


class CompareStatusLine(StatusLine):
    """The status line with the live count of same / different answers under --compare."""

    def render(self, s: Summary, rate: float) -> str:
        line = super().render(s, rate)
        if s.compare is None:
            return line
        return f"{line}  compare: {s.compare.same:,} same, {s.compare.different:,} different"


@dataclass
class ReplayStart:
    """What `replay` checks and starts before the engine's modules are even imported (see cli.start_replay)."""

    dest: Destination
    tshark: TsharkInfo
    source: BinaryIO
    first_tshark: TsharkProcess | None = None


def run_replay(args: argparse.Namespace, start: ReplayStart, stack: ExitStack) -> int:
    """The offline run; `stack` holds the opened input and the started tshark, and closes them."""
    dest, tshark, source = start.dest, start.tshark, start.source
    with stack:
        options = EngineOptions(
            dest=dest,
            flow=flow_config(args, args.port),
            replay=replay_config(args),
            tshark=tshark,
            first_tshark=start.first_tshark,
            dissectors=args.dissectors,
            speed=args.speed,
            # A pipe can pause (tcpdump | kubectl mirror replay -): tshark must not sit on lines it has.
            live=args.file == "-",
            http=shadow_options(args),
            tls_passthrough=getattr(args, "tls_passthrough", False),
            turns=turn_options(args),
        )
        status = status_line(args, options.http)
        if status is not None and status.tty:
            options.progress, options.progress_every = status, status.every
        options.notice = notice_printer(args, status)
        engine = Engine(options, source_name=args.file)
        try:
            summary = engine.run([source])
        finally:
            if status is not None:
                status.clear()
    report(finished(summary, engine.fatal_error or engine.input_error), args)
    raise_run_errors(engine)
    return exit_code(summary)


def raise_run_errors(engine: Engine) -> None:
    """After the summary: the error that stopped the run, else the capture's own damage."""
    if engine.fatal_error is not None:
        raise engine.fatal_error
    if engine.input_error is not None:
        raise engine.input_error

