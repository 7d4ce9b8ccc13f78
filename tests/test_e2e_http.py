"""Acceptance for HTTP mode and shadow comparison: real traffic captured in a "pod" namespace, replayed offline.

The "pod" runs tests.http_target in its production role; the local service is the same program in its local
role, which answers differently on /diff* (500) and in a volatile JSON field (`ts`) on /json*. Ground truth is
what each side's application received, and production's own answers are in the capture.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.apiserver import FakeCluster
from tests.cli_run import wait_for
from tests.http_target import MID_LATE, PIPELINED, Conn, HttpTarget
from tests.live_helpers import POD_PORT, LiveLab, curl_keepalive, live_run
from tests.netlab import traffic
from tests.netlab.capture import Capture
from tests.netlab.lab import REPO, run_cli
from tests.netlab.netns import Link, Netns, veth_lab

PORT = 8080
pytestmark = pytest.mark.netns

# Every request of the main capture, per connection, in order.
KEEPALIVE = ["/", "/api/items?page=2", "/diff/one", "/json/a"]
ALL_TARGETS = [*KEEPALIVE, "/api/tenant", "/upload", "/p1", "/diff/p2", "/p3"]
UPLOAD = 3000


class ProdServer:
    """tests.http_target --role prod in a namespace."""

    def __init__(self, ns: Netns, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            ns.argv([sys.executable, "-m", "tests.http_target", "--role", "prod", "--port", str(PORT),
                     "--out", str(out)]), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening"):
            self.proc.kill()
            raise RuntimeError(f"prod server did not start: {line!r}")

    def stop(self) -> list[Conn]:
        self.proc.terminate()
        self.proc.communicate(timeout=30)
        return [Conn.from_json(d) for d in json.loads(self.out.read_text())]


def capture(link: Link, pcap: Path, drive: Callable[[Link], None]) -> list[Conn]:
    for _ in range(3):
        server = ProdServer(link.server, pcap.with_suffix(".prod.json"))
        try:
            with Capture(link.server, link.server_if, pcap) as cap:
                drive(link)
        finally:
            truth = server.stop()
        if cap.dropped() == 0:
            return truth
    pytest.fail("tcpdump dropped packets in 3 captures in a row")


def drive_main(link: Link) -> None:
    host = link.server_ip4
    base = f"http://{host}:{PORT}"
    out = traffic.curl(link.client, [base + p for p in KEEPALIVE])
    assert out.count("ok GET") == 3
    traffic.curl(link.client, [f"{base}/api/tenant"], ["-H", "X-Tenant: acme"])
    traffic.curl(link.client, [f"{base}/upload"], ["-H", "Expect: 100-continue", "--data-binary", "x" * UPLOAD])
    run = link.client.run([sys.executable, "-m", "tests.http_target", "pipelined", host, str(PORT)], timeout=60,
                          check=False)
    assert run.returncode == 0, run.stderr
    traffic.raw_conns(link.client, host, PORT, 1, 2000, tag="bin")


@dataclass
class Mirrored:
    proc: subprocess.CompletedProcess[str]
    summary: dict[str, Any]
    requests: list[dict[str, Any]]
    conns: list[Conn]

    @property
    def heads(self) -> list[dict[str, Any]]:
        return [h for c in self.conns for h in c.heads]


def mirror(pcap: Path, args: list[str], expect_conns: int) -> Mirrored:
    """The real CLI, -o json, to a local-role target on loopback; stdout is JSON lines with the summary last."""
    local = HttpTarget("local").start()
    try:
        proc = run_cli(["replay", str(pcap), "--to", f"127.0.0.1:{local.port}", "-o", "json", *args])
        local.wait_idle(expect_conns + 1, timeout=15.0 if proc.returncode == 0 else 2.0)
    finally:
        conns = local.stop()
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines and all(line.get("type") == "request" for line in lines[:-1]), proc.stdout
    return Mirrored(proc, lines[-1], lines[:-1], conns)


@pytest.fixture(scope="module")
def main_capture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[Conn]]]:
    pcap = tmp_path_factory.mktemp("http") / "main.pcap"
    with veth_lab() as link:
        truth = capture(link, pcap, drive_main)
    assert [h["target"] for c in truth for h in c.heads] == ALL_TARGETS
    yield pcap, truth


def data(conns: list[Conn]) -> list[bytes]:
    return sorted(bytes(c.data) for c in conns)


def test_http_mode_delivers_every_byte_as_captured(main_capture: tuple[Path, list[Conn]]) -> None:
    pcap, truth = main_capture
    m = mirror(pcap, ["--http"], expect_conns=5)
    assert data(m.conns) == data(truth)
    assert PIPELINED in [bytes(c.data) for c in m.conns]
    assert m.summary["http"] == {"requests": 9, "forwarded": 9, "filtered": 0, "rate_limited": 0,
                                 "sampled_out_connections": 0, "non_http_connections": 1, "parse_errors": 0}
    assert "compare" not in m.summary
    assert m.summary["connections"]["complete"] == 5
    by_path = {r["path"]: r for r in m.requests}
    assert sorted(by_path) == sorted(ALL_TARGETS)
    assert by_path["/diff/one"]["status"] == 500 and by_path["/diff/p2"]["status"] == 500
    assert all(r["forwarded"] and r["latency_ms"] >= 0 for r in m.requests)
    assert {r["status"] for p, r in by_path.items() if not p.startswith("/diff")} == {200}


def test_filters_send_only_matching_requests(main_capture: tuple[Path, list[Conn]]) -> None:
    pcap, truth = main_capture
    m = mirror(pcap, ["--match-method", "GET", "--match-path", "^/(api|diff)"], expect_conns=3)
    assert sorted(h["target"] for h in m.heads) == sorted(["/api/items?page=2", "/diff/one", "/api/tenant",
                                                           "/diff/p2"])
    http = m.summary["http"]
    assert (http["requests"], http["forwarded"], http["filtered"]) == (9, 4, 5)
    conns = m.summary["connections"]
    # The upload's and the non-HTTP connection had nothing to send: they never reached the local service.
    assert (conns["seen"], conns["complete"], conns["skipped"]) == (5, 3, 2), conns
    tenant = next(c for c in truth if c.heads[0]["target"] == "/api/tenant")
    assert bytes(tenant.data) in [bytes(c.data) for c in m.conns]  # a matching request goes out byte-exact
    assert sorted(r["path"] for r in m.requests if not r["forwarded"]) == sorted(["/", "/json/a", "/upload", "/p1",
                                                                                  "/p3"])
    assert all(r["status"] is None for r in m.requests if not r["forwarded"])

    m = mirror(pcap, ["--match-header", "X-Tenant: ^acme$"], expect_conns=1)
    assert [h["target"] for h in m.heads] == ["/api/tenant"]


def test_rewrites_reach_the_local_service(main_capture: tuple[Path, list[Conn]]) -> None:
    pcap, truth = main_capture
    m = mirror(pcap, ["--set-header", "X-Mirror: 1", "--rewrite-host", "shadow.test:9"], expect_conns=5)
    assert len(m.heads) == 9
    for head in m.heads:
        headers = [(n.lower(), v) for n, v in head["headers"]]
        assert ("host", "shadow.test:9") in headers and ("x-mirror", "1") in headers, head
        assert sum(n == "host" for n, _ in headers) == 1
    # Bodies and their framing are untouched (chunked included): each request arrived with its captured size.
    got = {h["target"]: h["body"] for h in m.heads}
    assert got == {h["target"]: h["body"] for c in truth for h in c.heads}
    assert got["/upload"] == UPLOAD and got["/p3"] == len("hello, world")
    # The non-HTTP connection passes untouched.
    raw = [bytes(c.data) for c in m.conns if c.data.startswith(b"conn-bin-")]
    assert raw == [bytes(c.data) for c in truth if c.data.startswith(b"conn-bin-")]


def test_sampling_keeps_whole_connections(main_capture: tuple[Path, list[Conn]]) -> None:
    pcap, truth = main_capture
    kept_sets = []
    for seed in (1, 2):
        m = mirror(pcap, ["--sample", "50%", "--sample-seed", str(seed)], expect_conns=0)
        http, conns = m.summary["http"], m.summary["connections"]
        out = http["sampled_out_connections"]
        assert conns["skipped"] == out and len(m.conns) == 5 - out
        # Whole connections, byte-exact: each one the local service saw is one production saw.
        assert set(data(m.conns)) <= set(data(truth))
        assert http["forwarded"] == sum(len(c.heads) for c in m.conns)
        kept_sets.append(data(m.conns))
    again = mirror(pcap, ["--sample", "50%", "--sample-seed", "1"], expect_conns=0)
    assert data(again.conns) == kept_sets[0]  # the same seed picks the same connections
    none = mirror(pcap, ["--sample", "0%"], expect_conns=0)
    assert none.conns == [] and none.summary["http"]["sampled_out_connections"] == 5


def test_max_rps_holds_requests_back_and_counts_them(main_capture: tuple[Path, list[Conn]]) -> None:
    pcap, _ = main_capture
    m = mirror(pcap, ["--max-rps", "1", "--speed", "1"], expect_conns=0)
    http = m.summary["http"]
    assert http["rate_limited"] > 0
    assert http["forwarded"] + http["rate_limited"] == http["requests"] == 9
    assert len(m.heads) == http["forwarded"]
    assert sum(not r["forwarded"] for r in m.requests) == http["rate_limited"]


def test_compare_finds_exactly_the_answers_that_differ(main_capture: tuple[Path, list[Conn]],
                                                       tmp_path: Path) -> None:
    pcap, _ = main_capture
    report = tmp_path / "diff.jsonl"
    m = mirror(pcap, ["--compare", "--ignore-json-path", "$.ts", "--compare-report", str(report)], expect_conns=5)
    assert m.summary["compare"] == {"same": 7, "different": 2, "unpaired": 0}
    assert report.stat().st_mode & 0o777 == 0o600
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert sorted(line["target"] for line in lines) == ["/diff/one", "/diff/p2"]
    for line in lines:
        assert line["method"] == "GET"
        assert {"field": "status", "prod": 200, "local": 500} in line["differences"]

    # Without hiding the volatile field, the JSON answer differs too, at exactly that field.
    m = mirror(pcap, ["--compare-report", str(report)], expect_conns=5)
    assert m.summary["compare"] == {"same": 6, "different": 3, "unpaired": 0}
    json_line = next(json.loads(x) for x in report.read_text().splitlines() if '"/json/a"' in x)
    assert json_line["differences"] == [{"field": "body:$.ts", "prod": 1000, "local": 2000}]


def test_mid_stream_join_starts_at_the_next_request(tmp_path: Path) -> None:
    pcap = tmp_path / "mid.pcap"
    with veth_lab() as link:
        server = ProdServer(link.server, tmp_path / "mid.prod.json")
        client = subprocess.Popen(link.client.argv([sys.executable, "-m", "tests.http_target", "midclient",
                                                    link.server_ip4, str(PORT)]), cwd=REPO, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert client.stdout is not None and client.stdin is not None
            assert client.stdout.readline().strip() == "phase1"
            with Capture(link.server, link.server_if, pcap):
                out, err = client.communicate("go\n", timeout=30)
                assert "done 3" in out, (out, err)
                traffic.curl(link.client, [f"http://{link.server_ip4}:{PORT}/diff/fresh"])
        finally:
            if client.poll() is None:
                client.kill()
            truth = server.stop()
    assert [h["target"] for c in truth for h in c.heads] == ["/early", "/late1", "/diff/late2", "/diff/fresh"]

    m = mirror(pcap, ["--compare", "--port", str(PORT)], expect_conns=2)
    late = [bytes(c.data) for c in m.conns if c.heads and c.heads[0]["target"] == "/late1"]
    assert late == [MID_LATE]  # not a byte of the half-seen request body before it
    assert m.summary["connections"]["partial"] == 1
    assert m.summary["http"]["requests"] == 3
    # The joined connection's production answers cannot be lined up (one began before the capture): unpaired.
    assert m.summary["compare"] == {"same": 0, "different": 1, "unpaired": 2}


# ---- live ------------------------------------------------------------------------------------------------


@pytest.fixture
def live_lab(tmp_path: Path) -> Iterator[tuple[LiveLab, contextlib.ExitStack]]:
    with contextlib.ExitStack() as stack:
        fc = FakeCluster(tmp_path)
        fc.start()
        fc.tap_start_delay = 0.05
        try:
            yield LiveLab(fc, tmp_path), stack
        finally:
            fc.stop()  # before `stack` removes the pod's namespace: kills what a failed run left exec'd there


def test_live_compare(live_lab: tuple[LiveLab, contextlib.ExitStack], tmp_path: Path) -> None:
    lab, stack = live_lab
    pod = lab.add_serving_pod(stack, "web-0")  # the pod answers like the local role, except on /diff*
    local = HttpTarget("local").start()
    report = tmp_path / "live-diff.jsonl"
    try:
        args = ["pod/web-0", "--to", f"127.0.0.1:{local.port}", "--kubeconfig", str(lab.fc.kubeconfig), "-o",
                "json", "--compare", "--compare-report", str(report)]
        with live_run(args) as run:
            run.wait_mirroring()
            out = curl_keepalive(pod.ip, POD_PORT, ["/a", "/diff/live", "/b?q=1"])
            assert out.count("ok GET") == 3
            assert wait_for(lambda: local.wait_idle(2, timeout=0.1), 15.0)
            run.interrupt()
            result = run.finish()
    finally:
        conns = local.stop()
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    summary = lines[-1]
    assert summary["compare"] == {"same": 2, "different": 1, "unpaired": 0}, result.stdout
    assert summary["http"]["forwarded"] == 3
    assert [h["target"] for c in conns for h in c.heads] == ["/a", "/diff/live", "/b?q=1"]
    assert [(r["path"], r["status"]) for r in lines[:-1]] == [("/a", 200), ("/diff/live", 500), ("/b?q=1", 200)]
    assert [json.loads(x)["target"] for x in report.read_text().splitlines()] == ["/diff/live"]
