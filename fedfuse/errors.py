"""Errors the CLI turns into one line: ConfigError → exit code 2, RunFailedError → exit code 1."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad option value; the message names the option, the value and what is allowed."""


class RunFailedError(RuntimeError):
    """A run that ended without a usable result (e.g. every round skipped); what it wrote stays."""


class DataUnavailableError(ConfigError):
    """A data set cannot be loaded (offline and not present under the data root)."""


class MissingArgumentError(ConfigError, TypeError):
    """A required argument is missing: a TypeError (as Python raises for one) whose message is one line naming
    the argument with a short example, and a ConfigError (the CLI's one line, exit code 2)."""
