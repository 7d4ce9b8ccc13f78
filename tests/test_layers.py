"""The layers' one interface, `handle(event) -> list[command]`, as playbooks: events in, the exact commands out.

The flow table and the HTTP layer each take every event through `handle`; records (a flow ended, a request was
seen) come out as commands beside the actions instead of through queues. No private attribute is read here.
"""

from __future__ import annotations

import pytest

from kubectl_mirror.httpflow import HttpLayer
from kubectl_mirror.httpopts import HttpOptions
from kubectl_mirror.model import (
    Abort,
    AbortReason,
    Action,
    BrokenOff,
    Close,
    DeliveryFailed,
    EndOfInput,
    Endpoint,
    EndReason,
    FlowRecord,
    Interrupt,
    LocalData,
    Open,
    Outcome,
    Reply,
    RequestRecord,
    Segment,
    Send,
    Suppressed,
    Tick,
)
from kubectl_mirror.reassemble import FlowConfig, FlowTable, Tracking
from tests.playbook import of_type, play, playbook
from tests.test_reassemble import CLIENT, SERVER, Conn

GET = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
DELETE = b"DELETE /b HTTP/1.1\r\nHost: x\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def record(flow: int, end: EndReason, outcome: Outcome, nbytes: int, first: float, last: float, *,
           client: Endpoint = CLIENT, server: Endpoint = SERVER, partial: bool = False,
           reply_complete: bool = True) -> FlowRecord:
    return FlowRecord(flow, client, server, partial, outcome, end, nbytes, first, last,
                      reply_complete=reply_complete)


# ---- the flow table ------------------------------------------------------------------------------------------


def test_flow_table_connection_ends_with_its_record_after_its_last_action() -> None:
    c = Conn()
    playbook(FlowTable(FlowConfig()), [
        ([c.syn(0.0), c.synack(0.01)], [Open(1, CLIENT, SERVER, False, 0.0)]),
        (c.data(0, b"ab", 0.1), [Send(1, b"ab", 0.1)]),
        (c.sack(2, 0.2, payload=b"resp"), []),
        (c.fin(2, 0.3), [Close(1, 0.3), record(1, EndReason.FIN, Outcome.COMPLETE, 2, 0.0, 0.3)]),
        (c.data(0, b"ab", 0.4), []),  # a stray of the ended connection
    ])


def test_flow_table_tick_times_out_a_hole() -> None:
    c = Conn()
    playbook(FlowTable(FlowConfig(hole_timeout=2.0)), [
        ([c.syn(0.0), c.data(0, b"ab", 0.5), c.data(4, b"ef", 1.0)],
         [Open(1, CLIENT, SERVER, False, 0.0), Send(1, b"ab", 0.5)]),
        (Tick(2.5), []),
        (Tick(3.0), [Abort(1, AbortReason.HOLE, 3.0), record(1, EndReason.HOLE, Outcome.INCOMPLETE, 2, 0.0, 1.0)]),
    ])


def test_flow_table_interrupt_ends_only_the_named_servers_flows() -> None:
    a = Conn()
    b = Conn(client=Endpoint("10.0.0.9", 40001), server=Endpoint("10.0.0.3", 8080))
    table = FlowTable(FlowConfig())
    play(table, a.syn(), a.data(0, b"ab"), b.syn(), b.data(0, b"xy"))
    playbook(table, [
        (Interrupt(5.0, {"10.0.0.3"}), [
            Abort(2, AbortReason.GAP, 5.0),
            record(2, EndReason.GAP, Outcome.INCOMPLETE, 2, 0.0, 0.0, client=b.client, server=b.server),
        ]),
        (a.data(2, b"cd", 6.0), [Send(1, b"cd", 6.0)]),
        (Interrupt(7.0), [Abort(1, AbortReason.GAP, 7.0), record(1, EndReason.GAP, Outcome.INCOMPLETE, 4, 0.0, 6.0)]),
    ])


def test_flow_table_end_of_input_closes_what_is_open_and_forgets_everything() -> None:
    c = Conn()
    table = FlowTable(FlowConfig())
    play(table, c.syn(), c.data(0, b"ab", 0.7))
    playbook(table, [
        (EndOfInput(), [Close(1, 0.7), record(1, EndReason.END_OF_CAPTURE, Outcome.COMPLETE, 2, 0.0, 0.7)]),
        (EndOfInput(), []),
    ])
    assert table.tracking() == Tracking(flows=0, index=0, holes=0, tombstones=0)


def test_flow_table_delivery_failed_writes_the_record_and_mutes_the_flow() -> None:
    c = Conn()
    table = FlowTable(FlowConfig())
    play(table, c.syn(), c.data(0, b"ab", 0.5))
    playbook(table, [
        (DeliveryFailed(1), [record(1, EndReason.GAVE_UP, Outcome.COMPLETE, 2, 0.0, 0.5)]),
        ([c.data(2, b"cd", 0.6), c.fin(4, 0.7)], []),
        (DeliveryFailed(1), []),  # already given up: nothing twice
    ])


