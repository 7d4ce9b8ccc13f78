"""Shell completion through the real kubectl: `kubectl __complete mirror ...` runs kubectl_complete-mirror.

kubectl finds the plugin (kubectl-mirror) and its completion executable on PATH, both the checkout's scripts here,
and answers with what the executable printed: the candidates, then `:<directive>`. The cluster is the test API
server; the kubeconfig has a second context whose namespace is `shop`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubectl_mirror.completion_cluster import TIMEOUT
from tests.apiserver import FakeCluster

REPO = Path(__file__).resolve().parent.parent
KUBECTL = "/usr/bin/kubectl"
# cobra's ShellCompDirective bits
NO_SPACE, NO_FILE_COMP, FILTER_FILE_EXT = 2, 4, 8
# What kubectl itself writes on stderr while completing a plugin: anything else came from the plugin.
KUBECTL_STDERR = ("[Debug] ", "Completion ended with directive")

pytestmark = pytest.mark.skipif(not os.access(KUBECTL, os.X_OK), reason=f"needs {KUBECTL}")

WEB = [
    {"name": "app", "image": "nginx:1.27", "ports": [{"name": "http", "containerPort": 8080},
                                                     {"name": "metrics", "containerPort": 9090}]},
    {"name": "envoy", "image": "envoy:1.31", "ports": [{"name": "admin", "containerPort": 15000},
                                                       {"name": "dns", "containerPort": 53, "protocol": "UDP"}]},
]


@dataclass(frozen=True)
class Env:
    home: Path
    kubeconfig: Path

    def vars(self, **extra: str) -> dict[str, str]:
        return {"PATH": f"{REPO}:/usr/bin:/bin", "HOME": str(self.home), "KUBECONFIG": str(self.kubeconfig),
                **extra}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("completion")
    with FakeCluster(tmp) as fc:
        fc.add_pod("default", "web-1", labels={"app": "web"}, containers=WEB)
        fc.add_pod("default", "worker-1", labels={"app": "worker"})
        fc.add_deployment("default", "web", match_labels={"app": "web"})
        fc.add_service("default", "web", selector={"app": "web"},
                       ports=[{"name": "public", "port": 80, "targetPort": "http"}])
        fc.add_pod("shop", "api-1", labels={"app": "api"})
        fc.add_statefulset("shop", "db", match_labels={"app": "db"})
        config = json.loads(fc.kubeconfig.read_text())
        shop = {**config["contexts"][0], "name": "shop-ctx"}
        shop["context"] = {**shop["context"], "namespace": "shop"}
        config["contexts"].append(shop)
        kubeconfig = tmp / "two-contexts"
        kubeconfig.write_text(json.dumps(config))
        home = tmp / "home"
        home.mkdir()
        yield Env(home, kubeconfig)


@dataclass(frozen=True)
class Completed:
    lines: list[str]  # `value<TAB>description` as kubectl printed them
    directive: int
    stderr: str

    @property
    def values(self) -> list[str]:
        return [line.split("\t")[0] for line in self.lines]


def kubectl_complete(env: dict[str, str], *words: str, expect: Path = REPO) -> Completed:
    done = subprocess.run([KUBECTL, "__complete", "mirror", *words], env=env, capture_output=True, text=True,
                          timeout=30, check=False, cwd=env["HOME"], stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines and lines[-1].startswith(":"), done.stdout
    # Nothing from the plugin on stderr: the shell would print it over the command line.
    assert [x for x in done.stderr.splitlines() if not x.startswith(KUBECTL_STDERR)] == [], done.stderr
    assert "About to call: " + str(expect / "kubectl_complete-mirror") in done.stderr, done.stderr
    return Completed(lines[:-1], int(lines[-1][1:]), done.stderr)


def complete(env: Env, *words: str) -> Completed:
    return kubectl_complete(env.vars(), *words)


TYPES = ["pod/", "deployment/", "statefulset/", "daemonset/", "replicaset/", "job/", "service/"]


def test_first_word_offers_subcommands_pods_and_types(env: Env) -> None:
    first = complete(env, "")
    assert first.values == ["replay", "status", "web-1", "worker-1", *TYPES]
    assert first.directive == NO_FILE_COMP
    assert "replay\treplay a pcap/pcapng file offline" in first.lines
    # Only TYPE/ left: no space after it, the name follows.
    de = complete(env, "de")
    assert (de.values, de.directive) == (["deployment/"], NO_FILE_COMP | NO_SPACE)
    assert complete(env, "sv").values == ["svc/"]  # an alias when no type name starts so
    assert complete(env, "w").values == ["web-1", "worker-1"]
    assert complete(env, "rep").values == ["replay", "replicaset/"]
    # Subcommands only go first.
    assert complete(env, "-n", "default", "").values == ["web-1", "worker-1", *TYPES]


def test_type_slash_name_from_the_cluster(env: Env) -> None:
    deploy = complete(env, "deploy/")
    assert (deploy.values, deploy.directive) == (["deploy/web"], NO_FILE_COMP)
    assert complete(env, "pod/w").values == ["pod/web-1", "pod/worker-1"]
    assert complete(env, "svc/").values == ["svc/web"]
    assert complete(env, "status", "deployment/").values == ["deployment/web"]
    assert complete(env, "cronjob/").values == []  # not a type the plugin takes


def test_the_connection_flags_typed_so_far_are_used(env: Env, tmp_path: Path) -> None:
    assert complete(env, "-n", "shop", "pod/").values == ["pod/api-1"]
    assert complete(env, "--namespace=shop", "sts/").values == ["sts/db"]
    assert complete(env, "-nshop", "").values == ["api-1", *TYPES]
    assert complete(env, "--context", "shop-ctx", "po/").values == ["po/api-1"]
    # --kubeconfig: no KUBECONFIG, no ~/.kube/config; only the flag names the cluster.
    bare = {**env.vars(), "KUBECONFIG": ""}
    assert kubectl_complete(bare, "deploy/").values == []
    assert kubectl_complete(bare, "--kubeconfig", str(env.kubeconfig), "deploy/").values == ["deploy/web"]


def test_flag_names(env: Env) -> None:
    con = complete(env, "--con")
    assert con.lines == ["--container\tthe container whose port to capture", "--context\tthe kubeconfig context to use"]
    assert con.directive == NO_FILE_COMP
    short = complete(env, "-").values
    assert {"-n", "--namespace", "-c", "--to", "-w", "--image-pull-policy", "--as-group"} <= set(short)
    assert "--namespace" not in complete(env, "-n", "shop", "--").values  # given already
    assert complete(env, "--as-group", "a", "--as-g").values == ["--as-group"]  # repeatable
    status = complete(env, "status", "--").values
    assert "--selector" in status and "--to" not in status and "--context" in status
    replay = complete(env, "replay", "x.pcap", "--").values
    assert "--speed" in replay and "--image" not in replay and "--context" not in replay


def test_fixed_choices(env: Env) -> None:
    out = complete(env, "-o", "")
    assert (out.values, out.directive) == (["text", "json"], NO_FILE_COMP)
    assert complete(env, "--image-pull-policy=I").values == ["--image-pull-policy=IfNotPresent"]
    assert complete(env, "--image-pull-policy", "").values == ["Always", "IfNotPresent", "Never"]
    assert complete(env, "status", "--output", "j").values == ["json"]
    assert complete(env, "replay", "a.pcap", "-o", "t").values == ["text"]


def test_files(env: Env) -> None:
    replay = complete(env, "replay", "")
    assert replay.values[:4] == ["pcap", "pcap.gz", "pcap.zst", "pcap.lz4"] and len(replay.values) == 12
    assert {"pcapng", "pcapng.gz", "cap"} <= set(replay.values) and replay.directive == FILTER_FILE_EXT
    for words in (["-w", ""], ["deploy/web", "--write="], ["--kubeconfig", ""],
                  ["replay", "a.pcap", "--compare-report", ""]):
        got = complete(env, *words)
        assert (got.values, got.directive) == ([], 0), words  # 0: the shell completes file names
    # A value with nothing to offer must not fall back to file names.
    to = complete(env, "--to", "")
    assert (to.values, to.directive) == ([], NO_FILE_COMP)


def test_namespaces_and_contexts(env: Env) -> None:
    assert complete(env, "-n", "").values == ["default", "kube-system", "shop"]
    assert complete(env, "--namespace=s").values == ["--namespace=shop"]
    contexts = complete(env, "--context", "")
    assert (contexts.lines, contexts.directive) == (["fake\tcluster fake", "shop-ctx\tcluster fake"], NO_FILE_COMP)
    assert complete(env, "--context=sh").values == ["--context=shop-ctx"]


def test_ports_and_containers_of_the_target(env: Env) -> None:
    ports = complete(env, "deploy/web", "--port", "")
    # TCP ports only (dns is UDP), by name and by number.
    assert ports.values == ["http", "8080", "metrics", "9090", "admin", "15000"]
    assert "http\t8080 in app" in ports.lines and ports.directive == NO_FILE_COMP
    assert complete(env, "web-1", "-c", "envoy", "--port", "").values[:2] == ["admin", "15000"]
    assert complete(env, "-l", "app=web", "--port=m").values == ["--port=metrics"]
    # A service's own ports come first; container ports are accepted too.
    svc = complete(env, "svc/web", "--port", "")
    assert svc.values[:2] == ["public", "80"] and "public\tservice port 80 -> http" in svc.lines
    assert "http" in svc.values
    assert complete(env, "--port", "").values == []  # no target yet
    containers = complete(env, "deploy/web", "-c", "")
    assert containers.lines == ["app\tnginx:1.27", "envoy\tenvoy:1.31"]
    assert complete(env, "pod/worker-1", "--container", "").values == ["app"]


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) and never answers: a hung API server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


def test_an_unresponsive_cluster_gives_nothing_silently_in_time(env: Env, black_hole: int, tmp_path: Path) -> None:
    hung = tmp_path / "hung-kubeconfig"
    config = json.loads(env.kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{black_hole}"
    hung.write_text(json.dumps(config))
    hung_env = {**env.vars(), "KUBECONFIG": str(hung)}
    got = kubectl_complete(hung_env, "deploy/")
    assert (got.values, got.directive) == ([], NO_FILE_COMP)
    # The executable on its own: bounded (kubectl adds its own wait for this server), and only the local
    # candidates and the directive, not one byte more on either stream. The bound is far above TIMEOUT so that a
    # busy machine does not fail it; without one the lookup would wait for this server forever.
    start = time.monotonic()
    done = subprocess.run([str(REPO / "kubectl_complete-mirror"), ""], env=hung_env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert time.monotonic() - start < TIMEOUT + 10.0
    assert [x.split("\t")[0] for x in done.stdout.splitlines()] == ["replay", "status", *TYPES, f":{NO_FILE_COMP}"]
    assert (done.returncode, done.stderr) == (0, "")
    # Refused, TLS that does not match, no kubeconfig: the same silence.
    refused = {**env.vars(), "KUBECONFIG": "", "HOME": str(tmp_path)}
    done = subprocess.run([str(REPO / "kubectl_complete-mirror"), "--server", "https://127.0.0.1:1", "--token",
                           "x", "pod/"], env=refused, capture_output=True, text=True, timeout=30, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, f":{NO_FILE_COMP}\n", "")


def test_the_plugin_answers_cobras_hidden_command(env: Env) -> None:
    """`kubectl-mirror __complete ...`: what the krew archive's kubectl_complete-mirror runs (the one-file binary)."""
    for command, want in (("__complete", ["--container\tthe container whose port to capture", "--context\tthe "
                                          "kubeconfig context to use", ":4"]),
                          ("__completeNoDesc", ["--container", "--context", ":4"])):
        done = subprocess.run([str(REPO / "kubectl-mirror"), command, "--con"], env=env.vars(), capture_output=True,
                              text=True, timeout=30, check=False)
        assert (done.returncode, done.stdout.splitlines(), done.stderr) == (0, want, "")


