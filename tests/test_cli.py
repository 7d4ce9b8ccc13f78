"""The command line's face: names, help, errors, output modes. Real subprocesses of the entry script."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubectl_mirror.cli import main, parse_duration, parse_size, parse_verbosity, prog_name
from kubectl_mirror.progress import StatusLine
from kubectl_mirror.summary import Connections, Summary
from tests.netlab.recorder import Recorder

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "kubectl-mirror"
SAMPLE = REPO / "samples" / "web.pcap"


def run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_prog_name_follows_kubectl_plugin_naming() -> None:
    assert prog_name("/home/me/.krew/bin/kubectl-mirror") == "kubectl mirror"
    assert prog_name("mirror.py") == "mirror.py"


DURATIONS = [("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), ("7", 7.0)]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_sizes_and_verbosity() -> None:
    assert parse_size("4MiB") == 4 << 20 and parse_size("512k") == 512 << 10
    assert parse_verbosity("=6") == 6 and parse_verbosity("2") == 2


def test_help_speaks_as_kubectl_mirror() -> None:
    out = run("--help")
    assert out.returncode == 0
    assert "kubectl mirror [TYPE/NAME" in out.stdout and "deploy/web --to :8080" in out.stdout
    assert "Exit codes" in out.stdout
    replay = run("replay", "--help")
    assert replay.returncode == 0 and "kubectl mirror replay" in replay.stdout and "--speed" in replay.stdout


def test_version_names_tshark_and_the_client() -> None:
    out = run("--version")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0].startswith("kubectl-mirror ") and lines[1].startswith("tshark 4.")
    assert lines[2].startswith("kubernetes python client ")


@pytest.mark.parametrize("argv", [["replay", "x.pcap", "--port", "0"], ["--bogus"], ["replay"], ["-v=12", "pod/x"],
                                  ["pod/x", "--interface", "eth0 or 1"], ["pod/x", "--interface=-w"]])
def test_bad_flags_are_one_line(argv: list[str]) -> None:
    out = run(*argv)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and "--help" in out.stderr


def test_nothing_to_mirror_says_what_to_name() -> None:
    out = run("--to", ":9")
    assert out.returncode == 2 and "TYPE/NAME" in out.stderr


def test_output_json_is_the_summary_model() -> None:
    rec = Recorder("127.0.0.1", 0, http=True).start()
    try:
        out = run("replay", str(SAMPLE), "--to", f"127.0.0.1:{rec.port}", "-o", "json")
    finally:
        rec.stop(grace=5.0)
    assert out.returncode == 0, out.stderr
    summary = Summary.model_validate(json.loads(out.stdout))
    assert summary.connections.complete == 5 and summary.bytes_delivered > 0
    assert out.stderr == ""  # -o json: the table is not printed as well


def test_quiet_text_mode_prints_nothing_on_success() -> None:
    rec = Recorder("127.0.0.1", 0, http=True).start()
    try:
        out = run("replay", str(SAMPLE), "--to", f"127.0.0.1:{rec.port}", "-q")
    finally:
        rec.stop(grace=5.0)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""


def test_text_summary_ends_with_exactly_one_newline() -> None:
    # The shell prompt comes right after it: on a line of its own, without a blank line before it.
    rec = Recorder("127.0.0.1", 0, http=True).start()
    try:
        out = run("replay", str(SAMPLE), "--to", f"127.0.0.1:{rec.port}")
    finally:
        rec.stop(grace=5.0)
    assert out.returncode == 0, out.stderr
    assert out.stderr.endswith("\n") and not out.stderr.endswith("\n\n"), repr(out.stderr[-80:])


def _snapshot(packets: int, captured: int, seconds: float) -> Summary:
    return Summary(source="ns/web-1:80", target="127.0.0.1:8080", packets=packets, bytes_captured=captured,
                   tcp_segments=packets, connections=Connections(seen=3, complete=2, incomplete=1),
                   bytes_delivered=captured, duration_seconds=seconds, open_flows=1)


def test_status_line_redraws_in_place_on_a_terminal() -> None:
    buf = io.StringIO()
    line = StatusLine(buf, tty=True)
    line(_snapshot(10, 1000, 1.0))
    line(_snapshot(20, 3_000_000, 2.0))
    line.clear()
    text = buf.getvalue()
    assert text.count("\r\x1b[2K") == 3 and "\n" not in text
    assert "00:00:02  20 packets  3.0 MB  connections: 1 open, 2 replayed, 1 incomplete" in text


def test_status_line_shows_the_pods_followed_and_the_latest_move() -> None:
    buf = io.StringIO()
    line = StatusLine(buf, tty=False)
    line(_snapshot(10, 1000, 1.0).model_copy(update={"pods_now": 2, "latest_move": "web-abc -> web-def (rollout)"}))
    assert buf.getvalue().rstrip().endswith("pods: 2 (latest: web-abc -> web-def (rollout))")


def test_status_line_is_plain_lines_in_a_log() -> None:
    buf = io.StringIO()
    line = StatusLine(buf, tty=False)
    line(_snapshot(10, 1000, 1.0))
    line.clear()
    assert buf.getvalue().count("\n") == 1 and "\x1b" not in buf.getvalue()


def test_main_returns_usage_code_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kubectl-mirror", "replay", str(SAMPLE), "--to", "nonsense"]) == 2
    assert capsys.readouterr().err.startswith("error: invalid --to")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))


def test_remote_to_needs_allow_remote() -> None:
    # Refused before any connection is tried: nothing is sent to the address at all.
    out = run("replay", str(SAMPLE), "--to", "198.18.0.9:80")
    assert out.returncode == 2
    assert out.stderr.startswith("error: --to 198.18.0.9:80 is not on this machine") and "--allow-remote" in out.stderr


@pytest.mark.netns
def test_allow_remote_delivers_to_a_host_off_loopback(tmp_path: Path) -> None:
    from tests.netlab.lab import NsRecorder, contents, without_probe
    from tests.netlab.netns import veth_lab

    with veth_lab() as link:
        server = NsRecorder(link.server, tmp_path / "remote.json", 8080).start()
        try:
            argv = [str(SCRIPT), "replay", str(SAMPLE), "--to", f"{link.server_ip4}:8080", "--allow-remote", "-q"]
            out = subprocess.run(link.client.argv(argv), capture_output=True, text=True, timeout=60)
        finally:
            records = without_probe(server.stop())
    assert out.returncode == 0, out.stderr
    local = Recorder("127.0.0.1", 0, http=True).start()
    try:
        again = run("replay", str(SAMPLE), "--to", f"127.0.0.1:{local.port}", "-q")
    finally:
        expected = without_probe(local.stop(grace=5.0))
    assert again.returncode == 0
    assert contents(records) == contents(expected) and len(records) == 5


def test_status_line_shows_requests_per_second_in_http_mode() -> None:
    buf = io.StringIO()
    line = StatusLine(buf, tty=False)
    line(_snapshot(10, 1000, 1.0))
    assert "req/s" not in buf.getvalue()  # byte mode: no requests to count
    first = _snapshot(10, 1000, 1.0).model_copy(update={"protocols": {"http/1.x": 0, "h2": 0, "grpc": 0}})
    line(first)
    line(first.model_copy(update={"protocols": {"http/1.x": 0, "h2": 10**9, "grpc": 10**9}}))
    rate = int(buf.getvalue().splitlines()[-1].split("req/s")[0].split()[-1].replace(",", ""))
    assert rate > 1000  # HTTP/2 streams count as requests


def test_the_live_command_s_flags_are_typed_once() -> None:
    from kubectl_mirror.cli import build_live_parser, engine_settings, live_target
    from kubectl_mirror.settings import LiveTarget

    args = build_live_parser("kubectl mirror").parse_args(
        ["deploy/web", "--to", ":8080", "-c", "app", "--port", "http", "--all-pods", "--filter", "tcp[13] & 2 != 0",
         "--image", "nicolaka/netshoot:v0.13", "--tap-timeout", "2m", "--duration", "30s", "--count", "5", "-q"])
    assert live_target(args) == LiveTarget(
        ref="deploy/web", container="app", port="http", all_pods=True, filter="tcp[13] & 2 != 0",
        image="nicolaka/netshoot:v0.13", tap_timeout=120.0, duration=30.0, count=5)
    settings = engine_settings(args)
    assert (settings.to, settings.quiet) == (":8080", True)
    # Nothing a live run reads is left on the namespace alone: every live flag lands in one of the two.
    typed = {f for f in LiveTarget.__dataclass_fields__} | set(type(settings).__dataclass_fields__)
    connection = {"kubeconfig", "context", "cluster", "user", "namespace", "as_user", "as_group", "as_uid",
                  "request_timeout", "token", "server", "insecure_skip_tls_verify", "certificate_authority",
                  "client_certificate", "client_key", "verbosity", "tls_server_name", "username", "password",
                  "disable_compression", "cache_dir", "match_server_version"}
    assert set(vars(args)) - typed - connection == set(), set(vars(args)) - typed - connection
