"""Math problems: the `Problem` record, loading (jsonl, bundled benchmarks, the hub), deterministic split and shuffle.

`load_problems(spec)` reads a jsonl file, a benchmark bundled with the package by name (`bundled_names()`:
math500, gsm8k, aime24, amc23, kept in acim_fast/benchmarks/ with their origins and licences in its README.md; an
existing path of the same name wins), or `hf:<name>[:<config>][:<split>]` through the optional `datasets` package.
`problem` and `answer` are required (a numeric answer becomes a string; a "####" answer is a raw GSM8K one: the
text after the last "####" is kept); `id`, `level`, `source` are optional (a missing id is "<name>/<line or row>",
a missing source the file's stem, which for a bundled benchmark is its name); every other field is kept read-only
in `Problem.extra`. Errors are `ValueError`s naming the file and line (blank lines still count) or the spec and
row. `split` puts a problem on the eval side by a hash of its TEXT and the seed, so file order and ids do not
matter and duplicates never straddle the split; the eval side holds eval_fraction * n problems rounded half up.
`shuffle` orders by a hash of (seed, epoch, source, id): every rank gets the same order and takes its share
(`train.dist.Dist.share`) without communicating.

It does not build prompts, check answers, tokenise or batch, read .json/parquet/csv, stream, or shard over ranks.
"""

from __future__ import annotations

import json
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from acim_fast.common.hashing import stable_hash

HF_PREFIX = "hf:"
BENCHMARKS_DIR = Path(__file__).resolve().parent / "benchmarks"  # package data: wheels carry it
_BUNDLED = ("math500", "gsm8k", "aime24", "amc23")  # each is BENCHMARKS_DIR / "<name>.jsonl"
_FIELDS = ("id", "problem", "answer", "level", "source")
_LEVEL = re.compile(r"(?:Level\s+)?(\d+)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One math problem with its gold final answer (a string, as the verifier takes it)."""

    id: str  # unique within the dataset it was loaded from
    problem: str
    answer: str
    level: int | None = None  # difficulty, when the dataset has one (MATH: 1-5)
    source: str = ""  # the dataset it came from
    # The row's other fields (read-only, shallow). Not hashed: values may be lists or dicts.
    extra: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}), hash=False)

    def __post_init__(self) -> None:
        for name in ("id", "problem", "answer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Problem.{name} must be a non-empty str, got {value!r:.80}")
        if self.level is not None and (isinstance(self.level, bool) or not isinstance(self.level, int)):
            raise ValueError(f"Problem.level must be an int or None, got {self.level!r}")
        if not isinstance(self.source, str):
            raise ValueError(f"Problem.source must be a str, got {self.source!r}")
        if not isinstance(self.extra, Mapping):
            raise ValueError(f"Problem.extra must be a mapping, got {type(self.extra).__name__}")


# -- loading --

def bundled_names() -> tuple[str, ...]:
    """The names `load_problems` resolves to the benchmarks shipped with the package."""
    return _BUNDLED


def bundled_path(name: str) -> Path:
    """The jsonl file of a bundled benchmark; `ValueError` listing the names if `name` is not one."""
    if name not in _BUNDLED:
        raise ValueError(f"{name!r} is not a bundled benchmark; the bundled ones are {', '.join(_BUNDLED)}")
    return BENCHMARKS_DIR / f"{name}.jsonl"


def load_problems(spec: str | Path, *, fields: Mapping[str, str] | None = None) -> list[Problem]:
    """The problems of `spec`, in order. Resolution, first match wins:

    1. `hf:<name>[:<config>][:<split>]` (split "train" by default): the Hugging Face hub;
    2. a path that exists: that jsonl file (so a local file named `math500` beats the bundled benchmark);
    3. a bundled name (`bundled_names()`, exact match, independent of the working directory): the benchmark shipped
       in acim_fast/benchmarks/, its problems' `source` the name;
    otherwise a `ValueError` naming the spec and listing the bundled names.

    `fields` maps our field names ("id", "problem", "answer", "level", "source") to the names the source uses.
    """
    rename = _check_fields(fields)
    if isinstance(spec, str) and spec.startswith(HF_PREFIX):
        name, rows = _hub_rows(spec)
    else:
        path = Path(spec)
        if not path.exists() and str(spec) in _BUNDLED:
            name, path = str(spec), bundled_path(str(spec))
        else:
            name = path.stem
        rows = _jsonl_rows(path)
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}  # id -> where it was first seen
    for where, locator, row in rows:
        problem = _parse_row(row, where, default_id=f"{name}/{locator}", default_source=name, rename=rename)
        if problem.id in first_seen:
            raise ValueError(f"{where}: duplicate id {problem.id!r} (first at {first_seen[problem.id]})")
        first_seen[problem.id] = where
        problems.append(problem)
    if not problems:
        raise ValueError(f"{spec}: no problems (empty, or blank lines only)")
    return problems


def _check_fields(fields: Mapping[str, str] | None) -> dict[str, str]:
    """Our field name -> the source's, for every field."""
    rename = {f: f for f in _FIELDS}
    for ours, theirs in (fields or {}).items():
        if ours not in _FIELDS:
            raise ValueError(f"fields: unknown field {ours!r}; expected some of {', '.join(_FIELDS)}")
        if not isinstance(theirs, str) or not theirs:
            raise ValueError(f"fields[{ours!r}] must be a non-empty str, got {theirs!r}")
        rename[ours] = theirs
    if len(set(rename.values())) != len(rename):
        raise ValueError(f"fields: two of our fields read the same source field: {rename}")
    return rename


