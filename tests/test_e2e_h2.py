"""HTTP/2 and gRPC in HTTP mode end to end: real captures (tests/h2_captures.py) replayed through the real CLI into
real local servers (nghttpd, grpcio, the h2 test server) and the recorder.

With nothing that changes requests the bytes go out exactly as captured; with a filter or a rewrite the local side
gets its own HTTP/2 connection, so the servers must see exactly the calls that match.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import h2_captures
from tests.h2_captures import BIG
from tests.netlab.lab import REPO, run_cli
from tests.netlab.recorder import Recorder

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def pcaps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e_h2")
    return {kind: h2_captures.make(kind, root) for kind in ("h2load", "curl", "upgrade", "declined", "grpc",
                                                                     "proto")}


def replay(pcap: Path, port: int, *extra: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The CLI with -o json: its per-request lines and its summary."""
    out = run_cli(["replay", str(pcap), "--to", f"127.0.0.1:{port}", "-o", "json", *extra], timeout=120)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return [d for d in lines if d.get("type") == "request"], lines[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


@pytest.fixture
def nghttpd(tmp_path: Path) -> Iterator[int]:
    www = tmp_path / "www"
    www.mkdir()
    (www / "a").write_bytes(b"local /a\n")
    (www / "b").write_bytes(b"local /b\n")
    port = free_port()
    proc = subprocess.Popen(["nghttpd", "--no-tls", "-a", "127.0.0.1", "-d", str(www), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


class H2Server:
    """tests/netlab/h2server.py on loopback; `stop()` returns the requests it served ("METHOD PATH BODYSIZE")."""

    def __init__(self, variant: str = "a") -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.netlab.h2server", "--host", "127.0.0.1",
                                      "--variant", variant], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline().split()[1])

    def stop(self) -> list[str]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=10)
        return list(json.loads(out.strip().splitlines()[-1])["requests"])


@pytest.mark.parametrize("kind", ["h2load", "grpc", "upgrade"])
def test_no_filter_sends_the_captured_bytes_exactly(pcaps: dict[str, Path], kind: str) -> None:
    captured = sorted(b"".join(d for c, d, _ in chunks if c) for _, chunks in h2_captures.flows(pcaps[kind]))
    rec = Recorder(http=False).start()
    try:
        _, summary = replay(pcaps[kind], rec.port, "--http")
    finally:
        got = sorted(bytes(r.data) for r in rec.stop() if r.data)
    assert got == captured
    assert summary["h2"]["connections"] == len(captured)


def test_match_path_reoriginates_into_nghttpd(pcaps: dict[str, Path], nghttpd: int) -> None:
    results, summary = replay(pcaps["h2load"], nghttpd, "--match-path", "^/a")
    seen = Counter((r["path"], r["forwarded"], r["status"], r.get("not_sent")) for r in results)
    assert seen == {("/a", True, 200, None): 200, ("/b", False, None, "filtered"): 200}
    assert summary["connections"]["complete"] == 2
    assert (summary["h2"]["streams"], summary["h2"]["forwarded"], summary["h2"]["filtered"]) == (400, 200, 200)


def test_match_grpc_sends_only_those_calls(pcaps: dict[str, Path]) -> None:
    from tests.netlab.grpcpeer import Counts, make_server

    counts = Counts()
    server, port = make_server(0, 0.0, counts)
    try:
        results, summary = replay(pcaps["grpc"], port, "--match-grpc", r"mirror\.Test/(List|Chat)",
                                  "--set-header", "x-mirror: 1")
    finally:
        server.stop(grace=2.0).wait(5)
    assert counts.values == {"get_done": 0, "get_cancelled": 0, "list": 1, "put": 0, "chat": 1}
    sent = Counter((r["grpc_method"], r["forwarded"], r.get("grpc_status")) for r in results)
    assert sent == {("mirror.Test/List", True, 0): 1, ("mirror.Test/Chat", True, 0): 1,
                    ("mirror.Test/Get", False, None): 301, ("mirror.Test/Put", False, None): 1}
    assert summary["h2"]["grpc_methods"]["mirror.Test/Get"] == {"seen": 301, "forwarded": 0, "same": 0, "different": 0,
                                                              "unpaired": 0}


