"""The one typed configuration of the trainer, and its command line.

`Config` groups its fields by concern; every field carries a help text and is validated in
`__post_init__` with a `ValueError` naming the field. The command line is derived from the dataclass:
each field `name` becomes `--name VALUE`, each field of a nested dataclass (e.g. `loss: LossConfig`)
becomes `--loss.name VALUE`. Presets are plain functions returning a `Config`.
This module does not run anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from acim_kernels import LossConfig


def _opt(default: Any, help: str, group: str) -> Any:
    return field(default=default, metadata={"help": help, "group": group})


@dataclass(kw_only=True, slots=True)
class Config:
    """Everything a run needs. Defaults are the embedded CPU default."""

    # -- model and data --
    model: str | None = _opt(None, "Hugging Face checkpoint directory (config.json + *.safetensors); "
                             "none = the embedded tiny model", "model and data")
    data: str | None = _opt(None, "training problems, jsonl with 'problem' and 'answer'; "
                            "none = the embedded task", "model and data")
    # -- run --
    out_dir: str = _opt("runs/default", "where checkpoints, the resolved config and metrics.jsonl go", "run")
    seed: int = _opt(0, "seed for every random choice of the run", "run")
    # -- M-step loss (see acim_kernels.LossConfig for each field) --
    loss: LossConfig = field(default_factory=LossConfig, metadata={"group": "loss"})

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"Config.seed must be >= 0, got {self.seed}")
        if not self.out_dir:
            raise ValueError("Config.out_dir must not be empty")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def default_preset() -> Config:
    """The embedded default: the tiny built-in model on the built-in task, on CPU."""
    return Config()


def _leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted name, field, resolved type) of every non-dataclass field, depth first."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            leaves += _leaf_fields(kind, f"{prefix}{f.name}.")
        else:
            leaves.append((prefix + f.name, f, kind))
    return leaves


def _parser_for(kind: Any):
    """A string -> value converter for a field's annotated type."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    optional = type(None) in options
    base = next(t for t in options if t is not type(None))

    def convert(text: str):
        if optional and text.lower() in ("none", "null"):
            return None
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


def build_parser(prog: str = "python -m acim_fast.run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train a math LM with AutoCode (EM over the decision to write code).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups: dict[str, argparse._ArgumentGroup] = {}
    defaults = default_preset()
    for name, f, kind in _leaf_fields(Config):
        group_name = name.split(".")[0] if "." in name else f.metadata["group"]
        group = groups.setdefault(group_name, parser.add_argument_group(group_name))
        default: Any = defaults
        for part in name.split("."):
            default = getattr(default, part)
        group.add_argument(f"--{name}", dest=name, type=_parser_for(kind), default=default,
                           metavar=getattr(typing.get_args(kind)[0] if typing.get_args(kind) else kind,
                                           "__name__", "VALUE").upper(),
                           help=f.metadata.get("help", ""))
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    """Build a Config from command-line flags; invalid values exit with the field named."""
    parser = build_parser()
    namespace = vars(parser.parse_args(argv))
    nested: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for name, value in namespace.items():
        if "." in name:
            outer, inner = name.split(".", 1)
            nested.setdefault(outer, {})[inner] = value
        else:
            top[name] = value
    hints = typing.get_type_hints(Config)
    try:
        for outer, values in nested.items():
            top[outer] = hints[outer](**values)
        return Config(**top)
    except ValueError as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits
