"""Turn-taking as playbooks: events in, the exact commands out; no sockets, no sleeps.

Also the flow table's side of it: where it marks turns in a capture (FlowConfig.turns).
"""

from __future__ import annotations

from typing import cast

import pytest

from kubectl_mirror.model import (
    ACK,
    FIN,
    PSH,
    RST,
    Abort,
    AbortReason,
    Action,
    Close,
    GiveUp,
    Open,
    Segment,
    Send,
    Turn,
)
from kubectl_mirror.reassemble import FlowConfig, FlowTable
from kubectl_mirror.turns import (
    Delivered,
    Event,
    LocalClosed,
    LocalData,
    Tick,
    TurnOptions,
    TurnTaker,
    percentile,
)
from tests.playbook import play
from tests.test_reassemble import CLIENT, SERVER, Conn, feed

REQ1 = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
REQ2 = b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def near(x: float) -> float:
    """pytest.approx(x) where a model field is typed float: it compares equal to any float close to x."""
    return cast(float, pytest.approx(x))


def opened(flow: int = 1, partial: bool = False) -> Open:
    return Open(flow, CLIENT, SERVER, partial, 0.0)


def turn(flow: int = 1, answer_bytes: int = len(RESP), answer_time: float = 0.01) -> Turn:
    return Turn(flow, answer_bytes, answer_time, 0.0)


def test_http_next_request_waits_for_a_whole_response() -> None:
    t = TurnTaker()
    s1, s2, close = Send(1, REQ1, 0.0), Send(1, REQ2, 0.0), Close(1, 0.0)
    assert play(t, Tick(10.0), opened(), s1, turn(), s2, turn(), close) == [opened(), s1]
    assert play(t, LocalData(1, RESP[:20], 10.02)) == []  # half a response is no answer
    assert play(t, LocalData(1, RESP[20:], 10.03)) == [s2]
    assert play(t, LocalData(1, RESP, 10.05)) == [close]  # the FIN only after the last answer
    assert (t.stats.turns, t.stats.answered, t.stats.requests, t.stats.requests_answered) == (2, 2, 2, 2)
    assert t.stats.local_times == pytest.approx([0.03, 0.02])
    assert t.stats.production_times == [0.01, 0.01]


def test_pipelined_requests_go_together_and_the_fin_waits_for_all_answers() -> None:
    t = TurnTaker()
    s1, s2, close = Send(1, REQ1, 0.0), Send(1, REQ2, 0.0), Close(1, 0.0)
    assert play(t, Tick(1.0), opened(), s1, s2, turn(answer_bytes=2 * len(RESP)), close) == [opened(), s1, s2]
    assert play(t, LocalData(1, RESP, 1.01)) == []
    assert play(t, LocalData(1, RESP, 1.02)) == [close]


def test_opaque_turns_end_with_production_s_byte_count_or_with_quiet() -> None:
    t = TurnTaker(TurnOptions(quiet=0.02))
    ping1, ping2, ping3 = Send(1, b"PING 1\n", 0.0), Send(1, b"PING 2\n", 0.0), Send(1, b"PING 3\n", 0.0)
    assert play(t, Tick(0.0), opened(), ping1, turn(answer_bytes=7), ping2, turn(answer_bytes=7), ping3) == [
        opened(), ping1]
    assert play(t, LocalData(1, b"PONG 1\n", 0.001)) == [ping2]  # as many bytes as production: answered
    assert play(t, LocalData(1, b"PONG", 0.002)) == []  # fewer: answered once it falls quiet
    assert play(t, Tick(0.01)) == []
    assert play(t, Tick(0.022)) == [ping3]
    assert t.stats.answered == 2 and t.stats.unanswered == 0
    assert t.stats.requests == 0  # not HTTP: no requests counted


def test_a_service_that_speaks_first_is_waited_for() -> None:
    t = TurnTaker()
    hello = Send(1, b"EHLO me\r\n", 0.0)
    assert play(t, Tick(0.0), opened(), turn(answer_bytes=12), hello) == [opened()]
    assert play(t, LocalData(1, b"220 ready\r\n\r\n", 0.01)) == [hello]


def test_a_turn_waits_at_most_its_limit_then_the_connection_stops_waiting() -> None:
    t = TurnTaker(TurnOptions(floor=1.0, factor=10.0))
    s1, s2, s3, close = Send(1, REQ1, 0.0), Send(1, REQ2, 0.0), Send(1, REQ1, 0.0), Close(1, 0.0)
    assert play(t, Tick(5.0), opened(), s1, turn(answer_time=0.3), s2) == [opened(), s1]
    assert t.next_deadline() == pytest.approx(8.0)  # 10x production's 0.3 s beats the 1 s floor
    assert play(t, Tick(7.9)) == []
    assert play(t, Tick(8.0)) == [s2]
    # From now on it goes at the capture's pace: no more waiting on this connection.
    assert play(t, turn(), s3, turn(), close) == [s3, close]
    assert (t.stats.turns, t.stats.answered, t.stats.unanswered, t.stats.not_waited) == (3, 0, 1, 2)


def test_a_sink_costs_one_limit_per_connection_all_at_once() -> None:
    t = TurnTaker(TurnOptions(floor=0.5))
    events: list[Event] = [Tick(0.0)]
    for flow in (1, 2, 3):
        events += [opened(flow), Send(flow, REQ1, 0.0), turn(flow), Send(flow, REQ2, 0.0), turn(flow),
                   Close(flow, 0.0)]
    out = play(t, *events)
    assert [type(c).__name__ for c in out] == ["Open", "Send"] * 3
    assert play(t, Tick(0.49)) == []
    released = play(t, Tick(0.5))
    assert [(type(c).__name__, c.flow) for c in released] == [  # type: ignore[attr-defined]
        ("Send", 1), ("Close", 1), ("Send", 2), ("Close", 2), ("Send", 3), ("Close", 3)]
    assert (t.stats.unanswered, t.stats.not_waited) == (3, 3)
    assert not t.holding


def test_a_reset_waits_for_the_answer_like_a_fin() -> None:
    t = TurnTaker()
    s1, rst = Send(1, REQ1, 0.0), Abort(1, AbortReason.RESET, 0.0)
    assert play(t, Tick(0.0), opened(), s1, turn(), rst) == [opened(), s1]
    assert play(t, LocalData(1, RESP, 0.02)) == [rst]


def test_lost_bytes_abort_at_once_after_what_is_held() -> None:
    t = TurnTaker()
    s1, s2, hole = Send(1, REQ1, 0.0), Send(1, REQ2, 0.0), Abort(1, AbortReason.HOLE, 0.0)
    assert play(t, Tick(0.0), opened(), s1, turn(), s2) == [opened(), s1]
    assert play(t, hole) == [s2, hole]


def test_a_local_close_with_a_request_open_is_counted_and_delivery_goes_on() -> None:
    t = TurnTaker()
    s1, s2, close = Send(1, REQ1, 0.0), Send(1, REQ2, 0.0), Close(1, 0.0)
    assert play(t, Tick(0.0), opened(), s1, turn(), s2, turn(), close) == [opened(), s1]
    assert play(t, LocalClosed(1, 0.1)) == [s2, close]
    assert (t.stats.closed_early, t.stats.unanswered, t.stats.not_waited) == (1, 1, 1)
    assert t.stats.requests_unanswered == 1  # the second never reached a service that had closed


def test_a_local_close_after_its_answer_is_no_early_close() -> None:
    t = TurnTaker()
    s1, close = Send(1, REQ1, 0.0), Close(1, 0.0)
    assert play(t, Tick(0.0), opened(), s1, turn(), close) == [opened(), s1]
    assert play(t, LocalData(1, RESP, 0.01)) == [close]
    assert play(t, LocalClosed(1, 0.02), Delivered(1)) == []
    assert t.stats.closed_early == 0


