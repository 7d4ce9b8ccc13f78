"""kubectl's connection flags and the kubeconfig they select, turned into one ready ApiClient.

The python client's own loader is close to kubectl but not equal: with several KUBECONFIG files it lets the
*last* file's current-context win (kubectl: the first), it reads KUBECONFIG once at import time, and it has no
--cluster/--user/--server overrides. So the files are merged here, kubectl's way, into one dict that the
client's KubeConfigLoader then turns into a Configuration (keeping its exec-plugin and token-refresh support).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.kube_config import KubeConfigLoader
from pydantic import BaseModel, ConfigDict

from .errors import UsageError
from .flags import DEFAULT_NAMESPACE
from .kubeconfig_files import first_line as _first_line
from .kubeconfig_files import kubeconfig_paths, merge_kubeconfigs


class ConnectionFlags(BaseModel):
    """The connection flags as given; the boundary between argparse and the rest."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    kubeconfig: str | None = None
    context: str | None = None
    cluster: str | None = None
    user: str | None = None
    namespace: str | None = None
    server: str | None = None
    token: str | None = None
    certificate_authority: str | None = None
    client_certificate: str | None = None
    client_key: str | None = None
    insecure_skip_tls_verify: bool | None = None
    tls_server_name: str | None = None
    as_user: str | None = None
    as_group: list[str] | None = None
    as_uid: str | None = None
    request_timeout: float | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConnectionFlags:
        return cls.model_validate({k: getattr(args, k, None) for k in cls.model_fields})

    def impersonation(self) -> list[tuple[str, str]]:
        """Impersonate-* headers; a list because each group is its own header (the server reads them so)."""
        if (self.as_group or self.as_uid) and not self.as_user:
            raise UsageError("--as-group and --as-uid need --as: say which user to impersonate")
        headers: list[tuple[str, str]] = []
        if self.as_user:
            headers.append(("Impersonate-User", self.as_user))
        headers += [("Impersonate-Group", g) for g in self.as_group or []]
        if self.as_uid:
            headers.append(("Impersonate-Uid", self.as_uid))
        return headers


class _MirrorApiClient(k8s.ApiClient):  # type: ignore[misc]
    """ApiClient that sends impersonation headers and the default request timeout on every request.

    default_headers is a plain dict and cannot carry one header several times (one per --as-group), so the
    headers are added where the request leaves, as a urllib3 HTTPHeaderDict.
    """

    def __init__(self, configuration: k8s.Configuration, impersonation: list[tuple[str, str]],
                 request_timeout: float | None) -> None:
        super().__init__(configuration)
        self.mirror_impersonation = impersonation
        self.mirror_request_timeout = request_timeout

    def call_api(self, method: str, url: str, header_params: Any = None, body: Any = None, post_params: Any = None,
                 _request_timeout: Any = None) -> Any:
        merged = urllib3.HTTPHeaderDict(header_params or {})
        for name, value in self.mirror_impersonation:
            merged.add(name, value)
        if _request_timeout is None:
            _request_timeout = self.mirror_request_timeout
        parent = super()
        return parent.call_api(  # type: ignore[attr-defined]
            method, url, header_params=merged, body=body, post_params=post_params, _request_timeout=_request_timeout)


@dataclass(slots=True)
class Connection:
    """Everything the other stages need to talk to the cluster."""

    api_client: k8s.ApiClient
    namespace: str
    context: str
    request_timeout: float | None = None
    impersonation: list[tuple[str, str]] = field(default_factory=list)

    def auth_headers(self) -> list[tuple[str, str]]:
        """Headers for a connection made outside the ApiClient (the exec WebSocket): auth + impersonation."""
        cfg = self.api_client.configuration
        if cfg.refresh_api_key_hook is not None:  # exec plugins: a fresh token if the old one expired
            cfg.refresh_api_key_hook(cfg)
        headers: list[tuple[str, str]] = []
        auth = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
        if auth:
            headers.append(("Authorization", auth))
        return headers + list(self.impersonation)

    def close(self) -> None:
        self.api_client.close()  # type: ignore[no-untyped-call]


