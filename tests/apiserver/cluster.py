"""FakeCluster: the API server on its own thread and event loop, plus the test-facing set-up methods."""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import itertools
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from . import objects, restarts
from .resources import BY_KIND
from .server import ApiServer
from .settings import Settings
from .status import ApiError
from .store import Store, now_rfc3339
from .tls import Credentials, write_kubeconfig

Obj = dict[str, Any]
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
WORKLOAD_KINDS = ("ReplicaSet", "StatefulSet", "DaemonSet", "Job")


class FakeCluster:
    def __init__(self, workdir: Path, token: str = "t0ken", user: str = "alice") -> None:
        self.workdir = Path(workdir)
        self.settings = Settings(token=token, user=user)
        self.store = Store()
        self._server = ApiServer(self.store, self.settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._creds: Credentials | None = None
        self._svc_ips = itertools.count(10)
        self._deletions: list[threading.Timer] = []  # graceful pod deletions still waiting for their grace period
        self.url = ""
        self.port = 0
        self.kubeconfig = self.workdir / "kubeconfig"
        self.ca_file = self.workdir / "ca.crt"

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> FakeCluster:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        self._creds = creds = Credentials(self.workdir)
        self.ca_file = creds.ca_file
        sock = listen_socket(0)
        self.port = sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        write_kubeconfig(self.kubeconfig, self.url, creds.ca.cert_pem.bytes(), self.settings.user, self.settings.token)
        self.add_namespace("default")
        self.add_namespace("kube-system")
        for node_os in ("linux", "windows"):
            self.store.create(BY_KIND["Node"], objects.node(node_os))
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(sock, started), name="fake-apiserver", daemon=True)
        self._thread.start()
        if not started.wait(START_TIMEOUT):
            raise RuntimeError("fake API server did not start")

    def _serve(self, sock: socket.socket, started: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._open(sock))
        started.set()
        self._loop.run_forever()

    async def _open(self, sock: socket.socket) -> None:
        assert self._creds is not None
        runner = web.AppRunner(self._server.make_app(), handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        await web.SockSite(runner, sock, ssl_context=self._creds.server_context()).start()
        self._runner = runner

    async def _close(self) -> None:
        """What a dying API server process does to its clients: refuse new ones, cut the others off."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        for site in runner.sites:
            await site.stop()  # the listening socket first, so nothing new gets in while the rest goes down
        self._server.drop_connections()
        self.store.close_watchers()  # wakes the watch handlers, whose clients are already cut off
        await runner.cleanup()  # idle keep-alive connections, and handlers that did not notice within 1 s

    def restart(self, downtime: float = 1.0) -> None:
        """Restart the API server: every connection (watches, exec WebSockets) is cut and connecting is refused
        for `downtime` seconds, then it serves again on the same port with the same certificate, token, objects
        and resourceVersions. Processes started through exec keep running (they are the kubelet's, not the API
        server's); their output is read and dropped while no client is attached, so none blocks on a full pipe.
        """
        loop = self._loop
        if loop is None:
            raise RuntimeError("the fake API server is not running")
        asyncio.run_coroutine_threadsafe(self._close(), loop).result(STOP_TIMEOUT)
        time.sleep(max(0.0, downtime))  # on the test thread: the server loop keeps draining exec'd output
        sock = listen_socket(self.port)
        asyncio.run_coroutine_threadsafe(self._open(sock), loop).result(START_TIMEOUT)

    def stop(self) -> None:
        for timer in self._deletions:
            timer.cancel()
        loop = self._loop
        if loop is None:
            return
        self._server.processes.kill_all()
        self.store.close_watchers()

        async def shutdown() -> None:
            await self._server.kubelet.stop()
            await self._server.processes.drain(STOP_TIMEOUT / 2)
            runner, self._runner = self._runner, None
            if runner is not None:
                await runner.cleanup()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(STOP_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(STOP_TIMEOUT)
            if not loop.is_running():
                loop.close()
            self._loop = None

    # -- switches ----------------------------------------------------------------------------------------------
    @property
    def tap_start_delay(self) -> float:
        return self.settings.tap_start_delay

    @tap_start_delay.setter
    def tap_start_delay(self, value: float) -> None:
        self.settings.tap_start_delay = value

    @property
    def exec_upgrade_verb(self) -> str:
        return self.settings.exec_upgrade_verb

    @exec_upgrade_verb.setter
    def exec_upgrade_verb(self, value: str) -> None:
        self.settings.exec_upgrade_verb = value

    @property
    def exec_kill_on_disconnect(self) -> bool:
        return self.settings.exec_kill_on_disconnect

    @exec_kill_on_disconnect.setter
    def exec_kill_on_disconnect(self, value: bool) -> None:
        self.settings.exec_kill_on_disconnect = value

    @property
    def exec_path_prepend(self) -> list[str]:
        return list(self.settings.exec_path_prepend)

    @exec_path_prepend.setter
    def exec_path_prepend(self, value: list[str]) -> None:
        self.settings.exec_path_prepend = [str(d) for d in value]

    @property
    def exec_idle_timeout(self) -> float | None:
        return self.settings.exec_idle_timeout

    @exec_idle_timeout.setter
    def exec_idle_timeout(self, value: float | None) -> None:
        """Cut exec streams idle (no data either way) this long, as a kubelet does; None: never."""
        self.settings.exec_idle_timeout = value

    @property
    def probes_paused(self) -> bool:
        return self._server.kubelet.prober.paused

    @probes_paused.setter
    def probes_paused(self, value: bool) -> None:
        """Hold every probe (a test's switch, no kubelet has one): lets a run end between two probes."""
        self._server.kubelet.prober.paused = value

    @property
    def runtime_default_caps(self) -> tuple[str, ...]:
        return self.settings.runtime_default_caps

    @runtime_default_caps.setter
    def runtime_default_caps(self, value: tuple[str, ...]) -> None:
        self.settings.runtime_default_caps = tuple(value)

    @property
    def requests(self) -> list[tuple[str, str]]:
        with self.settings.lock:
            return list(self.settings.requests)

    @property
    def request_urls(self) -> list[tuple[str, str]]:
        """Like requests, with the query string kept."""
        with self.settings.lock:
            return list(self.settings.request_urls)

    def fail_forbidden(self, verb: str, resource: str, subresource: str = "") -> None:
        self.settings.forbidden.add((verb, resource, subresource))

    def allow_only(self, rules: list[tuple[str, str, str]]) -> None:
        """RBAC enforcement: only these (verb, resource, subresource) are allowed; "*" matches anything."""
        self.settings.rbac_allow = list(rules)

    def fail_no_ephemeral_containers(self) -> None:
        self.settings.no_ephemeral_containers = True

    def fail_image_pull(self, image_prefix: str = "") -> None:
        self.settings.image_pull_failure_prefix = image_prefix

    def exec_processes(self) -> list[tuple[int, list[str]]]:
        return self._server.processes.running()

    # -- objects -----------------------------------------------------------------------------------------------
    def add_namespace(self, name: str, labels: dict[str, str] | None = None) -> Obj:
        return self.store.create(BY_KIND["Namespace"], objects.namespace(name, labels))

    def _ensure_namespace(self, ns: str) -> None:
        try:
            self.store.get(BY_KIND["Namespace"], "", ns)
        except ApiError:
            self.add_namespace(ns)

    def add_pod(
        self,
        ns: str,
        name: str,
        labels: dict[str, str] | None = None,
        containers: list[Obj] | None = None,
        netns: str | None = None,
        phase: str = "Running",
        ready: bool = True,
        node_os: str = "linux",
        pod_ip: str | None = None,
    ) -> Obj:
        self._ensure_namespace(ns)
        containers = copy.deepcopy(containers or [{"name": "app", "image": "nginx:1.27"}])
        if pod_ip is None and netns is not None:
            pod_ip = netns_ipv4(netns)
        pod = objects.pod(ns, name, labels, containers, phase, ready, node_os, pod_ip)
        self.settings.netns[(ns, name)] = netns
        owner = self._owner_for(ns, pod["metadata"]["labels"])
        if owner is not None:
            self._adopt(pod, owner)
        created = self.store.create(BY_KIND["Pod"], pod)
        if netns is not None and pod_ip and phase == "Running" and self._loop is not None:
            # The kubelet probes the pod's containers from the node: real connections to its IP.
            self._loop.call_soon_threadsafe(self._server.kubelet.prober.start, ns, name, pod_ip, containers)
        return created

    def get_pod(self, ns: str, name: str) -> Obj:
        return self.store.get(BY_KIND["Pod"], ns, name)

    def delete_pod(self, ns: str, name: str, grace: float = 0.0) -> None:
        """Delete a pod (DELETED event); its exec'd processes die with its containers.

        With `grace` > 0, as `kubectl delete` with a grace period: first a MODIFIED event with deletionTimestamp
        and the pod no longer Ready (the kubelet is stopping it, its processes still run), then after `grace`
        seconds the DELETED event and the processes gone.
        """
        if grace <= 0:
            self._delete_now(ns, name)
            return
        pod = self.get_pod(ns, name)
        pod["metadata"]["deletionTimestamp"] = now_rfc3339()
        pod["metadata"]["deletionGracePeriodSeconds"] = max(1, round(grace))
        for cond in pod["status"]["conditions"]:
            if cond["type"] in ("Ready", "ContainersReady"):
                cond["status"] = "False"
        for cs in pod["status"]["containerStatuses"]:
            cs["ready"] = False
        self.store.update(BY_KIND["Pod"], pod)
        timer = threading.Timer(grace, self._delete_now, args=(ns, name))
        timer.daemon = True
        self._deletions.append(timer)
        timer.start()

    def restart_container(self, ns: str, name: str, container: str) -> None:
        """The container's process died and the kubelet restarted it; taps that target it die for good."""
        restarts.restart_container(self.store, self._server.processes, ns, name, container)

    def _delete_now(self, ns: str, name: str) -> None:
        try:
            self.store.delete(BY_KIND["Pod"], ns, name)
        except ApiError:
            pass  # already gone
        self._server.processes.kill_pod((ns, name))
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._server.kubelet.prober.stop_pod, ns, name)

    def set_pod_phase(self, ns: str, name: str, phase: str, ready: bool | None = None) -> Obj:
        """Move a pod on (MODIFIED event), e.g. to see a client notice that its target went away."""
        pod = self.get_pod(ns, name)
        pod["status"]["phase"] = phase
        if ready is not None:
            for cond in pod["status"]["conditions"]:
                if cond["type"] in ("Ready", "ContainersReady"):
                    cond["status"] = "True" if ready else "False"
            for cs in pod["status"]["containerStatuses"]:
                cs["ready"] = ready
        if phase in ("Succeeded", "Failed"):
            code = 0 if phase == "Succeeded" else 137
            finished = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                       "finishedAt": now_rfc3339()}}
            for key in ("containerStatuses", "ephemeralContainerStatuses"):
                for cs in pod["status"].get(key, []):
                    cs["state"], cs["ready"], cs["started"] = dict(finished), False, False
            updated = self.store.update(BY_KIND["Pod"], pod)
            self._server.processes.kill_pod((ns, name))  # the containers are gone, so is anything exec'd in them
            return updated
        return self.store.update(BY_KIND["Pod"], pod)

    def _owner_for(self, ns: str, labels: dict[str, str]) -> Obj | None:
        # A pod carrying a pod-template-hash belongs to the ReplicaSet of that hash (a rollout has two of them).
        pth = labels.get("pod-template-hash")
        for rs in self.store.list(BY_KIND["ReplicaSet"], ns)[0] if pth else []:
            selector = rs["spec"]["selector"]["matchLabels"]
            if selector.get("pod-template-hash") == pth and all(labels.get(k) == v for k, v in selector.items()):
                return rs
        for kind in WORKLOAD_KINDS:
            for wl in self.store.list(BY_KIND[kind], ns)[0]:
                selector = wl["spec"]["selector"]["matchLabels"]
                template_only = {k: v for k, v in selector.items() if k != "pod-template-hash"}
                if template_only and all(labels.get(k) == v for k, v in template_only.items()):
                    return wl
        return None

    @staticmethod
    def _adopt(pod: Obj, owner: Obj) -> None:
        meta = pod["metadata"]
        owner = {**owner, "apiVersion": owner.get("apiVersion", BY_KIND[owner.get("kind", "ReplicaSet")].api_version)}
        meta["ownerReferences"] = [objects.owner_ref(owner)]
        pth = owner["spec"]["selector"]["matchLabels"].get("pod-template-hash")
        if pth:  # a ReplicaSet's pods carry its hash label, and its selector requires it
            meta.setdefault("labels", {})["pod-template-hash"] = pth

    def _add_workload(self, kind: str, ns: str, name: str, match_labels: dict[str, str], replicas: int,
                      containers: list[Obj] | None, owner: Obj | None = None) -> Obj:
        self._ensure_namespace(ns)
        obj = objects.workload(kind, ns, name, match_labels, replicas,
                               containers or [{"name": "app", "image": "nginx:1.27"}])
        if owner is not None:
            obj["metadata"]["ownerReferences"] = [objects.owner_ref(owner)]
        created = self.store.create(BY_KIND[kind], obj)
        self._adopt_existing(ns, created)
        return created

    def _adopt_existing(self, ns: str, owner: Obj) -> None:
        selector = {k: v for k, v in owner["spec"]["selector"]["matchLabels"].items() if k != "pod-template-hash"}
        pods = BY_KIND["Pod"]
        with self.store.lock:
            for pod in self.store.list(pods, ns)[0]:
                labels = pod["metadata"].get("labels") or {}
                if pod["metadata"].get("ownerReferences") or not all(labels.get(k) == v for k, v in selector.items()):
                    continue
                self._adopt(pod, owner)
                self.store.update(pods, pod)

    def add_deployment(self, ns: str, name: str, match_labels: dict[str, str], replicas: int = 1,
                       containers: list[Obj] | None = None) -> Obj:
        self._ensure_namespace(ns)
        deploy = self.store.create(BY_KIND["Deployment"], objects.workload(
            "Deployment", ns, name, match_labels, replicas, containers or [{"name": "app", "image": "nginx:1.27"}]))
        pth = objects.template_hash(ns, name)
        rs_labels = {**match_labels, "pod-template-hash": pth}
        rs = objects.workload("ReplicaSet", ns, f"{name}-{pth}", rs_labels, replicas,
                              containers or [{"name": "app", "image": "nginx:1.27"}])
        rs["metadata"]["ownerReferences"] = [objects.owner_ref(deploy)]
        rs["metadata"]["annotations"] = {"deployment.kubernetes.io/revision": "1"}
        created = self.store.create(BY_KIND["ReplicaSet"], rs)
        self._adopt_existing(ns, created)
        return deploy

    def add_replicaset(self, ns: str, name: str, match_labels: dict[str, str], replicas: int = 1,
                       containers: list[Obj] | None = None) -> Obj:
        return self._add_workload("ReplicaSet", ns, name, match_labels, replicas, containers)

    def add_statefulset(self, ns: str, name: str, match_labels: dict[str, str], replicas: int = 1,
                        containers: list[Obj] | None = None) -> Obj:
        return self._add_workload("StatefulSet", ns, name, match_labels, replicas, containers)

    def add_daemonset(self, ns: str, name: str, match_labels: dict[str, str], replicas: int = 1,
                      containers: list[Obj] | None = None) -> Obj:
        return self._add_workload("DaemonSet", ns, name, match_labels, replicas, containers)

    def add_job(self, ns: str, name: str, match_labels: dict[str, str], replicas: int = 1,
                containers: list[Obj] | None = None) -> Obj:
        return self._add_workload("Job", ns, name, match_labels, replicas, containers)

    def add_service(self, ns: str, name: str, selector: dict[str, str] | None, ports: list[Obj]) -> Obj:
        self._ensure_namespace(ns)
        ip = str(ipaddress.ip_address("10.96.0.0") + next(self._svc_ips))
        return self.store.create(BY_KIND["Service"], objects.service(ns, name, selector, copy.deepcopy(ports), ip))

    # -- workload changes and watch faults (see watch.py) ---------------------------------------------------------
    def new_revision(self, ns: str, deployment: str) -> dict[str, str]:
        """A rollout's new ReplicaSet (next revision, its own pod-template-hash): returns the labels its pods carry.

        Pods are added by the test (add_pod with these labels: each needs its own network namespace), made Ready
        with set_pod_phase, and the old ones removed with delete_pod(grace=...), in the order a rollout does it.
        """
        deploy = self.store.get(BY_KIND["Deployment"], ns, deployment)
        uid = deploy["metadata"]["uid"]
        owned = [rs for rs in self.store.list(BY_KIND["ReplicaSet"], ns)[0]
                 if any(ref.get("uid") == uid for ref in rs["metadata"].get("ownerReferences", []))]
        revision = len(owned) + 1
        pth = objects.template_hash(ns, f"{deployment}/{revision}")
        match = {**deploy["spec"]["selector"]["matchLabels"], "pod-template-hash": pth}
        rs = objects.workload("ReplicaSet", ns, f"{deployment}-{pth}", match, deploy["spec"].get("replicas", 1),
                              deploy["spec"]["template"]["spec"]["containers"])
        rs["metadata"]["ownerReferences"] = [objects.owner_ref(deploy)]
        rs["metadata"]["annotations"] = {"deployment.kubernetes.io/revision": str(revision)}
        self.store.create(BY_KIND["ReplicaSet"], rs)
        return match

    def scale(self, kind: str, ns: str, name: str, replicas: int) -> Obj:
        """Set spec.replicas (the test adds or deletes the pods themselves: each needs its own network namespace)."""
        obj = self.store.get(BY_KIND[kind], ns, name)
        obj["spec"]["replicas"] = replicas
        return self.store.update(BY_KIND[kind], obj)

    def compact(self) -> str:
        """etcd compaction: a watch resuming from any resourceVersion before now gets 410 Expired."""
        return self.store.compact()

    def expire_watches(self) -> int:
        """End every open watch with an ERROR event carrying 410 Expired; returns how many there were."""
        return self.store.expire_watchers(f"too old resource version: 1 ({self.store.current_rv()})")

    @property
    def bookmark_every(self) -> float:
        return self._server.watch_settings.bookmark_every

    @bookmark_every.setter
    def bookmark_every(self, value: float) -> None:
        self._server.watch_settings.bookmark_every = value


def listen_socket(port: int) -> socket.socket:
    """A socket bound to 127.0.0.1:`port` (0: any free port), ready for the server to listen on."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # SO_REUSEADDR: after a restart the port's old connections linger in TIME_WAIT, which must not stop it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            return sock
        except OSError as exc:
            sock.close()
            # While the server was down, an outgoing connection elsewhere may have been given this port as its
            # local one; wait (bounded) for it to go rather than fail the restart at once.
            if port == 0 or time.monotonic() >= deadline:
                raise RuntimeError(f"the fake API server cannot bind 127.0.0.1:{port}: {exc}") from exc
            time.sleep(0.1)


def netns_ipv4(netns: str) -> str | None:
    """The first global IPv4 address inside a network namespace, which is what the pod's IP would be."""
    try:
        out = subprocess.run(["ip", "-n", netns, "-4", "-o", "addr", "show", "scope", "global"],
                             capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    return None
