"""Shell completion the kubectl way: `kubectl_complete-mirror WORD... PARTIAL` speaks cobra's __complete protocol.

kubectl (1.26 and later) completes `kubectl mirror ...<TAB>` in every shell it supports by running the executable
`kubectl_complete-mirror` found on PATH with the words typed after `mirror`, the last one the word being completed
("" for a new word). It reads one candidate per line (`value<TAB>description`), then a last line `:<directive>`
with cobra's ShellCompDirective bits, and hands both to the shell's completion script.

The words are read against the real argument parsers (cli.py), so completion knows exactly the flags the
command accepts. What needs the cluster (names, namespaces, ports, containers) is asked of completion_cluster,
imported only then: flag names, fixed choices and the kubeconfig's context names (kubeconfig_files) answer
without loading the Kubernetes client.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

# cobra's ShellCompDirective bits (spf13/cobra completions.go).
DEFAULT = 0  # the shell may fall back to file names when there are no candidates
ERROR = 1
NO_SPACE = 2  # no space after the completed word: TYPE/ goes on with a name
NO_FILE_COMP = 4  # no file names, even without candidates
FILTER_FILE_EXT = 8  # the candidates are file extensions to complete file names with
FILTER_DIRS = 16
KEEP_ORDER = 32

# What `replay` reads (plain or compressed as tshark opens them), for the shell's file-name completion.
CAPTURE_EXTENSIONS = tuple(f"{base}{z}" for base in ("pcap", "pcapng", "cap") for z in ("", ".gz", ".zst", ".lz4"))
# Where a value names a file on this machine (metavars in cli.py and flags.py).
FILE_METAVARS = frozenset({"FILE", "PATH"})
# Set to keep stderr and see why a completion offers nothing (completion never prints errors otherwise).
DEBUG_ENV = "KUBECTL_MIRROR_COMPLETION_DEBUG"
# cobra's hidden commands: kubectl_complete-mirror also answers when called as `kubectl-mirror __complete ...`.
COMPLETE_COMMANDS = ("__complete", "__completeNoDesc")


@dataclass(frozen=True, slots=True)
class Flag:
    """One option of a parser, as completion needs it."""

    names: tuple[str, ...]
    dest: str
    takes_value: bool
    optional_value: bool  # nargs="?": `-v` or `-v=6` / `-v 6`
    repeatable: bool
    choices: tuple[str, ...]
    metavar: str
    help: str


@dataclass(frozen=True, slots=True)
class Command:
    name: str  # "" for the live command
    flags: tuple[Flag, ...]
    positional: str  # dest of its one positional argument: "ref" or "file"

    def flag(self, name: str) -> Flag | None:
        for f in self.flags:
            if name in f.names:
                return f
        if name.startswith("--"):  # argparse takes a unique prefix of a long option
            hits = [f for f in self.flags for n in f.names if n.startswith(name) and n.startswith("--")]
            if len({f.dest for f in hits}) == 1:
                return hits[0]
        return None


def _flags(parser: argparse.ArgumentParser) -> tuple[Flag, ...]:
    out = []
    for a in parser._actions:
        if not a.option_strings or a.help == argparse.SUPPRESS:
            continue
        nargs = a.nargs
        out.append(Flag(
            names=tuple(a.option_strings), dest=a.dest, takes_value=nargs != 0, optional_value=nargs == "?",
            repeatable=isinstance(a, argparse._AppendAction),
            choices=tuple(str(c) for c in a.choices or ()), metavar=str(a.metavar or ""),
            help=" ".join((a.help or "").replace("%%", "%").split())))
    return tuple(out)


def _positional(parser: argparse.ArgumentParser) -> str:
    return next(a.dest for a in parser._actions if not a.option_strings)


def commands(prog: str = "kubectl mirror") -> dict[str, Command]:
    """The CLI's commands, their flags read from the very parsers that parse them."""
    from . import cli

    out = {}
    for name, build in (("", cli.build_live_parser), ("replay", cli.build_replay_parser),
                        ("status", cli.build_status_parser)):
        p = build(prog)
        out[name] = Command(name, _flags(p), _positional(p))
    return out


SUBCOMMAND_HELP = {"replay": "replay a pcap/pcapng file offline", "status": "which pods carry a tap"}


# ---- what is being completed (sans-I/O) -------------------------------------------------------------------


