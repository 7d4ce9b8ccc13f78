"""Glue for the live-mode acceptance tests: pods that really serve, the CLI as a live subprocess, real clients.

A "pod" here is a PodNetns registered with the test API server and running the ground-truth recorder on
port 80 inside its namespace; clients connect from the root namespace to pod.ip, so the tcpdump the plugin
starts through exec sees exactly what a real pod's interface would.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.apiserver import FakeCluster, PodNetns
from tests.cli_run import CliRun, Finished, cli_env
from tests.netlab.lab import CLI, REPO, NsRecorder
from tests.netlab.netns import Netns
from tests.netlab.recorder import ConnRecord
from tests.netlab.traffic import payload

POD_PORT = 80
HTTP_CONTAINER: dict[str, Any] = {"name": "web", "image": "nginx:1.27",
                                  "ports": [{"name": "http", "containerPort": POD_PORT}]}
# Every wait in these tests is bounded by one of these; none of them is asserted as a timing.
START_TIMEOUT = 60.0  # until "mirroring ..." (tap added and running, tcpdump listening)
RUN_TIMEOUT = 60.0  # until the CLI exits after it was told to stop


# ---- pods that really serve ----------------------------------------------------------------------


@dataclass
class ServingPod:
    name: str
    netns: PodNetns
    server: NsRecorder

    @property
    def ip(self) -> str:
        return self.netns.ip


@dataclass
class LiveLab:
    """A FakeCluster with pods whose namespaces run a real server; everything is torn down by the fixture."""

    fc: FakeCluster
    workdir: Path
    pods: dict[str, ServingPod] = field(default_factory=dict)

    def kube_args(self, *extra: str) -> list[str]:
        """The connection flags of a run against this cluster, then `extra`."""
        return ["--kubeconfig", str(self.fc.kubeconfig), *extra]

    def add_serving_pod(self, stack: contextlib.ExitStack, name: str, *, namespace: str = "default",
                        labels: dict[str, str] | None = None, ready: bool = True,
                        container: dict[str, Any] | None = None) -> ServingPod:
        netns = stack.enter_context(PodNetns())
        server = NsRecorder(Netns(netns.name), self.workdir / f"{name}.server.json", POD_PORT).start()
        # Registered before anything can fail, so the recorder is always stopped (and its process reaped).
        stack.callback(_stop_quietly, server)
        self.fc.add_pod(namespace, name, labels=labels or {"app": "web"},
                        containers=[dict(container or HTTP_CONTAINER)], netns=netns.name, ready=ready)
        pod = ServingPod(name, netns, server)
        self.pods[name] = pod
        return pod

    def truth(self, name: str) -> list[ConnRecord]:
        """What the pod's application received: stops that pod's server."""
        return self.pods[name].server.stop()

    def ephemeral(self, name: str, namespace: str = "default") -> list[dict[str, Any]]:
        return list(self.fc.get_pod(namespace, name)["spec"].get("ephemeralContainers") or [])

    def tcpdumps(self) -> list[int]:
        """PIDs of capture processes the API server exec'd and that still run (tcpdump is its own argv word)."""
        return [pid for pid, argv in self.fc.exec_processes() if "tcpdump" in argv]


@contextlib.contextmanager
def live_lab(workdir: Path, **cluster: Any) -> Iterator[LiveLab]:
    """The `lab` fixtures' cluster: a started FakeCluster (keyword arguments go to it) with quick taps.

    Use it after `stack` in a fixture, so the cluster stops before `stack` removes the pods' namespaces: stopping
    it kills whatever a failed run left exec'd in them.
    """
    fc = FakeCluster(workdir, **cluster)
    fc.start()
    fc.tap_start_delay = 0.05
    try:
        yield LiveLab(fc, workdir)
    finally:
        fc.stop()


def _stop_quietly(server: NsRecorder) -> None:
    if server.proc is not None and server.proc.poll() is None:
        with contextlib.suppress(Exception):
            server.stop(timeout=10.0)
    if server.proc is not None and server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait(10)


# ---- the CLI as a live subprocess ------------------------------------------------------------------


@contextlib.contextmanager
def live_run(args: Sequence[str], **kwargs: Any) -> Iterator[CliRun]:
    run = CliRun(args, **kwargs)
    try:
        yield run
    finally:
        run.kill()  # a failing test never leaves the CLI behind


def run_once(args: Sequence[str], timeout: float = RUN_TIMEOUT) -> Finished:
    """The CLI to completion (for the failures, which exit by themselves)."""
    out = subprocess.run([sys.executable, str(CLI), *args], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout, check=False, env=cli_env(), stdin=subprocess.DEVNULL)
    return Finished(out.returncode, out.stdout, out.stderr)


# ---- real clients, from the root namespace -------------------------------------------------------


def raw_connection(host: str, port: int, data: bytes, timeout: float = 20.0) -> None:
    """One connection that sends `data`, half-closes and reads until the server closes: a whole exchange."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass


def raw_conns(host: str, port: int, count: int, tag: str, size: int = 1500, first: int = 0,
              pause: float | None = 0.02) -> list[bytes]:
    """`count` connections with unique, recognisable payloads; returns what was sent.

    By default one after the other with a short pause (what a modest real client load looks like); with
    `pause=None` all at once, as a burst.
    """
    datas = [payload(tag, i, size) for i in range(first, first + count)]
    if pause is not None:
        for data in datas:
            raw_connection(host, port, data)
            time.sleep(pause)
        return datas
    errors: list[str] = []

    def one(data: bytes) -> None:
        try:
            raw_connection(host, port, data)
        except OSError as exc:
            errors.append(f"{data[:16]!r}: {exc!r}")

    threads = [threading.Thread(target=one, args=(d,), daemon=True) for d in datas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30.0)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a client hung"
    return datas


def curl_keepalive(host: str, port: int, paths: Sequence[str], timeout: float = 20.0) -> str:
    """One curl process, several URLs: one keep-alive connection carrying several requests."""
    urls = [f"http://{host}:{port}{p}" for p in paths]
    out = subprocess.run(["curl", "--http1.1", "-sS", "--max-time", str(int(timeout)), *urls], capture_output=True,
                         text=True, timeout=timeout + 5, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


class HalfOpen:
    """A connection that sends its first part now and the rest later (to span a capture gap)."""

    def __init__(self, host: str, port: int, first: bytes, timeout: float = 20.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(first)
        self.sent = bytearray(first)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += data

    def finish(self, rest: bytes) -> None:
        try:
            self.send(rest)
            self.sock.shutdown(socket.SHUT_WR)
            while self.sock.recv(65536):
                pass
        finally:
            self.sock.close()

    def close(self) -> None:
        self.sock.close()


# ---- assertions --------------------------------------------------------------------------------------


def assert_one_line_error(result: Finished, *words: str) -> str:
    """Exit != 0, no traceback, exactly one stderr line, `error: ...` naming every one of `words`."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def pcap_packet_count(source: Path | bytes, timeout: float = 60.0) -> int:
    """Packets tshark reads from a file or from bytes on its stdin; fails on anything it cannot read."""
    if isinstance(source, Path):
        out = subprocess.run(["tshark", "-n", "-r", str(source), "-T", "fields", "-e", "frame.number"],
                             capture_output=True, timeout=timeout, check=False)
    else:
        out = subprocess.run(["tshark", "-n", "-r", "-", "-T", "fields", "-e", "frame.number"], input=source,
                             capture_output=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return sum(1 for line in out.stdout.splitlines() if line.strip())
