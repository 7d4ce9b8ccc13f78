"""The exec stream against the test API server: commands really run in a pod's network namespace."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubectl_mirror.errors import ClusterError, MirrorError, UsageError
from kubectl_mirror.execstream import V4, V5, capture_argv, open_exec, start_capture, stop_remote
from kubectl_mirror.kubeconfig import Connection
from kubectl_mirror.live import KubePodCapture
from kubectl_mirror.tap import Tap, ensure_tap
from kubectl_mirror.target import PodTarget
from tests.apiserver import FakeCluster, PodNetns
from tests.kube_fixtures import connection

pytestmark = pytest.mark.netns


@pytest.fixture
def pod() -> Iterator[PodNetns]:
    with PodNetns() as netns:
        yield netns


@pytest.fixture
def fc(tmp_path: Path, pod: PodNetns) -> Iterator[FakeCluster]:
    with FakeCluster(tmp_path) as cluster:
        cluster.tap_start_delay = 0.05
        cluster.add_pod("default", "web-1", containers=[{"name": "app", "image": "nginx"}], netns=pod.name)
        yield cluster


@pytest.fixture
def target(pod: PodNetns) -> PodTarget:
    return PodTarget("default", "web-1", "app", 8080, None, pod.ip, "node-linux-1")


@pytest.fixture
def tap(conn: Connection, target: PodTarget) -> Tap:
    return ensure_tap(conn, target, image="registry.example/tap:1", pull_policy="IfNotPresent", timeout=20)


def test_capture_argv() -> None:
    assert capture_argv(80, None) == [
        "tcpdump", "--immediate-mode", "-B", "32768", "-p", "-i", "any", "-U", "-s", "0", "-w", "-", "tcp port 80"]
    assert capture_argv(80, "  host 10.0.0.1 or port 9 ")[-1] == "tcp port 80 and (host 10.0.0.1 or port 9)"
    with pytest.raises(UsageError):
        capture_argv(0, None)


def test_binary_stdout_is_exact(conn: Connection, tmp_path: Path) -> None:
    blob = os.urandom(3 << 20) + bytes(range(256)) * 17
    src = tmp_path / "blob"
    src.write_bytes(blob)
    with open_exec(conn, "default", "web-1", "app", ["cat", str(src)]) as proc:
        assert proc.protocol == V5
        got = bytearray()
        got += proc.stdout.read(7)  # read(n) returns exactly n before EOF, like a file
        assert len(got) == 7
        got += proc.stdout.read1(1000)
        buf = bytearray(4096)
        n = proc.stdout.readinto(buf)
        got += buf[:n]
        got += proc.stdout.read()
        assert proc.stdout.read(10) == b""
        assert proc.wait(10) == 0
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(blob).hexdigest()


def test_exit_code_and_stderr(conn: Connection) -> None:
    with open_exec(conn, "default", "web-1", "app", ["sh", "-c", "echo out; echo 'bad thing' >&2; exit 3"]) as proc:
        assert proc.stdout.read() == b"out\n"
        assert proc.wait(10) == 3
        assert proc.stderr_text() == "bad thing\n"
        assert "exit code 3" in (proc.status_message or "")


def test_wait_discards_unread_stdout_and_times_out(conn: Connection) -> None:
    with open_exec(conn, "default", "web-1", "app", ["sh", "-c", "head -c 300000 /dev/zero; exit 0"]) as proc:
        assert proc.wait(10) == 0
    with open_exec(conn, "default", "web-1", "app", ["sleep", "30"]) as proc, \
            pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.2)


def test_runs_in_the_pod_network_namespace(conn: Connection, pod: PodNetns) -> None:
    with open_exec(conn, "default", "web-1", "app", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]) as proc:
        assert pod.ip in proc.stdout.read().decode()
        assert proc.wait(10) == 0


def test_v4_frames(conn: Connection) -> None:
    with open_exec(conn, "default", "web-1", "app", ["sh", "-c", "printf 'a\\0b'; exit 4"],
                   protocols=(V4,)) as proc:
        assert proc.protocol == V4
        assert proc.stdout.read() == b"a\0b"
        assert proc.wait(10) == 4


def test_missing_command_and_container(conn: Connection) -> None:
    with open_exec(conn, "default", "web-1", "app", ["no-such-binary-xyz"]) as proc:
        assert proc.stdout.read() == b""
        assert proc.wait(10) != 0
        assert "executable file not found" in (proc.status_message or "")
    with pytest.raises(ClusterError, match="container nope is not valid for pod web-1"):
        open_exec(conn, "default", "web-1", "nope", ["true"])


def test_exec_forbidden(fc: FakeCluster, conn: Connection) -> None:
    # The WebSocket upgrade is a GET; real servers (>= 1.31) authorize it as "create" on pods/exec, this one as
    # "get": forbid both so the test holds either way.
    fc.fail_forbidden(verb="create", resource="pods", subresource="exec")
    fc.fail_forbidden(verb="get", resource="pods", subresource="exec")
    with pytest.raises(ClusterError) as err:
        open_exec(conn, "default", "web-1", "app", ["true"])
    # The message names the verb the server itself says it denied.
    assert re.match(r'forbidden: cannot (create|get) pods/exec in namespace "default"; ask your cluster admin for '
                    r'RBAC "(create|get)" on "pods/exec"', str(err.value)), str(err.value)


def test_exec_bad_credentials(fc: FakeCluster) -> None:
    # Impersonation on exec is checked in test_flags (the test server does not implement it).
    bad = connection(fc, "--token", "wrong")
    with pytest.raises(ClusterError, match="rejected your credentials"):
        open_exec(bad, "default", "web-1", "app", ["true"])


def _wait_gone(fc: FakeCluster, word: str, timeout: float = 10.0) -> list[tuple[int, list[str]]]:
    deadline = time.monotonic() + timeout
    left = [p for p in fc.exec_processes() if word in p[1]]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in fc.exec_processes() if word in p[1]]
    return left


def test_capture_streams_pcap_and_stop_remote_leaves_nothing(
        fc: FakeCluster, conn: Connection, target: PodTarget, tap: Tap, pod: PodNetns) -> None:
    proc = start_capture(conn, target, tap)
    assert proc.remote_pid is not None
    # Traffic to the captured port inside the pod: a listener there and a client from the host.
    listener = subprocess.Popen(["ip", "netns", "exec", pod.name, "sh", "-c", "exec sleep 30"])
    try:
        with socket.socket() as s:
            s.settimeout(2)
            try:
                s.connect((pod.ip, target.port))  # nothing listens: SYN and RST are still captured
            except OSError:
                pass
        header = proc.stdout.read(24)
        assert header[:4] in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4")  # pcap magic, either byte order
        record = proc.stdout.read(16)
        assert len(record) == 16
    finally:
        listener.kill()
        listener.wait()
    proc.close()
    # Closing the stream is not enough: like a kubelet, the server leaves tcpdump running.
    assert [p for p in fc.exec_processes() if "tcpdump" in p[1]]
    assert stop_remote(conn, target, tap, proc) is True
    assert _wait_gone(fc, "tcpdump") == []


def test_stop_remote_never_hits_another_process(
        fc: FakeCluster, conn: Connection, target: PodTarget, tap: Tap) -> None:
    proc = start_capture(conn, target, tap)
    pid = proc.remote_pid
    assert pid is not None
    assert stop_remote(conn, target, tap, proc) is True
    assert _wait_gone(fc, "tcpdump") == []
    # The PID is gone (or reused by something that is not tcpdump): a second stop signals nothing.
    assert stop_remote(conn, target, tap, proc) is False
    proc.close()


def test_filter_error_is_one_line(conn: Connection, target: PodTarget, tap: Tap, fc: FakeCluster) -> None:
    with pytest.raises(UsageError) as err:
        start_capture(conn, target, tap, user_filter="port and and")
    msg = str(err.value)
    assert msg.startswith("tcpdump rejected the capture filter: ")
    assert "syntax error" in msg and "\n" not in msg
    assert _wait_gone(fc, "tcpdump") == []


def _stand_in_tcpdump(fc: FakeCluster, tmp_path: Path, body: str) -> None:
    """A `tcpdump` first on the pod's PATH, running `body` (bash); `exec -a tcpdump` keeps what stop checks."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "tcpdump"
    script.write_text(f"#!/bin/bash\n{body}\n")
    script.chmod(0o755)
    fc.exec_path_prepend = [str(bindir)]


