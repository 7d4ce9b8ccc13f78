"""A Connection to the test API server, as the CLI builds one from kubectl's flags; shared by the kube tests."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from kubectl_mirror.flags import add_connection_flags
from kubectl_mirror.kubeconfig import Connection, connect
from tests.apiserver import FakeCluster


def connection(fc: FakeCluster, *extra: str) -> Connection:
    parser = argparse.ArgumentParser()
    add_connection_flags(parser)
    return connect(parser.parse_args(["--kubeconfig", str(fc.kubeconfig), *extra]))


@pytest.fixture
def conn(fc: FakeCluster) -> Iterator[Connection]:
    """Needs an `fc` fixture in the test module: each area sets its cluster up its own way."""
    c = connection(fc)
    yield c
    c.close()
