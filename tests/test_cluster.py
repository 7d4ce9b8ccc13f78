"""The Kubernetes boundary (cluster.py): the client's ApiException and transport failures in, typed errors out.

A playbook: each row is one answer of the API server (the exact Status body tests/apiserver sends, built by its
own functions, wrapped in the client's real ApiException) for one call, and the type, fields and one-line message
that must come out. Then the same through the wire: the test API server, a socket that never answers, a closed
port.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from kubectl_mirror.cluster import Call, api_error, call
from kubectl_mirror.errors import (
    ApiError,
    Cause,
    ClusterError,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    Timeout,
    Unreachable,
)
from kubectl_mirror.target import resolve
from tests.apiserver import FakeCluster, podsecurity
from tests.apiserver.status import ApiError as StatusError
from tests.apiserver.status import (
    conflict,
    forbidden,
    gone,
    internal,
    invalid,
    no_such_path,
    not_found,
    rbac_forbidden,
    unauthorized,
)
from tests.kube_fixtures import connection

GET_POD = Call("get", "pods", "default", "web-1")
PATCH_TAP = Call("patch", "pods/ephemeralcontainers", "default", "web-1")
LIST_PODS = Call("list", "pods", "default")
GET_DEPLOY = Call("get", "deployments.apps", "default", "web")
WATCH_PODS = Call("watch", "pods", "default")
GET_NODE = Call("get", "nodes", "", "node-1")

# A Pod Security refusal exactly as tests/apiserver's admission words it for a tap that adds NET_RAW.
TAP_POD = {"spec": {"containers": [{"name": "app"}], "ephemeralContainers": [
    {"name": "mirror-tap", "securityContext": {"capabilities": {"drop": ["ALL"], "add": ["NET_RAW", "KILL"]}}}]}}
PSA_TEXT = podsecurity.check({podsecurity.ENFORCE: "baseline"}, TAP_POD)
# The API server's own message when an existing ephemeral container would change (validation.go), with its diff.
CHANGED = [{"reason": "FieldValueForbidden", "field": "spec.ephemeralContainers",
            "message": 'Forbidden: existing ephemeral containers "mirror-tap" may not be changed\n{"old": 1}'}]


def exception(err: StatusError) -> ApiException:
    """The client's exception for this Status, as its REST layer builds it from the HTTP response."""
    return ApiException(status=err.code, reason=HTTPStatus(err.code).phrase, body=json.dumps(err.status()))


@dataclass
class Row:
    answer: StatusError
    call: Call
    kind: type[ClusterError]
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    as_user: str | None = None


