"""The pod watch's HTTP edge against the test API server, for every kind of target (no pods' namespaces needed).

Each target kind resolves to a label selector (or, for pod/NAME, a field selector) that the watch follows: a pod
that joins the selection is seen Ready, one outside it is never seen, a deleted one is seen gone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubectl_mirror.cluster import watch_lines
from kubectl_mirror.errors import MirrorError
from kubectl_mirror.kubeconfig import Connection
from kubectl_mirror.podwatch import Change, PodWatch
from kubectl_mirror.target import select_pods
from kubectl_mirror.watchloop import WatchLoop, selection_query
from tests.apiserver import FakeCluster

WEB = {"app": "web"}
PORTS = [{"name": "http", "port": 80, "targetPort": 80}]


@pytest.fixture
def fc(tmp_path: Path) -> Iterator[FakeCluster]:
    with FakeCluster(tmp_path) as cluster:
        cluster.bookmark_every = 0.2
        yield cluster


class Seen:
    def __init__(self) -> None:
        self.changes: list[tuple[str, str]] = []
        self.fatal: list[MirrorError] = []
        self._cond = threading.Condition()

    def __call__(self, changes: list[Change], state: PodWatch) -> None:
        with self._cond:
            self.changes += [(c.kind.value, c.name) for c in changes]
            self._cond.notify_all()

    def failed(self, err: MirrorError) -> None:
        with self._cond:
            self.fatal.append(err)
            self._cond.notify_all()

    def wait(self, item: tuple[str, str], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while item not in self.changes:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


def setup(fc: FakeCluster, kind: str) -> str:
    fc.add_pod("default", "web-1", labels=WEB)
    fc.add_pod("default", "api-1", labels={"app": "api"})
    if kind == "svc":
        fc.add_service("default", "web", WEB, PORTS)
    elif kind == "deploy":
        fc.add_deployment("default", "web", WEB)
    elif kind == "sts":
        fc.add_statefulset("default", "web", WEB)
    elif kind == "ds":
        fc.add_daemonset("default", "web", WEB)
    elif kind == "rs":
        fc.add_replicaset("default", "web", WEB)
    elif kind == "job":
        fc.add_job("default", "web", WEB)
    return "" if kind == "-l" else f"{kind}/web"


@pytest.mark.parametrize("kind", ["deploy", "sts", "ds", "rs", "job", "svc", "-l"])
def test_every_target_kind_is_followed(fc: FakeCluster, conn: Connection, kind: str) -> None:
    ref = setup(fc, kind)
    sel = select_pods(conn, ref, "app=web" if kind == "-l" else None)
    seen = Seen()
    loop = WatchLoop(conn, "default", selection_query(sel.query, None), seen, seen.failed)
    loop.start()
    try:
        assert seen.wait(("ready", "web-1")), seen.changes
        labels = dict(fc.get_pod("default", "web-1")["metadata"]["labels"])  # a Deployment's carry its hash
        fc.add_pod("default", "api-2", labels={"app": "api"})
        fc.add_pod("default", "web-2", labels=labels, phase="Pending", ready=False)
        fc.set_pod_phase("default", "web-2", "Running", ready=True)
        assert seen.wait(("ready", "web-2")), seen.changes
        fc.delete_pod("default", "web-1")
        assert seen.wait(("gone", "web-1")), seen.changes
    finally:
        loop.stop()
    assert not any(name.startswith("api") for _, name in seen.changes), seen.changes
    assert not seen.fatal


def test_a_named_pod_is_watched_by_name(fc: FakeCluster, conn: Connection) -> None:
    fc.add_pod("default", "web-1", labels=WEB)
    fc.add_pod("default", "web-2", labels=WEB)
    seen = Seen()
    loop = WatchLoop(conn, "default", selection_query(None, "web-1"), seen, seen.failed)
    loop.start()
    try:
        assert seen.wait(("ready", "web-1"))
        fc.delete_pod("default", "web-2")
        fc.delete_pod("default", "web-1", grace=0.2)
        assert seen.wait(("gone", "web-1"))
    finally:
        loop.stop()
    assert seen.changes == [("ready", "web-1"), ("gone", "web-1")]
    assert any("fieldSelector=metadata.name%3Dweb-1" in url and "watch=true" in url for _, url in fc.request_urls)


def test_no_rbac_for_watch_is_said_once_and_the_loop_ends(fc: FakeCluster, conn: Connection) -> None:
    fc.add_pod("default", "web-1", labels=WEB)
    fc.fail_forbidden(verb="watch", resource="pods")
    seen = Seen()
    loop = WatchLoop(conn, "default", selection_query("app=web", None), seen, seen.failed)
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while not seen.fatal and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        loop.stop()
    (err,) = seen.fatal
    assert 'cannot watch pods in namespace "default"' in err.message and 'RBAC "watch"' in err.message


class _Chunks:
    """A response whose body arrives in the given chunks, as urllib3's stream() hands them over."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks

    def stream(self, amt: int, decode_content: bool) -> Iterator[bytes]:
        yield from self.chunks


def test_watch_lines_rejoin_split_events_and_split_joined_ones() -> None:
    resp = _Chunks(b'{"type":"ADD', b'ED"}\n{"type":"MODIFIED"}\n\n{"ty', b'pe":"BOOKMARK"}\n{"type":"DELETED"}')
    assert list(watch_lines(resp)) == [b'{"type":"ADDED"}', b'{"type":"MODIFIED"}', b'{"type":"BOOKMARK"}',
                                       b'{"type":"DELETED"}']
