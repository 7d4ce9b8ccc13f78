"""Properties of the reassembly core over random streams, segmentations, duplicates, overlaps and reordering."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from kubectl_mirror.model import ACK, FIN, PSH, SYN, Abort, AbortReason, Action, Close, Endpoint, Open, Segment, Send
from kubectl_mirror.reassemble import FlowConfig, FlowTable, PendingBytes

MASK = 0xFFFFFFFF
CLIENT = Endpoint("10.0.0.1", 40000)
SERVER = Endpoint("10.0.0.2", 8080)


@dataclass
class Piece:
    """A client segment of the stream: bytes [start, start+len(data)), maybe carrying the FIN."""

    start: int
    data: bytes
    fin: bool = False
    whole: bool = True

    def overlaps(self, a: int, b: int) -> bool:
        return self.start < b and a < self.start + max(len(self.data), 1)


@st.composite
def transmissions(draw: st.DrawFn, max_len: int = 3000) -> tuple[bytes, int, list[Piece]]:
    """A stream, its ISN and what the client sent: a segmentation plus duplicates, overlapping
    retransmissions and FIN retransmissions, reordered within a bounded window."""
    stream = draw(st.binary(max_size=max_len))
    isn = draw(st.one_of(st.integers(0, MASK), st.integers(MASK - max_len - 10, MASK)))
    max_piece = draw(st.sampled_from([8, 64, 700]))  # small pieces make overlaps among buffered data likely
    pieces: list[Piece] = []
    pos = 0
    while pos < len(stream):
        size = draw(st.integers(1, max_piece))
        pieces.append(Piece(pos, stream[pos : pos + size]))
        pos += size
    fin_on_last = draw(st.booleans())
    if pieces and fin_on_last:
        pieces[-1].fin = True
    else:
        pieces.append(Piece(len(stream), b"", fin=True))
    for _ in range(draw(st.integers(0, 8))):  # retransmissions of arbitrary, possibly overlapping ranges
        if stream:
            a = draw(st.integers(0, len(stream) - 1))
            b = draw(st.integers(a + 1, min(len(stream), a + 2 * max_piece)))
            pieces.append(Piece(a, stream[a:b], fin=b == len(stream) and draw(st.booleans())))
    for i in draw(st.lists(st.integers(0, len(pieces) - 1), max_size=5)):  # exact duplicates
        pieces.append(Piece(pieces[i].start, pieces[i].data, pieces[i].fin))
    # Bounded reordering: each piece may move at most `window` places from where its rank puts it.
    window = draw(st.integers(0, 8))
    ranks = sorted(range(len(pieces)), key=lambda i: (pieces[i].start, i))
    jitter = [draw(st.integers(0, window)) for _ in ranks]
    order = sorted(range(len(ranks)), key=lambda r: r + jitter[r])
    return stream, isn, [pieces[ranks[r]] for r in order]


class Script:
    """Feeds a connection to a table, with the server acknowledging what it actually received."""

    def __init__(self, table: FlowTable, stream: bytes, isn: int) -> None:
        self.table, self.isn, self.n = table, isn, len(stream)
        self.got = bytearray(len(stream))  # what the server received, lost by the capture or not
        self.fin_got = False
        self.actions: list[Action] = []
        self.ts = 0.0

    def _feed(self, seg: Segment) -> None:
        self.ts += 0.001  # far below the hole timeout: only the capture's content decides
        self.actions += self.table.feed(seg)

    def syn(self) -> None:
        self._feed(Segment(self.ts, CLIENT, SERVER, self.isn, 0, SYN, b""))
        self._feed(Segment(self.ts, SERVER, CLIENT, 77, (self.isn + 1) & MASK, SYN | ACK, b""))

    def client(self, p: Piece, captured: bool, ack: bool, sent_len: int | None = None) -> None:
        n = len(p.data) if sent_len is None else sent_len  # a cut segment still reached the server whole
        self.got[p.start : p.start + n] = b"\1" * n
        self.fin_got |= p.fin
        if captured:
            flags = ACK | PSH | (FIN if p.fin else 0)
            seq = (self.isn + 1 + p.start) & MASK
            self._feed(Segment(self.ts, CLIENT, SERVER, seq, 78, flags, p.data, p.whole))
        if ack:
            prefix = self.got.find(0)
            acked = self.n + (1 if self.fin_got else 0) if prefix < 0 else prefix
            self._feed(Segment(self.ts, SERVER, CLIENT, 78, (self.isn + 1 + acked) & MASK, ACK, b""))


def delivered(actions: list[Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send))


@settings(max_examples=250, deadline=None)
@given(transmissions(), st.data())
def test_any_complete_capture_is_delivered_exactly_then_closed(
    tx: tuple[bytes, int, list[Piece]], data: st.DataObject
) -> None:
    stream, isn, pieces = tx
    table = FlowTable(FlowConfig())
    script = Script(table, stream, isn)
    script.syn()
    for p in pieces:
        script.client(p, captured=True, ack=data.draw(st.booleans()))
    script.actions += table.finish()
    acts = script.actions
    assert isinstance(acts[0], Open) and acts[0].flow == 1
    assert delivered(acts) == stream
    assert acts[-1] == Close(1, acts[-1].ts)
    assert all(isinstance(a, Send) for a in acts[1:-1])
    assert all(a.data for a in acts if isinstance(a, Send))
    assert table.tracking().flows == 0 and table.tracking().index == 0


@settings(max_examples=250, deadline=None)
@given(transmissions(), st.data())
def test_a_range_never_captured_ends_in_a_hole_never_in_wrong_bytes(
    tx: tuple[bytes, int, list[Piece]], data: st.DataObject
) -> None:
    stream, isn, pieces = tx
    if not stream:
        return
    a = data.draw(st.integers(0, len(stream) - 1), label="hole start")
    b = data.draw(st.integers(a + 1, len(stream)), label="hole end")
    acks = data.draw(st.booleans(), label="server acks")
    table = FlowTable(FlowConfig(hole_timeout=1000.0))
    script = Script(table, stream, isn)
    script.syn()
    covered = bytearray(len(stream))
    for p in pieces:
        lost = p.data != b"" and p.overlaps(a, b)
        if lost and data.draw(st.booleans(), label="cut rather than dropped"):
            # The snap length cut it: the segment is seen, its bytes are not.
            keep = data.draw(st.integers(0, len(p.data) - 1))
            cut = Piece(p.start, p.data[:keep], p.fin, whole=False)
            script.client(cut, captured=True, ack=acks, sent_len=len(p.data))
        else:
            script.client(p, captured=not lost, ack=acks)
        if not lost:
            covered[p.start : p.start + len(p.data)] = b"\1" * len(p.data)
    # The capture always keeps one bare FIN, else a lost tail would be indistinguishable from the end.
    script.client(Piece(len(stream), b"", fin=True), captured=True, ack=acks)
    script.actions += table.finish()
    acts = script.actions
    first_missing = covered.find(0)
    assert 0 <= first_missing <= a
    got = delivered(acts)
    assert got == stream[: len(got)]
    assert len(got) <= first_missing < len(stream)
    if not acks:
        assert len(got) == first_missing  # nothing stopped it early, so everything before the hole went out
    assert acts[-1] == Abort(1, AbortReason.HOLE, acts[-1].ts)
    assert not any(isinstance(x, Close) for x in acts)
    assert sum(isinstance(x, Abort) for x in acts) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(transmissions(max_len=600), min_size=2, max_size=6), st.randoms(use_true_random=False))
def test_interleaved_flows_never_mix(txs: list[tuple[bytes, int, list[Piece]]], rnd: random.Random) -> None:
    table = FlowTable(FlowConfig())
    queues: list[list[Segment]] = []
    for i, (_, isn, pieces) in enumerate(txs):
        client = Endpoint("10.0.0.1", 40000 + i)
        q = [Segment(0.0, client, SERVER, isn, 0, SYN, b"")]
        for p in pieces:
            flags = ACK | (FIN if p.fin else 0)
            q.append(Segment(0.0, client, SERVER, (isn + 1 + p.start) & MASK, 1, flags, p.data))
        queues.append(q)
    acts: list[Action] = []
    while any(queues):
        q = rnd.choice([q for q in queues if q])
        acts += table.feed(q.pop(0))
    acts += table.finish()
    flows = {a.client.port - 40000: a.flow for a in acts if isinstance(a, Open)}
    for i, (stream, _, _) in enumerate(txs):
        f = flows[i]
        assert b"".join(a.data for a in acts if isinstance(a, Send) and a.flow == f) == stream
        assert [a for a in acts if isinstance(a, Close | Abort) and a.flow == f] == [Close(f, 0.0)]


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200), st.lists(st.tuples(st.integers(0, 199), st.integers(1, 60)), max_size=30))
def test_pending_buffer_keeps_disjoint_chunks_of_the_stream(stream: bytes, ranges: list[tuple[int, int]]) -> None:
    buf = PendingBytes()
    have = bytearray(len(stream))
    for a, n in ranges:
        a %= len(stream)
        b = min(len(stream), a + n)
        new = have[a:b].count(0)
        assert buf.add(a, stream[a:b]) == new
        have[a:b] = b"\1" * (b - a)
        assert buf.size == have.count(1)
        ends = [s + len(buf.chunks[s]) for s in buf.starts]
        assert all(e <= s for e, s in zip(ends, buf.starts[1:], strict=False))  # sorted and disjoint
        assert all(buf.chunks[s] == stream[s : s + len(buf.chunks[s])] for s in buf.starts)
    prefix = have.find(0)
    prefix = len(stream) if prefix < 0 else prefix
    assert b"".join(buf.take(0)) == stream[:prefix]
    cut = len(stream) // 2
    buf.cut(cut)
    assert all(s + len(buf.chunks[s]) <= cut for s in buf.starts)
    assert buf.size == sum(len(c) for c in buf.chunks.values())
