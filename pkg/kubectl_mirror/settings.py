"""The flags a mirroring run works with, typed, and the --to destination: built once from the command line.

cli.py parses argv and builds one `Settings` (cli.engine_settings); everything after it (the replay and live
commands, the engine's options, the output) reads these fields and never the argparse namespace. Plain data
and parsing only: nothing here opens a socket (checking that --to answers is replay's).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from .errors import UsageError

_USAGE = "invalid --to {text!r}: expected [HOST]:PORT, for example :8080 or 127.0.0.1:8080"


@dataclass(frozen=True)
class LiveTarget:
    """What the live command mirrors, how it taps it and when it stops (cli.live_target builds it once)."""

    ref: str | None = None  # TYPE/NAME
    selector: str | None = None  # -l
    container: str | None = None  # -c
    port: str | None = None  # number or name
    all_pods: bool = False
    filter: str | None = None  # extra BPF, and'ed with the port
    interface: str | None = None
    image: str | None = None  # None: the default tap image
    image_pull_policy: str = "IfNotPresent"
    tap_timeout: float = 120.0
    duration: float | None = None
    count: int | None = None


@dataclass(frozen=True)
class Settings:
    """The flags of `replay` and of the live command that shape the run (defaults: the parsers' own)."""

    # Delivery
    to: str | None = None
    allow_remote: bool = False
    speed: float = 0.0  # replay only: 0 as fast as possible, 1 the capture's own pace
    tls_passthrough: bool = False
    no_wait: bool = False
    answer_timeout: float = 1.0
    skip_partial: bool = False
    hole_timeout: float = 2.0
    idle_timeout: float = 300.0
    flow_buffer: int = 8 << 20
    max_buffer: int = 128 << 20
    # Output
    output: str = "text"  # text or json
    quiet: bool = False
    verbosity: int = 0
    tshark: str | None = None
    dissectors: int | None = None  # --dissectors; None: as many as cores (dissect.dissector_count decides)
    write: str | None = None  # live only: -w FILE ("-": stdout carries the capture)
    # HTTP mode: any of these implies it
    http: bool = False
    match_method: list[str] = field(default_factory=list)
    match_path: list[str] = field(default_factory=list)
    match_header: list[tuple[str, str]] = field(default_factory=list)
    match_grpc: list[str] = field(default_factory=list)  # gRPC calls only: SERVICE[/METHOD] regexes (HTTP/2)
    set_header: list[tuple[str, str]] = field(default_factory=list)
    rewrite_host: str | None = None
    sample: float | None = None
    sample_seed: int = 0
    max_rps: float | None = None
    compare: bool = False
    compare_headers: list[str] = field(default_factory=list)
    ignore_json_path: list[str] = field(default_factory=list)
    compare_report: str | None = None
    proto_descriptor: str | None = None  # gRPC messages decoded to JSON for --compare (a FileDescriptorSet)

    @property
    def comparing(self) -> bool:
        """--compare, or an option that only means something with it."""
        return bool(self.compare or self.compare_report or self.compare_headers or self.ignore_json_path
                    or self.proto_descriptor)

    @property
    def http_mode(self) -> bool:
        """--http, or any option that only means something in HTTP mode."""
        return bool(self.http or self.comparing or self.match_method or self.match_path or self.match_header
                    or self.match_grpc
                    or self.set_header or self.rewrite_host is not None or self.sample is not None
                    or self.max_rps is not None)

    @property
    def json(self) -> bool:
        return self.output == "json"

    @property
    def stdout_free(self) -> bool:
        """With `-w -` stdout carries the pcap and nothing else."""
        return self.write != "-"


# ---- the --to destination ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Destination:
    host: str  # numeric address
    port: int
    family: int  # socket.AF_INET or socket.AF_INET6

    @property
    def is_loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.host}:{self.port}"


def parse_to(text: str) -> Destination:
    """`:8080`, `8080`, `HOST:PORT` or `[V6]:PORT`; a host name is resolved now (IPv4 preferred)."""
    raw = text.strip()
    bad = UsageError(_USAGE.format(text=text))
    if raw.isascii() and raw.isdigit():
        host, port_text = "", raw
    elif raw.startswith("["):
        end = raw.find("]")
        if end < 2 or raw[end + 1 : end + 2] != ":":
            raise bad
        host, port_text = raw[1:end], raw[end + 2 :]
    else:
        host, sep, port_text = raw.rpartition(":")
        if not sep or ":" in host:  # an IPv6 address needs brackets, or the port is ambiguous
            raise bad
    if not (port_text.isascii() and port_text.isdigit()):
        raise bad
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise UsageError(f"invalid --to {text!r}: port {port} is out of range, expected 1 to 65535")
    if not host:
        return Destination("127.0.0.1", port, socket.AF_INET)
    address, family = _resolve(host, text)
    return Destination(address, port, family)


def _resolve(host: str, text: str) -> tuple[str, int]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return str(ip), socket.AF_INET if ip.version == 4 else socket.AF_INET6
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_UNSPEC, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UsageError(f"invalid --to {text!r}: cannot resolve host {host!r}") from None
    # Local dev servers listen on 127.0.0.1 far more often than on ::1, whatever order the resolver prefers.
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return str(sockaddr[0]), int(family)
    raise UsageError(f"invalid --to {text!r}: host {host!r} has no IP address")


def allowed(dest: Destination, allow_remote: bool) -> Destination:
    """Mirrored traffic carries production data: only to this machine unless --allow-remote."""
    if not dest.is_loopback and not allow_remote:
        raise UsageError(f"--to {dest} is not on this machine, and mirrored traffic carries production data "
                         "(tokens, passwords): pass --allow-remote to send it there anyway")
    return dest


__all__ = ["Destination", "Settings", "allowed", "parse_to"]
