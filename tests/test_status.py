"""`kubectl mirror status` against the test API server, with a real tcpdump in a namespace "pod"."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubectl_mirror.execstream import start_capture, stop_remote
from kubectl_mirror.kubeconfig import Connection
from kubectl_mirror.status import TapRow, render_rows, tap_rows
from kubectl_mirror.tap import ensure_tap
from kubectl_mirror.target import PodTarget
from tests.apiserver import FakeCluster, PodNetns
from tests.kube_fixtures import connection

pytestmark = pytest.mark.netns
SCRIPT = Path(__file__).resolve().parent.parent / "kubectl-mirror"


@pytest.fixture
def fc(tmp_path: Path) -> Iterator[tuple[FakeCluster, PodNetns]]:
    with PodNetns() as pod, FakeCluster(tmp_path) as cluster:
        cluster.tap_start_delay = 0.05
        cluster.add_pod("default", "web-1", labels={"app": "web"}, netns=pod.name,
                        containers=[{"name": "app", "image": "nginx", "ports": [{"containerPort": 8080}]}])
        cluster.add_pod("default", "db-1", labels={"app": "db"}, netns=pod.name,
                        containers=[{"name": "db", "image": "postgres"}])
        yield cluster, pod


def status(fc: FakeCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), "status", "--kubeconfig", str(fc.kubeconfig), *args],
                          capture_output=True, text=True, timeout=60)


def test_status_shows_taps_and_running_captures(fc: tuple[FakeCluster, PodNetns]) -> None:
    cluster, pod = fc
    empty = status(cluster)
    assert empty.returncode == 0 and empty.stdout == "" and "No taps" in empty.stderr

    conn: Connection = connection(cluster)
    target = PodTarget("default", "web-1", "app", 8080, None, pod.ip, "node-linux-1")
    tap = ensure_tap(conn, target, image="registry.example/tap:1", pull_policy="IfNotPresent", timeout=20)
    proc = start_capture(conn, target, tap)
    try:
        rows = tap_rows(conn, None, None)
        assert rows == [TapRow("default", "web-1", "mirror-tap", "registry.example/tap:1", "running", "", 1, False,
                               "", "any")]
        out = status(cluster)
        assert out.returncode == 0, out.stderr
        header, line = out.stdout.splitlines()
        assert header.split() == ["NAMESPACE", "POD", "TAP", "IMAGE", "STATE", "MESH", "CAPTURING"]
        assert line.split() == ["default", "web-1", "mirror-tap", "registry.example/tap:1", "running", "-", "yes",
                                "on", "any"]
        # Limited to other pods: nothing.
        assert tap_rows(conn, "pod/db-1", None) == []
    finally:
        stop_remote(conn, target, tap, proc)
        proc.close()
    after = json.loads(status(cluster, "pod/web-1", "-o", "json").stdout)
    assert [(r["pod"], r["state"], r["capturing"]) for r in after] == [("web-1", "running", 0)]
    conn.close()


def test_table_columns_line_up() -> None:
    rows = [TapRow("default", "web-1", "mirror-tap", "img:1", "running", "", 1, False),
            TapRow("shop", "api-7f9c", "mirror-tap-2", "img:2", "waiting", "ImagePullBackOff", 0, True)]
    lines = render_rows(rows).splitlines()
    starts = {line.index(col) for line, col in zip(lines, ["IMAGE", "img:1", "img:2"], strict=True)}
    assert len(starts) == 1
    assert "waiting (ImagePullBackOff)" in lines[2] and lines[2].endswith("no")
