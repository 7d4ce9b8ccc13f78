"""Fuzzing the sequencer (FlowTable): several connections at once, each with its own losses, reordering,
duplicates, overlaps, server ACKs and RSTs; and scripts of arbitrary well-formed segments with any flags.

test_reassemble_props.py covers one flow at a time and flows that only interleave; here the flows also lose
bytes, get reset and are acknowledged while they interleave, and the table must keep each one's story straight.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from kubectl_mirror.model import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    Abort,
    AbortReason,
    Action,
    Close,
    Endpoint,
    Open,
    Segment,
    Send,
)
from kubectl_mirror.reassemble import FlowConfig, FlowTable
from tests.fuzz.sequencer_ops import decode, run

MASK = 0xFFFFFFFF
SERVER = Endpoint("10.9.0.2", 8080)


@dataclass
class Conn:
    """One connection's truth: its stream, ISN, and what happened to it on the wire and in the capture."""

    port: int
    stream: bytes
    isn: int
    syn_seen: bool  # else the SYN was lost and the SYN+ACK tells the ISN
    events: list[tuple[str, int, int, bool]]  # (kind, start, end, captured whole) in wire order
    cut_keep: dict[int, int] = field(default_factory=dict)  # event index -> bytes kept when cut by the snap length


@st.composite
def connections(draw: st.DrawFn, port: int) -> Conn:
    stream = draw(st.binary(max_size=300))
    isn = draw(st.one_of(st.integers(0, MASK), st.integers(MASK - 320, MASK)))  # wrap-around ISNs often
    n = len(stream)
    events: list[tuple[str, int, int, bool]] = []
    # a segmentation, then retransmissions of arbitrary (overlapping) ranges, then a FIN
    pos = 0
    while pos < n:
        size = draw(st.integers(1, 40))
        events.append(("data", pos, min(n, pos + size), True))
        pos += size
    for _ in range(draw(st.integers(0, 6))):
        if n:
            a = draw(st.integers(0, n - 1))
            events.append(("data", a, draw(st.integers(a + 1, min(n, a + 60))), True))
    if draw(st.booleans()):
        events.append(("fin", n, n, True))
    for _ in range(draw(st.integers(0, 3))):  # exact duplicates
        if events:
            events.append(events[draw(st.integers(0, len(events) - 1))])
    order = draw(st.permutations(range(len(events))))
    events = [events[i] for i in order]
    # the capture loses some segments or cuts them, the wire does not: the server still gets and ACKs them
    lose = draw(st.sampled_from([0.0, 0.0, 0.1, 0.4]))
    rnd = draw(st.randoms(use_true_random=False))
    cut_keep: dict[int, int] = {}
    out: list[tuple[str, int, int, bool]] = []
    for i, (kind, a, b, _) in enumerate(events):
        captured = rnd.random() >= lose
        if not captured and kind == "data" and rnd.random() < 0.5:
            cut_keep[i] = rnd.randint(0, b - a - 1)  # seen, but the snap length cut its bytes
        out.append((kind, a, b, captured))
    for _ in range(draw(st.integers(0, 6))):  # server ACKs at random places
        out.insert(draw(st.integers(0, len(out))), ("ack", 0, 0, True))
    if draw(st.integers(0, 4)) == 0:  # an RST from either side somewhere
        out.insert(draw(st.integers(0, len(out))), (draw(st.sampled_from(["rst-client", "rst-server"])), 0, 0, True))
    # indices in cut_keep refer to `events`; re-key them to `out`
    remap: dict[int, int] = {}
    j = 0
    for k, ev in enumerate(out):
        if ev[0] in ("data", "fin"):
            remap[j] = k
            j += 1
    return Conn(port, stream, isn, draw(st.booleans()), out, {remap[i]: keep for i, keep in cut_keep.items()})


@dataclass
class Truth:
    """What the capture shows of one connection, built while its segments are fed."""

    received: bytearray  # bytes the server got (lost by the capture or not)
    fin_received: bool = False
    captured: bytearray = field(default_factory=bytearray)  # bytes the capture has whole
    extent: int = 0  # how far the capture shows the stream goes (any captured segment, cut or not)
    fin_captured: bool = False
    rst: bool = False
    lost: bool = False  # some byte (or the FIN) the client sent never reached the capture whole


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 5).flatmap(lambda k: st.tuples(*[connections(41000 + i) for i in range(k)])),
       st.randoms(use_true_random=False), st.booleans())
