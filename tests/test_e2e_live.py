"""Acceptance of live mode: `kubectl mirror TYPE/NAME --to :PORT` against pods that really serve.

Each pod is a network namespace registered with the test API server and running the ground-truth recorder
on port 80; real clients connect from the root namespace to the pod's IP. The CLI runs as a subprocess
(also through the real kubectl, by plugin discovery), injects its tap, runs tcpdump in the pod through exec,
and mirrors to a recorder on loopback. What the local recorder received must be byte-identical to what
the pod's application received, connection by connection (matched by content).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubectl_mirror.model import ACK, FIN, PSH, SYN
from tests.cli_run import Finished, cli_env, wait_for
from tests.dissect_helpers import ethernet, tcp_ip
from tests.live_helpers import (
    HTTP_CONTAINER,
    POD_PORT,
    HalfOpen,
    LiveLab,
    assert_one_line_error,
    curl_keepalive,
    live_lab,
    live_run,
    pcap_packet_count,
    raw_conns,
    run_once,
)
from tests.netlab.lab import REPO, contents, without_probe
from tests.netlab.recorder import ConnRecord, Recorder
from tests.netlab.traffic import payload

pytestmark = pytest.mark.netns

KUBECTL = "/usr/bin/kubectl"
PSA_ENFORCE = "pod-security.kubernetes.io/enforce"
# Pod names as a ReplicaSet would make them; sorted, "a" comes first.
POD_A, POD_B = "web-7d4b9c-aaaaa", "web-7d4b9c-bbbbb"


# ---- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path, stack: contextlib.ExitStack) -> Iterator[LiveLab]:
    with live_lab(tmp_path) as lab:
        yield lab


def deploy_web(lab: LiveLab, stack: contextlib.ExitStack, *, a_ready: bool = True) -> None:
    lab.add_serving_pod(stack, POD_A, ready=a_ready)
    lab.add_serving_pod(stack, POD_B)
    lab.fc.add_deployment("default", "web", {"app": "web"}, replicas=2, containers=[dict(HTTP_CONTAINER)])


def make_traffic(ip: str, tag: str, conns: int = 20) -> list[bytes]:
    """Raw connections with unique payloads, plus one curl keep-alive connection with three requests."""
    sent = raw_conns(ip, POD_PORT, conns, tag, size=1500)
    out = curl_keepalive(ip, POD_PORT, [f"/{tag}/a", f"/{tag}/b?q=1", f"/{tag}/c"])
    assert out.count("ok GET") == 3, out
    return sent


def mirrored(local: Recorder, expected: int) -> list[ConnRecord]:
    """What the local service received, without the --to reachability probe."""
    local.wait_idle(expected + 1, timeout=15.0)
    records = local.stop(grace=5.0)
    assert records and not records[0].data, describe(records[:3])  # the probe comes before anything is mirrored
    return without_probe(records)


def assert_byte_identical(got: list[ConnRecord], truth: list[ConnRecord], result: Finished) -> None:
    assert truth, "the pods received nothing: the scenario made no traffic"
    missing = [r for r in truth if bytes(r.data) not in contents(got)]
    extra = [r for r in got if bytes(r.data) not in contents(truth)]
    assert contents(got) == contents(truth), (describe(missing), describe(extra), result.stdout, result.stderr)
    assert all(r.end == "eof" for r in got), [r.end for r in got]
    conns = result.connections
    assert conns["seen"] == conns["complete"] == len(truth), conns
    for key in ("incomplete", "dropped", "failed", "skipped"):
        assert conns[key] == 0, (key, conns)
    assert result.summary["bytes_delivered"] == sum(len(r.data) for r in truth)
    assert result.summary["stream_gaps"] == 0


def describe(records: list[ConnRecord]) -> list[tuple[str, int, str, bytes]]:
    """Enough of each connection to see which one differs."""
    return sorted((r.client, len(r.data), r.end, bytes(r.data[:24])) for r in records)


def assert_no_tcpdump(lab: LiveLab) -> None:
    # The plugin waits for tcpdump to be gone before it exits; the server's reaper may lag a moment behind.
    assert wait_for(lambda: not lab.tcpdumps(), 5.0), lab.fc.exec_processes()


TCPDUMP_UID = pwd.getpwnam("tcpdump").pw_uid  # Debian's tcpdump switches to this user after opening the capture


def tcpdump_user(pid: int) -> int:
    """The real uid a capture process runs as once it is listening."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))


