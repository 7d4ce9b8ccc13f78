"""What the one-file binary runs: the package's CLI, named `kubectl mirror` when started as kubectl-mirror.

kubectl runs a plugin with argv[0] set to the plugin's path (krew's link <root>/bin/kubectl-mirror), so
passing sys.argv through keeps the usage line `kubectl mirror ...`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

# Set to a comma-separated list of modules: the binary imports them, prints where each came from and exits.
# The dist tests use it to prove the live-mode modules (kubernetes, pydantic, websocket) made it into the
# binary and load from inside it, which `--help` and an offline replay never import.
IMPORT_CHECK_ENV = "KUBECTL_MIRROR_IMPORT_CHECK"


def import_check(names: list[str]) -> int:
    report: dict[str, object] = {
        "frozen": bool(getattr(sys, "frozen", False)),
        "bundle": getattr(sys, "_MEIPASS", None),
        "path": list(sys.path),
        "modules": {},
        "errors": {},
    }
    modules: dict[str, str | None] = {}
    errors: dict[str, str] = {}
    for name in names:
        try:
            mod = importlib.import_module(name)
        except Exception as exc:  # every failure is reported, not just the first
            errors[name] = f"{type(exc).__name__}: {exc}"
        else:
            modules[name] = getattr(mod, "__file__", None)
    report["modules"], report["errors"] = modules, errors
    try:
        # kubernetes' REST client verifies TLS with certifi's bundle when the kubeconfig names no CA.
        import certifi

        report["certifi"] = certifi.where()
        report["certifi_exists"] = os.path.isfile(certifi.where())
    except Exception as exc:
        errors["certifi"] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(report))
    return 1 if errors else 0


def run() -> int:
    wanted = os.environ.get(IMPORT_CHECK_ENV)
    if wanted:
        return import_check([n for n in wanted.split(",") if n])
    from kubectl_mirror.cli import main

    return int(main(sys.argv))


if __name__ == "__main__":
    sys.exit(run())
