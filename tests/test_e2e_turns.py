"""Turn-taking end to end: real captures of clients that wait for answers, replayed into real local servers.

Captures are made once per module in network namespaces (a turn-taking server in the "pod", real clients in
another namespace). The local servers count what they did: a stock Node.js server with a 20 ms handler, and
test servers that abandon a request whose client has gone, or never answer at all.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live_helpers import POD_PORT, LiveLab, curl_keepalive, live_lab, live_run
from tests.netlab.capture import Capture
from tests.netlab.lab import REPO, CliOutput, run_cli
from tests.netlab.netns import Link, veth_lab
from tests.netlab.recorder import Recorder
from tests.netlab.turnclient import _request
from tests.netlab.turnserver import TurnServer
from tests.test_e2e_live import POD_A, deploy_web

PORT = 8080
NODE = "/usr/bin/node"
# name: (server mode in the pod, client arguments)
SCENARIOS = {
    "oneshot": ("http", ["http", "--conns", "40", "--requests", "1"]),
    "keepalive": ("http", ["http", "--conns", "4", "--requests", "25"]),
    "rst": ("http", ["http", "--conns", "5", "--requests", "1", "--rst"]),
    "pipeline": ("http", ["pipeline", "--conns", "3", "--requests", "5"]),
    "line": ("line", ["line", "--conns", "4", "--requests", "20"]),
}


def _capture(link: Link, pcap: Path, mode: str, client: list[str], attempts: int = 3) -> Path:
    for _ in range(attempts):
        peer = "grpcpeer" if mode == "grpc" else "turnclient"
        serve = ["-m", "tests.netlab.grpcpeer", "server"] if mode == "grpc" else ["-m", "tests.netlab.turnserver", mode]
        server = subprocess.Popen(link.server.argv([sys.executable, *serve, "--port", str(PORT)]),
                                  cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            assert server.stdout.readline().startswith("listening")
            with Capture(link.server, link.server_if, pcap, bpf=f"tcp port {PORT}") as cap:
                out = subprocess.run(
                    link.client.argv([sys.executable, "-m", f"tests.netlab.{peer}", *client,
                                      "--host", link.server_ip4, "--port", str(PORT)]),
                    cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
                assert out.returncode == 0, out.stdout + out.stderr
        finally:
            server.send_signal(signal.SIGTERM)
            server.communicate(timeout=10)
        if cap.dropped() == 0:
            return pcap
    pytest.fail(f"tcpdump dropped packets in {attempts} captures in a row")


@pytest.fixture(scope="module")
def pcaps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("turns")
    with veth_lab() as link:
        return {name: _capture(link, root / f"{name}.pcap", mode, client)
                for name, (mode, client) in SCENARIOS.items()}


@pytest.fixture(scope="module")
def grpc_pcap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A grpcio client: 301 unary calls 100 at a time, then one call of each streaming kind, on one connection."""
    with veth_lab() as link:
        return _capture(link, tmp_path_factory.mktemp("grpc") / "grpc.pcap", "grpc", ["client"])


# A capture made like `grpc_pcap` where production sent its SETTINGS ACK only after the client's own ACK, while the
# local grpcio server sends both at once: the turn before the client's first request is answered ahead.
GRPC_ACK_AHEAD = REPO / "tests/captures/grpc-ack-ahead.pcap"
# Another such capture, where the local grpcio server sends more bytes (PINGs, WINDOW_UPDATEs) than production did:
# by byte count the later turns look answered while the List and Chat calls are still running here.
GRPC_LOCAL_AHEAD = REPO / "tests/captures/grpc-local-ahead.pcap"
CAPTURES = {"ack-ahead": GRPC_ACK_AHEAD, "local-ahead": GRPC_LOCAL_AHEAD}


@pytest.mark.parametrize("speed", ["0", "1"])
@pytest.mark.parametrize("source", ["fresh", "ack-ahead", "local-ahead"])
def test_a_grpc_server_completes_every_call(grpc_pcap: Path, source: str, speed: str) -> None:
    # Imported here: grpcio is a dev extra (make venv), and the other tests need none of it.
    from tests.netlab.grpcpeer import UNARY_CALLS, Counts, make_server

    counts = Counts()
    server, port = make_server(0, 0.02, counts)
    try:
        out = replay_to(grpc_pcap if source == "fresh" else CAPTURES[source], port, "--speed", speed)
    finally:
        server.stop(grace=2.0).wait(5)
    assert_all_complete(out, 1)
    assert counts.values == {"get_done": UNARY_CALLS, "get_cancelled": 0, "list": 1, "put": 1, "chat": 1}, (
        counts.values, out.summary.get("turns"))


