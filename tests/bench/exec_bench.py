"""Exec stdout throughput: kubectl-mirror's exec stream vs `kubectl exec`, against the same test API server.

Run as root (the pod is a network namespace):  .venv/bin/python -m tests.bench.exec_bench [MiB]

Both clients run as processes of their own, as they do for real: the test API server runs in a thread of this
process, and a client in here would fight it for the GIL. Both write what they read into a pipe to `wc -c` and
are timed by the wall clock from start to exit. Each moves N MiB and 2N MiB; N MiB over the difference of the two
times is the channel's throughput, with start-up (a Go binary's against Python's imports) cancelled out.
The goal is >= 0.9x kubectl.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROUNDS = 3
CLIENTS = ("kubectl", "ours")


def _client_main(argv: list[str]) -> int:
    """The child: our exec client copying the command's stdout to its own (imports only what a live run does)."""
    from kubectl_mirror.execstream import open_exec
    from kubectl_mirror.flags import add_connection_flags
    from kubectl_mirror.kubeconfig import connect

    parser = argparse.ArgumentParser()
    add_connection_flags(parser)
    args, command = parser.parse_known_args(argv)
    command = command[1:] if command[:1] == ["--"] else command
    conn = connect(args)
    out = sys.stdout.buffer
    with open_exec(conn, "default", "web-1", "app", command) as proc:
        for _ in range(1 << 30):
            chunk = proc.stdout.read1(1 << 20)
            if not chunk:
                break
            out.write(chunk)
        code = proc.wait(60)
    out.flush()
    conn.close()
    return code


def client_argv(client: str, kubeconfig: Path, command: list[str]) -> list[str]:
    if client == "kubectl":
        return ["kubectl", "--kubeconfig", str(kubeconfig), "exec", "web-1", "-c", "app", "--", *command]
    return [sys.executable, "-m", "tests.bench.exec_bench", "--client", "--kubeconfig", str(kubeconfig), "--",
            *command]


def timed_copy(argv: list[str]) -> tuple[float, int]:
    """Wall seconds from start to exit, and the bytes it wrote (counted by `wc -c`, a fast C reader)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    wc = subprocess.run(["wc", "-c"], stdin=proc.stdout, capture_output=True, timeout=600, check=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    code = proc.wait(60)
    elapsed = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{argv[0]} failed ({code}): {err.decode(errors='replace').strip()[-500:]}")
    return elapsed, int(wc.stdout.split()[0])


@dataclass
class Throughput:
    mib: int  # N: each client moves N and 2N MiB
    rounds: int
    walls: dict[tuple[str, int], float] = field(default_factory=dict)  # (client, MiB) -> best wall seconds

    def rate(self, client: str) -> float:
        """MB/s of the channel: N MiB over the difference of the best times for 2N and N."""
        extra = self.walls[(client, 2 * self.mib)] - self.walls[(client, self.mib)]
        return (self.mib << 20) / extra / 1e6 if extra > 0 else float("inf")


def measure(kubeconfig: Path, mib: int, rounds: int = ROUNDS, log: Callable[[str], None] | None = None) -> Throughput:
    """Alternate the clients and the sizes, `rounds` times, keeping each (client, size)'s best wall time."""
    res = Throughput(mib, rounds)
    for i in range(rounds):
        for size in (mib, 2 * mib):
            for client in CLIENTS:
                if log is not None:
                    log(f"exec round {i + 1}/{rounds}: {client}, {size} MiB ...")
                command = ["head", "-c", str(size << 20), "/dev/zero"]
                elapsed, got = timed_copy(client_argv(client, kubeconfig, command))
                if got != size << 20:
                    raise SystemExit(f"{client} delivered {got} bytes, expected {size << 20}")
                key = (client, size)
                res.walls[key] = min(res.walls.get(key, float("inf")), elapsed)
    return res


def main() -> int:
    if sys.argv[1:2] == ["--client"]:
        return _client_main(sys.argv[2:])
    from tests.apiserver import FakeCluster, PodNetns

    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    if shutil.which("kubectl") is None:
        print("kubectl not found on PATH", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp, PodNetns() as pod, FakeCluster(Path(tmp)) as fc:
        fc.add_pod("default", "web-1", containers=[{"name": "app", "image": "nginx"}], netns=pod.name)
        res = measure(fc.kubeconfig, mib)
    for client in CLIENTS:
        print(f"{client:8} {res.rate(client):8.1f} MB/s  (wall {res.walls[(client, mib)]:.2f} s for {mib} MiB, "
              f"{res.walls[(client, 2 * mib)]:.2f} s for {2 * mib} MiB; best of {res.rounds})")
    print(f"ratio    {res.rate('ours') / res.rate('kubectl'):8.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
