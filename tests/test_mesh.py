"""Mesh detection from pod specs as the meshes' injectors write them, and what the plugin says about it."""

from __future__ import annotations

import pytest

from kubectl_mirror.mesh import Mesh, Mode, announcement, detect
from tests.mesh_pods import (
    ISTIO_ANNOTATIONS,
    ISTIO_INIT,
    ISTIO_LABELS,
    ISTIO_PROXY,
    KUMA_INIT,
    KUMA_SIDECAR,
    LINKERD_INIT,
    LINKERD_PROXY,
    pod,
)

APP = {"name": "web", "image": "nginx:1.27", "ports": [{"name": "http", "containerPort": 80}]}


def test_a_plain_pod_is_in_no_mesh() -> None:
    assert detect(pod(APP, containers=[{"name": "log-shipper"}], inits=[{"name": "migrate"}])) is None
    # Opted out of injection: no proxy, no redirect.
    opted_out = {"sidecar.istio.io/inject": "false", "linkerd.io/inject": "disabled", "kuma.io/sidecar-injection":
                 "disabled", "kuma.io/sidecar-injected": "false"}
    assert detect(pod(APP, annotations=opted_out)) is None


@pytest.mark.parametrize(("spec", "name", "evidence"), [
    (pod(APP, containers=[ISTIO_PROXY], inits=[ISTIO_INIT], annotations=ISTIO_ANNOTATIONS, labels=ISTIO_LABELS),
     "Istio", "container istio-proxy"),
    # Istio CNI: the redirect is installed by the CNI plugin, istio-validation only checks it.
    (pod(APP, containers=[ISTIO_PROXY], inits=[{"name": "istio-validation"}]), "Istio", "container istio-proxy"),
    # Native sidecars (Kubernetes 1.28+, ENABLE_NATIVE_SIDECARS): the proxy is an init container that stays up.
    (pod(APP, inits=[ISTIO_INIT, {**ISTIO_PROXY, "restartPolicy": "Always"}]), "Istio",
     "native sidecar istio-proxy (init container, restartPolicy Always)"),
    (pod(APP, containers=[LINKERD_PROXY], inits=[LINKERD_INIT]), "Linkerd", "container linkerd-proxy"),
    (pod(APP, inits=[{"name": "linkerd-network-validator"}, {**LINKERD_PROXY, "restartPolicy": "Always"}]),
     "Linkerd", "native sidecar linkerd-proxy (init container, restartPolicy Always)"),
    (pod(APP, containers=[KUMA_SIDECAR], inits=[KUMA_INIT]), "Kuma", "container kuma-sidecar"),
    # Only the traces an injector leaves on the pod: still a mesh.
    (pod(APP, inits=[KUMA_INIT]), "Kuma", "init container kuma-init"),
    (pod(APP, annotations={"linkerd.io/proxy-version": "stable-2.14.10"}), "Linkerd",
     "annotation linkerd.io/proxy-version"),
])
def test_sidecar_meshes_capture_the_plaintext_hop_on_lo(spec: dict[str, object], name: str, evidence: str) -> None:
    mesh = detect(spec)
    assert mesh is not None
    assert (mesh.name, mesh.mode, mesh.evidence, mesh.interface) == (name, Mode.SIDECAR, evidence, "lo")


def test_istio_ambient_by_its_annotation() -> None:
    mesh = detect(pod(APP, annotations={"ambient.istio.io/redirection": "enabled"}))
    assert mesh == Mesh("Istio", Mode.AMBIENT, "annotation ambient.istio.io/redirection: enabled")
    assert mesh.interface == "lo"
    assert detect(pod(APP, annotations={"ambient.istio.io/redirection": "disabled"})) is None
    said = announcement("web-abc", mesh, "lo", overridden=False)
    assert "ztunnel" in said and "--interface eth0" in said


def test_a_gateway_is_the_proxy_itself() -> None:
    gateway = pod(ISTIO_PROXY, labels={"istio": "ingressgateway"}, name="istio-ingressgateway-5f9")
    mesh = detect(gateway)
    assert mesh is not None and mesh.mode is Mode.GATEWAY and mesh.interface == "any"
    # Mirroring the sidecar container's own port in a meshed pod is the same thing.
    meshed = pod(APP, containers=[ISTIO_PROXY])
    chosen = detect(meshed, "istio-proxy")
    assert chosen is not None and chosen.mode is Mode.GATEWAY
    said = announcement("istio-ingressgateway-5f9", mesh, "any", overridden=False)
    assert "mirror the backend workload instead" in said and "tls" in said