def test_every_call_reoriginated_reaches_grpcio(pcaps: dict[str, Path]) -> None:
    from tests.netlab.grpcpeer import UNARY_CALLS, Counts, make_server

    counts = Counts()
    server, port = make_server(0, 0.0, counts)
    try:
        results, _ = replay(pcaps["grpc"], port, "--match-grpc", "mirror.Test")
    finally:
        server.stop(grace=2.0).wait(5)
    assert counts.values == {"get_done": UNARY_CALLS, "get_cancelled": 0, "list": 1, "put": 1, "chat": 1}
    assert {(r["status"], r["grpc_status"]) for r in results} == {(200, 0)}


def test_a_10mb_body_is_not_stalled_by_flow_control(pcaps: dict[str, Path]) -> None:
    server = H2Server()
    try:
        results, summary = replay(pcaps["curl"], server.port, "--match-path", "^/big")
    finally:
        served = server.stop()
    assert served == [f"POST /big {BIG}"]
    assert [(r["path"], r["forwarded"], r["status"]) for r in results] == [("/a", False, None), ("/big", True, 200)]
    assert summary["connections"]["complete"] == 1 and summary["connections"]["failed"] == 0


def test_an_upgraded_connection_is_reoriginated_with_its_first_request(pcaps: dict[str, Path]) -> None:
    server = H2Server()
    try:
        results, summary = replay(pcaps["upgrade"], server.port, "--rewrite-host", "shadow.local")
    finally:
        served = server.stop()
    assert served == ["GET /up 0"]
    assert [(r["path"], r["status"]) for r in results] == [("/up", 200)]
    assert summary["h2"]["upgraded"] == 1


@pytest.mark.parametrize("extra", [["--match-path", "^/"], ["--compare"]])
def test_a_declined_upgrade_goes_on_in_http1_with_every_request(pcaps: dict[str, Path], tmp_path: Path,
                                                                extra: list[str]) -> None:
    # Production (Node) answered curl's `Upgrade: h2c` with 200: the connection is HTTP/1.1 to its end, so the
    # HTTP/1.x layer takes it and each of its requests reaches the local server and is counted.
    from tests.test_tls import NodeCounter

    node = NodeCounter(tmp_path / "node.json")
    try:
        results, summary = replay(pcaps["declined"], node.port, *extra)
    finally:
        counts = node.stop()
    assert counts["paths"] == ["GET /one", "GET /two", "GET /three"]
    assert [(r["path"], r["forwarded"], r["status"]) for r in results] == [
        ("/one", True, 200), ("/two", True, 200), ("/three", True, 200)]
    assert summary["h2"]["connections"] == 0 and summary["h2"]["upgraded"] == 0


def test_a_connection_joined_mid_stream_is_not_decoded(pcaps: dict[str, Path], tmp_path: Path) -> None:
    cut = h2_captures.cut_head(pcaps["grpc"], 12, tmp_path / "cut.pcap")
    rec = Recorder(http=False).start()
    try:
        results, summary = replay(cut, rec.port, "--match-grpc", "mirror.Test")
    finally:
        got = [r for r in rec.stop() if r.data]
    # Its headers cannot be known: nothing is guessed, nothing of it is sent when a filter is set.
    assert results == [] and got == []
    assert summary["connections"]["partial"] == 1 and summary["h2"]["connections"] == 0


