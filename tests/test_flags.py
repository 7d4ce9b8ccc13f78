"""Connection flags and kubeconfig handling, checked the way kubectl behaves."""

from __future__ import annotations

import argparse
import http.server
import json
import socket
import threading
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trustme
import yaml

from kubectl_mirror.errors import ClusterError, UsageError
from kubectl_mirror.execstream import open_exec
from kubectl_mirror.flags import add_connection_flags, parse_request_timeout
from kubectl_mirror.kubeconfig import connect
from kubectl_mirror.target import resolve
from tests.apiserver import FakeCluster


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_connection_flags(parser)
    return parser.parse_args(list(argv))


def kubeconfig(path: Path, *, current: str | None, contexts: dict[str, dict[str, Any]],
               clusters: dict[str, str], users: dict[str, dict[str, Any]] | None = None) -> Path:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "contexts": [{"name": n, "context": c} for n, c in contexts.items()],
        "clusters": [{"name": n, "cluster": {"server": s}} for n, s in clusters.items()],
        "users": [{"name": n, "user": u} for n, u in (users or {}).items()],
    }
    if current:
        doc["current-context"] = current
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def two_files(tmp_path: Path) -> dict[str, str]:
    a = kubeconfig(tmp_path / "a.yaml", current="alpha",
                   contexts={"alpha": {"cluster": "c1", "user": "u1", "namespace": "team-a"},
                             "shared": {"cluster": "c1", "user": "u1", "namespace": "from-a"}},
                   clusters={"c1": "https://one.example:6443"}, users={"u1": {"token": "tok-a"}})
    b = kubeconfig(tmp_path / "b.yaml", current="beta",
                   contexts={"beta": {"cluster": "c2", "user": "u2"},
                             "shared": {"cluster": "c2", "user": "u2", "namespace": "from-b"}},
                   clusters={"c1": "https://overridden.example", "c2": "https://two.example:6443"},
                   users={"u2": {"token": "tok-b"}})
    return {"KUBECONFIG": f"{a}:{tmp_path / 'missing.yaml'}:{b}", "HOME": str(tmp_path)}


@pytest.mark.parametrize(("text", "seconds"), [("0", None), ("5", 5.0), ("5s", 5.0), ("1m", 60.0),
                                                ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0)])
def test_request_timeout_forms(text: str, seconds: float | None) -> None:
    assert parse_request_timeout(text) == seconds
    assert parse("--request-timeout", text).request_timeout == seconds


@pytest.mark.parametrize("text", ["", "5x", "s", "-1s", "1m junk"])
def test_request_timeout_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_request_timeout(text)


def test_kubeconfig_list_first_file_wins(two_files: dict[str, str]) -> None:
    conn = connect(parse(), environ=two_files)
    # current-context comes from the first file that sets it (the python client's loader takes the last).
    assert conn.context == "alpha"
    assert conn.namespace == "team-a"
    assert conn.api_client.configuration.host == "https://one.example:6443"
    assert conn.auth_headers() == [("Authorization", "Bearer tok-a")]
    # A context only the second file has is still reachable, with the second file's cluster and user.
    beta = connect(parse("--context", "beta"), environ=two_files)
    assert beta.api_client.configuration.host == "https://two.example:6443"
    assert beta.auth_headers() == [("Authorization", "Bearer tok-b")]
    assert beta.namespace == "default"
    # Same-named entries: the first file's definition wins, for contexts and clusters alike.
    shared = connect(parse("--context", "shared"), environ=two_files)
    assert shared.namespace == "from-a"
    assert shared.api_client.configuration.host == "https://one.example:6443"


def test_namespace_flag_beats_context(two_files: dict[str, str]) -> None:
    assert connect(parse("-n", "ops"), environ=two_files).namespace == "ops"
    assert connect(parse("--namespace", "ops", "--context", "beta"), environ=two_files).namespace == "ops"


def test_kubeconfig_flag_beats_env(two_files: dict[str, str], tmp_path: Path) -> None:
    only = kubeconfig(tmp_path / "only.yaml", current="solo", contexts={"solo": {"cluster": "x", "user": "y"}},
                      clusters={"x": "https://solo.example"}, users={"y": {}})
    conn = connect(parse("--kubeconfig", str(only)), environ=two_files)
    assert (conn.context, conn.api_client.configuration.host) == ("solo", "https://solo.example")


