"""FlowConfig.server_stream: the server->client bytes of each mirrored flow as Reply actions.

Scripts of segments in, actions out, then properties over random segmentations of both directions. The client
side must behave exactly as without the option, whatever happens to the server's bytes.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
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
    EndReason,
    FlowRecord,
    Open,
    Outcome,
    Reply,
    Segment,
    Send,
)
from kubectl_mirror.reassemble import FlowConfig, FlowTable
from kubectl_mirror.stack import coalesce
from tests.test_reassemble import (
    CLIENT,
    MASK,
    SERVER,
    feed,
    finish,
    give_up,
    interrupt,
    one_record,
    records,
    sent,
    tick,
)
from tests.test_reassemble_props import Piece, transmissions


class Conn:
    """Both directions of one connection; offsets are relative to each side's ISN (isn+1 = offset 0)."""

    def __init__(self, isn: int = 1000, sisn: int = 5000, client: Endpoint = CLIENT, server: Endpoint = SERVER):
        self.isn, self.sisn, self.client, self.server = isn, sisn, client, server

    def cseq(self, off: int) -> int:
        return (self.isn + 1 + off) & MASK

    def sseq(self, off: int) -> int:
        return (self.sisn + 1 + off) & MASK

    def syn(self, ts: float = 0.0) -> Segment:
        return Segment(ts, self.client, self.server, self.isn, 0, SYN, b"")

    def synack(self, ts: float = 0.0, data: bytes = b"") -> Segment:
        return Segment(ts, self.server, self.client, self.sisn, self.cseq(0), SYN | ACK, data)

    def req(self, off: int, data: bytes, ts: float = 0.0, ack: int = 0, flags: int = ACK | PSH) -> Segment:
        """Client bytes at client offset `off`, acknowledging server offset `ack`."""
        return Segment(ts, self.client, self.server, self.cseq(off), self.sseq(ack), flags, data)

    def cfin(self, off: int, ts: float = 0.0, ack: int = 0) -> Segment:
        return self.req(off, b"", ts, ack, FIN | ACK)

    def cack(self, ack: int, ts: float = 0.0, off: int = 0) -> Segment:
        return self.req(off, b"", ts, ack, ACK)

    def resp(
        self, off: int, data: bytes, ts: float = 0.0, ack: int = 0, flags: int = ACK | PSH, whole: bool = True
    ) -> Segment:
        """Server bytes at server offset `off`, acknowledging client offset `ack`."""
        return Segment(ts, self.server, self.client, self.sseq(off), self.cseq(ack), flags, data, whole)

    def sfin(self, off: int, ts: float = 0.0, ack: int = 0) -> Segment:
        return self.resp(off, b"", ts, ack, FIN | ACK)

    def crst(self, off: int, ts: float = 0.0) -> Segment:
        return Segment(ts, self.client, self.server, self.cseq(off), 0, RST, b"")

    def srst(self, off: int, ts: float = 0.0) -> Segment:
        return Segment(ts, self.server, self.client, self.sseq(off), 0, RST | ACK, b"")


def table(
    hole_timeout: float = 2.0, idle_timeout: float = 300.0, max_ooo_bytes: int = 8 << 20, skip_partial: bool = False
) -> FlowTable:
    cfg = FlowConfig(
        hole_timeout=hole_timeout, idle_timeout=idle_timeout, max_ooo_bytes=max_ooo_bytes, skip_partial=skip_partial,
        server_stream=True,
    )
    return FlowTable(cfg)


def replied(actions: list[Action], flow: int | None = None) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, Reply) and (flow is None or a.flow == flow))


def without_replies(actions: list[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, Reply)]




def handshake(t: FlowTable, c: Conn) -> None:
    assert feed(t, c.syn(), c.synack(), c.cack(0)) == [Open(1, c.client, c.server, False, 0.0)]


# ---- scripts --------------------------------------------------------------------------------------------


