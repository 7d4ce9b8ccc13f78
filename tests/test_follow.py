"""The pod watch bookkeeping and the follow policy, with scripted events (sans-I/O: no server, no sockets)."""

from __future__ import annotations

from typing import Any

import pytest

from kubectl_mirror.follow import End, Follower, Mode, Say, Start, Stop
from kubectl_mirror.podwatch import ChangeKind, ListPods, PodWatch, WatchFailed, WatchPods
from kubectl_mirror.target import Pod

Obj = dict[str, Any]
OLD, NEW = "6b7f9c", "84d2aa"


def pod(name: str, rv: int, *, ready: bool = True, template: str = OLD, terminating: bool = False,
        phase: str = "Running", reason: str | None = None, uid: str | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": "default", "uid": uid or f"uid-{name}", "resourceVersion": str(rv),
                 "labels": {"app": "web", "pod-template-hash": template}}
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: Obj = {"phase": phase, "podIP": "10.0.0.1",
                   "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    if reason:
        status["reason"] = reason
    return {"metadata": meta, "spec": {"containers": [{"name": "web"}]}, "status": status}


def ev(kind: str, obj: Obj) -> Obj:
    return {"type": kind, "object": obj}


def kinds(changes: list[Any]) -> list[tuple[str, str, str]]:
    return [(c.kind.value, c.name, c.why) for c in changes]


# ---- podwatch -----------------------------------------------------------------------------------


def test_list_then_watch_from_its_resource_version() -> None:
    w = PodWatch()
    assert w.next_request() == ListPods()
    changes = w.listed([pod("web-b", 11), pod("web-a", 10), pod("web-c", 12, ready=False)], "20")
    assert kinds(changes) == [("ready", "web-a", "ready"), ("ready", "web-b", "ready")]
    assert w.next_request() == WatchPods("20")
    assert [p.metadata.name for p in w.ready] == ["web-a", "web-b"]


def test_events_move_the_resource_version_and_say_what_changed() -> None:
    w = PodWatch()
    w.listed([pod("web-a", 10)], "20")
    assert kinds(w.event(ev("ADDED", pod("web-b", 21, ready=False, template=NEW)))) == []
    assert kinds(w.event(ev("MODIFIED", pod("web-b", 22, template=NEW)))) == [("ready", "web-b", "ready")]
    assert kinds(w.event(ev("MODIFIED", pod("web-a", 23, ready=False, terminating=True)))) == [
        ("gone", "web-a", "terminating")]
    assert w.event(ev("DELETED", pod("web-a", 24, ready=False, terminating=True))) == []  # already said
    assert w.next_request() == WatchPods("24")
    # A bookmark carries only a resourceVersion: it moves the resume point and changes nothing.
    assert w.event({"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": "40"}}}) == []
    assert w.next_request() == WatchPods("40")


def test_not_ready_evicted_and_deleted() -> None:
    w = PodWatch()
    w.listed([pod("web-a", 10), pod("web-b", 11), pod("web-c", 12)], "20")
    assert kinds(w.event(ev("MODIFIED", pod("web-a", 21, ready=False)))) == [("unready", "web-a", "not ready")]
    assert kinds(w.event(ev("MODIFIED", pod("web-b", 22, ready=False, phase="Failed", reason="Evicted")))) == [
        ("gone", "web-b", "evicted")]
    assert kinds(w.event(ev("DELETED", pod("web-c", 23)))) == [("gone", "web-c", "deleted")]


