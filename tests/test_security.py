"""Security acceptance: least privilege, no secrets in logs, a tap that can capture and nothing more, no shell for
hostile input, private capture files.

Everything runs for real: the CLI as a subprocess against the test API server (RBAC enforced through
allow_only), pods that are network namespaces running the ground-truth recorder, real clients, real tcpdump.
The Role under test is parsed from README.md, so the documentation and this test cannot drift apart.
"""

from __future__ import annotations

import contextlib
import re
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.cli_run import Finished, cli_env, wait_for
from tests.live_helpers import (
    HTTP_CONTAINER,
    POD_PORT,
    LiveLab,
    assert_one_line_error,
    live_lab,
    live_run,
    raw_connection,
    run_once,
)
from tests.netlab.lab import CLI, REPO, contents, without_probe
from tests.netlab.recorder import Recorder
from tests.security_helpers import Permission, readme_role, role_permissions, shell_invocations, write_capture

# A token nobody would print by accident: if it shows up on stderr, the plugin (or a library it let log) did.
TOKEN = "tok-" + "Zq8rX3vW" * 4
POD = "web-7d4b9c-aaaaa"
PSA_ENFORCE = "pod-security.kubernetes.io/enforce"
# Unique per session: other developers share /tmp, and a stale file must not make (or hide) a failure.
RUN_ID = uuid.uuid4().hex[:10]
SECRET_WARNING = "secrets included"

ROLE = role_permissions(readme_role())
# The run that needs each README resource: the one whose resolution (or tap, or capture) calls it.
REF_NEEDING = {
    "pods": "deploy/web",  # list (deployment's pods), get (tap re-read), watch (tap start)
    "pods/ephemeralcontainers": "deploy/web",
    "pods/exec": "deploy/web",
    "services": "svc/web",
    "deployments": "deploy/web",
    "replicasets": "rs/web-rs",
    "statefulsets": "sts/web-sts",
    "daemonsets": "ds/web-ds",
    "jobs": "job/web-job",
}
# Permissions whose call comes after the tap was added: their failure may leave the tap (never a tcpdump).
AFTER_TAP = {("watch", "pods", ""), ("get", "pods", "exec"), ("create", "pods", "exec")}
FORBIDDEN_LINE = re.compile(r"^error: forbidden(?: \(as [^)]*\))?: cannot (?P<verb>\S+) (?P<resource>\S+) "
                            r"in namespace ")


# ---- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture
def lab(tmp_path: Path, stack: contextlib.ExitStack) -> Iterator[LiveLab]:
    with live_lab(tmp_path, token=TOKEN) as lab:
        yield lab


def serve_workloads(lab: LiveLab, stack: contextlib.ExitStack, namespace: str = "default") -> None:
    """One serving pod that every kind of TYPE/NAME resolves to."""
    lab.add_serving_pod(stack, POD, namespace=namespace)
    sel = {"app": "web"}
    containers = [dict(HTTP_CONTAINER)]
    lab.fc.add_deployment(namespace, "web", sel, containers=containers)
    lab.fc.add_replicaset(namespace, "web-rs", sel, containers=containers)
    lab.fc.add_statefulset(namespace, "web-sts", sel, containers=containers)
    lab.fc.add_daemonset(namespace, "web-ds", sel, containers=containers)
    lab.fc.add_job(namespace, "web-job", sel, containers=containers)
    lab.fc.add_service(namespace, "web", sel, [{"name": "http", "port": 8080, "targetPort": "http"}])


def assert_no_tcpdump(lab: LiveLab, results: Sequence[Finished] = ()) -> None:
    # The plugin waits for tcpdump to be gone before it exits; the server's reaper may lag a moment behind.
    # On failure, what the runs said (their warnings name a stop that failed) is what explains it.
    said = [(r.returncode, r.stdout[-2000:], r.stderr[-2000:]) for r in results]
    assert wait_for(lambda: not lab.tcpdumps(), 5.0), (lab.fc.exec_processes(), said)


