"""Helpers for tests/test_security.py: the README's Role as test data, synthetic captures with secrets in them,
and a static scan of pkg/ for shell invocations."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubectl_mirror.model import ACK, FIN, PSH, SYN
from kubectl_mirror.pcap import PcapWriter
from tests.dissect_helpers import ethernet, tcp_ip

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
RBAC_SECTION = "## RBAC: what you need"
LINKTYPE_ETHERNET = 1


# ---- the README's Role ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Permission:
    """One verb on one resource, as the test API server's RBAC names it: (verb, plural, subresource)."""

    verb: str
    resource: str  # plural, no group: the test server matches on the plural only
    subresource: str
    group: str

    @property
    def rule(self) -> tuple[str, str, str]:
        return (self.verb, self.resource, self.subresource)

    @property
    def full(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    @property
    def id(self) -> str:
        return f"{self.verb}-{self.full}"


def readme_role(readme: Path = README) -> dict[str, Any]:
    """The ```yaml block with `kind: Role` in the RBAC section: the test reads what users read."""
    text = readme.read_text(encoding="utf-8")
    start = text.find(RBAC_SECTION)
    assert start >= 0, f"{readme} has no section {RBAC_SECTION!r}"
    nxt = text.find("\n## ", start + len(RBAC_SECTION))
    section = text[start: nxt if nxt >= 0 else len(text)]
    blocks = [yaml.safe_load(b) for b in re.findall(r"^```yaml\n(.*?)^```", section, re.S | re.M)]
    roles = [b for b in blocks if isinstance(b, dict) and b.get("kind") == "Role"]
    assert len(roles) == 1, f"expected one ```yaml block with kind: Role in {RBAC_SECTION!r}, found {len(roles)}"
    return roles[0]


def role_permissions(role: dict[str, Any]) -> list[Permission]:
    """Every (verb, resource) pair the Role grants, in README order; "pods/exec" -> resource pods, sub exec."""
    out: list[Permission] = []
    for rule in role.get("rules") or []:
        groups = rule.get("apiGroups") or [""]
        assert len(groups) == 1, f"one API group per rule keeps the mapping exact: {rule}"
        for resource in rule["resources"]:
            plural, _, sub = str(resource).partition("/")
            for verb in rule["verbs"]:
                out.append(Permission(str(verb), plural, sub, str(groups[0])))
    assert len({p.rule for p in out}) == len(out), f"the Role repeats a permission: {out}"
    return out


# ---- a capture with secrets in it -----------------------------------------------------------------------------


def write_capture(path: Path, payloads: list[bytes], *, server: str = "10.9.0.2", port: int = 80) -> None:
    """One complete TCP connection per payload (handshake, data, FIN both ways), client to server:port."""
    ts = 1_700_000_000.0
    with PcapWriter(path, linktype=LINKTYPE_ETHERNET) as w:
        for i, data in enumerate(payloads):
            client, cport = f"10.9.0.{10 + i}", 40000 + i
            cseq, sseq = 1000 * (i + 1), 500_000 * (i + 1)
            frames = [
                (client, server, cport, port, cseq, 0, SYN, b""),
                (server, client, port, cport, sseq, cseq + 1, SYN | ACK, b""),
                (client, server, cport, port, cseq + 1, sseq + 1, ACK, b""),
                (client, server, cport, port, cseq + 1, sseq + 1, PSH | ACK, data),
                (server, client, port, cport, sseq + 1, cseq + 1 + len(data), ACK, b""),
                (client, server, cport, port, cseq + 1 + len(data), sseq + 1, FIN | ACK, b""),
                (server, client, port, cport, sseq + 1, cseq + 2 + len(data), FIN | ACK, b""),
                (client, server, cport, port, cseq + 2 + len(data), sseq + 2, ACK, b""),
            ]
            for src, dst, sp, dp, seq, ack, flags, body in frames:
                ts += 0.001
                w.write_packet(ts, ethernet(tcp_ip(src, dst, sp, dp, seq, ack, flags, body)))


# ---- static scan ----------------------------------------------------------------------------------------------

# Calls that hand a string to /bin/sh (or run a command line) on this machine.
SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"),
               ("commands", "getoutput"), ("pty", "spawn")}


def shell_invocations(root: Path) -> list[str]:
    """`file:line what` for every shell=<not False> keyword and every os.system-like call under `root`."""
    found: list[str] = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{path}:{node.lineno} shell={ast.unparse(kw.value)}")
            func = node.func
            if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                    and (func.value.id, func.attr) in SHELL_CALLS):
                found.append(f"{path}:{node.lineno} {func.value.id}.{func.attr}")
        for name in ("os.system", "os.popen", "shell=True"):
            # Also textually: an alias (`from os import system`) would slip past the call check above.
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if name in line.replace(" ", "") and not line.lstrip().startswith("#"):
                    found.append(f"{path}:{lineno} mentions {name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("os", "subprocess", "commands", "pty"):
                for alias in node.names:
                    if (node.module, alias.name) in SHELL_CALLS:
                        found.append(f"{path}:{node.lineno} from {node.module} import {alias.name}")
    return found