def test_held_bytes_are_bounded_per_connection() -> None:
    t = TurnTaker(TurnOptions(max_held=100))
    s1 = Send(1, REQ1, 0.0)
    big = [Send(1, b"x" * 60, 0.0), Send(1, b"y" * 60, 0.0)]
    out = play(t, Tick(0.0), opened(), s1, turn(), *big)
    assert out[:2] == [opened(), s1]
    assert [type(c) for c in out[2:]] == [GiveUp]
    assert not t.holding
    # The flow table goes on until delivery tells it: what still comes passes through, for delivery to ignore.
    later = Send(1, b"z", 0.0)
    assert play(t, later) == [later]


def test_flows_without_turns_pass_straight_through() -> None:
    t = TurnTaker()
    batch: list[Action] = [opened(1), Send(1, b"a", 0.0), Send(1, b"b", 0.0), Close(1, 0.0)]
    assert t.handle_all(batch) == batch
    assert t.stats.turns == 0


def test_flush_lets_everything_go() -> None:
    t = TurnTaker()
    s1, s2 = Send(1, REQ1, 0.0), Send(1, REQ2, 0.0)
    play(t, Tick(0.0), opened(), s1, turn(), s2)
    assert t.flush() == [s2]
    assert t.stats.not_waited == 1


def test_percentile() -> None:
    assert percentile([], 50) is None
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0


# ---- where the flow table marks turns ----------------------------------------------------------------------


class Talk(Conn):
    """A connection whose server answers too (its bytes advance its own sequence)."""

    def __init__(self) -> None:
        super().__init__()
        self.soff = 0

    def answer(self, client_off: int, payload: bytes, ts: float) -> Segment:
        seg = Segment(ts, self.server, self.client, (self.sisn + 1 + self.soff) & 0xFFFFFFFF, self.seq(client_off),
                      ACK | PSH, payload)
        self.soff += len(payload)
        return seg


@pytest.mark.parametrize("server_stream", [False, True])
def test_the_flow_table_marks_client_bytes_sent_after_an_answer(server_stream: bool) -> None:
    table = FlowTable(FlowConfig(turns=True, server_stream=server_stream))
    c = Talk()
    out: list[Action] = []
    for seg in (c.syn(0.0), c.synack(0.001), c.data(0, b"Q1", 1.0), c.data(2, b"Q2", 1.001),
                c.answer(4, b"A12", 1.2), c.data(4, b"Q3", 2.0), c.answer(6, b"A3", 2.5),
                c.fin(6, 3.0)):
        out += [a for a in feed(table, seg) if type(a).__name__ != "Reply"]
    assert out == [
        Open(1, CLIENT, SERVER, False, 0.0), Send(1, b"Q1", 1.0), Send(1, b"Q2", 1.001),  # pipelined: no turn
        Turn(1, 3, near(0.199), 2.0), Send(1, b"Q3", 2.0),
        Turn(1, 2, near(0.5), 3.0), Close(1, 3.0),
    ]


def test_a_client_reset_after_an_answer_is_a_turn_and_lost_bytes_are_not() -> None:
    table = FlowTable(FlowConfig(turns=True))
    c = Talk()
    out: list[Action] = []
    for seg in (c.syn(0.0), c.data(0, b"Q1", 1.0), c.answer(2, b"A1", 1.1), c.rst(2, 1.2)):
        out += feed(table, seg)
    assert [type(a) for a in out] == [Open, Send, Turn, Abort]


def test_without_turns_the_flow_table_says_nothing_new() -> None:
    table = FlowTable(FlowConfig())
    c = Talk()
    out: list[Action] = []
    for seg in (c.syn(0.0), c.data(0, b"Q1", 1.0), c.answer(2, b"A1", 1.1), c.data(2, b"Q2", 1.2),
                Segment(1.3, c.client, c.server, c.seq(4), 0, FIN | ACK, b""), Segment(1.4, c.client, c.server,
                                                                                      c.seq(5), 0, RST, b"")):
        out += feed(table, seg)
    assert [type(a) for a in out] == [Open, Send, Send, Close]