def test_a_tcpdump_that_never_gets_ready_is_killed(
        fc: FakeCluster, conn: Connection, target: PodTarget, tap: Tap, tmp_path: Path) -> None:
    _stand_in_tcpdump(fc, tmp_path, "exec -a tcpdump sleep 60")
    with pytest.raises(ClusterError, match="did not start capturing within 1s"):
        start_capture(conn, target, tap, ready_timeout=1.0)
    assert _wait_gone(fc, "tcpdump") == []


def test_the_final_stop_during_a_start_leaves_no_tcpdump(
        fc: FakeCluster, conn: Connection, target: PodTarget, tap: Tap, tmp_path: Path) -> None:
    # A reconnect's start can still be waiting for tcpdump when the run ends: the stop finds nothing to stop yet.
    real = shutil.which("tcpdump")
    assert real is not None
    _stand_in_tcpdump(fc, tmp_path, f'sleep 1.5\nexec -a tcpdump {real} "$@"')
    pod = KubePodCapture(conn, target, tap, None)
    outcome: list[object] = []

    def start() -> None:
        try:
            outcome.append(pod.start())
        except MirrorError as exc:
            outcome.append(exc)

    starter = threading.Thread(target=start, daemon=True)
    starter.start()
    deadline = time.monotonic() + 10
    while not [p for p in fc.exec_processes() if "tcpdump" in p[1]] and time.monotonic() < deadline:
        time.sleep(0.02)
    pod.stop()
    starter.join(30)
    assert not starter.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ClusterError), outcome
    assert "after the run had ended" in str(outcome[0])
    assert _wait_gone(fc, "tcpdump") == []
    assert pod.stop_errors == []