def secret(tag: str) -> bytes:
    """A payload whose first bytes are a unique marker (what a -v=9 preview shows) and with a second one deep
    inside (no preview may show it, but no lower level may print either)."""
    head = f"SECRET-{tag}-{RUN_ID}-".encode()
    return head + b"." * 200 + f"DEEP-{tag}-{RUN_ID}".encode() + b"\n"


def markers(data: bytes) -> list[str]:
    return re.findall(r"(?:SECRET|DEEP)-[\w-]+?-" + RUN_ID, data.decode())


def received(local: Recorder, data: bytes) -> bool:
    with local.lock:
        return any(bytes(r.data) == data and r.end == "eof" for r in local.records)


# ---- 1. the README's Role is exactly enough ---------------------------------------------------------------


def test_readme_role_maps_onto_the_servers_rbac_names() -> None:
    # The block parsed at all, and into what the test server enforces: a typo here would make every run
    # below test some other Role.
    assert ROLE, "the README Role grants nothing"
    for p in ROLE:
        assert p.full in REF_NEEDING, f"README grants {p.verb} {p.full}, which no code path is known to need"
    assert {p.rule for p in ROLE} >= {("get", "pods", ""), ("patch", "pods", "ephemeralcontainers")}


@pytest.mark.netns
def test_readme_role_is_enough_for_a_byte_exact_live_mirror(lab: LiveLab, stack: contextlib.ExitStack,
                                                            local: Recorder) -> None:
    serve_workloads(lab, stack)
    lab.fc.allow_only([p.rule for p in ROLE])
    with live_run(["deploy/web", "--to", f"127.0.0.1:{local.port}", *lab.kube_args(), "--json"]) as run:
        m = run.wait_mirroring()
        assert m["pod"] == POD
        sent = [secret(f"role{i}") for i in range(5)]
        for data in sent:
            raw_connection(lab.pods[POD].ip, POD_PORT, data)
            # Apart, as a modest client load: a burst overruns tcpdump's tiny ring (a known, separate xfail
            # in test_e2e_live), and this test is about permissions.
            time.sleep(0.05)
        assert wait_for(lambda: all(received(local, d) for d in sent), 15.0), run.stderr
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    truth = lab.truth(POD)
    assert contents(truth) == sorted(sent)
    got = without_probe(local.stop(grace=5.0))
    assert contents(got) == contents(truth), result.stderr
    conns = result.connections
    assert conns["seen"] == conns["complete"] == len(sent), conns
    assert result.summary["bytes_delivered"] == sum(map(len, sent))
    assert_no_tcpdump(lab)


@pytest.mark.netns
def test_readme_role_resolves_every_kind(lab: LiveLab, stack: contextlib.ExitStack, local: Recorder) -> None:
    # Every TYPE the README lists a resource for works under the Role alone. The runs go at once (they converge
    # on one tap): what resolution needs per kind is the point here, and the file's time budget is small.
    serve_workloads(lab, stack)
    lab.fc.allow_only([p.rule for p in ROLE])
    refs = sorted(set(REF_NEEDING.values()))
    with contextlib.ExitStack() as runs:
        started = [runs.enter_context(live_run([ref, "--to", f"127.0.0.1:{local.port}", "--duration", "1s",
                                                *lab.kube_args(), "--json"])) for ref in refs]
        results = [run.finish() for run in started]
    for ref, result in zip(refs, results, strict=True):
        assert result.returncode == 0, (ref, result.stderr)
        assert result.summary["source"].startswith(f"default/{POD}"), (ref, result.stdout)
    assert [ec["name"] for ec in lab.ephemeral(POD)] == ["mirror-tap"]
    assert_no_tcpdump(lab, results)


def _role_case(p: Permission) -> Any:
    return pytest.param(p, id=p.id, marks=[pytest.mark.netns])


