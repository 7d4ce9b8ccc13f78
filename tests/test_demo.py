"""`make demo` on a machine with no cluster: the sample's requests reach the demo server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_demo_replays_the_sample() -> None:
    proc = subprocess.run([sys.executable, "-m", "kubectl_mirror.demo"], cwd=REPO, capture_output=True, text=True,
                          timeout=150, check=False, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO / "pkg")},
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout
    for request in ("GET / HTTP/1.1", "GET /api/items?page=1 HTTP/1.1", "GET /static/app.js HTTP/1.1",
                    "POST /api/orders HTTP/1.1"):
        assert request in out, out
    assert len(re.findall(r"\[server\] connection \d+: \d+ bytes", out)) == 5, out
    assert out.count("conn-sample-") == 3, out
    assert "Summary:" in out
