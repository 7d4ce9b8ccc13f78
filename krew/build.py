"""Release packaging: the one-file binary, its krew archive, and the krew manifest.

    python krew/build.py dist [--force]        # dist/kubectl-mirror_<version>_<os>_<arch>.tar.gz (+ .sha256)
    python krew/build.py manifest [--out plugin.yaml] [--base-url URL] [--sha256 OS/ARCH=HEX ...] [--strict]

`dist` skips PyInstaller when nothing that goes into the binary changed since the last build here (see
`inputs_digest`), so tests can call it every run. See krew/README.md for how the four platforms come together.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KREW = REPO / "krew"
SPEC = KREW / "kubectl-mirror.spec"
TEMPLATE = KREW / "mirror.yaml"
LICENSE = REPO / "LICENSE"
DIST = REPO / "dist"
BUILD = REPO / "build" / "pyinstaller"
STAMP = BUILD / "inputs.json"
BIN = "kubectl-mirror"
# kubectl's plugin completion executable: a sh script that runs the binary's `__complete` (README: Shell completion)
COMPLETION = KREW / "kubectl_complete-mirror"

# The platforms the manifest offers, as krew names them (its os/arch selector labels are Go's GOOS/GOARCH).
PLATFORMS: tuple[tuple[str, str], ...] = (("linux", "amd64"), ("linux", "arm64"), ("darwin", "amd64"),
                                          ("darwin", "arm64"))
# A sha256 for a platform whose archive was not built here: valid in form (so the manifest stays loadable and the
# other platforms installable) but matching no file, so krew refuses to install that platform rather than run
# something unchecked. `--strict` (the release) refuses to write it at all.
PENDING_SHA256 = "0" * 64
SHA256_RE = re.compile(r"^[a-f0-9]{64}$")
# Archive members get this mtime (2020-01-01) so the same binary always gives the same archive and sha256.
ARCHIVE_MTIME = 1577836800
DEFAULT_BASE_URL = "https://github.com/kubectl-mirror/kubectl-mirror/releases/download/v{version}"


class BuildError(Exception):
    pass


def package_version() -> str:
    """The package's __version__: pyproject.toml takes it from there too (setuptools dynamic version)."""
    sys.path.insert(0, str(REPO / "pkg"))
    try:
        from kubectl_mirror import __version__ as version
    finally:
        sys.path.pop(0)
    return str(version)


def host_platform() -> tuple[str, str]:
    system = platform.system().lower()
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine)
    if (system, arch) not in PLATFORMS:
        raise BuildError(f"cannot build for {system}/{machine}: krew archives exist for "
                         + ", ".join(f"{o}/{a}" for o, a in PLATFORMS))
    assert arch is not None
    return system, arch


