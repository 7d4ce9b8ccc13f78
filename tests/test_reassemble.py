"""Scripts of segments in, actions out: the reassembly core without any I/O."""

from __future__ import annotations

from collections.abc import Collection
from weakref import WeakKeyDictionary

import pytest

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
    DeliveryFailed,
    EndOfInput,
    Endpoint,
    EndReason,
    FlowRecord,
    Interrupt,
    Open,
    Outcome,
    Segment,
    Send,
    Tick,
)
from kubectl_mirror.reassemble import ACK_GRACE, FlowConfig, FlowTable, TableEvent
from tests.playbook import play

MASK = 0xFFFFFFFF
CLIENT = Endpoint("10.0.0.1", 40000)
SERVER = Endpoint("10.0.0.2", 8080)


class Conn:
    """Builds the segments of one connection. Client seqs are given relative to the ISN (isn+1 = offset 0)."""

    def __init__(self, isn: int = 1000, client: Endpoint = CLIENT, server: Endpoint = SERVER, sisn: int = 5000):
        self.isn, self.client, self.server, self.sisn = isn, client, server, sisn

    def seq(self, off: int) -> int:
        return (self.isn + 1 + off) & MASK

    def syn(self, ts: float = 0.0, data: bytes = b"") -> Segment:
        return Segment(ts, self.client, self.server, self.isn, 0, SYN, data)

    def synack(self, ts: float = 0.0) -> Segment:
        return Segment(ts, self.server, self.client, self.sisn, self.seq(0), SYN | ACK, b"")

    def data(self, off: int, payload: bytes, ts: float = 0.0, flags: int = ACK | PSH, whole: bool = True) -> Segment:
        return Segment(ts, self.client, self.server, self.seq(off), self.sisn + 1, flags, payload, whole)

    def fin(self, off: int, ts: float = 0.0, payload: bytes = b"") -> Segment:
        return self.data(off, payload, ts, flags=FIN | ACK)

    def rst(self, off: int, ts: float = 0.0) -> Segment:
        return Segment(ts, self.client, self.server, self.seq(off), 0, RST, b"")

    def sack(self, off: int, ts: float = 0.0, flags: int = ACK, payload: bytes = b"") -> Segment:
        """A server segment acknowledging client offset `off` (off = n: every byte below n received)."""
        return Segment(ts, self.server, self.client, self.sisn + 1, self.seq(off), flags, payload)

    def srst(self, ts: float = 0.0) -> Segment:
        return Segment(ts, self.server, self.client, self.sisn + 1, 0, RST | ACK, b"")


# Every event goes through FlowTable.handle (tests/playbook.py); the helpers below keep a test's two questions
# apart: which actions came out (returned), and which flows ended (the FlowRecords, kept here until asked for).
_records: WeakKeyDictionary[FlowTable, list[FlowRecord]] = WeakKeyDictionary()


def _play(table: FlowTable, *events: TableEvent) -> list[Action]:
    out: list[Action] = []
    ended = _records.setdefault(table, [])
    for command in play(table, *events):
        if isinstance(command, FlowRecord):
            ended.append(command)
        else:
            out.append(command)
    return out


def feed(table: FlowTable, *segs: Segment) -> list[Action]:
    return _play(table, *segs)


def tick(table: FlowTable, now: float) -> list[Action]:
    return _play(table, Tick(now))


def finish(table: FlowTable) -> list[Action]:
    return _play(table, EndOfInput())


def interrupt(table: FlowTable, now: float, servers: Collection[str] | None = None) -> list[Action]:
    return _play(table, Interrupt(now, servers))


def give_up(table: FlowTable, flow: int) -> None:
    assert _play(table, DeliveryFailed(flow)) == []


def records(table: FlowTable) -> list[FlowRecord]:
    """The flows that ended since the last call, in order."""
    out = _records.get(table, [])
    _records[table] = []
    return out


def sent(actions: list[Action], flow: int | None = None) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Send) and (flow is None or a.flow == flow))


