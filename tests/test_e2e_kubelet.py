"""What a node does to a live run that the API server alone would not: container restarts, probes.

The test API server plays the kubelet's part for real: a restarted container takes the processes of its PID
namespace with it (the tap's among them), and probes are real connections from the node to the pod's port.
"""

from __future__ import annotations

import contextlib
import time

import pytest

from tests.cli_run import wait_for
from tests.live_helpers import HTTP_CONTAINER, POD_PORT, LiveLab, live_run, raw_conns
from tests.netlab.lab import contents
from tests.netlab.recorder import Recorder
from tests.test_e2e_live import (  # noqa: F401 (lab is a fixture)
    POD_A,
    assert_byte_identical,
    assert_no_tcpdump,
    lab,
    mirrored,
)

pytestmark = pytest.mark.netns


def test_target_container_restart_moves_the_capture_to_a_new_tap(lab: LiveLab,  # noqa: F811
                                                                 stack: contextlib.ExitStack,
                                                                 local: Recorder) -> None:
    # The app crashes and the kubelet restarts it: the tap shared its PID namespace, so the kernel ended the tap's
    # processes too, and an ephemeral container is never restarted. The run must go on in a new tap.
    lab.add_serving_pod(stack, POD_A)
    ip = lab.pods[POD_A].ip
    with live_run([f"pod/{POD_A}", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        run.wait_mirroring()
        before = raw_conns(ip, POD_PORT, 5, "before")
        assert wait_for(lambda: len(local.records) >= 6, 20.0), run.stderr  # the probe and the five
        lab.fc.restart_container("default", POD_A, "web")
        assert wait_for(lambda: "capturing again" in run.stderr, 30.0), run.stderr
        after = raw_conns(ip, POD_PORT, 5, "after")
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    assert [ec["name"] for ec in lab.ephemeral(POD_A)] == ["mirror-tap", "mirror-tap-2"]
    states = {s["name"]: s["state"] for s in lab.fc.get_pod("default", POD_A)["status"]["ephemeralContainerStatuses"]}
    assert "terminated" in states["mirror-tap"] and "running" in states["mirror-tap-2"], states
    truth = lab.truth(POD_A)
    assert contents(truth) == sorted([*before, *after])
    got = mirrored(local, len(truth))
    assert contents(got) == contents(truth)
    assert result.summary["stream_gaps"] == 1
    assert any("tap mirror-tap in pod default/" in w and "terminated during the run (exit code 137, Error); the "
               "capture went on in tap mirror-tap-2" in w for w in result.summary["warnings"]), result.summary
    # Nothing was left to stop in the dead tap: no warning about a tcpdump that could not be stopped.
    assert not any("stop" in w for w in result.summary["warnings"]), result.summary["warnings"]
    assert_no_tcpdump(lab)


def test_kubelet_probes_are_mirrored_like_any_connection(lab: LiveLab, stack: contextlib.ExitStack,  # noqa: F811
                                                         local: Recorder) -> None:
    # A readiness probe on the mirrored port: the kubelet connects from the node every period, and the local
    # service gets those connections too, byte for byte (User-Agent: kube-probe/...).
    probe = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 0.2, "timeoutSeconds": 2}
    lab.fc.probes_paused = True  # only while the capture runs, so the pod's truth and the mirror can match
    lab.add_serving_pod(stack, POD_A, container={**HTTP_CONTAINER, "readinessProbe": probe})
    with live_run([f"pod/{POD_A}", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        run.wait_mirroring()
        lab.fc.probes_paused = False
        sent = raw_conns(lab.pods[POD_A].ip, POD_PORT, 3, "probed")
        assert wait_for(lambda: sum(b"kube-probe/" in r.data for r in list(local.records)) >= 3, 20.0), run.stderr
        lab.fc.probes_paused = True
        time.sleep(0.5)  # a probe under way finishes (its timeout is 2 s, the pod answers at once)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    truth = lab.truth(POD_A)
    probes = [r for r in truth if bytes(r.data).startswith(b"GET /healthz HTTP/1.1\r\n")]
    assert len(probes) >= 3 and all(b"\r\nUser-Agent: kube-probe/" in r.data for r in probes), truth
    assert sorted(sent) == sorted(bytes(r.data) for r in truth if r not in probes)
    assert_byte_identical(mirrored(local, len(truth)), truth, result)
    assert result.connections["probes"] == len(probes), result.connections  # the summary tells them apart
    assert_no_tcpdump(lab)


def test_an_exec_stream_cut_for_idleness_is_resumed(lab: LiveLab, stack: contextlib.ExitStack,  # noqa: F811
                                                    local: Recorder) -> None:
    # A quiet pod: nothing crosses the exec stream, and the kubelet closes it after its streaming idle timeout
    # (4 h by default), leaving tcpdump running. The run must capture again, stop the old tcpdump, and lose nothing
    # of what comes after.
    lab.fc.exec_idle_timeout = 1.5
    lab.add_serving_pod(stack, POD_A)
    ip = lab.pods[POD_A].ip
    with live_run([f"pod/{POD_A}", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        run.wait_mirroring()
        before = raw_conns(ip, POD_PORT, 3, "before")
        assert wait_for(lambda: "capturing again" in run.stderr, 30.0), run.stderr
        lab.fc.exec_idle_timeout = None  # the rest of the run talks; no more cuts
        after = raw_conns(ip, POD_PORT, 3, "after")
        assert len(lab.tcpdumps()) == 1, lab.fc.exec_processes()  # the cut one was stopped
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    truth = lab.truth(POD_A)
    assert contents(truth) == sorted([*before, *after])
    got = mirrored(local, len(truth))
    assert contents(got) == contents(truth) and all(r.end == "eof" for r in got), got
    assert result.connections["complete"] == len(truth), result.connections
    assert_no_tcpdump(lab)