def test_a_response_ended_by_the_close_answers_its_turn() -> None:
    t = TurnTaker()
    s1, close = Send(1, REQ1, 0.0), Close(1, 0.0)
    assert play(t, Tick(0.0), opened(), s1, turn(), close) == [opened(), s1]
    assert play(t, LocalData(1, b"HTTP/1.0 200 OK\r\n\r\nno length: the close ends it", 0.01)) == []
    assert play(t, LocalClosed(1, 0.02)) == [close]
    assert (t.stats.answered, t.stats.unanswered, t.stats.closed_early, t.stats.requests_answered) == (1, 0, 0, 1)


def test_a_short_answer_must_stay_quiet_as_long_as_production_took() -> None:
    t = TurnTaker(TurnOptions(quiet=0.02))
    data, more = Send(1, b"\x00\x01frame", 0.0), Send(1, b"\x00\x02frame", 0.0)
    # Production answered 500 bytes after 0.2 s; the local service acknowledges at once, then works.
    assert play(t, Tick(0.0), opened(), data, turn(answer_bytes=500, answer_time=0.2), more) == [opened(), data]
    assert play(t, LocalData(1, b"ack", 0.001), Tick(0.05)) == []  # 20 ms of silence is not enough here
    assert play(t, Tick(0.201)) == [more]


def test_a_multiplexed_answer_counts_in_totals() -> None:
    t = TurnTaker(TurnOptions(quiet=0.02))
    a, b, close = Send(1, b"req-a", 0.0), Send(1, b"req-b", 0.0), Close(1, 0.0)
    assert play(t, Tick(0.0), opened(), a, turn(answer_bytes=10, answer_time=0.0), b,
                turn(answer_bytes=10, answer_time=0.0), close) == [opened(), a]
    assert play(t, LocalData(1, b"x" * 6, 0.001), Tick(0.021)) == [b]  # short, then quiet: answered
    # As many bytes as production after the second request, but 16 of production's 20 in all: the rest of the
    # first answer is still to come (a multiplexed protocol answers both at once).
    assert play(t, LocalData(1, b"y" * 10, 0.03)) == []
    assert play(t, LocalData(1, b"z" * 4, 0.031)) == [close]


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


SETTINGS, SETTINGS_ACK = frame(4, 0, 0, b"\x00\x03\x00\x00\x00\x64"), frame(4, 1, 0)
PING = frame(6, 0, 0, b"12345678")


def h2_request(stream: int) -> bytes:
    return frame(1, 0x4 | 0x1, stream, b"\x82\x86\x84")  # HEADERS, END_HEADERS | END_STREAM


def h2_response(stream: int) -> bytes:
    return frame(1, 0x4, stream, b"\x88") + frame(0, 0x1, stream, b"body")


def test_http2_credits_answers_the_local_server_sent_ahead() -> None:
    # grpc-core answers the client's SETTINGS with its own SETTINGS and the ACK in one write; production sent the
    # ACK only after the client's own ACK, so the capture shows a turn that the local server has already answered.
    t = TurnTaker(TurnOptions(quiet=0.02))
    hello, ack, req = Send(1, H2_PREFACE + SETTINGS, 0.0), Send(1, SETTINGS_ACK, 0.0), Send(1, h2_request(1), 0.0)
    assert play(t, Tick(0.0), opened(), hello, turn(answer_bytes=len(SETTINGS)), ack,
                turn(answer_bytes=len(SETTINGS_ACK)), req) == [opened(), hello]
    assert play(t, LocalData(1, SETTINGS + SETTINGS_ACK, 0.001)) == [ack, req]
    assert (t.stats.answered, t.stats.unanswered) == (2, 0)