def kinds(actions: list[Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


def one_record(table: FlowTable) -> FlowRecord:
    ended = records(table)
    assert len(ended) == 1, ended
    return ended[0]


def test_basic_connection() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.syn(0.0), c.synack(0.01), c.sack(0, 0.02))
    assert acts == [Open(1, CLIENT, SERVER, False, 0.0)]
    acts = feed(t, c.data(0, b"GET / HTTP/1.1\r\n", 0.1), c.sack(16, 0.11), c.data(16, b"\r\n", 0.2))
    assert acts == [Send(1, b"GET / HTTP/1.1\r\n", 0.1), Send(1, b"\r\n", 0.2)]
    assert t.open_flows == 1
    assert feed(t, c.sack(18, 0.3, payload=b"HTTP/1.1 200 OK\r\n\r\n")) == []
    assert feed(t, c.fin(18, 0.4)) == [Close(1, 0.4)]
    assert t.open_flows == 0
    rec = one_record(t)
    assert (rec.outcome, rec.end, rec.bytes_delivered, rec.partial) == (Outcome.COMPLETE, EndReason.FIN, 18, False)
    assert (rec.first_ts, rec.last_ts, rec.direction_guessed) == (0.0, 0.4, False)


def test_syn_with_data_fast_open() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.syn(0.0, data=b"hello"), c.synack(0.01), c.data(5, b" world"), c.fin(11))
    assert kinds(acts) == ["Open", "Send", "Send", "Close"]
    assert sent(acts) == b"hello world"


def test_retransmitted_syn_with_data_is_trimmed() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.syn(0.0, data=b"hello"), c.syn(1.0, data=b"hello"), c.data(5, b"!"))
    assert kinds(acts) == ["Open", "Send", "Send"]
    assert sent(acts) == b"hello!"
    assert t.stats.dup_bytes == 5


@pytest.mark.parametrize("isn", [MASK - 3, MASK, MASK - 10])
def test_sequence_wrap_around(isn: int) -> None:
    t = FlowTable(FlowConfig())
    c = Conn(isn=isn)
    segs = [c.syn(), c.synack()] + [c.data(i * 4, b"abcd") for i in range(5)]
    # Out of order across the wrap as well: offsets 24 arrives before 20.
    segs += [c.data(24, b"WXYZ"), c.sack(20), c.data(20, b"1234"), c.fin(28)]
    acts = feed(t, *segs)
    assert sent(acts) == b"abcd" * 5 + b"1234WXYZ"
    assert acts[-1] == Close(1, 0.0)
    assert one_record(t).outcome is Outcome.COMPLETE


def test_retransmission_and_duplicate_are_dropped() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.syn(), c.data(0, b"aaaa"), c.data(0, b"aaaa"), c.data(4, b"bbbb"), c.data(0, b"aaaa"))
    acts += feed(t, c.data(4, b"bbbb"), c.data(8, b"cc"))
    assert sent(acts) == b"aaaabbbbcc"
    assert t.stats.dup_bytes == 12


def test_overlap_spanning_delivered_and_new_bytes() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.syn(), c.data(0, b"abcdef"), c.data(3, b"XXXghij"))
    assert acts[1:] == [Send(1, b"abcdef", 0.0), Send(1, b"ghij", 0.0)]
    assert t.stats.dup_bytes == 3


def test_overlap_with_buffered_bytes_first_received_wins() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.syn(), c.data(4, b"EFGH"), c.data(2, b"cdXXXXij"), c.data(0, b"abYY"))
    assert sent(acts) == b"abcdEFGHij"


def test_overlap_starting_inside_a_buffered_chunk() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.syn(), c.data(4, b"efgh"), c.data(6, b"XXij"), c.data(2, b"cdXXXXXXkl"), c.data(0, b"ab"))
    assert sent(acts) == b"abcdefghijkl"


