"""Shared fixtures. Tests use bundled (digits) or generated (mnist1d, synthetic) data only."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
