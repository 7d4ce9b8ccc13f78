"""The test API server's watch protocol and workload changes, against the python client and raw HTTP.

What a real kube-apiserver does and these tests pin: 410 Expired after compaction arrives as an ERROR event in a
200 stream (the python client turns it into ApiException 410), bookmarks only when asked for, a graceful pod
deletion is a MODIFIED (deletionTimestamp, not Ready) then a DELETED, and a rollout's pods belong to a new
ReplicaSet of the same deployment.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.client import HTTPSConnection
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.apiserver import FakeCluster
from tests.apiserver.resources import BY_KIND

Obj = dict[str, Any]


@pytest.fixture
def fc(tmp_path: Path) -> Iterator[FakeCluster]:
    with FakeCluster(tmp_path) as cluster:
        yield cluster


def stream_lines(fc: FakeCluster, query: str, *, until: int | None = None, timeout: float = 10.0) -> list[Obj]:
    """A raw watch request; its events, read until the server ends the stream (or `until` events came)."""
    ctx = ssl.create_default_context(cafile=str(fc.ca_file))
    host, port = urllib.parse.urlsplit(fc.url).netloc.split(":")
    conn = HTTPSConnection(host, int(port), context=ctx, timeout=timeout)
    try:
        conn.request("GET", f"/api/v1/namespaces/default/pods?watch=true&{query}",
                     headers={"Authorization": "Bearer t0ken"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Transfer-Encoding") == "chunked"
        events: list[Obj] = []
        while until is None or len(events) < until:
            line = resp.readline()
            if not line:
                break
            events.append(json.loads(line))
        return events
    finally:
        conn.close()


def list_rv(fc: FakeCluster) -> str:
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(fc.kubeconfig)))
    meta = core.list_namespaced_pod("default").metadata
    assert meta is not None
    return str(meta.resource_version)


def test_compacted_resource_version_is_an_expired_error_event(fc: FakeCluster) -> None:
    fc.add_pod("default", "web-1")
    rv = list_rv(fc)
    fc.add_pod("default", "web-2")
    fc.compact()
    events = stream_lines(fc, f"resourceVersion={rv}&timeoutSeconds=5")
    assert [e["type"] for e in events] == ["ERROR"]  # and then the stream ends, long before its timeout
    status = events[0]["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    # The python client, as a real client, raises it as a 410.
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(fc.kubeconfig)))
    with pytest.raises(ApiException) as err:
        for _ in watch.Watch().stream(core.list_namespaced_pod, "default", resource_version=rv, timeout_seconds=5):
            pass
    assert err.value.status == 410
    # From the current resourceVersion the watch works again.
    assert stream_lines(fc, f"resourceVersion={list_rv(fc)}&timeoutSeconds=1") == []


def test_open_watch_expired_mid_stream(fc: FakeCluster) -> None:
    fc.add_pod("default", "web-1")
    events: list[Obj] = []
    reader = threading.Thread(target=lambda: events.extend(stream_lines(fc, "timeoutSeconds=10")))
    reader.start()
    deadline = time.monotonic() + 5
    while not events and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fc.expire_watches() == 1
    reader.join(5)
    assert not reader.is_alive()
    assert [e["type"] for e in events] == ["ADDED", "ERROR"]
    assert events[1]["object"]["code"] == 410


def test_bookmarks_only_when_asked(fc: FakeCluster) -> None:
    fc.bookmark_every = 0.2
    fc.add_pod("default", "web-1", labels={"app": "web"})
    rv = list_rv(fc)
    fc.add_pod("default", "api-1", labels={"app": "api"})  # moves the resourceVersion past what the selection saw
    with_marks = stream_lines(fc, f"resourceVersion={rv}&labelSelector=app%3Dweb&allowWatchBookmarks=true"
                                  "&timeoutSeconds=1")
    marks = [e for e in with_marks if e["type"] == "BOOKMARK"]
    assert marks and len(marks) == len(with_marks)
    assert marks[0]["object"]["kind"] == "Pod" and set(marks[0]["object"]["metadata"]) == {"resourceVersion"}
    assert int(marks[-1]["object"]["metadata"]["resourceVersion"]) > int(rv)
    assert stream_lines(fc, f"resourceVersion={rv}&labelSelector=app%3Dweb&timeoutSeconds=1") == []


def test_graceful_delete_is_terminating_then_deleted(fc: FakeCluster) -> None:
    fc.add_pod("default", "web-1")
    rv = list_rv(fc)
    fc.delete_pod("default", "web-1", grace=0.5)
    terminating = fc.get_pod("default", "web-1")
    assert terminating["metadata"]["deletionTimestamp"]
    assert {c["type"]: c["status"] for c in terminating["status"]["conditions"]}["Ready"] == "False"
    events = stream_lines(fc, f"resourceVersion={rv}&timeoutSeconds=5", until=2)
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
    assert events[0]["object"]["metadata"]["deletionGracePeriodSeconds"] == 1


def test_rollout_pods_belong_to_a_new_replicaset(fc: FakeCluster) -> None:
    fc.add_pod("default", "web-old", labels={"app": "web"})
    fc.add_deployment("default", "web", {"app": "web"})
    old = fc.get_pod("default", "web-old")
    labels = fc.new_revision("default", "web")
    new = fc.add_pod("default", "web-new", labels=labels, phase="Running", ready=False)
    old_rs, new_rs = (p["metadata"]["ownerReferences"][0]["name"] for p in (old, new))
    assert old_rs != new_rs and new_rs == f"web-{labels['pod-template-hash']}"
    assert old["metadata"]["labels"]["pod-template-hash"] != labels["pod-template-hash"]
    fc.scale("Deployment", "default", "web", 0)
    assert fc.store.get(BY_KIND["Deployment"], "default", "web")["spec"]["replicas"] == 0