def test_out_of_order_layers_released_when_the_gap_fills() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    feed(t, c.syn(), c.synack())
    # Three gaps filled back to front, with the buffered pieces arriving in a scrambled order.
    acts = feed(t, c.data(12, b"mnop"), c.data(4, b"efgh"), c.data(20, b"uvwx"), c.data(8, b"ijkl"))
    assert acts == []
    assert t.stats.ooo_segments == 4
    acts = feed(t, c.data(16, b"qrst"))
    assert acts == []
    acts = feed(t, c.data(0, b"abcd", ts=0.5))
    assert acts == [Send(1, b"abcd" + b"efgh" + b"ijkl" + b"mnop" + b"qrst" + b"uvwx", 0.5)]
    # The flow is back on the fast path: in-order data goes straight through.
    assert feed(t, c.data(24, b"yz")) == [Send(1, b"yz", 0.0)]


def test_partial_fill_keeps_waiting_for_the_rest() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.syn(), c.data(8, b"ijkl"), c.data(0, b"abcd"))
    assert sent(acts) == b"abcd"
    assert feed(t, c.data(4, b"efgh")) == [Send(1, b"efghijkl", 0.0)]


def test_hole_timeout_aborts_with_hole() -> None:
    t = FlowTable(FlowConfig(hole_timeout=2.0))
    c = Conn()
    feed(t, c.syn(0.0), c.data(0, b"abcd", 0.0), c.data(8, b"ijkl", 1.0))
    assert tick(t, 2.9) == []
    assert tick(t, 3.0) == [Abort(1, AbortReason.HOLE, 3.0)]
    rec = one_record(t)
    assert (rec.outcome, rec.end, rec.bytes_delivered) == (Outcome.INCOMPLETE, EndReason.HOLE, 4)
    # The late filler opens nothing: the connection is buried.
    assert feed(t, c.data(4, b"efgh", 3.1)) == []
    assert tick(t, 3.2) == []


def test_hole_timeout_is_also_checked_by_later_segments() -> None:
    t = FlowTable(FlowConfig(hole_timeout=2.0))
    c = Conn()
    feed(t, c.syn(0.0), c.data(8, b"ijkl", 1.0))
    assert feed(t, c.data(12, b"mnop", 2.5)) == []
    assert feed(t, c.data(16, b"qrst", 3.0)) == [Abort(1, AbortReason.HOLE, 3.0)]


def test_progress_restarts_the_hole_clock() -> None:
    t = FlowTable(FlowConfig(hole_timeout=2.0))
    c = Conn()
    feed(t, c.syn(0.0), c.data(4, b"efgh", 0.0), c.data(12, b"mnop", 0.0))
    assert sent(feed(t, c.data(0, b"abcd", 1.5))) == b"abcdefgh"
    assert tick(t, 3.0) == []  # 1.5 s since the last progress
    assert tick(t, 3.5) == [Abort(1, AbortReason.HOLE, 3.5)]


def test_server_ack_beyond_the_gap_aborts_after_the_ack_grace() -> None:
    t = FlowTable(FlowConfig(hole_timeout=100.0))
    c = Conn()
    feed(t, c.syn(), c.synack(), c.data(0, b"abcd"), c.sack(4), c.data(8, b"ijkl"))
    # Acknowledged bytes are never resent: not the 100 s hole timeout, only the short grace for capture order.
    assert feed(t, c.sack(12, 0.5)) == []
    assert tick(t, 0.5 + ACK_GRACE / 2) == []
    assert tick(t, 0.5 + ACK_GRACE) == [Abort(1, AbortReason.HOLE, 0.5 + ACK_GRACE)]
    rec = one_record(t)
    assert (rec.outcome, rec.end, rec.bytes_delivered) == (Outcome.INCOMPLETE, EndReason.HOLE, 4)


def test_server_ack_beyond_on_the_fast_path() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    feed(t, c.syn(), c.data(0, b"abcd"))
    # The capture lost bytes 4..8 and nothing after them: only the server's ACK can tell.
    assert feed(t, c.sack(8, 0.2)) == []
    assert feed(t, c.sack(8, 0.2 + ACK_GRACE)) == [Abort(1, AbortReason.HOLE, 0.2 + ACK_GRACE)]


