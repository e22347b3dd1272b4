"""The config dataclasses' shared machinery: a documented field, the integer check, and flags derived from fields.

`option(default, help, **metadata)` is a dataclass field carrying its help text; `check_int` raises the ValueError
naming `<Class>.<field>` for a field that must be an int of at least `minimum`; `add_field_flags` turns every leaf
field of a (nested) dataclass into a command-line flag with a converter for its annotated type. It parses no
command line itself: `config.py` and `evaluate.py` own their parsers.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import types
import typing
from dataclasses import field
from typing import Any, Callable


def option(default: Any, help: str, **metadata: Any) -> Any:
    return field(default=default, metadata={"help": help, **metadata})


def check_int(config: object, name: str, minimum: int) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{type(config).__name__}.{name} must be an int >= {minimum}, got {value!r}")


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted name, field, resolved type) of every non-dataclass field, depth first."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            leaves += leaf_fields(kind, f"{prefix}{f.name}.")
        else:
            leaves.append((prefix + f.name, f, kind))
    return leaves


def value_parser(kind: Any) -> Callable[[str], Any]:
    """A string -> value converter for a field's annotated type (`X | None` also takes "none"; bools take
    true/false/yes/no/on/off/1/0, never Python's truthiness of a non-empty string; `tuple[T, ...]` takes
    comma-separated values, "" none)."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    optional = type(None) in options
    base = next(t for t in options if t is not type(None))

    def convert(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        if isinstance(base, type) and issubclass(base, Choice):
            return text  # checked by the config's __post_init__, whose error names the field
        if typing.get_origin(base) is tuple:
            item = value_parser(typing.get_args(base)[0])
            return tuple(item(x.strip()) for x in text.split(",") if x.strip())
        if base is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}, got {text!r}") from None

    return convert


def add_field_flags(parser: argparse.ArgumentParser, cls: type, defaults: object,
                    group_of: Callable[[str, dataclasses.Field], str] | None = None) -> None:
    """One flag per leaf field of `cls` (`--estep.k_code`, also spelt `--estep.k-code`), dest the dotted name, no
    argparse default (a flag not given is absent from the namespace); `--help` shows `defaults`' values. With
    `group_of(name, field)`, flags are listed under that argument group."""
    groups: dict[str, Any] = {}
    for name, f, kind in leaf_fields(cls):
        target: Any = parser
        if group_of is not None:
            title = group_of(name, f)
            target = groups.setdefault(title, parser.add_argument_group(title))
        default: Any = defaults
        for part in name.split("."):
            default = getattr(default, part)
        spellings = dict.fromkeys([f"--{name}", f"--{name.replace('_', '-')}"])  # one, or both
        shown = typing.get_args(kind)[0] if typing.get_args(kind) else kind
        target.add_argument(*spellings, dest=name, type=value_parser(kind), default=argparse.SUPPRESS,
                            metavar=getattr(shown, "__name__", "VALUE").upper(),
                            help=f"{f.metadata.get('help', '')} (default: {default})")


class Choice(str, enum.Enum):
    """A closed set of string values (statuses, decisions, algorithms): members compare equal to their strings and
    print as them, so JSON, logs and derived seeds read the same as plain strings."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: object, name: str) -> Any:
        """The member `value` names, or ValueError naming the field `name` and the allowed values."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"{name} must be one of {[m.value for m in cls]}, got {value!r}") from None