def expected(name: str) -> list[bytes]:
    """What each captured client sent, per connection (sorted): the bytes every replay must deliver exactly."""
    _, client = SCENARIOS[name]
    conns, requests = int(client[client.index("--conns") + 1]), int(client[client.index("--requests") + 1])
    if client[0] == "line":
        return sorted(b"".join(b"PING %d-%d\n" % (i, j) for j in range(requests)) for i in range(conns))
    host = "198.18.0.2"
    return sorted(b"".join(_request(i, j, host) for j in range(requests)) for i in range(conns))


def replay_to(pcap: Path, port: int, *extra: str) -> CliOutput:
    out = run_cli(["replay", str(pcap), "--to", f"127.0.0.1:{port}", "--json", *extra], timeout=120)
    assert "Traceback" not in out.stderr, out.stderr
    return CliOutput(out.returncode, out.stdout, out.stderr)


class Node:
    """The stock Node.js server of tests/servers/slow_http.js; `stop()` returns what it counted."""

    def __init__(self, delay_ms: int = 20) -> None:
        self.proc = subprocess.Popen([NODE, str(REPO / "tests/servers/slow_http.js"), "0", str(delay_ms)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("listening"), line
        self.port = int(line.split()[1])

    def stop(self) -> dict[str, int]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=10)
        return dict(json.loads(out.strip().splitlines()[-1]))


@pytest.fixture
def node() -> Iterator[Node]:
    server = Node()
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


@pytest.fixture
def servers() -> Iterator[list[TurnServer]]:
    started: list[TurnServer] = []
    yield started
    for s in started:
        s.stop(grace=1.0)


def serve(servers: list[TurnServer], mode: str, delay: float = 0.02, abandon: bool = True) -> TurnServer:
    server = TurnServer(mode, delay, abandon).start()
    servers.append(server)
    return server


def assert_all_complete(out: CliOutput, conns: int) -> None:
    assert out.returncode == 0, out.stderr
    c = out.connections
    assert c["complete"] == c["seen"] == conns, c


@pytest.mark.parametrize("speed", ["0", "1"])
@pytest.mark.parametrize("name,requests", [("oneshot", 40), ("keepalive", 100)])
def test_node_answers_every_request(pcaps: dict[str, Path], node: Node, name: str, requests: int,
                                    speed: str) -> None:
    out = replay_to(pcaps[name], node.port, "--speed", speed)
    counts = node.stop()
    assert counts == {"requests": requests, "answered": requests, "abandoned": 0}, (counts, out.stderr)
    assert_all_complete(out, len(expected(name)))
    turns = out.summary["turns"]
    assert turns["requests"] == turns["requests_answered"] == requests, turns
    assert turns["unanswered"] == 0 and turns["closed_early"] == 0, turns
    assert turns["local_p99_ms"] >= 20, turns  # the handler's 20 ms, measured from the mirror's side


def test_a_server_that_abandons_work_of_a_gone_client_finishes_it_all(pcaps: dict[str, Path],
                                                                      servers: list[TurnServer]) -> None:
    server = serve(servers, "http")
    out = replay_to(pcaps["oneshot"], server.port)
    assert_all_complete(out, 40)
    assert server.totals() == {"conns": 40, "requests": 40, "answered": 40, "abandoned": 0}


def test_an_rst_ended_client_is_delivered_whole_and_answered(pcaps: dict[str, Path],
                                                            servers: list[TurnServer]) -> None:
    server = serve(servers, "http")
    out = replay_to(pcaps["rst"], server.port)
    assert_all_complete(out, 5)
    conns = server.stop()
    real = [c for c in conns if c.data]
    assert sorted(bytes(c.data) for c in real) == expected("rst")
    assert [c.answered for c in real] == [1] * 5 and all(c.end == "reset" for c in real), real
    assert out.summary["bytes_delivered"] == sum(len(b) for b in expected("rst"))


def test_an_rst_ended_client_reaches_a_recorder_byte_exact(pcaps: dict[str, Path]) -> None:
    rec = Recorder("127.0.0.1", 0).start()
    try:
        out = replay_to(pcaps["rst"], rec.port)
        rec.wait_idle(0, timeout=10)
    finally:
        records = [r for r in rec.stop(grace=5.0) if r.data]
    assert_all_complete(out, 5)
    assert sorted(bytes(r.data) for r in records) == expected("rst")


def test_a_pipelining_client_is_delivered_pipelined(pcaps: dict[str, Path], servers: list[TurnServer]) -> None:
    server = serve(servers, "http", delay=0.05)
    out = replay_to(pcaps["pipeline"], server.port)
    assert_all_complete(out, 3)
    real = [c for c in server.stop() if c.data]
    # Every request was there before the first answer (as the client sent them), and all were answered before
    # the FIN: the server abandons requests of a client that has gone.
    assert [(c.before_first_answer, c.answered, c.abandoned) for c in real] == [(5, 5, 0)] * 3, real


def test_an_opaque_protocol_keeps_its_turns(pcaps: dict[str, Path], servers: list[TurnServer]) -> None:
    server = serve(servers, "line")
    out = replay_to(pcaps["line"], server.port)
    assert_all_complete(out, 4)
    real = [c for c in server.stop() if c.data]
    assert sorted(bytes(c.data) for c in real) == expected("line")
    # One PING at a time, each answered before the next went out.
    assert [(c.before_first_answer, c.answered, c.abandoned) for c in real] == [(1, 20, 0)] * 4, real
    assert out.summary["turns"]["answered"] == 4 * 20, out.summary["turns"]


def test_a_silent_sink_costs_one_bounded_wait_per_connection(pcaps: dict[str, Path],
                                                             servers: list[TurnServer]) -> None:
    server = serve(servers, "sink")
    out = replay_to(pcaps["keepalive"], server.port, "--answer-timeout", "300ms")
    assert_all_complete(out, 4)
    turns = out.summary["turns"]
    # The first turn of each connection waits for its limit; then the connection stops waiting.
    assert turns["unanswered"] == 4 and turns["answered"] == 0, turns
    assert turns["not_waited"] == turns["turns"] - 4, turns
    real = [c for c in server.stop() if c.data]
    assert sorted(bytes(c.data) for c in real) == expected("keepalive")


def test_keep_alive_bytes_stay_exact(pcaps: dict[str, Path]) -> None:
    rec = Recorder("127.0.0.1", 0).start()
    try:
        out = replay_to(pcaps["keepalive"], rec.port)
        rec.wait_idle(0, timeout=10)
    finally:
        records = [r for r in rec.stop(grace=5.0) if r.data]
    assert_all_complete(out, 4)
    assert sorted(bytes(r.data) for r in records) == expected("keepalive")
    turns = out.summary["turns"]
    assert turns["requests_answered"] == turns["requests"] == 100, turns


# ---- the live path ------------------------------------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LiveLab]:
    """The test cluster of tests/test_e2e_live.py, its pods real namespaces serving HTTP."""
    with live_lab(tmp_path) as lab:
        yield lab


@pytest.mark.netns
def test_live_a_local_service_slower_than_production_answers_every_request(
        lab: LiveLab, stack: contextlib.ExitStack, node: Node) -> None:
    deploy_web(lab, stack)
    with live_run(["deploy/web", "--to", f"127.0.0.1:{node.port}", "--duration", "6s", *lab.kube_args(),
                   "--json"]) as run:
        run.wait_mirroring()
        ip = lab.pods[POD_A].ip
        for i in range(10):  # one-request connections: curl's FIN comes right after its answer
            assert "ok GET" in curl_keepalive(ip, POD_PORT, [f"/one/{i}"])
        assert curl_keepalive(ip, POD_PORT, [f"/kept/{j}" for j in range(10)]).count("ok GET") == 10
        result = run.finish()
    counts = node.stop()
    assert result.returncode == 0, result.stderr
    assert counts == {"requests": 20, "answered": 20, "abandoned": 0}, (counts, result.stderr)
    turns = result.summary["turns"]
    assert turns["requests"] == turns["requests_answered"] == 20, turns