def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- mirroring a deployment ------------------------------------------------------------------------


def test_deploy_ctrl_c_mirrors_byte_exact_and_stops_tcpdump(lab: LiveLab, stack: contextlib.ExitStack,
                                                            local: Recorder) -> None:
    deploy_web(lab, stack)
    with live_run(["deploy/web", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        m = run.wait_mirroring()
        # Both pods are Ready: the first Ready one (by name) is mirrored, and only it got a tap.
        assert (m["ns"], m["pod"], m["port"], m["more"]) == ("default", POD_A, str(POD_PORT), None)
        assert [ec["name"] for ec in lab.ephemeral(POD_A)] == ["mirror-tap"]
        assert lab.ephemeral(POD_B) == []
        [pid] = lab.tcpdumps()
        # Debian's tcpdump, under the tap's securityContext, dropped root after opening the capture.
        assert tcpdump_user(pid) == TCPDUMP_UID
        sent = make_traffic(lab.pods[POD_A].ip, "sigint")
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    truth = lab.truth(POD_A)
    assert contents(truth) == sorted([*sent, *(bytes(r.data) for r in truth if r.http)])
    assert_byte_identical(mirrored(local, len(truth)), truth, result)
    assert result.summary["interrupted"] is True
    assert result.summary["source"].startswith(f"default/{POD_A}")
    assert_no_tcpdump(lab)


def test_deploy_duration_stops_by_itself(lab: LiveLab, stack: contextlib.ExitStack, local: Recorder) -> None:
    # The alphabetically first pod is not Ready: the plugin must pick the Ready one.
    deploy_web(lab, stack, a_ready=False)
    # The window is wide enough for the traffic below on a loaded CI machine: cut mid-way it would not be whole.
    with live_run(["deploy/web", "--to", f"127.0.0.1:{local.port}", "--duration", "6s", *lab.kube_args(),
                   "--json"]) as run:
        m = run.wait_mirroring()
        assert m["pod"] == POD_B
        make_traffic(lab.pods[POD_B].ip, "duration", conns=10)
        result = run.finish()
    assert result.returncode == 0, result.stderr
    truth = lab.truth(POD_B)
    assert_byte_identical(mirrored(local, len(truth)), truth, result)
    assert result.summary["interrupted"] is False
    assert lab.ephemeral(POD_A) == []
    assert_no_tcpdump(lab)


def test_through_real_kubectl_plugin_discovery(lab: LiveLab, stack: contextlib.ExitStack, local: Recorder) -> None:
    env = cli_env(path_first=REPO)
    listed = subprocess.run([KUBECTL, "plugin", "list"], capture_output=True, text=True, env=env, timeout=30,
                            check=False)
    assert str(REPO / "kubectl-mirror") in listed.stdout, (listed.stdout, listed.stderr)
    deploy_web(lab, stack)
    args = ["deploy/web", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]
    # kubectl execs the plugin in place, so the SIGINT below reaches the plugin as a terminal's Ctrl-C would.
    with live_run(args, argv0=[KUBECTL, "mirror"], env=env) as run:
        m = run.wait_mirroring()
        sent = make_traffic(lab.pods[m["pod"]].ip, "kubectl", conns=10)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    truth = lab.truth(m["pod"])
    assert len(truth) == len(sent) + 1
    assert_byte_identical(mirrored(local, len(truth)), truth, result)
    assert_no_tcpdump(lab)


def test_burst_of_concurrent_connections_is_not_lost(lab: LiveLab, stack: contextlib.ExitStack,
                                                     local: Recorder) -> None:
    lab.add_serving_pod(stack, POD_A)
    with live_run([f"pod/{POD_A}", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        run.wait_mirroring()
        # 40 clients at once, 20 kB each: a few hundred packets within milliseconds, a modest real burst.
        raw_conns(lab.pods[POD_A].ip, POD_PORT, 40, "burst", size=20000, pause=None)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    truth = lab.truth(POD_A)
    got = mirrored(local, len(truth))
    if contents(got) == contents(truth):
        assert_byte_identical(got, truth, result)
        return
    # tcpdump in the pod can still overflow on a loaded machine. Losing packets may happen to any capture;
    # losing them without a word, or delivering a connection with a hole, may not.
    assert any("tcpdump in pod" in w and "lost" in w for w in result.summary["warnings"]), result.stdout
    whole = contents(truth)
    suffixes = 0
    for r in got:
        data = bytes(r.data)
        if r.end == "eof" and data in whole:
            continue  # delivered: exactly a real connection
        if r.end == "eof":
            # Its first packets (the SYN among them) were lost, so it was mirrored as a connection joined
            # mid-stream, from its first captured byte to its end: a suffix of the real one, counted partial.
            assert any(t.endswith(data) for t in whole), describe([r])
            suffixes += 1
        else:
            assert r.end == "reset" and any(data in t for t in whole), describe([r])
    conns = result.connections
    assert conns["partial"] >= suffixes, conns
    assert conns["complete"] == sum(r.end == "eof" for r in got), conns
    assert conns["incomplete"] >= sum(r.end == "reset" for r in got), conns


def test_all_pods_mirrors_every_pod(lab: LiveLab, stack: contextlib.ExitStack, local: Recorder) -> None:
    deploy_web(lab, stack)
    with live_run(["deploy/web", "--all-pods", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(),
                   "--json"]) as run:
        m = run.wait_mirroring()
        assert m["more"] == "1"
        assert len(lab.tcpdumps()) == 2
        make_traffic(lab.pods[POD_A].ip, "all-a", conns=10)
        make_traffic(lab.pods[POD_B].ip, "all-b", conns=10)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    truth = lab.truth(POD_A) + lab.truth(POD_B)
    assert len(truth) == 22
    assert_byte_identical(mirrored(local, len(truth)), truth, result)
    assert_no_tcpdump(lab)


def test_service_named_target_port(lab: LiveLab, stack: contextlib.ExitStack, local: Recorder) -> None:
    lab.add_serving_pod(stack, POD_A)
    # The service's own port (8080) is not the pod's: the named targetPort must lead to containerPort 80.
    lab.fc.add_service("default", "web", selector={"app": "web"},
                       ports=[{"name": "web", "port": 8080, "targetPort": "http"}])
    with live_run(["svc/web", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        m = run.wait_mirroring()
        assert (m["pod"], m["port"]) == (POD_A, str(POD_PORT))
        make_traffic(lab.pods[POD_A].ip, "svc", conns=5)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    truth = lab.truth(POD_A)
    assert_byte_identical(mirrored(local, len(truth)), truth, result)


def test_baseline_namespace_falls_back_and_still_mirrors(lab: LiveLab, stack: contextlib.ExitStack,
                                                         local: Recorder) -> None:
    lab.fc.add_namespace("shop", labels={PSA_ENFORCE: "baseline"})
    lab.add_serving_pod(stack, POD_A, namespace="shop")
    with live_run([f"pod/{POD_A}", "-n", "shop", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(),
                   "--json"]) as run:
        m = run.wait_mirroring()
        assert m["ns"] == "shop"
        [tap] = lab.ephemeral(POD_A, "shop")
        # Baseline forbids adding NET_RAW: the tap keeps the runtime's own, and still drops root like on a
        # namespace without Pod Security.
        assert "NET_RAW" not in tap["securityContext"]["capabilities"]["add"], tap
        [pid] = lab.tcpdumps()
        assert tcpdump_user(pid) == TCPDUMP_UID
        make_traffic(lab.pods[POD_A].ip, "baseline", conns=5)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    notes = [ln for ln in result.stderr.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "Pod Security" in notes[0] and "NET_RAW" in notes[0], result.stderr
    truth = lab.truth(POD_A)
    assert_byte_identical(mirrored(local, len(truth)), truth, result)
    assert_no_tcpdump(lab)


# ---- failures: one line, no traceback, and no tap when the failure comes before it -------------------


def test_to_refused_before_any_tap(lab: LiveLab, stack: contextlib.ExitStack) -> None:
    deploy_web(lab, stack)
    result = run_once(["deploy/web", "--to", f"127.0.0.1:{free_port()}", *lab.kube_args()])
    assert_one_line_error(result, "cannot connect to", "--to", "connection refused")
    assert result.returncode == 1
    # Checked before the cluster is even asked: ephemeral containers cannot be removed again.
    assert not [p for _, p in lab.fc.requests if "/pods" in p], lab.fc.requests
    assert lab.ephemeral(POD_A) == lab.ephemeral(POD_B) == []


@pytest.mark.parametrize(
    ("case", "ref", "words", "code"),
    [
        ("unknown-type", "foo/bar", ['unknown resource type "foo"'], 2),
        ("not-found", "deploy/nope", ['deployments.apps "nope" not found', 'namespace "default"'], 1),
        ("no-running-pod", "deploy/web", ["no ready pod for deployment web", "Pending"], 1),
        ("rbac", "deploy/web", ["forbidden", "patch", "pods/ephemeralcontainers"], 1),
        ("restricted", "deploy/web", ["restricted", f"{PSA_ENFORCE}=restricted"], 1),
        ("no-ephemeral", "deploy/web", ["does not support ephemeral containers"], 1),
        ("image-pull", "deploy/web", ["cannot pull the tap image", "registry.invalid/tap:0"], 1),
    ],
)
def test_cluster_failures(lab: LiveLab, local: Recorder, case: str, ref: str, words: list[str], code: int) -> None:
    ns = "locked" if case == "restricted" else "default"
    if case == "restricted":
        lab.fc.add_namespace(ns, labels={PSA_ENFORCE: "restricted"})
    # These all fail before any exec: the pods need no namespace of their own.
    phase, ready = ("Pending", False) if case == "no-running-pod" else ("Running", True)
    lab.fc.add_pod(ns, POD_A, labels={"app": "web"}, containers=[dict(HTTP_CONTAINER)], phase=phase, ready=ready)
    lab.fc.add_deployment(ns, "web", {"app": "web"}, replicas=1, containers=[dict(HTTP_CONTAINER)])
    if case == "rbac":
        lab.fc.fail_forbidden(verb="patch", resource="pods", subresource="ephemeralcontainers")
    elif case == "no-ephemeral":
        lab.fc.fail_no_ephemeral_containers()
    elif case == "image-pull":
        lab.fc.fail_image_pull(image_prefix="registry.invalid/")
    result = run_once([ref, "-n", ns, "--to", f"127.0.0.1:{local.port}", "--image", "registry.invalid/tap:0",
                       *lab.kube_args()])
    assert_one_line_error(result, *words)
    assert result.returncode == code
    if case == "image-pull":
        assert [ec["image"] for ec in lab.ephemeral(POD_A, ns)] == ["registry.invalid/tap:0"]
    else:
        assert lab.ephemeral(POD_A, ns) == [], case
    assert not lab.tcpdumps()


def test_bad_filter_is_one_line_and_leaves_no_tcpdump(lab: LiveLab, stack: contextlib.ExitStack,
                                                      local: Recorder) -> None:
    lab.add_serving_pod(stack, POD_A)
    result = run_once([f"pod/{POD_A}", "--filter", "host and and", "--to", f"127.0.0.1:{local.port}",
                       *lab.kube_args()])
    assert_one_line_error(result, "tcpdump rejected the capture filter", "pcap-filter")
    assert result.returncode == 2
    # tcpdump really ran in the pod and refused the expression: nothing of it may be left running.
    assert any("tcpdump" in argv for _, argv in _exec_history(lab)), lab.fc.requests
    assert_no_tcpdump(lab)


def _exec_history(lab: LiveLab) -> list[tuple[str, list[str]]]:
    """Every exec the plugin asked for, as (path, command argv), from the API server's request log."""
    from urllib.parse import parse_qs, urlsplit

    out: list[tuple[str, list[str]]] = []
    for _, url in lab.fc.request_urls:
        parts = urlsplit(url)
        if parts.path.endswith("/exec"):
            out.append((parts.path, parse_qs(parts.query).get("command", [])))
    return out


# ---- capture only ----------------------------------------------------------------------------------


def test_capture_only_writes_a_private_pcapng(lab: LiveLab, stack: contextlib.ExitStack, tmp_path: Path) -> None:
    lab.add_serving_pod(stack, POD_A)
    out = tmp_path / "out.pcapng"
    with live_run([f"pod/{POD_A}", "-w", str(out), "--duration", "3s", *lab.kube_args(), "--json"]) as run:
        m = run.wait_mirroring()
        assert m["pod"] == POD_A
        make_traffic(lab.pods[POD_A].ip, "file", conns=5)
        # Then the pod is idle, as most are most of the time: the duration alone must end the run.
        result = run.finish(timeout=20.0)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    packets = pcap_packet_count(out)
    # 5 raw connections and one keep-alive connection: at least a handshake, data and a close each.
    assert packets >= 6 * 4
    assert result.summary["packets"] == packets
    assert f"wrote {packets} packets to {out}" in result.stderr
    assert lab.truth(POD_A)
    assert_no_tcpdump(lab)


def test_capture_to_stdout_is_only_the_capture(lab: LiveLab, stack: contextlib.ExitStack) -> None:
    lab.add_serving_pod(stack, POD_A)
    with live_run([f"pod/{POD_A}", "-w", "-", *lab.kube_args()], stdout_binary=True) as run:
        run.wait_mirroring()
        make_traffic(lab.pods[POD_A].ip, "stdout", conns=5)
        run.interrupt()
        result = run.finish(timeout=30.0)
    assert result.returncode == 0, result.stderr
    data = result.stdout_bytes
    assert data[:4] == b"\x0a\x0d\x0d\x0a", data[:64]  # a pcapng section header, nothing before it
    packets = pcap_packet_count(data)
    row = re.search(r"^\s+packets\s+([\d,]+)", result.stderr, re.MULTILINE)
    assert row is not None, result.stderr
    assert packets == int(row.group(1).replace(",", "")) and packets >= 6 * 4
    assert_no_tcpdump(lab)


# ---- the exec stream drops mid-run ------------------------------------------------------------------


def test_stream_drop_reconnects_and_cuts_spanning_connections(lab: LiveLab, stack: contextlib.ExitStack,
                                                               local: Recorder) -> None:
    lab.add_serving_pod(stack, POD_A)
    ip = lab.pods[POD_A].ip
    first, rest = payload("span", 0, 2000), payload("span", 1, 2000)
    with live_run([f"pod/{POD_A}", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        run.wait_mirroring()
        before = raw_conns(ip, POD_PORT, 5, "before")
        spanning = HalfOpen(ip, POD_PORT, first)
        stack.callback(spanning.close)
        # Only once its first part reached the local service is it certain to have been captured before the gap.
        assert wait_for(lambda: any(bytes(r.data) == first for r in list(local.records)), 20.0), run.stderr
        [old] = lab.tcpdumps()
        os.kill(old, signal.SIGKILL)  # the stream drops, as when a node's runtime kills the exec'd process
        assert wait_for(lambda: bool(lab.tcpdumps()) and old not in lab.tcpdumps(), 30.0), run.stderr

        def resumed_arrived() -> bool:
            # The new tcpdump runs before it captures: keep the spanning connection talking until its bytes after
            # the gap reach the local service again; from then on the capture is live.
            spanning.send(b"tick|")
            return any(b"tick|" in r.data for r in list(local.records))

        assert wait_for(resumed_arrived, 30.0, interval=0.2), run.stderr
        after = raw_conns(ip, POD_PORT, 5, "after")
        spanning.finish(rest)
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    truth = lab.truth(POD_A)
    spanned = bytes(spanning.sent)
    assert sorted(bytes(r.data) for r in truth) == sorted([*before, *after, spanned])
    got = mirrored(local, len(truth) + 1)
    whole = sorted([*before, *after])
    # The spanning connection: cut where the gap began (reset), never delivered whole across the gap; what it
    # sent after the gap comes as a connection of its own, joined mid-stream like any partial one: a tail of
    # what it sent, without holes.
    [cut] = [r for r in got if bytes(r.data) == first]
    assert cut.end == "reset", cut.end
    [resumed] = [r for r in got if b"tick|" in r.data]
    assert spanned.endswith(bytes(resumed.data)) and bytes(resumed.data).endswith(rest), describe([resumed])
    assert sorted(bytes(r.data) for r in got if r is not cut and r is not resumed) == whole, describe(got)
    conns = result.connections
    assert result.summary["stream_gaps"] >= 1
    assert (conns["incomplete"], conns["partial"]) == (1, 1), conns
    assert (conns["seen"], conns["complete"]) == (len(truth) + 1, len(whole) + 1), conns
    assert_no_tcpdump(lab)


# ---- what tcpdump says it lost ----------------------------------------------------------------------------


def _two_connections_pcap(path: Path, server: str) -> tuple[bytes, bytes]:
    """One connection that ends (FIN) and one still open when the capture ends; returns their client bytes."""
    whole, cut = payload("ended", 0, 900), payload("open-at-end", 1, 700)
    frames: list[bytes] = []
    for port, data, ends in ((41000, whole, True), (41001, cut, False)):
        c, s = 7000 + port, 90000 + port

        def add(client: bool, seq: int, ack: int, flags: int, data: bytes = b"", port: int = port) -> None:
            ends_ = ("10.200.0.9", server, port, POD_PORT) if client else (server, "10.200.0.9", POD_PORT, port)
            frames.append(ethernet(tcp_ip(*ends_, seq, ack, flags, data)))

        add(True, c, 0, SYN)
        add(False, s, c + 1, SYN | ACK)
        add(True, c + 1, s + 1, ACK)
        add(True, c + 1, s + 1, PSH | ACK, data)
        add(False, s + 1, c + 1 + len(data), ACK)
        if ends:
            add(True, c + 1 + len(data), s + 1, FIN | ACK)
            add(False, s + 1, c + 2 + len(data), FIN | ACK)
            add(True, c + 2 + len(data), s + 2, ACK)
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
    now = int(time.time())
    for i, frame in enumerate(frames):
        out += struct.pack("<IIII", now, i * 1000, len(frame), len(frame)) + frame
    path.write_bytes(bytes(out))
    return whole, cut


def _replaying_tcpdump(lab: LiveLab, pcap: Path, dropped: int) -> None:
    """A stand-in tcpdump for the pod: writes `pcap`, runs until stopped, then reports `dropped` packets lost."""
    bindir = lab.workdir / "bin"
    bindir.mkdir()
    play = bindir / "play.sh"
    counters = f"2 packets captured\n{2 + dropped} packets received by filter\n{dropped} packets dropped by kernel"
    play.write_text(f"""#!/bin/bash
trap 'printf "{counters}\\n" >&2; exit 0' INT TERM
echo "tcpdump: listening on any, link-type EN10MB (Ethernet), snapshot length 262144 bytes" >&2
cat {pcap}
for i in $(seq 600); do sleep 0.1; done
""")
    tcpdump = bindir / "tcpdump"
    # `exec -a`: what the plugin's stop checks before it signals is that the process is tcpdump.
    tcpdump.write_text(f'#!/bin/bash\nexec -a tcpdump /bin/bash {play} "$@"\n')
    tcpdump.chmod(0o755)
    lab.fc.exec_path_prepend = [str(bindir)]


@pytest.mark.parametrize("dropped", [0, 3])
def test_connections_open_at_the_end_of_a_lossy_capture_are_not_closed_as_whole(
        lab: LiveLab, stack: contextlib.ExitStack, local: Recorder, dropped: int) -> None:
    # tcpdump can lose a connection's last packets, its FIN among them: nothing in the capture shows a hole, only
    # tcpdump's counters at its exit. Such a connection must not reach the local service as if it had ended.
    lab.add_serving_pod(stack, POD_A)
    whole, cut = _two_connections_pcap(lab.workdir / "played.pcap", lab.pods[POD_A].ip)
    _replaying_tcpdump(lab, lab.workdir / "played.pcap", dropped)
    result = run_once([f"pod/{POD_A}", "--to", f"127.0.0.1:{local.port}", "--duration", "2s", *lab.kube_args(),
                       "--json"])
    assert result.returncode == 0, result.stderr
    got = {bytes(r.data): r.end for r in mirrored(local, 2)}
    conns = result.connections
    if dropped:
        assert got == {whole: "eof", cut: "reset"}, (describe(list(local.records)), result.stderr[-2000:])
        assert (conns["complete"], conns["incomplete"]) == (1, 1), conns
        assert any(f"lost {dropped} packets" in w for w in result.summary["warnings"]), result.stdout
    else:
        # Nothing lost: the capture simply ended while it was open, and all it sent so far was delivered.
        assert got == {whole: "eof", cut: "eof"}, describe(list(local.records))
        assert (conns["complete"], conns["incomplete"]) == (2, 0), conns
    assert result.summary["stream_gaps"] == 0
    assert_no_tcpdump(lab)


# ---- Ctrl-C twice ---------------------------------------------------------------------------------------------


def test_second_ctrl_c_quits_at_once_and_says_how_to_stop_the_tcpdump_left(
        lab: LiveLab, stack: contextlib.ExitStack, local: Recorder) -> None:
    # A tcpdump slow to stop (this stand-in ignores SIGINT, so the stop waits before it escalates): the user presses
    # Ctrl-C again and leaves at once. What is left in the pod must be named with the command that removes it.
    lab.add_serving_pod(stack, POD_A)
    bindir = lab.workdir / "bin"
    bindir.mkdir()
    header = bindir / "empty.pcap"
    header.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
    stub = bindir / "stub.sh"
    stub.write_text(f"""trap '' INT
echo "tcpdump: listening on any, link-type EN10MB (Ethernet), snapshot length 262144 bytes" >&2
cat {header}
for i in $(seq 600); do sleep 0.1; done
""")
    (bindir / "tcpdump").write_text(f'#!/bin/bash\nexec -a tcpdump /bin/bash {stub} "$@"\n')
    (bindir / "tcpdump").chmod(0o755)
    lab.fc.exec_path_prepend = [str(bindir)]
    with live_run([f"pod/{POD_A}", "--to", f"127.0.0.1:{local.port}", *lab.kube_args()]) as run:
        run.wait_mirroring()
        [pid] = lab.tcpdumps()
        run.interrupt()
        assert wait_for(lambda: "Ctrl-C again" in run.stderr, 10.0), run.stderr
        time.sleep(0.5)  # the stop has sent its SIGINT by now and waits for an exit that will not come
        run.interrupt()
        result = run.finish(10.0)
    assert result.returncode == 130, result.stderr
    hints = [line for line in result.stderr.splitlines() if line.startswith("warning: tcpdump")]
    assert hints == [f"warning: tcpdump (pid {pid}) may still run in pod default/{POD_A}: stop it with kubectl exec "
                     f"-n default {POD_A} -c mirror-tap -- kill {pid}"], result.stderr
    assert lab.tcpdumps() == [pid]
    # The hint works as printed, through the real kubectl.
    command = hints[0].split("stop it with ", 1)[1].split()
    done = subprocess.run([KUBECTL, "--kubeconfig", str(lab.fc.kubeconfig), *command[1:]], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert_no_tcpdump(lab)
