"""The fake API server against real clients: the kubernetes python client, websocket-client and kubectl."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.client import HTTPSConnection
from pathlib import Path
from typing import Any, TypeVar

import pytest
import websocket
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import stream

from tests.apiserver import FakeCluster, PodNetns

T = TypeVar("T")

Obj = dict[str, Any]
KUBECTL = shutil.which("kubectl")
TAP = {
    "name": "mirror-tap",
    "image": "ghcr.io/example/tap:1",
    "command": ["sleep", "infinity"],
    "targetContainerName": "web",
    "securityContext": {"capabilities": {"add": ["NET_RAW"]}},
}
WEB: list[dict[str, Any]] = [{"name": "web", "image": "nginx:1.27", "ports": [{"name": "http", "containerPort": 80}]}]


@pytest.fixture
def fc(tmp_path: Path) -> Iterator[FakeCluster]:
    with FakeCluster(tmp_path, token="t0ken", user="alice") as cluster:
        cluster.tap_start_delay = 0.05
        yield cluster


@pytest.fixture
def netns() -> Iterator[PodNetns]:
    with PodNetns() as pod:
        yield pod


@pytest.fixture
def core(fc: FakeCluster) -> client.CoreV1Api:
    return client.CoreV1Api(config.new_client_from_config(config_file=str(fc.kubeconfig)))


def raw(fc: FakeCluster, method: str, path: str, body: Any = None, token: str = "t0ken",
        headers: dict[str, str] | None = None) -> tuple[int, Obj]:
    ctx = ssl.create_default_context(cafile=str(fc.ca_file))
    host, port = urllib.parse.urlsplit(fc.url).netloc.split(":")
    conn = HTTPSConnection(host, int(port), context=ctx, timeout=10)
    try:
        hdrs = {"Authorization": f"Bearer {token}", "Accept": "application/json", **(headers or {})}
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def api_error(exc: ApiException) -> Obj:
    assert exc.body is not None, "the server sent no Status body"
    return json.loads(exc.body)  # type: ignore[no-any-return]


def given(value: T | None) -> T:
    """The client models type every field Optional; a field the test expects the server to fill must be there."""
    assert value is not None
    return value


def add_ephemeral(core: client.CoreV1Api, ns: str, pod: str, container: Obj) -> Obj:
    body = {"spec": {"ephemeralContainers": [container]}}
    return core.api_client.sanitize_for_serialization(  # type: ignore[no-any-return]
        core.patch_namespaced_pod_ephemeralcontainers(pod, ns, body))


def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def ec_state(fc: FakeCluster, ns: str, pod: str, name: str) -> Obj:
    for s in fc.get_pod(ns, pod)["status"].get("ephemeralContainerStatuses", []):
        if s["name"] == name:
            return s["state"]  # type: ignore[no-any-return]
    return {}


# --- authentication, discovery --------------------------------------------------------------------------------

def test_wrong_token_is_401_status(fc: FakeCluster) -> None:
    code, body = raw(fc, "GET", "/api/v1/namespaces/default/pods", token="nope")
    assert code == 401
    assert body == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
    assert raw(fc, "GET", "/api/v1/namespaces/default/pods")[0] == 200


def test_tls_is_verified_against_the_test_ca(fc: FakeCluster, tmp_path: Path) -> None:
    ctx = ssl.create_default_context()  # system CAs only: the fake server's certificate must not pass
    host, port = urllib.parse.urlsplit(fc.url).netloc.split(":")
    conn = HTTPSConnection(host, int(port), context=ctx, timeout=10)
    with pytest.raises(ssl.SSLCertVerificationError):
        conn.request("GET", "/version")
    conn.close()


def test_discovery_documents(fc: FakeCluster) -> None:
    assert raw(fc, "GET", "/version")[1]["gitVersion"].startswith("v1.")
    _, v1 = raw(fc, "GET", "/api/v1")
    names = {r["name"] for r in v1["resources"]}
    assert {"pods", "pods/exec", "pods/ephemeralcontainers", "services", "namespaces"} <= names
    _, groups = raw(fc, "GET", "/apis")
    assert {g["name"] for g in groups["groups"]} == {"apps", "batch"}
    _, apps = raw(fc, "GET", "/apis/apps/v1")
    assert {r["name"] for r in apps["resources"]} >= {"deployments", "replicasets", "statefulsets", "daemonsets"}
    assert raw(fc, "GET", "/openapi/v2")[0] == 404


# --- objects, selectors, watch --------------------------------------------------------------------------------

def test_list_and_get_pods_with_selectors(fc: FakeCluster, core: client.CoreV1Api) -> None:
    fc.add_pod("default", "web-1", labels={"app": "web", "tier": "front"}, containers=WEB)
    fc.add_pod("default", "web-2", labels={"app": "web"}, containers=WEB, phase="Pending", ready=False)
    fc.add_pod("default", "api-1", labels={"app": "api"})
    fc.add_pod("other", "web-9", labels={"app": "web"})

    def names(**kw: Any) -> list[str]:
        return sorted(given(given(p.metadata).name) for p in core.list_namespaced_pod("default", **kw).items)

    assert names() == ["api-1", "web-1", "web-2"]
    assert names(label_selector="app=web") == ["web-1", "web-2"]
    assert names(label_selector="app in (web, api),tier") == ["web-1"]
    assert names(label_selector="app!=web") == ["api-1"]
    assert names(label_selector="!tier,app notin (api)") == ["web-2"]
    assert names(field_selector="status.phase=Running") == ["api-1", "web-1"]
    assert names(field_selector="metadata.name=web-2") == ["web-2"]
    everywhere = core.list_pod_for_all_namespaces(label_selector="app=web").items
    assert sorted(given(given(p.metadata).name) for p in everywhere) == ["web-1", "web-2", "web-9"]

    pod = core.read_namespaced_pod("web-1", "default")
    meta, spec, status = given(pod.metadata), given(pod.spec), given(pod.status)
    assert meta.uid and meta.resource_version
    assert given(spec.containers[0].ports)[0].container_port == 80 and spec.node_name
    assert status.phase == "Running" and status.pod_ip
    assert [c.status for c in given(status.conditions) if c.type == "Ready"] == ["True"]
    assert given(status.container_statuses)[0].ready is True
    pending = core.read_namespaced_pod("web-2", "default")
    waiting = given(given(given(given(pending.status).container_statuses)[0].state).waiting)
    assert waiting.reason == "ContainerCreating"

    with pytest.raises(ApiException) as err:
        core.read_namespaced_pod("nope", "default")
    assert err.value.status == 404
    assert api_error(err.value) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": 'pods "nope" not found',
        "reason": "NotFound", "details": {"name": "nope", "kind": "pods"}, "code": 404}
    code, body = raw(fc, "GET", "/api/v1/namespaces/default/pods?labelSelector=" + urllib.parse.quote("app in (web"))
    assert code == 400 and body["reason"] == "BadRequest"


def test_list_kind_and_items_like_a_real_server(fc: FakeCluster) -> None:
    fc.add_pod("default", "web-1")
    _, body = raw(fc, "GET", "/api/v1/namespaces/default/pods")
    assert body["kind"] == "PodList" and body["apiVersion"] == "v1" and body["metadata"]["resourceVersion"]
    assert "kind" not in body["items"][0]


def test_workloads_own_their_pods(fc: FakeCluster) -> None:
    fc.add_pod("default", "web-1", labels={"app": "web"})
    fc.add_deployment("default", "web", match_labels={"app": "web"}, replicas=2)
    fc.add_pod("default", "web-2", labels={"app": "web"})
    fc.add_statefulset("default", "db", match_labels={"app": "db"})
    fc.add_pod("default", "db-0", labels={"app": "db"})
    fc.add_job("default", "once", match_labels={"job": "once"})
    apps = client.AppsV1Api(config.new_client_from_config(config_file=str(fc.kubeconfig)))
    batch = client.BatchV1Api(config.new_client_from_config(config_file=str(fc.kubeconfig)))
    deploy = apps.read_namespaced_deployment("web", "default")
    assert deploy.spec.selector.match_labels == {"app": "web"} and deploy.spec.replicas == 2
    (rs,) = apps.list_namespaced_replica_set("default").items
    rs_meta = given(rs.metadata)
    assert given(rs_meta.owner_references)[0].kind == "Deployment"
    assert given(rs_meta.owner_references)[0].uid == given(deploy.metadata).uid
    for name in ("web-1", "web-2"):
        pod = fc.get_pod("default", name)
        (ref,) = pod["metadata"]["ownerReferences"]
        assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
            "ReplicaSet", rs_meta.name, rs_meta.uid, True)
        rs_labels = given(given(given(rs.spec).selector).match_labels)
        assert pod["metadata"]["labels"]["pod-template-hash"] == rs_labels["pod-template-hash"]
    sts = apps.read_namespaced_stateful_set("db", "default")
    assert fc.get_pod("default", "db-0")["metadata"]["ownerReferences"][0]["uid"] == given(sts.metadata).uid
    job = batch.read_namespaced_job("once", "default")
    assert given(given(job.spec).selector).match_labels == {"job": "once"}
    with pytest.raises(ApiException) as err:
        apps.read_namespaced_daemon_set("web", "default")
    assert api_error(err.value)["message"] == 'daemonsets.apps "web" not found'


def test_services_and_namespaces(fc: FakeCluster, core: client.CoreV1Api) -> None:
    fc.add_namespace("shop", labels={"pod-security.kubernetes.io/enforce": "baseline"})
    fc.add_service("shop", "web", selector={"app": "web"},
                   ports=[{"name": "http", "port": 80, "targetPort": "http"}, {"name": "m", "port": 9090}])
    svc = core.read_namespaced_service("web", "shop")
    svc_spec = given(svc.spec)
    assert svc_spec.selector == {"app": "web"}
    assert [(p.name, p.port, p.target_port) for p in given(svc_spec.ports)] == [
        ("http", 80, "http"), ("m", 9090, 9090)]
    ns_labels = given(given(core.read_namespace("shop").metadata).labels)
    assert ns_labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert ns_labels["kubernetes.io/metadata.name"] == "shop"


def test_watch_streams_added_then_modified(fc: FakeCluster, core: client.CoreV1Api) -> None:
    fc.add_pod("default", "web-1", labels={"app": "web"})
    fc.add_pod("default", "api-1", labels={"app": "api"})
    timer = threading.Timer(0.3, lambda: fc.set_pod_phase("default", "web-1", "Failed", ready=False))
    timer.start()
    seen = []
    try:
        w = watch.Watch()
        for event in w.stream(core.list_namespaced_pod, "default", label_selector="app=web", timeout_seconds=10):
            seen.append((event["type"], event["object"].metadata.name, event["object"].status.phase))
            if event["type"] == "MODIFIED":
                w.stop()
    finally:
        timer.cancel()
    assert seen == [("ADDED", "web-1", "Running"), ("MODIFIED", "web-1", "Failed")]


def test_watch_from_resource_version_and_timeout(fc: FakeCluster) -> None:
    fc.add_pod("default", "web-1")
    _, listing = raw(fc, "GET", "/api/v1/namespaces/default/pods")
    rv = listing["metadata"]["resourceVersion"]
    fc.delete_pod("default", "web-1")
    fc.add_pod("default", "web-2")
    ctx = ssl.create_default_context(cafile=str(fc.ca_file))
    host, port = urllib.parse.urlsplit(fc.url).netloc.split(":")
    conn = HTTPSConnection(host, int(port), context=ctx, timeout=10)
    conn.request("GET", f"/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv}&timeoutSeconds=1",
                 headers={"Authorization": "Bearer t0ken"})
    lines = conn.getresponse().read().decode().splitlines()  # ends by itself when timeoutSeconds is up
    conn.close()
    events = [(e["type"], e["object"]["metadata"]["name"]) for e in map(json.loads, lines)]
    assert events == [("DELETED", "web-1"), ("ADDED", "web-2")]


def test_selector_watch_sees_objects_leave_and_enter(fc: FakeCluster, core: client.CoreV1Api) -> None:
    fc.add_pod("default", "web-1", labels={"app": "web"})
    fc.add_pod("default", "web-2", labels={"app": "web"}, phase="Pending", ready=False)

    def move() -> None:
        fc.set_pod_phase("default", "web-1", "Failed", ready=False)
        fc.set_pod_phase("default", "web-2", "Running", ready=True)

    timer = threading.Timer(0.3, move)
    timer.start()
    seen = []
    try:
        w = watch.Watch()
        for event in w.stream(core.list_namespaced_pod, "default", field_selector="status.phase=Running",
                              timeout_seconds=10):
            seen.append((event["type"], event["object"].metadata.name))
            if len(seen) == 3:
                w.stop()
    finally:
        timer.cancel()
    assert seen == [("ADDED", "web-1"), ("DELETED", "web-1"), ("ADDED", "web-2")]
    failed = fc.get_pod("default", "web-1")["status"]["containerStatuses"][0]["state"]
    assert failed["terminated"]["exitCode"] == 137


# --- ephemeral containers -------------------------------------------------------------------------------------

def test_add_ephemeral_container_then_kubelet_runs_it(fc: FakeCluster, core: client.CoreV1Api) -> None:
    fc.add_pod("default", "web-1", labels={"app": "web"}, containers=WEB)
    fc.tap_start_delay = 0.3
    pod = add_ephemeral(core, "default", "web-1", TAP)
    (ec,) = pod["spec"]["ephemeralContainers"]
    assert ec["name"] == "mirror-tap" and ec["securityContext"]["capabilities"]["add"] == ["NET_RAW"]
    assert ec["terminationMessagePolicy"] == "File"  # defaulted by the server
    assert (fc.requests[-1]) == ("PATCH", "/api/v1/namespaces/default/pods/web-1/ephemeralcontainers")
    states = []
    w = watch.Watch()
    for event in w.stream(core.list_namespaced_pod, "default", field_selector="metadata.name=web-1",
                          resource_version=pod["metadata"]["resourceVersion"], timeout_seconds=10):
        for s in event["object"].status.ephemeral_container_statuses or []:
            states.append("running" if s.state.running else s.state.waiting.reason)
        if states and states[-1] == "running":
            w.stop()
    assert states == ["ContainerCreating", "running"]
    tapped = given(core.read_namespaced_pod_ephemeralcontainers("web-1", "default").spec)
    assert given(tapped.ephemeral_containers)[0].name == "mirror-tap"


def test_ephemeral_validation_is_422(fc: FakeCluster, core: client.CoreV1Api) -> None:
    fc.add_pod("default", "web-1", containers=WEB)

    def rejected(container: Obj) -> Obj:
        with pytest.raises(ApiException) as err:
            add_ephemeral(core, "default", "web-1", container)
        assert err.value.status == 422
        return api_error(err.value)

    body = rejected({**TAP, "ports": [{"containerPort": 9}], "readinessProbe": {"exec": {"command": ["true"]}}})
    assert body["reason"] == "Invalid" and body["details"]["kind"] == "Pod"
    assert body["message"] == (
        'Pod "web-1" is invalid: [spec.ephemeralContainers[0].ports: Forbidden: cannot be set for an Ephemeral '
        "Container, spec.ephemeralContainers[0].readinessProbe: Forbidden: cannot be set for an Ephemeral Container]")
    assert rejected({**TAP, "name": "web"})["message"] == (
        'Pod "web-1" is invalid: spec.ephemeralContainers[0].name: Duplicate value: "web"')
    assert rejected({**TAP, "targetContainerName": "nope"})["details"]["causes"] == [
        {"reason": "FieldValueNotFound", "message": 'Not found: "nope"',
         "field": "spec.ephemeralContainers[0].targetContainerName"}]
    assert "ephemeralContainers" not in fc.get_pod("default", "web-1")["spec"]  # nothing stored by a rejection

    add_ephemeral(core, "default", "web-1", TAP)
    changed = rejected({**TAP, "image": "other:2"})
    assert 'existing ephemeral containers "mirror-tap" may not be changed' in changed["message"]
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_pod_ephemeralcontainers(
            "web-1", "default", [{"op": "remove", "path": "/spec/ephemeralContainers/0"}])
    assert err.value.status == 422
    assert 'existing ephemeral containers "mirror-tap" may not be removed' in api_error(err.value)["message"]


def test_json_patch_and_merge_patch_add(fc: FakeCluster, core: client.CoreV1Api) -> None:
    fc.add_pod("default", "web-1", containers=WEB)
    pod = core.patch_namespaced_pod_ephemeralcontainers(
        "web-1", "default", [{"op": "add", "path": "/spec/ephemeralContainers", "value": [TAP]}])
    assert [c.name for c in given(given(pod.spec).ephemeral_containers)] == ["mirror-tap"]
    second = {**TAP, "name": "tap-2"}
    current = fc.get_pod("default", "web-1")["spec"]["ephemeralContainers"]
    code, body = raw(fc, "PATCH", "/api/v1/namespaces/default/pods/web-1/ephemeralcontainers",
                     {"spec": {"ephemeralContainers": [*current, second]}},
                     headers={"Content-Type": "application/merge-patch+json"})
    assert code == 200, body
    assert [c["name"] for c in body["spec"]["ephemeralContainers"]] == ["mirror-tap", "tap-2"]


def test_put_with_stale_resource_version_is_409(fc: FakeCluster, core: client.CoreV1Api) -> None:
    fc.add_pod("default", "web-1", containers=WEB)
    stale = fc.get_pod("default", "web-1")
    add_ephemeral(core, "default", "web-1", TAP)
    stale["spec"]["ephemeralContainers"] = [{**TAP, "name": "late"}]
    code, body = raw(fc, "PUT", "/api/v1/namespaces/default/pods/web-1/ephemeralcontainers", stale)
    assert code == 409 and body["reason"] == "Conflict"
    assert body["message"].startswith('Operation cannot be fulfilled on pods "web-1": the object has been modified')
    # The kubelet's status updates move the resourceVersion too: read it once they are done.
    wait_for(lambda: "running" in ec_state(fc, "default", "web-1", "mirror-tap"), what="tap running")
    fresh = fc.get_pod("default", "web-1")
    fresh["spec"]["ephemeralContainers"].append({**TAP, "name": "late"})
    code, body = raw(fc, "PUT", "/api/v1/namespaces/default/pods/web-1/ephemeralcontainers", fresh)
    assert code == 200 and [c["name"] for c in body["spec"]["ephemeralContainers"]] == ["mirror-tap", "late"]


def test_rbac_forbidden_message(fc: FakeCluster, core: client.CoreV1Api) -> None:
    fc.add_pod("default", "web-1", containers=WEB)
    fc.fail_forbidden(verb="patch", resource="pods", subresource="ephemeralcontainers")
    with pytest.raises(ApiException) as err:
        add_ephemeral(core, "default", "web-1", TAP)
    assert err.value.status == 403
    assert api_error(err.value) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": 'pods "web-1" is forbidden: User "alice" cannot patch resource "pods/ephemeralcontainers" in API '
                   'group "" in the namespace "default"',
        "reason": "Forbidden", "details": {"name": "web-1", "kind": "pods"}, "code": 403}
    assert given(core.read_namespaced_pod("web-1", "default").spec).ephemeral_containers is None


def test_rbac_allow_list(fc: FakeCluster, core: client.CoreV1Api) -> None:
    fc.add_pod("default", "web-1", containers=WEB)
    fc.allow_only([("get", "pods", ""), ("patch", "pods", "ephemeralcontainers")])
    core.read_namespaced_pod("web-1", "default")
    add_ephemeral(core, "default", "web-1", TAP)
    with pytest.raises(ApiException) as err:
        core.list_namespaced_pod("default")
    assert api_error(err.value)["message"] == (
        'pods is forbidden: User "alice" cannot list resource "pods" in API group "" in the namespace "default"')


def test_pod_security_baseline_rejects_net_raw(fc: FakeCluster, core: client.CoreV1Api) -> None:
    fc.add_namespace("shop", labels={"pod-security.kubernetes.io/enforce": "baseline"})
    fc.add_pod("shop", "web-1", containers=WEB)
    with pytest.raises(ApiException) as err:
        add_ephemeral(core, "shop", "web-1", TAP)
    assert err.value.status == 403
    assert api_error(err.value)["message"] == (
        'pods "web-1" is forbidden: violates PodSecurity "baseline:latest": non-default capabilities (container '
        '"mirror-tap" must not include "NET_RAW" in securityContext.capabilities.add)')
    without = {k: v for k, v in TAP.items() if k != "securityContext"}
    add_ephemeral(core, "shop", "web-1", without)


@pytest.mark.parametrize("level,caps,message", [
    ("baseline", ["SETUID", "SETGID", "KILL"], None),
    ("baseline", ["NET_RAW", "SETUID"], 'non-default capabilities (container "mirror-tap" must not include "NET_RAW" '
                                        "in securityContext.capabilities.add)"),
    ("restricted", ["SETUID", "SETGID"], 'unrestricted capabilities (container "mirror-tap" must not include '
                                         '"SETGID", "SETUID" in securityContext.capabilities.add)'),
    ("restricted", ["NET_BIND_SERVICE"], None),
])
def test_pod_security_capabilities_by_level(fc: FakeCluster, core: client.CoreV1Api, level: str, caps: list[str],
                                            message: str | None) -> None:
    fc.add_namespace("ns1", labels={"pod-security.kubernetes.io/enforce": level})
    sc = {"capabilities": {"drop": ["ALL"], "add": caps}, "allowPrivilegeEscalation": False, "runAsNonRoot": True,
          "seccompProfile": {"type": "RuntimeDefault"}}
    compliant_app = {**WEB[0], "securityContext": {**sc, "capabilities": {"drop": ["ALL"]}}}
    fc.add_pod("ns1", "web-1", containers=[compliant_app])  # Pod Security judges the whole pod
    ec = {**TAP, "securityContext": sc}
    if message is None:
        assert add_ephemeral(core, "ns1", "web-1", ec)["spec"]["ephemeralContainers"][0]["name"] == "mirror-tap"
        return
    with pytest.raises(ApiException) as err:
        add_ephemeral(core, "ns1", "web-1", ec)
    assert api_error(err.value)["message"] == (
        f'pods "web-1" is forbidden: violates PodSecurity "{level}:latest": {message}')


def test_pod_security_restricted_lists_every_violation(fc: FakeCluster, core: client.CoreV1Api) -> None:
    fc.add_namespace("locked", labels={"pod-security.kubernetes.io/enforce": "restricted"})
    compliant_app = {**WEB[0], "securityContext": {
        "runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}}}
    fc.add_pod("locked", "web-1", containers=[compliant_app])
    with pytest.raises(ApiException) as err:
        add_ephemeral(core, "locked", "web-1", TAP)
    assert api_error(err.value)["message"] == (
        'pods "web-1" is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false '
        '(container "mirror-tap" must set securityContext.allowPrivilegeEscalation=false), unrestricted capabilities '
        '(container "mirror-tap" must set securityContext.capabilities.drop=["ALL"]; container "mirror-tap" must not '
        'include "NET_RAW" in securityContext.capabilities.add), runAsNonRoot != true (pod or container "mirror-tap" '
        'must set securityContext.runAsNonRoot=true), seccompProfile (pod or container "mirror-tap" must set '
        'securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")')
    ok = {**TAP, "securityContext": compliant_app["securityContext"]}
    add_ephemeral(core, "locked", "web-1", ok)


def test_pod_security_privileged_allows_net_raw(fc: FakeCluster, core: client.CoreV1Api) -> None:
    fc.add_namespace("ops", labels={"pod-security.kubernetes.io/enforce": "privileged"})
    fc.add_pod("ops", "web-1", containers=WEB)
    assert add_ephemeral(core, "ops", "web-1", TAP)["spec"]["ephemeralContainers"][0]["name"] == "mirror-tap"


def test_no_ephemeral_containers_subresource_is_404(fc: FakeCluster, core: client.CoreV1Api) -> None:
    fc.add_pod("default", "web-1", containers=WEB)
    fc.fail_no_ephemeral_containers()
    with pytest.raises(ApiException) as err:
        add_ephemeral(core, "default", "web-1", TAP)
    assert err.value.status == 404
    assert api_error(err.value)["message"] == "the server could not find the requested resource"


def test_image_pull_failure_states(fc: FakeCluster, core: client.CoreV1Api) -> None:
    fc.add_pod("default", "web-1", containers=WEB)
    fc.fail_image_pull(image_prefix="ghcr.io/example/")
    add_ephemeral(core, "default", "web-1", TAP)
    wait_for(lambda: ec_state(fc, "default", "web-1", "mirror-tap").get("waiting", {}).get("reason") == "ErrImagePull",
             what="ErrImagePull")
    wait_for(lambda: ec_state(fc, "default", "web-1", "mirror-tap").get("waiting", {}).get("reason")
             == "ImagePullBackOff", what="ImagePullBackOff")
    add_ephemeral(core, "default", "web-1", {**TAP, "name": "other", "image": "busybox:1.36"})
    wait_for(lambda: "running" in ec_state(fc, "default", "web-1", "other"), what="other running")


# --- exec -----------------------------------------------------------------------------------------------------

class ExecResult:
    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.status: Obj | None = None
        self.protocol = ""


def exec_url(fc: FakeCluster, ns: str, pod: str, argv: list[str], container: str = "", stdin: bool = False) -> str:
    query = [("command", a) for a in argv] + [("stdout", "true"), ("stderr", "true")]
    if container:
        query.append(("container", container))
    if stdin:
        query.append(("stdin", "true"))
    return fc.url.replace("https://", "wss://") + f"/api/v1/namespaces/{ns}/pods/{pod}/exec?" + urllib.parse.urlencode(
        query)


def ws_connect(fc: FakeCluster, url: str, protocols: list[str]) -> websocket.WebSocket:
    return websocket.create_connection(url, header=["Authorization: Bearer t0ken"], subprotocols=protocols,
                                       sslopt={"ca_certs": str(fc.ca_file)}, timeout=30)


def ws_exec(fc: FakeCluster, ns: str, pod: str, argv: list[str], container: str = "",
            protocols: tuple[str, ...] = ("v5.channel.k8s.io", "v4.channel.k8s.io"),
            stdin_data: bytes | None = None) -> ExecResult:
    ws = ws_connect(fc, exec_url(fc, ns, pod, argv, container, stdin=stdin_data is not None), list(protocols))
    result = ExecResult()
    result.protocol = ws.getsubprotocol() or ""
    try:
        if stdin_data is not None:
            ws.send_binary(b"\x00" + stdin_data)
            ws.send_binary(bytes((255, 0)))  # v5: close stdin
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            if not data:
                continue
            if data[0] == 1:
                result.stdout += data[1:]
            elif data[0] == 2:
                result.stderr += data[1:]
            elif data[0] == 3:
                result.status = json.loads(data[1:])
    except websocket.WebSocketConnectionClosedException:
        pass
    finally:
        ws.close()
    return result


@pytest.fixture
def netpod(fc: FakeCluster, netns: PodNetns) -> PodNetns:
    fc.add_pod("default", "web-1", labels={"app": "web"}, containers=WEB, netns=netns.name)
    return netns


@pytest.mark.netns
def test_exec_runs_inside_the_pod_network_namespace(fc: FakeCluster, core: client.CoreV1Api, netpod: PodNetns) -> None:
    assert fc.get_pod("default", "web-1")["status"]["podIP"] == netpod.ip
    out = stream(core.connect_get_namespaced_pod_exec, "web-1", "default", command=["ip", "-o", "-4", "addr"],
                 stderr=True, stdin=False, stdout=True, tty=False)
    assert f"inet {netpod.ip}/30" in out
    assert netpod.host_ip + "/" not in out  # the host side of the veth is not visible from inside
    result = ws_exec(fc, "default", "web-1", ["ip", "-o", "link"])
    assert result.protocol == "v5.channel.k8s.io"
    assert result.status == {"metadata": {}, "status": "Success"}
    assert sorted(line.split(":")[1].strip().split("@")[0] for line in result.stdout.decode().splitlines()) == [
        "eth0", "lo"]


@pytest.mark.netns
def test_exec_streams_binary_exactly(fc: FakeCluster, netpod: PodNetns, tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    with open("/dev/urandom", "rb") as src:
        blob.write_bytes(src.read(10 << 20))
    for protocols in (("v5.channel.k8s.io",), ("v4.channel.k8s.io",)):
        result = ws_exec(fc, "default", "web-1", ["cat", str(blob)], protocols=protocols)
        assert result.protocol == protocols[0]
        assert len(result.stdout) == 10 << 20
        assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(blob.read_bytes()).hexdigest()
        assert result.status == {"metadata": {}, "status": "Success"}


@pytest.mark.netns
def test_exec_base64_protocol(fc: FakeCluster, netpod: PodNetns) -> None:
    ws = ws_connect(fc, exec_url(fc, "default", "web-1", ["printf", "\\001\\377x"]), ["v4.base64.channel.k8s.io"])
    frames = []
    try:
        while True:
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            frames.append((opcode, data))
    except websocket.WebSocketConnectionClosedException:
        pass
    ws.close()
    stdout = [d for op, d in frames if op == websocket.ABNF.OPCODE_TEXT and d[:1] == b"1"]
    assert stdout == [b"1" + base64.b64encode(b"\x01\xffx")]


@pytest.mark.netns
def test_exec_stdin_and_v5_close(fc: FakeCluster, netpod: PodNetns) -> None:
    data = bytes(range(256)) * 1000
    result = ws_exec(fc, "default", "web-1", ["sha256sum"], stdin_data=data)
    assert result.stdout.decode().split()[0] == hashlib.sha256(data).hexdigest()
    assert result.status == {"metadata": {}, "status": "Success"}


@pytest.mark.netns
def test_exec_exit_code_and_stderr(fc: FakeCluster, netpod: PodNetns) -> None:
    result = ws_exec(fc, "default", "web-1", ["sh", "-c", "echo oops >&2; exit 7"])
    assert result.stderr == b"oops\n"
    assert result.status is not None
    assert result.status["status"] == "Failure" and result.status["reason"] == "NonZeroExitCode"
    assert result.status["details"] == {"causes": [{"reason": "ExitCode", "message": "7"}]}
    missing = ws_exec(fc, "default", "web-1", ["no-such-binary-km"])
    assert missing.status is not None and missing.status["reason"] == "InternalError"
    assert 'exec: "no-such-binary-km": executable file not found in $PATH' in missing.status["message"]


@pytest.mark.netns
def test_exec_container_errors(fc: FakeCluster, core: client.CoreV1Api, netpod: PodNetns) -> None:
    with pytest.raises(websocket.WebSocketBadStatusException) as bad:
        ws_exec(fc, "default", "web-1", ["true"], container="nope")
    assert bad.value.status_code == 400
    assert json.loads(given(bad.value.resp_body))["message"] == "container nope is not valid for pod web-1"
    fc.tap_start_delay = 5.0
    add_ephemeral(core, "default", "web-1", TAP)
    with pytest.raises(websocket.WebSocketBadStatusException) as waiting:
        ws_exec(fc, "default", "web-1", ["true"], container="mirror-tap")
    assert waiting.value.status_code == 500
    assert waiting.value.resp_body == b'container not found ("mirror-tap")'
    fc.add_pod("default", "ghost", containers=WEB, netns=None)
    with pytest.raises(websocket.WebSocketBadStatusException) as ghost:
        ws_exec(fc, "default", "ghost", ["true"])
    assert json.loads(given(ghost.value.resp_body))["message"].startswith("error dialing backend")


@pytest.mark.netns
def test_exec_in_running_ephemeral_container(fc: FakeCluster, core: client.CoreV1Api, netpod: PodNetns) -> None:
    add_ephemeral(core, "default", "web-1", TAP)
    wait_for(lambda: "running" in ec_state(fc, "default", "web-1", "mirror-tap"), what="tap running")
    result = ws_exec(fc, "default", "web-1", ["ip", "-o", "-4", "addr", "show", "eth0"], container="mirror-tap")
    assert netpod.ip in result.stdout.decode()


def _proc_status(fc: FakeCluster, container: str) -> dict[str, str]:
    """/proc/self/status and the read-only probe, as a command exec'd in `container` sees them."""
    script = 'cat /proc/self/status; touch /etc/km-probe 2>/dev/null && rm -f /etc/km-probe && echo "Rw:\tyes"'
    out = ws_exec(fc, "default", "web-1", ["sh", "-c", script], container=container).stdout.decode()
    return dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)


