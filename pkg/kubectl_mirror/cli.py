"""Command line: `kubectl mirror TYPE/NAME --to :PORT` and `kubectl mirror replay FILE --to :PORT`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from . import __version__
from .errors import EXIT_INTERRUPTED, MirrorError, UsageError
from .model import PAYLOAD
from .settings import LiveTarget, Settings


def prog_name(argv0: str) -> str:
    """`kubectl mirror` when run as a kubectl plugin (kubectl-mirror), else the script name."""
    base = os.path.basename(argv0 or "kubectl-mirror")
    return base.replace("kubectl-", "kubectl ", 1) if base.startswith("kubectl-") else base


def parse_duration(text: str) -> float:
    """`30s`, `2m`, `1h`, `500ms` or a bare number of seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    t = text.strip()
    for suffix in ("ms", "s", "m", "h"):
        if t.endswith(suffix):
            number, factor = t[: -len(suffix)], units[suffix]
            break
    else:
        number, factor = t, 1.0
    try:
        value = float(number) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (examples: 500ms, 30s, 2m)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must not be negative")
    return value


def parse_size(text: str) -> int:
    """`4MiB`, `512KiB`, `1GiB`, `4M` or a bare number of bytes."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "b": 1}
    t = text.strip().lower()
    for suffix in ("kib", "mib", "gib", "k", "m", "g", "b"):
        if t.endswith(suffix):
            number, factor = t[: -len(suffix)], units[suffix]
            break
    else:
        number, factor = t, 1
    try:
        value = int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 512KiB, 4MiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be positive")
    return value


def parse_verbosity(text: str) -> int:
    """kubectl writes -v=6; argparse hands a short option's value over with the '=' still on."""
    try:
        level = int(text.lstrip("="))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid verbosity {text!r}: expected a number from 0 to 9") from None
    if not 0 <= level <= 9:
        raise argparse.ArgumentTypeError(f"invalid verbosity {level}: expected 0 to 9")
    return level


def parse_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected a number from 1 to 65535") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range: expected 1 to 65535")
    return port


def parse_interface(text: str) -> str:
    """A Linux interface name (at most 15 characters, no slash or space), or `any`."""
    name = text.strip()
    if not 0 < len(name) <= 15 or any(ch in name for ch in "/ \t\n:") or name.startswith("-"):
        raise argparse.ArgumentTypeError(f"invalid interface {text!r}: expected a name such as lo, eth0 or any")
    return name


def add_replay_flags(p: argparse.ArgumentParser, *, live: bool = False) -> None:
    """Flags shared by `replay` and live mirroring: how flows are rebuilt and delivered."""
    g = p.add_argument_group("Delivery")
    g.add_argument("--to", metavar="[HOST]:PORT", help="local service to mirror to (:8080 means 127.0.0.1:8080)")
    g.add_argument("--allow-remote", action="store_true",
                   help="allow --to off this machine (the mirrored traffic carries production data)")
    if not live:
        g.add_argument("--speed", type=float, default=0.0, metavar="X",
                       help="1 keeps the capture's timing, 2 is twice as fast; 0 (default) is as fast as possible")
    g.add_argument("--tls-passthrough", action="store_true",
                   help="replay connections that open with a TLS ClientHello too, for a TLS server at --to "
                        "(default: they are not replayed and are counted as tls)")
    g.add_argument("--no-wait", action="store_true",
                   help="send each connection's bytes without waiting for your service's answers (load tests); by "
                        "default the next request waits until the previous one was answered, as the client did")
    g.add_argument("--answer-timeout", type=parse_duration, default=1.0, metavar="DURATION",
                   help="the least time a request waits for your service's answer (it also waits up to 10x "
                        "production's own answer time); then delivery goes on and the request counts as unanswered")
    g.add_argument("--skip-partial", action="store_true",
                   help="drop connections already open when the capture started (default: replay them)")
    g.add_argument("--hole-timeout", type=parse_duration, default=2.0, metavar="DURATION",
                   help="how long a flow waits for a lost segment before it is aborted as incomplete")
    g.add_argument("--idle-timeout", type=parse_duration, default=300.0, metavar="DURATION",
                   help="close a mirrored connection after this long without traffic")
    g.add_argument("--flow-buffer", type=parse_size, default=8 << 20, metavar="SIZE",
                   help="bytes buffered per flow for a slow target before the flow is dropped")
    g.add_argument("--max-buffer", type=parse_size, default=128 << 20, metavar="SIZE",
                   help="bytes buffered over all flows before the largest is dropped")
    add_http_flags(p)
    o = p.add_argument_group("Output")
    o.add_argument("-o", "--output", choices=("text", "json"), default="text",
                   help="the final summary: a table on stderr (text) or JSON on stdout (json); in HTTP mode, "
                        "json is JSON lines: one {\"type\": \"request\", ...} per request, the summary last")
    o.add_argument("--json", dest="output", action="store_const", const="json", help="same as -o json")
    o.add_argument("-q", "--quiet", action="store_true", help="no status line, no notes; errors only")
    o.add_argument("-v", "--v", dest="verbosity", nargs="?", const=1, default=0, type=parse_verbosity,
                   metavar="N", help="diagnostics on stderr: -v or -v=N (N up to 9; payload bytes only at 9)")
    o.add_argument("--tshark", metavar="PATH", help="tshark to use (default: found on PATH)")
    o.add_argument("--dissectors", type=_positive_int, metavar="N",
                   help="tshark processes dissecting side by side, each given whole connections (default: the "
                        "cores this process may use; 1 for a capture file under 4 MB)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid whole number {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be 1 or more")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def _http_parser(name: str) -> Callable[[str], Any]:
    """httpopts' value parser, imported only when such a flag is given: --help must not load the HTTP layer."""

    def parse(text: str) -> Any:
        from . import httpopts

        return getattr(httpopts, name)(text)

    parse.__name__ = name  # argparse names the type in its error messages
    return parse


