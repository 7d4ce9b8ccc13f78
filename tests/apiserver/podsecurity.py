"""Pod Security admission (enforce mode) for the checks a capture tap can trip.

Messages follow the real plugin: `violates PodSecurity "LEVEL:VERSION": reason (detail), ...`, one entry per
failing check in check-ID order, with containers pluralized and quoted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

Obj = dict[str, Any]

ENFORCE = "pod-security.kubernetes.io/enforce"
ENFORCE_VERSION = "pod-security.kubernetes.io/enforce-version"

BASELINE_CAPS = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE", "SETFCAP",
    "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}


def _containers(pod: Obj) -> Iterator[Obj]:
    spec = pod["spec"]
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(key) or []


def _quote(names: list[str]) -> str:
    return ", ".join(f'"{n}"' for n in names)


def _who(names: list[str], pod_or: bool = False) -> str:
    word = "container" if len(names) == 1 else "containers"
    return f"{'pod or ' if pod_or else ''}{word} {_quote(names)}"


def _sc(c: Obj) -> Obj:
    return c.get("securityContext") or {}


def _caps_added(c: Obj) -> list[str]:
    return list((_sc(c).get("capabilities") or {}).get("add") or [])


def _baseline(pod: Obj) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    spec = pod["spec"]
    bad_caps: dict[str, list[str]] = {}
    for c in _containers(pod):
        extra = [cap for cap in _caps_added(c) if cap not in BASELINE_CAPS]
        if extra:
            bad_caps[c["name"]] = extra
    if bad_caps:
        caps = sorted({cap for caps in bad_caps.values() for cap in caps})
        out.append(("capabilities_baseline", f"non-default capabilities ({_who(list(bad_caps))} must not include "
                    f"{_quote(caps)} in securityContext.capabilities.add)"))
    host = [f"{k}=true" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    if host:
        out.append(("hostNamespaces", f"host namespaces ({', '.join(host)})"))
    ports = [(c["name"], p["hostPort"]) for c in _containers(pod) for p in c.get("ports") or [] if p.get("hostPort")]
    if ports:
        names = list(dict.fromkeys(n for n, _ in ports))
        out.append(("hostPorts", f"hostPort ({_who(names)} uses hostPort {', '.join(str(p) for _, p in ports)})"))
    priv = [c["name"] for c in _containers(pod) if _sc(c).get("privileged")]
    if priv:
        out.append(("privileged", f"privileged ({_who(priv)} must not set securityContext.privileged=true)"))
    return out


def _restricted(pod: Obj) -> list[tuple[str, str]]:
    out = [r for r in _baseline(pod) if r[0] != "capabilities_baseline"]  # the restricted check overrides it
    containers = list(_containers(pod))
    pod_sc = pod["spec"].get("securityContext") or {}
    ape = [c["name"] for c in containers if _sc(c).get("allowPrivilegeEscalation") is not False]
    if ape:
        out.append(("allowPrivilegeEscalation", f"allowPrivilegeEscalation != false ({_who(ape)} must set "
                    "securityContext.allowPrivilegeEscalation=false)"))
    no_drop = [c["name"] for c in containers if "ALL" not in ((_sc(c).get("capabilities") or {}).get("drop") or [])]
    bad_add = {c["name"]: [x for x in _caps_added(c) if x != "NET_BIND_SERVICE"] for c in containers}
    bad_add = {k: v for k, v in bad_add.items() if v}
    parts = []
    if no_drop:
        parts.append(f'{_who(no_drop)} must set securityContext.capabilities.drop=["ALL"]')
    if bad_add:
        caps = sorted({cap for caps in bad_add.values() for cap in caps})
        parts.append(f"{_who(list(bad_add))} must not include {_quote(caps)} in securityContext.capabilities.add")
    if parts:
        out.append(("capabilities_restricted", f"unrestricted capabilities ({'; '.join(parts)})"))
    explicit_false = [c["name"] for c in containers if _sc(c).get("runAsNonRoot") is False]
    unset = [c["name"] for c in containers if _sc(c).get("runAsNonRoot") is None]
    nonroot_parts = []
    if pod_sc.get("runAsNonRoot") is False:
        nonroot_parts.append("pod must not set securityContext.runAsNonRoot=false")
    if explicit_false:
        nonroot_parts.append(f"{_who(explicit_false)} must not set securityContext.runAsNonRoot=false")
    if pod_sc.get("runAsNonRoot") is not True and unset:
        nonroot_parts.append(f"{_who(unset, pod_or=True)} must set securityContext.runAsNonRoot=true")
    if nonroot_parts:
        out.append(("runAsNonRoot", f"runAsNonRoot != true ({'; '.join(nonroot_parts)})"))
    root = [c["name"] for c in containers if _sc(c).get("runAsUser") == 0]
    root_parts = ["pod must not set runAsUser=0"] if pod_sc.get("runAsUser") == 0 else []
    if root:
        root_parts.append(f"{_who(root)} must not set runAsUser=0")
    if root_parts:
        out.append(("runAsUser", f"runAsUser=0 ({'; '.join(root_parts)})"))
    ok_types = ("RuntimeDefault", "Localhost")
    pod_ok = (pod_sc.get("seccompProfile") or {}).get("type") in ok_types
    no_seccomp = [c["name"] for c in containers
                  if (_sc(c).get("seccompProfile") or {}).get("type") not in ok_types
                  and not (pod_ok and not _sc(c).get("seccompProfile"))]
    if no_seccomp:
        out.append(("seccompProfile_restricted", f"seccompProfile ({_who(no_seccomp, pod_or=not pod_ok)} must set "
                    'securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")'))
    return out


def violations(level: str, pod: Obj) -> list[str]:
    if level == "baseline":
        found = _baseline(pod)
    elif level == "restricted":
        found = _restricted(pod)
    else:
        return []
    return [text for _, text in sorted(found, key=lambda r: r[0])]


def check(namespace_labels: dict[str, str], pod: Obj) -> str | None:
    """The forbidden-reason text, or None when the pod is admitted."""
    level = namespace_labels.get(ENFORCE, "privileged")
    found = violations(level, pod)
    if not found:
        return None
    version = namespace_labels.get(ENFORCE_VERSION, "latest")
    return f'violates PodSecurity "{level}:{version}": ' + ", ".join(found)
