"""Why a capture would not start, from the real tcpdump's real stderr in a tap run under its securityContext.

The test API server runs Debian's tcpdump (built --with-user=tcpdump: it drops root after opening the capture)
with exactly the capabilities the tap's securityContext and the runtime's defaults give it, so each message
here comes from the words tcpdump printed, as it would on a node.
"""

from __future__ import annotations

import copy
import pwd
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubectl_mirror import tap as tapmod
from kubectl_mirror.errors import ClusterError, MirrorError, UsageError
from kubectl_mirror.execstream import start_capture, stop_remote
from kubectl_mirror.kubeconfig import Connection
from kubectl_mirror.tap import Tap, ensure_tap
from kubectl_mirror.target import PodTarget
from kubectl_mirror.tcpdump_failure import PrivilegeDropError
from tests.apiserver import FakeCluster, PodNetns
from tests.apiserver.resources import BY_KIND
from tests.apiserver.securitycontext import CRIO_DEFAULT_CAPS

pytestmark = pytest.mark.netns

IMAGE = "registry.example/tap:1"
_USER = pwd.getpwnam("tcpdump")  # Debian's tcpdump switches to this user right after opening the capture
REFUSED = f"tcpdump: Couldn't change to 'tcpdump' uid={_USER.pw_uid} gid={_USER.pw_gid}: Operation not permitted"
SPEC_HINT = ("kubectl get pod web-1 -n {ns} -o jsonpath='{{.spec.ephemeralContainers[?(@.name==\"mirror-tap\")]"
             ".securityContext}}'")


@pytest.fixture
def pod() -> Iterator[PodNetns]:
    with PodNetns() as netns:
        yield netns


@pytest.fixture
def fc(tmp_path: Path, pod: PodNetns) -> Iterator[FakeCluster]:
    with FakeCluster(tmp_path) as cluster:
        cluster.tap_start_delay = 0.05
        cluster.add_namespace("shop", labels={tapmod.PSA_ENFORCE: "baseline"})
        for ns in ("default", "shop"):
            cluster.add_pod(ns, "web-1", containers=[{"name": "app", "image": "nginx"}], netns=pod.name)
        yield cluster


def target(pod: PodNetns, ns: str = "default") -> PodTarget:
    return PodTarget(ns, "web-1", "app", 8080, None, pod.ip, "node-linux-1")


def add_tap(conn: Connection, t: PodTarget, caps: dict[str, Any]) -> Tap:
    """A tap with these capabilities (as an earlier version, or a policy, would have left it), then found running."""
    spec = tapmod.tap_spec("mirror-tap", IMAGE, "IfNotPresent", t.container, fallback=False)
    spec["securityContext"]["capabilities"] = caps
    tapmod._patch(conn, tapmod._read_pod(conn, t.namespace, t.pod), spec)
    return ensure_tap(conn, t, image=IMAGE, pull_policy="IfNotPresent", timeout=20)


def capture_error(conn: Connection, t: PodTarget, tap: Tap, **kwargs: Any) -> MirrorError:
    with pytest.raises(MirrorError) as err:
        start_capture(conn, t, tap, ready_timeout=20.0, **kwargs)
    assert "\n" not in err.value.message
    return err.value


def no_tcpdump_left(fc: FakeCluster) -> bool:
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any("tcpdump" in argv for _, argv in fc.exec_processes()):
        time.sleep(0.05)
    return not any("tcpdump" in argv for _, argv in fc.exec_processes())


def test_privilege_drop_refused_in_a_tap_of_an_earlier_version(
        fc: FakeCluster, conn: Connection, pod: PodNetns) -> None:
    t = target(pod)
    tap = add_tap(conn, t, {"drop": ["ALL"], "add": ["NET_RAW"]})
    assert (tap.reused, tap.can_switch_user) == (True, False)
    err = capture_error(conn, t, tap)
    assert isinstance(err, PrivilegeDropError)
    assert err.message == (
        "tcpdump in pod web-1 (tap mirror-tap) opened the capture but could not switch to its unprivileged user "
        f"({REFUSED}): the tap was added by an earlier kubectl-mirror without SETUID and SETGID, and ephemeral "
        "containers cannot be changed; run again to add a tap that has them")
    assert no_tcpdump_left(fc)


def test_privilege_drop_refused_although_the_spec_asked(fc: FakeCluster, conn: Connection, pod: PodNetns) -> None:
    # What the plugin asked for is not what the tap's processes hold: a mutating policy removed SETGID.
    t = target(pod)
    tap = ensure_tap(conn, t, image=IMAGE, pull_policy="IfNotPresent", timeout=20)
    mutate_caps(fc, t, {"drop": ["ALL"], "add": ["NET_RAW", "SETUID", "KILL"]})
    err = capture_error(conn, t, tap)
    assert isinstance(err, PrivilegeDropError)
    assert err.message.endswith(
        f"{REFUSED}): kubectl-mirror asked for SETUID and SETGID in the tap's "
        f"securityContext, yet its processes lack them; compare with {SPEC_HINT.format(ns='default')}, or use an "
        "--image whose tcpdump keeps root (Alpine's, like the default)"), err.message