def test_the_announcement() -> None:
    mesh = detect(pod(APP, containers=[ISTIO_PROXY], inits=[ISTIO_INIT]))
    assert mesh is not None
    assert announcement("web-abc", mesh, "lo", overridden=False) == (
        "pod web-abc is in an Istio mesh: mirroring the sidecar's plaintext hop on lo")
    assert announcement("web-abc", mesh, "eth0", overridden=True) == (
        "pod web-abc is in an Istio mesh (sidecar): capturing on eth0 as --interface says")
    linkerd = detect(pod(APP, containers=[LINKERD_PROXY], inits=[LINKERD_INIT]))
    assert linkerd is not None
    assert announcement("web-abc", linkerd, "lo", overridden=False) == (
        "pod web-abc is in a Linkerd mesh: mirroring the sidecar's plaintext hop on lo")


def test_a_pod_capture_listens_where_its_mesh_says_unless_told() -> None:
    from kubectl_mirror.live import KubePodCapture
    from kubectl_mirror.tap import Tap
    from kubectl_mirror.target import PodTarget

    mesh = detect(pod(APP, containers=[ISTIO_PROXY], inits=[ISTIO_INIT]))
    meshed = PodTarget("default", "web-abc", "web", 80, "http", "10.1.0.7", "node-1", mesh)
    plain = PodTarget("default", "web-def", "web", 80, "http", "10.1.0.8", "node-1")
    tap = Tap("default", "web-abc", "mirror-tap", "img", "web", False, False)
    capture = KubePodCapture(None, meshed, tap, None)  # type: ignore[arg-type]  # nothing here talks to the cluster
    # The proxy reaches the app on the pod's IP (Istio) or on 127.0.0.1 (older proxies): both are the server.
    assert (capture.interface, capture.server_hosts) == ("lo", {"10.1.0.7", "127.0.0.1", "::1"})
    assert KubePodCapture(None, meshed, tap, None, "eth0").interface == "eth0"  # type: ignore[arg-type]
    plain_capture = KubePodCapture(None, plain, tap, None)  # type: ignore[arg-type]
    assert (plain_capture.interface, plain_capture.server_hosts) == ("any", {"10.1.0.8"})


def test_ports_the_redirect_leaves_alone_are_captured_as_without_a_mesh() -> None:
    istio = detect(pod(APP, containers=[ISTIO_PROXY], inits=[ISTIO_INIT],
                       annotations={"traffic.sidecar.istio.io/excludeInboundPorts": "8080, 9000-9002"}))
    assert istio is not None
    assert [istio.redirects(p) for p in (80, 8080, 9001, 9003, 15020)] == [True, False, False, True, False]
    assert (istio.interface_for(80), istio.interface_for(8080)) == ("lo", "any")
    assert announcement("web-abc", istio, "any", overridden=False, port=8080) == (
        "pod web-abc is in an Istio mesh, but its redirect leaves port 8080 alone "
        "(traffic.sidecar.istio.io/excludeInboundPorts): mirroring it on any, as in a pod without a mesh")
    assert "(Istio's own port)" in announcement("web-abc", istio, "any", overridden=False, port=15020)
    include = "traffic.sidecar.istio.io/includeInboundPorts"
    only = detect(pod(APP, containers=[ISTIO_PROXY], annotations={include: "80"}))
    assert only is not None and only.redirects(80) and not only.redirects(8080)
    for everything in ("*", " * "):
        every = detect(pod(APP, containers=[ISTIO_PROXY],
                           annotations={include: everything}))
        assert every is not None and every.redirects(8080)
    none = detect(pod(APP, containers=[ISTIO_PROXY], annotations={include: ""}))
    assert none is not None and not none.redirects(80)
    linkerd = detect(pod(APP, containers=[LINKERD_PROXY], annotations={"config.linkerd.io/skip-inbound-ports": "25"}))
    assert linkerd is not None and not linkerd.redirects(25) and not linkerd.redirects(4191) and linkerd.redirects(80)
    kuma = detect(pod(APP, containers=[KUMA_SIDECAR], annotations={"traffic.kuma.io/exclude-inbound-ports": "x,7"}))
    assert kuma is not None and not kuma.redirects(7) and kuma.redirects(80)
    ambient = detect(pod(APP, annotations={"ambient.istio.io/redirection": "enabled",
                                           "traffic.sidecar.istio.io/excludeInboundPorts": "80"}))
    assert ambient is not None and ambient.redirects(80)  # sidecar annotations mean nothing to ztunnel
