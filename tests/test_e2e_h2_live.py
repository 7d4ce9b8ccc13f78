"""HTTP/2 in live mode: `kubectl mirror pod/... --to ...` against the test API server, a grpcio server in the pod's
namespace, a grpcio client making unary and streaming calls to it, mirrored into a local grpcio server.

Byte mode (no filter) with turn-taking on by default: every call completes locally. `--match-grpc` makes it HTTP
mode with a re-originated connection: only that method reaches the local server.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from tests.apiserver import PodNetns
from tests.live_helpers import live_lab, live_run
from tests.netlab.grpcpeer import SERVICE, Counts, make_server
from tests.netlab.lab import REPO

pytestmark = pytest.mark.netns

POD = "cart-5f6d7c-aaaaa"
PORT = 80
CONTAINER = {"name": "cart", "image": "cart:1", "ports": [{"name": "grpc", "containerPort": PORT}]}
UNARY = 5


def calls(ip: str) -> None:
    """A few calls of each kind on one channel (one connection), each answered by the pod's server."""
    with grpc.insecure_channel(f"{ip}:{PORT}") as channel:
        get = channel.unary_unary(f"/{SERVICE}/Get")
        assert [get(b"%d" % i, timeout=20) for i in range(UNARY)] == [b"item:%d" % i for i in range(UNARY)]
        assert len(list(channel.unary_stream(f"/{SERVICE}/List")(b"l", timeout=20))) == 5
        assert channel.stream_unary(f"/{SERVICE}/Put")(iter([b"a" * 10] * 4), timeout=20) == b"40"
        chat = channel.stream_stream(f"/{SERVICE}/Chat")(iter([b"x", b"y", b"z"]), timeout=20)
        assert list(chat) == [b"re:x", b"re:y", b"re:z"]


def pod_server(stack: contextlib.ExitStack, netns: str) -> None:
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "tests.netlab.grpcpeer", "server",
                             "--port", str(PORT)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=5)

    stack.callback(stop)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("listening"), (line, proc.stderr.read() if proc.stderr else "")


@pytest.mark.parametrize(("extra", "expected"), [
    ([], {"get_done": UNARY, "get_cancelled": 0, "list": 1, "put": 1, "chat": 1}),
    (["--match-grpc", r"mirror\.Test/List"], {"get_done": 0, "get_cancelled": 0, "list": 1, "put": 0, "chat": 0}),
])
def test_live_grpc_calls_reach_the_local_server(tmp_path: Path, stack: contextlib.ExitStack, extra: list[str],
                                                expected: dict[str, int]) -> None:
    counts = Counts()
    local, port = make_server(0, 0.0, counts)
    stack.callback(lambda: local.stop(grace=1.0).wait(5))
    netns = stack.enter_context(PodNetns())
    pod_server(stack, netns.name)
    with live_lab(tmp_path) as lab:
        lab.fc.add_pod("default", POD, labels={"app": "cart"}, containers=[dict(CONTAINER)], netns=netns.name)
        with live_run([f"pod/{POD}", "--to", f"127.0.0.1:{port}", "--duration", "6s", *lab.kube_args(),
                       "--json", *extra]) as run:
            run.wait_mirroring()
            calls(netns.ip)
            result = run.finish()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    local.stop(grace=2.0).wait(5)
    assert counts.values == expected, (counts.values, result.stdout, result.stderr)
    # With a filter, a line per request comes before the summary (then on one line of its own).
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()] if extra else []
    summary = lines[-1] if extra else result.summary
    assert summary["connections"]["failed"] == summary["connections"]["dropped"] == 0, summary["connections"]
    if extra:
        h2 = summary["h2"]
        assert (h2["connections"], h2["forwarded"], h2["filtered"]) == (1, 1, UNARY + 2), h2
        assert [r["grpc_method"] for r in lines[:-1] if r["forwarded"]] == ["mirror.Test/List"]