def archive_name(version: str, os_name: str, arch: str) -> str:
    return f"{BIN}_{version}_{os_name}_{arch}.tar.gz"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inputs_digest(root: Path = REPO) -> str:
    """Everything the binary is made of: package sources, packaging files, interpreter, installed distributions.

    Installed versions count because PyInstaller bundles whatever the venv holds: upgrading kubernetes there
    must rebuild even though no file of ours changed.
    """
    h = hashlib.sha256()
    files = sorted(p for p in (root / "pkg").rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    files += [root / name for name in ("pyproject.toml", "LICENSE", "krew/kubectl-mirror.spec", "krew/entry.py",
                                       "krew/build.py", "krew/kubectl_complete-mirror")]
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
    h.update("\n".join([sys.version, platform.platform(), *dists]).encode())
    return h.hexdigest()


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """One build at a time per checkout: two test runs at once must not interleave PyInstaller's work files."""
    BUILD.mkdir(parents=True, exist_ok=True)
    with (BUILD.parent / ".dist.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class Dist:
    archive: Path
    sha256: str
    version: str
    os: str
    arch: str
    rebuilt: bool


def pyinstaller(workdir: Path, distdir: Path) -> Path:
    try:
        import PyInstaller  # noqa: F401
    except ImportError:
        raise BuildError("PyInstaller is not installed: `make venv` (it is in the dev extras)") from None
    env = dict(os.environ)
    # Fixed hash seed: PyInstaller's own docs name it as what makes its output reproducible.
    env["PYTHONHASHSEED"] = "0"
    # PyInstaller keeps a binary cache per user (~/.cache/pyinstaller) and `--clean` empties it: a build in another
    # checkout at the same time (a second CI job, `make bench` beside `make test`) lost libssl.so.3 mid-build. The
    # lock above is per checkout, so the cache is too.
    env["PYINSTALLER_CONFIG_DIR"] = str(REPO / "build" / "pyinstaller-cache")
    cmd = [sys.executable, "-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "WARN",
           "--workpath", str(workdir), "--distpath", str(distdir), str(SPEC)]
    print("building the one-file binary with PyInstaller (about a minute)...", file=sys.stderr)
    done = subprocess.run(cmd, cwd=REPO, env=env, check=False)
    if done.returncode != 0:
        raise BuildError(f"PyInstaller failed (exit {done.returncode})")
    binary = distdir / BIN
    if not binary.is_file():
        raise BuildError(f"PyInstaller reported success but wrote no {binary}")
    return binary


def pack(binary: Path, archive: Path) -> None:
    """A gzip'd tar of the binary, its completion script and LICENSE at its top level, byte-identical for identical
    inputs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for src, name, mode in ((binary, BIN, 0o755), (COMPLETION, COMPLETION.name, 0o755),
                                (LICENSE, "LICENSE", 0o644)):
            info = tarfile.TarInfo(name)
            info.size = src.stat().st_size
            info.mode, info.mtime = mode, ARCHIVE_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with src.open("rb") as f:
                tar.addfile(info, f)
    tmp = archive.with_name(archive.name + ".tmp")
    with tmp.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(buf.getvalue())
    tmp.replace(archive)  # readers never see a half-written archive


def build_dist(force: bool = False) -> Dist:
    version = package_version()
    os_name, arch = host_platform()
    archive = DIST / archive_name(version, os_name, arch)
    with build_lock():
        digest = inputs_digest()
        stamp = json.loads(STAMP.read_text()) if STAMP.is_file() else {}
        if (not force and stamp.get("inputs") == digest and archive.is_file()
                and stamp.get("archive") == archive.name and sha256_file(archive) == stamp.get("sha256")):
            return Dist(archive, stamp["sha256"], version, os_name, arch, rebuilt=False)
        STAMP.unlink(missing_ok=True)
        binary = pyinstaller(BUILD / "work", BUILD / "dist")
        DIST.mkdir(exist_ok=True)
        pack(binary, archive)
        sha = sha256_file(archive)
        # sha256sum's format, so `sha256sum -c` checks it and the release job can collect it from each platform.
        Path(f"{archive}.sha256").write_text(f"{sha}  {archive.name}\n")
        STAMP.write_text(json.dumps({"inputs": digest, "archive": archive.name, "sha256": sha}) + "\n")
        return Dist(archive, sha, version, os_name, arch, rebuilt=True)


# --- manifest ---------------------------------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"\{\{\s*([A-Z0-9_]+)(?:\s+([a-z0-9]+)/([a-z0-9]+))?\s*\}\}")


@dataclass
class Checksum:
    sha256: str
    source: str  # where it came from, for the messages


def read_sidecar(path: Path, expect_name: str) -> str:
    parts = path.read_text().split()
    if len(parts) != 2 or not SHA256_RE.match(parts[0]) or parts[1].lstrip("*") != expect_name:
        raise BuildError(f"{path}: expected one line '<sha256>  {expect_name}'")
    return parts[0]


def checksums(version: str, dist: Path, given: dict[tuple[str, str], str]) -> dict[tuple[str, str], Checksum | None]:
    """Each platform's sha256: its archive in dist/ if there, else its .sha256 file there, else --sha256.

    The archive is the truth whenever it is present: a .sha256 file or a --sha256 that disagrees with it is
    an error (a stale download or a typo), never silently preferred.
    """
    out: dict[tuple[str, str], Checksum | None] = {}
    for os_name, arch in PLATFORMS:
        name = archive_name(version, os_name, arch)
        found: list[Checksum] = []
        if (dist / name).is_file():
            found.append(Checksum(sha256_file(dist / name), str(dist / name)))
        if (dist / f"{name}.sha256").is_file():
            found.append(Checksum(read_sidecar(dist / f"{name}.sha256", name), str(dist / f"{name}.sha256")))
        if (os_name, arch) in given:
            found.append(Checksum(given[(os_name, arch)], f"--sha256 {os_name}/{arch}"))
        for other in found[1:]:
            if other.sha256 != found[0].sha256:
                raise BuildError(f"{os_name}/{arch}: {found[0].source} has sha256 {found[0].sha256} but "
                                 f"{other.source} says {other.sha256}")
        out[(os_name, arch)] = found[0] if found else None
    return out


def render(template: str, version: str, base_url: str, sums: dict[tuple[str, str], Checksum | None]) -> str:
    def one(m: re.Match[str]) -> str:
        key, os_name, arch = m.group(1), m.group(2), m.group(3)
        if key == "VERSION" and os_name is None:
            return version
        if key in ("URI", "SHA256", "PENDING_NOTE") and (os_name, arch) in sums:
            sum_ = sums[(os_name, arch)]
            if key == "URI":
                return f"{base_url}/{archive_name(version, os_name, arch)}"
            if key == "SHA256":
                return PENDING_SHA256 if sum_ is None else sum_.sha256
            # A comment cannot go inside the quotes the sha256 needs (all digits would be a YAML integer).
            if sum_ is None:
                return f"  # pending: no {archive_name(version, os_name, arch)} or its .sha256 here yet"
            return ""
        raise BuildError(f"{TEMPLATE.name}: unknown placeholder {m.group(0)}")

    # `##` lines document the template itself; the generated manifest gets its own header instead.
    body = "".join(line for line in template.splitlines(keepends=True) if not line.startswith("##"))
    header = (f"# Generated by `make krew-manifest` from krew/{TEMPLATE.name}: edit that, not this.\n"
              f"# Pending platforms (sha256 all zeros) get theirs once their archives exist: see krew/README.md.\n")
    return header + PLACEHOLDER.sub(one, body)


def check_rendered(text: str, version: str, base_url: str, sums: dict[tuple[str, str], Checksum | None]) -> None:
    """Each platform entry must point at its own archive: a copy-paste slip in the template would otherwise hand
    one platform's binary to another."""
    import yaml  # a dependency of kubernetes, so in the venv; only the manifest needs it

    doc = yaml.safe_load(text)
    seen: set[tuple[str, str]] = set()
    for entry in doc["spec"]["platforms"]:
        labels = entry["selector"]["matchLabels"]
        key = (labels["os"], labels["arch"])
        want_sum = sums.get(key)
        if key in seen or key not in sums:
            raise BuildError(f"{TEMPLATE.name}: platform {key} repeated or not one of {list(PLATFORMS)}")
        seen.add(key)
        if entry["uri"] != f"{base_url}/{archive_name(version, *key)}":
            raise BuildError(f"{TEMPLATE.name}: the {key} entry's uri names another archive: {entry['uri']}")
        if entry["sha256"] != (want_sum.sha256 if want_sum else PENDING_SHA256):
            raise BuildError(f"{TEMPLATE.name}: the {key} entry's sha256 is another platform's")
    if seen != set(PLATFORMS):
        raise BuildError(f"{TEMPLATE.name}: no entry for {sorted(set(PLATFORMS) - seen)}")


def parse_sha_arg(text: str) -> tuple[tuple[str, str], str]:
    m = re.fullmatch(r"([a-z0-9]+)/([a-z0-9]+)=([a-fA-F0-9]{64})", text.strip())
    if m is None or (m.group(1), m.group(2)) not in PLATFORMS:
        raise argparse.ArgumentTypeError(f"expected OS/ARCH=SHA256 for one of "
                                         f"{', '.join(f'{o}/{a}' for o, a in PLATFORMS)}, got {text!r}")
    return (m.group(1), m.group(2)), m.group(3).lower()


def write_manifest(out: Path, dist: Path, base_url: str | None, given: dict[tuple[str, str], str],
                   strict: bool) -> list[tuple[str, str]]:
    """Write the manifest; returns the platforms left pending."""
    version = package_version()
    url = (base_url or DEFAULT_BASE_URL.format(version=version)).rstrip("/")
    if not url.startswith("https://"):
        raise BuildError(f"--base-url must be https:// (krew downloads from it): {url}")
    sums = checksums(version, dist, given)
    pending = [k for k, v in sums.items() if v is None]
    if strict and pending:
        raise BuildError("no sha256 for " + ", ".join(f"{o}/{a}" for o, a in pending)
                         + f": put their archives or .sha256 files in {dist}, or pass --sha256 OS/ARCH=HEX")
    text = render(TEMPLATE.read_text(), version, url, sums)
    check_rendered(text, version, url, sums)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    return pending


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="krew/build.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dist", help="build the binary and its archive for this machine")
    d.add_argument("--force", action="store_true", help="rebuild even if nothing changed")
    m = sub.add_parser("manifest", help="write the krew manifest from krew/mirror.yaml")
    m.add_argument("--out", type=Path, default=REPO / "plugin.yaml")
    m.add_argument("--dist", type=Path, default=DIST, help="where the archives and .sha256 files are")
    m.add_argument("--base-url", help=f"where the archives are downloaded from (default {DEFAULT_BASE_URL})")
    m.add_argument("--sha256", type=parse_sha_arg, action="append", default=[], metavar="OS/ARCH=HEX",
                   help="a platform's archive sha256, for archives built elsewhere")
    m.add_argument("--strict", action="store_true", help="fail instead of leaving a platform pending (releases)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "dist":
            built = build_dist(force=args.force)
            how = "built" if built.rebuilt else "up to date"
            print(f"{how}: {built.archive.relative_to(REPO)} sha256 {built.sha256} "
                  f"({built.archive.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
            print(built.archive)
        else:
            pending = write_manifest(args.out, args.dist, args.base_url, dict(args.sha256), args.strict)
            print(f"wrote {args.out}", file=sys.stderr)
            for os_name, arch in pending:
                print(f"  pending: {os_name}/{arch} (no archive or .sha256 in {args.dist}; sha256 left as zeros)",
                      file=sys.stderr)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