parse_header_match = _http_parser("parse_header_match")
parse_set_header = _http_parser("parse_set_header")
parse_sample = _http_parser("parse_sample")


def add_http_flags(p: argparse.ArgumentParser) -> None:
    """HTTP/1.x mode: any of these implies --http; without them every connection is mirrored byte-exact."""

    h = p.add_argument_group(
        "HTTP", "Any of these implies --http. Filters are and'ed; each may be repeated.")
    h.add_argument("--http", action="store_true",
                   help="split connections into HTTP/1.x requests and report each (bytes still go out as captured)")
    h.add_argument("--match-method", action="append", metavar="METHOD",
                   help="mirror only requests with this method (repeatable, or comma-separated)")
    h.add_argument("--match-path", action="append", metavar="REGEX", help="mirror only requests whose target matches")
    h.add_argument("--match-header", action="append", type=parse_header_match, metavar="'NAME: REGEX'",
                   help="mirror only requests with this header matching")
    h.add_argument("--match-grpc", action="append", metavar="SERVICE[/METHOD]",
                   help="mirror only gRPC calls of this service or method (regex, e.g. 'shop\\.Cart/.*'); HTTP/2")
    h.add_argument("--set-header", action="append", type=parse_set_header, metavar="'NAME: VALUE'",
                   help="set (replace or add) a header on every mirrored request")
    h.add_argument("--rewrite-host", metavar="HOST[:PORT]", help="replace the Host header (default: keep it)")
    h.add_argument("--sample", type=parse_sample, metavar="PERCENT",
                   help="mirror this share of connections, e.g. 10%% (whole connections, chosen by a hash)")
    h.add_argument("--sample-seed", type=int, default=0, metavar="N",
                   help="sampling seed: the same seed picks the same connections of a capture")
    h.add_argument("--max-rps", type=_positive_float, metavar="N",
                   help="at most N requests per second; requests over it are not sent and are counted")
    h.add_argument("--compare", action="store_true",
                   help="compare each mirrored request's production response (from the capture) with the local one")
    h.add_argument("--compare-headers", action="append", metavar="NAMES",
                   help="headers to compare as well (comma-separated or repeated; default: status and body only)")
    h.add_argument("--ignore-json-path", action="append", metavar="PATH",
                   help="leave this JSON value out of body comparisons, e.g. $.timestamp or $..requestId")
    h.add_argument("--compare-report", metavar="FILE",
                   help="write every difference as a JSON line to FILE (0600; implies --compare)")
    h.add_argument("--proto-descriptor", metavar="FILE",
                   help="gRPC: compare messages as JSON with the types of this FileDescriptorSet (protoc "
                        "--descriptor_set_out, buf build -o); implies --compare")


class MirrorArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one kubectl-style line that points at --help, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message}; see '{self.prog} --help'")


SUBCOMMANDS = ("replay",)


def _epilog(prog: str) -> str:
    return (
        "Examples:\n"
        f"  {prog} deploy/web --to :8080\n"
        f"  {prog} -n shop svc/api --port http --to :9000 -w api.pcap\n"
        f"  {prog} pod/x -w - | wireshark -k -i -\n"
        f"  {prog} replay api.pcap --to :8080 --speed 2\n"
        "\nExit codes: 0 ok; 1 error; 2 usage; 3 the run finished but connections failed or were dropped at the "
        "local service; 130 interrupted twice."
    )


