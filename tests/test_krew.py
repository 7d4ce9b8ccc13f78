"""The krew manifest: it follows krew's rules, names this platform's real archive, and installs the way krew does.

The rules checked here are krew's own (its index validation and validate-krew-manifest): apiVersion and kind,
the name equal to the manifest's file name, a `v` semver version, a one-line short description, for every
platform an https uri, a sha256 of 64 lowercase hex digits, a bin, non-empty files with from/to, a selector on
os/arch only, and no two platforms selecting the same os/arch.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_dist import (
    REPO,
    SAMPLE,
    Built,
    assert_sample_delivered,
    build_archive,
    load_build_module,
    package_version,
    replay_sample,
    run,
    unpack,
)

KUBECTL = "/usr/bin/kubectl"
TEMPLATE = REPO / "krew" / "mirror.yaml"
COMMITTED = REPO / "plugin.yaml"
API_VERSION = "krew.googlecontainertools.github.com/v1alpha2"
WANTED = [("linux", "amd64"), ("linux", "arm64"), ("darwin", "amd64"), ("darwin", "arm64")]
# Other os/arch pairs krew runs on: the manifest must not claim them (there is no windows or 32-bit build).
NOT_OFFERED = [("windows", "amd64"), ("windows", "386"), ("linux", "386"), ("linux", "arm"), ("darwin", "386")]
SEMVER_V = re.compile(r"^v(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
                      r"(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$")
PENDING = "0" * 64


# --- krew's rules -----------------------------------------------------------------------------------------------

def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (what krew evaluates against {os, arch})."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        if (op == "In" and not (present and labels[key] in values)) \
                or (op == "NotIn" and present and labels[key] in values) \
                or (op == "Exists" and not present) or (op == "DoesNotExist" and present):
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"unknown selector operator {op}")
    return True


def krew_problems(doc: Any, name: str) -> list[str]:
    """Everything krew would reject in the manifest `doc` of a plugin whose manifest file is `<name>.yaml`."""
    problems: list[str] = []
    if not isinstance(doc, dict):
        return ["not a YAML mapping"]
    if doc.get("apiVersion") != API_VERSION:
        problems.append(f"apiVersion {doc.get('apiVersion')!r}")
    if doc.get("kind") != "Plugin":
        problems.append(f"kind {doc.get('kind')!r}")
    if (doc.get("metadata") or {}).get("name") != name or not re.fullmatch(r"[\w-]+", name):
        problems.append(f"metadata.name {(doc.get('metadata') or {}).get('name')!r} is not the file name {name!r}")
    spec = doc.get("spec") or {}
    if not isinstance(spec.get("version"), str) or not SEMVER_V.match(spec["version"]):
        problems.append(f"spec.version {spec.get('version')!r} is not a v-prefixed semver")
    short = spec.get("shortDescription")
    if not isinstance(short, str) or not short.strip() or "\n" in short or "\r" in short or len(short) > 70:
        problems.append(f"shortDescription {short!r}: one line of at most 70 characters")
    for field in ("description", "caveats"):
        text = spec.get(field)
        if not isinstance(text, str) or not text.strip():
            problems.append(f"spec.{field} is missing")
        elif any(len(line) > 80 and " " in line.strip() for line in text.splitlines()):
            problems.append(f"spec.{field} has lines over 80 characters")
    if not str(spec.get("homepage", "")).startswith("https://"):
        problems.append(f"homepage {spec.get('homepage')!r} is not https")
    platforms = spec.get("platforms")
    if not isinstance(platforms, list) or not platforms:
        return [*problems, "no platforms"]
    for i, p in enumerate(platforms):
        where = f"platforms[{i}]"
        if not str(p.get("uri", "")).startswith("https://"):
            problems.append(f"{where}.uri {p.get('uri')!r} is not https")
        if not str(p.get("uri", "")).endswith((".tar.gz", ".zip")):
            problems.append(f"{where}.uri is not a .tar.gz or .zip")
        if not isinstance(p.get("sha256"), str) or not re.fullmatch(r"[a-f0-9]{64}", p["sha256"]):
            problems.append(f"{where}.sha256 {p.get('sha256')!r} is not 64 lowercase hex digits")
        if not p.get("bin"):
            problems.append(f"{where}.bin is missing")
        files = p.get("files")
        if files is not None and (not files or any(not f.get("from") or not f.get("to") for f in files)):
            problems.append(f"{where}.files must be absent or a non-empty list of from/to")
        sel = p.get("selector")
        if not isinstance(sel, dict) or not (sel.get("matchLabels") or sel.get("matchExpressions")):
            problems.append(f"{where}.selector is missing or empty")
            continue
        keys = set(sel.get("matchLabels") or {}) | {e.get("key") for e in sel.get("matchExpressions") or []}
        if keys - {"os", "arch"}:
            problems.append(f"{where}.selector uses {sorted(keys - {'os', 'arch'})}: only os and arch exist")
    if problems:
        return problems
    for os_name, arch in WANTED + NOT_OFFERED:
        hits = [i for i, p in enumerate(platforms) if selector_matches(p["selector"], {"os": os_name, "arch": arch})]
        if len(hits) > 1:
            problems.append(f"platforms {hits} overlap on {os_name}/{arch}")
        if (os_name, arch) in WANTED and not hits:
            problems.append(f"no platform for {os_name}/{arch}")
        if (os_name, arch) in NOT_OFFERED and hits:
            problems.append(f"platform {hits} claims {os_name}/{arch}, which is never built")
    for i, p in enumerate(platforms):
        if not any(selector_matches(p["selector"], {"os": o, "arch": a}) for o, a in WANTED + NOT_OFFERED):
            problems.append(f"platforms[{i}] selects no platform krew knows")
    return problems


def platform_for(doc: dict[str, Any], os_name: str, arch: str) -> dict[str, Any]:
    hits = [p for p in doc["spec"]["platforms"] if selector_matches(p["selector"], {"os": os_name, "arch": arch})]
    assert len(hits) == 1, f"{len(hits)} platforms select {os_name}/{arch}"
    return dict(hits[0])


def host() -> tuple[str, str]:
    os_name, arch = load_build_module().host_platform()
    return str(os_name), str(arch)


def generate(tmp_path: Path, dist: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`krew/build.py manifest` (what `make krew-manifest` runs) into tmp/mirror.yaml."""
    return subprocess.run([sys.executable, str(REPO / "krew" / "build.py"), "manifest", "--out",
                           str(tmp_path / "mirror.yaml"), "--dist", str(dist), *extra],
                          capture_output=True, text=True, timeout=120, check=False, cwd=REPO)