@dataclass(slots=True)
class Words:
    """The words before the one being completed, read the way argparse would read them."""

    command: Command
    values: dict[str, list[str]] = field(default_factory=dict)  # dest -> values given
    positionals: list[str] = field(default_factory=list)
    first: bool = True  # the word being completed is the first one (where `replay`/`status` go)

    def last(self, dest: str) -> str | None:
        v = self.values.get(dest)
        return v[-1] if v else None


@dataclass(frozen=True, slots=True)
class Want:
    """What the word being completed is: `what` is flags, value, positional; `flag` set for a value."""

    what: str
    prefix: str  # the part of the word the candidates must start with
    emit: str = ""  # put before each candidate: "--context=" when the word is --context=...
    flag: Flag | None = None


def read_words(words: Sequence[str], cmds: dict[str, Command]) -> tuple[Words, Want]:
    """Split `words` (the last is the one being completed) into what was given and what is wanted."""
    done, cur = list(words[:-1]), (words[-1] if words else "")
    command = cmds[""]
    if done and done[0] in cmds and done[0]:
        command = cmds[done.pop(0)]
    state = Words(command, first=not done and command.name == "")
    pending: Flag | None = None
    only_positionals = False
    for word in done:
        if pending is not None:
            took = not pending.optional_value or word.lstrip("=").isdigit()
            state.values.setdefault(pending.dest, []).append(word if took else "")
            pending = None
            if took:
                continue
        if only_positionals or not word.startswith("-") or word == "-":
            state.positionals.append(word)
            continue
        if word == "--":
            only_positionals = True
            continue
        name, eq, value = word.partition("=")
        f = command.flag(name)
        if f is None and not word.startswith("--") and len(word) > 2:
            f, value, eq = command.flag(word[:2]), word[2:].lstrip("="), "="  # -nshop: a short flag's value
            if f is not None and not f.takes_value:
                continue  # -qv and friends: nothing completion needs
        if f is None:
            continue
        if not f.takes_value:
            state.values.setdefault(f.dest, []).append("")
        elif eq:
            state.values.setdefault(f.dest, []).append(value)
        else:
            pending = f
    if pending is not None:
        if not pending.optional_value or cur.lstrip("=").isdigit():
            return state, Want("value", cur, flag=pending)
        state.values.setdefault(pending.dest, []).append("")
    if cur.startswith("--") and "=" in cur and not only_positionals:
        name, _, value = cur.partition("=")
        f = command.flag(name)
        if f is not None and f.takes_value:
            return state, Want("value", value, emit=f"{name}=", flag=f)
        return state, Want("nothing", cur)
    if cur.startswith("-") and not only_positionals:
        return state, Want("flags", cur)
    if state.positionals:
        return state, Want("nothing", cur)  # the one positional is there already
    return state, Want("positional", cur)


# ---- candidates -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    candidates: tuple[tuple[str, str], ...]  # (value, description)
    directive: int

    def lines(self, descriptions: bool = True) -> list[str]:
        out = []
        for value, desc in self.candidates:
            text = f"{value}\t{desc}" if desc and descriptions else value
            out.append(" ".join(text.split("\n")))
        return [*out, f":{self.directive}"]


def matching(pairs: Iterable[tuple[str, str]], prefix: str, emit: str = "") -> tuple[tuple[str, str], ...]:
    seen: dict[str, str] = {}
    for value, desc in pairs:
        if value.startswith(prefix) and value not in seen:
            seen[value] = desc
    return tuple((emit + v, d) for v, d in seen.items())


def flag_names(state: Words, prefix: str) -> Answer:
    """Flags not given yet (repeatable ones always), long ones only once `--` is typed, as cobra does."""
    pairs = []
    for f in state.command.flags:
        if f.dest in state.values and not f.repeatable:
            continue
        pairs += [(n, f.help) for n in f.names if prefix.startswith("--") <= n.startswith("--")]
    return Answer(matching(pairs, prefix), NO_FILE_COMP)


# Answers that need the cluster or the kubeconfig: (state, want) -> Answer. completion_cluster provides them.
Lookup = Callable[[Words, Want], Answer]


@dataclass(frozen=True, slots=True)
class Lookups:
    refs: Lookup
    namespaces: Lookup
    kubeconfig: Lookup  # --context, --cluster, --user
    ports: Lookup
    containers: Lookup


