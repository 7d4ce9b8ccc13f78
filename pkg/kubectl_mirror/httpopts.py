"""HTTP mode's flags as values: filters, rewrites, sampling and the rate limit, checked when they are parsed.

A bad --match-header, --set-header or --sample fails here, before anything runs; `HttpOptions` is what the HTTP
layers (httpflow, h2layer) run on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UsageError

# ---- options ------------------------------------------------------------------------------------------

# Body framing stays byte-exact, so the headers that describe it must not change under it.
_FRAMING = frozenset({"content-length", "transfer-encoding"})
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


@dataclass
class HttpOptions:
    match_method: list[str] = field(default_factory=list)  # any of these methods (case-insensitive)
    match_path: list[str] = field(default_factory=list)  # regexes searched in the request target; all must match
    match_header: list[tuple[str, str]] = field(default_factory=list)  # (name, value regex); all must match
    # gRPC calls only (HTTP/2): SERVICE or SERVICE/METHOD regexes. An HTTP/1.x request is never a gRPC call.
    match_grpc: list[str] = field(default_factory=list)
    set_header: list[tuple[str, str]] = field(default_factory=list)  # (name, value): replace or add
    rewrite_host: str | None = None  # new Host header value, host[:port]; None keeps the captured one
    sample: float = 1.0  # fraction of connections mirrored, 0..1
    max_rps: float | None = None  # requests per second over all connections; None: unlimited
    seed: int = 0  # sampling seed: same seed, same capture -> same connections
    # Start mid-stream connections at their first request boundary even with nothing else set: shadow comparison
    # needs whole requests on the local side, where the observe-only mode would pass the captured bytes as they are.
    align: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample <= 1.0:
            raise UsageError(f"--sample {self.sample:g} is out of range: give a fraction 0..1 or a percentage")
        if self.max_rps is not None and not self.max_rps > 0:
            raise UsageError(f"--max-rps {self.max_rps:g} must be above 0 (leave it out for no limit)")
        for pattern in self.match_path:
            _compile(pattern, "--match-path")
        for name, pattern in self.match_header:
            _check_name(name, "--match-header")
            _compile(pattern, "--match-header")
        for pattern in self.match_grpc:
            _compile(pattern, "--match-grpc")
        for name, value in self.set_header:
            _check_set_header(name, value)
        if self.rewrite_host is not None:
            _check_value(self.rewrite_host, "--rewrite-host")

    @property
    def filtering(self) -> bool:
        """Some requests may not match: whole connections may end up with nothing to send."""
        return bool(self.match_method or self.match_path or self.match_header or self.match_grpc)

    @property
    def rewriting(self) -> bool:
        return bool(self.set_header) or self.rewrite_host is not None

    @property
    def active(self) -> bool:
        """Anything that changes what is sent; when false the layer only observes."""
        return self.filtering or self.rewriting or self.sample < 1.0 or self.max_rps is not None or self.align


def parse_header_match(text: str) -> tuple[str, str]:
    """`--match-header 'Name: REGEX'` -> (name, regex). The regex is searched in the header's value."""
    name, sep, pattern = text.partition(":")
    name, pattern = name.strip(), pattern.strip()
    if not sep or not name:
        raise UsageError(f"invalid --match-header {text!r}: expected 'Name: REGEX', for example 'X-Tenant: ^acme$'")
    _check_name(name, "--match-header")
    _compile(pattern, "--match-header")
    return name, pattern


def parse_set_header(text: str) -> tuple[str, str]:
    """`--set-header 'Name: value'` -> (name, value)."""
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not name:
        raise UsageError(f"invalid --set-header {text!r}: expected 'Name: value', for example 'X-Mirror: 1'")
    _check_set_header(name, value)
    return name, value


def parse_sample(text: str) -> float:
    """`--sample 10%` or `--sample 0.1` -> 0.1."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100.0 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UsageError(f"invalid --sample {text!r}: expected a percentage like 10% or a fraction like 0.1") from None
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"invalid --sample {text!r}: it must be between 0% and 100%")
    return value


def _compile(pattern: str, flag: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"invalid {flag} regex {pattern!r}: {exc}") from None


def _check_name(name: str, flag: str) -> None:
    if not _TOKEN.fullmatch(name):
        raise UsageError(f"invalid {flag} header name {name!r}: letters, digits and -_. only")


def _check_value(value: str, flag: str) -> None:
    if any(c in value for c in "\r\n\0") or not value.isascii():
        raise UsageError(f"invalid {flag} value {value!r}: printable ASCII on one line only")


def _check_set_header(name: str, value: str) -> None:
    _check_name(name, "--set-header")
    _check_value(value, "--set-header")
    if name.lower() in _FRAMING:
        raise UsageError(f"--set-header cannot change {name}: bodies are mirrored byte-exact with their own framing")
