"""A Kubernetes API server for tests, faithful where kubectl-mirror depends on it. See cluster.FakeCluster."""

from __future__ import annotations

from .cluster import FakeCluster
from .netns import PodNetns

__all__ = ["FakeCluster", "PodNetns"]
