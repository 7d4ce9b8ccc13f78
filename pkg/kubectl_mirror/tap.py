"""The tap: an ephemeral container in the target pod that can capture packets, and nothing more.

Ephemeral containers can never be removed from a pod, so a tap is reused whenever one is still running; a
terminated one keeps its name forever, so the next tap gets the next free name (mirror-tap-2, ...).
Concurrent runs converge on one tap through optimistic concurrency: the patch carries the resourceVersion it
was computed from, the loser gets 409 Conflict, re-reads and finds the winner's tap.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .cluster import call, watch
from .errors import ApiError, ClusterError, Conflict, Forbidden, Invalid, NotFound, Unreachable, UsageError
from .kubeconfig import Connection
from .target import ContainerStatus, Pod, PodTarget

# nicolaka/netshoot v0.11 pinned by digest: it ships tcpdump, sh, kill and sleep in one widely mirrored image
# (what `kubectl debug` guides use), and the digest keeps a moved tag from changing what runs next to prod pods.
DEFAULT_IMAGE = (
    "docker.io/nicolaka/netshoot:v0.11@sha256:a7c92e1a2fb9287576a16e107166fee7f9925e15d2c1a683dbb1f4370ba9bfe8"
)
DEFAULT_NAME = "mirror-tap"
# Idles without a shell; any sleep (coreutils or busybox) takes a plain number, not all take "infinity".
IDLE_COMMAND = ["sleep", "2147483647"]
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
MAX_NAMES = 20  # mirror-tap .. mirror-tap-20: past that, something keeps killing taps
MAX_ATTEMPTS = 8  # 409 re-reads and the one Pod Security fallback
_IMAGE_PULL = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable"}
PSA_ENFORCE = "pod-security.kubernetes.io/enforce"


@dataclass(frozen=True, slots=True)
class Tap:
    namespace: str
    pod: str
    name: str
    image: str
    target_container: str
    # True when Pod Security (baseline) refused NET_RAW and the tap runs with the runtime's default capabilities.
    fallback: bool
    reused: bool  # an existing running tap was found and used
    # False for a tap an earlier version added (NET_RAW only): a privilege-dropping tcpdump fails in it.
    can_switch_user: bool = True


@dataclass(frozen=True, slots=True)
class TapInfo:
    name: str
    image: str
    target_container: str
    state: str  # running, waiting, terminated
    detail: str  # waiting reason, or exit code and reason
    fallback: bool
    can_switch_user: bool = True


# What tcpdump needs, and nothing more: NET_RAW opens the capture; SETUID and SETGID let a tcpdump built
# --with-user (Debian, Ubuntu, Fedora, RHEL) switch to its unprivileged user right after (initgroups, setgid,
# setuid), which it insists on: it exits when it cannot; KILL lets the plugin's `kill` (as root) stop that
# tcpdump once it runs as another user. Pod Security "baseline" allows adding all but NET_RAW.
TAP_CAPS = ("NET_RAW", "SETUID", "SETGID", "KILL")
# The runtime's default capabilities (containerd's; CRI-O's are a subset) that the tap does not need: the
# Pod Security fallback drops them and keeps only the runtime's NET_RAW.
_UNNEEDED_DEFAULTS = ("AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "MKNOD", "NET_BIND_SERVICE",
                      "SETFCAP", "SETPCAP", "SYS_CHROOT")


def tap_spec(name: str, image: str, pull_policy: str, target_container: str, *, fallback: bool) -> dict[str, Any]:
    """The ephemeral container. Never privileged, no host namespaces (those are pod-level and untouched).

    The process runs as uid 0 because a non-root process cannot hold NET_RAW in its effective set without
    ambient capabilities, which the pod API cannot grant; with every other capability dropped, root here is
    only as strong as TAP_CAPS.
    """
    security: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "privileged": False,
        "runAsUser": 0,
        "runAsNonRoot": False,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if not fallback:
        security["capabilities"] = {"drop": ["ALL"], "add": list(TAP_CAPS)}
    else:
        # Pod Security "baseline" forbids adding NET_RAW but not keeping the runtime's default one (containerd
        # grants it to root; CRI-O >= 1.18 does not, and then no tap can capture in such a namespace).
        security["capabilities"] = {"drop": list(_UNNEEDED_DEFAULTS), "add": [c for c in TAP_CAPS if c != "NET_RAW"]}
    return {
        "name": name,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": list(IDLE_COMMAND),
        "targetContainerName": target_container,
        "stdin": False,
        "tty": False,
        "securityContext": security,
    }


def _is_fallback(spec: dict[str, Any]) -> bool:
    caps = (spec.get("securityContext") or {}).get("capabilities") or {}
    return "NET_RAW" not in (caps.get("add") or [])


def can_switch_user(spec: dict[str, Any]) -> bool:
    """Whether a tap with this spec holds CAP_SETUID and CAP_SETGID (runtimes grant both by default).

    False for the taps of kubectl-mirror <= 0.1 (drop ALL, add NET_RAW): a tcpdump that drops root cannot run there.
    """
    caps = (spec.get("securityContext") or {}).get("capabilities") or {}
    add, drop = set(caps.get("add") or []), set(caps.get("drop") or [])
    return all(cap not in drop and (cap in add or "ALL" not in drop) for cap in ("SETUID", "SETGID"))


def _status_of(pod: Pod, name: str) -> ContainerStatus | None:
    return next((s for s in pod.status.ephemeral_container_statuses if s.name == name), None)


def _candidates(base: str) -> list[str]:
    return [base] + [f"{base}-{i}" for i in range(2, MAX_NAMES + 1)]


def _can_run(pod: Pod, name: str, spec: dict[str, Any], image: str) -> bool:
    status = _status_of(pod, name)
    if status is None or status.state.running is not None:
        return True  # running, or just added by a concurrent run: converge on it
    if status.state.terminated is not None:
        return False  # dead forever
    waiting = (status.state.waiting or {}).get("reason", "")
    return not (waiting in _IMAGE_PULL and spec.get("image") != image)  # stuck on an image this run does not use


def _choose(pod: Pod, base: str, image: str, *, avoid_legacy: bool) -> tuple[str, dict[str, Any] | None]:
    """(name, existing spec): the first tap that can still run, else the first free name.

    A tap of an earlier version (NET_RAW only) is chosen only while no newer one can run beside it: a newer one
    exists because the old one's tcpdump could not drop privileges, so every later run must skip the old one
    rather than fail on it and add yet another tap.
    """
    existing = {str(ec.get("name")): ec for ec in pod.spec.ephemeral_containers}
    names = _candidates(base)
    live = [(n, existing[n]) for n in names if n in existing and _can_run(pod, n, existing[n], image)]
    if avoid_legacy or any(can_switch_user(spec) for _, spec in live):
        live = [(n, spec) for n, spec in live if can_switch_user(spec)]
    if live:
        return live[0]
    free = next((n for n in names if n not in existing), None)
    if free is None:
        raise ClusterError(f"pod {pod.metadata.name} already has {MAX_NAMES} taps that cannot capture ({base} .. "
                           f"{base}-{MAX_NAMES}); something kills them: check kubectl describe pod "
                           f"{pod.metadata.name}")
    return free, None


POD_PATH = "/api/v1/namespaces/{namespace}/pods/{name}"


def _read_pod(conn: Connection, namespace: str, pod: str) -> Pod:
    return Pod.model_validate(call(conn, "GET", POD_PATH, {"namespace": namespace, "name": pod}))


def _patch(conn: Connection, pod: Pod, spec: dict[str, Any]) -> Pod:
    body = {
        # resourceVersion turns the patch into a compare-and-swap: a concurrent tap makes this one 409.
        "metadata": {"resourceVersion": pod.metadata.resource_version},
        "spec": {"ephemeralContainers": [spec]},
    }
    patched = call(conn, "PATCH", POD_PATH + "/ephemeralcontainers",
                   {"namespace": pod.metadata.namespace, "name": pod.metadata.name}, body=body,
                   content_type="application/strategic-merge-patch+json")
    return Pod.model_validate(patched)


def _lost_race(err: Invalid) -> bool:
    """A 422 that says an ephemeral container already in the pod would change: a concurrent run added its tap
    first on a server that ignored our resourceVersion. The API server reports it on the list as a whole
    (spec.ephemeralContainers, FieldValueForbidden); a refused field of our own tap names its index."""
    return any(c.reason == "FieldValueForbidden" and c.field == "spec.ephemeralContainers" for c in err.causes)


def _namespace_label(conn: Connection, namespace: str) -> str | None:
    try:
        ns = call(conn, "GET", "/api/v1/namespaces/{name}", {"name": namespace})
    except ClusterError:
        return None  # reading namespaces is often not allowed: the admission message is enough
    labels = (ns.get("metadata") or {}).get("labels") or {}
    value = labels.get(PSA_ENFORCE)
    return str(value) if value else None


def _restricted_error(conn: Connection, namespace: str, level: str) -> ClusterError:
    label = _namespace_label(conn, namespace) or level
    return ClusterError(
        f'namespace "{namespace}" enforces Pod Security "{level}" (label {PSA_ENFORCE}={label}), which forbids '
        "any container that can capture packets (NET_RAW, or root with default capabilities); ask an admin to "
        f"allow it, e.g. kubectl label namespace {namespace} {PSA_ENFORCE}=baseline --overwrite")


def ensure_tap(conn: Connection, target: PodTarget, *, image: str, pull_policy: str, timeout: float,
               name: str = DEFAULT_NAME, avoid_legacy: bool = False) -> Tap:
    """A running tap in target's pod, sharing the target container's namespaces: reused, or added and awaited.

    `avoid_legacy`: never reuse a tap of an earlier version (NET_RAW only), add a new one instead.
    """
    if pull_policy not in PULL_POLICIES:
        raise UsageError(f"invalid pull policy {pull_policy!r}: use one of {', '.join(PULL_POLICIES)}")
    deadline = time.monotonic() + timeout
    ns, pod_name = target.namespace, target.pod
    fallback = False
    tap: Tap | None = None
    pod: Pod | None = None
    for _ in range(MAX_ATTEMPTS):
        pod = _read_pod(conn, ns, pod_name)
        if pod.status.phase != "Running" or pod.metadata.deletion_timestamp:
            raise ClusterError(f"pod {pod_name} is not running ({pod.describe_state()}); pick a running pod")
        tap_name, existing = _choose(pod, name, image, avoid_legacy=avoid_legacy)
        if existing is not None:
            tap = Tap(ns, pod_name, tap_name, str(existing.get("image", image)),
                      str(existing.get("targetContainerName") or target.container), _is_fallback(existing), True,
                      can_switch_user(existing))
            break
        spec = tap_spec(tap_name, image, pull_policy, target.container, fallback=fallback)
        try:
            pod = _patch(conn, pod, spec)
        except Conflict:
            continue  # another run changed the pod first: re-read, probably to find its tap
        except Invalid as err:
            if _lost_race(err):
                continue  # same race on a server that ignored resourceVersion
            raise
        except NotFound as err:
            if not err.served:  # the server has no ephemeralcontainers subresource at all
                raise ClusterError("this cluster does not support ephemeral containers "
                                   "(Kubernetes >= 1.23 needed)") from None
            raise ClusterError(f'pod "{pod_name}" disappeared from namespace "{ns}" while adding the tap') from None
        except Forbidden as err:
            if err.pod_security is None:
                raise  # RBAC: its message names the verb and resource to ask for
            if err.pod_security == "baseline" and not fallback:
                fallback = True
                continue
            raise _restricted_error(conn, ns, err.pod_security) from None
        tap = Tap(ns, pod_name, tap_name, image, target.container, fallback, False)
        break
    if tap is None or pod is None:
        raise ClusterError(f"pod {pod_name} kept changing while adding the tap; try again")
    _wait_running(conn, tap, pod, deadline, timeout)
    return tap


def _check(tap: Tap, pod: Pod) -> bool:
    """True once the tap runs; raises for the states it will not leave."""
    if pod.metadata.deletion_timestamp:
        raise ClusterError(f"pod {tap.pod} is being deleted; pick another pod")
    status = _status_of(pod, tap.name)
    if status is None:
        return False
    if status.state.running is not None:
        return True
    if status.state.terminated is not None:
        t = status.state.terminated
        raise ClusterError(f"the tap container {tap.name} in pod {tap.pod} exited (exit code {t.get('exitCode')}, "
                           f"reason {t.get('reason') or 'unknown'}); run again to start a new tap")
    waiting = status.state.waiting or {}
    if waiting.get("reason") in _IMAGE_PULL:
        detail = str(waiting.get("message") or "").splitlines()[0:1]
        raise ClusterError(f"cannot pull the tap image {tap.image} on node {pod.spec.node_name} "
                           f"({waiting['reason']}{': ' + detail[0] if detail else ''}); use an image the "
                           "cluster can pull")
    return False


def _waiting_reason(tap: Tap, pod: Pod | None) -> str:
    status = _status_of(pod, tap.name) if pod is not None else None
    if status is None:
        return "no status yet"
    return str((status.state.waiting or {}).get("reason") or "waiting")


def _wait_running(conn: Connection, tap: Tap, pod: Pod, deadline: float, timeout: float) -> None:
    """Watch the pod until the tap runs, fails, or the deadline passes."""
    last: Pod | None = pod
    for _ in range(1000):  # each round is one watch request; rounds end early only on server timeouts
        if last is not None and _check(tap, last):
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        rv = last.metadata.resource_version if last is not None else ""
        query = [("fieldSelector", f"metadata.name={tap.pod}"), ("watch", "true"),
                 ("timeoutSeconds", str(max(1, int(remaining) + 1))), ("allowWatchBookmarks", "false")]
        if rv:
            query.append(("resourceVersion", rv))
        try:
            events = watch(conn, "/api/v1/namespaces/{namespace}/pods", {"namespace": tap.namespace}, query,
                           timeout=(min(remaining, 30.0), remaining))
        except ApiError as err:
            if err.status == 410:  # the resourceVersion expired: read the pod again
                last = _read_pod(conn, tap.namespace, tap.pod)
                continue
            raise
        except Unreachable:
            if time.monotonic() >= deadline:
                break  # the read timed out: that is our deadline
            raise
        try:
            last = _follow(tap, events.lines(), deadline)
        finally:
            events.close()
        if last is None:
            last = _read_pod(conn, tap.namespace, tap.pod)
    raise ClusterError(f"the tap in pod {tap.pod} did not start within {timeout:g}s ({_waiting_reason(tap, last)}); "
                       f"see kubectl describe pod {tap.pod} -n {tap.namespace}")


def _follow(tap: Tap, lines: Iterator[bytes], deadline: float) -> Pod | None:
    """Read watch events; return the last pod seen (None to re-read after an expired watch)."""
    last: Pod | None = None
    try:
        for raw in lines:
            event = json.loads(raw)
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                return None  # usually 410 Gone: start over from a fresh read
            if kind == "DELETED":
                raise ClusterError(f"pod {tap.pod} was deleted while waiting for the tap")
            last = Pod.model_validate(obj)
            if _check(tap, last):
                return last
            if time.monotonic() >= deadline:
                return last
    except ClusterError:
        if time.monotonic() >= deadline:
            return last
        raise
    return last



def tap_ended(conn: Connection, tap: Tap) -> str | None:
    """How the tap terminated ("exit code 137, Error"), or None while it has not (or the pod cannot be read)."""
    try:
        pod = _read_pod(conn, tap.namespace, tap.pod)
    except ClusterError:
        return None
    status = _status_of(pod, tap.name)
    if status is None or status.state.terminated is None:
        return None
    t = status.state.terminated
    return f"exit code {t.get('exitCode')}, {t.get('reason') or 'unknown'}"


def find_taps(conn: Connection, namespace: str, pod: str, *, name: str = DEFAULT_NAME) -> list[TapInfo]:
    """Every tap this tool added to the pod (running or not), for `status`."""
    p = _read_pod(conn, namespace, pod)
    wanted = set(_candidates(name))
    out: list[TapInfo] = []
    for spec in p.spec.ephemeral_containers:
        tap_name = str(spec.get("name"))
        if tap_name not in wanted:
            continue
        status = _status_of(p, tap_name)
        state, detail = "waiting", "no status yet"
        if status is not None and status.state.running is not None:
            state, detail = "running", ""
        elif status is not None and status.state.terminated is not None:
            t = status.state.terminated
            state, detail = "terminated", f"exit code {t.get('exitCode')}, {t.get('reason') or 'unknown'}"
        elif status is not None:
            detail = str((status.state.waiting or {}).get("reason") or "waiting")
        out.append(TapInfo(tap_name, str(spec.get("image", "")), str(spec.get("targetContainerName") or ""),
                           state, detail, _is_fallback(spec), can_switch_user(spec)))
    return out
