"""The tool's exception types. Each carries a one-line, kubectl-style message that says what to do.

The CLI prints `error: <message>` and exits with `exit_code`; no traceback for these.
"""

from __future__ import annotations

from dataclasses import dataclass

# Exit codes, documented in --help and the README.
EXIT_OK = 0
EXIT_ERROR = 1  # the run could not start or could not go on
EXIT_USAGE = 2  # bad flags or arguments
EXIT_DELIVERY = 3  # the run finished, but some flows failed or were dropped at the local target
EXIT_TARGET_GONE = 4  # the pod named as pod/NAME went away during the run (what came before was delivered)
EXIT_INTERRUPTED = 130  # second Ctrl-C: stopped at once


class MirrorError(Exception):
    """Base of every expected failure."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(MirrorError):
    """Flags or arguments that cannot work (bad --to, --port out of range, ...)."""

    exit_code = EXIT_USAGE


class TargetError(MirrorError):
    """The local target (--to) cannot be reached."""


class InputError(MirrorError):
    """The pcap input is malformed, truncated, empty or not a capture at all."""


class ToolError(MirrorError):
    """A required external tool (tshark) is missing, too old, or died."""


class ClusterError(MirrorError):
    """Kubernetes said no: unknown resource, no running pod, RBAC, Pod Security, no ephemeral containers...

    The subclasses below come from cluster.py, the one place that reads the Kubernetes client's exceptions and
    the API server's Status bodies; they carry what the server said as fields, and callers decide on those.
    """


@dataclass(frozen=True, slots=True)
class Cause:
    """One entry of a Status's details.causes: why a field was refused (`reason` as FieldValueForbidden...)."""

    reason: str
    field: str
    message: str


class ApiError(ClusterError):
    """The API server answered a call with a failure Status (any code the subclasses do not name: 401, 410, 5xx).

    `verb` and `resource` are the call as RBAC names it (get, list, watch, patch; pods, deployments.apps,
    pods/ephemeralcontainers); `reason` is the Status reason (Expired, Unauthorized, ...), `server_message` its
    message's first line, `causes` its details.causes.
    """

    def __init__(self, message: str, *, status: int, reason: str, verb: str, resource: str, namespace: str = "",
                 name: str = "", server_message: str = "", causes: tuple[Cause, ...] = ()) -> None:
        super().__init__(message)
        self.status, self.reason, self.verb, self.resource = status, reason, verb, resource
        self.namespace, self.name, self.server_message, self.causes = namespace, name, server_message, causes


class Forbidden(ApiError):
    """403. RBAC: `denied_verb` and `denied_resource` are what the server says it denied (for impersonation,
    "impersonate" on "users", not the call's own verb). Pod Security admission: `pod_security` is the level
    enforced ("baseline", "restricted"), `pod_security_version` its version ("latest", "v1.29")."""

    denied_verb: str = ""
    denied_resource: str = ""
    pod_security: str | None = None
    pod_security_version: str = ""


class NotFound(ApiError):
    """404. `served` is False when the server does not serve the path at all (no object details in the Status),
    e.g. the ephemeralcontainers subresource on a cluster without ephemeral containers."""

    served: bool = True


class Conflict(ApiError):
    """409: the object changed since the resourceVersion the call carried; read it again."""


class Invalid(ApiError):
    """422: the object was refused field by field; `causes` says which fields and why."""


class Unreachable(ClusterError):
    """The API server at `server` could not be asked: refused, unknown host, TLS failure, connection lost."""

    def __init__(self, message: str, *, server: str) -> None:
        super().__init__(message)
        self.server = server


class Timeout(Unreachable):
    """Connecting to, or reading from, the API server took longer than the call allowed."""


class TargetGoneError(ClusterError):
    """The pod named on the command line (pod/NAME) was deleted or finished during the run."""

    exit_code = EXIT_TARGET_GONE
