"""The layers stacked (stack.Stack), sans-I/O: segments and delivery's news in, delivery's commands out.

What used to happen inside the engine's loop (Replies taken out for comparison, records paired with deliveries,
TLS flows given up, turns released by local answers) is played here with segments and a fake clock.
"""

from __future__ import annotations

from kubectl_mirror.httpopts import HttpOptions
from kubectl_mirror.model import (
    ACK,
    FIN,
    Close,
    DeliveryFailed,
    EndOfInput,
    Endpoint,
    LocalClosed,
    LocalData,
    Open,
    Segment,
    Send,
    Tick,
    Turn,
)
from kubectl_mirror.reassemble import FlowConfig
from kubectl_mirror.replay import Delivery
from kubectl_mirror.shadow import RequestResult, ShadowOptions
from kubectl_mirror.stack import DeliveryOver, Stack, StackOptions
from kubectl_mirror.summary import CompareSummary, SummaryBuilder
from kubectl_mirror.turns import TurnOptions
from tests.test_reassemble import CLIENT, SERVER, Conn

GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
GET2 = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BAD = b"HTTP/1.1 500 Oops\r\nContent-Length: 3\r\n\r\nbad"
HELLO = bytes([0x16, 0x03, 0x01, 0x00, 0x40, 0x01]) + b"\x00" * 64


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stack(flow: FlowConfig | None = None, **options: object) -> tuple[Stack, SummaryBuilder, Clock]:
    builder = SummaryBuilder("capture", "127.0.0.1:1")
    clock = Clock()
    opts = StackOptions(flow or FlowConfig(), target="127.0.0.1:1", **options)  # type: ignore[arg-type]
    return Stack(opts, builder, clock), builder, clock


def server_fin(c: Conn, sent: int, acked: int, ts: float) -> Segment:
    return Segment(ts, SERVER, CLIENT, c.sisn + 1 + sent, c.seq(acked), FIN | ACK, b"")


def test_byte_mode_batch_merges_sends_and_the_record_meets_its_delivery() -> None:
    s, builder, _ = stack()
    c = Conn()
    out = s.segments([c.syn(0.0), c.synack(0.01), c.data(0, b"ab", 0.1), c.data(2, b"cd", 0.2), c.fin(4, 0.3)])
    assert out == [Open(1, CLIENT, SERVER, False, 0.0), Send(1, b"abcd", 0.1), Close(1, 0.3)]
    assert builder.pending == 1  # the flow ended in the capture; its delivery is still to come
    assert s.handle(Delivery(1, None, 4, None)) == []
    summary = builder.build(duration_seconds=1.0)
    assert (summary.connections.complete, summary.bytes_delivered, builder.pending) == (1, 4, 0)


def test_paced_segments_go_down_one_at_a_time() -> None:
    s, _, _ = stack()
    c = Conn()
    out = s.segments([c.syn(0.0), c.data(0, b"ab", 0.1), c.data(2, b"cd", 0.2)], batch=False)
    assert out == [Open(1, CLIENT, SERVER, False, 0.0), Send(1, b"ab", 0.1), Send(1, b"cd", 0.2)]


def test_tls_flow_is_held_back_given_up_and_counted() -> None:
    notices: list[str] = []
    builder = SummaryBuilder("capture", "127.0.0.1:1")
    s = Stack(StackOptions(FlowConfig(), target="127.0.0.1:1"), builder, Clock(), notices.append)
    c = Conn()
    assert s.segments([c.syn(0.0), c.data(0, HELLO, 0.1)]) == []
    assert s.segments([c.data(len(HELLO), b"more", 0.2), c.fin(len(HELLO) + 4, 0.3)]) == []  # given up: silent
    summary = builder.build(duration_seconds=1.0)
    assert (summary.connections.tls, summary.bytes_delivered, builder.pending) == (1, 0, 0)
    assert len(notices) == 1 and "--tls-passthrough" in notices[0] and "127.0.0.1:1" in notices[0]


def test_delivery_failed_mutes_the_flow_and_its_record_waits_for_the_delivery() -> None:
    s, builder, _ = stack()
    c = Conn()
    s.segments([c.syn(0.0), c.data(0, b"ab", 0.1)])
    assert s.handle(DeliveryFailed(1)) == []
    assert s.segments([c.data(2, b"cd", 0.2), c.fin(4, 0.3)]) == []
    s.handle(Delivery(1, None, 2, None))
    assert builder.build(duration_seconds=1.0).connections.seen == 1 and builder.pending == 0


def test_compare_takes_production_replies_out_and_pairs_both_answers() -> None:
    results: list[RequestResult] = []
    shadow = ShadowOptions(HttpOptions(), compare=True, on_request=results.append)
    s, _, clock = stack(FlowConfig(server_stream=True), http=shadow)
    c = Conn()
    out = s.segments([c.syn(0.0), c.synack(0.01), c.data(0, GET + GET2, 0.1),
                      c.sack(len(GET + GET2), 0.2, payload=OK + OK), c.fin(len(GET + GET2), 0.3)])
    assert out == [Open(1, CLIENT, SERVER, False, 0.0), Send(1, GET + GET2, 0.1), Close(1, 0.3)]  # merged: one batch
    s.segments([server_fin(c, len(OK + OK), len(GET + GET2) + 1, 0.4)])  # production's side ends: its record
    clock.now = 100.5
    assert s.handle(LocalData(1, OK + BAD, 100.5)) == []
    assert s.handle(LocalClosed(1, 100.6)) == []
    s.handle(Delivery(1, None, len(GET + GET2), None))
    s.handle(DeliveryOver())
    assert s.shadow is not None
    assert (s.shadow.same, s.shadow.different, s.shadow.unpaired) == (1, 1, 0)
    assert [(r.target, r.status) for r in results] == [("/a", 200), ("/b", 500)]


