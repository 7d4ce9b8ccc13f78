"""What a mirroring run prints: the summary at the end, a line per HTTP request, one-off warnings, the status line.

Shared by the replay and the live command; the choices come from the typed `Settings` (-o, -q, -w).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

from .progress import StatusLine
from .settings import Settings
from .shadow import RequestResult
from .summary import Summary, render_json, render_text

log = logging.getLogger("kubectl_mirror.pipeline")  # the name these lines always had at -v


def request_printer(settings: Settings) -> Callable[[RequestResult], None]:
    """-o json: one JSON line per request on stdout, the summary last; text: a line per request at -v."""
    if settings.json:
        stream = sys.stdout if settings.stdout_free else sys.stderr

        def print_json(result: RequestResult) -> None:
            print(json.dumps(result.to_json()), file=stream, flush=True)

        return print_json

    def log_line(result: RequestResult) -> None:
        if not result.forwarded:
            log.info("%s %s: not forwarded", result.method, result.target)
        elif result.status is None:
            log.info("%s %s: no answer from the local service", result.method, result.target)
        else:
            log.info("%s %s -> %d in %.1f ms", result.method, result.target, result.status, result.latency_ms or 0.0)

    return log_line


def report(summary: Summary, settings: Settings) -> None:
    """The final summary: JSON on stdout for scripts, a table on stderr for people.

    With `-w -` stdout carries the pcap and nothing else, so even JSON goes to stderr then.
    """
    if settings.json:
        # HTTP mode's stdout is JSON lines (requests first), so its summary is one line too: the last.
        one_line = summary.http is not None
        print(render_json(summary, one_line=one_line), file=sys.stdout if settings.stdout_free else sys.stderr,
              flush=True)
    elif not settings.quiet:
        # render_text ends with its own newline: one, so the prompt gets the next line and no blank one before.
        print(render_text(summary), file=sys.stderr, end="", flush=True)


def notice_printer(settings: Settings, status: StatusLine | None) -> Callable[[str], None] | None:
    """A one-off warning line on stderr, above the status line (redrawn at its next tick)."""
    if settings.quiet:
        return None

    def say(message: str) -> None:
        if status is not None:
            status.clear()
        print(f"warning: {message}", file=sys.stderr, flush=True)

    return say


def status_line(settings: Settings) -> StatusLine | None:
    if settings.quiet:
        return None
    return CompareStatusLine(sys.stderr) if settings.comparing else StatusLine(sys.stderr)


class CompareStatusLine(StatusLine):
    """The status line with the live count of same / different answers under --compare."""

    def render(self, s: Summary, rate: float) -> str:
        line = super().render(s, rate)
        if s.compare is None:
            return line
        return f"{line}  compare: {s.compare.same:,} same, {s.compare.different:,} different"


__all__ = ["CompareStatusLine", "notice_printer", "report", "request_printer", "status_line"]