def test_ack_captured_just_before_its_data_is_not_a_hole() -> None:
    # tcpdump -i any on several CPUs can write the server's ACK a moment before the data it acknowledges.
    t = FlowTable(FlowConfig())
    c = Conn()
    feed(t, c.syn(), c.data(0, b"abcd"))
    assert feed(t, c.sack(8, 0.1)) == []
    assert feed(t, c.data(4, b"efgh", 0.11)) == [Send(1, b"efgh", 0.11)]
    assert tick(t, 5.0) == []
    assert feed(t, c.fin(8, 5.0)) == [Close(1, 5.0)]


def test_acks_of_syn_and_fin_are_not_holes() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.syn(), c.synack(), c.sack(0), c.data(0, b"ab"), c.sack(2), c.sack(1), c.fin(2))
    acts += feed(t, c.sack(3, flags=ACK | FIN))
    assert acts[-1] == Close(1, 0.0)
    assert not [a for a in acts if isinstance(a, Abort)]
    assert one_record(t).outcome is Outcome.COMPLETE


def test_fin_before_the_gap_fills() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.syn(), c.data(0, b"ab"), c.fin(4), c.sack(2))
    assert sent(acts) == b"ab"
    assert kinds(acts) == ["Open", "Send"]
    assert feed(t, c.data(2, b"cd", 0.3)) == [Send(1, b"cd", 0.3), Close(1, 0.3)]
    assert one_record(t).end is EndReason.FIN


def test_fin_beyond_a_gap_that_never_fills() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    feed(t, c.syn(), c.data(0, b"ab"), c.fin(4, 0.1))
    assert finish(t) == [Abort(1, AbortReason.HOLE, 0.1)]
    assert one_record(t).outcome is Outcome.INCOMPLETE


def test_server_ack_of_a_fin_beyond_the_gap_aborts() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    feed(t, c.syn(), c.data(0, b"ab"), c.fin(4))
    assert feed(t, c.sack(5, 0.2)) == []
    assert tick(t, 0.2 + ACK_GRACE) == [Abort(1, AbortReason.HOLE, 0.2 + ACK_GRACE)]


def test_data_after_fin_is_ignored() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    # FIN at offset 4 arrives first; then a bogus segment crossing it and one wholly after it.
    acts = feed(t, c.syn(), c.fin(4), c.data(2, b"cdXY"), c.data(6, b"zz"), c.data(0, b"ab"))
    assert sent(acts) == b"abcd"
    assert acts[-1] == Close(1, 0.0)


def test_fin_with_payload() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.syn(), c.fin(0, payload=b"bye"))
    assert acts[1:] == [Send(1, b"bye", 0.0), Close(1, 0.0)]


def test_rst_from_client() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.syn(), c.data(0, b"ab"), c.rst(2, 0.5))
    assert acts[-1] == Abort(1, AbortReason.RESET, 0.5)
    rec = one_record(t)
    assert (rec.outcome, rec.end) == (Outcome.COMPLETE, EndReason.RESET)
    assert t.open_flows == 0


def test_rst_from_server_with_a_pending_hole_is_incomplete() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.syn(), c.data(0, b"ab"), c.data(4, b"ef"), c.srst(0.5))
    assert acts[-1] == Abort(1, AbortReason.RESET, 0.5)
    assert sent(acts) == b"ab"
    rec = one_record(t)
    assert (rec.outcome, rec.end) == (Outcome.INCOMPLETE, EndReason.RESET)


def test_reuse_of_a_closed_four_tuple_gets_a_new_id() -> None:
    t = FlowTable(FlowConfig())
    a, b = Conn(isn=1000), Conn(isn=900_000)
    acts = feed(t, a.syn(), a.data(0, b"one"), a.fin(3), a.sack(4, flags=FIN | ACK))
    acts += feed(t, b.syn(1.0), b.data(0, b"two", 1.0), b.fin(3, 1.0))
    assert acts == [
        Open(1, CLIENT, SERVER, False, 0.0), Send(1, b"one", 0.0), Close(1, 0.0),
        Open(2, CLIENT, SERVER, False, 1.0), Send(2, b"two", 1.0), Close(2, 1.0),
    ]
    assert t.stats.reused_tuples == 1


