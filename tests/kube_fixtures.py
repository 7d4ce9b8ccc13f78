"""Fixtures shared by the Kubernetes-side tests: a Connection as the CLI builds one, and the local service."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import pytest

from kubectl_mirror.flags import add_connection_flags
from kubectl_mirror.kubeconfig import Connection, connect
from tests.apiserver import FakeCluster
from tests.netlab.recorder import Recorder


def connection(fc: FakeCluster, *extra: str) -> Connection:
    parser = argparse.ArgumentParser()
    add_connection_flags(parser)
    return connect(parser.parse_args(["--kubeconfig", str(fc.kubeconfig), *extra]))


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    """Teardown in reverse order of set-up, for what a test builds step by step (pods, servers, runs)."""
    with contextlib.ExitStack() as s:
        yield s


@pytest.fixture
def conn(fc: FakeCluster) -> Iterator[Connection]:
    """Needs an `fc` fixture in the test module: each area sets its cluster up its own way."""
    c = connection(fc)
    yield c
    c.close()


@pytest.fixture
def local() -> Iterator[Recorder]:
    """The developer's local service: a recorder on loopback."""
    rec = Recorder("127.0.0.1", 0).start()
    try:
        yield rec
    finally:
        rec.stop(grace=0.0)
