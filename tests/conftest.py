"""Shared pytest set-up. Fixtures that belong to one area live next to that area's helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Fixtures shared by the Kubernetes-side tests (the `conn` fixture).
pytest_plugins = ["tests.kube_fixtures"]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Network namespaces need root; say why instead of failing with EPERM deep inside a test.
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root for network namespaces")
        for item in items:
            if "netns" in item.keywords:
                item.add_marker(skip)
