"""The tool's exception types. Each carries a one-line, kubectl-style message that says what to do.

The CLI prints `error: <message>` and exits with `exit_code`; no traceback for these.
"""

from __future__ import annotations

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
    """Kubernetes said no: unknown resource, no running pod, RBAC, Pod Security, no ephemeral containers..."""


class TargetGoneError(ClusterError):
    """The pod named on the command line (pod/NAME) was deleted or finished during the run."""

    exit_code = EXIT_TARGET_GONE
