"""tshark off PATH, found the way pyshark finds it (its config.ini here), through the real CLI and the real tshark.

The CLI runs with PATH pointing at an empty directory, so the only tshark it can find is the one pyshark's
config.ini names (/usr/bin/tshark on this machine). pyshark reads config.ini from the current directory when it is
first imported, so each case is its own process started in its own directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netlab.recorder import Recorder

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "samples" / "web.pcap"
TSHARK = "/usr/bin/tshark"

pytestmark = pytest.mark.skipif(not os.access(TSHARK, os.X_OK), reason="needs tshark at /usr/bin/tshark")


def run_cli(cwd: Path, path_env: str, *args: str) -> subprocess.CompletedProcess[str]:
    # The venv's Python on the entry script: with PATH empty, the script's sh preamble could not find dirname.
    return subprocess.run([sys.executable, str(REPO / "kubectl-mirror"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60,
                          env={"PATH": path_env, "HOME": str(cwd), "XDG_CACHE_HOME": str(cwd / "cache")})


def replay(cwd: Path, path_env: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """`replay` of the bundled sample into a recorder; (result, connections the recorder saw)."""
    rec = Recorder("127.0.0.1", 0, http=True).start()
    try:
        out = run_cli(cwd, path_env, "replay", str(SAMPLE), "--to", f"127.0.0.1:{rec.port}")
    finally:
        records = rec.stop(grace=2.0)
    return out, len(records)


def empty_dir(tmp_path: Path) -> str:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    return str(empty)


def test_replay_finds_tshark_through_pyshark_config_when_path_has_none(tmp_path: Path) -> None:
    (tmp_path / "config.ini").write_text(f"[tshark]\ntshark_path = {TSHARK}\n")
    version = run_cli(tmp_path, empty_dir(tmp_path), "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.splitlines()[1].startswith("tshark ") and "not found" not in version.stdout, version.stdout
    out, delivered = replay(tmp_path, str(tmp_path / "empty-bin"))
    assert out.returncode == 0, out.stderr
    assert delivered, "the replay through the pyshark-located tshark delivered nothing"


def test_no_tshark_anywhere_is_one_line_saying_to_install_it(tmp_path: Path) -> None:
    out, _ = replay(tmp_path, empty_dir(tmp_path))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: tshark not found: install it"), out.stderr
    for hint in ("apt-get install tshark", "brew install wireshark", "3.4 or newer", "--tshark PATH"):
        assert hint in out.stderr, hint


def test_a_config_ini_of_something_else_is_not_a_crash(tmp_path: Path) -> None:
    # config.ini is a common name: one without a [tshark] section makes pyshark raise instead of looking further.
    (tmp_path / "config.ini").write_text("[database]\nhost = db.example\n")
    out, _ = replay(tmp_path, empty_dir(tmp_path))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: tshark not found: install it"), out.stderr


def test_a_file_named_tshark_where_the_user_stands_is_never_run(tmp_path: Path) -> None:
    # With PATH empty pyshark tries the relative name "tshark", i.e. a file in the current directory.
    marker = tmp_path / "ran"
    stray = tmp_path / "tshark"
    stray.write_text(f"#!/bin/sh\necho ran > {marker}\necho 'TShark (Wireshark) 4.0.0'\n")
    stray.chmod(0o755)
    out, _ = replay(tmp_path, "")
    assert out.returncode == 1 and out.stderr.startswith("error: tshark not found: install it"), out.stderr
    assert not marker.exists()
