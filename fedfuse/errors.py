"""Errors the CLI turns into one line and exit code 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad option value; the message names the option, the value and what is allowed."""


class DataUnavailableError(ConfigError):
    """A data set cannot be loaded (offline and not present under the data root)."""