def test_reuse_of_a_live_four_tuple_ends_the_old_flow() -> None:
    t = FlowTable(FlowConfig())
    a, b = Conn(isn=1000), Conn(isn=3_000_000_000)
    feed(t, a.syn(), a.data(0, b"one"))
    acts = feed(t, a.syn(0.5), b.syn(1.0), b.data(0, b"two", 1.0))  # a retransmitted SYN, then a new one
    assert acts == [Close(1, 1.0), Open(2, CLIENT, SERVER, False, 1.0), Send(2, b"two", 1.0)]
    assert one_record(t).flow == 1
    assert t.stats.reused_tuples == 1


def test_reuse_of_a_live_four_tuple_with_a_hole_aborts_the_old_flow() -> None:
    t = FlowTable(FlowConfig())
    a, b = Conn(isn=1000), Conn(isn=77)
    feed(t, a.syn(), a.data(4, b"late"))
    acts = feed(t, b.syn(1.0))
    assert acts == [Abort(1, AbortReason.HOLE, 1.0), Open(2, CLIENT, SERVER, False, 1.0)]


def test_mid_stream_join_is_partial() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    assert feed(t, c.sack(100)) == []  # a pure ACK of an unknown connection opens nothing
    assert t.stats.ignored == 1
    acts = feed(t, c.data(100, b"xyz", 1.0), c.data(90, b"0123456789"), c.data(103, b"!"), c.fin(104, 2.0))
    assert acts == [Open(1, CLIENT, SERVER, True, 1.0), Send(1, b"xyz", 1.0), Send(1, b"!", 0.0), Close(1, 2.0)]
    rec = one_record(t)
    assert (rec.partial, rec.outcome, rec.direction_guessed) == (True, Outcome.COMPLETE, True)


def test_partial_flow_ack_below_its_start_is_not_a_hole() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.data(100, b"xyz"), c.sack(50), c.sack(103))
    assert kinds(acts) == ["Open", "Send"]


def test_skip_partial() -> None:
    t = FlowTable(FlowConfig(skip_partial=True))
    c, d = Conn(), Conn(client=Endpoint("10.0.0.9", 50000))
    acts = feed(t, c.data(100, b"xyz"), c.data(103, b"more"), d.syn(), d.data(0, b"ok"), c.fin(107, 3.0))
    assert acts == [Open(2, d.client, SERVER, False, 0.0), Send(2, b"ok", 0.0)]
    assert t.open_flows == 1
    rec = one_record(t)
    assert (rec.flow, rec.outcome, rec.end, rec.bytes_delivered) == (1, Outcome.SKIPPED, EndReason.FIN, 0)
    assert feed(t, c.data(107, b"late")) == []  # buried like any other ended connection


def test_direction_by_port() -> None:
    # With --port the first payload the capture sees may come from the server: it must not open a flow.
    t = FlowTable(FlowConfig(server_port=8080))
    c = Conn()
    assert feed(t, c.sack(0, payload=b"HTTP/1.1 200 OK\r\n")) == []
    acts = feed(t, c.data(0, b"GET"))
    assert acts[0] == Open(1, CLIENT, SERVER, True, 0.0)
    assert one_record_or_none(t) is None
    # Traffic touching neither side's port is not ours.
    other = Conn(client=Endpoint("10.0.0.1", 40001), server=Endpoint("10.0.0.2", 9090))
    assert feed(t, other.syn(), other.data(0, b"x")) == []
    assert t.stats.ignored == 3
    finish(t)
    assert one_record(t).direction_guessed is False


def one_record_or_none(table: FlowTable) -> FlowRecord | None:
    ended = records(table)
    return ended[0] if ended else None


