"""The embedded task: seeded arithmetic word problems with exact answers, and prose and code demonstrations.

Six families with a `level` 1-4, built around what the tiny model can learn (copy digits, not do multi-digit
arithmetic) so that it meets both sides of the decision: code pays (`mul`, `pow`, `mod`, `add`: prose would have
to write a multi-digit result in one step), prose pays (`cancel` "a*b+c-a*b" at levels 3-4, whose operands carry
runs of zeros that code would have to copy exactly), and a mixed middle (`cancel` 1-2, `units`, `mod` level 1).
A problem's code demonstration (`CodeDemo`: cell, output, tail) holds the real output, evaluated here by Python,
in `execution.prompts.CellFormat`. `generate(n, seed=...)` depends on its arguments only; a question is held out
iff its hash falls in bucket 0 of `EVAL_BUCKETS`, whatever the seed. Questions fit the plain prompt in under 80
characters and demonstrations are under 200, for a short-context model.

It does not build prompts, tokenise or train, and has integer answers only.
"""

from __future__ import annotations

import random
import types
from dataclasses import dataclass
from typing import Callable, Sequence

from acim_fast.common.hashing import stable_hash
from acim_fast.data import Problem
from acim_fast.execution.prompts import CellFormat

FAMILIES: tuple[str, ...] = ("add", "units", "cancel", "mul", "pow", "mod")
LEVELS: tuple[int, ...] = (1, 2, 3, 4)
SPLITS: tuple[str, ...] = ("train", "eval")
EVAL_BUCKETS = 5  # a question whose hash is 0 mod EVAL_BUCKETS is held out: 20% of every family and level
SOURCE = "acim_task"


@dataclass(frozen=True, slots=True)
class CodeDemo:
    """A code solution in the order the rollout loop produces it: the model writes `cell`, the tool appends
    `output` (never trained on), the model writes `tail`."""

    cell: str  # "```python\\nprint(...)\\n```"
    output: str  # "\\n```output\\n<value>\\n```\\n"
    tail: str  # "\\boxed{<answer>}"

    @property
    def text(self) -> str:
        return self.cell + self.output + self.tail


@dataclass(frozen=True, slots=True)
class TaskProblem:
    family: str
    level: int
    question: str  # e.g. "What is 4821*37?"
    answer: str
    expr: str  # the Python expression whose value is the answer; the code demonstration prints it
    prose: str  # the prose demonstration: a response ending in \boxed{answer}

    def code_demo(self, fmt: CellFormat = CellFormat()) -> CodeDemo:
        """The code demonstration in `fmt`; its output is `expr` evaluated here (what `print` shows)."""
        cell = f"{fmt.open}\n{self.code}{fmt.close}"
        output = fmt.block_prefix(fmt.close) + str(evaluate(self.expr)) + fmt.output_close
        return CodeDemo(cell=cell, output=output, tail=f"\\boxed{{{self.answer}}}")

    @property
    def code(self) -> str:
        return f"print({self.expr})"

    def to_problem(self) -> Problem:
        """The record the rest of the trainer (data, E-step, evaluation) reads."""
        key = f"{stable_hash(self.question, sep=''):016x}"[:12]
        return Problem(id=f"{self.family}-{self.level}-{key}", problem=self.question, answer=self.answer,
                       level=self.level, source=SOURCE,
                       extra=types.MappingProxyType({"family": self.family, "expr": self.expr}))


def evaluate(expr: str) -> int:
    """The value of one of our expressions (digits and + - * % ** only), computed by Python without builtins."""
    if not expr or set(expr) - set("0123456789+-*% "):
        raise ValueError(f"expr must hold digits and + - * % ** only, got {expr!r}")
    return eval(expr, {"__builtins__": {}}, {})


def split_of(question: str) -> str:
    """"eval" or "train": the side of the held-out split a question is on (independent of any seed)."""
    bucket = stable_hash(question, sep="") % EVAL_BUCKETS
    return "eval" if bucket == 0 else "train"


# -- the families: level -> (question, expr, answer, prose) --

