"""Tap injection against the test API server: the spec, reuse, races, Pod Security and every failure."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubectl_mirror import tap as tapmod
from kubectl_mirror.errors import ClusterError
from kubectl_mirror.kubeconfig import Connection
from kubectl_mirror.tap import DEFAULT_IMAGE, Tap, ensure_tap, find_taps
from kubectl_mirror.target import PodTarget
from tests.apiserver import FakeCluster
from tests.apiserver.resources import BY_KIND
from tests.kube_fixtures import connection

IMAGE = "registry.example/tap:1.0"


@pytest.fixture
def fc(tmp_path: Path) -> Iterator[FakeCluster]:
    with FakeCluster(tmp_path) as cluster:
        cluster.tap_start_delay = 0.05
        yield cluster


def target(fc: FakeCluster, ns: str = "default", name: str = "web-1", **pod: Any) -> PodTarget:
    fc.add_pod(ns, name, containers=[{"name": "app", "image": "nginx"}, {"name": "side", "image": "envoy"}], **pod)
    return PodTarget(ns, name, "app", 80, None, "10.0.0.1", "node-linux-1")


def inject(conn: Connection, t: PodTarget, image: str = IMAGE, timeout: float = 20.0) -> Tap:
    return ensure_tap(conn, t, image=image, pull_policy="IfNotPresent", timeout=timeout)


def ephemeral(fc: FakeCluster, t: PodTarget) -> list[dict[str, Any]]:
    return list(fc.get_pod(t.namespace, t.pod)["spec"].get("ephemeralContainers") or [])


def terminate(fc: FakeCluster, t: PodTarget, name: str, code: int = 137) -> None:
    """Kill the tap as a node would; waits (bounded) for the kubelet to have reported it at all."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with fc.store.lock:
            pod = fc.get_pod(t.namespace, t.pod)
            statuses = [s for s in pod["status"].get("ephemeralContainerStatuses") or [] if s["name"] == name]
            if statuses:
                statuses[0]["state"] = {"terminated": {"exitCode": code, "reason": "Error"}}
                fc.store.update(BY_KIND["Pod"], pod)
                return
        time.sleep(0.02)
    raise AssertionError(f"tap {name} never got a status")


def test_spec_is_least_privilege(fc: FakeCluster, conn: Connection) -> None:
    t = target(fc)
    tap = inject(conn, t)
    assert tap == Tap("default", "web-1", "mirror-tap", IMAGE, "app", fallback=False, reused=False,
                      can_switch_user=True)
    [ec] = ephemeral(fc, t)
    assert ec["name"] == "mirror-tap"
    assert ec["image"] == IMAGE
    assert ec["imagePullPolicy"] == "IfNotPresent"
    assert ec["targetContainerName"] == "app"
    assert ec["command"] == ["sleep", "2147483647"]
    sc = ec["securityContext"]
    # NET_RAW opens the capture; SETUID/SETGID let Debian's tcpdump drop root after that; KILL stops it then.
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_RAW", "SETUID", "SETGID", "KILL"]}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not sc.get("privileged")
    spec = fc.get_pod("default", "web-1")["spec"]
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    status = fc.get_pod("default", "web-1")["status"]["ephemeralContainerStatuses"]
    assert "running" in status[0]["state"]


def test_default_image_is_digest_pinned() -> None:
    assert "@sha256:" in DEFAULT_IMAGE and len(DEFAULT_IMAGE.rsplit(":", 1)[1]) == 64


def test_running_tap_is_reused_not_stacked(fc: FakeCluster, conn: Connection) -> None:
    t = target(fc)
    first = inject(conn, t)
    second = inject(conn, t)
    assert (second.name, second.reused) == (first.name, True)
    assert len(ephemeral(fc, t)) == 1


def test_terminated_tap_gets_next_name(fc: FakeCluster, conn: Connection) -> None:
    t = target(fc)
    inject(conn, t)
    terminate(fc, t, "mirror-tap")
    assert inject(conn, t).name == "mirror-tap-2"
    terminate(fc, t, "mirror-tap-2")
    assert inject(conn, t).name == "mirror-tap-3"
    assert [ec["name"] for ec in ephemeral(fc, t)] == ["mirror-tap", "mirror-tap-2", "mirror-tap-3"]
    infos = {i.name: i for i in find_taps(conn, "default", "web-1")}
    assert infos["mirror-tap"].state == "terminated" and "exit code 137" in infos["mirror-tap"].detail
    assert infos["mirror-tap-3"].state == "running"
    assert infos["mirror-tap-3"].target_container == "app"