def test_request_and_response() -> None:
    t = table()
    c = Conn()
    handshake(t, c)
    acts = feed(t, c.req(0, b"GET / HTTP/1.1\r\n\r\n", 0.1), c.resp(0, b"HTTP/1.1 200 OK\r\n", 0.2, ack=18))
    acts += feed(t, c.resp(17, b"\r\n", 0.3, ack=18), c.cack(19, 0.31, off=18))
    assert acts == [
        Send(1, b"GET / HTTP/1.1\r\n\r\n", 0.1), Reply(1, b"HTTP/1.1 200 OK\r\n", 0.2), Reply(1, b"\r\n", 0.3),
    ]
    assert feed(t, c.cfin(18, 0.4, ack=19)) == [Close(1, 0.4)]
    assert records(t) == []  # the server has not finished: its side is still followed
    assert feed(t, c.sfin(19, 0.5, ack=19), c.cack(20, 0.51, off=19)) == []
    rec = one_record(t)
    assert (rec.outcome, rec.end, rec.bytes_delivered, rec.reply_complete) == (
        Outcome.COMPLETE, EndReason.FIN, 18, True
    )
    assert rec.last_ts == 0.5
    assert t.tracking().index == 0 and t.tracking().draining == 0


def test_without_server_stream_server_bytes_emit_nothing() -> None:
    t = FlowTable(FlowConfig())
    c = Conn()
    acts = feed(t, c.syn(), c.synack(), c.req(0, b"GET"), c.resp(0, b"200", ack=3), c.cfin(3, ack=3))
    assert [type(a) for a in acts] == [Open, Send, Close]
    assert one_record(t).reply_complete is True


def test_keep_alive_interleaves_sends_and_replies_in_capture_order() -> None:
    t = table()
    c = Conn()
    handshake(t, c)
    acts = feed(
        t,
        c.req(0, b"req1", 1.0),
        c.resp(0, b"resp", 1.1, ack=4), c.resp(4, b"1", 1.2, ack=4),
        c.req(4, b"req2", 2.0, ack=5),
        c.resp(5, b"resp2", 2.1, ack=8),
        c.req(8, b"req3", 3.0, ack=10),
    )
    assert acts == [
        Send(1, b"req1", 1.0), Reply(1, b"resp", 1.1), Reply(1, b"1", 1.2),
        Send(1, b"req2", 2.0), Reply(1, b"resp2", 2.1), Send(1, b"req3", 3.0),
    ]


def test_coalesce_merges_sends_but_keeps_replies_in_place() -> None:
    t = table()
    c = Conn()
    d = Conn(client=Endpoint("10.0.0.9", 50000))
    acts = feed(t, c.syn(), c.synack(), d.syn(), d.synack())
    acts += feed(
        t,
        c.req(0, b"a"), c.req(1, b"b"), d.resp(0, b"D"), c.req(2, b"c"),  # another flow's Reply: no barrier
        c.resp(0, b"X", ack=3), c.req(3, b"d"), c.req(4, b"e"), c.resp(1, b"Y", ack=5),
    )
    merged = coalesce(acts)
    assert merged == [
        Open(1, CLIENT, SERVER, False, 0.0), Open(2, d.client, SERVER, False, 0.0),
        Send(1, b"abc", 0.0), Reply(2, b"D", 0.0), Reply(1, b"X", 0.0), Send(1, b"de", 0.0), Reply(1, b"Y", 0.0),
    ]


def test_server_retransmission_duplicate_and_overlap_are_trimmed() -> None:
    t = table()
    c = Conn()
    handshake(t, c)
    acts = feed(
        t,
        c.resp(0, b"abcd"), c.resp(0, b"abcd"), c.resp(2, b"XXef"), c.resp(4, b"efgh"), c.resp(0, b"abcdefghij"),
    )
    assert acts == [Reply(1, b"abcd", 0.0), Reply(1, b"ef", 0.0), Reply(1, b"gh", 0.0), Reply(1, b"ij", 0.0)]
    assert t.stats.dup_bytes == 0  # the statistic is about client bytes only


def test_out_of_order_server_segments_are_buffered_then_released() -> None:
    t = table()
    c = Conn()
    handshake(t, c)
    acts = feed(t, c.resp(8, b"ijkl", 0.1), c.resp(4, b"EFGH", 0.2), c.resp(10, b"XXmn", 0.3))
    assert acts == []
    # Client bytes still flow meanwhile: the server's gap is none of their business.
    assert feed(t, c.req(0, b"req", 0.35)) == [Send(1, b"req", 0.35)]
    assert feed(t, c.resp(0, b"abcd", 0.4)) == [Reply(1, b"abcdEFGHijklmn", 0.4)]
    assert feed(t, c.resp(14, b"op", 0.5)) == [Reply(1, b"op", 0.5)]
    finish(t)
    assert one_record(t).reply_complete is True