def _named(entries: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((e for e in entries if e.get("name") == name), None)


def _select(flags: ConnectionFlags, merged: dict[str, Any], paths: list[Path]) -> tuple[dict[str, Any], str]:
    """Apply --context/--cluster/--user/--server/... to the merged config; return (config, context name)."""
    where = ", ".join(str(p) for p in paths) or "no kubeconfig"
    context_name = flags.context or merged.get("current-context") or ""
    if flags.context and _named(merged["contexts"], flags.context) is None:
        raise UsageError(f'context "{flags.context}" not found in kubeconfig; see kubectl config get-contexts')
    ctx_entry = _named(merged["contexts"], context_name) if context_name else None
    if context_name and ctx_entry is None:
        raise UsageError(f'current context "{context_name}" not found in kubeconfig ({where}); '
                         "pick one with --context (see kubectl config get-contexts)")
    ctx: dict[str, Any] = dict((ctx_entry or {}).get("context") or {})
    if flags.cluster:
        if _named(merged["clusters"], flags.cluster) is None:
            raise UsageError(f'cluster "{flags.cluster}" not found in kubeconfig; see kubectl config get-clusters')
        ctx["cluster"] = flags.cluster
    if flags.user:
        if _named(merged["users"], flags.user) is None:
            raise UsageError(f'user "{flags.user}" not found in kubeconfig; see kubectl config get-users')
        ctx["user"] = flags.user
    cluster = dict((_named(merged["clusters"], ctx.get("cluster", "")) or {}).get("cluster") or {})
    user = dict((_named(merged["users"], ctx.get("user", "")) or {}).get("user") or {})
    if flags.server:
        cluster["server"] = flags.server
    if flags.certificate_authority:
        cluster["certificate-authority"] = str(Path(flags.certificate_authority).expanduser().resolve())
        cluster.pop("certificate-authority-data", None)
    if flags.insecure_skip_tls_verify:
        cluster["insecure-skip-tls-verify"] = True
    if flags.tls_server_name:
        cluster["tls-server-name"] = flags.tls_server_name
    if flags.client_certificate:
        user["client-certificate"] = str(Path(flags.client_certificate).expanduser().resolve())
        user.pop("client-certificate-data", None)
    if flags.client_key:
        user["client-key"] = str(Path(flags.client_key).expanduser().resolve())
        user.pop("client-key-data", None)
    if flags.token:
        # A token given on the command line replaces every other credential, as in kubectl.
        user = {"token": flags.token}
    if not cluster.get("server"):
        if not paths:
            raise UsageError("no kubeconfig found: set KUBECONFIG, pass --kubeconfig, or create ~/.kube/config")
        raise UsageError(f'no server found for context "{context_name}" in {where}: '
                         "pick one with --context or --server")
    name = context_name or "(flags)"
    config = {
        "current-context": name,
        "contexts": [{"name": name, "context": {**ctx, "cluster": "selected", "user": "selected"}}],
        "clusters": [{"name": "selected", "cluster": cluster}],
        "users": [{"name": "selected", "user": user}],
    }
    return config, name


def connect(args: argparse.Namespace, *, environ: Mapping[str, str] | None = None) -> Connection:
    """Build the Connection that the flags in `args` (see add_connection_flags) select."""
    return connect_with(ConnectionFlags.from_args(args), environ=environ)


def connect_with(flags: ConnectionFlags, *, environ: Mapping[str, str] | None = None) -> Connection:
    """Build the Connection these connection flags select."""
    env = os.environ if environ is None else environ
    paths = kubeconfig_paths(flags.kubeconfig, env)
    merged = merge_kubeconfigs(paths)
    config, context_name = _select(flags, merged, paths)
    configuration = k8s.Configuration()
    try:
        loader = KubeConfigLoader(config_dict=config, config_base_path=None)  # type: ignore[no-untyped-call]
        loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
    except ConfigException as exc:
        raise UsageError(f"invalid kubeconfig ({context_name}): {_first_line(exc)}") from None
    namespace = flags.namespace or config["contexts"][0]["context"].get("namespace") or DEFAULT_NAMESPACE
    impersonation = flags.impersonation()
    api = _MirrorApiClient(configuration, impersonation, flags.request_timeout)
    return Connection(api_client=api, namespace=namespace, context=context_name,
                      request_timeout=flags.request_timeout, impersonation=impersonation)