def test_net_raw_missing_under_baseline_on_a_runtime_without_it(
        fc: FakeCluster, conn: Connection, pod: PodNetns) -> None:
    # CRI-O (>= 1.18) no longer grants NET_RAW by default, and baseline forbids adding it.
    fc.runtime_default_caps = CRIO_DEFAULT_CAPS
    t = target(pod, "shop")
    tap = ensure_tap(conn, t, image=IMAGE, pull_policy="IfNotPresent", timeout=20)
    assert tap.fallback
    err = capture_error(conn, t, tap)
    assert type(err) is ClusterError
    assert err.message == (
        "tcpdump in pod web-1 (tap mirror-tap) may not capture (tcpdump: any: You don't have permission to perform "
        "this capture on that device (socket: Operation not permitted)): the tap's processes lack NET_RAW; Pod "
        "Security forbids adding it in namespace shop and this node's container runtime does not grant it by "
        "default; ask an admin to allow it, e.g. kubectl label namespace shop "
        "pod-security.kubernetes.io/enforce=privileged --overwrite")


def test_net_raw_missing_although_the_spec_asked(fc: FakeCluster, conn: Connection, pod: PodNetns) -> None:
    t = target(pod)
    tap = ensure_tap(conn, t, image=IMAGE, pull_policy="IfNotPresent", timeout=20)
    mutate_caps(fc, t, {"drop": ["ALL", "NET_RAW"], "add": ["SETUID", "SETGID", "KILL"]})
    err = capture_error(conn, t, tap)
    assert err.message.endswith(
        "(socket: Operation not permitted)): the tap's processes lack NET_RAW; kubectl-mirror asked for it in the "
        f"tap's securityContext; compare with {SPEC_HINT.format(ns='default')}"), err.message


@pytest.mark.parametrize("user_filter,said", [
    ("port and and", "tcpdump: can't parse filter expression: syntax error"),
    ("tcp port 99999", "tcpdump: illegal port number 99999 > 65535"),
])
def test_filter_rejected(fc: FakeCluster, conn: Connection, pod: PodNetns, user_filter: str, said: str) -> None:
    t = target(pod)
    tap = ensure_tap(conn, t, image=IMAGE, pull_policy="IfNotPresent", timeout=20)
    err = capture_error(conn, t, tap, user_filter=user_filter)
    assert type(err) is UsageError
    assert err.message == f"tcpdump rejected the capture filter: {said}; check the --filter expression " \
                          "(pcap-filter syntax)"
    assert no_tcpdump_left(fc)


def test_interface_missing(fc: FakeCluster, conn: Connection, pod: PodNetns) -> None:
    t = target(pod)
    tap = ensure_tap(conn, t, image=IMAGE, pull_policy="IfNotPresent", timeout=20)
    err = capture_error(conn, t, tap, interface="nosuch0")
    assert err.message == (
        "tcpdump in pod web-1 (tap mirror-tap) found no interface nosuch0 (tcpdump: nosuch0: No such device exists "
        "(No such device exists)); list the pod's interfaces with kubectl exec web-1 -n default -c mirror-tap -- "
        "cat /proc/net/dev")


def test_a_tap_without_kill_says_it_cannot_stop_the_tcpdump(fc: FakeCluster, conn: Connection,
                                                            pod: PodNetns) -> None:
    # tcpdump runs as its own user once capturing: root in the tap may signal it only with CAP_KILL.
    t = target(pod)
    tap = add_tap(conn, t, {"drop": ["ALL"], "add": ["NET_RAW", "SETUID", "SETGID"]})
    proc = start_capture(conn, t, tap)
    pid = proc.remote_pid
    try:
        with pytest.raises(ClusterError) as err:
            stop_remote(conn, t, tap, proc)
        assert err.value.message == (
            f"tap mirror-tap in pod web-1 may not stop tcpdump (pid {pid}): kill says Operation not permitted, since "
            "tcpdump switched to its own user and the tap lacks KILL; it captures until the pod is deleted")
    finally:
        proc.close()


def mutate_caps(fc: FakeCluster, t: PodTarget, caps: dict[str, Any]) -> None:
    """What a mutating admission policy does to the tap's spec before the kubelet starts it."""
    with fc.store.lock:
        obj = copy.deepcopy(fc.get_pod(t.namespace, t.pod))
        obj["spec"]["ephemeralContainers"][0]["securityContext"]["capabilities"] = caps
        fc.store.update(BY_KIND["Pod"], obj)
