"""A "pod" for tests: a network namespace with a veth pair to the host, like a CNI would set up."""

from __future__ import annotations

import secrets
import subprocess
from types import TracebackType

TIMEOUT = 10


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=TIMEOUT)


class PodNetns:
    """with PodNetns() as pod: pod.name (netns), pod.ip (inside), pod.host_ip (host end of the veth)."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name = f"km-pod-{tag}"
        self._host_if = f"kmh{tag}"
        octet = int(tag[:2], 16) % 250 + 1
        third = int(tag[2:4], 16)
        self.host_ip = f"10.{200 + octet % 50}.{third}.1"
        self.ip = f"10.{200 + octet % 50}.{third}.2"

    def __enter__(self) -> PodNetns:
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self._host_if, "type", "veth", "peer", "name", "eth0", "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/30", "dev", self._host_if)
            _ip("link", "set", self._host_if, "up")
            _ip("-n", self.name, "addr", "add", f"{self.ip}/30", "dev", "eth0")
            _ip("-n", self.name, "link", "set", "eth0", "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        # Deleting the namespace removes its veth end, which removes the host end too.
        subprocess.run(["ip", "link", "del", self._host_if], capture_output=True, timeout=TIMEOUT, check=False)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=TIMEOUT, check=False)
