"""The `replay` command: a capture file (or stdin) through the engine into the local service, offline.

The counterpart of live.py: cli.py checks --to, finds and starts tshark, opens the input and builds the typed
settings; this wires them to the engine, shows the status line, and reports.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import BinaryIO

from .dissect import TsharkInfo
from .output import notice_printer, report, status_line
from .pipeline import (
    Engine,
    EngineOptions,
    SegmentSource,
    flow_config,
    raise_run_errors,
    replay_config,
    shadow_options,
    turn_options,
)
from .settings import Destination, Settings
from .summary import exit_code, finished


@dataclass
class ReplayStart:
    """What `replay` checks and starts before the engine's modules are even imported (see cli.start_replay)."""

    dest: Destination
    tshark: TsharkInfo
    source: BinaryIO
    dissector: SegmentSource | None = None  # the input's, started before the engine's modules were imported
    file: str = "-"  # the input as given: a path, or - for stdin
    port: int | None = None  # --port: the server port in the capture


def run_replay(settings: Settings, start: ReplayStart, stack: ExitStack) -> int:
    """The offline run; `stack` holds the opened input and the started tshark, and closes them."""
    with stack:
        options = EngineOptions(
            dest=start.dest,
            flow=flow_config(settings, start.port),
            replay=replay_config(settings),
            tshark=start.tshark,
            first_source=start.dissector,
            dissectors=settings.dissectors or 1,  # cli.start_replay has decided it by now
            speed=settings.speed,
            # A pipe can pause (tcpdump | kubectl mirror replay -): tshark must not sit on lines it has.
            live=start.file == "-",
            http=shadow_options(settings),
            tls_passthrough=settings.tls_passthrough,
            turns=turn_options(settings),
        )
        status = status_line(settings)
        if status is not None and status.tty:
            options.progress, options.progress_every = status, status.every
        options.notice = notice_printer(settings, status)
        engine = Engine(options, source_name=start.file)
        try:
            summary = engine.run([start.source])
        finally:
            if status is not None:
                status.clear()
    report(finished(summary, engine.fatal_error or engine.input_error), settings)
    raise_run_errors(engine)
    return exit_code(summary)


__all__ = ["ReplayStart", "run_replay"]