@pytest.mark.parametrize("sisn", [MASK - 3, MASK, MASK - 10])
def test_server_sequence_wrap_around(sisn: int) -> None:
    t = table()
    c = Conn(sisn=sisn)
    handshake(t, c)
    segs = [c.resp(i * 4, b"abcd") for i in range(4)]
    segs += [c.resp(20, b"WXYZ"), c.resp(16, b"1234"), c.sfin(24)]  # out of order across the wrap too
    acts = feed(t, *segs, c.cfin(0, ack=25))
    assert replied(acts) == b"abcd" * 4 + b"1234WXYZ"
    assert acts[-1] == Close(1, 0.0)
    assert one_record(t).reply_complete is True  # the server had finished: the record comes with the Close


def test_missed_syn_ack_starts_from_the_first_server_byte() -> None:
    t = table()
    c = Conn()
    acts = feed(t, c.syn(), c.req(0, b"GET"), c.resp(0, b"200", ack=3), c.resp(0, b"200", ack=3))
    assert acts[1:] == [Send(1, b"GET", 0.0), Reply(1, b"200", 0.0)]


def test_flow_opened_by_a_syn_ack_with_data() -> None:
    t = table()
    c = Conn()
    acts = feed(t, c.synack(0.1, data=b"hello"), c.resp(5, b" world"))
    assert acts == [Open(1, CLIENT, SERVER, False, 0.1), Reply(1, b"hello", 0.1), Reply(1, b" world", 0.0)]


def test_partial_flow_replies_from_the_first_server_byte_seen_after_the_join() -> None:
    t = table()
    c = Conn()
    # Server bytes of a connection not tracked yet belong to nothing we mirror.
    assert feed(t, c.resp(100, b"old response")) == []
    acts = feed(t, c.req(50, b"GET", 1.0, ack=112), c.resp(112, b"new", 1.1, ack=53))
    # A retransmission reaching back before the first byte seen: only its new tail counts.
    acts += feed(t, c.resp(100, b"old responsenewMORE", 1.2), c.resp(119, b"!", 1.3))
    assert acts == [
        Open(1, CLIENT, SERVER, True, 1.0), Send(1, b"GET", 1.0),
        Reply(1, b"new", 1.1), Reply(1, b"MORE", 1.2), Reply(1, b"!", 1.3),
    ]


def test_partial_flow_pure_server_acks_do_not_start_the_stream() -> None:
    t = table()
    c = Conn()
    acts = feed(t, c.req(50, b"GET", ack=7), c.resp(3, b"", ack=53, flags=ACK), c.resp(7, b"200", ack=53))
    assert replied(acts) == b"200"
    finish(t)
    assert one_record(t).reply_complete is True


def test_server_hole_timeout_stops_replies_but_not_the_client() -> None:
    t = table(hole_timeout=2.0)
    c = Conn()
    handshake(t, c)
    acts = feed(t, c.req(0, b"r1", 0.0), c.resp(0, b"ab", 0.1, ack=2), c.resp(4, b"ef", 0.5, ack=2))
    assert acts == [Send(1, b"r1", 0.0), Reply(1, b"ab", 0.1)]
    assert tick(t, 2.0) == []
    assert t.tracking().reply_holes == 1
    assert tick(t, 2.5) == []  # no action: the Replies just stop
    assert t.tracking().reply_holes == 0
    acts = feed(t, c.resp(2, b"cd", 2.6, ack=2), c.resp(6, b"gh", 2.7, ack=2), c.req(2, b"r2", 2.8, ack=2))
    assert acts == [Send(1, b"r2", 2.8)]
    assert t.open_flows == 1
    acts = feed(t, c.cfin(4, 3.0, ack=2))
    assert acts == [Close(1, 3.0)]
    rec = one_record(t)  # nothing left to follow on the server side: recorded with the Close
    assert (rec.outcome, rec.end, rec.bytes_delivered, rec.reply_complete) == (
        Outcome.COMPLETE, EndReason.FIN, 4, False
    )


