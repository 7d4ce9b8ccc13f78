"""tshark missing or too old, as a user meets it: through the CLI, one line, exit 1, and how to fix it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.netlab.recorder import Recorder

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "samples" / "web.pcap"


def replay_with(tshark: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    rec = Recorder("127.0.0.1", 0, http=True).start()
    try:
        return subprocess.run([str(REPO / "kubectl-mirror"), "replay", str(SAMPLE), "--to", f"127.0.0.1:{rec.port}",
                               "--tshark", tshark], capture_output=True, text=True, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path)})
    finally:
        rec.stop(grace=2.0)


def test_missing_tshark_says_how_to_install_it(tmp_path: Path) -> None:
    out = replay_with(str(tmp_path / "no-tshark-here"), tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: tshark not found")
    for hint in ("apt-get install tshark", "brew install wireshark", "dnf install wireshark-cli", "3.4 or newer"):
        assert hint in out.stderr, hint


def test_old_tshark_names_the_minimum_version(tmp_path: Path) -> None:
    old = tmp_path / "tshark"
    old.write_text("#!/bin/sh\necho 'TShark (Wireshark) 3.2.3 (Git v3.2.3 packaged as 3.2.3-1)'\n")
    old.chmod(0o755)
    out = replay_with(str(old), tmp_path)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("error: tshark 3.2.3 is too old: need 3.4 or newer")
