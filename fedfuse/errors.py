"""Errors the CLI turns into one line: ConfigError → exit code 2, RunFailedError → exit code 1."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A bad option value; the message names the option, the value and what is allowed."""


class RunFailedError(RuntimeError):
    """A run that ended without a usable result (e.g. every round skipped); what it wrote stays."""


class DataUnavailableError(ConfigError):
    """A data set cannot be loaded (offline and not present under the data root)."""


class MissingArgumentError(ConfigError, TypeError):
    """A required argument is missing: a TypeError (as Python raises for one) whose message is one line naming
    the argument with a short example, and a ConfigError (the CLI's one line, exit code 2)."""


def require_model(owner: object, model: Any) -> Any:
    """``model``, or one line naming what is missing, with an example (a :class:`MissingArgumentError`)."""
    if model is None:
        name = type(owner).__name__
        raise MissingArgumentError(
            f"{name} needs model=, a torch module of the global architecture (the clients' model), "
            f"e.g. {name}(model=Net())"
        )
    return model