def test_server_hole_timeout_is_also_checked_by_later_server_segments() -> None:
    t = table(hole_timeout=2.0)
    c = Conn()
    handshake(t, c)
    assert feed(t, c.resp(4, b"ef", 1.0), c.resp(6, b"gh", 2.9)) == []
    assert t.tracking().reply_holes == 1
    assert feed(t, c.resp(8, b"ij", 3.0)) == []
    assert t.tracking().reply_holes == 0
    assert feed(t, c.resp(0, b"abcd", 3.1)) == []  # too late: the stream stays stopped


def test_client_ack_beyond_the_server_bytes_stops_replies_at_once() -> None:
    t = table(hole_timeout=100.0)
    c = Conn()
    handshake(t, c)
    acts = feed(t, c.req(0, b"GET", 0.1), c.resp(0, b"ab", 0.2, ack=3), c.resp(4, b"ef", 0.3, ack=3))
    assert acts == [Send(1, b"GET", 0.1), Reply(1, b"ab", 0.2)]
    # The client acknowledges server bytes 2..4 the capture never had: they will not be resent.
    assert feed(t, c.req(3, b"more", 0.4, ack=6)) == [Send(1, b"more", 0.4)]
    assert feed(t, c.resp(2, b"cd", 0.5, ack=7), c.resp(6, b"gh", 0.6, ack=7)) == []
    assert feed(t, c.req(7, b"!", 0.7, ack=8)) == [Send(1, b"!", 0.7)]
    finish(t)
    rec = one_record(t)
    assert (rec.outcome, rec.reply_complete) == (Outcome.COMPLETE, False)


def test_client_ack_of_the_server_fin_is_no_hole() -> None:
    t = table()
    c = Conn()
    handshake(t, c)
    acts = feed(t, c.resp(0, b"bye", 0.1), c.sfin(3, 0.2), c.cack(4, 0.3), c.req(0, b"x", 0.4, ack=4))
    assert acts == [Reply(1, b"bye", 0.1), Send(1, b"x", 0.4)]
    assert feed(t, c.cfin(1, 0.5, ack=4)) == [Close(1, 0.5)]
    assert one_record(t).reply_complete is True


def test_cut_server_segment_is_a_gap_a_retransmission_fills() -> None:
    t = table()
    c = Conn()
    handshake(t, c)
    acts = feed(t, c.resp(0, b"ab"), c.resp(2, b"c", whole=False), c.resp(4, b"ef"))
    assert acts == [Reply(1, b"ab", 0.0)]
    assert feed(t, c.resp(2, b"cd")) == [Reply(1, b"cdef", 0.0)]


def test_server_out_of_order_limit_stops_replies_only() -> None:
    t = table(max_ooo_bytes=6)
    c = Conn()
    handshake(t, c)
    assert feed(t, c.resp(2, b"cdef"), c.resp(6, b"ghij")) == []
    assert feed(t, c.resp(0, b"ab"), c.req(0, b"still here")) == [Send(1, b"still here", 0.0)]
    finish(t)
    rec = one_record(t)
    assert (rec.outcome, rec.reply_complete) == (Outcome.COMPLETE, False)


def test_server_reset_aborts_as_before_and_records_the_reply_state() -> None:
    t = table()
    c = Conn()
    handshake(t, c)
    acts = feed(t, c.req(0, b"GET"), c.resp(0, b"ab", ack=3), c.resp(4, b"ef", ack=3), c.srst(6, 0.5))
    assert acts == [Send(1, b"GET", 0.0), Reply(1, b"ab", 0.0), Abort(1, AbortReason.RESET, 0.5)]
    rec = one_record(t)
    assert (rec.outcome, rec.end, rec.reply_complete) == (Outcome.COMPLETE, EndReason.RESET, False)
    assert feed(t, c.resp(2, b"cd")) == []  # buried


