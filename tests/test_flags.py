"""Connection flags and kubeconfig handling, checked the way kubectl behaves."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubectl_mirror.errors import UsageError
from kubectl_mirror.flags import add_connection_flags, connect, parse_request_timeout


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