def build_live_parser(prog: str) -> argparse.ArgumentParser:
    from .flags import add_connection_flags

    parser = MirrorArgumentParser(
        prog=prog,
        usage=f"{prog} [TYPE/NAME | -l SELECTOR] [--to [HOST]:PORT] [flags]\n       {prog} replay FILE --to "
              "[HOST]:PORT [flags]",
        description=(
            "Mirror real in-cluster TCP traffic to a service on your machine, read-only.\n\n"
            "Every connection the pod receives on the port is replayed to --to, byte for byte, one local\n"
            "connection each; responses are discarded and nothing flows back into the cluster. Without --to,\n"
            "the capture is written to a file (-w).\n\n"
            "Commands:\n"
            "  replay FILE    replay a pcap/pcapng file (or - for stdin) offline; see '" + prog + " replay --help'\n"
            "  status         which pods carry a tap and whether a capture runs; see '" + prog + " status --help'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(prog),
    )
    parser.add_argument("--version", action=VersionAction, help="print versions (plugin, tshark, python client)")
    parser.add_argument("ref", nargs="?", metavar="TYPE/NAME",
                        help="pod/po, deploy, sts, ds, rs, job or svc and a name; a bare NAME is a pod")
    t = parser.add_argument_group("Target")
    t.add_argument("-l", "--selector", metavar="SELECTOR", help="pick pods by label instead of TYPE/NAME")
    t.add_argument("-c", "--container", metavar="NAME", help="the container whose port to capture")
    t.add_argument("--port", metavar="PORT", help="port number or name (default: the one declared port)")
    t.add_argument("--all-pods", action="store_true", help="mirror every matching pod at once, not just the first")
    tap = parser.add_argument_group("Tap")
    tap.add_argument("--image", metavar="IMAGE",
                     help="tap image with tcpdump and sh (default: nicolaka/netshoot v0.11, pinned by digest)")
    tap.add_argument("--image-pull-policy", default="IfNotPresent", choices=("Always", "IfNotPresent", "Never"),
                     help="pull policy of the tap image")
    tap.add_argument("--tap-timeout", type=parse_duration, default=120.0, metavar="DURATION",
                     help="how long to wait for the tap to run")
    cap = parser.add_argument_group("Capture")
    cap.add_argument("--filter", metavar="BPF", help="extra pcap-filter expression, and'ed with the port")
    cap.add_argument("--interface", type=parse_interface, metavar="NAME",
                     help="the pod's interface to capture on (default: any; lo in a service mesh, the sidecar's "
                          "plaintext hop)")
    cap.add_argument("-w", "--write", metavar="FILE", help="also write the capture to FILE (pcapng; - for stdout)")
    cap.add_argument("--duration", type=parse_duration, metavar="DURATION", help="stop after this long (e.g. 30s)")
    cap.add_argument("--count", type=int, metavar="N", help="stop after N packets")
    add_replay_flags(parser, live=True)
    add_connection_flags(parser)
    return parser


def build_replay_parser(prog: str) -> argparse.ArgumentParser:
    replay = MirrorArgumentParser(
        prog=f"{prog} replay",
        description="Replay every inbound TCP connection of a capture to a local service, byte-exact, offline.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Examples:\n"
            f"  {prog} replay api.pcap --to :8080\n"
            f"  {prog} replay api.pcap --to :8080 --speed 1 --port 80\n"
            f"  tcpdump -i any -U -w - port 80 | {prog} replay - --to :8080\n"
            "\nExit codes: 0 ok; 1 error; 2 usage; 3 connections failed or were dropped at the local service."
        ),
    )
    replay.add_argument("file", metavar="FILE", help="pcap or pcapng file, or - for stdin")
    replay.add_argument("--port", type=parse_port, metavar="PORT",
                        help="server port in the capture (default: the side that received the SYN)")
    add_replay_flags(replay)
    return replay


def build_status_parser(prog: str) -> argparse.ArgumentParser:
    from .flags import add_connection_flags

    status = MirrorArgumentParser(
        prog=f"{prog} status",
        description="Which pods carry a tap (ephemeral containers stay for the pod's life), its image, its state, "
                    "and whether a capture runs in it now.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Examples:\n  {prog} status\n  {prog} status deploy/web -n shop\n  {prog} status -l app=web -o json",
    )
    status.add_argument("ref", nargs="?", metavar="TYPE/NAME", help="limit to these pods (default: the namespace)")
    status.add_argument("-l", "--selector", metavar="SELECTOR", help="limit to pods with these labels")
    status.add_argument("-o", "--output", choices=("text", "json"), default="text", help="table or JSON")
    status.add_argument("-v", "--v", dest="verbosity", nargs="?", const=1, default=0, type=parse_verbosity,
                        metavar="N", help="diagnostics on stderr")
    add_connection_flags(status)
    return status


