"""What a container runtime makes of a container's securityContext, applied for real to an exec'd command.

A real exec runs with the container's process settings (runc exec reuses them): its user and groups, its
capability sets, no_new_privs, and its read-only root. Here the command runs under `setpriv` (util-linux) with the
same values, so a tcpdump that drops root after opening the capture fails exactly as it does in a pod whose
container lacks CAP_SETUID/CAP_SETGID, and a tap without CAP_NET_RAW cannot open the capture.

How the sets are built follows containerd's CRI plugin: start from the runtime's default capabilities, `add: [ALL]`
makes it every capability, `drop: [ALL]` empties it, then single capabilities are added, then single ones dropped.
For uid 0 the bounding, permitted and effective sets are that set; inheritable and ambient stay empty (containerd
>= 1.6.18), so a non-root user holds no capability after exec, as in a pod. Seccomp is not applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]

# containerd's defaults (oci/spec.go defaultUnixCaps), what a pod gets when its container neither adds nor drops.
CONTAINERD_DEFAULT_CAPS = (
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP", "SETPCAP",
    "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
)
# CRI-O's defaults since 1.18: NET_RAW (and a few more) are no longer granted unless a container adds them.
CRIO_DEFAULT_CAPS = ("CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "SETGID", "SETUID", "SETPCAP", "NET_BIND_SERVICE",
                     "KILL")

# Linux's capabilities (`setpriv --list-caps`), what `add: [ALL]` grants.
ALL_CAPS = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
)

# The mount namespace is the one `ip netns exec` just made for this command alone: remounting its root read-only
# there (a per-mount flag) leaves the host's root writable, and /proc, /dev, /sys stay their own mounts, as in a
# container whose root filesystem is read-only.
_READ_ONLY_ROOT = 'mount -o remount,bind,ro / || exit 126; exec "$@"'


@dataclass(frozen=True, slots=True)
class ProcessContext:
    uid: int
    gid: int
    groups: tuple[int, ...]
    caps: frozenset[str] | None  # None: privileged, every capability
    no_new_privs: bool
    read_only_root: bool

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run under these settings (to follow `ip netns exec NS`)."""
        out: list[str] = []
        if self.read_only_root:
            out += ["sh", "-c", _READ_ONLY_ROOT, "read-only-root"]
        out += ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}"]
        out.append(f"--groups={','.join(map(str, self.groups))}" if self.groups else "--clear-groups")
        if self.caps is not None:
            bounding = ",".join(["-all", *(f"+{c.lower()}" for c in sorted(self.caps))])
            out += [f"--bounding-set={bounding}", "--inh-caps=-all", "--ambient-caps=-all"]
        if self.no_new_privs:
            out.append("--no-new-privs")
        return [*out, "--", *argv]


def _cap_name(cap: str) -> str:
    cap = cap.upper()
    return cap[4:] if cap.startswith("CAP_") else cap


def capabilities(sc: Obj, defaults: tuple[str, ...]) -> frozenset[str] | None:
    """The container's capability set, None when privileged (all of them)."""
    if sc.get("privileged"):
        return None
    spec = sc.get("capabilities") or {}
    add = [_cap_name(c) for c in spec.get("add") or []]
    drop = [_cap_name(c) for c in spec.get("drop") or []]
    caps = set(ALL_CAPS) if "ALL" in add else set(defaults)
    if "ALL" in drop:
        caps.clear()
    caps.update(c for c in add if c != "ALL")
    caps.difference_update(drop)
    return frozenset(caps)


def process_context(pod: Obj, container: Obj, default_caps: tuple[str, ...]) -> ProcessContext:
    """The settings runc gives `container`'s processes: container fields over the pod's, the image's user root."""
    psc: Obj = pod.get("spec", {}).get("securityContext") or {}
    csc: Obj = container.get("securityContext") or {}
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    groups = {int(g) for g in psc.get("supplementalGroups") or []}
    if psc.get("fsGroup") is not None:
        groups.add(int(psc["fsGroup"]))
    return ProcessContext(
        uid=int(uid) if uid is not None else 0,
        gid=int(gid) if gid is not None else 0,
        groups=tuple(sorted(groups)),
        caps=capabilities(csc, default_caps),
        # The kubelet sets no_new_privs only when the field says false; unset means escalation is allowed.
        no_new_privs=csc.get("allowPrivilegeEscalation") is False,
        read_only_root=csc.get("readOnlyRootFilesystem") is True,
    )
