"""Live mirroring of a meshed pod and of a pod that serves TLS itself, against the test cluster.

The meshed pod is built the way Istio builds one: its spec carries istio-proxy and istio-init (and the
annotations and labels the injector writes); in its network namespace an nftables rule redirects the app port
to the "sidecar" (a real TLS-terminating Python ssl proxy on 15006, Istio's inbound port), which forwards the
plaintext to the app over loopback from 127.0.0.6, as Istio's proxy does. Real TLS clients (curl) talk to the
pod's IP. Every request must reach the local service once, byte-exact as the app received it, and no ciphertext.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.apiserver import PodNetns
from tests.apiserver.resources import BY_KIND
from tests.cli_run import wait_for
from tests.live_helpers import HTTP_CONTAINER, POD_PORT, LiveLab, curl_keepalive, live_lab, live_run, run_once
from tests.mesh_pods import LINKERD_INIT, LINKERD_PROXY, PROBE_PATH, istio_sidecar_spec
from tests.netlab.lab import REPO, NsRecorder, contents, without_probe
from tests.netlab.netns import Netns
from tests.netlab.recorder import Recorder
from tests.netlab.tlsterm import TlsRecord, TlsServer

pytestmark = pytest.mark.netns

POD = "web-abc"
SIDECAR_PORT = 15006  # Istio's inbound capture port
AGENT_PORT = 15020  # pilot-agent's status port, where Istio sends the kubelet's rewritten probes
TLS_POD_PORT = 443


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LiveLab]:
    with live_lab(tmp_path) as lab:
        yield lab


@pytest.fixture
def certs(tmp_path: Path) -> trustme.CA:
    return trustme.CA()


class Sidecar:
    """The TLS-terminating proxy in the pod's namespace (tests.netlab.tlsterm as a process there)."""

    def __init__(self, ns: Netns, chain: Path, out: Path, port: int, extra: list[str]) -> None:
        self.out = out
        args = [sys.executable, "-m", "tests.netlab.tlsterm", "--port", str(port), "--cert", str(chain),
                "--out", str(out), *extra]
        self.proc = subprocess.Popen(ns.argv(args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening"):
            self.proc.kill()
            raise RuntimeError(f"the TLS proxy did not start: {line!r} {self.proc.communicate(timeout=10)[1][-2000:]}")

    def stop(self) -> list[TlsRecord]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=20)
        return [TlsRecord.from_json(d) for d in json.loads(self.out.read_text())] if self.out.exists() else []


def chain_for(ca: trustme.CA, ip: str, path: Path) -> Path:
    ca.issue_cert(ip, "web.default.svc.cluster.local").private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


def https(ip: str, port: int, paths: list[str], ca: trustme.CA, workdir: Path) -> str:
    """One curl process (one keep-alive connection for several paths) speaking TLS to the pod."""
    ca_file = workdir / "ca.pem"
    if not ca_file.exists():
        ca.cert_pem.write_to_path(str(ca_file))
    urls = [f"https://{ip}:{port}{p}" for p in paths]
    out = subprocess.run(["curl", "--http1.1", "-sS", "--max-time", "20", "--cacert", str(ca_file), *urls],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def meshed_netns(lab: LiveLab, stack: contextlib.ExitStack, ca: trustme.CA, proxy_port: int, forward: str,
                 source: str | None) -> tuple[PodNetns, NsRecorder, Sidecar]:
    """A pod namespace with the app, a real TLS-terminating sidecar, and the mesh's redirect of the app port."""
    netns = stack.enter_context(PodNetns())
    ns = Netns(netns.name)
    app = NsRecorder(ns, lab.workdir / "app.json", POD_PORT).start()
    stack.callback(lambda: app.proc is not None and app.proc.poll() is None and app.stop())
    extra = ["--forward", forward.format(ip=netns.ip)] + (["--source", source] if source else [])
    sidecar = Sidecar(ns, chain_for(ca, netns.ip, lab.workdir / "pod.pem"), lab.workdir / "sidecar.json",
                      proxy_port, extra)
    stack.callback(sidecar.stop)
    # The init container's inbound redirect (istio-iptables, linkerd proxy-init), in nftables: what arrives for the
    # app port from outside goes to the sidecar instead.
    ns.run(["nft", "add table ip mesh_inbound"])
    ns.run(["nft", "add chain ip mesh_inbound prerouting { type nat hook prerouting priority dstnat ; }"])
    ns.run(["nft", f'add rule ip mesh_inbound prerouting iifname != "lo" tcp dport {POD_PORT} '
                   f"redirect to :{proxy_port}"])
    return netns, app, sidecar


def register(lab: LiveLab, netns: PodNetns, containers: list[dict[str, Any]], inits: list[dict[str, Any]],
             annotations: dict[str, str], labels: dict[str, str]) -> None:
    """The pod in the test cluster with the spec the mesh's injector left."""
    # The test API server's kubelet would probe the rewritten readinessProbe every period; a test sends that probe
    # itself (kubelet_probe), exactly once, so the truth has a known count.
    lab.fc.probes_paused = True
    lab.fc.add_pod("default", POD, labels={"app": "web", **labels}, containers=containers, netns=netns.name)
    obj = lab.fc.get_pod("default", POD)
    obj["spec"]["initContainers"] = inits
    obj["metadata"]["annotations"] = annotations
    lab.fc.store.update(BY_KIND["Pod"], obj)


def add_istio_pod(lab: LiveLab, stack: contextlib.ExitStack, ca: trustme.CA) -> tuple[PodNetns, NsRecorder, Sidecar]:
    """A pod as Istio's injector and istio-init leave it: the sidecar forwards from 127.0.0.6 to the pod's IP, and
    pilot-agent's probe rewrite runs on 15020."""
    netns, app, sidecar = meshed_netns(lab, stack, ca, SIDECAR_PORT, "{ip}:" + str(POD_PORT), "127.0.0.6")
    ns = Netns(netns.name)
    agent = subprocess.Popen(ns.argv([sys.executable, "-m", "tests.netlab.probe_agent", "--port", str(AGENT_PORT),
                                      "--app", f"{netns.ip}:{POD_PORT}", "--path", f"{PROBE_PATH}=/healthz"]),
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stack.callback(agent.communicate, timeout=10)  # callbacks run last in, first out: SIGTERM, then reap
    stack.callback(agent.send_signal, signal.SIGTERM)
    assert agent.stdout is not None and agent.stdout.readline().startswith("listening")
    register(lab, netns, *istio_sidecar_spec(dict(HTTP_CONTAINER)))
    return netns, app, sidecar


def test_istio_pod_mirrors_the_plaintext_hop_once(lab: LiveLab, stack: contextlib.ExitStack, local: Recorder,
                                                  certs: trustme.CA) -> None:
    netns, app, sidecar = add_istio_pod(lab, stack, certs)
    with live_run([f"pod/{POD}", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        run.wait_mirroring()
        status = run_once(["status", *lab.kube_args()])
        assert status.returncode == 0, status.stderr
        header, row = status.stdout.splitlines()
        assert "MESH" in header.split() and "Istio sidecar" in row and row.endswith("yes on lo"), status.stdout
        for i in range(5):
            assert https(netns.ip, POD_PORT, [f"/mesh/{i}"], certs, lab.workdir).startswith(f"ok GET /mesh/{i} ")
        assert https(netns.ip, POD_PORT, ["/keep/a", "/keep/b", "/keep/c"], certs, lab.workdir).count("ok GET") == 3
        kubelet_probe(netns.ip)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    assert "pod web-abc is in an Istio mesh: mirroring the sidecar's plaintext hop on lo" in result.stderr
    truth = app.stop()
    tls = sidecar.stop()
    # The clients really spoke TLS to the pod's app port, and the app got plaintext from 127.0.0.6.
    assert len(tls) == 6 and all(r.handshake for r in tls), tls
    # ... and the probe pilot-agent made for the kubelet came the same way.
    assert len(truth) == 7 and all(r.client.startswith("127.0.0.6:") and r.http for r in truth), truth
    assert sum(r.requests == ["GET /healthz"] for r in truth) == 1
    local.wait_idle(len(truth) + 1, timeout=15.0)
    got = without_probe(local.stop(grace=5.0))
    assert contents(got) == contents(truth)  # every request once, byte-exact
    conns = result.connections
    assert conns["seen"] == conns["complete"] == 7 and conns["tls"] == 0 and conns["probes"] == 1, conns
    assert result.summary["mesh"] == "Istio sidecar, captured on lo"


def kubelet_probe(ip: str) -> None:
    """The kubelet's readiness probe, rewritten by Istio to pilot-agent's port (headers as kubelet sends them)."""
    out = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "-A",
                          "kube-probe/1.30", "-H", "Connection: close", f"http://{ip}:{AGENT_PORT}{PROBE_PATH}"],
                         capture_output=True, text=True, timeout=20, check=False)
    assert out.stdout == "200", (out.stdout, out.stderr)


def test_interface_flag_overrides_the_mesh_choice(lab: LiveLab, stack: contextlib.ExitStack, local: Recorder,
                                                  certs: trustme.CA) -> None:
    netns, _app, _sidecar = add_istio_pod(lab, stack, certs)
    with live_run([f"pod/{POD}", "--to", f"127.0.0.1:{local.port}", "--interface", "eth0", *lab.kube_args(),
                   "--json"]) as run:
        run.wait_mirroring()
        https(netns.ip, POD_PORT, ["/x"], certs, lab.workdir)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    assert "capturing on eth0 as --interface says" in result.stderr
    # On eth0 only the mesh's ciphertext goes by: held back as TLS, never sent to the plaintext service.
    conns = result.connections
    assert conns["tls"] == 1 and conns["complete"] == 0, conns
    local.wait_idle(1, timeout=5.0)
    assert without_probe(local.stop(grace=1.0)) == []


def test_a_quiet_meshed_pod_says_where_else_to_look(lab: LiveLab, stack: contextlib.ExitStack, local: Recorder,
                                                    certs: trustme.CA) -> None:
    add_istio_pod(lab, stack, certs)
    with live_run([f"pod/{POD}", "--to", f"127.0.0.1:{local.port}", "--duration", "1s", *lab.kube_args(),
                   "--json"]) as run:
        run.wait_mirroring()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    assert result.summary["packets"] == 0
    assert any("nothing arrived on lo" in w and "--interface" in w for w in result.summary["warnings"]), result.summary


def test_linkerd_pod_mirrors_the_proxys_hop_to_localhost(lab: LiveLab, stack: contextlib.ExitStack,
                                                         local: Recorder, certs: trustme.CA) -> None:
    # linkerd-proxy's inbound port; it hands the app its plaintext on 127.0.0.1.
    netns, app, sidecar = meshed_netns(lab, stack, certs, 4143, f"127.0.0.1:{POD_PORT}", None)
    register(lab, netns, [dict(HTTP_CONTAINER), dict(LINKERD_PROXY)], [dict(LINKERD_INIT)],
             {"linkerd.io/proxy-version": "stable-2.14.10", "linkerd.io/created-by": "linkerd/proxy-injector"},
             {"linkerd.io/control-plane-ns": "linkerd", "linkerd.io/proxy-deployment": "web"})
    with live_run([f"pod/{POD}", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        run.wait_mirroring()
        for i in range(3):
            https(netns.ip, POD_PORT, [f"/l5d/{i}"], certs, lab.workdir)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    assert "pod web-abc is in a Linkerd mesh: mirroring the sidecar's plaintext hop on lo" in result.stderr
    truth = app.stop()
    assert len(sidecar.stop()) == 3
    assert len(truth) == 3 and all(r.client.startswith("127.0.0.1:") for r in truth), truth
    local.wait_idle(len(truth) + 1, timeout=15.0)
    assert contents(without_probe(local.stop(grace=5.0))) == contents(truth)
    conns = result.connections
    assert conns["seen"] == conns["complete"] == 3 and conns["tls"] == 0, conns
    assert result.summary["mesh"] == "Linkerd sidecar, captured on lo"
    # The per-pod figures count the connections to 127.0.0.1 as this pod's: it is the only one captured on lo.
    assert [(p["pod"], p["connections"]) for p in result.summary["pods"]] == [(f"default/{POD}", 3)]


def test_a_port_the_redirect_leaves_alone_is_mirrored_as_without_a_mesh(lab: LiveLab, stack: contextlib.ExitStack,
                                                                          local: Recorder) -> None:
    # istio-iptables leaves an excluded port alone: its clients reach the app directly, in plaintext, on eth0.
    netns = stack.enter_context(PodNetns())
    app = NsRecorder(Netns(netns.name), lab.workdir / "app.json", POD_PORT).start()
    stack.callback(lambda: app.proc is not None and app.proc.poll() is None and app.stop())
    containers, inits, annotations, labels = istio_sidecar_spec(dict(HTTP_CONTAINER))
    register(lab, netns, containers, inits, {**annotations, "traffic.sidecar.istio.io/excludeInboundPorts": "80"},
             labels)
    with live_run([f"pod/{POD}", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        run.wait_mirroring()
        out = curl_keepalive(netns.ip, POD_PORT, ["/direct/a", "/direct/b"])
        assert out.count("ok GET") == 2, out
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    assert ("pod web-abc is in an Istio mesh, but its redirect leaves port 80 alone "
            "(traffic.sidecar.istio.io/excludeInboundPorts): mirroring it on any") in result.stderr
    truth = app.stop()
    local.wait_idle(len(truth) + 1, timeout=15.0)
    assert contents(without_probe(local.stop(grace=5.0))) == contents(truth) != []
    assert result.summary["mesh"] == "Istio sidecar, captured on any"


def add_tls_pod(lab: LiveLab, stack: contextlib.ExitStack, ca: trustme.CA) -> tuple[PodNetns, Sidecar]:
    """A plain pod whose app serves TLS itself on 443."""
    netns = stack.enter_context(PodNetns())
    server = Sidecar(Netns(netns.name), chain_for(ca, netns.ip, lab.workdir / "pod.pem"),
                     lab.workdir / "server.json", TLS_POD_PORT, [])
    stack.callback(server.stop)
    container = {"name": "web", "image": "nginx:1.27", "ports": [{"name": "https", "containerPort": TLS_POD_PORT}]}
    lab.fc.add_pod("default", POD, labels={"app": "web"}, containers=[container], netns=netns.name)
    return netns, server


def test_a_pod_serving_tls_is_counted_not_replayed_or_passed_through(
        lab: LiveLab, stack: contextlib.ExitStack, local: Recorder, certs: trustme.CA) -> None:
    netns, server = add_tls_pod(lab, stack, certs)
    with live_run([f"pod/{POD}", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        run.wait_mirroring()
        for i in range(3):
            https(netns.ip, TLS_POD_PORT, [f"/s/{i}"], certs, lab.workdir)
        run.interrupt()
        held = run.finish()
    assert held.returncode == 0, held.stderr
    assert held.connections["tls"] == 3 and held.connections["complete"] == 0, held.connections
    assert sum("opened with a TLS ClientHello" in line for line in held.stderr.splitlines()) == 1, held.stderr
    local.wait_idle(1, timeout=5.0)
    assert without_probe(local.stop(grace=1.0)) == []

    tls_local = TlsServer(str(lab.workdir / "pod.pem"), host="127.0.0.1").start()
    stack.callback(tls_local.stop)
    with live_run([f"pod/{POD}", "--to", f"127.0.0.1:{tls_local.port}", "--tls-passthrough", *lab.kube_args(),
                   "--json"]) as run:
        run.wait_mirroring()
        for i in range(3):
            https(netns.ip, TLS_POD_PORT, [f"/p/{i}"], certs, lab.workdir)
        run.interrupt()
        passed = run.finish()
    assert passed.returncode == 0, passed.stderr
    assert passed.connections["complete"] == 3 and passed.connections["tls"] == 0, passed.connections
    truth = server.stop()[3:]  # the pod's server saw the first run's connections too
    assert wait_for(lambda: len([r for r in tls_local.records if r.raw]) >= 3, 10.0)
    got = [bytes(r.raw) for r in tls_local.stop() if r.raw]
    assert sorted(got) == sorted(bytes(r.raw) for r in truth)
