"""kubectl-mirror: mirror in-cluster TCP traffic to a local service, read-only."""

from __future__ import annotations

__version__ = "0.1.0"
