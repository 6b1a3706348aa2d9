"""Checks run where a config is built: types, finiteness and ranges, each failure one line.

Every config dataclass calls `check_types(self)` first in `__post_init__`, then the range helpers
below, so a value from the command line, a `--config` file or a checkpoint's `config.json` passes
the same checks before any work starts.
"""

import math
import types
import typing
from dataclasses import fields

from clipcap_cache.errors import ClipcapError


def option(name: str) -> str:
    """The command-line spelling of a config field: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def check_types(config) -> None:
    """Refuse a field whose value does not have its annotated type; floats must be finite.

    An int is accepted for a float field; a bool is not accepted for a number, nor a float
    (even 4.0) for an int. `X | None` fields accept None.
    """
    hints = typing.get_type_hints(type(config))
    for field_ in fields(config):
        value = getattr(config, field_.name)
        expected = hints[field_.name]
        allowed = typing.get_args(expected) if _is_union(expected) else (expected,)
        if value is None and type(None) in allowed:
            continue
        if not any(_matches(value, kind) for kind in allowed if kind is not type(None)):
            names = " or ".join(_describe(k) for k in allowed if k is not type(None))
            if type(None) in allowed:
                names += " or null"
            raise ClipcapError(f"{option(field_.name)} must be {names}, not {value!r}")


def at_least(config, minimum: float, *names: str) -> None:
    """Refuse any of the named fields that is below `minimum` (None is left alone)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ClipcapError(f"{option(name)} must be at least {minimum}, not {value}")


def at_most(config, maximum: float, *names: str) -> None:
    """Refuse any of the named fields that is above `maximum` (None is left alone)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value > maximum:
            raise ClipcapError(f"{option(name)} must be at most {maximum}, not {value}")


def positive(config, *names: str) -> None:
    """Refuse any of the named fields that is zero or negative."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise ClipcapError(f"{option(name)} must be greater than 0, not {value}")


def one_of(config, name: str, choices) -> None:
    """Refuse a field whose value is not one of `choices` (for a list: any item that is not)."""
    value = getattr(config, name)
    for item in value if isinstance(value, list) else [value]:
        if item not in choices:
            raise ClipcapError(f"{option(name)} must be one of {', '.join(choices)}, not {item!r}")


def _is_union(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _matches(value, kind) -> bool:
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if kind is float:
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _describe(kind) -> str:
    if typing.get_origin(kind) is list:
        return f"a list of {_describe(typing.get_args(kind)[0])}"
    return {
        int: "an integer",
        float: "a finite number",
        str: "text",
        bool: "true or false",
    }.get(kind, getattr(kind, "__name__", str(kind)))