def test_410_relists_and_the_relist_tells_what_was_missed() -> None:
    w = PodWatch()
    w.listed([pod("web-a", 10)], "20")
    assert w.event({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired"}}) == []
    assert w.next_request() == ListPods()
    # While no watch ran, web-a was replaced by web-b.
    changes = w.listed([pod("web-b", 31, template=NEW)], "40")
    assert kinds(changes) == [("gone", "web-a", "deleted"), ("ready", "web-b", "ready")]
    assert w.relists == 1
    w.expired()  # a 410 refusing the watch's start: the same
    assert w.next_request() == ListPods()


def test_other_error_events_fail_the_watch() -> None:
    w = PodWatch()
    w.listed([], "1")
    with pytest.raises(WatchFailed) as err:
        w.event({"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "etcd is sad"}})
    assert err.value.code == 500


def test_same_name_new_uid_is_a_replacement() -> None:
    w = PodWatch()
    w.listed([pod("db-0", 10)], "20")
    assert kinds(w.event(ev("MODIFIED", pod("db-0", 21, uid="other")))) == [("gone", "db-0", "deleted"),
                                                                            ("ready", "db-0", "ready")]


# ---- follow -------------------------------------------------------------------------------------


def follow(mode: Mode, *pods: Obj) -> tuple[Follower, PodWatch]:
    w = PodWatch()
    w.listed(list(pods), "20")
    f = Follower(mode, "deployment web")
    f.seed(w.ready[:1] if mode is Mode.ONE else w.ready)
    return f, w


def step(f: Follower, w: PodWatch, *events: Obj) -> list[Any]:
    out: list[Any] = []
    for e in events:
        out += f.changes(w.event(e), w.ready)
    return out


def test_one_moves_on_a_rollout_and_says_it_once() -> None:
    f, w = follow(Mode.ONE, pod("web-abc", 10))
    assert step(f, w, ev("ADDED", pod("web-def", 21, ready=False, template=NEW))) == []
    decisions = step(f, w, ev("MODIFIED", pod("web-def", 22, template=NEW)))
    assert decisions == []  # web-abc still serves: nothing to do
    decisions = step(f, w, ev("MODIFIED", pod("web-abc", 23, ready=False, terminating=True)))
    assert decisions == [Stop("web-abc", "terminating"), Start(w.pods["web-def"])]
    assert f.started("web-def") == [Say("pod web-abc is gone; now mirroring web-def (rollout)")]
    assert f.history == ["web-abc", "web-def"] and f.latest_move == "web-abc -> web-def (rollout)"
    assert step(f, w, ev("DELETED", pod("web-abc", 24, ready=False, terminating=True))) == []


def test_one_same_template_deleted_pod_is_not_called_a_rollout() -> None:
    f, w = follow(Mode.ONE, pod("web-a", 10), pod("web-b", 11))
    decisions = step(f, w, ev("DELETED", pod("web-a", 21)))
    assert decisions == [Stop("web-a", "deleted"), Start(w.pods["web-b"])]
    assert f.started("web-b") == [Say("pod web-a is gone; now mirroring web-b (deleted)")]


def test_one_not_ready_moves_and_a_failed_start_tries_the_next() -> None:
    f, w = follow(Mode.ONE, pod("web-a", 10), pod("web-b", 11), pod("web-c", 12))
    decisions = step(f, w, ev("MODIFIED", pod("web-a", 21, ready=False)))
    assert decisions == [Stop("web-a", "not ready"), Start(w.pods["web-b"])]
    decisions = f.start_failed("web-b", "tap did not start", w.ready)
    assert decisions == [Say("warning: cannot mirror pod web-b: tap did not start"), Start(w.pods["web-c"])]
    assert f.started("web-c") == [Say("pod web-a is not ready; now mirroring web-c (not ready)")]


def test_one_scaled_to_zero_waits_and_resumes() -> None:
    f, w = follow(Mode.ONE, pod("web-a", 10))
    decisions = step(f, w, ev("DELETED", pod("web-a", 21)))
    assert decisions == [Stop("web-a", "deleted"),
                         Say("pod web-a is gone (deleted); no ready pod of deployment web: waiting for one "
                             "(Ctrl-C to stop)")]
    assert step(f, w, ev("ADDED", pod("web-z", 22, ready=False))) == []  # said once, not per event
    decisions = step(f, w, ev("MODIFIED", pod("web-z", 23)))
    assert decisions == [Start(w.pods["web-z"])]
    assert f.started("web-z") == [Say("pod web-a is gone; now mirroring web-z (deleted)")]


def test_all_starts_new_ready_pods_and_stops_gone_ones() -> None:
    f, w = follow(Mode.ALL, pod("web-a", 10))
    assert step(f, w, ev("ADDED", pod("web-b", 21, ready=False))) == []
    assert step(f, w, ev("MODIFIED", pod("web-b", 22))) == [Start(w.pods["web-b"])]
    assert f.started("web-b") == [Say("now also mirroring pod web-b; mirroring 2 pods")]
    assert step(f, w, ev("MODIFIED", pod("web-b", 23, ready=False))) == []  # not Ready: still captured
    assert step(f, w, ev("DELETED", pod("web-a", 24))) == [Stop("web-a", "deleted"),
                                                          Say("pod web-a is gone (deleted); mirroring 1 pod")]
    assert f.history == ["web-a", "web-b"] and f.capturing == 1


def test_named_pod_gone_ends_the_run() -> None:
    f, w = follow(Mode.NAMED, pod("web-a", 10))
    assert step(f, w, ev("MODIFIED", pod("web-a", 21, ready=False))) == []
    (end,) = step(f, w, ev("DELETED", pod("web-a", 22)))
    assert isinstance(end, End) and "pod web-a is gone (deleted)" in end.message
    assert f.ended and step(f, w, ev("ADDED", pod("web-a", 23, uid="again"))) == []


def test_stop_while_starting_drops_the_start() -> None:
    f, w = follow(Mode.ALL, pod("web-a", 10))
    assert step(f, w, ev("ADDED", pod("web-b", 21))) == [Start(w.pods["web-b"])]
    assert step(f, w, ev("DELETED", pod("web-b", 22)))[0] == Stop("web-b", "deleted")
    assert f.started("web-b") == []
    assert ChangeKind.GONE.value == "gone"


def test_a_seeded_pod_missing_from_the_first_list_is_gone() -> None:
    w = PodWatch()
    w.seed([Pod.model_validate(pod("web-a", 10))])
    assert kinds(w.listed([pod("web-b", 12)], "20")) == [("gone", "web-a", "deleted"), ("ready", "web-b", "ready")]
    assert w.relists == 0


def test_one_keeps_the_only_pod_while_it_is_not_ready_and_moves_once_another_is() -> None:
    f, w = follow(Mode.ONE, pod("web-a", 10))
    assert step(f, w, ev("MODIFIED", pod("web-a", 21, ready=False))) == []  # no other pod: keep capturing it
    assert step(f, w, ev("MODIFIED", pod("web-a", 22))) == []  # Ready again: nothing happened
    assert step(f, w, ev("MODIFIED", pod("web-a", 23, ready=False))) == []
    decisions = step(f, w, ev("ADDED", pod("web-b", 24)))
    assert decisions == [Stop("web-a", "not ready"), Start(w.pods["web-b"])]
    assert f.started("web-b") == [Say("pod web-a is not ready; now mirroring web-b (not ready)")]
    # Gone while kept: the usual move.
    f, w = follow(Mode.ONE, pod("web-a", 10))
    assert step(f, w, ev("MODIFIED", pod("web-a", 21, ready=False))) == []
    assert step(f, w, ev("DELETED", pod("web-a", 22)))[0] == Stop("web-a", "deleted")