@pytest.mark.parametrize("perm", [_role_case(p) for p in ROLE])
def test_each_role_permission_taken_away_fails_naming_it(lab: LiveLab, stack: contextlib.ExitStack,
                                                         local: Recorder, perm: Permission) -> None:
    serve_workloads(lab, stack)
    lab.fc.allow_only([p.rule for p in ROLE if p != perm])
    if perm.rule == ("get", "pods", "exec"):
        # What the Role grants for API servers before 1.31, which authorize the exec WebSocket as "get".
        lab.fc.exec_upgrade_verb = "get"
    ref = REF_NEEDING[perm.full]
    # --duration: a run that wrongly succeeds ends by itself, and the test fails on its exit code.
    result = run_once([ref, "--to", f"127.0.0.1:{local.port}", "--duration", "2s", *lab.kube_args()])
    line = assert_one_line_error(result, "forbidden")
    m = FORBIDDEN_LINE.match(line)
    assert m is not None, line
    assert m["verb"] == perm.verb, (perm, line)
    # deployments.apps is how the server names the resource; pods/exec names the subresource.
    assert m["resource"] in (perm.full, f"{perm.resource}.{perm.group}"), (perm, line)
    if perm.rule not in AFTER_TAP:
        assert lab.ephemeral(POD) == [], "the failure came before the tap, yet a tap was added"
    assert_no_tcpdump(lab)


# ---- 2. payloads only at -v=9, the token never ------------------------------------------------------------


@pytest.mark.parametrize("level", range(10))
def test_replay_prints_payload_bytes_only_at_v9(tmp_path: Path, local: Recorder, level: int) -> None:
    sent = [secret(f"replay{level}x{i}") for i in range(3)]
    pcap = tmp_path / "secrets.pcapng"
    write_capture(pcap, sent)
    result = run_once(["replay", str(pcap), "--to", f"127.0.0.1:{local.port}", f"-v={level}", "--json"])
    assert result.returncode == 0, result.stderr
    # The bytes really went through the engine (with logging on), so their absence from stderr means something.
    assert contents(without_probe(local.stop(grace=5.0))) == sorted(sent)
    shown = markers(result.stderr.encode())
    if level < 9:
        assert shown == [], result.stderr
    else:
        assert {f"SECRET-replay9x{i}-{RUN_ID}" for i in range(3)} <= set(shown), result.stderr
        assert not any(s.startswith("DEEP-") for s in shown), "a preview is 64 bytes, not the whole payload"


@pytest.mark.netns
@pytest.mark.parametrize("levels", [range(5), range(5, 10)], ids=["v0-4", "v5-9"])
def test_live_prints_payload_bytes_only_at_v9_and_never_the_token(lab: LiveLab, stack: contextlib.ExitStack,
                                                                   local: Recorder, levels: range) -> None:
    lab.add_serving_pod(stack, POD)
    data = secret(f"live{levels[0]}")
    # One run per level, side by side: each has its own tcpdump, so each mirrors its own copy of the connection.
    with contextlib.ExitStack() as runs:
        started = [runs.enter_context(live_run([f"pod/{POD}", "--to", f"127.0.0.1:{local.port}", f"-v={level}",
                                                *lab.kube_args()])) for level in levels]
        for run in started:
            run.wait_mirroring()
        raw_connection(lab.pods[POD].ip, POD_PORT, data)

        def copies() -> int:
            with local.lock:
                return sum(1 for r in local.records if bytes(r.data) == data and r.end == "eof")

        # The payload went through every run's engine (with its logging on) before the runs stop.
        assert wait_for(lambda: copies() == len(levels), 20.0), (copies(), [r.stderr for r in started])
        for run in started:
            run.interrupt()
        results = [run.finish() for run in started]
    for level, result in zip(levels, results, strict=True):
        assert result.returncode == 0, (level, result.stderr)
        assert TOKEN not in result.stderr and TOKEN not in result.stdout, level
        shown = markers(result.stderr.encode())
        if level < 9:
            assert shown == [], (level, result.stderr)
        else:
            assert shown == [f"SECRET-live5-{RUN_ID}"], result.stderr
        if level >= 4:
            # The levels below 9 are not just quiet: they log the flows, only without their bytes.
            assert "flow" in result.stderr, (level, result.stderr)
    assert_no_tcpdump(lab)


