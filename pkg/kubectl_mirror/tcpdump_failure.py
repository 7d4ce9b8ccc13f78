"""Why tcpdump in a tap would not capture, read from its own stderr, and what the user can do about it.

Each cause is recognised by the words tcpdump and libpcap really print (tcpdump 4.99 / libpcap 1.10), and the
message states only what the tap's spec and tcpdump's words show: which capability is missing from the tap's
processes, whether the spec asked for it, and what changes that.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ClusterError, MirrorError, UsageError
from .tap import PSA_ENFORCE, Tap

# Printed by tcpdump as it starts, not a failure.
_INFO = ("data link type ", "verbose output suppressed", "listening on ")


class Cause(enum.Enum):
    PRIVILEGE_DROP = "privilege drop refused"
    NO_NET_RAW = "NET_RAW missing"
    FILTER = "filter rejected"
    NO_INTERFACE = "interface missing"
    NO_TCPDUMP = "tcpdump or sh missing"
    OTHER = "other"


# (cause, lower-case words) in the order they are tried: tcpdump's privilege drop ("Couldn't change to 'tcpdump'
# uid=.. gid=..: Operation not permitted") also says "not permitted", so it goes before NET_RAW.
_PATTERNS: tuple[tuple[Cause, tuple[str, ...]], ...] = (
    (Cause.PRIVILEGE_DROP, ("couldn't change to '", "capng_change_id")),
    (Cause.NO_NET_RAW, ("you don't have permission to", "socket: operation not permitted")),
    (Cause.NO_INTERFACE, ("no such device exists", "no such device", "that device is not up")),
    (Cause.FILTER, ("can't parse filter expression", "syntax error", "unknown host", "illegal ")),
)


class PrivilegeDropError(ClusterError):
    """tcpdump opened the capture but could not switch to its unprivileged user (the tap lacks SETUID/SETGID)."""


@dataclass(frozen=True, slots=True)
class Diagnosis:
    cause: Cause
    said: str  # tcpdump's own words, on one line


def diagnose(stderr_lines: Sequence[str], status_message: str | None, returncode: int | None) -> Diagnosis:
    """The cause, from tcpdump's stderr (the capture wrapper's own lines already removed) and the exec status."""
    lines = [ln.strip() for ln in stderr_lines
             if ln.strip() and not any(ln.strip().removeprefix("tcpdump: ").startswith(i) for i in _INFO)]
    # libpcap puts the system's reason on a line of its own, in parentheses: keep it with the line it explains.
    said = " ".join(lines[-2:] if len(lines) >= 2 and lines[-1].startswith("(") else lines[-1:])
    said = said or status_message or f"exit code {returncode}"
    low = " ".join(lines).lower()
    for cause, words in _PATTERNS:
        if any(w in low for w in words):
            return Diagnosis(cause, said)
    status = (status_message or "").lower()
    if "executable file not found" in status or ("not found" in low and returncode in (126, 127)):
        return Diagnosis(Cause.NO_TCPDUMP, said)
    return Diagnosis(Cause.OTHER, said)


def _spec_hint(tap: Tap) -> str:
    return (f"kubectl get pod {tap.pod} -n {tap.namespace} -o jsonpath="
            f"'{{.spec.ephemeralContainers[?(@.name==\"{tap.name}\")].securityContext}}'")


def failure(d: Diagnosis, tap: Tap, interface: str) -> MirrorError:
    """The one-line error for a capture that did not start."""
    where = f"tcpdump in pod {tap.pod} (tap {tap.name})"
    if d.cause is Cause.PRIVILEGE_DROP:
        head = f"{where} opened the capture but could not switch to its unprivileged user ({d.said}): "
        if not tap.can_switch_user:
            return PrivilegeDropError(
                head + "the tap was added by an earlier kubectl-mirror without SETUID and SETGID, and ephemeral "
                "containers cannot be changed; run again to add a tap that has them")
        return PrivilegeDropError(
            head + "kubectl-mirror asked for SETUID and SETGID in the tap's securityContext, yet its processes lack "
            f"them; compare with {_spec_hint(tap)}, or use an --image whose tcpdump keeps root (Alpine's, like the "
            "default)")
    if d.cause is Cause.NO_NET_RAW:
        head = f"{where} may not capture ({d.said}): the tap's processes lack NET_RAW; "
        if tap.fallback:
            return ClusterError(
                head + f"Pod Security forbids adding it in namespace {tap.namespace} and this node's container "
                "runtime does not grant it by default; ask an admin to allow it, e.g. kubectl label namespace "
                f"{tap.namespace} {PSA_ENFORCE}=privileged --overwrite")
        return ClusterError(head + f"kubectl-mirror asked for it in the tap's securityContext; compare with "
                            f"{_spec_hint(tap)}")
    if d.cause is Cause.FILTER:
        return UsageError(f"tcpdump rejected the capture filter: {d.said}; check the --filter expression "
                          "(pcap-filter syntax)")
    if d.cause is Cause.NO_INTERFACE:
        return ClusterError(f"{where} found no interface {interface} ({d.said}); list the pod's interfaces with "
                            f"kubectl exec {tap.pod} -n {tap.namespace} -c {tap.name} -- cat /proc/net/dev")
    if d.cause is Cause.NO_TCPDUMP:
        return ClusterError(f"the tap image {tap.image} has no tcpdump or sh ({d.said}); use an --image that has "
                            "sh, sleep and tcpdump")
    return ClusterError(f"{where} failed: {d.said}")