def test_direction_by_port_when_both_ports_are_equal_uses_the_syn() -> None:
    t = FlowTable(FlowConfig(server_port=5000))
    c = Conn(client=Endpoint("10.0.0.1", 5000), server=Endpoint("10.0.0.2", 5000))
    acts = feed(t, c.syn(), c.data(0, b"hi"))
    assert acts[0] == Open(1, c.client, c.server, False, 0.0)
    assert sent(acts) == b"hi"


def test_direction_by_syn_whatever_the_ports() -> None:
    # The client has the low port here: only the SYN can tell.
    t = FlowTable(FlowConfig())
    c = Conn(client=Endpoint("10.0.0.1", 80), server=Endpoint("10.0.0.2", 45000))
    acts = feed(t, c.syn(), c.synack(), c.data(0, b"hi"))
    assert acts[0] == Open(1, c.client, c.server, False, 0.0)


def test_missed_syn_but_seen_syn_ack_gives_a_whole_flow() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.synack(), c.data(0, b"hi"), c.syn(0.1))  # the SYN shows up late: a retransmission
    assert acts == [Open(1, CLIENT, SERVER, False, 0.0), Send(1, b"hi", 0.0)]


@pytest.mark.parametrize(
    ("a", "b", "server"),
    [
        (Endpoint("10.0.0.1", 50000), Endpoint("10.0.0.2", 443), "b"),  # low port vs ephemeral: low is server
        (Endpoint("10.0.0.2", 443), Endpoint("10.0.0.1", 50000), "a"),
        (Endpoint("10.0.0.1", 40000), Endpoint("10.0.0.2", 41000), "b"),  # both ephemeral: payload receiver
        (Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 443), "b"),  # both low: payload receiver
    ],
)
def test_guessed_direction(a: Endpoint, b: Endpoint, server: str) -> None:
    t = FlowTable(FlowConfig())
    acts = feed(t, Segment(0.0, a, b, 7, 1, ACK | PSH, b"payload"))
    if server == "b":
        assert acts == [Open(1, a, b, True, 0.0), Send(1, b"payload", 0.0)]
    else:
        assert acts == []  # the server spoke first: wait for the client's bytes
        acts = feed(t, Segment(0.0, b, a, 1, 14, ACK | PSH, b"req"))
        assert acts == [Open(1, b, a, True, 0.0), Send(1, b"req", 0.0)]
    finish(t)
    assert one_record(t).direction_guessed is True


def test_idle_close_and_idle_with_a_hole() -> None:
    t = FlowTable(FlowConfig(idle_timeout=10.0, hole_timeout=1000.0))
    c, d = Conn(), Conn(client=Endpoint("10.0.0.9", 50000))
    feed(t, c.syn(0.0), c.data(0, b"ab", 1.0), d.syn(0.0), d.data(4, b"gap", 2.0))
    assert tick(t, 5.0) == []
    assert tick(t, 13.0) == [Close(1, 13.0), Abort(2, AbortReason.HOLE, 13.0)]
    ends = {r.flow: (r.end, r.outcome) for r in records(t)}
    assert ends == {1: (EndReason.IDLE, Outcome.COMPLETE), 2: (EndReason.HOLE, Outcome.INCOMPLETE)}
    # A connection that comes back after the idle close is mirrored again, as a partial flow.
    acts = feed(t, c.data(2, b"cd", 20.0))
    assert acts == [Open(3, CLIENT, SERVER, True, 20.0), Send(3, b"cd", 20.0)]


def test_late_retransmission_after_close_opens_nothing() -> None:
    t = FlowTable(FlowConfig(tombstone_ttl=60.0))
    c = Conn()
    feed(t, c.syn(), c.data(0, b"ab"), c.fin(2, 1.0))
    assert feed(t, c.data(0, b"ab", 2.0), c.fin(2, 2.0), c.sack(3, 2.0, payload=b"resp"), c.rst(3, 2.0)) == []
    assert t.stats.ignored == 4
    assert tick(t, 50.0) == []
    assert feed(t, c.sack(3, 55.0)) == []  # strays keep the tombstone alive
    tick(t, 114.0)
    assert t.tracking().tombstones == 1
    tick(t, 115.0)
    assert feed(t, c.data(3, b"new", 120.0)) == [Open(2, CLIENT, SERVER, True, 120.0), Send(2, b"new", 120.0)]