@pytest.mark.netns
def test_token_never_printed_on_failures_or_status(lab: LiveLab, stack: contextlib.ExitStack, tmp_path: Path,
                                                   local: Recorder) -> None:
    lab.add_serving_pod(stack, POD)
    # A stale token: the 401 path must not echo what was sent.
    wrong = "tok-" + "Wr0ngW" * 5
    stale = tmp_path / "stale-kubeconfig"
    stale.write_text(lab.fc.kubeconfig.read_text().replace(TOKEN, wrong))
    assert wrong in stale.read_text()
    runs = {
        "401": (run_once([f"pod/{POD}", "--to", f"127.0.0.1:{local.port}", "-v=9", "--kubeconfig", str(stale)]),
                wrong),
        "status": (run_once(["status", "-v=9", *lab.kube_args()]), TOKEN),
    }
    lab.fc.allow_only([("get", "pods", "")])
    runs["403"] = (run_once([f"pod/{POD}", "--to", f"127.0.0.1:{local.port}", "-v=9", *lab.kube_args()]), TOKEN)
    lab.fc.allow_only([("*", "*", "*")])
    runs["404"] = (run_once(["deploy/nope", "--to", f"127.0.0.1:{local.port}", "-v=9", *lab.kube_args()]), TOKEN)
    for what, (result, token) in runs.items():
        assert "Traceback" not in result.stderr, (what, result.stderr)
        assert token not in result.stderr and token not in result.stdout, (what, result.stderr)
    assert runs["status"][0].returncode == 0, runs["status"][0].stderr
    for what in ("401", "403", "404"):
        assert runs[what][0].returncode != 0, (what, runs[what][0].stderr)
    assert "credentials" in runs["401"][0].stderr and "forbidden" in runs["403"][0].stderr


# ---- 3. the tap asks for what tcpdump needs (NET_RAW, SETUID, SETGID, KILL) and nothing more ----------------


def _pod_without_taps(pod: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in pod["spec"].items() if k != "ephemeralContainers"}


def _assert_locked_down(tap: dict[str, Any]) -> dict[str, Any]:
    sc = tap["securityContext"]
    assert sc.get("privileged") in (None, False), sc
    assert sc["allowPrivilegeEscalation"] is False, sc
    assert sc["readOnlyRootFilesystem"] is True, sc
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, sc
    # Nothing an ephemeral container could use to widen its reach beyond the pod's own namespaces.
    for key in ("volumeMounts", "volumeDevices", "env", "envFrom"):
        assert not tap.get(key), (key, tap)
    assert "procMount" not in sc and "windowsOptions" not in sc, sc
    return dict(sc)


@pytest.mark.netns
def test_tap_asks_for_what_tcpdump_needs_only(lab: LiveLab, stack: contextlib.ExitStack, local: Recorder) -> None:
    lab.add_serving_pod(stack, POD)
    before = lab.fc.get_pod("default", POD)
    result = run_once([f"pod/{POD}", "--to", f"127.0.0.1:{local.port}", "--duration", "1s", *lab.kube_args()])
    assert result.returncode == 0, result.stderr
    after = lab.fc.get_pod("default", POD)
    [tap] = after["spec"]["ephemeralContainers"]
    sc = _assert_locked_down(tap)
    # Capture, drop root to tcpdump's own user (Debian's and Fedora's builds), and stop that tcpdump: no more.
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_RAW", "SETUID", "SETGID", "KILL"]}, sc
    # The tap changed nothing else about the pod: no host network, PID or IPC namespace, no new volumes.
    assert _pod_without_taps(after) == _pod_without_taps(before)
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not after["spec"].get(key), (key, after["spec"])
    assert_no_tcpdump(lab)