def test_a_pip_install_puts_it_next_to_the_plugin(env: Env) -> None:
    """pip's console-script wrappers (this venv's editable install), found by kubectl on PATH like any install."""
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts["kubectl_complete-mirror"] == "kubectl_mirror.completion:main"
    venv_bin = Path(sys.prefix) / "bin"
    got = kubectl_complete(env.vars(PATH=f"{venv_bin}:/usr/bin:/bin"), "-o", "", expect=venv_bin)
    assert (got.values, got.directive) == (["text", "json"], NO_FILE_COMP)


@pytest.mark.parametrize(("words", "values", "positionals", "want"), [
    # -v takes an optional number: the next word is its value only when it is one
    (["-v", "deploy/web", "--port", ""], {"verbosity": [""]}, ["deploy/web"], ("value", "", "port")),
    (["-v", "6", ""], {"verbosity": ["6"]}, [], ("positional", "", None)),
    (["-v=6", "-nshop", "--namespac", "x", "-c"], {"verbosity": ["6"], "namespace": ["shop", "x"]}, [],
     ("flags", "-c", None)),  # argparse's unique prefix of a long flag
    (["--cont", "x", "po"], {}, ["x"], ("nothing", "po", None)),  # ambiguous: container or context
    (["--", "-x"], {}, [], ("positional", "-x", None)),
    (["--as-group", "a", "--as-group=b", "--kubeconfig="], {"as_group": ["a", "b"]}, [],
     ("value", "", "kubeconfig")),
])
def test_reading_the_words(words: list[str], values: dict[str, list[str]], positionals: list[str],
                           want: tuple[str, str, str | None]) -> None:
    from kubectl_mirror.completion import commands, read_words

    state, got = read_words(words, commands())
    assert (state.values, state.positionals) == (values, positionals)
    assert (got.what, got.prefix, got.flag.dest if got.flag else None) == want


