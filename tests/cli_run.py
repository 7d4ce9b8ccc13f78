"""The CLI as a subprocess the tests drive: stderr read as it comes, Ctrl-C, and what it left when it ended.

One wrapper for the replay, fault, live and security tests; `watch=True` also follows its peak memory and its
tshark children (the fault tests check that none outlives the run).
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.netlab.lab import CLI, REPO, CliOutput
from tests.proctable import memory, proc_table, tree

MIRRORING_PREFIX = "mirroring "  # the live mode's "capture is live" line
MIRRORING = re.compile(r"^mirroring (?P<ns>[^/\s]+)/(?P<pod>\S+):(?P<port>\d+)(?: \(\+(?P<more>\d+) more\))? -> ")


@dataclass
class Finished(CliOutput):
    stdout_bytes: bytes = b""
    peak_rss: int = 0  # bytes, when watched
    tshark_pids: set[int] = field(default_factory=set)  # every tshark child seen, when watched

    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("error:")]


RUN_MARKER = "KUBECTL_MIRROR_TEST_RUN"


def cli_env(path_first: Path | None = None) -> dict[str, str]:
    """The test's environment minus pytest's own variables; `path_first` goes in front of PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    if path_first is not None:
        env["PATH"] = f"{path_first}{os.pathsep}{env.get('PATH', '')}"
    return env


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate()` until true or `timeout` passes; the caller asserts on the result."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, comm) of every live descendant of `pid` (zombies left out: they hold nothing)."""
    table = proc_table()
    return [(p, table[p].comm) for p in tree(pid, table)[1:] if table[p].state != "Z"]


class CliRun:
    """`kubectl-mirror ARGS` running in the background."""

    def __init__(self, args: Sequence[str], *, argv0: Sequence[str] | None = None, env: dict[str, str] | None = None,
                 stdin: Any = subprocess.DEVNULL, stdout_binary: bool = False, watch: bool = False) -> None:
        argv = [*(argv0 if argv0 is not None else [sys.executable, str(CLI)]), *args]
        # Inherited by every process the run starts: a test tells this run's tsharks from other test runs' ones.
        self.marker = f"{RUN_MARKER}={uuid.uuid4().hex}"
        env = dict(env if env is not None else cli_env())
        env[RUN_MARKER] = self.marker.split("=", 1)[1]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env)
        self.pid = self.proc.pid
        self.stdout_binary = stdout_binary
        self.peak_rss = 0
        self.tshark_pids: set[int] = set()
        self._lines: list[str] = []
        self._out = bytearray()
        self._lock = threading.Lock()
        self._mirroring = threading.Event()
        self._watching = watch
        self._threads = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        if watch:
            self._threads.append(threading.Thread(target=self._watch, daemon=True))
        for t in self._threads:
            t.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            with self._lock:
                self._lines.append(line)
            if line.startswith(MIRRORING_PREFIX):
                self._mirroring.set()
        self._mirroring.set()  # EOF: the run ended before (or without) the line; wait_mirroring reports it

    def _read_out(self) -> None:
        stdout = self.proc.stdout
        assert isinstance(stdout, io.BufferedReader)  # a binary, buffered pipe (Popen's default bufsize)
        for chunk in iter(lambda: stdout.read1(65536), b""):
            with self._lock:
                self._out += chunk

    def _watch(self) -> None:
        # VmHWM only grows, so the last value read before the process ends is its peak (to within one poll).
        while self._watching and self.proc.poll() is None:
            mem = memory(self.pid)
            if mem is not None:
                self.peak_rss = max(self.peak_rss, mem[1])
            self.tshark_pids |= {p for p, comm in children(self.pid) if comm == "tshark"}
            time.sleep(0.05)

    @property
    def stderr(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def wait_line(self, text: str, timeout: float) -> bool:
        """Until a stderr line contains `text` (bounded); False if it never came or the run ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stderr:
                return True
            if self.proc.poll() is not None:
                time.sleep(0.2)  # let the reader catch the last lines
                return text in self.stderr
            time.sleep(0.02)
        return False

    def wait_mirroring(self, timeout: float = 60.0) -> re.Match[str]:
        """Until the live capture runs (the "mirroring ..." line, parsed); fails the test with stderr if not."""
        if not self._mirroring.wait(timeout):
            self.kill()
            raise AssertionError(f"no 'mirroring' line within {timeout:g}s; stderr so far:\n{self.stderr}")
        for line in self.stderr.splitlines():
            m = MIRRORING.match(line)
            if m:
                return m
        self.finish(10.0)
        raise AssertionError(f"the CLI ended without a usable 'mirroring' line:\n{self.stderr}")

    def tsharks(self) -> list[int]:
        return [p for p, comm in children(self.pid) if comm == "tshark"]

    def interrupt(self) -> None:
        """Ctrl-C once: SIGINT to the process (kubectl execs plugins, so it is the plugin itself)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout: float = 60.0) -> Finished:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the CLI did not exit within {timeout:g}s; stderr:\n{self.stderr}") from None
        self._watching = False
        for t in self._threads:
            t.join(10.0)
        with self._lock:
            out = bytes(self._out)
        return Finished(self.proc.returncode, "" if self.stdout_binary else out.decode(errors="replace"),
                        self.stderr, out, self.peak_rss, set(self.tshark_pids))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