def test_http2_a_turn_with_every_finished_stream_answered_ends_with_quiet() -> None:
    # Production also sent a PING the local server never sends: the totals fall short, yet nothing is open.
    t = TurnTaker(TurnOptions(quiet=0.02))
    hello, ack, req = Send(1, H2_PREFACE + SETTINGS, 0.0), Send(1, SETTINGS_ACK, 0.0), Send(1, h2_request(1), 0.0)
    assert play(t, Tick(0.0), opened(), hello, turn(answer_bytes=len(SETTINGS + PING), answer_time=0.0), ack,
                turn(answer_bytes=len(SETTINGS_ACK), answer_time=0.0), req) == [opened(), hello]
    assert play(t, LocalData(1, SETTINGS + SETTINGS_ACK, 0.001)) == []
    assert play(t, Tick(0.021)) == [ack]  # short, then quiet
    assert play(t, Tick(0.03)) == []  # no byte since the ACK went out: quiet counts from when it went
    assert play(t, Tick(0.042)) == [req]
    assert (t.stats.answered, t.stats.unanswered) == (2, 0)


def test_http2_a_stream_the_local_server_has_not_ended_keeps_the_turn_waiting() -> None:
    t = TurnTaker(TurnOptions(quiet=0.02))
    reqs, more = Send(1, H2_PREFACE + SETTINGS + h2_request(1) + h2_request(3), 0.0), Send(1, h2_request(5), 0.0)
    answer = len(SETTINGS + SETTINGS_ACK + h2_response(1) + h2_response(3))
    assert play(t, Tick(0.0), opened(), reqs, turn(answer_bytes=answer + 100, answer_time=0.0), more) == [
        opened(), reqs]
    assert play(t, LocalData(1, SETTINGS + SETTINGS_ACK + h2_response(3)[:12], 0.001), Tick(0.5)) == []
    assert play(t, LocalData(1, h2_response(3)[12:], 0.6), Tick(0.65)) == []  # stream 1 is still open
    assert play(t, LocalData(1, h2_response(1), 0.7), Tick(0.71)) == []
    assert play(t, Tick(0.721)) == [more]
    assert (t.stats.answered, t.stats.unanswered) == (1, 0)


def test_http2_is_told_by_a_preface_split_over_sends_and_http1_by_a_start_that_is_not() -> None:
    t = TurnTaker(TurnOptions(quiet=0.02))
    a, b, more = Send(1, H2_PREFACE[:3], 0.0), Send(1, H2_PREFACE[3:] + SETTINGS, 0.0), Send(1, h2_request(1), 0.0)
    assert play(t, Tick(0.0), opened(), a, b, turn(answer_bytes=len(SETTINGS), answer_time=0.0), more) == [
        opened(), a, b]
    assert play(t, LocalData(1, SETTINGS + SETTINGS_ACK, 0.001)) == [more]
    # "P" could begin the preface; "POST" cannot: the request is still counted as HTTP/1.x.
    post = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    p1, p2, close = Send(2, post[:1], 0.0), Send(2, post[1:], 0.0), Close(2, 0.0)
    assert play(t, opened(2), p1, p2, turn(2), close) == [opened(2), p1, p2]
    assert play(t, LocalData(2, RESP, 0.01)) == [close]
    assert t.stats.requests_answered == 1


def h2_turn(answer_bytes: int, streams: tuple[int, ...] | None, answer_time: float = 0.0) -> Turn:
    return Turn(1, answer_bytes, answer_time, 0.0, streams)