def answer(state: Words, want: Want, lookups: Lookups) -> Answer:
    nothing = Answer((), NO_FILE_COMP)
    if want.what == "flags":
        return flag_names(state, want.prefix)
    if want.what == "positional":
        if state.command.positional == "file":
            return Answer(tuple((ext, "") for ext in CAPTURE_EXTENSIONS), FILTER_FILE_EXT)
        return lookups.refs(state, want)
    if want.what != "value" or want.flag is None:
        return nothing
    f = want.flag
    if f.choices:
        return Answer(matching(((c, "") for c in f.choices), want.prefix, want.emit), NO_FILE_COMP)
    if f.metavar in FILE_METAVARS:
        return Answer((), DEFAULT)  # the shell completes file names
    if f.dest == "namespace":
        return lookups.namespaces(state, want)
    if f.dest in ("context", "cluster", "user"):
        return lookups.kubeconfig(state, want)
    if f.dest == "port" and state.command.name == "":
        return lookups.ports(state, want)
    if f.dest == "container":
        return lookups.containers(state, want)
    return nothing


def subcommands(prefix: str) -> tuple[tuple[str, str], ...]:
    return matching(SUBCOMMAND_HELP.items(), prefix)


def complete(words: Sequence[str], lookups: Lookups | None = None) -> Answer:
    cmds = commands()
    state, want = read_words(words or [""], cmds)
    return answer(state, want, lookups or CLUSTER)


def kubeconfig_names(state: Words, want: Want) -> Answer:
    """--context, --cluster, --user: the names in the kubeconfig files kubectl would read; no cluster asked, and
    no Kubernetes client loaded."""
    from .errors import MirrorError
    from .kubeconfig_files import kubeconfig_paths, merge_kubeconfigs

    assert want.flag is not None
    kind = {"context": "contexts", "cluster": "clusters", "user": "users"}[want.flag.dest]
    try:
        merged = merge_kubeconfigs(kubeconfig_paths(state.last("kubeconfig"), os.environ))
    except MirrorError:
        return Answer((), NO_FILE_COMP)
    pairs = []
    for entry in merged[kind]:
        body = entry.get(kind[:-1]) or {}
        desc = f"cluster {body.get('cluster', '')}" if kind == "contexts" and isinstance(body, dict) else ""
        pairs.append((str(entry["name"]), desc))
    return Answer(matching(pairs, want.prefix, want.emit), NO_FILE_COMP)


def _cluster(name: str) -> Lookup:
    """completion_cluster's `name`, imported on first use: it loads the Kubernetes client (~0.2 s)."""

    def call(state: Words, want: Want) -> Answer:
        from . import completion_cluster

        found: Lookup = getattr(completion_cluster, name)
        return found(state, want)

    return call


CLUSTER = Lookups(refs=_cluster("refs"), namespaces=_cluster("namespaces"),
                  kubeconfig=kubeconfig_names, ports=_cluster("ports"),
                  containers=_cluster("containers"))


def main(argv: Sequence[str] | None = None) -> int:
    """`kubectl_complete-mirror WORD... PARTIAL`: candidates and the directive on stdout, never anything on stderr.

    Whatever goes wrong, the shell gets a directive and no noise: a completion that prints errors or tracebacks
    would scribble over the user's command line. DEBUG_ENV=1 keeps stderr for debugging.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    descriptions = True
    if words and words[0] in COMPLETE_COMMANDS:
        descriptions = words.pop(0) == "__complete"
    debug = bool(os.environ.get(DEBUG_ENV))
    if not debug:
        _off_the_terminal()
    try:
        result = complete(words)
    except Exception:
        if debug:
            raise
        result = Answer((), NO_FILE_COMP)
    sys.stdout.write("".join(line + "\n" for line in result.lines(descriptions)))
    sys.stdout.flush()
    return 0


def _off_the_terminal() -> None:
    """stdin and stderr to /dev/null, for Python and for the exec credential plugins a kubeconfig may start.

    kubectl hands its terminal to the completion executable. An exec plugin that prompts (a login) would read
    the user's keystrokes, and could go on doing so after the lookup gave up on it: with no terminal it fails
    at once instead, and completion offers nothing, as for any cluster error.
    """
    import warnings

    warnings.simplefilter("ignore")
    try:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 2)
        os.close(null)
    except OSError:
        pass
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


if __name__ == "__main__":
    sys.exit(main())
