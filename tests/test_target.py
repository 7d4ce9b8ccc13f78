"""Target resolution against the test API server: every TYPE, services, selectors, and each failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubectl_mirror.errors import ClusterError, UsageError
from kubectl_mirror.kubeconfig import Connection
from kubectl_mirror.target import PodTarget, resolve
from tests.apiserver import FakeCluster
from tests.kube_fixtures import connection

WEB = [{"name": "app", "image": "nginx:1.27", "ports": [{"name": "http", "containerPort": 8080}]}]


@pytest.fixture
def fc(tmp_path: Path) -> Iterator[FakeCluster]:
    with FakeCluster(tmp_path) as cluster:
        yield cluster


def one(conn: Connection, ref: str, **kw: Any) -> PodTarget:
    args: dict[str, Any] = {"selector": None, "container": None, "port": None, "all_pods": False, **kw}
    targets = resolve(conn, ref, **args)
    assert len(targets) == 1
    return targets[0]


@pytest.mark.parametrize("ref", ["pod/web-1", "po/web-1", "pods/web-1", "web-1"])
def test_pod_forms(fc: FakeCluster, conn: Connection, ref: str) -> None:
    pod = fc.add_pod("default", "web-1", labels={"app": "web"}, containers=WEB, pod_ip="10.1.2.3")
    t = one(conn, ref)
    assert t == PodTarget("default", "web-1", "app", 8080, "http", "10.1.2.3", pod["spec"]["nodeName"])


@pytest.mark.parametrize(("kind", "refs"), [
    ("deployment", ["deployment/web", "deploy/web", "deployments.apps/web"]),
    ("statefulset", ["statefulset/web", "sts/web"]),
    ("daemonset", ["daemonset/web", "ds/web"]),
    ("replicaset", ["replicaset/web", "rs/web"]),
    ("job", ["job/web", "jobs/web"]),
])
def test_workloads_pick_first_ready_pod(fc: FakeCluster, conn: Connection, kind: str, refs: list[str]) -> None:
    getattr(fc, f"add_{kind}")("default", "web", match_labels={"app": "web"})
    fc.add_pod("default", "web-a", labels={"app": "web"}, containers=WEB, ready=False)
    fc.add_pod("default", "web-b", labels={"app": "web"}, containers=WEB)
    fc.add_pod("default", "web-c", labels={"app": "web"}, containers=WEB)
    fc.add_pod("default", "other", labels={"app": "other"}, containers=WEB)
    for ref in refs:
        assert one(conn, ref).pod == "web-b"
    every = resolve(conn, refs[0], selector=None, container=None, port=None, all_pods=True)
    assert [t.pod for t in every] == ["web-b", "web-c"]


def test_selector(fc: FakeCluster, conn: Connection) -> None:
    fc.add_pod("default", "a", labels={"app": "web", "tier": "x"}, containers=WEB)
    fc.add_pod("default", "b", labels={"app": "web", "tier": "y"}, containers=WEB)
    assert one(conn, "", selector="app=web,tier=y").pod == "b"
    with pytest.raises(ClusterError, match=r'no pods match selector app=nope .*namespace "default"'):
        resolve(conn, "", selector="app=nope", container=None, port=None, all_pods=False)


def test_namespace_flag_is_used(fc: FakeCluster) -> None:
    fc.add_pod("team", "web-1", containers=WEB)
    team = connection(fc, "-n", "team")
    assert one(team, "web-1").namespace == "team"
    with pytest.raises(ClusterError, match='pods "web-1" not found in namespace "default"'):
        one(connection(fc), "web-1")


def test_service_target_port(fc: FakeCluster, conn: Connection) -> None:
    containers = [{"name": "app", "image": "x", "ports": [{"name": "http", "containerPort": 8080},
                                                          {"name": "metrics", "containerPort": 9090}]}]
    fc.add_pod("default", "web-1", labels={"app": "web"}, containers=containers)
    web = {"app": "web"}
    fc.add_service("default", "named", selector=web, ports=[{"name": "web", "port": 80, "targetPort": "http"}])
    fc.add_service("default", "numbered", selector={"app": "web"}, ports=[{"port": 80, "targetPort": 9090}])
    fc.add_service("default", "two", selector={"app": "web"},
                   ports=[{"name": "web", "port": 80, "targetPort": "http"},
                          {"name": "m", "port": 90, "targetPort": 9090}])
    t = one(conn, "svc/named")
    assert (t.pod, t.port, t.port_name) == ("web-1", 8080, "http")
    assert (one(conn, "service/numbered").port, one(conn, "service/numbered").port_name) == (9090, "metrics")
    with pytest.raises(UsageError, match=r"service two exposes ports web \(80->http\), m \(90->9090\): pick one"):
        one(conn, "svc/two")
    assert one(conn, "svc/two", port="m").port == 9090  # a service port by name
    assert one(conn, "svc/two", port="80").port == 8080  # ... or by number
    assert one(conn, "svc/two", port="metrics").port == 9090  # else a container port


def test_service_errors(fc: FakeCluster, conn: Connection) -> None:
    fc.add_pod("default", "web-1", labels={"app": "web"}, containers=WEB)
    fc.add_service("default", "bare", selector=None, ports=[{"port": 80}])
    fc.add_service("default", "badname", selector={"app": "web"}, ports=[{"port": 80, "targetPort": "grpc"}])
    with pytest.raises(ClusterError, match="service bare has no selector"):
        one(conn, "svc/bare")
    with pytest.raises(UsageError, match=r'service badname targetPort "grpc" is not a port of pod web-1 '
                                         r"\(it declares http \(8080\)\)"):
        one(conn, "svc/badname")


def test_container_and_port_choice(fc: FakeCluster, conn: Connection) -> None:
    containers = [
        {"name": "sidecar", "image": "envoy", "ports": [{"name": "admin", "containerPort": 15000}]},
        {"name": "app", "image": "x", "ports": [{"name": "http", "containerPort": 80},
                                                {"name": "metrics", "containerPort": 9090}]},
    ]
    fc.add_pod("default", "web-1", containers=containers)
    t = one(conn, "web-1")  # first container, its only port
    assert (t.container, t.port, t.port_name) == ("sidecar", 15000, "admin")
    with pytest.raises(UsageError) as err:
        one(conn, "web-1", container="app")
    assert str(err.value) == "pod web-1 declares ports http (80), metrics (9090): pick one with --port"
    assert one(conn, "web-1", container="app", port="metrics").port == 9090
    assert one(conn, "web-1", container="app", port="http").port_name == "http"
    undeclared = one(conn, "web-1", port="7000")
    assert (undeclared.port, undeclared.port_name) == (7000, None)
    with pytest.raises(UsageError, match='container "nope" not found in pod web-1; it has sidecar, app'):
        one(conn, "web-1", container="nope")
    with pytest.raises(UsageError, match='--port "grpc" is not a port of pod web-1'):
        one(conn, "web-1", port="grpc")


def test_default_container_annotation(fc: FakeCluster, conn: Connection) -> None:
    containers: list[dict[str, Any]] = [{"name": "sidecar", "image": "envoy"},
                  {"name": "app", "image": "x", "ports": [{"name": "http", "containerPort": 80}]}]
    pod = fc.add_pod("default", "web-1", containers=containers)
    pod["metadata"]["annotations"] = {"kubectl.kubernetes.io/default-container": "app"}
    from tests.apiserver.resources import BY_KIND

    fc.store.update(BY_KIND["Pod"], pod)
    assert one(conn, "web-1").container == "app"


def test_unknown_type(conn: Connection) -> None:
    with pytest.raises(UsageError) as err:
        one(conn, "cronjob/x")
    assert str(err.value).startswith('unknown resource type "cronjob": use one of pod (po), deployment (deploy),')
    assert "service (svc)" in str(err.value)


def test_not_found(conn: Connection) -> None:
    with pytest.raises(ClusterError) as err:
        one(conn, "deploy/x")
    assert str(err.value) == 'deployments.apps "x" not found in namespace "default"'
    with pytest.raises(ClusterError, match=r'^pods "y" not found in namespace "default"$'):
        one(conn, "y")


def test_no_ready_pod_says_what_it_found(fc: FakeCluster, conn: Connection) -> None:
    fc.add_deployment("default", "web", match_labels={"app": "web"})
    with pytest.raises(ClusterError, match=r"no pods match deployment web \(selector app=web\)"):
        one(conn, "deploy/web")
    fc.add_pod("default", "web-a", labels={"app": "web"}, containers=WEB, phase="Pending")
    fc.add_pod("default", "web-b", labels={"app": "web"}, containers=WEB, ready=False)
    with pytest.raises(ClusterError) as err:
        one(conn, "deploy/web")
    assert str(err.value) == ('no ready pod for deployment web in namespace "default": found '
                              "web-a (Pending: ContainerCreating), web-b (Running, not ready)")
    fc.add_pod("default", "done", containers=WEB, phase="Succeeded")
    with pytest.raises(ClusterError, match=r"pod done is not running \(Succeeded\)"):
        one(conn, "pod/done")


def test_windows_node(fc: FakeCluster, conn: Connection) -> None:
    fc.add_pod("default", "win", containers=WEB, node_os="windows")
    with pytest.raises(ClusterError, match="pod win runs on Windows node node-windows-1: capturing needs a Linux"):
        one(conn, "win")


def test_forbidden_names_verb_and_resource(fc: FakeCluster, conn: Connection) -> None:
    fc.add_deployment("default", "web", match_labels={"app": "web"})
    fc.fail_forbidden(verb="list", resource="pods")
    with pytest.raises(ClusterError) as err:
        one(conn, "deploy/web")
    assert str(err.value).startswith('forbidden: cannot list pods in namespace "default"; ask your cluster admin '
                                     'for RBAC "list" on "pods"')
    fc.fail_forbidden(verb="get", resource="deployments")
    with pytest.raises(ClusterError, match=r'cannot get deployments\.apps in namespace "default"'):
        one(conn, "deploy/web")