# --- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built() -> Built:
    return build_archive()


@pytest.fixture
def dist_here(built: Built, tmp_path: Path) -> Path:
    """A dist directory with only this machine's archive, as after `make dist` on a clean checkout."""
    d = tmp_path / "dist"
    d.mkdir()
    (d / built.archive.name).symlink_to(built.archive)
    return d


@pytest.fixture
def manifest(dist_here: Path, tmp_path: Path) -> dict[str, Any]:
    done = generate(tmp_path, dist_here)
    assert done.returncode == 0, done.stderr
    return dict(yaml.safe_load((tmp_path / "mirror.yaml").read_text()))


# --- the manifest -----------------------------------------------------------------------------------------------

def test_generated_manifest_follows_krew_rules_with_this_platforms_real_sha256(
        manifest: dict[str, Any], built: Built) -> None:
    assert krew_problems(manifest, "mirror") == []
    spec = manifest["spec"]
    version = package_version()
    assert spec["version"] == f"v{version}"
    for os_name, arch in WANTED:
        p = platform_for(manifest, os_name, arch)
        assert p["uri"].endswith(f"/v{version}/kubectl-mirror_{version}_{os_name}_{arch}.tar.gz"), p["uri"]
        assert p["bin"] == "kubectl-mirror"
        assert {(f["from"], f["to"]) for f in p["files"]} == {
            ("kubectl-mirror", "."), ("kubectl_complete-mirror", "."), ("LICENSE", ".")}
    here = platform_for(manifest, *host())
    assert here["sha256"] == hashlib.sha256(built.archive.read_bytes()).hexdigest()
    # No archive of the others here: their sha256 is the pending marker, which matches no file krew downloads.
    assert [platform_for(manifest, *k)["sha256"] for k in WANTED if k != host()] == [PENDING] * 3