@pytest.mark.parametrize("server_stream", [False, True])
def test_the_flow_table_names_the_http2_streams_production_s_answer_ended(server_stream: bool) -> None:
    table = FlowTable(FlowConfig(turns=True, server_stream=server_stream))
    c = Talk()
    hello, req1, req3 = H2_PREFACE + SETTINGS, h2_request(1), h2_request(3)
    resp1 = h2_response(1)
    out: list[Turn] = []
    segs = [c.syn(0.0), c.synack(0.001), c.data(0, hello, 0.01), c.answer(len(hello), SETTINGS + SETTINGS_ACK, 0.02),
            c.data(len(hello), req1 + req3, 0.03),
            c.answer(len(hello) + 2 * len(req1), resp1[:7], 0.04),  # a frame header cut across two segments
            c.answer(len(hello) + 2 * len(req1), resp1[7:] + PING, 0.05)]
    again = segs[-1]  # retransmitted: its streams are not counted twice
    segs += [Segment(0.055, again.src, again.dst, again.seq, again.ack, again.flags, again.payload),
             c.data(len(hello) + 2 * len(req1), SETTINGS_ACK, 0.06)]
    for seg in segs:
        out += [a for a in feed(table, seg) if isinstance(a, Turn)]
    assert out[0] == Turn(1, len(SETTINGS + SETTINGS_ACK), near(0.01), 0.03, ())
    assert len(out) == 2 and out[1].answer_streams == (1,)


def test_the_flow_table_stops_naming_streams_after_a_gap_in_the_server_s_bytes() -> None:
    table = FlowTable(FlowConfig(turns=True))
    c = Talk()
    hello, req = H2_PREFACE + SETTINGS, h2_request(1)
    settings = c.answer(len(hello), SETTINGS, 0.02)
    c.answer(len(hello), h2_response(1), 0.03)  # lost: never in the capture
    after_gap = c.answer(len(hello) + len(req), h2_response(3), 0.05)
    out: list[Turn] = []
    for seg in (c.syn(0.0), c.synack(0.001), c.data(0, hello, 0.01), settings, c.data(len(hello), req, 0.04),
                after_gap, c.data(len(hello) + len(req), h2_request(5), 0.06)):
        out += [a for a in feed(table, seg) if isinstance(a, Turn)]
    assert [t.answer_streams for t in out] == [(), None]


def test_http1_and_opaque_answers_name_no_streams() -> None:
    table = FlowTable(FlowConfig(turns=True))
    c = Talk()
    out: list[Turn] = []
    for seg in (c.syn(0.0), c.data(0, REQ1, 1.0), c.answer(len(REQ1), RESP, 1.1), c.data(len(REQ1), REQ2, 1.2)):
        out += [a for a in feed(table, seg) if isinstance(a, Turn)]
    assert [t.answer_streams for t in out] == [None]


def test_http2_a_turn_waits_for_the_streams_production_ended_whatever_the_byte_count() -> None:
    # The local server sent more bytes than production (PINGs of its own), so by count the turn looks answered;
    # but the stream production ended before the client went on is still open here.
    t = TurnTaker(TurnOptions(quiet=0.02))
    reqs, close = Send(1, H2_PREFACE + SETTINGS + h2_request(1) + h2_request(3), 0.0), Close(1, 0.0)
    assert play(t, Tick(0.0), opened(), reqs, h2_turn(len(h2_response(3)), (3,)), close) == [opened(), reqs]
    assert play(t, LocalData(1, SETTINGS + SETTINGS_ACK + PING * 4 + h2_response(1), 0.01), Tick(0.5)) == []
    assert play(t, LocalData(1, h2_response(3), 0.6)) == [close]  # as many bytes in all, and stream 3 is over
    assert (t.stats.answered, t.stats.unanswered) == (1, 0)


def test_http2_a_turn_whose_streams_are_over_ends_with_quiet_when_the_bytes_fall_short() -> None:
    t = TurnTaker(TurnOptions(quiet=0.02))
    req, more = Send(1, H2_PREFACE + SETTINGS + h2_request(1), 0.0), Send(1, h2_request(3), 0.0)
    assert play(t, Tick(0.0), opened(), req, h2_turn(500, (1,)), more) == [opened(), req]
    assert play(t, LocalData(1, h2_response(1), 0.01), Tick(0.029)) == []
    assert play(t, Tick(0.031)) == [more]
