"""The error a user sees for a value that is not allowed. Kept free of Hydra, so that every module (and
tools that never compose a config) can raise it."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A configuration value that is not allowed; the message is meant for the user as is."""


def fail(key: str, value: Any, allowed: str) -> None:
    """Raise the one-line error every bad value gets: the key, the value and what is allowed."""
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")