def test_interleaved_lossy_flows_each_get_a_prefix_and_the_right_end(
    conns: tuple[Conn, ...], rnd: random.Random, jumps: bool
) -> None:
    table = FlowTable(FlowConfig())
    truth = {c.port: Truth(bytearray(len(c.stream)), captured=bytearray(len(c.stream))) for c in conns}
    acts: list[Action] = []
    ts = 0.0
    jumped = False

    def feed(seg: Segment) -> None:
        nonlocal ts, jumped
        ts += 0.001
        if jumps and rnd.random() < 0.02:  # a long silence: hole timeouts may fire
            ts += 3.0
            jumped = True
        seg.ts = ts
        acts.extend(table.feed(seg))
        if rnd.random() < 0.1:
            acts.extend(table.tick(ts))

    # the handshake of every connection first, then their segments interleaved at random
    queues: list[tuple[Conn, list[tuple[int, tuple[str, int, int, bool]]]]] = []
    for c in conns:
        client = Endpoint("10.9.0.1", c.port)
        if c.syn_seen:
            feed(Segment(0, client, SERVER, c.isn, 0, SYN, b""))
        feed(Segment(0, SERVER, client, 5000, (c.isn + 1) & MASK, SYN | ACK, b""))
        queues.append((c, list(enumerate(c.events))))
    while any(q for _, q in queues):
        c, q = rnd.choice([cq for cq in queues if cq[1]])
        i, (kind, a, b, captured) = q.pop(0)
        t = truth[c.port]
        client = Endpoint("10.9.0.1", c.port)
        if kind in ("data", "fin"):
            t.received[a:b] = b"\1" * (b - a)
            t.fin_received |= kind == "fin"
            seq = (c.isn + 1 + a) & MASK
            flags = ACK | PSH | (FIN if kind == "fin" else 0)
            if captured:
                feed(Segment(0, client, SERVER, seq, 5001, flags, c.stream[a:b]))
                t.captured[a:b] = b"\1" * (b - a)
                t.extent = max(t.extent, b)
                t.fin_captured |= kind == "fin"
            else:
                # a lost FIN counts too: the server's ACK of it is one sequence number the capture never had, as
                # a lost byte would be, and the table cannot tell the two apart
                t.lost = True
                if i in c.cut_keep:
                    feed(Segment(0, client, SERVER, seq, 5001, flags, c.stream[a : a + c.cut_keep[i]], whole=False))
                    t.extent = max(t.extent, a + max(c.cut_keep[i], 1))
        elif kind == "ack":  # truthful: never more than the server has, in order
            prefix = t.received.find(0)
            top = len(c.stream) + t.fin_received if prefix < 0 else prefix
            acked = rnd.randint(0, top)
            feed(Segment(0, SERVER, client, 5001, (c.isn + 1 + acked) & MASK, ACK, b""))
        else:
            t.rst = True
            src, dst = (client, SERVER) if kind == "rst-client" else (SERVER, client)
            feed(Segment(0, src, dst, (c.isn + 1) & MASK if src is client else 5001, 0, RST | ACK, b""))
    acts += table.finish()

    opens = {a.client.port: a.flow for a in acts if isinstance(a, Open)}
    assert sorted(opens) == sorted(c.port for c in conns), "every connection opens exactly once"
    assert len(opens) == sum(isinstance(a, Open) for a in acts)
    for c in conns:
        t, fid = truth[c.port], opens[c.port]
        mine = [a for a in acts if not isinstance(a, Open) and a.flow == fid]
        got = b"".join(a.data for a in mine if isinstance(a, Send))
        assert got == c.stream[: len(got)], "wrong bytes delivered"
        ends = [a for a in mine if isinstance(a, Close | Abort)]
        assert len(ends) == 1 and mine[-1] is ends[0], "one end action, last"
        end = ends[0]
        if isinstance(end, Close):
            # Close says every byte the capture knows of was delivered, and all of it if the FIN was seen
            assert len(got) >= t.extent
            if t.fin_captured:
                assert got == c.stream
        else:
            assert end.reason in (AbortReason.HOLE, AbortReason.RESET)
            if end.reason is AbortReason.RESET:
                assert t.rst
            elif not jumped:
                assert t.lost, "HOLE without a lost byte"
        # a byte the capture shows was sent but never had whole: never a Close
        first_missing = t.captured.find(0)
        if 0 <= first_missing < t.extent:
            assert isinstance(end, Abort), "Close over a hole"
            assert end.reason is AbortReason.HOLE or t.rst
    left = table.tracking()
    assert not left.flows and not left.index and not left.holes and not left.tombstones
    assert table.open_flows == 0


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=2, max_size=1200))
def test_any_script_of_segments_keeps_the_table_consistent(data: bytes) -> None:
    # any flags (SYN+FIN+RST, ...), any seq/ack near or far from the ISNs, cut segments, ticks, give-ups and
    # interrupts under small limits: never an exception, never bytes off the stream, empty after finish()
    cfg, ops = decode(data)
    run(cfg, ops)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 3), st.integers(-4, 40), st.binary(max_size=8)),
                max_size=60), st.integers(0, MASK))
def test_every_flag_combination_on_one_connection(segs: list[tuple[int, int, int, bytes]], isn: int) -> None:
    # One 4-tuple and every one of the 256 flag bytes: flag combinations no TCP stack sends must still be absorbed.
    client, server = Endpoint("10.0.0.1", 40000), Endpoint("10.0.0.2", 8080)
    table = FlowTable(FlowConfig())
    acts: list[Action] = []
    for i, (flags, who, off, payload) in enumerate(segs):
        src, dst = (client, server) if who else (server, client)
        acts += table.feed(Segment(i * 0.01, src, dst, (isn + off) & MASK, (isn + off) & MASK, flags, payload))
    acts += table.finish()
    open_ids = [a.flow for a in acts if isinstance(a, Open)]
    for fid in open_ids:
        ends = [a for a in acts if isinstance(a, Close | Abort) and a.flow == fid]
        assert len(ends) == 1
    left = table.tracking()
    assert not left.flows and not left.index and not left.tombstones