@pytest.mark.netns
def test_tap_under_baseline_adds_no_capability_beyond_baseline(lab: LiveLab, stack: contextlib.ExitStack,
                                                               local: Recorder) -> None:
    lab.fc.add_namespace("shop", labels={PSA_ENFORCE: "baseline"})
    lab.add_serving_pod(stack, POD, namespace="shop")
    before = lab.fc.get_pod("shop", POD)
    result = run_once([f"pod/{POD}", "-n", "shop", "--to", f"127.0.0.1:{local.port}", "--duration", "1s",
                       *lab.kube_args()])
    assert result.returncode == 0, result.stderr
    after = lab.fc.get_pod("shop", POD)
    [tap] = after["spec"]["ephemeralContainers"]
    sc = _assert_locked_down(tap)
    # Only what baseline allows adding; NET_RAW is the runtime's own, every default the tap has no use for goes.
    assert sc["capabilities"]["add"] == ["SETUID", "SETGID", "KILL"], sc
    assert {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETFCAP", "SETPCAP"} <= set(sc["capabilities"]["drop"]), sc
    assert _pod_without_taps(after) == _pod_without_taps(before)
    assert_no_tcpdump(lab)


# ---- 4. hostile names and flags never reach a shell ----------------------------------------------------------


def _marker(n: int) -> str:
    return f"x-PWN{n}-{RUN_ID}"


HOSTILE = [
    pytest.param(["pod/" + POD, "--filter", f"$(touch /tmp/{_marker(1)})"], "tcpdump rejected", id="filter-subst"),
    pytest.param(["pod/" + POD, "--filter", f"port 80; touch /tmp/{_marker(2)}"], "tcpdump rejected",
                 id="filter-semicolon"),
    pytest.param(["deploy/web", "-n", f"a;touch /tmp/{_marker(3)}"], "not found", id="namespace"),
    pytest.param([f"deploy/$(touch /tmp/{_marker(4)})"], "invalid target", id="ref-with-slash"),
    # No slash, so it reaches the API server; relative, so a shell would write it into its working directory.
    pytest.param([f"deploy/web;touch${{IFS}}{_marker(5)}"], "not found", id="ref-to-api"),
    pytest.param(["pod/" + POD, "--container", "$(id)"], 'container "$(id)" not found', id="container"),
    pytest.param(["pod/" + POD, "--container", f"`touch /tmp/{_marker(6)}`"], "not found", id="container-backtick"),
]


def _marker_files(lab: LiveLab) -> list[str]:
    """Every place a marker could have landed: the host's view and the pod's (ip netns exec remounts some)."""
    places = [Path("/tmp"), REPO, Path("/"), lab.workdir, Path.home()]
    found = [str(p / _marker(n)) for p in places for n in range(1, 7) if (p / _marker(n)).exists()]
    for pod in lab.pods.values():
        out = subprocess.run(["ip", "netns", "exec", pod.netns.name, "ls", "-a", "/tmp", "/"], capture_output=True,
                             text=True, timeout=10, check=False)
        assert out.returncode == 0, out.stderr
        found += [f"{pod.netns.name}: {line}" for line in out.stdout.splitlines() if RUN_ID in line]
    return found


@pytest.mark.netns
@pytest.mark.parametrize(("args", "says"), HOSTILE)
def test_hostile_input_fails_cleanly_and_runs_nothing(lab: LiveLab, stack: contextlib.ExitStack,
                                                      local: Recorder, args: list[str], says: str) -> None:
    serve_workloads(lab, stack)
    result = run_once([*args, "--to", f"127.0.0.1:{local.port}", "--duration", "2s", *lab.kube_args()])
    assert_one_line_error(result, says)
    assert "uid=" not in result.stderr, "$(id) was expanded somewhere"
    assert _marker_files(lab) == []
    assert_no_tcpdump(lab)


def test_replay_file_names_with_shell_metacharacters(tmp_path: Path, local: Recorder) -> None:
    sent = [secret(f"meta{i}") for i in range(2)]
    name = f"cap $(touch {_marker(7)}) ; `id` 'q\" & | < > *.pcapng"
    pcap = tmp_path / name
    write_capture(pcap, sent)
    result = run_once(["replay", str(pcap), "--to", f"127.0.0.1:{local.port}", "--json"])
    assert result.returncode == 0, result.stderr
    assert contents(without_probe(local.stop(grace=5.0))) == sorted(sent)
    missing = run_once(["replay", str(tmp_path / f"no $(touch {_marker(8)}).pcap"), "--to", ":1"])
    assert_one_line_error(missing)
    for where in (tmp_path, REPO, Path("/tmp"), Path("/")):
        assert not (where / _marker(7)).exists() and not (where / _marker(8)).exists(), where
    assert "uid=" not in result.stderr + missing.stderr


def test_pkg_never_calls_a_local_shell(tmp_path: Path) -> None:
    found = shell_invocations(REPO / "pkg")
    assert found == [], found
    # The scan finds what it looks for (a scan that cannot fail proves nothing).
    (tmp_path / "bad.py").write_text("import os, subprocess\nos.system('x')\nsubprocess.run('x', shell=True)\n"
                                     "from os import popen\n")
    assert len(shell_invocations(tmp_path)) >= 3, shell_invocations(tmp_path)


# ---- 5. capture files are private --------------------------------------------------------------------------


UMASK0 = ["sh", "-c", 'umask 0 && : > "$KM_UMASK_PROBE" && exec "$@"', "sh", sys.executable, str(CLI)]


def _umask0_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    probe = tmp_path / "umask-probe"
    return {**cli_env(), "KM_UMASK_PROBE": str(probe)}, probe


def _assert_private_capture(path: Path, result: Finished, probe: Path, data: bytes) -> None:
    # The probe, made by the same shell, proves the umask really was permissive.
    assert stat.S_IMODE(probe.stat().st_mode) == 0o666, oct(probe.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, oct(path.stat().st_mode)
    warnings = [ln for ln in result.stderr.splitlines() if SECRET_WARNING in ln]
    assert len(warnings) == 1 and str(path) in warnings[0] and "0600" in warnings[0], result.stderr
    # The file really holds the secret: what the warning is about.
    assert data[:40] in path.read_bytes()


@pytest.mark.netns
@pytest.mark.parametrize("mode", ["mirror", "capture-only"])
def test_capture_file_is_0600_under_umask_0(lab: LiveLab, stack: contextlib.ExitStack, tmp_path: Path,
                                            local: Recorder, mode: str) -> None:
    lab.add_serving_pod(stack, POD)
    env, probe = _umask0_env(tmp_path)
    out = tmp_path / "capture.pcapng"
    # Capture-only stops by --count (it checks its limits only when packets come): one connection is more
    # than 6 packets, its data segment the 4th.
    to = ["--to", f"127.0.0.1:{local.port}"] if mode == "mirror" else ["--count", "6"]
    data = secret(f"file-{mode}")
    with live_run([f"pod/{POD}", *to, "-w", str(out), *lab.kube_args()], argv0=UMASK0, env=env) as run:
        run.wait_mirroring()
        raw_connection(lab.pods[POD].ip, POD_PORT, data)
        if mode == "mirror":
            assert wait_for(lambda: received(local, data), 15.0), run.stderr
            run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    _assert_private_capture(out, result, probe, data)
    assert_no_tcpdump(lab)


@pytest.mark.netns
def test_capture_over_an_existing_readable_file_is_made_private(lab: LiveLab, stack: contextlib.ExitStack,
                                                                tmp_path: Path, local: Recorder) -> None:
    lab.add_serving_pod(stack, POD)
    env, probe = _umask0_env(tmp_path)
    out = tmp_path / "old.pcapng"
    out.write_bytes(b"old")
    out.chmod(0o644)
    data = secret("file-existing")
    with live_run([f"pod/{POD}", "--to", f"127.0.0.1:{local.port}", "-w", str(out), *lab.kube_args()], argv0=UMASK0,
                  env=env) as run:
        run.wait_mirroring()
        raw_connection(lab.pods[POD].ip, POD_PORT, data)
        assert wait_for(lambda: received(local, data), 15.0), run.stderr
        run.interrupt()
        result = run.finish()
    assert result.returncode == 0, result.stderr
    _assert_private_capture(out, result, probe, data)
