"""HTTP mode's wiring without namespaces: summary counting, request/response pairing, flags, output shape."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubectl_mirror.httpopts import HttpOptions
from kubectl_mirror.model import Close, Endpoint, EndReason, FlowRecord, Open, Outcome, RequestRecord, Send
from kubectl_mirror.replay import Delivery, ReplayConfig, Replayer
from kubectl_mirror.settings import parse_to
from kubectl_mirror.shadow import RequestResult, Shadow, ShadowOptions
from kubectl_mirror.summary import CompareSummary, HttpSummary, Summary, SummaryBuilder, render_json, render_text
from tests.http_target import HttpTarget

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "web.pcap"
C, S = Endpoint("10.0.0.1", 4000), Endpoint("10.0.0.2", 80)


def record(flow: int, nbytes: int = 100) -> FlowRecord:
    return FlowRecord(flow, C, S, False, Outcome.COMPLETE, EndReason.FIN, nbytes, 0.0, 1.0)


# ---- the summary ---------------------------------------------------------------------------------------------


def test_suppressed_flows_count_as_skipped_with_no_bytes() -> None:
    b = SummaryBuilder("x", "y")
    b.add_suppressed([1])
    b.add_record(record(1, 500))  # the flow table delivered 500 bytes to the layer, which sent none on
    b.add_record(record(2, 70))
    b.add_delivery(Delivery(2, None, 70, None))
    s = b.build(duration_seconds=1.0)
    assert (s.connections.seen, s.connections.skipped, s.connections.complete) == (2, 1, 1)
    assert s.bytes_delivered == 70
    assert b.pending == 0


def test_suppressed_after_its_record_is_counted_at_once() -> None:
    b = SummaryBuilder("x", "y")
    b.add_record(record(3, 10))
    assert b.pending == 1
    b.add_suppressed([3])
    assert b.pending == 0
    assert b.build(duration_seconds=0).connections.skipped == 1


def test_aborted_flows_are_incomplete() -> None:
    b = SummaryBuilder("x", "y")
    b.add_aborted([4, 5])
    b.add_record(record(4))
    b.add_delivery(Delivery(4, None, 40, None))  # opened: the replayer reset it on the layer's Abort
    b.add_suppressed([5])  # never opened: no delivery will come
    b.add_record(record(5))
    s = b.build(duration_seconds=0)
    assert (s.connections.incomplete, s.connections.complete, s.connections.skipped) == (2, 0, 0)
    assert s.bytes_delivered == 40


def test_json_carries_http_and_compare_only_when_set() -> None:
    plain = Summary(source="a", target="b")
    assert "http" not in json.loads(render_json(plain)) and "compare" not in render_json(plain)
    full = Summary(source="a", target="b", http=HttpSummary(requests=5, forwarded=3, filtered=2),
                   compare=CompareSummary(same=2, different=1))
    doc = json.loads(render_json(full, one_line=True))
    assert doc["http"]["filtered"] == 2 and doc["compare"] == {"same": 2, "different": 1, "unpaired": 0}
    assert "\n" not in render_json(full, one_line=True)
    text = render_text(full)
    assert "3 forwarded, 2 filtered" in text and "2 same, 1 different" in text
    assert "requests" not in render_text(plain) and "compared" not in render_text(plain)


# ---- pairing -------------------------------------------------------------------------------------------------


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
BAD = b"HTTP/1.1 500 Oops\r\ncontent-length: 3\r\n\r\nbad"


def req(flow: int, index: int, target: str, sent: int | None) -> RequestRecord:
    return RequestRecord(flow, index, "GET", target, "h", 0.0, sent is not None, sent)


def test_local_answers_pair_by_sent_index_and_production_by_index(tmp_path: Path) -> None:
    results: list[RequestResult] = []
    report = tmp_path / "r.jsonl"
    sh = Shadow(ShadowOptions(HttpOptions(), compare=True, report=str(report), on_request=results.append))
    # Request 1 was filtered: the local service answers requests 0 and 2, production answers all three.
    sh.requests([req(1, 0, "/a", 0), req(1, 1, "/skip", None), req(1, 2, "/diff", 1)], now=time.monotonic())
    sh.reply(1, OK + OK + OK, 1.0)
    sh.local(1, OK, time.monotonic())
    sh.local(1, BAD, time.monotonic())
    sh.local(1, b"", time.monotonic())
    sh.local_end(1, time.monotonic())
    sh.prod_end(1, 2.0, reply_complete=True)
    sh.close()
    assert (sh.same, sh.different, sh.unpaired) == (1, 1, 0)
    assert [(r.target, r.forwarded, r.status) for r in results] == [("/skip", False, None), ("/a", True, 200),
                                                                   ("/diff", True, 500)]
    lines = [json.loads(x) for x in report.read_text().splitlines()]
    assert [(x["target"], x["index"]) for x in lines] == [("/diff", 2)]
    assert report.stat().st_mode & 0o777 == 0o600


def test_answers_that_never_come_are_unpaired_and_still_reported() -> None:
    results: list[RequestResult] = []
    sh = Shadow(ShadowOptions(HttpOptions(), compare=True, on_request=results.append))
    sh.requests([req(2, 0, "/a", 0), req(2, 1, "/b", 1)], now=time.monotonic())
    sh.reply(2, OK, 1.0)  # production answered only the first before the capture lost the rest
    sh.local(2, OK, time.monotonic())
    sh.local_end(2, time.monotonic())  # the local connection closed without answering /b
    sh.prod_end(2, 2.0, reply_complete=False)
    assert (sh.same, sh.different, sh.unpaired) == (1, 0, 1)
    assert [(r.target, r.status) for r in results] == [("/a", 200), ("/b", None)]


def test_joined_connections_are_not_compared() -> None:
    sh = Shadow(ShadowOptions(HttpOptions(), compare=True))
    assert sh.options.http.align  # --compare realigns joined connections, so the local side gets whole requests
    sh.opened(3, partial=True)
    sh.requests([req(3, 0, "/a", 0)], now=time.monotonic())
    sh.reply(3, b"tail of an earlier answer" + OK, 1.0)
    sh.local(3, OK, time.monotonic())
    sh.local_end(3, time.monotonic())
    sh.prod_end(3, 2.0, reply_complete=True)
    assert (sh.same, sh.different, sh.unpaired) == (0, 0, 1)


def test_without_compare_nothing_is_held_after_the_answer() -> None:
    results: list[RequestResult] = []
    sh = Shadow(ShadowOptions(HttpOptions(), on_request=results.append))
    sh.requests([req(4, 0, "/a", 0)], now=time.monotonic())
    sh.local(4, OK, time.monotonic())
    assert results[0].status == 200 and results[0].latency_ms is not None
    sh.local_end(4, time.monotonic())
    assert sh.tracked_flows == 0


# ---- the replayer's response hook ----------------------------------------------------------------------------


def test_replayer_hands_responses_to_the_hook_and_ends_with_empty_bytes() -> None:
    target = HttpTarget("prod").start()
    got: list[tuple[int, bytes]] = []
    rp = Replayer(parse_to(f"127.0.0.1:{target.port}"), ReplayConfig(on_response=lambda f, d, ts: got.append((f, d))))
    try:
        rp.execute([Open(7, C, S, False, 0.0), Send(7, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", 0.0), Close(7, 0.0)])
        rp.drain(5.0)
    finally:
        rp.close()
        target.stop()
    assert got and got[-1] == (7, b"")
    assert b"".join(d for _, d in got).startswith(b"HTTP/1.1 200 ")
    assert rp.pop_finished()[0].outcome is None


def test_replayer_without_hook_discards_as_before() -> None:
    target = HttpTarget("prod").start()
    rp = Replayer(parse_to(f"127.0.0.1:{target.port}"), ReplayConfig())
    try:
        rp.execute([Open(8, C, S, False, 0.0), Send(8, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", 0.0), Close(8, 0.0)])
        rp.drain(5.0)
        assert rp.stats.bytes_discarded > 0
    finally:
        rp.close()
        target.stop()


# ---- the command line ----------------------------------------------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "kubectl-mirror"), *args], capture_output=True, text=True,
                          timeout=60, check=False, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("flags", [
    ["--match-header", "no colon here"],
    ["--match-path", "("],
    ["--sample", "150%"],
    ["--sample", "lots"],
    ["--set-header", "Content-Length: 5"],
    ["--max-rps", "0"],
    ["--ignore-json-path", "$["],
])
def test_bad_http_values_are_one_line_usage_errors(flags: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        out = run("replay", str(SAMPLE), "--to", f"127.0.0.1:{s.getsockname()[1]}", *flags)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr


def test_http_json_output_is_request_lines_then_the_summary() -> None:
    local = HttpTarget("local").start()
    try:
        out = run("replay", str(SAMPLE), "--to", f"127.0.0.1:{local.port}", "-o", "json", "--match-path", "^/api")
    finally:
        local.stop()
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    summary = Summary.model_validate(json.loads(lines[-1]))
    requests = [json.loads(line) for line in lines[:-1]]
    assert summary.http is not None and summary.compare is None
    assert summary.http.requests == len(requests) == 4
    assert summary.http.forwarded == sum(r["forwarded"] for r in requests) == 2
    assert all(r["type"] == "request" and r["path"].startswith("/api") == r["forwarded"] for r in requests)
    assert out.stderr == ""


def test_http_text_mode_shows_the_requests_row() -> None:
    local = HttpTarget("local").start()
    try:
        out = run("replay", str(SAMPLE), "--to", f"127.0.0.1:{local.port}", "--http")
    finally:
        local.stop()
    assert out.returncode == 0, out.stderr
    assert "requests" in out.stderr and "4 forwarded" in out.stderr
    assert out.stdout == ""
