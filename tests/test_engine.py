"""The engine driven directly: a list of segments as the segment source, a fake clock, real local sockets.

No tshark and no CLI: EngineOptions.segments injects the source (what a sharded dissector will plug into), the
clock is the test's, and delivery is the real Replayer into a real loopback target.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import pytest

from kubectl_mirror.model import Segment
from kubectl_mirror.pipeline import Engine, EngineOptions, SegmentSource, SourceStats
from kubectl_mirror.reassemble import FlowConfig
from kubectl_mirror.replay import ReplayConfig
from kubectl_mirror.summary import Summary
from tests.test_reassemble import Conn
from tests.test_replay import LIMIT, Target

SHORT = ReplayConfig(drain_timeout=5.0, connect_timeout=2.0)


@dataclass
class Stats:
    packets: int = 0
    bytes_captured: int = 0
    tcp_segments: int = 0

    def warnings(self) -> list[str]:
        return []


@dataclass
class ListSource:
    """A SegmentSource over a list: `per_read` segments per read, then done."""

    segments: list[Segment]
    per_read: int = 2
    closed: bool = False
    _stats: Stats = field(default_factory=Stats)

    @property
    def done(self) -> bool:
        return not self.segments

    @property
    def lines_waiting(self) -> bool:
        return bool(self.segments)

    @property
    def stats(self) -> SourceStats:
        return self._stats

    def fileno(self) -> int | None:
        return None

    def read_segments(self) -> list[Segment]:
        batch, self.segments = self.segments[: self.per_read], self.segments[self.per_read :]
        self._stats.packets += len(batch)
        self._stats.tcp_segments += len(batch)
        self._stats.bytes_captured += sum(len(s.payload) + 54 for s in batch)
        return batch

    def raise_if_failed(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class StepClock:
    """A fake clock that moves `step` seconds at every reading: pacing and timers see time pass, fast."""

    def __init__(self, step: float = 0.05) -> None:
        self.now = 1000.0
        self.step = step
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        if self.reads > 1_000_000:  # bound: a loop that never ends fails instead of spinning
            raise AssertionError("the engine read the clock a million times")
        self.now += self.step
        return self.now


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target("read")
    try:
        yield t
    finally:
        t.stop()


def run(target: Target, streams: list[list[Segment]], clock: StepClock, *, speed: float = 0.0,
        flow: FlowConfig | None = None) -> tuple[Summary, list[ListSource]]:
    sources: list[ListSource] = []

    def segments(stream: BinaryIO) -> SegmentSource:
        source = ListSource(list(streams[len(sources)]))
        sources.append(source)
        return source

    options = EngineOptions(dest=target.dest, flow=flow or FlowConfig(), replay=SHORT, tshark=None,
                            speed=speed, segments=segments)
    engine = Engine(options, "segments", clock=clock)
    summary = engine.run([None] * len(streams))  # type: ignore[list-item]  # the source ignores the stream
    deadline = time.monotonic() + LIMIT
    while sum(p.done.is_set() for p in target.peers) < summary.connections.complete and time.monotonic() < deadline:
        time.sleep(0.01)
    return summary, sources


def connection(port: int, data: list[bytes], t0: float, gap: float = 0.5, *, fin: bool = True) -> list[Segment]:
    c = Conn(client=Conn().client.__class__("10.0.0.1", port))
    segs = [c.syn(t0), c.synack(t0 + 0.001)]
    off, ts = 0, t0
    for chunk in data:
        ts += gap
        segs.append(c.data(off, chunk, ts))
        off += len(chunk)
    if fin:
        segs.append(c.fin(off, ts + gap))
    return segs


def test_segments_reach_the_target_and_the_summary_counts_them(target: Target) -> None:
    a = connection(41000, [b"hello ", b"world"], 0.0)
    b = connection(41001, [b"second"], 0.1)
    summary, sources = run(target, [a + b], StepClock(), flow=FlowConfig(turns=False))
    assert (summary.connections.seen, summary.connections.complete) == (2, 2)
    assert summary.bytes_delivered == len(b"hello world") + len(b"second")
    assert summary.packets == len(a + b) and summary.tcp_segments == len(a + b)
    assert sorted(bytes(p.data) for p in target.peers) == [b"hello world", b"second"]
    assert all(p.eof for p in target.peers)
    assert sources[0].closed


def test_paced_run_follows_the_fake_clock(target: Target) -> None:
    # 30 capture seconds at --speed 1: the fake clock moves 1 s a reading, so the run waits through about 30
    # readings of it instead of 30 real seconds.
    a = connection(41002, [b"a", b"b", b"c"], 0.0, gap=10.0)
    clock = StepClock(1.0)
    summary, _ = run(target, [a], clock, speed=1.0, flow=FlowConfig(turns=False))
    assert clock.now - 1000.0 >= 30.0  # the engine waited for the capture's clock: it read past 30 s of it
    assert summary.connections.complete == 1 and bytes(target.peers[0].data) == b"abc"


def test_a_second_stream_is_a_gap_that_ends_open_flows_as_incomplete(target: Target) -> None:
    open_flow = connection(41003, [b"first part"], 0.0, fin=False)
    later = connection(41004, [b"after"], 5.0)
    summary, sources = run(target, [open_flow, later], StepClock(), flow=FlowConfig(turns=False))
    assert summary.stream_gaps == 1 and len(sources) == 2
    assert (summary.connections.incomplete, summary.connections.complete) == (1, 1)
    reset = [p for p in target.peers if bytes(p.data) == b"first part"]
    assert len(reset) == 1


def test_turns_wait_for_the_local_answer_before_the_next_bytes(target: Target) -> None:
    # Production answered between the client's two writes: one turn. The second write waits for the target (which never
    # answers) until the answer timeout, and then goes on; the fake clock makes the wait instant.
    c = Conn(client=Conn().client.__class__("10.0.0.1", 41005))
    segs = [c.syn(0.0), c.synack(0.001), c.data(0, b"one", 0.1), c.sack(3, 0.2, payload=b"answer"),
            c.data(3, b"two", 0.3), c.fin(6, 0.4)]
    summary, _ = run(target, [segs], StepClock(0.2), flow=FlowConfig(turns=True))
    assert summary.connections.complete == 1 and bytes(target.peers[0].data) == b"onetwo"
    assert summary.turns is not None and (summary.turns.turns, summary.turns.unanswered) == (1, 1)