def test_no_terminal_for_exec_credential_plugins(env: Env, tmp_path: Path) -> None:
    """kubectl hands its terminal to the completion: a kubeconfig's exec plugin must not read the user's keys."""
    seen = tmp_path / "plugin-read"
    plugin = tmp_path / "login"
    plugin.write_text(f"#!/bin/sh\ncat > {seen}\nexit 1\n")
    plugin.chmod(0o755)
    config = json.loads(env.kubeconfig.read_text())
    config["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1",
                                            "command": str(plugin)}}
    kubeconfig = tmp_path / "exec-kubeconfig"
    kubeconfig.write_text(json.dumps(config))
    done = subprocess.run([str(REPO / "kubectl_complete-mirror"), "deploy/"], input="what the user types\n",
                          env={**env.vars(), "KUBECONFIG": str(kubeconfig)}, capture_output=True, text=True,
                          timeout=60, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, f":{NO_FILE_COMP}\n", "")
    assert seen.read_text() == ""
    # Why nothing came, for whoever asks.
    debug = subprocess.run([str(REPO / "kubectl_complete-mirror"), "--server", "https://127.0.0.1:1", "--token", "x",
                            "pod/"], env={**env.vars(), "KUBECTL_MIRROR_COMPLETION_DEBUG": "1"},
                           capture_output=True, text=True, timeout=60, check=False)
    assert debug.stdout == f":{NO_FILE_COMP}\n"
    assert "cannot reach the Kubernetes API server at https://127.0.0.1:1" in debug.stderr, debug.stderr