ROWS = {
    "rbac-namespaced": Row(
        rbac_forbidden("alice", "patch", "pods", "ephemeralcontainers", "", "default", "web-1"), PATCH_TAP, Forbidden,
        'forbidden: cannot patch pods/ephemeralcontainers in namespace "default"; ask your cluster admin for RBAC '
        '"patch" on "pods/ephemeralcontainers" (pods "web-1" is forbidden: User "alice" cannot patch resource '
        '"pods/ephemeralcontainers" in API group "" in the namespace "default")',
        {"status": 403, "reason": "Forbidden", "denied_verb": "patch", "denied_resource": "pods/ephemeralcontainers",
         "pod_security": None}),
    "rbac-group-and-impersonated": Row(
        rbac_forbidden("alice", "get", "deployments", "", "apps", "default", "web"), GET_DEPLOY, Forbidden,
        'forbidden (as bob): cannot get deployments.apps in namespace "default"; ask your cluster admin for RBAC '
        '"get" on "deployments.apps" (deployments.apps "web" is forbidden: User "alice" cannot get resource '
        '"deployments" in API group "apps" in the namespace "default")',
        {"denied_verb": "get", "denied_resource": "deployments.apps"}, as_user="bob"),
    "rbac-cluster-scope": Row(
        rbac_forbidden("alice", "get", "nodes", "", "", "", "node-1"), GET_NODE, Forbidden,
        'forbidden: cannot get nodes at the cluster scope; ask your cluster admin for RBAC "get" on "nodes" '
        '(nodes "node-1" is forbidden: User "alice" cannot get resource "nodes" in API group "" at the cluster '
        'scope)', {"denied_verb": "get", "denied_resource": "nodes"}),
    # The server refused --as itself: what is missing is "impersonate", not the call's own verb.
    "impersonation-refused": Row(
        rbac_forbidden("alice", "impersonate", "users", "", "", "", "bob"), GET_POD, Forbidden,
        'forbidden: your user cannot impersonate users "bob" (--as); ask your cluster admin for RBAC "impersonate" '
        'on "users" (users "bob" is forbidden: User "alice" cannot impersonate resource "users" in API group "" at '
        'the cluster scope)', {"verb": "get", "resource": "pods", "denied_verb": "impersonate",
                               "denied_resource": "users"}, as_user="bob"),
    "pod-security": Row(
        forbidden("pods", "web-1", "", PSA_TEXT or ""), PATCH_TAP, Forbidden,
        'Pod Security "baseline:latest" refused to patch pods/ephemeralcontainers web-1 in namespace "default"; '
        f'ask an admin of the namespace to allow it (pods "web-1" is forbidden: {PSA_TEXT})',
        {"pod_security": "baseline", "pod_security_version": "latest", "denied_verb": ""}),
    "not-found": Row(
        not_found("deployments", "web", "apps"), GET_DEPLOY, NotFound,
        'deployments.apps "web" not found in namespace "default"', {"served": True, "status": 404}),
    "path-not-served": Row(
        no_such_path(), PATCH_TAP, NotFound,
        'pods "web-1" not found in namespace "default"', {"served": False}),
    "path-not-served-list": Row(
        no_such_path(), LIST_PODS, NotFound,
        'cannot list pods in namespace "default": the server could not find the requested resource',
        {"served": False}),
    "conflict": Row(
        conflict("pods", "web-1"), PATCH_TAP, Conflict,
        'cannot patch pods/ephemeralcontainers web-1 in namespace "default": Operation cannot be fulfilled on pods '
        '"web-1": the object has been modified; please apply your changes to the latest version and try again',
        {"status": 409, "reason": "Conflict"}),
    "invalid-with-causes": Row(
        invalid("Pod", "web-1", CHANGED), PATCH_TAP, Invalid,
        'cannot patch pods/ephemeralcontainers web-1 in namespace "default": Pod "web-1" is invalid: '
        'spec.ephemeralContainers: Forbidden: existing ephemeral containers "mirror-tap" may not be changed',
        {"status": 422, "reason": "Invalid", "causes": (Cause(
            "FieldValueForbidden", "spec.ephemeralContainers",
            'Forbidden: existing ephemeral containers "mirror-tap" may not be changed\n{"old": 1}'),)}),
    "unauthorized": Row(
        unauthorized(), LIST_PODS, ApiError,
        "the API server rejected your credentials (context fake); log in again or check the user in your kubeconfig",
        {"status": 401, "reason": "Unauthorized"}),
    "expired": Row(
        gone("too old resource version: 5 (9)"), WATCH_PODS, ApiError,
        'cannot watch pods in namespace "default": too old resource version: 5 (9)',
        {"status": 410, "reason": "Expired", "verb": "watch"}),
    "internal": Row(
        internal("etcdserver: request timed out"), LIST_PODS, ApiError,
        'cannot list pods in namespace "default": Internal error occurred: etcdserver: request timed out',
        {"status": 500, "reason": "InternalError", "causes": (Cause("", "", "etcdserver: request timed out"),)}),
}


@pytest.mark.parametrize("name", ROWS)
def test_status_answers_become_typed_errors(name: str) -> None:
    row = ROWS[name]
    err = api_error(exception(row.answer), row.call, context="fake", as_user=row.as_user, server="https://x")
    assert type(err) is row.kind
    assert err.message == row.message
    assert "\n" not in err.message
    for key, value in {"verb": row.call.verb, "resource": row.call.resource, "namespace": row.call.namespace,
                       **row.fields}.items():
        assert getattr(err, key) == value, key


def test_an_answer_that_is_not_a_status_keeps_the_http_reason() -> None:
    # A proxy in front of the API server answering with its own HTML page.
    exc = ApiException(status=502, reason="Bad Gateway", body="<html>bad gateway</html>")
    err = api_error(exc, LIST_PODS, context="fake")
    assert type(err) is ApiError and err.status == 502 and err.reason == "Bad Gateway" and err.causes == ()
    assert err.message == 'cannot list pods in namespace "default": 502 Bad Gateway'


def test_the_clients_own_status_zero_is_a_transport_failure() -> None:
    # The client's REST layer wraps an SSLError it meets first-hand as ApiException(status=0): no server answered.
    exc = ApiException(status=0, reason="SSLError\n[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1000)")
    err = api_error(exc, LIST_PODS, context="fake", server="https://10.0.0.1:6443")
    assert type(err) is Unreachable and err.server == "https://10.0.0.1:6443"
    assert err.message == ("cannot talk to the Kubernetes API server at https://10.0.0.1:6443 (SSLError [SSL: "
                           "WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1000)); check the server address and "
                           "certificates in your kubeconfig")