def test_client_reset_ends_a_draining_flow_silently() -> None:
    t = table()
    c = Conn()
    handshake(t, c)
    assert feed(t, c.req(0, b"GET"), c.cfin(3)) == [Send(1, b"GET", 0.0), Close(1, 0.0)]
    assert feed(t, c.resp(0, b"partial", ack=4), c.crst(4, 0.7)) == [Reply(1, b"partial", 0.0)]
    rec = one_record(t)
    assert (rec.end, rec.outcome, rec.reply_complete, rec.last_ts) == (EndReason.FIN, Outcome.COMPLETE, True, 0.7)
    assert feed(t, c.resp(7, b"late")) == []
    assert t.tracking().index == 0 and t.tracking().draining == 0


def test_half_closed_client_still_gets_the_whole_answer() -> None:
    t = table(hole_timeout=2.0)
    c = Conn()
    handshake(t, c)
    assert feed(t, c.req(0, b"GET", 0.1), c.cfin(3, 0.2)) == [Send(1, b"GET", 0.1), Close(1, 0.2)]
    assert t.open_flows == 0
    # The client's own strays meet its tombstone, exactly as without server_stream.
    assert feed(t, c.req(0, b"GET", 0.3), c.cack(0, 0.3, off=4)) == []
    acts = feed(t, c.resp(4, b"BODY", 0.4, ack=4), c.resp(0, b"HEAD", 0.5, ack=4), c.cack(8, 0.6, off=4))
    assert acts == [Reply(1, b"HEADBODY", 0.5)]
    assert records(t) == []
    assert feed(t, c.sfin(8, 0.7, ack=4)) == []
    assert one_record(t).reply_complete is True
    assert feed(t, c.resp(0, b"HEADBODY", 0.8), c.cack(9, 0.9, off=4)) == []  # buried like any ended flow


def test_draining_flow_client_ack_beyond_ends_it() -> None:
    t = table(hole_timeout=100.0)
    c = Conn()
    handshake(t, c)
    feed(t, c.cfin(0, 0.1))
    assert feed(t, c.resp(0, b"ab", 0.2, ack=1), c.cack(4, 0.3, off=1)) == [Reply(1, b"ab", 0.2)]
    rec = one_record(t)
    assert (rec.end, rec.reply_complete) == (EndReason.FIN, False)
    assert t.tracking().index == 0 and t.tracking().draining == 0 and t.tracking().reply_holes == 0


def test_draining_flow_hole_timeout_ends_it() -> None:
    t = table(hole_timeout=2.0)
    c = Conn()
    handshake(t, c)
    feed(t, c.cfin(0, 0.1), c.resp(2, b"cd", 0.2, ack=1))
    assert tick(t, 2.1) == []
    assert records(t) == []
    assert tick(t, 2.2) == []
    assert one_record(t).reply_complete is False
    assert t.tracking().index == 0 and t.tracking().draining == 0 and t.tracking().reply_holes == 0


def test_draining_flow_idle_finish_and_interrupt() -> None:
    t = table(idle_timeout=10.0)
    conns = [Conn(client=Endpoint("10.0.0.1", 40000 + i), server=Endpoint(f"10.0.0.{2 + i}", 8080)) for i in range(4)]
    for c in conns:
        feed(t, c.syn(), c.synack(), c.cfin(0, 1.0), c.resp(0, b"x", 1.0, ack=1))
    feed(t, conns[0].resp(1, b"y", 5.0, ack=1), conns[1].resp(1, b"y", 8.0, ack=1))
    feed(t, conns[2].cack(1, 9.0, off=1), conns[3].cack(1, 9.0, off=1))  # the client's ACKs count as activity
    assert tick(t, 15.5) == []  # flow 1: idle since 5.0
    assert [(r.flow, r.reply_complete) for r in records(t)] == [(1, True)]
    assert interrupt(t, 13.0, servers={"10.0.0.4"}) == []
    assert [(r.flow, r.reply_complete) for r in records(t)] == [(3, False)]
    assert finish(t) == []
    assert sorted((r.flow, r.reply_complete) for r in records(t)) == [(2, True), (4, True)]
    assert t.tracking().index == 0 and t.tracking().draining == 0


def test_interrupt_marks_open_flows_replies_incomplete() -> None:
    t = table()
    c = Conn()
    handshake(t, c)
    feed(t, c.req(0, b"GET"), c.resp(0, b"200", ack=3))
    assert interrupt(t, 1.0) == [Abort(1, AbortReason.GAP, 1.0)]
    assert one_record(t).reply_complete is False


