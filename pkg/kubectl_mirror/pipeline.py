"""The engine's main loop: capture bytes in, mirrored connections out.

One thread runs a selectors loop over tshark's output and every local socket, so a slow target can only
ever cost its own flow (the replayer drops it) and never stalls reading the capture. The stages it wires
are free of each other: dissect yields Segments, the flow table turns them into actions, the replayer
executes them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import FrameType
from typing import BinaryIO, Protocol

from .capture import Gap
from .dissect import HANDOVER_EVERY, Dissector, TsharkInfo
from .errors import EXIT_INTERRUPTED, InputError, MirrorError
from .httpopts import HttpOptions
from .model import Action, DeliveryFailed, EndOfInput, GiveUp, Interrupt, LocalClosed, LocalData, Segment, Tick
from .output import request_printer
from .pcap import PcapWriter
from .reassemble import FlowConfig
from .replay import Delivery, ReplayConfig, Replayer
from .settings import Destination, Settings
from .shadow import ShadowOptions
from .stack import Command, DeliveryOver, Stack, StackOptions
from .summary import (
    Summary,
    SummaryBuilder,
)
from .turns import TurnOptions

log = logging.getLogger(__name__)

# How often the flow table's timers run, in capture seconds (offline) or wall seconds (live).
TICK_EVERY = 0.25
# Longest the loop sleeps when nothing happens: bounds how late timers and Ctrl-C are noticed.
IDLE_WAIT = 0.1


class SourceStats(Protocol):
    packets: int
    bytes_captured: int
    tcp_segments: int

    def warnings(self) -> list[str]: ...


class SegmentSource(Protocol):
    """What the loop reads one capture stream through, started: tshark's `Dissector` by default (EngineOptions
    .segments makes another: N dissectors merged into one stream, or a list of segments in a test)."""

    @property
    def done(self) -> bool: ...  # every segment read (or the source failed)

    @property
    def lines_waiting(self) -> bool: ...  # segments ready without waiting on fileno()

    @property
    def stats(self) -> SourceStats: ...

    def fileno(self) -> int | None: ...  # what to wait on for more; None: nothing (poll only times out)

    def read_segments(self) -> list[Segment]: ...  # what is ready now, never blocking

    def raise_if_failed(self) -> None: ...

    def close(self) -> None: ...


class Deliverer(Protocol):
    """Where the commands go: the `Replayer` (local sockets) by default (EngineOptions.deliverer makes another)."""

    def execute(self, actions: Iterable[Action | GiveUp]) -> None: ...

    def poll(self, timeout: float, extra_fd: int | None = None) -> bool: ...

    def drain(self, timeout: float | None = None) -> None: ...

    def pop_gave_up(self) -> list[int]: ...

    def pop_finished(self) -> list[Delivery]: ...

    def close(self) -> None: ...


@dataclass
class EngineOptions:
    dest: Destination
    flow: FlowConfig
    replay: ReplayConfig
    tshark: TsharkInfo | None  # None only with `segments` given
    # The first stream's SegmentSource, already started (replay starts its dissectors while the engine's modules
    # import, so tshark is at work meanwhile): the engine reads it and closes it.
    first_source: SegmentSource | None = None
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
    # Injected stages. `segments(stream)` gives a started SegmentSource for each capture stream
    # (None: tshark's Dissector); `deliverer(dest, config)` the delivery (None: the Replayer's local sockets).
    segments: Callable[[BinaryIO], SegmentSource] | None = None
    deliverer: Callable[[Destination, ReplayConfig], Deliverer] | None = None


@dataclass
class _Pacer:
    """Holds segments back so they leave at the capture's own pace (scaled by --speed)."""

    speed: float
    clock: Callable[[], float] = time.monotonic
    _first_ts: float | None = None
    _start: float = 0.0

    def due(self, ts: float) -> float:
        if self.speed <= 0:
            return 0.0
        if self._first_ts is None:
            self._first_ts, self._start = ts, self.clock()
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

    def __init__(self, options: EngineOptions, source_name: str, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self._clock = clock
        self.builder = SummaryBuilder(source=source_name, target=str(options.dest), exact=options.http is None)
        self.stack = Stack(
            StackOptions(options.flow, options.http, options.tls_passthrough, options.turns, str(options.dest)),
            self.builder, clock, options.notice, flow_buffer=options.replay.flow_buffer,
        )
        replay = options.replay
        # The local service's bytes and closes, as the replayer reads them: events for the layers that wait on them.
        self._local_events: list[LocalData | LocalClosed] = []
        if self.stack.wants_local_data:
            replay = dataclasses.replace(replay, on_response=self._local_reader())
        make = options.deliverer if options.deliverer is not None else Replayer
        self.replayer: Deliverer = make(options.dest, replay)
        self.stop = options.stop if options.stop is not None else StopFlag()
        self._pacer = _Pacer(options.speed, clock)
        self._last_ts: float | None = None
        self._last_tick_ts: float = 0.0
        self._last_seg_wall = self._clock()
        self._started = self._clock()
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

    def summary(self, running: SegmentSource | None = None) -> Summary:
        """The run's figures; given the stream still being read, a snapshot for the status line."""
        stats = running.stats if running is not None else None
        return self.builder.build(
            packets=self._packets_before + (stats.packets if stats else 0),
            bytes_captured=self._bytes_before + (stats.bytes_captured if stats else 0),
            tcp_segments=self._segments_before + (stats.tcp_segments if stats else 0),
            stream_gaps=self._gaps,
            duration_seconds=self._clock() - self._started,
            interrupted=stats is None and self.stop.interrupted,
            open_flows=self.stack.table.open_flows if stats is not None else None,
            http=self.stack.http_summary(),
            compare=self.stack.compare_summary(),
            turns=self.stack.turn_summary(),
            h2=self.stack.h2_summary(),
        )

    # ---- the loop ------------------------------------------------------------------------------

    def _run_stream(self, source: BinaryIO) -> None:
        opts = self.options
        first, opts.first_source = opts.first_source, None
        dissector = first if first is not None else (opts.segments or self._dissector)(source)
        held: deque[Segment] = deque()
        grace_until: float | None = None
        try:
            while True:
                if self.stop.requested:
                    if opts.on_stop is None:
                        break
                    if grace_until is None:
                        # Live: the remote tcpdump is told to stop and flushes; what it still sends is used.
                        opts.on_stop()
                        grace_until = self._clock() + opts.stop_grace
                    elif self._clock() >= grace_until:
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

    def _dissector(self, source: BinaryIO) -> SegmentSource:
        """The default SegmentSource: tshark, handed over to a fresh one every `handover_every` packets."""
        opts = self.options
        assert opts.tshark is not None
        dissector = Dissector(source, opts.tshark, handover_every=opts.handover_every, tee=opts.tee, live=opts.live,
                              dissectors=opts.dissectors)
        try:
            dissector.start()
        except BaseException:
            dissector.close()
            raise
        return dissector

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
                wait = self._pacer.due(seg.ts) - self._clock()
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
        self._last_seg_wall = self._clock()
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

    def _housekeeping(self, dissector: SegmentSource) -> None:
        self._timers()
        opts = self.options
        if opts.gaps is not None:
            new = opts.gaps()
            if new:
                self._pending_gaps.extend(new)
                self._gap_seen_at = self._clock()
            elif self._pending_gaps and self._clock() - self._gap_seen_at > 1.0:
                # No later segment came to order it against: whatever preceded the gap has been fed by now.
                while self._pending_gaps:
                    self._apply_gap(self._pending_gaps.pop(0))
        if opts.duration is not None and self._clock() - self._started >= opts.duration:
            if not self.stop.requested:
                log.info("--duration reached: stopping")
            self.stop.request("duration")
        if opts.max_packets is not None and self._packets_before + dissector.stats.packets >= opts.max_packets:
            self.stop.request("count")
        if opts.progress is not None:
            now = self._clock()
            if now - self._last_progress >= opts.progress_every:
                self._last_progress = now
                opts.progress(self.summary(dissector))

    def _capture_now(self) -> float:
        """The capture clock: the last segment's time, advanced by wall time in live mode when idle."""
        if self._last_ts is None:
            return 0.0
        if self.options.live:
            return self._last_ts + (self._clock() - self._last_seg_wall)
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
            timeout = max(0.0, min(timeout, deadline - self._clock()))
        self.replayer.poll(timeout, fd)
        if self.stack.turns is not None or self.stack.h2 is not None:
            # HTTP/2 connections of their own answer the local server at once (windows, SETTINGS, PING).
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
        if self.stack.turns is None and self.stack.h2 is None:
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


# ---- the engine's options from the typed settings ----------------------------------------------------


def flow_config(settings: Settings, server_port: int | None) -> FlowConfig:
    return FlowConfig(
        server_port=server_port,
        skip_partial=settings.skip_partial,
        hole_timeout=settings.hole_timeout,
        idle_timeout=settings.idle_timeout,
        # Production's answers are in the capture: --compare reads them, nothing else pays for them.
        server_stream=settings.comparing,
        turns=not settings.no_wait,
    )


def turn_options(settings: Settings) -> TurnOptions:
    return TurnOptions(floor=settings.answer_timeout, max_held=settings.flow_buffer)


def shadow_options(settings: Settings) -> ShadowOptions | None:
    """HTTP mode's options, or None for byte mode: --http, or any option that only means something in it."""
    if not settings.http_mode:
        return None
    methods = [m.strip() for text in settings.match_method for m in text.split(",") if m.strip()]
    http = HttpOptions(
        match_method=methods,
        match_path=list(settings.match_path),
        match_header=list(settings.match_header),
        match_grpc=list(settings.match_grpc),
        set_header=list(settings.set_header),
        rewrite_host=settings.rewrite_host,
        sample=1.0 if settings.sample is None else settings.sample,
        max_rps=settings.max_rps,
        seed=settings.sample_seed,
    )
    headers = [h.strip() for text in settings.compare_headers for h in text.split(",") if h.strip()]
    options = ShadowOptions(http, compare=settings.comparing, compare_headers=headers,
                            ignore_json_paths=list(settings.ignore_json_path), report=settings.compare_report,
                            proto_descriptor=settings.proto_descriptor)
    options.on_request = request_printer(settings)
    # Text output shows request lines only at -v (INFO): below it, the HTTP/2 layer need not decode local answers.
    options.request_lines = settings.json or logging.getLogger("kubectl_mirror.pipeline").isEnabledFor(logging.INFO)
    return options


def replay_config(settings: Settings) -> ReplayConfig:
    return ReplayConfig(flow_buffer=settings.flow_buffer, max_buffer=max(settings.max_buffer, settings.flow_buffer))


def raise_run_errors(engine: Engine) -> None:
    """After the summary: the error that stopped the run, else the capture's own damage."""
    if engine.fatal_error is not None:
        raise engine.fatal_error
    if engine.input_error is not None:
        raise engine.input_error
