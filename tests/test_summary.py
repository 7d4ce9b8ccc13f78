"""The run summary: merging verdicts, counting as flows end, and both renderings."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from kubectl_mirror.errors import EXIT_DELIVERY, EXIT_OK
from kubectl_mirror.model import Endpoint, EndReason, FlowRecord, Outcome
from kubectl_mirror.replay import Delivery
from kubectl_mirror.summary import (
    Connections,
    PodFigures,
    Summary,
    SummaryBuilder,
    exit_code,
    merge_outcome,
    render_json,
    render_text,
)

CLIENT = Endpoint("10.0.0.1", 40000)
SERVER = Endpoint("10.0.0.2", 80)


def record(
    flow: int,
    outcome: Outcome = Outcome.COMPLETE,
    *,
    end: EndReason = EndReason.FIN,
    sent: int = 100,
    partial: bool = False,
    guessed: bool = False,
) -> FlowRecord:
    return FlowRecord(flow, CLIENT, SERVER, partial, outcome, end, sent, 0.0, 1.0, guessed)


def delivery(flow: int, outcome: Outcome | None = None, sent: int = 100) -> Delivery:
    return Delivery(flow, outcome, sent, None if outcome is None else "why")


# ---- merge_outcome -------------------------------------------------------------------------------

WORST_FIRST = [Outcome.FAILED, Outcome.DROPPED, Outcome.INCOMPLETE, Outcome.COMPLETE]


@pytest.mark.parametrize("mine", [Outcome.COMPLETE, Outcome.INCOMPLETE])
@pytest.mark.parametrize("theirs", [None, Outcome.DROPPED, Outcome.FAILED])
def test_merge_worst_wins(mine: Outcome, theirs: Outcome | None) -> None:
    got = merge_outcome(record(1, mine), delivery(1, theirs))
    candidates = [mine] if theirs is None else [mine, theirs]
    assert got is min(candidates, key=WORST_FIRST.index)


def test_merge_without_delivery_keeps_the_flow_tables_verdict() -> None:
    assert merge_outcome(record(1), None) is Outcome.COMPLETE
    assert merge_outcome(record(1, Outcome.INCOMPLETE, end=EndReason.HOLE), None) is Outcome.INCOMPLETE


def test_merge_skipped_stays_skipped() -> None:
    assert merge_outcome(record(1, Outcome.SKIPPED), delivery(1, Outcome.FAILED)) is Outcome.SKIPPED


def test_merge_given_up_flow_is_never_complete() -> None:
    assert merge_outcome(record(1, end=EndReason.GAVE_UP), None) is Outcome.INCOMPLETE
    assert merge_outcome(record(1, end=EndReason.GAVE_UP), delivery(1, Outcome.DROPPED)) is Outcome.DROPPED


# ---- counting ------------------------------------------------------------------------------------


def test_builder_counts_every_outcome_and_pairs_in_either_order() -> None:
    b = SummaryBuilder("capture.pcap", "127.0.0.1:8080")
    # record first, then delivery
    assert b.add_record(record(1, sent=1000)) is None
    assert b.add_delivery(delivery(1, sent=1000)) is Outcome.COMPLETE
    # delivery first, then record
    assert b.add_delivery(delivery(2, Outcome.DROPPED, sent=300)) is None
    assert b.add_record(record(2, sent=5000, partial=True)) is Outcome.DROPPED
    b.add_flow(record(3, Outcome.INCOMPLETE, end=EndReason.HOLE, sent=40, partial=True), delivery(3, sent=40))
    b.add_flow(record(4, sent=7, guessed=True), delivery(4, Outcome.FAILED, sent=0))
    assert b.add_record(record(5, Outcome.SKIPPED, sent=0, partial=True)) is Outcome.SKIPPED  # no delivery will come
    b.add_flow(record(6, sent=1), delivery(6, sent=1))
    assert b.pending == 0
    b.add_capture(packets=10, bytes_captured=2000, tcp_segments=9)
    b.add_capture(packets=5, bytes_captured=1000, tcp_segments=4)
    b.add_stream_gap()
    b.warn("tshark reported malformed packets")
    b.warn("tshark reported malformed packets")

    s = b.build(duration_seconds=12.3456, interrupted=True)

    assert s.connections == Connections(
        seen=6, complete=2, partial=3, incomplete=1, dropped=1, failed=1, skipped=1
    )
    # What reached the target, on the replayer's word: not what the flow table handed over.
    assert s.bytes_delivered == 1000 + 300 + 40 + 0 + 1
    assert (s.packets, s.bytes_captured, s.tcp_segments) == (15, 3000, 13)
    assert s.stream_gaps == 1 and s.direction_guessed == 1
    assert s.duration_seconds == 12.346 and s.interrupted
    assert s.warnings == ["tshark reported malformed packets"]


def test_builder_holds_only_unpaired_flows() -> None:
    b = SummaryBuilder("pod", "127.0.0.1:8080")
    for flow in range(10_000):
        b.add_record(record(flow))
        b.add_delivery(delivery(flow))
        assert b.pending == 0
    assert b.build(duration_seconds=1).connections.complete == 10_000


def test_batches_and_capture_figures_from_the_pipeline() -> None:
    b = SummaryBuilder("pod", "t")
    b.add_records([record(1), record(2, Outcome.SKIPPED)])
    b.add_deliveries([delivery(1, Outcome.DROPPED)])
    s = b.build(duration_seconds=1, packets=7, bytes_captured=70, tcp_segments=6, stream_gaps=1, open_flows=4)
    assert (s.connections.seen, s.connections.dropped, s.connections.skipped) == (2, 1, 1)
    assert (s.packets, s.bytes_captured, s.tcp_segments, s.stream_gaps, s.open_flows) == (7, 70, 6, 1, 4)
    assert "open_flows" not in render_json(s)  # progress-only


def test_build_counts_the_unpaired_halves() -> None:
    b = SummaryBuilder("pod", "t")
    b.add_record(record(1, sent=10))  # the replayer never reported it
    b.add_delivery(delivery(2, Outcome.FAILED, sent=3))  # the flow table never reported it
    s = b.build(duration_seconds=0)
    assert (s.connections.seen, s.connections.complete, s.connections.failed) == (2, 1, 1)
    assert s.bytes_delivered == 13
    assert b.pending == 2  # build() does not consume: it can be called for progress


# ---- exit code -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("connections", "code"),
    [
        (Connections(seen=3, complete=1, incomplete=1, skipped=1), EXIT_OK),
        (Connections(), EXIT_OK),
        (Connections(seen=2, complete=1, dropped=1), EXIT_DELIVERY),
        (Connections(seen=2, complete=1, failed=1), EXIT_DELIVERY),
    ],
)
def test_exit_code(connections: Connections, code: int) -> None:
    assert exit_code(Summary(source="s", target="t", connections=connections)) == code


# ---- rendering -----------------------------------------------------------------------------------


def full_summary() -> Summary:
    return Summary(
        source="capture.pcap",
        target="127.0.0.1:8080",
        packets=123_456,
        bytes_captured=98_765_432,
        tcp_segments=120_000,
        connections=Connections(seen=1240, complete=1200, partial=12, incomplete=20, dropped=15, failed=5),
        bytes_delivered=80_000_000,
        stream_gaps=2,
        duration_seconds=83.2,
        direction_guessed=3,
        interrupted=True,
        warnings=["tshark reported 12 malformed packets"],
    )


def test_json_round_trips_through_the_model() -> None:
    s = full_summary()
    text = render_json(s)
    assert Summary.model_validate_json(text) == s
    data = json.loads(text)
    # The --json contract: these names are public.
    assert list(data) == [
        "source", "target", "packets", "bytes_captured", "tcp_segments", "connections", "bytes_delivered",
        "stream_gaps", "duration_seconds", "direction_guessed", "interrupted", "warnings", "error", "exit_code",
    ]
    assert list(data["connections"]) == ["seen", "complete", "partial", "incomplete", "dropped", "failed", "skipped",
                                         "tls", "probes"]
    assert data["connections"]["dropped"] == 15 and data["bytes_delivered"] == 80_000_000


def test_json_rejects_unknown_fields_and_negative_counts() -> None:
    with pytest.raises(ValidationError):
        Summary.model_validate({"source": "s", "target": "t", "packet": 1})
    with pytest.raises(ValidationError):
        Connections(seen=-1)


def test_text_shows_every_figure_and_a_hint_per_problem() -> None:
    text = render_text(full_summary())
    assert text.splitlines()[0] == "capture.pcap -> 127.0.0.1:8080  (interrupted)"
    for figure in ("123,456", "94.2 MiB captured", "120,000 TCP segments", "1,240", "1,200 complete",
                   "20 incomplete", "15 dropped", "5 failed", "12 joined mid-stream", "3 with a guessed server side",
                   "76.3 MiB", "in 1m23s", "tshark reported 12 malformed packets"):
        assert figure in text, figure
    assert "--hole-timeout" in text
    assert "--flow-buffer" in text and "--speed" in text
    assert "refused or reset" in text
    assert "stream gaps" in text


def test_text_columns_line_up() -> None:
    lines = [line for line in render_text(full_summary()).splitlines()[2:] if line]
    # Every detail starts in one column; every figure is right-aligned just before it.
    assert all(line[25:28] == "   " and line[28] != " " for line in lines), lines
    with_figures = [line for line in lines if line[15:25].strip()]
    assert len(with_figures) == 7  # packets, connections, delivered, gaps and the three problems
    assert all(line[24] != " " for line in with_figures), with_figures


def test_text_stays_quiet_when_all_is_well() -> None:
    s = Summary(
        source="default/web-7d9f",
        target="[::1]:8080",
        packets=10,
        bytes_captured=900,
        tcp_segments=1,
        connections=Connections(seen=1, complete=1),
        bytes_delivered=12,
        duration_seconds=1.5,
    )
    text = render_text(s)
    assert text.splitlines()[0] == "default/web-7d9f -> [::1]:8080"
    assert "900 B captured, 1 TCP segment\n" in text
    assert "1 complete" in text and "12 B" in text and "in 1.5s" in text
    for word in ("incomplete", "dropped", "failed", "skipped", "warning", "->  ", "mid-stream", "gaps"):
        assert word not in text, word


def test_tls_flows_count_as_tls_with_no_bytes_in_either_order() -> None:
    b = SummaryBuilder(source="x", target="y")
    b.add_tls([1])
    b.add_record(record(1, Outcome.COMPLETE, end=EndReason.GAVE_UP, sent=517))
    b.add_record(record(2, sent=300))  # waits for its delivery
    b.add_tls([2])  # held back after all: counted now, whatever the flow table handed over
    b.add_flow(record(3, sent=10), delivery(3, sent=10))
    s = b.build(duration_seconds=1.0)
    assert (s.connections.seen, s.connections.tls, s.connections.complete, s.connections.incomplete) == (3, 2, 1, 0)
    assert s.bytes_delivered == 10
    assert exit_code(s) == EXIT_OK
    assert "2 tls" in render_text(s) and "--tls-passthrough" in render_text(s)


def test_connections_are_tallied_per_server_and_pods_render_when_the_workload_changed() -> None:
    b = SummaryBuilder("default/web-a:80 (+1 more)", "127.0.0.1:8080")
    other = Endpoint("10.0.0.3", 80)
    b.add_flow(record(1, sent=100), delivery(1, sent=100))
    b.add_flow(FlowRecord(2, CLIENT, other, False, Outcome.INCOMPLETE, EndReason.GAP, 40, 0.0, 1.0), None)
    assert b.add_record(FlowRecord(3, CLIENT, other, False, Outcome.COMPLETE, EndReason.FIN, 7, 0.0, 1.0)) is None
    s = b.build(duration_seconds=1.0)
    tallies = {host: (t.connections, t.bytes_delivered, t.incomplete) for host, t in s.by_server.items()}
    assert tallies == {"10.0.0.2": (1, 100, 0), "10.0.0.3": (2, 47, 1)}  # a flow still unpaired counts too
    assert "by_server" not in render_json(s) and "pods" not in json.loads(render_json(s))
    pods = [PodFigures(pod="default/web-a", packets=9, connections=1, bytes_delivered=100),
            PodFigures(pod="default/web-b", packets=5, connections=2, bytes_delivered=47, incomplete=1)]
    live = s.model_copy(update={"pods": pods})
    assert json.loads(render_json(live))["pods"][1] == {"pod": "default/web-b", "packets": 5, "connections": 2,
                                                        "bytes_delivered": 47, "incomplete": 1}
    text = render_text(live)
    assert "pods" in text and "default/web-b: 2 connections, 47 B, 1 incomplete" in text
    one = s.model_copy(update={"pods": pods[:1]})
    assert "default/web-a: 1 connection" not in render_text(one)  # one pod all along: the header names it


def test_http2_and_grpc_figures_in_text_and_json() -> None:
    from kubectl_mirror.summary import GrpcMethodSummary, H2Summary

    h2 = H2Summary(connections=2, upgraded=1, streams=305, grpc_calls=304, forwarded=3, filtered=302,
                   grpc_methods={"mirror.Test/Get": GrpcMethodSummary(seen=301, forwarded=1, same=1),
                                 "mirror.Test/List": GrpcMethodSummary(seen=1, forwarded=1, different=1)})
    s = full_summary().model_copy(update={"h2": h2, "protocols": {"http/1.x": 7, "h2": 305, "grpc": 304}})
    text = render_text(s)
    assert "HTTP/2 streams       305   3 forwarded, 302 filtered" in text
    assert "2 connections, 1 upgraded from HTTP/1.1" in text
    assert "mirror.Test/List: 1, 1 forwarded, 0 same, 1 different" in text
    doc = json.loads(render_json(s))
    assert doc["protocols"] == {"http/1.x": 7, "h2": 305, "grpc": 304}
    assert doc["h2"]["grpc_methods"]["mirror.Test/Get"] == {"seen": 301, "forwarded": 1, "same": 1, "different": 0,
                                                            "unpaired": 0}
    assert "h2" not in json.loads(render_json(full_summary()))