def test_reuse_of_a_draining_four_tuple() -> None:
    t = table()
    a, b = Conn(isn=1000, sisn=5000), Conn(isn=900_000, sisn=70_000)
    feed(t, a.syn(), a.synack(), a.req(0, b"one"), a.cfin(3))
    acts = feed(t, b.syn(1.0), b.synack(1.0), b.req(0, b"two", 1.0), a.resp(0, b"OLD", 1.1), b.resp(0, b"TWO", 1.2))
    assert acts == [Open(2, CLIENT, SERVER, False, 1.0), Send(2, b"two", 1.0), Reply(2, b"TWO", 1.2)]
    assert t.stats.reused_tuples == 1
    rec = one_record(t)  # the old flow's record, written when the new connection took its 4-tuple over
    assert (rec.flow, rec.end, rec.reply_complete) == (1, EndReason.FIN, True)


def test_reuse_of_a_live_four_tuple() -> None:
    t = table()
    a, b = Conn(isn=1000, sisn=5000), Conn(isn=3_000_000_000, sisn=123)
    feed(t, a.syn(), a.synack(), a.req(0, b"one"), a.resp(0, b"ONE", ack=3))
    acts = feed(t, b.syn(1.0), b.synack(1.0), b.resp(0, b"TWO", 1.1))
    assert acts == [Close(1, 1.0), Open(2, CLIENT, SERVER, False, 1.0), Reply(2, b"TWO", 1.1)]


def test_give_up_stops_replies() -> None:
    t = table()
    c = Conn()
    handshake(t, c)
    feed(t, c.req(0, b"GET"), c.resp(2, b"gap"))
    give_up(t, 1)
    assert one_record(t).reply_complete is False
    assert feed(t, c.resp(0, b"ab"), c.resp(5, b"more")) == []
    assert t.tracking().reply_holes == 0


def test_skipped_partial_flows_get_no_replies() -> None:
    t = table(skip_partial=True)
    c = Conn()
    assert feed(t, c.req(50, b"GET", ack=7), c.resp(7, b"200", ack=53), c.cfin(53, ack=10)) == []
    assert one_record(t).outcome is Outcome.SKIPPED


# ---- properties -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Conversation:
    cstream: bytes
    sstream: bytes
    segments: list[Segment]
    first_missing: int | None  # first server byte the capture lacks, None when it has them all
    acks: bool  # the client acknowledged the server bytes it got (so a missing range is seen at once)


@st.composite
def conversations(draw: st.DrawFn, max_len: int = 1500) -> Conversation:
    """Both directions segmented, duplicated and reordered (transmissions()), then interleaved at random.

    Each side's acknowledgements are truthful: they cover what the other side sent so far. Maybe a range
    of the server's bytes is missing from the capture (sent, acknowledged, never seen).
    """
    cstream, cisn, cpieces = draw(transmissions(max_len=max_len))
    sstream, sisn, spieces = draw(transmissions(max_len=max_len))
    hole: tuple[int, int] | None = None
    if sstream and draw(st.booleans()):
        a = draw(st.integers(0, len(sstream) - 1))
        hole = (a, draw(st.integers(a + 1, len(sstream))))
        # The capture keeps one bare FIN, or a lost tail could not be told from the end.
        spieces.append(Piece(len(sstream), b"", fin=True))
    acks = draw(st.booleans())
    rnd = random.Random(draw(st.integers(0, 2**32)))
    segs = [
        Segment(0.0, CLIENT, SERVER, cisn, 0, SYN, b""),
        Segment(0.0, SERVER, CLIENT, sisn, (cisn + 1) & MASK, SYN | ACK, b""),
    ]
    cgot, sgot = bytearray(len(cstream)), bytearray(len(sstream))
    cfin = sfin = False
    covered = bytearray(len(sstream))

    def acked(got: bytearray, n: int, fin: bool) -> int:
        prefix = got.find(0)
        return n + fin if prefix < 0 else prefix

    ci = si = 0
    while ci < len(cpieces) or si < len(spieces):
        if si >= len(spieces) or (ci < len(cpieces) and rnd.random() < 0.5):
            p = cpieces[ci]
            ci += 1
            cgot[p.start : p.start + len(p.data)] = b"\1" * len(p.data)
            cfin |= p.fin
            ack = (sisn + 1 + acked(sgot, len(sstream), sfin)) & MASK if acks else (sisn + 1) & MASK
            flags = ACK | PSH | (FIN if p.fin else 0)
            segs.append(Segment(0.0, CLIENT, SERVER, (cisn + 1 + p.start) & MASK, ack, flags, p.data))
        else:
            p = spieces[si]
            si += 1
            sgot[p.start : p.start + len(p.data)] = b"\1" * len(p.data)
            sfin |= p.fin
            lost = hole is not None and p.data != b"" and p.overlaps(*hole)
            if not lost:
                covered[p.start : p.start + len(p.data)] = b"\1" * len(p.data)
                ack = (cisn + 1 + acked(cgot, len(cstream), cfin)) & MASK
                flags = ACK | PSH | (FIN if p.fin else 0)
                segs.append(Segment(0.0, SERVER, CLIENT, (sisn + 1 + p.start) & MASK, ack, flags, p.data))
    for i, s in enumerate(segs):
        s.ts = i * 0.001  # far below the hole timeout: only the capture's content decides
    first = covered.find(0)
    return Conversation(cstream, sstream, segs, None if hole is None else first, acks)