def test_tombstones_are_bounded_by_count() -> None:
    t = FlowTable(FlowConfig(max_tombstones=2))
    conns = [Conn(client=Endpoint("10.0.0.1", 40000 + i)) for i in range(3)]
    for c in conns:
        feed(t, c.syn(), c.fin(0))
    assert t.tracking().tombstones == 2
    # The oldest tombstone was dropped: its stray opens a partial flow again; the newest still absorbs.
    assert kinds(feed(t, conns[0].data(1, b"x"))) == ["Open", "Send"]
    assert feed(t, conns[2].data(1, b"x")) == []


def test_give_up() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    feed(t, c.syn(), c.data(0, b"ab", 0.5))
    give_up(t, 1)
    assert t.open_flows == 0
    rec = one_record(t)
    assert (rec.end, rec.outcome, rec.bytes_delivered) == (EndReason.GAVE_UP, Outcome.COMPLETE, 2)
    assert feed(t, c.data(2, b"cd"), c.data(10, b"gap"), c.sack(100), c.fin(13)) == []
    assert records(t) == []
    assert t.tracking().flows == 0
    assert feed(t, c.data(13, b"late")) == []  # still buried after its end
    give_up(t, 1)  # unknown by now: harmless
    give_up(t, 12345)


def test_give_up_then_idle_or_finish_emits_nothing() -> None:
    t = FlowTable(FlowConfig(idle_timeout=10.0))
    c, d = Conn(), Conn(client=Endpoint("10.0.0.9", 50000))
    feed(t, c.syn(), d.syn(), d.data(3, b"gap"))
    give_up(t, 1)
    give_up(t, 2)
    assert one_record_or_none(t) is not None
    assert tick(t, 100.0) == []
    assert finish(t) == []
    assert records(t) == []


def test_interrupt_forgets_open_flows() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    feed(t, c.syn(), c.data(0, b"ab"))
    assert interrupt(t, 5.0) == [Abort(1, AbortReason.GAP, 5.0)]
    rec = one_record(t)
    assert (rec.end, rec.outcome) == (EndReason.GAP, Outcome.INCOMPLETE)
    acts = feed(t, c.data(2, b"cd", 6.0))
    assert acts == [Open(2, CLIENT, SERVER, True, 6.0), Send(2, b"cd", 6.0)]


def test_interrupt_of_one_pod_leaves_the_other_pods_flows_alone() -> None:
    t = FlowTable(FlowConfig())
    a = Conn()
    b = Conn(client=Endpoint("10.0.0.9", 40001), server=Endpoint("10.0.0.3", 8080))
    feed(t, a.syn(), a.data(0, b"ab"), b.syn(), b.data(0, b"xy"))
    assert interrupt(t, 5.0, servers={"10.0.0.3"}) == [Abort(2, AbortReason.GAP, 5.0)]
    assert one_record(t).flow == 2
    assert feed(t, a.data(2, b"cd", 6.0)) == [Send(1, b"cd", 6.0)]


def test_cut_segment_is_a_hole_that_a_retransmission_fills() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.syn(), c.data(0, b"ab"), c.data(2, b"c?", whole=False), c.data(4, b"ef"))
    assert sent(acts) == b"ab"
    acts = feed(t, c.data(2, b"cd"))
    assert acts == [Send(1, b"cdef", 0.0)]


def test_cut_last_segment_is_a_hole_at_the_end() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    feed(t, c.syn(), c.data(0, b"ab", 0.2), c.data(2, b"c", 0.3, whole=False))
    assert finish(t) == [Abort(1, AbortReason.HOLE, 0.3)]


def test_cut_first_segment_of_a_partial_flow() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.data(0, b"ab", whole=False), c.data(2, b"cd"))
    assert kinds(acts) == ["Open"]
    assert feed(t, c.data(0, b"ab")) == [Send(1, b"abcd", 0.0)]