def test_filtered_connection_never_reaches_delivery_and_counts_as_skipped() -> None:
    s, builder, _ = stack(http=ShadowOptions(HttpOptions(match_method=["DELETE"])))
    c = Conn()
    assert s.segments([c.syn(0.0), c.data(0, GET, 0.1), c.fin(len(GET), 0.2)]) == []
    summary = builder.build(duration_seconds=1.0)
    assert (summary.connections.skipped, builder.pending) == (1, 0)  # no delivery will come: counted at once


def test_turn_holds_the_next_request_until_the_local_answer() -> None:
    s, _, clock = stack(FlowConfig(turns=True), turns=TurnOptions(floor=1.0))
    c = Conn()
    first = s.segments([c.syn(0.0), c.synack(0.01), c.data(0, GET, 0.1), c.sack(len(GET), 0.15, payload=OK)])
    assert first == [Open(1, CLIENT, SERVER, False, 0.0), Send(1, GET, 0.1)]
    assert s.segments([c.data(len(GET), GET2, 0.2)]) == []  # production answered first: wait for the local one
    assert s.holding and s.next_deadline() == 101.0
    clock.now = 100.01
    assert s.handle(LocalData(1, OK, 100.01)) == [Send(1, GET2, 0.2)]
    assert not s.holding


def test_unanswered_turn_goes_on_at_its_deadline() -> None:
    s, _, clock = stack(FlowConfig(turns=True), turns=TurnOptions(floor=1.0))
    c = Conn()
    s.segments([c.syn(0.0), c.synack(0.01), c.data(0, GET, 0.1), c.sack(len(GET), 0.15, payload=OK)])
    assert s.segments([c.data(len(GET), GET2, 0.2)]) == []
    clock.now = 100.5
    assert s.tick() == []
    clock.now = 101.0
    assert s.tick() == [Send(1, GET2, 0.2)]


def test_end_of_input_closes_open_flows_and_flush_releases_what_is_held() -> None:
    s, _, _ = stack(FlowConfig(turns=True))
    c = Conn()
    s.segments([c.syn(0.0), c.synack(0.01), c.data(0, GET, 0.1), c.sack(len(GET), 0.15, payload=OK)])
    assert s.handle(EndOfInput()) == []  # the Close waits behind production's answer
    assert s.flush() == [Close(1, 0.15)]
    assert s.handle(Tick(50.0)) == []


def test_turn_actions_reach_delivery_only_as_waits() -> None:
    s, _, _ = stack(FlowConfig(turns=True))
    c = Conn(client=Endpoint("10.0.0.7", 41000))
    out = s.segments([c.syn(0.0), c.synack(0.01), c.data(0, GET, 0.1), c.sack(len(GET), 0.15, payload=OK)])
    assert not any(isinstance(a, Turn) for a in out)


def test_figures_of_the_layers_that_are_on() -> None:
    shadow = ShadowOptions(HttpOptions(), compare=True)
    s, _, _ = stack(FlowConfig(server_stream=True), http=shadow)
    c = Conn()
    s.segments([c.syn(0.0), c.synack(0.01), c.data(0, GET, 0.1), c.sack(len(GET), 0.2, payload=OK),
                c.fin(len(GET), 0.3), server_fin(c, len(OK), len(GET) + 1, 0.4)])
    s.handle(LocalData(1, OK, 100.5))
    s.handle(Delivery(1, None, len(GET), None))
    s.handle(DeliveryOver())
    assert s.compare_summary() == CompareSummary(same=1, different=0, unpaired=0)
    http = s.http_summary()
    assert http is not None and (http.requests, http.forwarded) == (1, 1)
    h2 = s.h2_summary()  # HTTP mode looks for HTTP/2 too: none here
    assert h2 is not None and h2.connections == 0
    assert s.turn_summary() is None  # off: no figures

    plain, _, _ = stack()
    assert (plain.http_summary(), plain.compare_summary(), plain.turn_summary()) == (None, None, None)


def test_an_idle_declined_upgrade_goes_through_the_http1_layer_once_its_wait_is_over() -> None:
    from kubectl_mirror.h2layer import UPGRADE_WAIT

    s, _, clock = stack(http=ShadowOptions(HttpOptions(match_path=["^/"])))
    up = b"GET /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\r\n"
    c = Conn()
    assert s.segments([c.syn(0.0), c.data(0, up, 0.1)]) == []  # held: a preface may follow
    assert s.holding and s.next_deadline() == clock.now + UPGRADE_WAIT
    clock.now += UPGRADE_WAIT
    # No preface came: HTTP/1.x after all, through its layer (the request is parsed and counted there).
    assert s.tick() == [Open(1, CLIENT, SERVER, False, 0.0), Send(1, up, 0.1)]
    assert not s.holding
    assert s.http_summary() is not None and s.http_summary().requests == 1  # type: ignore[union-attr]