def _num(rng: random.Random, digits: int) -> int:
    """A random number with exactly `digits` digits; one-digit numbers are 2..9 (no *0, *1 or mod 1)."""
    return rng.randint(2, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def _add(rng: random.Random, level: int) -> tuple[str, str, int, str]:
    a, b = _num(rng, level + 1), _num(rng, level)
    s = a + b
    return f"What is {a}+{b}?", f"{a}+{b}", s, f"{a}+{b} = {s}. \\boxed{{{s}}}"


def _units(rng: random.Random, level: int) -> tuple[str, str, int, str]:
    a, b = _num(rng, level + 1), _num(rng, level + 1)
    x, y = a % 10, b % 10
    # The prose route multiplies the last digits only: a one-digit table look-up, whatever the level.
    return (f"What is the units digit of {a}*{b}?", f"{a}*{b}%10", a * b % 10,
            f"{x}*{y} = {x * y}, so \\boxed{{{x * y % 10}}}")


def _cancel(rng: random.Random, level: int) -> tuple[str, str, int, str]:
    # Levels 1-2: random operands. Levels 3-4: round numbers with long runs of zeros, the strings a copying model
    # miscounts (a run gives no cue to where it ends). The prose route (the products cancel) only copies c.
    if level <= 2:
        a, b = _num(rng, level + 1), _num(rng, level + 1)
    else:
        lo, hi = (5, 7) if level == 3 else (8, 10)
        a, b = (rng.randint(1, 9) * 10 ** rng.randint(lo, hi) for _ in range(2))
    c = rng.randint(2, 99)
    # "+c" in the prose repeats the prompt's "+c", so the copy is found by matching "+"; the box then takes the number
    # before ". \boxed{" as in every other prose demonstration.
    return (f"What is {a}*{b}+{c}-{a}*{b}?", f"{a}*{b}+{c}-{a}*{b}", c,
            f"The products cancel, leaving +{c}. \\boxed{{{c}}}")


_MUL_DIGITS = {1: (2, 1), 2: (2, 2), 3: (3, 2), 4: (3, 3)}


def _mul(rng: random.Random, level: int) -> tuple[str, str, int, str]:
    da, db = _MUL_DIGITS[level]
    a, b = _num(rng, da), _num(rng, db)
    return f"What is {a}*{b}?", f"{a}*{b}", a * b, f"{a}*{b} = {a * b}. \\boxed{{{a * b}}}"


# (lowest base, highest base, lowest exponent, highest exponent): results of at most 12 digits.
_POW = {1: (10, 999, 2, 2), 2: (10, 99, 3, 5), 3: (100, 999, 3, 3), 4: (100, 999, 4, 4)}


def _pow(rng: random.Random, level: int) -> tuple[str, str, int, str]:
    base_lo, base_hi, lo, hi = _POW[level]
    a, k = rng.randint(base_lo, base_hi), rng.randint(lo, hi)
    return f"What is {a}^{k}?", f"{a}**{k}", a ** k, f"{a}^{k} = {a ** k}. \\boxed{{{a ** k}}}"


_MOD_DIGITS = {1: (3, 1), 2: (4, 2), 3: (5, 2), 4: (6, 3)}


def _mod(rng: random.Random, level: int) -> tuple[str, str, int, str]:
    dn, dm = _MOD_DIGITS[level]
    n, m = _num(rng, dn), _num(rng, dm)
    return f"What is {n} mod {m}?", f"{n}%{m}", n % m, f"{n} mod {m} = {n % m}. \\boxed{{{n % m}}}"


_DRAW: dict[str, Callable[[random.Random, int], tuple[str, str, int, str]]] = {
    "add": _add, "units": _units, "cancel": _cancel, "mul": _mul, "pow": _pow, "mod": _mod}
assert set(_DRAW) == set(FAMILIES)


def draw(rng: random.Random, family: str, level: int) -> TaskProblem:
    """One problem of `family` at `level` (either split)."""
    question, expr, answer, prose = _DRAW[family](rng, level)
    return TaskProblem(family=family, level=level, question=question, answer=str(answer), expr=expr, prose=prose)


def generate(n: int, *, seed: int, split: str = "train", families: Sequence[str] = FAMILIES,
             levels: Sequence[int] = LEVELS, unique: bool = False) -> list[TaskProblem]:
    """`n` problems of `split`, each of a (family, level) drawn uniformly; the same arguments give the same list.

    `unique`: no question twice (for evaluation sets); raises ValueError when the split of the families and levels
    asked for holds fewer than `n` questions (pow at level 2 has only ~54 held-out ones).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    families, levels = tuple(families), tuple(levels)
    if not families or set(families) - set(FAMILIES):
        raise ValueError(f"families must be a non-empty subset of {FAMILIES}, got {families}")
    if not levels or set(levels) - set(LEVELS):
        raise ValueError(f"levels must be a non-empty subset of {LEVELS}, got {levels}")
    # The split is part of the seed so that the two splits are not the same draws filtered two ways.
    rng = random.Random(f"{seed}/{split}/{','.join(families)}/{levels}")
    out: list[TaskProblem] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"could not draw {n} {'unique ' if unique else ''}{split} problems of families "
                             f"{families} at levels {levels} (got {len(out)})")
        p = draw(rng, rng.choice(families), rng.choice(levels))
        if split_of(p.question) != split or (unique and p.question in seen):
            continue
        seen.add(p.question)
        out.append(p)
    return out