def test_overrides(two_files: dict[str, str], tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until a request")
    conn = connect(parse("--server", "https://other:1", "--token", "cli-token", "--user", "u2",
                         "--certificate-authority", str(ca), "--tls-server-name", "api.internal"), environ=two_files)
    cfg = conn.api_client.configuration
    assert cfg.host == "https://other:1"
    assert cfg.ssl_ca_cert == str(ca)
    assert cfg.tls_server_name == "api.internal"
    assert conn.auth_headers() == [("Authorization", "Bearer cli-token")]
    insecure = connect(parse("--insecure-skip-tls-verify"), environ=two_files)
    assert insecure.api_client.configuration.verify_ssl is False


def test_relative_paths_resolve_against_their_file(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    (sub / "ca.crt").write_text("x")
    doc = {"current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
           "clusters": [{"name": "k", "cluster": {"server": "https://k:6443", "certificate-authority": "ca.crt"}}],
           "users": [{"name": "u", "user": {"token": "t"}}]}
    (sub / "config").write_text(yaml.safe_dump(doc))
    conn = connect(parse(), environ={"KUBECONFIG": str(sub / "config"), "HOME": str(tmp_path)})
    assert conn.api_client.configuration.ssl_ca_cert == str((sub / "ca.crt").resolve())


def test_exec_plugin_token(tmp_path: Path) -> None:
    plugin = tmp_path / "bin" / "cred"
    plugin.parent.mkdir()
    plugin.write_text('#!/bin/sh\necho \'{"apiVersion":"client.authentication.k8s.io/v1beta1",'
                      '"kind":"ExecCredential","status":{"token":"from-plugin"}}\'\n')
    plugin.chmod(0o755)
    doc = {"current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
           "clusters": [{"name": "k", "cluster": {"server": "https://k:6443"}}],
           "users": [{"name": "u", "user": {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1",
                                                       "command": "./bin/cred", "interactiveMode": "Never"}}}]}
    (tmp_path / "config").write_text(yaml.safe_dump(doc))
    conn = connect(parse(), environ={"KUBECONFIG": str(tmp_path / "config"), "HOME": str(tmp_path)})
    assert conn.auth_headers() == [("Authorization", "Bearer from-plugin")]


def test_impersonation_headers(two_files: dict[str, str]) -> None:
    conn = connect(parse("--as", "bob", "--as-group", "dev", "--as-group", "ops", "--as-uid", "42"),
                   environ=two_files)
    assert conn.impersonation == [("Impersonate-User", "bob"), ("Impersonate-Group", "dev"),
                                  ("Impersonate-Group", "ops"), ("Impersonate-Uid", "42")]
    assert ("Impersonate-Group", "ops") in conn.auth_headers()
    with pytest.raises(UsageError, match="need --as"):
        connect(parse("--as-group", "dev"), environ=two_files)


def test_unknown_context(two_files: dict[str, str]) -> None:
    with pytest.raises(UsageError) as err:
        connect(parse("--context", "nope"), environ=two_files)
    assert str(err.value) == 'context "nope" not found in kubeconfig; see kubectl config get-contexts'


def test_no_kubeconfig(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no kubeconfig found"):
        connect(parse(), environ={"HOME": str(tmp_path)})
    with pytest.raises(UsageError, match="not found: check --kubeconfig"):
        connect(parse("--kubeconfig", str(tmp_path / "nope")), environ={"HOME": str(tmp_path)})


def test_default_location(tmp_path: Path) -> None:
    (tmp_path / ".kube").mkdir()
    kubeconfig(tmp_path / ".kube" / "config", current="home", contexts={"home": {"cluster": "h", "user": "u"}},
               clusters={"h": "https://home.example"}, users={"u": {}})
    assert connect(parse(), environ={"HOME": str(tmp_path)}).context == "home"


# ---- against servers: what actually goes over the wire ------------------------------------------------------

class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with a 403 Status and keeps its headers."""

    seen: ClassVar[list[tuple[str, Message]]] = []

    def do_GET(self) -> None:
        type(self).seen.append((self.path, self.headers))
        body = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                           "code": 403, "message": "recorded"}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[tuple[str, Message]]]]:
    seen: list[tuple[str, Message]] = []
    handler = type("Handler", (_Recorder,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_impersonation_reaches_the_server_on_rest_and_exec(
        recorder: tuple[str, list[tuple[str, Message]]], tmp_path: Path) -> None:
    url, seen = recorder
    conn = connect(parse("--server", url, "--token", "tk", "--as", "bob", "--as-group", "dev", "--as-group", "ops",
                         "--as-uid", "42"), environ={"HOME": str(tmp_path)})
    with pytest.raises(ClusterError, match=r"forbidden \(as bob\): cannot get pods"):
        resolve(conn, "web-1", selector=None, container=None, port=None, all_pods=False)
    with pytest.raises(ClusterError, match=r"forbidden \(as bob\): cannot create pods/exec"):
        open_exec(conn, "default", "web-1", "app", ["true"])
    assert [path.split("?")[0] for path, _ in seen] == ["/api/v1/namespaces/default/pods/web-1",
                                                        "/api/v1/namespaces/default/pods/web-1/exec"]
    for _, headers in seen:
        assert headers.get_all("Impersonate-User") == ["bob"]
        assert headers.get_all("Impersonate-Group") == ["dev", "ops"]  # one header per group, as kubectl sends
        assert headers.get_all("Impersonate-Uid") == ["42"]
        assert headers.get("Authorization") == "Bearer tk"


def fake_conn(fc: FakeCluster, *extra: str, environ: dict[str, str] | None = None) -> Any:
    return connect(parse("--kubeconfig", str(fc.kubeconfig), *extra), environ=environ or {})


def test_real_server_with_merged_kubeconfigs(tmp_path: Path) -> None:
    with FakeCluster(fcdir(tmp_path)) as fc:
        fc.add_pod("team", "web-1", containers=[{"name": "app", "image": "x", "ports": [{"containerPort": 80}]}])
        extra = kubeconfig(tmp_path / "extra.yaml", current="elsewhere",
                           contexts={"elsewhere": {"cluster": "x", "user": "y", "namespace": "team"}},
                           clusters={"x": "https://192.0.2.1:6443"}, users={"y": {"token": "nope"}})
        env = {"KUBECONFIG": f"{fc.kubeconfig}:{extra}", "HOME": str(tmp_path)}
        conn = connect(parse("-n", "team"), environ=env)
        assert conn.context == "fake"  # the first file's current-context
        [t] = resolve(conn, "web-1", selector=None, container=None, port=None, all_pods=False)
        assert (t.namespace, t.port) == ("team", 80)


def test_exec_plugin_credentials_on_a_real_server(tmp_path: Path) -> None:
    with FakeCluster(fcdir(tmp_path), token="plugin-t0ken") as fc:
        fc.add_pod("default", "web-1", containers=[{"name": "app", "image": "x", "ports": [{"containerPort": 80}]}])
        plugin = tmp_path / "cred"
        plugin.write_text('#!/bin/sh\necho \'{"apiVersion":"client.authentication.k8s.io/v1beta1",'
                          '"kind":"ExecCredential","status":{"token":"plugin-t0ken"}}\'\n')
        plugin.chmod(0o755)
        doc = yaml.safe_load(fc.kubeconfig.read_text())
        for user in doc["users"]:
            user["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": str(plugin),
                                     "interactiveMode": "Never"}}
        cfg = tmp_path / "plugin.yaml"
        cfg.write_text(yaml.safe_dump(doc))
        conn = connect(parse("--kubeconfig", str(cfg)), environ={})
        [t] = resolve(conn, "web-1", selector=None, container=None, port=None, all_pods=False)
        assert t.pod == "web-1"
        bad = connect(parse("--kubeconfig", str(cfg), "--token", "wrong"), environ={})
        with pytest.raises(ClusterError, match="rejected your credentials"):
            resolve(bad, "web-1", selector=None, container=None, port=None, all_pods=False)


def test_unreachable_server(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        conn = connect(parse("--server", f"https://127.0.0.1:{port}", "--token", "x"), environ={"HOME": str(tmp_path)})
        with pytest.raises(ClusterError) as err:
            resolve(conn, "web-1", selector=None, container=None, port=None, all_pods=False)
        assert str(err.value).startswith(f"cannot reach the Kubernetes API server at https://127.0.0.1:{port} (")
        assert "\n" not in str(err.value)
        with pytest.raises(ClusterError, match="cannot reach the Kubernetes API server"):
            open_exec(conn, "default", "web-1", "app", ["true"])


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_failures(tmp_path: Path) -> None:
    other_ca = trustme.CA()
    other = tmp_path / "other-ca.pem"
    other_ca.cert_pem.write_to_path(str(other))
    with FakeCluster(fcdir(tmp_path)) as fc:
        for flags in (["--certificate-authority", str(other)], ["--tls-server-name", "wrong.example"]):
            conn = fake_conn(fc, *flags)
            with pytest.raises(ClusterError) as err:
                resolve(conn, "web-1", selector=None, container=None, port=None, all_pods=False)
            assert str(err.value).startswith(f"TLS failure talking to {fc.url}: ")
            assert "\n" not in str(err.value)
            with pytest.raises(ClusterError, match="TLS failure"):
                open_exec(conn, "default", "web-1", "app", ["true"])
        # --insecure-skip-tls-verify gets past a CA that does not match (the pod does not exist: a 404 is fine).
        conn = fake_conn(fc, "--certificate-authority", str(other), "--insecure-skip-tls-verify")
        with pytest.raises(ClusterError, match='pods "web-1" not found'):
            resolve(conn, "web-1", selector=None, container=None, port=None, all_pods=False)


def test_request_timeout_applies(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)  # accepts the TCP connection, never answers: only a timeout ends the request
        port = s.getsockname()[1]
        conn = connect(parse("--server", f"https://127.0.0.1:{port}", "--token", "x", "--request-timeout", "1s"),
                       environ={"HOME": str(tmp_path)})
        assert conn.request_timeout == 1.0
        with pytest.raises(ClusterError, match="cannot reach the Kubernetes API server"):
            resolve(conn, "web-1", selector=None, container=None, port=None, all_pods=False)


def fcdir(tmp_path: Path) -> Path:
    path = tmp_path / "fc"
    path.mkdir(exist_ok=True)
    return path
