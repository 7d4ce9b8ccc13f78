"""Test CA and server certificate (trustme) and the kubeconfig that trusts them."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path

import trustme


class Credentials:
    def __init__(self, workdir: Path) -> None:
        self.ca = trustme.CA()
        self._cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = workdir / "ca.crt"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(ctx)
        return ctx


def write_kubeconfig(path: Path, url: str, ca_pem: bytes, user: str, token: str) -> Path:
    # JSON is valid YAML, and kubectl and the python client both read it.
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "fake",
             "cluster": {"server": url, "certificate-authority-data": base64.b64encode(ca_pem).decode()}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": user, "namespace": "default"}}],
        "current-context": "fake",
        "preferences": {},
    }
    path.write_text(json.dumps(config, indent=2))
    path.chmod(0o600)
    return path
