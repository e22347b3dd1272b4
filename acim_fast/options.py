"""Helpers for the typed config dataclasses: a documented field, and the integer check every config runs.

`option(default, help, **metadata)` is a dataclass field carrying its help text (the command line and `--help` read
it); `check_int(config, name, minimum)` raises the ValueError naming `<Class>.<field>` that every config raises for a
field that must be an int (not a bool) of at least `minimum`. Nothing else lives here.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def option(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


def check_int(config: object, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{type(config).__name__}.{name} must be an int >= {minimum}, got {value!r}")
