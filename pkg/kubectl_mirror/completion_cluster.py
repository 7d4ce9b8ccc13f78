"""The completions that ask the cluster, with the connection flags typed so far.

Each cluster lookup runs on a daemon thread that gets TIMEOUT seconds in all (kubeconfig, exec credential plugin,
TLS, every request): a shell waits on completion, and an unreachable cluster must cost a short pause, not a hang.
Any failure, or running out of time, gives no candidates: completion has no place to say why.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable

from .cluster import call
from .completion import DEBUG_ENV, NO_FILE_COMP, NO_SPACE, Answer, Want, Words, matching, subcommands
from .errors import UsageError
from .flags import parse_request_timeout
from .kubeconfig import Connection, ConnectionFlags, connect
from .target import KINDS, Kind, Pod, Service, kind_for, select_pods

TIMEOUT = 3.0  # seconds for a whole lookup; --request-timeout shortens it
NOTHING = Answer((), NO_FILE_COMP)
Pairs = list[tuple[str, str]]


def connection_args(state: Words) -> argparse.Namespace:
    """The connection flags among the typed words, as add_connection_flags would have parsed them."""
    args = argparse.Namespace()
    for dest in ConnectionFlags.model_fields:
        given = state.values.get(dest)
        if not given:
            continue
        if dest == "insecure_skip_tls_verify":
            setattr(args, dest, True)
        elif dest == "as_group":
            setattr(args, dest, list(given))
        elif dest == "request_timeout":
            try:
                setattr(args, dest, parse_request_timeout(given[-1]))
            except argparse.ArgumentTypeError:
                pass
        else:
            setattr(args, dest, given[-1])
    return args


def bounded(lookup: Callable[[Connection], Pairs], state: Words) -> Pairs:
    """`lookup` on a connection built from the typed flags, within TIMEOUT; [] on any failure or when late."""
    args = connection_args(state)
    budget = min(TIMEOUT, getattr(args, "request_timeout", None) or TIMEOUT)
    args.request_timeout = budget
    box: list[Pairs] = []

    def run() -> None:
        try:
            conn = connect(args)
            try:
                box.append(lookup(conn))  # cluster.call's errors are one line, for KUBECTL_MIRROR_COMPLETION_DEBUG
            finally:
                conn.close()
        except Exception as exc:  # unreachable, forbidden, no kubeconfig: no candidates, and nothing to say
            if os.environ.get(DEBUG_ENV):
                print(f"kubectl_complete-mirror: {type(exc).__name__}: {exc}", file=sys.stderr)

    worker = threading.Thread(target=run, name="completion-lookup", daemon=True)
    worker.start()
    worker.join(budget)
    if worker.is_alive() and os.environ.get(DEBUG_ENV):
        print(f"kubectl_complete-mirror: no answer from the cluster within {budget:g} s", file=sys.stderr)
    return box[0] if box else []


def _names(conn: Connection, kind: Kind) -> list[str]:
    """The names of `kind`'s objects in the connection's namespace (the list path is the object path's parent)."""
    path = kind.path.rsplit("/", 1)[0]
    listed = call(conn, "GET", path, {"namespace": conn.namespace})
    return [str((item.get("metadata") or {}).get("name", "")) for item in listed.get("items") or []]


def type_prefixes(prefix: str) -> Pairs:
    """`TYPE/` for the kinds whose name starts with `prefix`; else their aliases (svc/, sts/), as typed."""
    names = [(f"{k.name}/", "") for k in KINDS if k.name.startswith(prefix)]
    return names or [(f"{a}/", "") for k in KINDS for a in k.aliases if a.startswith(prefix)]


def refs(state: Words, want: Want) -> Answer:
    """TYPE/NAME: `TYPE/` prefixes and pod names (and `replay`/`status` first), or TYPE's names after the slash."""
    if state.last("selector") is not None:
        return NOTHING  # -l picks the pods: TYPE/NAME would be refused
    type_text, slash, name_prefix = want.prefix.partition("/")
    if slash:
        try:
            kind = kind_for(type_text)
        except UsageError:
            return NOTHING
        names = bounded(lambda conn: [(n, "") for n in _names(conn, kind)], state)
        return Answer(matching(names, name_prefix, f"{type_text}/"), NO_FILE_COMP)
    local = list(subcommands(want.prefix)) if state.first else []
    pods = bounded(lambda conn: [(n, "") for n in _names(conn, kind_for("pod"))], state)
    found = matching([*local, *pods, *type_prefixes(want.prefix)], want.prefix)
    only_types = bool(found) and all(v.endswith("/") for v, _ in found)
    return Answer(found, NO_FILE_COMP | (NO_SPACE if only_types else 0))


def namespaces(state: Words, want: Want) -> Answer:
    def lookup(conn: Connection) -> Pairs:
        listed = call(conn, "GET", "/api/v1/namespaces")
        return [(str(i["metadata"]["name"]), "") for i in listed.get("items") or []]

    return Answer(matching(bounded(lookup, state), want.prefix, want.emit), NO_FILE_COMP)


def _first_pod(conn: Connection, state: Words) -> tuple[Pod | None, Service | None]:
    """The pod TYPE/NAME or -l stands for (the first ready one, as the CLI picks), and the service if svc/NAME."""
    ref, selector = (state.positionals or [""])[0], state.last("selector")
    if not ref and selector is None:
        return None, None
    sel = select_pods(conn, ref, selector)
    pods = [p for p in sel.pods if p.ready] or sel.pods
    return (pods[0] if pods else None), sel.service


def _port_pairs(pod: Pod | None, service: Service | None, container: str | None) -> Pairs:
    pairs: Pairs = []
    if service is not None:
        for sp in service.ports:
            target = sp.target_port if sp.target_port is not None else sp.port
            if sp.name:
                pairs.append((sp.name, f"service port {sp.port} -> {target}"))
            pairs.append((str(sp.port), f"service port{' ' + sp.name if sp.name else ''} -> {target}"))
    if pod is not None:
        ordered = sorted(pod.spec.containers, key=lambda c: c.name != container)
        for c in ordered:
            for p in c.ports:
                if p.protocol != "TCP":
                    continue
                if p.name:
                    pairs.append((p.name, f"{p.container_port} in {c.name}"))
                pairs.append((str(p.container_port), f"{p.name + ' ' if p.name else ''}in {c.name}"))
    return pairs


def ports(state: Words, want: Want) -> Answer:
    """--port: the target's declared TCP ports, by name and number (a service's own ports first)."""

    def lookup(conn: Connection) -> Pairs:
        pod, service = _first_pod(conn, state)
        return _port_pairs(pod, service, state.last("container"))

    return Answer(matching(bounded(lookup, state), want.prefix, want.emit), NO_FILE_COMP)


def containers(state: Words, want: Want) -> Answer:
    def lookup(conn: Connection) -> Pairs:
        pod, _ = _first_pod(conn, state)
        return [(c.name, c.image) for c in (pod.spec.containers if pod else [])]

    return Answer(matching(bounded(lookup, state), want.prefix, want.emit), NO_FILE_COMP)