def version_text() -> str:
    """The plugin's version, and what it found of the two things it depends on most."""
    from importlib import metadata

    from .dissect import find_tshark

    try:
        tshark = "tshark " + ".".join(map(str, find_tshark(None).version))
    except MirrorError as exc:
        tshark = f"tshark: {exc.message}"
    try:
        client = f"kubernetes python client {metadata.version('kubernetes')}"
    except metadata.PackageNotFoundError:
        client = "kubernetes python client: not installed"
    return f"kubectl-mirror {__version__}\n{tshark}\n{client}"


class VersionAction(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=str(kwargs.get("help", "")))

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(version_text())
        parser.exit(0)


def setup_logging(verbosity: int) -> None:
    """-v levels as kubectl users read them: 1-3 what happens, 4+ details. Tokens and payloads are never logged."""
    if verbosity <= 0:
        level = logging.WARNING
    elif verbosity < 4:
        level = logging.INFO
    else:
        level = logging.DEBUG if verbosity < 9 else PAYLOAD
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("kubectl_mirror")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # The python client logs request bodies and headers (tokens) at DEBUG: keep it quiet at every level.
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def live_target(args: argparse.Namespace) -> LiveTarget:
    """The live command's target, tap and stop flags, typed, built once like `engine_settings`."""
    given = vars(args)
    values = {f.name: given[f.name] for f in dataclasses.fields(LiveTarget) if given.get(f.name) is not None}
    return LiveTarget(**values)


def engine_settings(args: argparse.Namespace) -> Settings:
    """The typed settings of a run, built once from the parsed flags: nothing after this reads the namespace.

    A flag this command lacks keeps the default (live has no --speed, replay no -w); a repeatable flag not
    given is an empty list.
    """
    given = vars(args)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        if f.name in given and given[f.name] is not None:
            values[f.name] = given[f.name]
    return Settings(**values)


def start_replay(args: argparse.Namespace) -> int:
    """`replay`: check --to, start dissecting the input, and only then import the engine.

    tshark takes ~0.2 s to load its dissectors and the engine's modules (pydantic among them) ~0.2 s to import:
    done one after the other they were a tenth of a 2.5 s run; the tsharks now load, and work, meanwhile.
    Nothing starts before --to is known to answer.
    """
    from contextlib import ExitStack

    from .dissect import Dissector, dissector_count, find_tshark
    from .pcap import open_capture
    from .replay import destination

    if not args.to:
        raise UsageError("replay needs --to [HOST]:PORT, the local service to mirror to (for example --to :8080)")
    dest = destination(args.to, allow_remote=args.allow_remote)
    tshark = find_tshark(args.tshark)
    stack = ExitStack()
    with stack:
        source = open_capture(args.file, stack)
        args.dissectors = dissector_count(args.dissectors, source)
        # The dissectors start reading the input now: the tsharks load and work through the first records while
        # the engine's modules import. A pipe can pause (tcpdump | kubectl mirror replay -): tshark must not sit on
        # lines it has (live).
        dissector = Dissector(source, tshark, live=args.file == "-", dissectors=args.dissectors)
        stack.callback(dissector.close)  # the engine closes it too; this covers a failure before it runs
        dissector.start()
        from .offline import ReplayStart, run_replay

        start = ReplayStart(dest, tshark, source, dissector, file=args.file, port=args.port)
        return int(run_replay(engine_settings(args), start, stack.pop_all()))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    prog = prog_name(argv[0] if argv else "kubectl-mirror")
    rest = argv[1:]
    if rest and rest[0] in ("__complete", "__completeNoDesc"):
        # cobra's hidden command: what kubectl_complete-mirror runs in the krew binary (see completion.py).
        from .completion import main as complete

        return complete(rest)
    try:
        if rest and rest[0] == "replay":
            args = build_replay_parser(prog).parse_args(rest[1:])
            setup_logging(args.verbosity)
            return start_replay(args)
        if rest and rest[0] == "status":
            args = build_status_parser(prog).parse_args(rest[1:])
            setup_logging(args.verbosity)
            from .status import run_status

            return int(run_status(args))
        args = build_live_parser(prog).parse_args(rest)
        setup_logging(args.verbosity)
        from .kubeconfig import ConnectionFlags
        from .live import run_live

        return int(run_live(ConnectionFlags.from_args(args), live_target(args), engine_settings(args)))
    except MirrorError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


__all__ = ["UsageError", "main", "prog_name"]