def _caps(mask: str) -> set[int]:
    value = int(mask, 16)
    return {bit for bit in range(64) if value >> bit & 1}


@pytest.mark.netns
def test_exec_runs_under_the_containers_security_context(fc: FakeCluster, core: client.CoreV1Api,
                                                         netpod: PodNetns) -> None:
    # What runc does to an exec'd process: capability sets, no_new_privs, user, read-only root.
    net_raw, setgid, setuid, kill, chown = 13, 6, 7, 5, 0
    tight = {**TAP, "name": "tight", "securityContext": {
        "capabilities": {"drop": ["ALL"], "add": ["NET_RAW", "SETUID"]}, "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True, "runAsUser": 0}}
    nobody = {**TAP, "name": "nobody", "securityContext": {"runAsUser": 65534, "runAsGroup": 65534}}
    for ec in (tight, nobody):
        add_ephemeral(core, "default", "web-1", ec)
        wait_for(lambda name=ec["name"]: "running" in ec_state(fc, "default", "web-1", name), what="running")
    st = _proc_status(fc, "tight")
    assert _caps(st["CapEff"]) == _caps(st["CapBnd"]) == {net_raw, setuid}
    assert _caps(st["CapInh"]) == _caps(st["CapAmb"]) == set()
    assert st["NoNewPrivs"].strip() == "1" and "Rw" not in st and st["Uid"].split()[0] == "0"
    # No securityContext: root with the runtime's defaults (containerd's), escalation allowed, root writable.
    st = _proc_status(fc, "")
    assert {net_raw, setgid, setuid, kill, chown} <= _caps(st["CapEff"]) and len(_caps(st["CapEff"])) == 14
    assert st["NoNewPrivs"].strip() == "0" and st["Rw"] == "yes"
    # A non-root user holds no capability after exec (no ambient set), whatever its bounding set.
    st = _proc_status(fc, "nobody")
    assert st["Uid"].split()[:2] == ["65534", "65534"] and st["Gid"].split()[0] == "65534"
    assert _caps(st["CapEff"]) == set() and len(_caps(st["CapBnd"])) == 14
    # A runtime without NET_RAW in its defaults (CRI-O) gives none to a container that does not add it.
    fc.runtime_default_caps = ("CHOWN", "SETUID", "SETGID", "KILL")
    assert _caps(_proc_status(fc, "")["CapEff"]) == {chown, setuid, setgid, kill}


@pytest.mark.netns
def test_disconnect_leaves_the_process_running_unless_told(fc: FakeCluster, netpod: PodNetns) -> None:
    ws = ws_connect(fc, exec_url(fc, "default", "web-1", ["sleep", "37"]), ["v5.channel.k8s.io"])
    wait_for(lambda: [p for p in fc.exec_processes() if p[1] == ["sleep", "37"]], what="sleep started")
    ws.close()
    time.sleep(0.5)  # give the server every chance to (wrongly) clean up; not a timing assertion
    (pid, argv), = fc.exec_processes()
    assert argv == ["sleep", "37"]
    assert Path(f"/proc/{pid}/ns/net").resolve() != Path("/proc/self/ns/net").resolve()  # inside the pod's netns
    Path(f"/proc/{pid}").stat()  # still alive

    fc.exec_kill_on_disconnect = True
    ws = ws_connect(fc, exec_url(fc, "default", "web-1", ["sleep", "38"]), ["v5.channel.k8s.io"])
    wait_for(lambda: [p for p in fc.exec_processes() if p[1] == ["sleep", "38"]], what="second sleep started")
    ws.close()
    wait_for(lambda: not [p for p in fc.exec_processes() if p[1] == ["sleep", "38"]], what="killed on disconnect")
    assert [argv for _, argv in fc.exec_processes()] == [["sleep", "37"]]


@pytest.mark.netns
def test_exec_path_prepend_stands_in_a_binary(fc: FakeCluster, netpod: PodNetns, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "tcpdump"
    fake.write_text("#!/bin/sh\necho \"stand-in $*\"\n")
    fake.chmod(0o755)
    fc.exec_path_prepend = [str(bindir)]
    assert fc.exec_path_prepend == [str(bindir)]
    # Found both by the server's "executable file not found" check and by a shell inside the pod.
    assert ws_exec(fc, "default", "web-1", ["tcpdump", "-i", "any"]).stdout == b"stand-in -i any\n"
    assert ws_exec(fc, "default", "web-1", ["sh", "-c", "exec tcpdump x"]).stdout == b"stand-in x\n"
    fc.exec_path_prepend = []
    assert ws_exec(fc, "default", "web-1", ["sh", "-c", "command -v tcpdump"]).stdout.strip() != str(fake).encode()


@pytest.mark.netns
@pytest.mark.parametrize("upgrade_verb", ["create", "get"])
def test_exec_upgrade_is_authorized_as_the_servers_version_does(fc: FakeCluster, netpod: PodNetns,
                                                                 upgrade_verb: str) -> None:
    # Kubernetes >= 1.31 checks "create" on pods/exec for the WebSocket GET, older servers "get": the README's
    # Role grants both, and each is needed by one generation.
    fc.exec_upgrade_verb = upgrade_verb
    other = "get" if upgrade_verb == "create" else "create"
    fc.allow_only([(other, "pods", "exec")])
    with pytest.raises(websocket.WebSocketBadStatusException) as denied:
        ws_exec(fc, "default", "web-1", ["true"])
    assert denied.value.status_code == 403
    status = json.loads(denied.value.resp_body or b"{}")
    assert status["reason"] == "Forbidden"
    assert f'cannot {upgrade_verb} resource "pods/exec"' in status["message"], status
    fc.allow_only([(upgrade_verb, "pods", "exec")])
    assert ws_exec(fc, "default", "web-1", ["echo", "ok"]).stdout == b"ok\n"


@pytest.mark.netns
def test_exit_kills_what_is_left(tmp_path: Path, netns: PodNetns) -> None:
    with FakeCluster(tmp_path) as cluster:
        cluster.add_pod("default", "web-1", containers=WEB, netns=netns.name)
        ws = ws_connect(cluster, exec_url(cluster, "default", "web-1", ["sleep", "39"]), ["v5.channel.k8s.io"])
        ((pid, _),) = wait_for(cluster.exec_processes, what="sleep started")
        ws.close()
    assert not Path(f"/proc/{pid}").exists() or "sleep" not in Path(f"/proc/{pid}/cmdline").read_text()


@pytest.mark.netns
def test_exec_throughput_websocket_client(fc: FakeCluster, netpod: PodNetns) -> None:
    start = time.monotonic()
    result = ws_exec(fc, "default", "web-1", ["head", "-c", "50M", "/dev/zero"])
    elapsed = time.monotonic() - start
    assert len(result.stdout) == 50 << 20 and result.stdout.count(0) == len(result.stdout)
    print(f"\nwebsocket-client exec: {len(result.stdout) / elapsed / 1e6:.0f} MB/s")


# --- real kubectl ---------------------------------------------------------------------------------------------

def kubectl(fc: FakeCluster, *args: str) -> subprocess.CompletedProcess[bytes]:
    assert KUBECTL is not None
    return subprocess.run([KUBECTL, "--kubeconfig", str(fc.kubeconfig), *args], capture_output=True, timeout=60,
                          check=False)


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")
def test_kubectl_get_pods(fc: FakeCluster) -> None:
    fc.add_pod("default", "web-1", containers=WEB)
    fc.add_pod("default", "web-2", containers=WEB, phase="Pending", ready=False)
    out = kubectl(fc, "get", "pods", "-n", "default")
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.decode().splitlines()]
    assert rows[0][:3] == ["NAME", "READY", "STATUS"]
    assert [r[:3] for r in rows[1:]] == [["web-1", "1/1", "Running"], ["web-2", "0/1", "ContainerCreating"]]
    as_json = json.loads(kubectl(fc, "get", "pod", "web-1", "-o", "json").stdout)
    assert as_json["kind"] == "Pod" and as_json["metadata"]["name"] == "web-1"
    denied = kubectl(fc, "--token", "wrong", "get", "pods")
    assert denied.returncode != 0 and b"Unauthorized" in denied.stderr


@pytest.mark.netns
@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")
def test_kubectl_exec(fc: FakeCluster, netpod: PodNetns) -> None:
    out = kubectl(fc, "exec", "web-1", "--", "echo", "hi")
    assert (out.returncode, out.stdout) == (0, b"hi\n"), out.stderr
    assert ("GET", "/api/v1/namespaces/default/pods/web-1/exec") in fc.requests
    data = bytes(range(256)) * 4096
    piped = subprocess.run([str(KUBECTL), "--kubeconfig", str(fc.kubeconfig), "exec", "-i", "web-1", "--", "sha256sum"],
                           input=data, capture_output=True, timeout=60, check=False)
    assert piped.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest(), piped.stderr  # stdin, then v5 close
    failed = kubectl(fc, "exec", "web-1", "--", "sh", "-c", "exit 3")
    assert failed.returncode == 3 and b"command terminated with exit code 3" in failed.stderr
    start = time.monotonic()
    big = kubectl(fc, "exec", "web-1", "--", "head", "-c", "50M", "/dev/zero")
    elapsed = time.monotonic() - start
    assert big.returncode == 0 and len(big.stdout) == 50 << 20
    print(f"\nkubectl exec: {len(big.stdout) / elapsed / 1e6:.0f} MB/s")


@pytest.mark.netns
def test_deleting_the_pod_ends_its_exec_sessions(fc: FakeCluster, netpod: PodNetns) -> None:
    ws = ws_connect(fc, exec_url(fc, "default", "web-1", ["sleep", "41"]), ["v5.channel.k8s.io"])
    try:
        wait_for(fc.exec_processes, what="sleep started")
        fc.delete_pod("default", "web-1")
        status = None
        deadline = time.monotonic() + 20
        while status is None and time.monotonic() < deadline:
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                break
            if data[:1] == b"\x03":
                status = json.loads(data[1:])
    finally:
        ws.close()
    assert status is not None and status["details"]["causes"] == [{"reason": "ExitCode", "message": "137"}]
    wait_for(lambda: fc.exec_processes() == [], what="process reaped")


@pytest.mark.netns
@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump not installed")
def test_tcpdump_through_exec_streams_pcap_and_outlives_the_client(fc: FakeCluster, netpod: PodNetns) -> None:
    argv = ["tcpdump", "-p", "-i", "any", "-U", "-s", "0", "-w", "-", "tcp port 9"]
    ws = ws_connect(fc, exec_url(fc, "default", "web-1", argv), ["v5.channel.k8s.io"])
    stdout = bytearray()
    try:
        wait_for(lambda: [p for p in fc.exec_processes() if p[1] == argv], what="tcpdump started")
        deadline = time.monotonic() + 20
        while len(stdout) < 24 + 3 * 16 and time.monotonic() < deadline:  # pcap header + three packet headers
            with contextlib.suppress(OSError):  # refused: the SYN and the RST are the packets captured
                socket.create_connection((netpod.ip, 9), timeout=1).close()
            ws.settimeout(1)
            try:
                _opcode, data = ws.recv_data()
            except websocket.WebSocketTimeoutException:
                continue
            if data[:1] == b"\x01":
                stdout += data[1:]
    finally:
        ws.close()
    assert bytes(stdout[:4]) in (bytes.fromhex("d4c3b2a1"), bytes.fromhex("a1b2c3d4"))  # a pcap stream
    assert len(stdout) >= 24 + 3 * 16
    # As on a real cluster, killing the client does not stop the capture: the plugin must clean up itself.
    time.sleep(0.3)
    assert [argv for _, argv in fc.exec_processes()] == [argv]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")
def test_kubectl_debug_patches_ephemeral_containers(fc: FakeCluster) -> None:
    fc.add_pod("default", "web-1", containers=WEB)
    ok = kubectl(fc, "debug", "web-1", "--image=busybox:1.36", "--target=web", "--profile=general", "-c", "dbg",
                 "--", "sleep", "100")
    assert ok.returncode == 0, ok.stderr
    (ec,) = fc.get_pod("default", "web-1")["spec"]["ephemeralContainers"]
    assert (ec["name"], ec["targetContainerName"], ec["command"]) == ("dbg", "web", ["sleep", "100"])
    fc.add_namespace("shop", labels={"pod-security.kubernetes.io/enforce": "baseline"})
    fc.add_pod("shop", "web-1", containers=WEB)
    denied = kubectl(fc, "debug", "-n", "shop", "web-1", "--image=busybox:1.36", "--profile=netadmin", "-c", "dbg")
    assert denied.returncode != 0
    assert (b'violates PodSecurity "baseline:latest": non-default capabilities (container "dbg" must not include '
            b'"NET_ADMIN", "NET_RAW" in securityContext.capabilities.add)') in denied.stderr


# --- restart --------------------------------------------------------------------------------------------------

def refused(fc: FakeCluster) -> bool:
    try:
        socket.create_connection(("127.0.0.1", fc.port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


class Informer:
    """The python client's watch the way an informer uses it: on any end of the stream, resume from the last
    resourceVersion seen. Stops after an event for the pod named `last`."""

    def __init__(self, core: client.CoreV1Api, rv: str, last: str) -> None:
        self.core, self.rv, self.last = core, rv, last
        self.events: list[tuple[str, str]] = []
        self.ends: list[str] = []  # why each stream ended before the last event: the restart must cause one
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                w = watch.Watch()
                for event in w.stream(self.core.list_namespaced_pod, "default", resource_version=self.rv,
                                      timeout_seconds=60):
                    meta = event["object"].metadata
                    self.rv = meta.resource_version
                    self.events.append((event["type"], meta.name))
                    if meta.name == self.last:
                        return
                self.ends.append("stream ended")
            except Exception as exc:  # a cut stream or a refused connection, in whichever of the client's forms
                self.ends.append(type(exc).__name__)
                time.sleep(0.1)


@pytest.mark.netns
def test_restart_keeps_port_store_and_exec_processes(fc: FakeCluster, core: client.CoreV1Api, netpod: PodNetns,
                                                     tmp_path: Path) -> None:
    add_ephemeral(core, "default", "web-1", TAP)
    wait_for(lambda: "running" in ec_state(fc, "default", "web-1", "mirror-tap"), what="tap running")
    url, port, pod_before = fc.url, fc.port, fc.get_pod("default", "web-1")
    # Writes far more than a pipe and the server's read buffer hold, but only once told to (after the restart):
    # it gets to the end only if its output is drained while no client is attached.
    go, done = tmp_path / "go", tmp_path / "done"
    argv = ["sh", "-c", f"while [ ! -e {go} ]; do sleep 0.05; done; head -c 67108864 /dev/zero; touch {done}; "
            "exec sleep 60"]
    ws = ws_connect(fc, exec_url(fc, "default", "web-1", argv), ["v5.channel.k8s.io"])
    ((pid, _),) = wait_for(lambda: [p for p in fc.exec_processes() if p[1] == argv], what="writer started")
    _, listing = raw(fc, "GET", "/api/v1/namespaces/default/pods")
    informer = Informer(core, listing["metadata"]["resourceVersion"], last="after")
    fc.add_pod("default", "before")
    wait_for(lambda: ("ADDED", "before") in informer.events, what="watch established")

    restarting = threading.Thread(target=fc.restart, args=(1.0,))
    restarting.start()
    wait_for(lambda: refused(fc), what="the server down")
    fc.add_pod("default", "during")  # the store lives on while nobody serves it
    restarting.join(30)
    assert not restarting.is_alive()
    fc.add_pod("default", "after")

    # The old exec stream was cut, not closed politely (no close frame, no exit status).
    ws.settimeout(10)
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, ssl.SSLError)):
        while True:
            opcode, _ = ws.recv_data()
            assert opcode != websocket.ABNF.OPCODE_CLOSE, "the restart closed the exec stream politely"
    ws.close()
    assert (fc.url, fc.port) == (url, port)
    informer.thread.join(30)
    assert informer.events == [("ADDED", "before"), ("ADDED", "during"), ("ADDED", "after")]
    assert informer.ends, "the watch survived the restart: its connection was not cut"
    # Same objects, uids and resourceVersions, ephemeral containers included, read with the same token and CA.
    code, pod_after = raw(fc, "GET", "/api/v1/namespaces/default/pods/web-1")
    assert code == 200
    assert (pod_after["metadata"], pod_after["spec"], pod_after["status"]) == (
        pod_before["metadata"], pod_before["spec"], pod_before["status"])
    after_spec = given(core.read_namespaced_pod("web-1", "default").spec)
    assert given(after_spec.ephemeral_containers)[0].name == "mirror-tap"
    # The process started before the restart is still there and, told to write, gets to the end.
    assert pid in [p for p, _ in fc.exec_processes()]
    go.touch()
    wait_for(done.exists, timeout=60, what="the writer got its output out")
    assert pid in [p for p, _ in fc.exec_processes()]
    assert ws_exec(fc, "default", "web-1", ["echo", "again"]).stdout == b"again\n"
