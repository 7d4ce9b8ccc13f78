"""Pod specs as each mesh's injector writes them (the parts the plugin reads), for the test cluster and unit tests.

Shapes follow what `istioctl kube-inject`, Linkerd's proxy injector and Kuma's injector produce: the proxy
container, the init container that installs the traffic redirect (or the validation container that replaces it
when a CNI plugin installs it), and the annotations and labels they set.
"""

from __future__ import annotations

import copy
import json
from typing import Any

Obj = dict[str, Any]

ISTIO_PROXY: Obj = {
    "name": "istio-proxy", "image": "docker.io/istio/proxyv2:1.22.3",
    "args": ["proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local"],
    "ports": [{"name": "http-envoy-prom", "containerPort": 15090, "protocol": "TCP"}],
}
ISTIO_INIT: Obj = {
    "name": "istio-init", "image": "docker.io/istio/proxyv2:1.22.3",
    "args": ["istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
             "-b", "*", "-d", "15090,15021,15020"],
}
LINKERD_PROXY: Obj = {"name": "linkerd-proxy", "image": "cr.l5d.io/linkerd/proxy:stable-2.14.10",
                      "ports": [{"name": "linkerd-proxy", "containerPort": 4143}]}
LINKERD_INIT: Obj = {"name": "linkerd-init", "image": "cr.l5d.io/linkerd/proxy-init:v2.2.3",
                     "args": ["--incoming-proxy-port", "4143", "--outgoing-proxy-port", "4140"]}
KUMA_SIDECAR: Obj = {"name": "kuma-sidecar", "image": "docker.io/kumahq/kuma-dp:2.7.0"}
KUMA_INIT: Obj = {"name": "kuma-init", "image": "docker.io/kumahq/kuma-init:2.7.0"}

ISTIO_ANNOTATIONS = {
    "sidecar.istio.io/status": '{"initContainers":["istio-init"],"containers":["istio-proxy"],'
                               '"volumes":["istio-envoy","istio-data"],"revision":"default"}',
    "kubectl.kubernetes.io/default-container": "web",
    "kubectl.kubernetes.io/default-logs-container": "web",
    "prometheus.io/port": "15020",
}
ISTIO_LABELS = {"security.istio.io/tlsMode": "istio", "service.istio.io/canonical-name": "web",
                "service.istio.io/canonical-revision": "latest"}


def pod(app: Obj, *, containers: list[Obj] = (), inits: list[Obj] = (),  # type: ignore[assignment]
        annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None, name: str = "web-abc") -> Obj:
    """A pod's JSON as far as mesh detection reads it."""
    return {"metadata": {"name": name, "annotations": dict(annotations or {}), "labels": dict(labels or {})},
            "spec": {"containers": [copy.deepcopy(app), *map(copy.deepcopy, containers)],
                     "initContainers": list(map(copy.deepcopy, inits))}}


PROBE_PATH = "/app-health/web/readyz"  # what Istio rewrites the app's readiness probe to, on pilot-agent's 15020


def istio_sidecar_spec(app: Obj, probe_path: str = "/healthz") -> tuple[list[Obj], list[Obj], dict[str, str],
                                                                         dict[str, str]]:
    """(containers, initContainers, annotations, labels) of a pod after Istio's sidecar injection.

    The app's HTTP readiness probe is rewritten to pilot-agent's status port, which keeps the original in
    ISTIO_KUBE_APP_PROBERS and probes the app itself.
    """
    port = app["ports"][0]["containerPort"]
    app = {**copy.deepcopy(app), "readinessProbe": {"httpGet": {"path": PROBE_PATH, "port": 15020, "scheme": "HTTP"}}}
    original = {PROBE_PATH: {"httpGet": {"path": probe_path, "port": port, "scheme": "HTTP"}, "timeoutSeconds": 1}}
    proxy = {**copy.deepcopy(ISTIO_PROXY), "env": [{"name": "ISTIO_KUBE_APP_PROBERS", "value": json.dumps(original)}]}
    return [app, proxy], [copy.deepcopy(ISTIO_INIT)], dict(ISTIO_ANNOTATIONS), dict(ISTIO_LABELS)