def test_flow_table_with_replies_records_a_draining_flow_when_the_server_finishes() -> None:
    c = Conn()
    server_fin = Segment(0.4, SERVER, CLIENT, c.sisn + 1 + len(OK), c.seq(len(GET) + 1), 0x11, b"")
    playbook(FlowTable(FlowConfig(server_stream=True)), [
        ([c.syn(0.0), c.synack(0.01), c.data(0, GET, 0.1)], [Open(1, CLIENT, SERVER, False, 0.0), Send(1, GET, 0.1)]),
        (c.fin(len(GET), 0.2), [Close(1, 0.2)]),  # the server's answer is still to come: no record yet
        (c.sack(len(GET) + 1, 0.3, payload=OK), [Reply(1, OK, 0.3)]),
        (server_fin, [record(1, EndReason.FIN, Outcome.COMPLETE, len(GET), 0.0, 0.4)]),
    ])


def test_flow_table_takes_no_event_of_another_layer() -> None:
    with pytest.raises(TypeError):
        FlowTable(FlowConfig()).handle(LocalData(1, b"x", 0.0))  # type: ignore[arg-type]


def test_flow_table_a_batch_gives_what_one_segment_at_a_time_gives() -> None:
    conns = [Conn(isn=i * 7919, client=Endpoint("10.0.1.1", 30000 + i)) for i in range(3)]
    segments: list[Segment] = []
    for i, c in enumerate(conns):
        segments += [c.syn(i), c.data(0, b"hello", i + 0.1), c.data(5, b"!", i + 0.2)]
    segments += [conns[0].fin(6, 5.0), conns[2].rst(6, 5.1), conns[1].data(7, b"late", 5.2)]
    one_by_one = play(FlowTable(FlowConfig()), *segments)
    batch = FlowTable(FlowConfig()).handle_all(segments)
    actions = [c for c in one_by_one if not isinstance(c, FlowRecord)]
    records = of_type(one_by_one, FlowRecord)
    assert batch == actions + records  # the same commands, records moved to the end
    assert [r.flow for r in records] == [1, 3]


# ---- the HTTP layer ------------------------------------------------------------------------------------------


def http_layer(**options: object) -> HttpLayer:
    return HttpLayer(HttpOptions(**options), lambda: 0.0)  # type: ignore[arg-type]


def opened(flow: int = 1, partial: bool = False) -> Open:
    return Open(flow, CLIENT, SERVER, partial, 0.0)


def request(flow: int, index: int, method: str, target: str, ts: float, forwarded: bool = True,
            sent_index: int | None = None) -> RequestRecord:
    return RequestRecord(flow, index, method, target, "x", ts, forwarded, sent_index)


def test_http_layer_observing_passes_actions_and_says_each_request_after_them() -> None:
    get = Send(1, GET, 1.0)
    playbook(http_layer(), [
        (opened(), [opened()]),
        (get, [get, request(1, 0, "GET", "/a", 1.0, sent_index=0)]),
        (Reply(1, OK, 1.5), [Reply(1, OK, 1.5)]),  # production's answer is not the layer's business
        (Close(1, 2.0), [Close(1, 2.0)]),
    ])


def test_http_layer_filter_drops_requests_and_a_connection_with_none_left_is_suppressed() -> None:
    hl = http_layer(match_method=["DELETE"])
    delete = Send(1, DELETE, 2.0)
    playbook(hl, [
        (opened(), []),  # held until something of it is sent
        (Send(1, GET, 1.0), [request(1, 0, "GET", "/a", 1.0, forwarded=False)]),
        (delete, [opened(), delete, request(1, 1, "DELETE", "/b", 2.0, sent_index=0)]),
        (Close(1, 3.0), [Close(1, 3.0)]),
        (opened(2), []),
        (Send(2, GET, 4.0), [request(2, 0, "GET", "/a", 4.0, forwarded=False)]),
        (Close(2, 5.0), [Suppressed(2)]),  # the target never heard of flow 2
    ])


def test_http_layer_a_request_broken_off_while_filtering_is_reset() -> None:
    playbook(http_layer(match_method=["GET"]), [
        ([opened(), Send(1, GET, 1.0)], [opened(), Send(1, GET, 1.0), request(1, 0, "GET", "/a", 1.0, sent_index=0)]),
        (Send(1, b"GET /c HTTP/1.1\r\n\x00\x01\r\n\r\n", 2.0), [Abort(1, AbortReason.RESET, 2.0), BrokenOff(1)]),
        (Close(1, 3.0), []),
    ])


def test_http_layer_delivery_failed_forgets_the_flow() -> None:
    hl = http_layer(match_method=["GET"])
    play(hl, opened(), Send(1, GET[:10], 1.0))
    assert hl.tracked_flows == 1
    playbook(hl, [(DeliveryFailed(1), [])])
    assert hl.tracked_flows == 0
    playbook(hl, [(Send(1, GET[10:], 2.0), [Send(1, GET[10:], 2.0)])])  # unknown now: passes as it is


def test_http_layer_a_batch_gives_what_one_action_at_a_time_gives() -> None:
    actions: list[Action] = [opened(), Send(1, GET + DELETE[:7], 1.0), opened(2), Send(2, GET, 1.5),
                             Send(1, DELETE[7:], 2.0), Close(2, 2.5), Close(1, 3.0)]
    one_by_one = play(http_layer(match_method=["DELETE"]), *actions)
    batch = http_layer(match_method=["DELETE"]).handle_all(actions)
    kinds = (RequestRecord, Suppressed, BrokenOff)
    assert [c for c in batch if not isinstance(c, kinds)] == [c for c in one_by_one if not isinstance(c, kinds)]
    assert of_type(batch, *kinds) == of_type(one_by_one, *kinds)
    assert of_type(batch, Suppressed) == [Suppressed(2)]