def run(segments: list[Segment], server_stream: bool) -> tuple[list[Action], list[FlowRecord]]:
    t = FlowTable(FlowConfig(server_stream=server_stream, hole_timeout=1000.0))
    out: list[Action] = []
    for s in segments:
        out += feed(t, s)
    out += finish(t)
    left = t.tracking()
    assert left.flows == 0 and left.index == 0 and left.draining == 0 and left.reply_holes == 0
    return out, records(t)


@settings(max_examples=250, deadline=None)
@given(conversations())
def test_both_streams_are_delivered_exactly_and_the_client_side_is_unchanged(conv: Conversation) -> None:
    acts, records = run(conv.segments, server_stream=True)
    assert sent(acts) == conv.cstream
    assert without_replies(acts)[-1] == Close(1, without_replies(acts)[-1].ts)
    assert all(a.data for a in acts if isinstance(a, Send | Reply))
    got = replied(acts)
    (rec,) = records
    if conv.first_missing is None:
        assert got == conv.sstream
        assert rec.reply_complete is True
    else:
        assert 0 <= conv.first_missing < len(conv.sstream)
        assert got == conv.sstream[: len(got)]
        assert len(got) <= conv.first_missing
        if not conv.acks:
            assert len(got) == conv.first_missing  # nothing stopped it early: all before the hole went out
        assert rec.reply_complete is False
    # The same capture without server_stream: the same actions, minus Replies, and the same record.
    plain, plain_records = run(conv.segments, server_stream=False)
    assert without_replies(acts) == plain
    assert [dataclasses.replace(r, last_ts=0.0, reply_complete=True) for r in records] == [
        dataclasses.replace(r, last_ts=0.0) for r in plain_records
    ]


@settings(max_examples=60, deadline=None)
@given(st.lists(conversations(max_len=400), min_size=2, max_size=5), st.randoms(use_true_random=False))
def test_interleaved_flows_never_mix_replies(convs: list[Conversation], rnd: random.Random) -> None:
    queues: list[list[Segment]] = []
    for i, conv in enumerate(convs):
        client = Endpoint("10.0.0.1", 40000 + i)
        queues.append([
            dataclasses.replace(s, src=client) if s.src == CLIENT else dataclasses.replace(s, dst=client)
            for s in conv.segments
        ])
    segs: list[Segment] = []
    while any(queues):
        segs.append(rnd.choice([q for q in queues if q]).pop(0))
    acts, records = run(segs, server_stream=True)
    flows = {a.client.port - 40000: a.flow for a in acts if isinstance(a, Open)}
    complete = {r.flow: r.reply_complete for r in records}
    for i, conv in enumerate(convs):
        f = flows[i]
        assert sent(acts, f) == conv.cstream
        got = replied(acts, f)
        if conv.first_missing is None:
            assert got == conv.sstream and complete[f]
        else:
            assert got == conv.sstream[: len(got)] and len(got) <= conv.first_missing and not complete[f]
    plain, _ = run(segs, server_stream=False)
    assert without_replies(acts) == plain