def test_manifest_text_says_what_it_needs(manifest: dict[str, Any]) -> None:
    spec = manifest["spec"]
    caveats = spec["caveats"]
    for needed in ("tshark", "RBAC", "pods/ephemeralcontainers", "pods/exec", "Pod Security", "NET_RAW"):
        assert needed in caveats, needed
    # The description explains the plugin; flags belong in --help, where they cannot go stale.
    assert not re.search(r"(^|\s)--?[a-z]", spec["description"]), spec["description"]


def test_committed_plugin_yaml_follows_krew_rules_for_this_version() -> None:
    # Its sha256 are those of the archives built when it was generated, which later source edits change: the
    # real-sha256 check is on a freshly generated manifest (above); this one must still be valid and current.
    doc = yaml.safe_load(COMMITTED.read_text())
    assert krew_problems(doc, TEMPLATE.stem) == []
    assert doc["spec"]["version"] == f"v{package_version()}", "run `make krew-manifest` after a version bump"
    assert any(p["sha256"] != PENDING for p in doc["spec"]["platforms"]), "generated with no archive at all"


BROKEN: list[tuple[str, Any]] = [
    ("apiVersion", lambda d: d.update(apiVersion="krew.googlecontainertools.github.com/v1alpha1")),
    ("kind", lambda d: d.update(kind="Plugins")),
    ("name", lambda d: d["metadata"].update(name="kubectl-mirror")),
    ("version without v", lambda d: d["spec"].update(version="0.1.0")),
    ("version not semver", lambda d: d["spec"].update(version="v0.1")),
    ("two-line short description", lambda d: d["spec"].update(shortDescription="Mirror\ntraffic")),
    ("no caveats", lambda d: d["spec"].pop("caveats")),
    ("http uri", lambda d: d["spec"]["platforms"][0].update(uri=d["spec"]["platforms"][0]["uri"].replace(
        "https://", "http://"))),
    ("uppercase sha256", lambda d: d["spec"]["platforms"][0].update(sha256="A" * 64)),
    ("short sha256", lambda d: d["spec"]["platforms"][1].update(sha256="ab" * 31)),
    ("no bin", lambda d: d["spec"]["platforms"][2].pop("bin")),
    ("empty files", lambda d: d["spec"]["platforms"][3].update(files=[])),
    ("file without to", lambda d: d["spec"]["platforms"][0]["files"][0].pop("to")),
    ("unknown selector key", lambda d: d["spec"]["platforms"][0]["selector"]["matchLabels"].update(cpu="x")),
    ("overlap", lambda d: d["spec"]["platforms"][1]["selector"]["matchLabels"].update(arch="amd64")),
    ("missing platform", lambda d: d["spec"]["platforms"].pop()),
    ("os-only selector overlaps", lambda d: d["spec"]["platforms"][0]["selector"]["matchLabels"].pop("arch")),
    ("claims windows", lambda d: d["spec"]["platforms"].append(
        {**copy.deepcopy(d["spec"]["platforms"][0]), "selector": {"matchLabels": {"os": "windows", "arch": "amd64"}}})),
    ("expression overlap", lambda d: d["spec"]["platforms"][0].update(selector={"matchExpressions": [
        {"key": "os", "operator": "In", "values": ["linux", "darwin"]}]})),
]


@pytest.mark.parametrize(("what", "breaks"), BROKEN, ids=[w for w, _ in BROKEN])
def test_the_rules_catch_a_broken_manifest(manifest: dict[str, Any], what: str, breaks: Any) -> None:
    assert krew_problems(manifest, "mirror") == []
    broken = copy.deepcopy(manifest)
    breaks(broken)
    assert krew_problems(broken, "mirror") != [], what


# --- where each platform's sha256 comes from ---------------------------------------------------------------------

def sidecar(dist: Path, version: str, os_name: str, arch: str, sha: str) -> None:
    name = f"kubectl-mirror_{version}_{os_name}_{arch}.tar.gz"
    (dist / f"{name}.sha256").write_text(f"{sha}  {name}\n")


