"""The kubeconfig files kubectl would read, merged kubectl's way: plain YAML, no Kubernetes client.

Apart from kubeconfig.py (which turns the merge into an ApiClient) so that shell completion of --context,
--cluster and --user reads the names without loading the client.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def kubeconfig_paths(kubeconfig: str | None, environ: Mapping[str, str]) -> list[Path]:
    """The kubeconfig files in kubectl's precedence: --kubeconfig, else $KUBECONFIG (':'-list), else ~/.kube/config."""
    if kubeconfig:
        path = Path(kubeconfig).expanduser()
        if not path.is_file():
            raise UsageError(f"kubeconfig {kubeconfig} not found: check --kubeconfig")
        return [path]
    if environ.get("KUBECONFIG"):
        listed = [Path(p).expanduser() for p in environ["KUBECONFIG"].split(os.pathsep) if p]
        # kubectl skips listed files that do not exist.
        return [p for p in dict.fromkeys(listed) if p.is_file()]
    home = Path(environ.get("HOME") or Path.home())
    default = home / ".kube" / "config"
    return [default] if default.is_file() else []


# Fields holding paths; kubectl resolves a relative one against the directory of the file that set it.
_PATH_FIELDS = {
    "clusters": ("certificate-authority",),
    "users": ("client-certificate", "client-key", "tokenFile"),
}


def _absolutize(kind: str, entry: dict[str, Any], base: Path) -> None:
    body = entry.get(kind[:-1])
    if not isinstance(body, dict):
        return
    for key in _PATH_FIELDS.get(kind, ()):
        value = body.get(key)
        if isinstance(value, str) and value and not os.path.isabs(value):
            body[key] = str(base / os.path.expanduser(value))
    exec_cfg = body.get("exec") if kind == "users" else None
    if isinstance(exec_cfg, dict):
        command = exec_cfg.get("command")
        # Like kubectl: a command with a path separator is relative to the kubeconfig; a bare name is on PATH.
        if isinstance(command, str) and os.sep in command and not os.path.isabs(command):
            exec_cfg["command"] = str(base / command)


def merge_kubeconfigs(paths: list[Path]) -> dict[str, Any]:
    """Merge kubeconfig files as kubectl does: the first file to set a value or a named entry wins."""
    merged: dict[str, Any] = {"clusters": [], "contexts": [], "users": [], "preferences": {}}
    seen: dict[str, set[str]] = {"clusters": set(), "contexts": set(), "users": set()}
    for path in paths:
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(f"cannot read kubeconfig {path}: {first_line(exc)}") from None
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise UsageError(f"kubeconfig {path} is not a kubeconfig (expected a YAML mapping)")
        if doc.get("current-context") and not merged.get("current-context"):
            merged["current-context"] = doc["current-context"]
        for kind in ("clusters", "contexts", "users"):
            for entry in doc.get(kind) or []:
                if not isinstance(entry, dict) or not entry.get("name") or entry["name"] in seen[kind]:
                    continue
                seen[kind].add(entry["name"])
                entry = dict(entry)
                if isinstance(entry.get(kind[:-1]), dict):
                    entry[kind[:-1]] = dict(entry[kind[:-1]])
                _absolutize(kind, entry, path.parent.resolve())
                merged[kind].append(entry)
    return merged