def test_out_of_order_buffer_limit_ends_the_flow() -> None:
    t = FlowTable(FlowConfig(max_ooo_bytes=10))
    c = Conn()
    feed(t, c.syn(), c.data(2, b"cdefgh"))
    assert feed(t, c.data(8, b"ijklmn", 0.4)) == [Abort(1, AbortReason.HOLE, 0.4)]
    assert one_record(t).outcome is Outcome.INCOMPLETE


def test_finish_closes_open_flows() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    feed(t, c.syn(), c.data(0, b"ab", 0.7))
    assert finish(t) == [Close(1, 0.7)]
    rec = one_record(t)
    assert (rec.end, rec.outcome) == (EndReason.END_OF_CAPTURE, Outcome.COMPLETE)


def test_many_interleaved_flows_keep_their_bytes_apart() -> None:
    t = FlowTable(FlowConfig())
    conns = [Conn(isn=i * 7919, client=Endpoint("10.0.1.1", 30000 + i)) for i in range(50)]
    acts: list[Action] = []
    for c in conns:
        acts += feed(t, c.syn())
    for k in range(10):
        for i, c in enumerate(conns):
            acts += feed(t, c.data(k * 3, f"{i:03d}".encode()))
    opened = {a.client.port: a.flow for a in acts if isinstance(a, Open)}
    for i in range(50):
        assert sent(acts, opened[30000 + i]) == f"{i:03d}".encode() * 10


def test_memory_returns_to_empty_after_many_short_connections() -> None:
    t = FlowTable(FlowConfig(max_tombstones=100, tombstone_ttl=5.0))
    for i in range(2000):
        c = Conn(isn=i * 104729, client=Endpoint(f"10.{i >> 8}.{i & 255}.1", 40000 + i % 20000))
        ts = i * 0.01
        ends = ("fin", "rst", "srst", "hole")[i % 4]
        feed(t, c.syn(ts), c.synack(ts), c.data(0, b"req", ts))
        if ends == "fin":
            feed(t, c.fin(3, ts), c.sack(4, ts, flags=FIN | ACK))
        elif ends == "rst":
            feed(t, c.rst(3, ts))
        elif ends == "srst":
            feed(t, c.srst(ts))
        else:
            feed(t, c.data(10, b"late", ts), c.sack(14, ts), c.sack(14, ts + 2 * ACK_GRACE))
        if i % 100 == 0:
            tick(t, ts)
        assert t.tracking().index == 0 and t.tracking().flows == 0 and t.tracking().holes == 0
    assert t.tracking().tombstones <= 100
    tick(t, 1000.0)
    assert t.tracking().tombstones == 0
    assert len(records(t)) == 2000
    assert records(t) == []
    assert t.stats.flows == 2000


def test_stats() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    feed(t, c.sack(0), c.syn(), c.data(4, b"x"), c.data(0, b"abcd"), c.data(0, b"ab"))
    s = t.stats
    assert (s.segments, s.ignored, s.ooo_segments, s.dup_bytes, s.flows) == (5, 1, 1, 2, 1)


def test_reuse_after_give_up_opens_a_new_flow() -> None:
    t = FlowTable(FlowConfig())
    a, b = Conn(isn=1000), Conn(isn=5_000_000)
    feed(t, a.syn(), a.data(0, b"one"))
    give_up(t, 1)
    records(t)
    acts = feed(t, a.data(3, b"more"), b.syn(1.0), b.data(0, b"two", 1.0))
    assert acts == [Open(2, CLIENT, SERVER, False, 1.0), Send(2, b"two", 1.0)]
    assert records(t) == []  # the given-up flow was already recorded once


def test_rst_and_server_data_of_unknown_connections_open_nothing() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    assert feed(t, c.rst(0), c.srst(), c.sack(0, payload=b"response bytes")) == []
    assert t.stats.ignored == 3
    assert t.tracking().flows == 0
