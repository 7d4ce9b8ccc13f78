"""Following the workload, end to end: rollouts, scale-ups, deletions and watch faults during a live run.

Real pods (network namespaces serving on port 80), the real CLI, real tcpdump through exec, real clients; the
test API server runs the rollout as Kubernetes does (new ReplicaSet, new pod Ready, old pod Terminating then
deleted). What the local service receives must be byte-identical to what the pods received, across the move.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apiserver import FakeCluster
from tests.cli_run import CliRun, Finished, wait_for
from tests.live_helpers import HTTP_CONTAINER, POD_PORT, LiveLab, live_run, raw_conns
from tests.netlab.lab import contents, without_probe
from tests.netlab.recorder import ConnRecord, Recorder

pytestmark = pytest.mark.netns

MOVE_TIMEOUT = 30.0  # until the CLI says it moved (a watch event, then a tap and a tcpdump start)


@pytest.fixture
def lab(tmp_path: Path, stack: contextlib.ExitStack) -> Iterator[LiveLab]:
    fc = FakeCluster(tmp_path)
    fc.start()
    fc.tap_start_delay = 0.05
    fc.bookmark_every = 0.5
    try:
        yield LiveLab(fc, tmp_path)
    finally:
        fc.stop()  # before `stack` removes the pods' namespaces: kills whatever a failed run left exec'd in them


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
    no_tcpdump(lab)
