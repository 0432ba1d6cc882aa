"""Hydra's and OmegaConf's composition errors (a misspelt key, an unknown preset, a value of the wrong
type, an override that does not parse) said in the one line every other bad value gets. Used by the entry
point only (beside it in spirit; a module of the package so that jobs a launcher unpickles elsewhere find
it): the library raises ConfigError and never sees Hydra's errors."""

from __future__ import annotations

from typing import Any


def _schema_keys(schema: Any) -> list[str]:
    from dataclasses import fields, is_dataclass

    return [f.name for f in fields(schema)] if is_dataclass(schema) else []


def _override_value(overrides: list[str], key: str) -> str:
    """What the command line gave `key` (the text after `key=`), or the key itself if it is not there."""
    for override in overrides:
        name, sep, value = override.lstrip("+~").partition("=")
        if sep and name == key:
            return value
    return key


_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "valid bool": "true or false", "string": "a text"}


def composition_error_line(error: Exception, overrides: list[str]) -> str:
    """Hydra's and OmegaConf's composition errors (a misspelt key, an unknown preset, a value of the wrong
    type, an override that does not parse) in the one-line form of every other bad value."""
    import difflib

    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = error if isinstance(error, (ConfigKeyError, ConfigAttributeError, ValidationError)) else error.__cause__
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and "/" in error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return f"{group}={name!r} is not allowed: one of {', '.join(error.options or [])}"
    if isinstance(error, OverrideParseException):
        bad = next((o for o in overrides if o in str(error)), None)
        return (f"{bad or ' '.join(overrides)} is not allowed: not a valid override ({first_line}); quote "
                "values that hold spaces or special characters, e.g. 'prompt=\"a cat, running\"'")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        # Nested in a list (lora=[{...}]) the key is relative; the override names the top-level key.
        top = first_line.split("'")[1] if first_line.startswith("Could not override '") else cause.full_key
        unknown = str(cause.key) if cause.key is not None else top
        allowed = _schema_keys(getattr(cause, "object_type", None))
        close = difflib.get_close_matches(unknown, allowed, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return (f"{top}={_override_value(overrides, top)!r} is not allowed: {unknown!r} is not a configuration "
                f"key ({hint}keys here: {', '.join(allowed) or 'none'})")
    if isinstance(cause, ValidationError):
        message = str(cause).splitlines()[0]
        allowed = next((word for token, word in _TYPE_WORDS.items() if token in message), message)
        return f"{cause.full_key}={_override_value(overrides, cause.full_key)!r} is not allowed: {allowed}"
    return first_line


def check_schema_keys(cfg: Any) -> None:
    """Keys added with `+key=value` pass Hydra's struct check; refuse any the schema does not know."""
    from omegaconf import OmegaConf

    from .schema import RunConfig

    OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.to_container(cfg))
