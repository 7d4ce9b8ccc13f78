"""Service meshes: which one a pod is in (from its spec alone), and where its plaintext can be captured.

In a sidecar mesh the app port is reached twice inside the pod's network namespace: the mesh's mTLS arrives on
eth0 addressed to the app port (iptables hands it to the proxy), and the proxy then opens a plaintext
connection to the app over loopback (Istio from 127.0.0.6). Capturing the port on every interface would mirror
both, so in a mesh only `lo` is captured: the proxy's hop to the app, which is what the app itself received.

Pure: a pod's JSON (or the parts of it read here) in, a `Mesh` out. Nothing here talks to the cluster.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

LOOPBACK = "lo"
ANY = "any"

AMBIENT_ANNOTATION = "ambient.istio.io/redirection"


class Mode(str, enum.Enum):
    SIDECAR = "sidecar"  # a proxy container in the pod; its plaintext hop to the app runs over lo
    AMBIENT = "ambient"  # Istio ambient: ztunnel delivers the plaintext into the pod (in-pod mode: over lo)
    GATEWAY = "gateway"  # the pod *is* the proxy: the TLS it terminates goes on to other pods


@dataclass(frozen=True, slots=True)
class Mesh:
    name: str  # "Istio", "Linkerd", "Kuma"
    mode: Mode
    evidence: str  # what in the pod spec said so, for -v and the status table
    proxy: str | None = None  # the proxy's container name
    # Sidecars: inbound ports the redirect leaves alone (their traffic reaches the app directly, on eth0), and
    # the only ports it takes (None: every port). `rules` names the annotations that said so, for messages.
    bypassed: frozenset[int] = frozenset()
    only: frozenset[int] | None = None
    rules: str = ""

    @property
    def interface(self) -> str:
        """Where the app's plaintext is for a redirected port: loopback for sidecars and ambient's in-pod ztunnel."""
        return ANY if self.mode is Mode.GATEWAY else LOOPBACK

    def redirects(self, port: int) -> bool:
        """Whether the sidecar's redirect takes inbound traffic for `port` (else it reaches the app directly)."""
        if self.mode is not Mode.SIDECAR:
            return True
        return port not in self.bypassed and (self.only is None or port in self.only)

    def interface_for(self, port: int) -> str:
        """Where the app's plaintext for `port` is: a port the redirect leaves alone is a port without a mesh."""
        return self.interface if self.redirects(port) else ANY

    def label(self) -> str:
        return f"{self.name} {self.mode.value}"


# Container names each mesh's injector gives its proxy and its traffic-redirect init container (or the
# validation container that replaces it when a CNI plugin sets the redirect up instead).
_PROXIES = {"istio-proxy": "Istio", "linkerd-proxy": "Linkerd", "kuma-sidecar": "Kuma"}
_INITS = {"istio-init": "Istio", "istio-validation": "Istio", "linkerd-init": "Linkerd",
          "linkerd-network-validator": "Linkerd", "kuma-init": "Kuma", "kuma-validation": "Kuma"}
# Annotations the injectors write on a pod they injected.
_INJECTED = {"sidecar.istio.io/status": "Istio", "linkerd.io/proxy-version": "Linkerd",
             "kuma.io/sidecar-injected": "Kuma"}
# Annotations that take inbound ports out of the sidecar's redirect, and ports each mesh leaves alone by itself
# (its own agent and admin ports: istio-iptables -d 15090,15021,15020; linkerd proxy-init skips 4190,4191).
_EXCLUDE = {"Istio": "traffic.sidecar.istio.io/excludeInboundPorts", "Linkerd": "config.linkerd.io/skip-inbound-ports",
            "Kuma": "traffic.kuma.io/exclude-inbound-ports"}
_INCLUDE = {"Istio": "traffic.sidecar.istio.io/includeInboundPorts"}
_OWN_PORTS = {"Istio": frozenset({15020, 15021, 15090}), "Linkerd": frozenset({4190, 4191})}


def _ports(text: str) -> frozenset[int]:
    """`8080,9090`, `4190-4199`, spaces allowed; what is not a port or range is skipped."""
    out: set[int] = set()
    for part in text.replace(" ", "").split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            first, last = int(low), int(high or low)
            if 0 < first <= last <= 65535 and last - first < 65536:
                out.update(range(first, last + 1))
    return frozenset(out)


def _with_port_rules(mesh: Mesh, annotations: Mapping[str, str]) -> Mesh:
    """A sidecar mesh with the inbound ports its redirect leaves alone, from the pod's annotations."""
    if mesh.mode is not Mode.SIDECAR:
        return mesh
    bypassed = set(_OWN_PORTS.get(mesh.name, frozenset()))
    only: frozenset[int] | None = None
    rules = []
    exclude = _EXCLUDE.get(mesh.name)
    if exclude is not None and annotations.get(exclude):
        bypassed |= _ports(str(annotations[exclude]))
        rules.append(exclude)
    include = _INCLUDE.get(mesh.name)
    if include is not None and include in annotations and str(annotations[include]).strip() != "*":
        only = _ports(str(annotations[include]))  # "" takes no port at all
        rules.append(include)
    return replace(mesh, bypassed=frozenset(bypassed), only=only, rules=", ".join(rules))


