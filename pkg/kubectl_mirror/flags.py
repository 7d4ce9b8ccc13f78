"""kubectl's connection flags, with kubectl's names and meanings.

Kept free of the Kubernetes client so that building the parser (every --help) stays fast; kubeconfig.py turns
the parsed flags into a client.
"""

from __future__ import annotations

import argparse
import re

DEFAULT_NAMESPACE = "default"

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_request_timeout(text: str) -> float | None:
    """kubectl's --request-timeout: "0" means none, a bare integer is seconds, else a Go duration ("1m30s")."""
    t = text.strip()
    if t.isdigit():
        return float(t) or None
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(t):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if not t or pos != len(t):
        raise argparse.ArgumentTypeError(f"invalid --request-timeout {text!r} (examples: 0, 5s, 1m)")
    return total or None


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """Register kubectl's standard connection flags, with kubectl's names and meanings, in their own group."""
    g = parser.add_argument_group("Kubernetes connection (as in kubectl)")
    g.add_argument("--kubeconfig", metavar="PATH",
                   help="path to the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
    g.add_argument("--context", metavar="NAME", help="the kubeconfig context to use")
    g.add_argument("--cluster", metavar="NAME", help="the kubeconfig cluster to use")
    g.add_argument("--user", metavar="NAME", help="the kubeconfig user to use")
    g.add_argument("-n", "--namespace", metavar="NAME", help="the namespace (default: the context's, else default)")
    g.add_argument("-s", "--server", metavar="URL", help="the address and port of the Kubernetes API server")
    g.add_argument("--token", metavar="TOKEN", help="bearer token for authentication to the API server")
    g.add_argument("--certificate-authority", metavar="PATH", help="path to a cert file for the certificate authority")
    g.add_argument("--client-certificate", metavar="PATH", help="path to a client certificate file for TLS")
    g.add_argument("--client-key", metavar="PATH", help="path to a client key file for TLS")
    g.add_argument("--insecure-skip-tls-verify", action="store_true", default=None,
                   help="do not check the server's certificate (insecure)")
    g.add_argument("--tls-server-name", metavar="NAME", help="server name to use for certificate validation")
    g.add_argument("--as", dest="as_user", metavar="USER", help="username to impersonate for the operation")
    g.add_argument("--as-group", action="append", default=None, metavar="GROUP",
                   help="group to impersonate for the operation (repeatable)")
    g.add_argument("--as-uid", metavar="UID", help="UID to impersonate for the operation")
    g.add_argument("--request-timeout", type=parse_request_timeout, default=None, metavar="DURATION",
                   help='how long to wait for a single API request: 0 (default) is forever; e.g. 5s, 1m')