def _jsonl_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(where, line number, parsed JSON) for each non-blank line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        hint = "" if path.exists() else (f"; nor is it a bundled benchmark name ({', '.join(_BUNDLED)}) or "
                                         f"{HF_PREFIX}<name>[:<config>][:<split>]")
        raise ValueError(f"{path}: cannot read: {e.strerror or e}{hint}") from e
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    # Splitting the bytes (not decoded text) on b"\n" only: str.splitlines would also split on U+2028 and friends,
    # which are legal inside JSON strings, and a trailing "\r" is JSON whitespace.
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 (byte {e.start + 1} of the line is {raw[e.start:e.start + 1]!r})")
        if not line.strip():
            continue
        try:
            yield where, number, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: bad JSON at column {e.colno}: {e.msg}") from None


def _hub_rows(spec: str) -> tuple[str, Iterator[tuple[str, int, Any]]]:
    parts = spec[len(HF_PREFIX):].split(":")
    if not 1 <= len(parts) <= 3 or not all(parts):
        raise ValueError(f"{spec}: expected hf:<name>[:<config>][:<split>]")
    name = parts[0]
    config = parts[1] if len(parts) == 3 else None
    split_name = parts[-1] if len(parts) > 1 else "train"
    try:
        import datasets  # optional: only this path needs it
    except ImportError as e:
        raise ValueError(f"{spec}: loading from the Hugging Face hub needs the `datasets` package, which is not "
                         f"installed (pip install datasets), or export the data to a jsonl file") from e
    try:
        table = datasets.load_dataset(name, config, split=split_name)
    except Exception as e:  # network, unknown name or split, auth: all user-side, all reported the same way
        raise ValueError(f"{spec}: datasets.load_dataset({name!r}, {config!r}, split={split_name!r}) failed: "
                         f"{type(e).__name__}: {e}") from e
    return name, ((f"{spec} row {i}", i, row) for i, row in enumerate(table))


def _parse_row(row: Any, where: str, *, default_id: str, default_source: str, rename: Mapping[str, str]) -> Problem:
    if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {_kind(row)}")

    def get(ours: str) -> Any:
        return row.get(rename[ours])

    for required in ("problem", "answer"):
        if rename[required] not in row:
            have = ", ".join(map(str, row))
            raise ValueError(f"{where}: missing field {rename[required]!r} (the row has: {have})")

    problem = get("problem")
    if not isinstance(problem, str):
        raise ValueError(f"{where}: field {rename['problem']!r} must be a string, got {_kind(problem)}")
    problem = problem.strip()
    if not problem:
        raise ValueError(f"{where}: field {rename['problem']!r} is empty")

    answer = _answer(get("answer"), where, rename["answer"])

    pid = get("id")
    if pid is None:
        pid = default_id
    elif isinstance(pid, int) and not isinstance(pid, bool):
        pid = str(pid)
    elif not isinstance(pid, str) or not pid.strip():
        raise ValueError(f"{where}: field {rename['id']!r} must be a non-empty string or an int, got {pid!r:.80}")

    source = get("source")
    if source is None:
        source = default_source
    elif not isinstance(source, str):
        raise ValueError(f"{where}: field {rename['source']!r} must be a string, got {_kind(source)}")

    level = _level(get("level"), where, rename["level"])
    taken = set(rename.values())
    extra = types.MappingProxyType({k: v for k, v in row.items() if k not in taken})
    return Problem(id=pid, problem=problem, answer=answer, level=level, source=source, extra=extra)


def _answer(value: Any, where: str, key: str) -> str:
    if isinstance(value, bool):  # a JSON true/false is no answer, though bool is an int subclass
        raise ValueError(f"{where}: field {key!r} must be a string or a number, got a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: field {key!r} must be a finite number, got {value}")
        return repr(value)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string or a number, got {_kind(value)}")
    if "####" in value:  # a raw GSM8K answer: worked solution, then "#### 1,234"
        value = value.rsplit("####", 1)[1].replace(",", "")
    value = value.strip()
    if not value:
        raise ValueError(f"{where}: field {key!r} is empty")
    return value


def _level(value: Any, where: str, key: str) -> int | None:
    if value is None or value == "Level ?":  # MATH marks a few problems "Level ?": unknown, not an error
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        match = _LEVEL.fullmatch(value.strip())
        if match:
            return int(match.group(1))
    raise ValueError(f"{where}: field {key!r} must be an int or a string \"N\" / \"Level N\", got {value!r:.80}")


def _kind(value: Any) -> str:
    """A JSON-ish name for a value's type, for error messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# -- ordering --

def split(problems: Sequence[Problem], eval_fraction: float, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """(train, eval), each in input order; see the module docstring for how a problem's side is chosen."""
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction <= 1:
        raise ValueError(f"eval_fraction must be a number in [0, 1], got {eval_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    keys = [stable_hash("split", seed, p.problem) for p in problems]
    order = sorted(range(len(problems)), key=lambda i: keys[i])
    cut = math.floor(eval_fraction * len(problems) + 0.5)  # round half up; round() would go to even
    # Duplicated problem texts share a key: move the cut past them so none is on both sides.
    while 0 < cut < len(order) and keys[order[cut]] == keys[order[cut - 1]]:
        cut += 1
    in_eval = set(order[:cut])
    train = [p for i, p in enumerate(problems) if i not in in_eval]
    held_out = [p for i, p in enumerate(problems) if i in in_eval]
    return train, held_out


def shuffle(problems: Iterable[Problem], seed: int, epoch: int = 0) -> list[Problem]:
    """The problems in the order of this (seed, epoch); see the module docstring."""
    for name, value in (("seed", seed), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}")
    return sorted(problems, key=lambda p: stable_hash("shuffle", seed, epoch, p.source, p.id))