def test_compare_grpc_calls_message_by_message_against_a_server_that_differs(pcaps: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    from tests.netlab.grpcpeer import Counts, make_server

    report = tmp_path / "diffs.jsonl"
    server, port = make_server(0, 0.0, Counts(), variant=True)
    try:
        _, summary = replay(pcaps["grpc"], port, "--compare", "--compare-report", str(report))
    finally:
        server.stop(grace=2.0).wait(5)
    # Every tenth Get answers "ITEM:", Get 13 fails NOT_FOUND, List's last message differs; Put and Chat agree.
    assert summary["compare"] == {"same": 271, "different": 33, "unpaired": 0}
    methods = summary["h2"]["grpc_methods"]
    assert (methods["mirror.Test/Get"]["same"], methods["mirror.Test/Get"]["different"]) == (269, 32)
    assert (methods["mirror.Test/List"]["different"], methods["mirror.Test/Chat"]["same"]) == (1, 1)
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    by_item = {d["differences"][-1]["prod"]: d for d in lines if d["grpc_method"] == "mirror.Test/Get"}
    assert by_item["item:13"]["differences"] == [
        {"field": "grpc-status", "prod": 0, "local": 5}, {"field": "grpc-message", "prod": "", "local": "no item 13"},
        {"field": "message[0]", "prod": "item:13"}]
    assert by_item["item:130"]["differences"] == [{"field": "message[0]", "prod": "item:130", "local": "ITEM:130"}]
    [listed] = [d for d in lines if d["grpc_method"] == "mirror.Test/List"]
    assert listed["differences"] == [{"field": "message[4]", "prod": "l-4", "local": "l-4!"}]


@pytest.mark.parametrize(("extra", "same", "fields"), [
    ([], 0, {"message[0]"}),  # bytes: the timestamps differ, and nothing says where
    (["--proto-descriptor", "DESC"], 0, {"message[0]:$.ts"}),  # decoded: the difference is named
    (["--proto-descriptor", "DESC", "--ignore-json-path", "$.ts"], 5, set()),  # and can be left out
])
def test_grpc_messages_compare_as_json_with_a_descriptor_set(pcaps: dict[str, Path], tmp_path: Path,
                                                             extra: list[str], same: int, fields: set[str]) -> None:
    from tests.netlab import protoitems
    from tests.netlab.grpcpeer import Counts, make_server

    desc = tmp_path / "items.pb"
    desc.write_bytes(protoitems.descriptor_set())
    report = tmp_path / "diffs.jsonl"
    server, port = make_server(0, 0.0, Counts())
    try:
        _, summary = replay(pcaps["proto"], port, "--compare-report", str(report),
                            *[str(desc) if e == "DESC" else e for e in extra])
    finally:
        server.stop(grace=2.0).wait(5)
    assert summary["compare"] == {"same": same, "different": 5 - same, "unpaired": 0}
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    assert {d["field"] for line in lines for d in line["differences"]} == fields
    assert {line["grpc_method"] for line in lines} <= {"mirror.Items/Get"}


def test_a_connection_joined_mid_stream_goes_byte_exact_when_nothing_filters(pcaps: dict[str, Path],
                                                                            tmp_path: Path) -> None:
    cut = h2_captures.cut_head(pcaps["grpc"], 12, tmp_path / "cut.pcap")
    [(partial, chunks)] = h2_captures.flows(cut)
    assert partial
    rec = Recorder(http=False).start()
    try:
        results, summary = replay(cut, rec.port, "--http")
    finally:
        got = [bytes(r.data) for r in rec.stop() if r.data]
    assert got == [b"".join(d for c, d, _ in chunks if c)]  # from its first captured byte, as captured
    assert results == [] and summary["h2"]["connections"] == 0


@pytest.mark.parametrize("extra", [[], ["--set-header", "x-mirror: 1"]])
def test_compare_an_upgraded_connection_json_aware_with_named_headers(pcaps: dict[str, Path], tmp_path: Path,
                                                                    extra: list[str]) -> None:
    # Production's answer came after its 101 (HTTP/1.1, then frames); the local one on HTTP/2 from the start.
    report = tmp_path / "diffs.jsonl"
    server = H2Server(variant="b")
    try:
        _, summary = replay(pcaps["upgrade"], server.port, "--compare-headers", "x-variant", "--compare-report",
                            str(report), *extra)
    finally:
        server.stop()
    assert summary["compare"] == {"same": 0, "different": 1, "unpaired": 0}
    [line] = [json.loads(x) for x in report.read_text().splitlines()]
    assert (line["target"], line["stream"]) == ("/up", 1)
    assert line["differences"] == [{"field": "header:x-variant", "prod": "a", "local": "b"},
                                   {"field": "body:$.variant", "prod": "a", "local": "b"}]