def test_other_platforms_come_from_their_sha256_files_or_arguments(dist_here: Path, tmp_path: Path) -> None:
    version = package_version()
    sidecar(dist_here, version, "linux", "arm64", "1" * 64)
    sidecar(dist_here, version, "darwin", "amd64", "2" * 64)
    done = generate(tmp_path, dist_here, "--sha256", "darwin/arm64=" + "3" * 64, "--strict")
    assert done.returncode == 0, done.stderr
    doc = yaml.safe_load((tmp_path / "mirror.yaml").read_text())
    assert krew_problems(doc, "mirror") == []
    got = {k: platform_for(doc, *k)["sha256"] for k in WANTED}
    # All digits: still a string (quoted), or krew would read an integer.
    assert got[("linux", "arm64")] == "1" * 64 and got[("darwin", "amd64")] == "2" * 64
    assert got[("darwin", "arm64")] == "3" * 64
    assert PENDING not in got.values() and "pending" not in (tmp_path / "mirror.yaml").read_text()


def test_strict_refuses_to_leave_a_platform_pending(dist_here: Path, tmp_path: Path) -> None:
    done = generate(tmp_path, dist_here, "--sha256", "darwin/arm64=" + "3" * 64, "--strict")
    assert done.returncode == 1
    assert "linux/arm64" in done.stderr and "darwin/amd64" in done.stderr and "darwin/arm64" not in done.stderr
    assert not (tmp_path / "mirror.yaml").exists()


def test_a_checksum_that_disagrees_with_the_archive_is_an_error(dist_here: Path, tmp_path: Path) -> None:
    os_name, arch = host()
    sidecar(dist_here, package_version(), os_name, arch, "4" * 64)
    done = generate(tmp_path, dist_here)
    assert done.returncode == 1 and "4" * 64 in done.stderr, done.stderr
    (dist_here / f"kubectl-mirror_{package_version()}_{os_name}_{arch}.tar.gz.sha256").unlink()
    done = generate(tmp_path, dist_here, "--sha256", f"{os_name}/{arch}=" + "5" * 64)
    assert done.returncode == 1 and "5" * 64 in done.stderr, done.stderr


def test_a_template_entry_pointing_at_another_platforms_archive_is_refused(
        dist_here: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build = load_build_module()
    swapped = TEMPLATE.read_text().replace("{{SHA256 linux/amd64}}", "{{SHA256 TMP}}") \
        .replace("{{SHA256 linux/arm64}}", "{{SHA256 linux/amd64}}").replace("{{SHA256 TMP}}", "{{SHA256 linux/arm64}}")
    template = tmp_path / "mirror.yaml.in"
    template.write_text(swapped)
    monkeypatch.setattr(build, "TEMPLATE", template)
    with pytest.raises(build.BuildError, match="sha256"):
        build.write_manifest(tmp_path / "out.yaml", dist_here, None, {("linux", "arm64"): "6" * 64}, False)


# --- installed the way krew installs it ---------------------------------------------------------------------------

def krew_install(manifest: dict[str, Any], archive: Path, root: Path) -> Path:
    """What `kubectl krew install` does with a downloaded archive; returns <root>/bin.

    Pick the one platform whose selector matches this machine, check the archive's sha256, extract it, move
    each `files` entry (`from` is a glob in the archive, `to` a path in the install directory
    <root>/store/<name>/<version>/), and link <root>/bin/kubectl-<name> to the platform's `bin`.
    """
    name, version = manifest["metadata"]["name"], manifest["spec"]["version"]
    p = platform_for(manifest, *host())
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == p["sha256"], "krew would refuse: sha256 mismatch"
    download = root / "downloads" / name
    unpack(archive, download)
    install_dir = root / "store" / name / version
    install_dir.mkdir(parents=True)
    for op in p["files"]:
        matches = glob.glob(str(download / op["from"]))
        assert matches, f"files: {op['from']!r} matches nothing in the archive"
        for src in matches:
            dest = install_dir / op["to"]
            if op["to"] in (".", "./") or dest.is_dir():
                dest = dest / Path(src).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(src, dest)
    shutil.rmtree(root / "downloads")  # krew deletes the download: only what `files` moved may be needed
    target = install_dir / p["bin"]
    assert target.is_file() and os.access(target, os.X_OK), f"bin {p['bin']} is not an executable file"
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / f"kubectl-{name.replace('-', '_')}").symlink_to(target)
    return bin_dir