def _names(containers: Sequence[Mapping[str, Any]] | None) -> list[str]:
    return [str(c.get("name", "")) for c in containers or []]


def detect(pod: Mapping[str, Any], target_container: str | None = None) -> Mesh | None:
    """The mesh a pod is in, or None. `pod` is the pod's JSON; `target_container` the one being mirrored."""
    mesh = _detect(pod, target_container)
    if mesh is None:
        return None
    annotations: Mapping[str, str] = (pod.get("metadata") or {}).get("annotations") or {}
    return _with_port_rules(mesh, annotations)


def _detect(pod: Mapping[str, Any], target_container: str | None) -> Mesh | None:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations: Mapping[str, str] = meta.get("annotations") or {}
    labels: Mapping[str, str] = meta.get("labels") or {}
    containers = _names(spec.get("containers"))
    inits = spec.get("initContainers") or []
    if target_container is not None and target_container in _PROXIES:
        # Mirroring the proxy's own port (an ingress/egress gateway): what it receives is the clients' TLS.
        return Mesh(_PROXIES[target_container], Mode.GATEWAY, f"the mirrored container is {target_container}",
                    target_container)
    for name in containers:
        if name in _PROXIES:
            if len(containers) == 1:
                return Mesh(_PROXIES[name], Mode.GATEWAY, f"{name} is the pod's only container", name)
            return Mesh(_PROXIES[name], Mode.SIDECAR, f"container {name}", name)
    for c in inits:
        name = str(c.get("name", ""))
        if name in _PROXIES and c.get("restartPolicy") == "Always":
            # Kubernetes native sidecars (1.28+): the proxy is an init container that keeps running.
            return Mesh(_PROXIES[name], Mode.SIDECAR, f"native sidecar {name} (init container, restartPolicy "
                        "Always)", name)
    if str(annotations.get(AMBIENT_ANNOTATION, "")).lower() == "enabled":
        return Mesh("Istio", Mode.AMBIENT, f"annotation {AMBIENT_ANNOTATION}: enabled")
    for name in _names(inits):
        if name in _INITS:
            return Mesh(_INITS[name], Mode.SIDECAR, f"init container {name}")
    for key, mesh in _INJECTED.items():
        # `sidecar.istio.io/inject: "false"` and the like say the opposite: only what an injector writes counts.
        if key in annotations and str(annotations[key]).lower() not in ("", "false"):
            return Mesh(mesh, Mode.SIDECAR, f"annotation {key}")
    if "istio.io/gateway-name" in labels or "gateway.istio.io/managed" in labels:
        return Mesh("Istio", Mode.GATEWAY, "an Istio gateway's labels")
    return None


def _a(name: str) -> str:
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def announcement(pod: str, mesh: Mesh, interface: str, overridden: bool, port: int | None = None) -> str:
    """The one line that says what is captured in a meshed pod, and why."""
    if overridden:
        return (f"pod {pod} is in {_a(mesh.name)} mesh ({mesh.mode.value}): capturing on {interface} as --interface "
                "says")
    if mesh.mode is Mode.SIDECAR and port is not None and not mesh.redirects(port):
        own = port in _OWN_PORTS.get(mesh.name, frozenset())
        why = f" ({mesh.name}'s own port)" if own or not mesh.rules else f" ({mesh.rules})"
        return (f"pod {pod} is in {_a(mesh.name)} mesh, but its redirect leaves port {port} alone{why}: mirroring it "
                f"on {interface}, as in a pod without a mesh")
    if mesh.mode is Mode.SIDECAR:
        return f"pod {pod} is in {_a(mesh.name)} mesh: mirroring the sidecar's plaintext hop on {interface}"
    if mesh.mode is Mode.AMBIENT:
        return (f"pod {pod} is in {_a(mesh.name)} ambient mesh: mirroring ztunnel's plaintext hop to the app on "
                f"{interface} (in-pod redirection, Istio 1.21+; before that ztunnel ran on the node and "
                "delivered on eth0: pass --interface eth0)")
    return (f"pod {pod} is {_a(mesh.name)} proxy itself (gateway): what it receives is its clients' TLS, and the "
            "plaintext it decrypts leaves the pod in new connections, so it cannot be mirrored here; mirror the "
            "backend workload instead (connections that open with TLS are counted as tls, not replayed)")


__all__ = ["ANY", "LOOPBACK", "Mesh", "Mode", "announcement", "detect"]