def test_conflict_rereads_and_converges(fc: FakeCluster, conn: Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    t = target(fc)
    stale = tapmod._read_pod(conn, "default", "web-1")  # what a run saw just before another run added its tap
    other = inject(connection(fc), t)
    real_read = tapmod._read_pod
    reads: list[str] = []

    def read_once_stale(c: Connection, ns: str, pod: str) -> Any:
        reads.append(pod)
        return stale if len(reads) == 1 else real_read(c, ns, pod)

    monkeypatch.setattr(tapmod, "_read_pod", read_once_stale)
    mine = inject(conn, t)
    assert (mine.name, mine.reused) == (other.name, True)
    assert len(reads) >= 2  # the 409 made it read again
    assert len(ephemeral(fc, t)) == 1
    patches = [p for m, p in fc.requests if m == "PATCH"]
    assert len(patches) == 2  # ours was sent and refused, not skipped


def test_two_concurrent_runs_converge(fc: FakeCluster) -> None:
    t = target(fc)
    fc.tap_start_delay = 0.3
    start = threading.Barrier(2, timeout=10)
    results: list[Tap] = []
    errors: list[BaseException] = []

    def run() -> None:
        c = connection(fc)
        try:
            start.wait()
            results.append(inject(c, t))
        except BaseException as exc:
            errors.append(exc)
        finally:
            c.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors
    assert len(results) == 2 and results[0].name == results[1].name == "mirror-tap"
    assert len(ephemeral(fc, t)) == 1


def test_baseline_falls_back_to_default_capabilities(fc: FakeCluster, conn: Connection) -> None:
    fc.add_namespace("base", labels={"pod-security.kubernetes.io/enforce": "baseline"})
    t = target(fc, ns="base")
    tap = inject(conn, t)
    assert tap.fallback is True
    [ec] = ephemeral(fc, t)
    sc = ec["securityContext"]
    # Baseline forbids adding NET_RAW: the runtime's own is kept, every other default the tap has no use for goes.
    assert sc["capabilities"] == {"drop": ["AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "MKNOD",
                                           "NET_BIND_SERVICE", "SETFCAP", "SETPCAP", "SYS_CHROOT"],
                                  "add": ["SETUID", "SETGID", "KILL"]}
    assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged")
    assert [i.fallback for i in find_taps(conn, "base", "web-1")] == [True]
    # A later run reuses the fallback tap and says so.
    assert inject(conn, t).fallback is True


def test_restricted_names_the_label(fc: FakeCluster, conn: Connection) -> None:
    fc.add_namespace("locked", labels={"pod-security.kubernetes.io/enforce": "restricted"})
    t = target(fc, ns="locked")
    with pytest.raises(ClusterError) as err:
        inject(conn, t)
    msg = str(err.value)
    assert msg.startswith('namespace "locked" enforces Pod Security "restricted" '
                          "(label pod-security.kubernetes.io/enforce=restricted)")
    assert "kubectl label namespace locked pod-security.kubernetes.io/enforce=baseline --overwrite" in msg
    assert "\n" not in msg
    assert ephemeral(fc, t) == []


def test_no_ephemeral_containers(fc: FakeCluster, conn: Connection) -> None:
    t = target(fc)
    fc.fail_no_ephemeral_containers()
    with pytest.raises(ClusterError) as err:
        inject(conn, t)
    assert str(err.value) == "this cluster does not support ephemeral containers (Kubernetes >= 1.23 needed)"


@pytest.mark.parametrize(("verb", "resource", "sub", "expected"), [
    ("patch", "pods", "ephemeralcontainers", 'cannot patch pods/ephemeralcontainers in namespace "default"'),
    ("get", "pods", "", 'cannot get pods in namespace "default"'),
    ("watch", "pods", "", 'cannot watch pods in namespace "default"'),
])
def test_forbidden(fc: FakeCluster, conn: Connection, verb: str, resource: str, sub: str, expected: str) -> None:
    t = target(fc)
    fc.fail_forbidden(verb=verb, resource=resource, subresource=sub)
    with pytest.raises(ClusterError) as err:
        inject(conn, t)
    assert str(err.value).startswith(f"forbidden: {expected}; ask your cluster admin for RBAC")


def test_image_pull_failure(fc: FakeCluster, conn: Connection) -> None:
    t = target(fc)
    fc.fail_image_pull("bad.example/")
    with pytest.raises(ClusterError) as err:
        inject(conn, t, image="bad.example/tcpdump:1")
    msg = str(err.value)
    assert msg.startswith("cannot pull the tap image bad.example/tcpdump:1 on node node-linux-1 (ErrImagePull")
    assert "\n" not in msg
    # A later run with an image that works does not reuse the stuck tap.
    assert inject(conn, t).name == "mirror-tap-2"


def test_pod_not_running(fc: FakeCluster, conn: Connection) -> None:
    t = target(fc, phase="Pending")
    with pytest.raises(ClusterError, match=r"pod web-1 is not running \(Pending"):
        inject(conn, t)


def test_start_timeout(fc: FakeCluster, conn: Connection) -> None:
    t = target(fc)
    fc.tap_start_delay = 30
    # The state named is the last one seen: ContainerCreating, unless a loaded machine delays even that.
    with pytest.raises(ClusterError, match=r"the tap in pod web-1 did not start within 0\.5s "
                                           r"\((ContainerCreating|no status yet)\); see kubectl describe pod web-1"):
        inject(conn, t, timeout=0.5)


def test_tap_terminated_while_waiting(fc: FakeCluster, conn: Connection) -> None:
    t = target(fc)
    fc.tap_start_delay = 30
    timer = threading.Timer(0.1, lambda: terminate(fc, t, "mirror-tap", code=2))
    timer.start()
    try:
        with pytest.raises(ClusterError, match=r"the tap container mirror-tap in pod web-1 exited \(exit code 2, "
                                               r"reason Error\)"):
            inject(conn, t)
    finally:
        timer.cancel()
