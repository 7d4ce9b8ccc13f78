"""The one-file binary `make dist` ships: it runs with no Python around and does what the source CLI does.

Building takes about a minute; `krew/build.py dist` skips it when nothing that goes into the binary changed,
so these tests only pay for it after a change. test_krew.py reuses the helpers here.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.netlab.recorder import ConnRecord, Recorder

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "krew" / "build.py"
SAMPLE = REPO / "samples" / "web.pcap"
SAMPLE_SERVER_PORT = 8080  # samples/README.md
CLEAN_PATH = "/usr/bin:/bin"  # what a bare login shell has; tshark is in /usr/bin
IMPORT_CHECK_ENV = "KUBECTL_MIRROR_IMPORT_CHECK"  # krew/entry.py
BUILD_TIMEOUT = 900.0
RUN_TIMEOUT = 120.0


def load_build_module() -> ModuleType:
    """krew/build.py as a module (krew/ is not a package: it is tooling, not part of what ships)."""
    spec = importlib.util.spec_from_file_location("krew_build", BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["krew_build"] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


def package_version() -> str:
    sys.path.insert(0, str(REPO / "pkg"))
    try:
        from kubectl_mirror import __version__
    finally:
        sys.path.pop(0)
    return str(__version__)


@dataclass(frozen=True)
class Built:
    archive: Path
    stderr: str


@functools.cache
def build_archive() -> Built:
    """This machine's archive, (re)built by `krew/build.py dist` only when its inputs changed."""
    done = subprocess.run([sys.executable, str(BUILD_SCRIPT), "dist"], cwd=REPO, capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        pytest.fail(f"krew/build.py dist failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return Built(Path(done.stdout.strip().splitlines()[-1]), done.stderr)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unpack(archive: Path, into: Path) -> dict[str, tarfile.TarInfo]:
    """Extract like krew does (a plain tar.gz extraction) and return the members by name."""
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        tar.extractall(into, filter="data")  # the "data" filter refuses absolute paths and links out of `into`
    return members


def clean_env(home: Path, path: str = CLEAN_PATH, **extra: str) -> list[str]:
    """`env -i` with only PATH and HOME: no PYTHONPATH, no VIRTUAL_ENV, nothing inherited from the venv."""
    return ["/usr/bin/env", "-i", f"PATH={path}", f"HOME={home}", *(f"{k}={v}" for k, v in extra.items())]


def run(argv: list[str], timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


# --- what the sample should deliver, from tshark alone (independent of the project's reassembly) -------------

@functools.cache
def expected_streams() -> tuple[bytes, ...]:
    """Each connection's client-to-server bytes in samples/web.pcap, sorted: what a replay must deliver."""
    out = subprocess.run(
        ["tshark", "-n", "-r", str(SAMPLE), "-Y", f"tcp.dstport=={SAMPLE_SERVER_PORT} && tcp.len>0",
         "-T", "fields", "-e", "tcp.stream", "-e", "tcp.seq_raw", "-e", "tcp.payload"],
        capture_output=True, text=True, timeout=60, check=True)
    # Keyed by sequence number so a retransmitted segment counts once.
    streams: dict[str, dict[int, bytes]] = defaultdict(dict)
    for line in out.stdout.splitlines():
        stream, seq, payload = line.split("\t")
        streams[stream][int(seq)] = bytes.fromhex(payload.replace(":", ""))
    result = tuple(sorted(b"".join(segs[s] for s in sorted(segs)) for segs in streams.values()))
    assert len(result) == 5, result  # the sample's README: 5 connections; anything else means it changed
    return result


def data_records(records: list[ConnRecord]) -> list[ConnRecord]:
    """All but the empty connection `--to`'s reachability probe makes before replaying."""
    empty = [r for r in records if not r.data]
    assert len(empty) <= 1, f"more than one empty connection: {records}"
    return [r for r in records if r.data]


@dataclass
class Replayed:
    proc: subprocess.CompletedProcess[str]
    records: list[ConnRecord]

    @property
    def summary(self) -> dict[str, Any]:
        return dict(json.loads(self.proc.stdout))


def replay_sample(argv_prefix: list[str], extra: list[str] | None = None) -> Replayed:
    """Run `<argv_prefix> replay samples/web.pcap --to 127.0.0.1:PORT --json` against a fresh recorder."""
    rec = Recorder("127.0.0.1", 0, http=True).start()
    try:
        proc = run([*argv_prefix, "replay", str(SAMPLE), "--to", f"127.0.0.1:{rec.port}", "--json", *(extra or [])])
        rec.wait_idle(len(expected_streams()) + 1, timeout=15.0 if proc.returncode == 0 else 2.0)
    finally:
        records = rec.stop(grace=5.0)
    return Replayed(proc, records)


def assert_sample_delivered(r: Replayed) -> None:
    assert r.proc.returncode == 0, r.proc.stderr
    got = data_records(r.records)
    assert sorted(bytes(x.data) for x in got) == list(expected_streams())
    assert all(x.end == "eof" for x in got), [(x.client, x.end) for x in got]
    summary = r.summary
    total = sum(len(s) for s in expected_streams())
    assert summary["bytes_delivered"] == total == sum(len(x.data) for x in got)
    assert summary["connections"]["complete"] == len(expected_streams())
    assert summary["connections"]["failed"] == summary["connections"]["dropped"] == 0


def source_modules() -> list[str]:
    """Every module of the package as the source tree has it, but demo (it drives the checkout, not shipped)."""
    pkg = REPO / "pkg" / "kubectl_mirror"
    names = sorted(p.stem for p in pkg.glob("*.py") if p.stem not in ("__init__", "__main__", "demo"))
    return ["kubectl_mirror", *(f"kubectl_mirror.{n}" for n in names)]


# The live mode's dependencies, imported lazily by the CLI, so neither --help nor a replay proves they are in.
LIVE_DEPS = ["kubernetes.client", "kubernetes.config", "kubernetes.stream", "kubernetes.watch", "websocket",
             "pydantic", "yaml",
             # HTTP/2: h2wire and h2layer import these at the top; --proto-descriptor imports protobuf's inside
             "h2.connection", "hpack", "hyperframe.frame", "google.protobuf.descriptor_pool",
             "google.protobuf.message_factory", "google.protobuf.json_format"]


# --- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built() -> Built:
    return build_archive()


@pytest.fixture(scope="module")
def binary(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    into = tmp_path_factory.mktemp("unpacked")
    unpack(built.archive, into)
    return into / "kubectl-mirror"


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    return h


# --- tests ------------------------------------------------------------------------------------------------------

def test_archive_is_named_for_this_platform_and_holds_the_binary_and_license(built: Built, tmp_path: Path) -> None:
    build = load_build_module()
    os_name, arch = build.host_platform()
    assert built.archive.name == f"kubectl-mirror_{package_version()}_{os_name}_{arch}.tar.gz"
    assert built.archive.parent == REPO / "dist"
    members = unpack(built.archive, tmp_path)
    assert sorted(members) == ["LICENSE", "kubectl-mirror", "kubectl_complete-mirror"]
    for name in ("kubectl-mirror", "kubectl_complete-mirror"):
        assert members[name].isfile() and members[name].mode == 0o755, name
    script = "kubectl_complete-mirror"
    assert (tmp_path / script).read_bytes() == (REPO / "krew" / script).read_bytes()
    assert (tmp_path / "LICENSE").read_bytes() == (REPO / "LICENSE").read_bytes()
    assert "Apache License" in (REPO / "LICENSE").read_text().split("\n", 3)[1]
    # A native executable, not a script that would need an interpreter.
    assert (tmp_path / "kubectl-mirror").read_bytes()[:4] in (b"\x7fELF", b"\xcf\xfa\xed\xfe")
    sidecar = Path(f"{built.archive}.sha256").read_text().split()
    assert sidecar == [sha256_of(built.archive), built.archive.name]


def version_lines(out: str) -> list[str]:
    return out.strip().splitlines()


def test_version_and_help_with_a_bare_environment(binary: Path, home: Path) -> None:
    version = run([*clean_env(home), str(binary), "--version"])
    assert version.returncode == 0, version.stderr
    lines = version_lines(version.stdout)
    assert lines[0] == f"kubectl-mirror {package_version()}"
    # The client version comes from bundled package metadata: present only if the spec copied it.
    assert f"kubernetes python client {importlib.metadata.version('kubernetes')}" in lines
    assert any(line.startswith("tshark ") for line in lines), lines
    helped = run([*clean_env(home), str(binary), "--help"])
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: kubectl mirror "), helped.stdout[:200]
    assert "replay" in helped.stdout
    assert "Traceback" not in helped.stderr


def test_finds_tshark_off_path_through_pyshark(binary: Path, home: Path, tmp_path: Path) -> None:
    # pyshark ships in the binary for this: PATH has no tshark, pyshark's config.ini (read from the current
    # directory) names the real one.
    (tmp_path / "config.ini").write_text(f"[tshark]\ntshark_path = {shutil.which('tshark')}\n")
    (tmp_path / "empty").mkdir()
    done = subprocess.run([*clean_env(home, path=str(tmp_path / "empty")), str(binary), "--version"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    tshark = [line for line in version_lines(done.stdout) if line.startswith("tshark")]
    assert tshark and "not found" not in tshark[0] and tshark[0][len("tshark "):][:1].isdigit(), done.stdout


def test_help_starts_quickly(binary: Path, home: Path) -> None:
    # One-file binaries unpack themselves on every start: this catches the bundle growing until start-up hurts.
    # The bound is ten times what it takes on an idle 2-core machine, so a busy one does not fail it.
    timings = []
    for _ in range(3):
        start = time.monotonic()
        done = run([*clean_env(home), str(binary), "--help"])
        timings.append(time.monotonic() - start)
        assert done.returncode == 0, done.stderr
    print(f"kubectl-mirror --help start-up: best {min(timings):.3f}s of {[round(t, 3) for t in timings]}")
    assert min(timings) < 5.0


def test_offline_replay_delivers_the_samples_bytes(binary: Path, home: Path) -> None:
    replayed = replay_sample([*clean_env(home), str(binary)])
    assert_sample_delivered(replayed)
    requests = sorted(q for r in replayed.records for q in r.requests)
    assert requests == ["GET /", "GET /api/items?page=1", "GET /static/app.js", "POST /api/orders"]


def test_bundle_carries_the_live_mode_modules_and_loads_them_from_itself(binary: Path, home: Path) -> None:
    names = source_modules() + LIVE_DEPS
    done = run([*clean_env(home, **{IMPORT_CHECK_ENV: ",".join(names)}), str(binary)])
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["errors"] == {}, (report["errors"], done.stderr[-2000:])
    bundle = report["bundle"]
    assert report["frozen"] is True and bundle
    assert sorted(report["modules"]) == sorted(names)
    # Every module and every import path inside the unpacked bundle: nothing from a site-packages anywhere.
    outside = {n: f for n, f in report["modules"].items() if not str(f).startswith(bundle + os.sep)}
    assert outside == {}
    assert all(p == bundle or p.startswith(bundle + os.sep) for p in report["path"]), report["path"]
    assert report["certifi_exists"] is True


def test_demo_is_not_shipped(binary: Path, home: Path) -> None:
    # demo.py drives the checkout's script and samples/, which the binary does not have.
    done = run([*clean_env(home, **{IMPORT_CHECK_ENV: "kubectl_mirror.demo,pytest"}), str(binary)])
    assert done.returncode == 1
    assert sorted(json.loads(done.stdout)["errors"]) == ["kubectl_mirror.demo", "pytest"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare to hide the machine's Python installations")
def test_runs_with_every_python_on_the_machine_hidden(binary: Path, home: Path, tmp_path: Path) -> None:
    """In a private mount namespace, empty tmpfs over every Python installation, and a PATH with only tshark."""
    hide = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix)}
    for root in (Path("/usr/lib"), Path("/usr/local/lib")):
        hide.update(p for p in root.glob("python3*") if p.is_dir())
    hide = {p.resolve() for p in hide if p.is_dir()}
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "tshark").symlink_to(shutil.which("tshark") or "/usr/bin/tshark")
    mounts = " ".join(f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(p))};" for p in sorted(hide))
    # The script ends by exec'ing env -i, so the binary starts with PATH=tools only, and nothing else set.
    env_i = f"/usr/bin/env -i PATH={shlex.quote(str(tools))} HOME={shlex.quote(str(home))}"
    script = f'set -e; {mounts} exec {env_i} "$@"'
    prefix = ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", script, "sh"]

    # The namespace really hides them: the test's own interpreter cannot start in it.
    probe = run([*prefix, sys.executable, "-c", "print('python ran')"])
    assert probe.returncode != 0 and "python ran" not in probe.stdout, probe

    version = run([*prefix, str(binary), "--version"])
    assert version.returncode == 0, version.stderr
    assert version_lines(version.stdout)[0] == f"kubectl-mirror {package_version()}"
    check = run([*prefix, "/usr/bin/env", f"{IMPORT_CHECK_ENV}={','.join(LIVE_DEPS)}", str(binary)])
    assert check.returncode == 0, check.stdout + check.stderr
    assert_sample_delivered(replay_sample([*prefix, str(binary)]))


def test_the_build_is_skipped_when_nothing_changed(built: Built) -> None:
    build = load_build_module()
    digest = build.inputs_digest()
    build_archive.cache_clear()  # really run it twice: once to catch up, once that must be a no-op
    first = build_archive()
    before = first.archive.stat().st_mtime_ns
    build_archive.cache_clear()
    again = build_archive()
    if build.inputs_digest() != digest:
        pytest.skip("the package sources changed while this test ran (someone is editing pkg/)")
    assert again.stderr.startswith("up to date:"), again.stderr[-2000:]
    assert again.archive == first.archive and again.archive.stat().st_mtime_ns == before


def test_build_inputs_cover_package_sources_but_not_bytecode(tmp_path: Path) -> None:
    """The cache key: a package source edit must rebuild, a stray __pycache__ must not."""
    build = load_build_module()
    root = tmp_path / "repo"
    for rel in ("pkg", "krew"):
        shutil.copytree(REPO / rel, root / rel, ignore=shutil.ignore_patterns("__pycache__"))
    for rel in ("pyproject.toml", "LICENSE"):
        shutil.copy(REPO / rel, root / rel)
    base = build.inputs_digest(root)
    assert build.inputs_digest(root) == base
    cache = root / "pkg" / "kubectl_mirror" / "__pycache__"
    cache.mkdir()
    (cache / "cli.cpython-311.pyc").write_bytes(b"stale")
    assert build.inputs_digest(root) == base
    cli = root / "pkg" / "kubectl_mirror" / "cli.py"
    cli.write_text(cli.read_text() + "\n# changed\n")
    changed = build.inputs_digest(root)
    assert changed != base
    (root / "pkg" / "kubectl_mirror" / "newmodule.py").write_text("X = 1\n")
    assert build.inputs_digest(root) != changed
    spec = root / "krew" / "kubectl-mirror.spec"
    spec.write_text(spec.read_text() + "\n# changed\n")
    assert build.inputs_digest(root) != changed
