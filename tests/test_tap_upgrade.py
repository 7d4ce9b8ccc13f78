"""A tap left by an earlier version (NET_RAW only) in a long-lived pod, met by this version's Debian tcpdump.

Ephemeral containers can be neither changed nor removed. The old tap runs tcpdump only until it tries to drop
root (on a node exactly as here: the test API server applies the tap's securityContext): then one new tap with
the needed capabilities is added, said once, and chosen by every later run; `status` says which tap does what.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from typing import Any

import pytest

from kubectl_mirror import tap as tapmod
from kubectl_mirror.tap import DEFAULT_IMAGE, ensure_tap
from kubectl_mirror.target import PodTarget
from tests.kube_fixtures import connection
from tests.live_helpers import LiveLab, live_run, run_once
from tests.netlab.lab import CLI
from tests.netlab.recorder import Recorder
from tests.test_e2e_live import (  # noqa: F401 (lab is a fixture)
    POD_A,
    assert_byte_identical,
    assert_no_tcpdump,
    lab,
    make_traffic,
    mirrored,
)

pytestmark = pytest.mark.netns

LEGACY_CAPS = {"drop": ["ALL"], "add": ["NET_RAW"]}  # what kubectl-mirror 0.1 asked for


def add_legacy_tap(live: LiveLab, pod: str) -> None:
    """The tap an earlier version left in the pod, running."""
    conn = connection(live.fc)
    try:
        spec = tapmod.tap_spec("mirror-tap", DEFAULT_IMAGE, "IfNotPresent", "web", fallback=False)
        spec["securityContext"]["capabilities"] = LEGACY_CAPS
        tapmod._patch(conn, tapmod._read_pod(conn, "default", pod), spec)
        t = PodTarget("default", pod, "web", 80, None, live.pods[pod].ip, "node-linux-1")
        assert not ensure_tap(conn, t, image=DEFAULT_IMAGE, pull_policy="IfNotPresent", timeout=20).can_switch_user
    finally:
        conn.close()


def status(live: LiveLab) -> list[dict[str, Any]]:
    out = subprocess.run([str(CLI), "status", "-o", "json", *live.kube_args()], capture_output=True, text=True,
                         timeout=60, check=True)
    return list(json.loads(out.stdout))


def test_an_earlier_versions_tap_gets_one_successor(lab: LiveLab, stack: contextlib.ExitStack,  # noqa: F811
                                                    local: Recorder) -> None:
    lab.add_serving_pod(stack, POD_A)
    add_legacy_tap(lab, POD_A)
    with live_run([f"pod/{POD_A}", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        run.wait_mirroring()
        assert [ec["name"] for ec in lab.ephemeral(POD_A)] == ["mirror-tap", "mirror-tap-2"]
        assert lab.ephemeral(POD_A)[1]["securityContext"]["capabilities"]["add"] == [
            "NET_RAW", "SETUID", "SETGID", "KILL"]
        # Both taps run and share the pod's processes: each counts only the tcpdump it started itself.
        rows = {r["tap"]: (r["state"], r["capturing"], r["can_switch_user"]) for r in status(lab)}
        assert rows == {"mirror-tap": ("running", 0, False), "mirror-tap-2": ("running", 1, True)}
        make_traffic(lab.pods[POD_A].ip, "upgrade", conns=5)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    notes = [ln for ln in result.stderr.splitlines() if "earlier kubectl-mirror" in ln]
    assert notes == [
        f"note: tap mirror-tap in pod default/{POD_A} was added by an earlier kubectl-mirror without SETUID and "
        "SETGID, which this image's tcpdump needs to drop root after opening the capture: added tap mirror-tap-2 "
        "with them; mirror-tap stays (ephemeral containers cannot be removed) and is no longer used"], result.stderr
    truth = lab.truth(POD_A)
    assert_byte_identical(mirrored(local, len(truth)), truth, result)
    assert_no_tcpdump(lab)

    # Every later run takes the new tap at once: no new tap, nothing said.
    again = run_once([f"pod/{POD_A}", "-w", str(lab.workdir / "again.pcapng"), "--duration", "1s",
                      *lab.kube_args()])
    assert again.returncode == 0, again.stderr
    assert "earlier kubectl-mirror" not in again.stderr
    assert [ec["name"] for ec in lab.ephemeral(POD_A)] == ["mirror-tap", "mirror-tap-2"]
    table = subprocess.run([str(CLI), "status", *lab.kube_args()], capture_output=True, text=True, timeout=60,
                           check=True).stdout.splitlines()
    assert [line.split()[2:] for line in table[1:]] == [
        ["mirror-tap", DEFAULT_IMAGE, "running,", "NET_RAW", "only", "(earlier", "version)", "-", "no"],
        ["mirror-tap-2", DEFAULT_IMAGE, "running", "-", "no"]]
    assert_no_tcpdump(lab)
