"""Network namespaces and the links between them, always cleaned up."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

CMD_TIMEOUT = 20.0


def sh(args: Sequence[str], timeout: float = CMD_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=check)


def unique_name(prefix: str = "kml") -> str:
    # Random, so parallel runs (and other developers' runs on the same machine) never collide.
    return f"{prefix}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class Netns:
    name: str

    def argv(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(
        self, args: Sequence[str], timeout: float = CMD_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return sh(self.argv(args), timeout=timeout, check=check)

    def popen(self, args: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(args), **kwargs)  # type: ignore[call-overload, no-any-return]

    def pids(self) -> list[int]:
        out = sh(["ip", "netns", "pids", self.name], check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]


def _kill_leftovers(ns: Netns) -> None:
    # Only processes living inside this test's own namespace: they were started by the test.
    for pid in ns.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def netns(prefix: str = "kml") -> Iterator[Netns]:
    ns = Netns(unique_name(prefix))
    sh(["ip", "netns", "add", ns.name])
    try:
        ns.run(["ip", "link", "set", "lo", "up"])
        yield ns
    finally:
        _kill_leftovers(ns)
        sh(["ip", "netns", "del", ns.name], check=False)


def disable_dad(ns: Netns, ifname: str) -> None:
    # Without this a fresh IPv6 address stays "tentative" for a second or two and connect() fails.
    ns.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{ifname}.accept_dad=0"])
    ns.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{ifname}.dad_transmits=0"])


def add_addresses(
    ns: Netns, ifname: str, ip4: str, ip6: str, peer4: str | None = None, peer6: str | None = None
) -> None:
    """Address an interface; with peers, as a point-to-point link (what a TUN device needs)."""
    disable_dad(ns, ifname)
    if peer4:
        ns.run(["ip", "addr", "add", f"{ip4}/32", "peer", f"{peer4}/32", "dev", ifname])
    else:
        ns.run(["ip", "addr", "add", f"{ip4}/24", "dev", ifname])
    if peer6:
        ns.run(["ip", "-6", "addr", "add", f"{ip6}/128", "peer", f"{peer6}/128", "dev", ifname, "nodad"])
    else:
        ns.run(["ip", "-6", "addr", "add", f"{ip6}/64", "dev", ifname, "nodad"])
    ns.run(["ip", "link", "set", ifname, "up"])
    if peer6:
        # An IPv6 "peer" address does not route to the peer on a TUN device (the kernel routes the local
        # address instead): say it explicitly.
        ns.run(["ip", "-6", "route", "replace", f"{peer6}/128", "dev", ifname])


@dataclass(frozen=True)
class Link:
    """Two namespaces joined by one link: the client side and the server ("pod") side."""

    client: Netns
    server: Netns
    client_if: str
    server_if: str
    client_ip4: str
    server_ip4: str
    client_ip6: str
    server_ip6: str


ADDR4 = ("198.18.0.1", "198.18.0.2")
ADDR6 = ("fd00:6d69:7272::1", "fd00:6d69:7272::2")


def _mac(ns: Netns, ifname: str) -> str:
    return str(json.loads(ns.run(["ip", "-j", "link", "show", ifname]).stdout)[0]["address"])


def veth_between(client: Netns, server: Netns) -> Link:
    """A veth pair (captures on it are EN10MB); removed with the namespaces."""
    suffix = secrets.token_hex(3)
    c_if, s_if = f"vc{suffix}", f"vs{suffix}"
    sh(["ip", "link", "add", c_if, "netns", client.name, "type", "veth", "peer", "name", s_if, "netns", server.name])
    add_addresses(client, c_if, ADDR4[0], ADDR6[0])
    add_addresses(server, s_if, ADDR4[1], ADDR6[1])
    # Static neighbours: a Neighbor Solicitation sent before the peer end is up is lost, and the kernel only
    # retries a second later; every first IPv6 connection would wait for it.
    c_mac, s_mac = _mac(client, c_if), _mac(server, s_if)
    sides = ((client, c_if, s_mac, (ADDR4[1], ADDR6[1])), (server, s_if, c_mac, (ADDR4[0], ADDR6[0])))
    for ns, ifname, mac, addrs in sides:
        for addr in addrs:
            ns.run(["ip", "neigh", "replace", addr, "lladdr", mac, "dev", ifname, "nud", "permanent"])
    return Link(client, server, c_if, s_if, ADDR4[0], ADDR4[1], ADDR6[0], ADDR6[1])


@contextlib.contextmanager
def veth_lab() -> Iterator[Link]:
    with netns("kmlc") as client, netns("kmls") as server:
        yield veth_between(client, server)