@pytest.mark.parametrize(("method", "path", "params", "query", "expected"), [
    ("GET", "/api/v1/namespaces/{namespace}/pods/{name}", {"namespace": "ns", "name": "p"}, [],
     Call("get", "pods", "ns", "p")),
    ("GET", "/api/v1/namespaces/{namespace}/pods", {"namespace": "ns"}, [("labelSelector", "a=b")],
     Call("list", "pods", "ns")),
    ("GET", "/api/v1/namespaces/{namespace}/pods", {"namespace": "ns"}, [("watch", "true")],
     Call("watch", "pods", "ns")),
    ("PATCH", "/api/v1/namespaces/{namespace}/pods/{name}/ephemeralcontainers", {"namespace": "ns", "name": "p"},
     [], Call("patch", "pods/ephemeralcontainers", "ns", "p")),
    ("GET", "/apis/apps/v1/namespaces/{namespace}/deployments/{name}", {"namespace": "ns", "name": "web"}, [],
     Call("get", "deployments.apps", "ns", "web")),
    ("GET", "/api/v1/namespaces/{name}", {"name": "shop"}, [], Call("get", "namespaces", "", "shop")),
    ("GET", "/api/v1/nodes/{name}", {"name": "n1"}, [], Call("get", "nodes", "", "n1")),
    ("GET", "/api/v1/namespaces", {}, [], Call("list", "namespaces")),
])
def test_calls_are_named_as_rbac_names_them(method: str, path: str, params: dict[str, str],
                                            query: list[tuple[str, str]], expected: Call) -> None:
    assert Call.of(method, path, params, query) == expected


# ---- through the wire -------------------------------------------------------------------------------------


@pytest.fixture
def fc(tmp_path: Path) -> Iterator[FakeCluster]:
    with FakeCluster(tmp_path) as cluster:
        yield cluster


def test_refused_impersonation_names_impersonate_not_the_call(fc: FakeCluster) -> None:
    # Before the boundary read the server's denial, this said 'cannot get pods ...; ask ... for RBAC "get" on
    # "pods"': the right the user already had.
    fc.add_pod("default", "web-1", containers=[{"name": "app", "image": "x", "ports": [{"containerPort": 80}]}])
    fc.fail_forbidden(verb="impersonate", resource="users")
    conn = connection(fc, "--as", "bob")
    try:
        with pytest.raises(Forbidden) as caught:
            resolve(conn, "web-1", selector=None, container=None, port=None, all_pods=False)
    finally:
        conn.close()
    err = caught.value
    assert (err.verb, err.resource, err.name) == ("get", "pods", "web-1")
    assert (err.denied_verb, err.denied_resource) == ("impersonate", "users")
    assert err.message.startswith('forbidden: your user cannot impersonate users "bob" (--as); ask your cluster '
                                  'admin for RBAC "impersonate" on "users"'), err.message


def test_pod_security_refusal_from_the_server_carries_its_level(fc: FakeCluster) -> None:
    fc.add_namespace("shop", labels={podsecurity.ENFORCE: "restricted", podsecurity.ENFORCE_VERSION: "v1.29"})
    pod = fc.add_pod("shop", "web-1", containers=[{"name": "app", "image": "x"}])
    conn = connection(fc)
    body = {"metadata": {"resourceVersion": pod["metadata"]["resourceVersion"]},
            "spec": {"ephemeralContainers": [{"name": "t", "image": "x", "targetContainerName": "app"}]}}
    try:
        with pytest.raises(Forbidden) as caught:
            call(conn, "PATCH", "/api/v1/namespaces/{namespace}/pods/{name}/ephemeralcontainers",
                 {"namespace": "shop", "name": "web-1"}, body=body,
                 content_type="application/strategic-merge-patch+json")
    finally:
        conn.close()
    assert (caught.value.pod_security, caught.value.pod_security_version) == ("restricted", "v1.29")
    assert caught.value.denied_verb == ""


def test_a_server_that_never_answers_is_a_timeout(fc: FakeCluster) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes the handshake; nobody ever reads or answers
        url = f"https://127.0.0.1:{silent.getsockname()[1]}"
        conn = connection(fc, "--server", url, "--request-timeout", "1s")
        try:
            with pytest.raises(Timeout) as caught:
                call(conn, "GET", "/api/v1/namespaces/{namespace}/pods", {"namespace": "default"})
        finally:
            conn.close()
    assert caught.value.server == url
    assert caught.value.message.startswith(f"cannot reach the Kubernetes API server at {url} (")


def test_a_closed_port_is_unreachable_not_a_timeout(fc: FakeCluster) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connections are refused
    conn = connection(fc, "--server", f"https://127.0.0.1:{port}")
    try:
        with pytest.raises(Unreachable) as caught:
            call(conn, "GET", "/api/v1/namespaces/{namespace}/pods", {"namespace": "default"})
    finally:
        conn.close()
    assert type(caught.value) is Unreachable
    assert "check --server/--context and that the cluster is up" in caught.value.message
