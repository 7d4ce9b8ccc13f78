"""Glue for tests: a recorder in a namespace, and the real CLI replaying a pcap to a local recorder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .netns import Netns
from .recorder import ConnRecord, Recorder

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "kubectl-mirror"


class NsRecorder:
    """The ground-truth recorder as a process inside a namespace (the "pod"'s server)."""

    def __init__(self, ns: Netns, out: Path, port: int = 8080, raw: bool = False) -> None:
        self.ns, self.out, self.port, self.raw = ns, out, port, raw
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> NsRecorder:
        args = [sys.executable, "-m", "tests.netlab.recorder", "--port", str(self.port), "--out", str(self.out)]
        if self.raw:
            args.append("--raw")
        self.proc = subprocess.Popen(self.ns.argv(args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # EOF if it dies: never hangs
        if not line.startswith("listening"):
            self.proc.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"recorder did not start: {line!r} {err[-2000:]}")
        return self

    def stop(self, timeout: float = 20.0) -> list[ConnRecord]:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=10)
            raise
        return [ConnRecord.from_json(d) for d in json.loads(self.out.read_text())]


@dataclass
class CliOutput:
    """What a finished CLI run printed; `summary` is its --json summary."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def summary(self) -> dict[str, Any]:
        return dict(json.loads(self.stdout))

    @property
    def connections(self) -> dict[str, int]:
        return dict(self.summary["connections"])


@dataclass
class ReplayResult(CliOutput):
    records: list[ConnRecord] = field(default_factory=list)


def run_cli(args: list[str], timeout: float = 120.0, stdin: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process; `stdin`: a file to give it as its standard input."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    with open(stdin if stdin is not None else os.devnull, "rb") as source:
        return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, timeout=timeout,
                              check=False, env=env, stdin=source)


def replay(pcap: Path, extra: list[str] | None = None, expect_conns: int = 0, timeout: float = 120.0,
           http: bool = True, stdin: bool = False) -> ReplayResult:
    """`kubectl-mirror replay PCAP --to 127.0.0.1:PORT --json` to a fresh recorder on loopback.

    stdin: `replay -` with the pcap as standard input instead.
    """
    rec = Recorder("127.0.0.1", 0, http=http).start()
    try:
        out = run_cli(["replay", "-" if stdin else str(pcap), "--to", f"127.0.0.1:{rec.port}", "--json",
                       *(extra or [])], timeout, stdin=pcap if stdin else None)
        # A failed run may never have connected: do not wait long for connections that will not come.
        rec.wait_idle(expect_conns, timeout=15.0 if out.returncode in (0, 3) else 2.0)
    finally:
        records = rec.stop(grace=5.0)
    return ReplayResult(out.returncode, out.stdout, out.stderr, without_probe(records))


def without_probe(records: list[ConnRecord]) -> list[ConnRecord]:
    """Drop the one empty connection `--to`'s reachability check makes before anything is replayed."""
    for i, r in enumerate(records):
        if not r.data:
            return records[:i] + records[i + 1 :]
    return records


def contents(records: list[ConnRecord]) -> list[bytes]:
    """Per-connection bytes, sorted: equal lists mean the same connections carried the same bytes."""
    return sorted(bytes(r.data) for r in records)