@pytest.fixture
def krew_root(manifest: dict[str, Any], built: Built, tmp_path: Path) -> Path:
    root = tmp_path / "krew-root"
    krew_install(manifest, built.archive, root)
    return root


def kubectl_env(root: Path, home: Path) -> list[str]:
    # No kubeconfig and no Python: kubectl finds the plugin on PATH, <root>/bin first as krew tells users.
    return ["/usr/bin/env", "-i", f"PATH={root / 'bin'}:/usr/bin:/bin", f"HOME={home}"]


@pytest.mark.skipif(not os.access(KUBECTL, os.X_OK), reason=f"needs {KUBECTL}")
def test_kubectl_runs_the_installed_plugin(krew_root: Path, manifest: dict[str, Any], tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = kubectl_env(krew_root, home)
    installed = krew_root / "store" / "mirror" / manifest["spec"]["version"]
    assert sorted(os.listdir(installed)) == ["LICENSE", "kubectl-mirror", "kubectl_complete-mirror"]

    listed = run([*env, KUBECTL, "plugin", "list"])
    assert listed.returncode == 0, listed.stderr
    assert str(krew_root / "bin" / "kubectl-mirror") in listed.stdout.splitlines()
    assert "warning" not in listed.stderr.lower(), listed.stderr

    version = run([*env, KUBECTL, "mirror", "--version"])
    assert version.returncode == 0, version.stderr
    assert version.stdout.splitlines()[0] == f"kubectl-mirror {package_version()}"
    helped = run([*env, KUBECTL, "mirror", "--help"])
    assert helped.returncode == 0 and helped.stdout.startswith("usage: kubectl mirror "), helped.stdout[:300]

    replayed = replay_sample([*env, KUBECTL, "mirror"])
    assert_sample_delivered(replayed)
    assert SAMPLE.name in replayed.summary["source"]


def readme_krew_completion_line() -> str:
    """The README's one line that puts the krew install's kubectl_complete-mirror on PATH."""
    lines = [x.strip() for x in (REPO / "README.md").read_text().splitlines()
             if x.strip().startswith("cp ") and "kubectl_complete-mirror" in x]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.skipif(not os.access(KUBECTL, os.X_OK), reason=f"needs {KUBECTL}")
def test_kubectl_completes_the_installed_plugin(krew_root: Path, tmp_path: Path) -> None:
    """The README's line, then `kubectl __complete mirror ...`: the archive's script runs the one-file binary."""
    home = tmp_path / "home"
    home.mkdir()
    env = kubectl_env(krew_root, home)
    words = ["__complete", "mirror", "--image-pull-policy", ""]
    before = run([*env, KUBECTL, *words])
    assert before.stdout.splitlines() == [":0"]  # no completion executable: kubectl falls back to files
    # As a user's shell runs it, with KREW_ROOT set as krew's install docs have it.
    enabled = run(["/usr/bin/env", f"KREW_ROOT={krew_root}", f"HOME={home}", "/bin/sh", "-c",
                   readme_krew_completion_line()])
    assert enabled.returncode == 0, enabled.stderr
    assert (krew_root / "bin" / "kubectl_complete-mirror").is_file()
    done = run([*env, KUBECTL, *words])
    assert done.stdout.splitlines() == ["Always", "IfNotPresent", "Never", ":4"], done.stderr
    assert f"About to call: {krew_root / 'bin' / 'kubectl_complete-mirror'}" in done.stderr
    # Flag names come with their help as descriptions; nothing but kubectl's own lines on stderr.
    names = run([*env, KUBECTL, "__complete", "mirror", "status", "--sel"])
    assert names.stdout.splitlines() == ["--selector\tlimit to pods with these labels", ":4"], names.stderr
    assert all(x.startswith(("[Debug] ", "Completion ended")) for x in names.stderr.splitlines()), names.stderr
