"""Following the workload, end to end: rollouts, scale-ups, deletions and watch faults during a live run.

Real pods (network namespaces serving on port 80), the real CLI, real tcpdump through exec, real clients; the
test API server runs the rollout as Kubernetes does (new ReplicaSet, new pod Ready, old pod Terminating then
deleted). What the local service receives must be byte-identical to what the pods received, across the move.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_run import CliRun, Finished, wait_for
from tests.live_helpers import HTTP_CONTAINER, POD_PORT, HalfOpen, LiveLab, live_lab, live_run, raw_conns
from tests.netlab.lab import contents, without_probe
from tests.netlab.recorder import ConnRecord, Recorder
from tests.netlab.traffic import payload

pytestmark = pytest.mark.netns

MOVE_TIMEOUT = 30.0  # until the CLI says it moved (a watch event, then a tap and a tcpdump start)


@pytest.fixture
def lab(tmp_path: Path, stack: contextlib.ExitStack) -> Iterator[LiveLab]:
    with live_lab(tmp_path) as lab:
        lab.fc.bookmark_every = 0.5
        yield lab


def web(lab: LiveLab, stack: contextlib.ExitStack, *names: str) -> None:
    for name in names:
        lab.add_serving_pod(stack, name)
    lab.fc.add_deployment("default", "web", {"app": "web"}, replicas=len(names), containers=[dict(HTTP_CONTAINER)])


def rollout(lab: LiveLab, stack: contextlib.ExitStack, old: str, new: str, grace: float = 2.0) -> None:
    """What the Deployment controller and kubelets do for one replica: new pod, Ready, then the old one goes."""
    labels = lab.fc.new_revision("default", "web")
    lab.add_serving_pod(stack, new, labels=labels, ready=False)
    lab.fc.set_pod_phase("default", new, "Running", ready=True)
    lab.fc.delete_pod("default", old, grace=grace)


def received(local: Recorder, expected: int, timeout: float = 15.0) -> None:
    """Until the local service has the probe and `expected` mirrored connections, all closed."""
    assert local.wait_idle(expected + 1, timeout=timeout), len(local.records)


def move_line(run: CliRun, text: str) -> None:
    assert run.wait_line(text, MOVE_TIMEOUT), run.stderr


def assert_mirrored_exactly(local: Recorder, truth: list[ConnRecord], result: Finished) -> list[ConnRecord]:
    local.wait_idle(len(truth) + 1, timeout=15.0)
    got = without_probe(local.stop(grace=5.0))
    assert truth, "the pods received nothing"
    assert contents(got) == contents(truth), (len(got), len(truth), result.stderr)
    assert all(r.end == "eof" for r in got), [r.end for r in got]
    conns = result.connections
    assert conns["complete"] == len(truth) and conns["incomplete"] == 0, (conns, result.stderr)
    return got


def no_tcpdump(lab: LiveLab) -> None:
    assert wait_for(lambda: not lab.tcpdumps(), 5.0), lab.fc.exec_processes()


def test_rollout_mid_mirror_moves_to_the_new_pod(lab: LiveLab, stack: contextlib.ExitStack, local: Recorder) -> None:
    web(lab, stack, "web-abc")
    with live_run(["deploy/web", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        assert run.wait_mirroring()["pod"] == "web-abc"
        raw_conns(lab.pods["web-abc"].ip, POD_PORT, 5, "before")
        received(local, 5)
        rollout(lab, stack, "web-abc", "web-def")
        move_line(run, "pod web-abc is gone; now mirroring web-def (rollout)")
        raw_conns(lab.pods["web-def"].ip, POD_PORT, 5, "after")
        received(local, 10)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("now mirroring") == 1, result.stderr
    assert_mirrored_exactly(local, lab.truth("web-abc") + lab.truth("web-def"), result)
    assert [ec["name"] for ec in lab.ephemeral("web-def")] == ["mirror-tap"]
    pods = result.summary["pods"]
    assert [(p["pod"], p["connections"], p["incomplete"]) for p in pods] == [("default/web-abc", 5, 0),
                                                                           ("default/web-def", 5, 0)]
    assert sum(p["bytes_delivered"] for p in pods) == result.summary["bytes_delivered"] > 0
    assert all(p["packets"] > 0 for p in pods)
    assert result.summary["stream_gaps"] == 0 and not result.summary["warnings"], result.summary["warnings"]
    no_tcpdump(lab)


def test_named_pod_deleted_ends_the_run_with_its_own_exit_code(lab: LiveLab, stack: contextlib.ExitStack,
                                                               local: Recorder) -> None:
    lab.add_serving_pod(stack, "web-1")
    with live_run(["pod/web-1", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        run.wait_mirroring()
        raw_conns(lab.pods["web-1"].ip, POD_PORT, 3, "named")
        received(local, 3)
        lab.fc.delete_pod("default", "web-1", grace=1.0)
        result = run.finish(60.0)  # ends by itself
    assert result.returncode == 4, result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.error_lines()
    assert line.startswith("error: pod web-1 is gone (terminating)"), result.stderr
    assert "deploy/NAME" in line
    assert (result.summary["error"], result.summary["exit_code"]) == (line.removeprefix("error: "), 4)
    assert_mirrored_exactly(local, lab.truth("web-1"), result)  # what came before was delivered and reported
    no_tcpdump(lab)


def test_all_pods_scale_up_is_tapped_and_a_deleted_pod_ends(lab: LiveLab, stack: contextlib.ExitStack,
                                                            local: Recorder) -> None:
    web(lab, stack, "web-a")
    with live_run(["deploy/web", "--all-pods", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(),
                   "--json"]) as run:
        run.wait_mirroring()
        lab.fc.scale("Deployment", "default", "web", 2)
        lab.add_serving_pod(stack, "web-b")  # Ready at once
        move_line(run, "now also mirroring pod web-b; mirroring 2 pods")
        raw_conns(lab.pods["web-a"].ip, POD_PORT, 3, "a")
        raw_conns(lab.pods["web-b"].ip, POD_PORT, 3, "b")
        received(local, 6)
        # A connection to web-a still open when web-a goes: its end is never captured.
        spanning = HalfOpen(lab.pods["web-a"].ip, POD_PORT, payload("spanning", 0, 800))
        assert wait_for(lambda: len(local.records) >= 8, 10.0), len(local.records)  # mirrored as far as it went
        lab.fc.delete_pod("default", "web-a", grace=1.0)
        move_line(run, "pod web-a is gone (terminating); mirroring 1 pod")
        assert wait_for(lambda: len(lab.tcpdumps()) == 1, 10.0), lab.fc.exec_processes()  # web-a's is stopped
        spanning.finish(payload("spanning", 1, 800))
        raw_conns(lab.pods["web-b"].ip, POD_PORT, 3, "b2", first=3)
        received(local, 10)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    got = without_probe(local.stop(grace=5.0))
    cut = [r for r in got if bytes(r.data).startswith(b"conn-spanning")]
    # Cut where the capture ended, and reset: never closed as if it had ended, never with a hole.
    assert [(bytes(r.data), r.end) for r in cut] == [(payload("spanning", 0, 800), "reset")], cut
    whole = [r for r in lab.truth("web-a") + lab.truth("web-b") if not bytes(r.data).startswith(b"conn-spanning")]
    assert contents([r for r in got if r not in cut]) == contents(whole)
    assert (result.connections["complete"], result.connections["incomplete"]) == (9, 1), result.connections
    assert [(p["pod"], p["connections"], p["incomplete"]) for p in result.summary["pods"]] == [
        ("default/web-a", 4, 1), ("default/web-b", 6, 0)]
    no_tcpdump(lab)


def test_scaled_to_zero_waits_then_resumes(lab: LiveLab, stack: contextlib.ExitStack, local: Recorder) -> None:
    web(lab, stack, "web-a")
    with live_run(["deploy/web", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        run.wait_mirroring()
        lab.fc.scale("Deployment", "default", "web", 0)
        lab.fc.delete_pod("default", "web-a")
        move_line(run, "pod web-a is gone (deleted); no ready pod of deployment web: waiting for one")
        lab.fc.scale("Deployment", "default", "web", 1)
        lab.add_serving_pod(stack, "web-b", ready=False)
        lab.fc.set_pod_phase("default", "web-b", "Running", ready=True)
        move_line(run, "pod web-a is gone; now mirroring web-b (deleted)")
        raw_conns(lab.pods["web-b"].ip, POD_PORT, 4, "back")
        received(local, 4)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    assert_mirrored_exactly(local, lab.truth("web-b"), result)
    # web-a's tcpdump died with it a moment before the watch said so: that is the pod leaving, not a stream drop.
    assert "starting a new capture" not in result.stderr and result.summary["stream_gaps"] == 0, result.stderr
    assert [p["pod"] for p in result.summary["pods"]] == ["default/web-a", "default/web-b"]
    no_tcpdump(lab)


def test_watch_dropped_resumes_and_expired_relists(lab: LiveLab, stack: contextlib.ExitStack,
                                                  local: Recorder) -> None:
    web(lab, stack, "web-abc")
    with live_run(["deploy/web", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json", "-v", "4"]) as run:
        run.wait_mirroring()

        def watching(n: int) -> bool:
            return run.stderr.count("pod watch: watching from") >= n

        assert wait_for(lambda: watching(1), 10.0), run.stderr
        time.sleep(0.3)  # the request is recorded as it arrives; its watcher registers a moment later
        lab.fc.restart(downtime=1.0)  # every connection cut: the watch resumes from its resourceVersion
        assert wait_for(lambda: watching(2), 15.0), run.stderr
        time.sleep(0.3)
        lab.fc.compact()
        lab.fc.expire_watches()  # 410 as an ERROR event: the run lists again, then watches from the new list
        assert run.wait_line("listing again", 10.0), run.stderr
        assert wait_for(lambda: watching(3), 10.0), run.stderr
        rollout(lab, stack, "web-abc", "web-def")
        move_line(run, "pod web-abc is gone; now mirroring web-def (rollout)")
        raw_conns(lab.pods["web-def"].ip, POD_PORT, 4, "after")
        received(local, 4)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    urls = [url for _, url in lab.fc.request_urls if "labelSelector=app%3Dweb" in url]
    watches = [url for url in urls if "watch=true" in url]
    lists = [url for url in urls if "watch=true" not in url]
    assert all("allowWatchBookmarks=true" in url for url in watches), watches
    assert len(lists) == 3, urls  # resolve's, the watch's first, the one after the 410: the restart relisted nothing
    assert len(watches) >= 3, urls
    got = without_probe(local.stop(grace=5.0))
    assert contents(lab.truth("web-def")) <= contents(got)
    no_tcpdump(lab)


def test_ctrl_c_during_a_move_leaves_no_tcpdump(lab: LiveLab, stack: contextlib.ExitStack, local: Recorder) -> None:
    web(lab, stack, "web-abc")
    with live_run(["deploy/web", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        run.wait_mirroring()
        lab.fc.tap_start_delay = 1.5  # the new pod's tap takes a while: Ctrl-C lands in the middle of the move
        rollout(lab, stack, "web-abc", "web-def", grace=5.0)
        assert wait_for(lambda: lab.ephemeral("web-def"), 15.0)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert lab.fc.get_pod("default", "web-abc")["metadata"]["deletionTimestamp"]  # still there, Terminating
    no_tcpdump(lab)
