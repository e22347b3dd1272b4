"""acim_fast.embedded.task: deterministic generation, a leak-free held-out split, exact answers that the verifier
accepts, demonstrations in the rollout loop's cell format whose output is what Python really prints, short texts."""

from __future__ import annotations

import contextlib
import io
import random
import re

import pytest

from acim_fast.data import Problem
from acim_fast.embedded.task import FAMILIES, LEVELS, TaskProblem, draw, evaluate, generate, split_of
from acim_fast.execution.prompts import CellFormat, build_prompt
from acim_fast.reward.verifier import verify_batch

FMT = CellFormat()


def every_cell(per_cell: int, split: str, seed: int = 0) -> list[TaskProblem]:
    return [p for f in FAMILIES for level in LEVELS
            for p in generate(per_cell, seed=seed, split=split, families=(f,), levels=(level,))]


def test_same_seed_same_problems_other_seed_other_problems():
    a = generate(300, seed=7)
    assert a == generate(300, seed=7)
    b = generate(300, seed=8)
    assert [p.question for p in a] != [p.question for p in b]
    assert {(p.family, p.level) for p in a} == {(f, level) for f in FAMILIES for level in LEVELS}


def test_train_and_eval_splits_never_share_a_question():
    train = generate(3000, seed=0, split="train")
    held_out = generate(600, seed=0, split="eval")
    assert all(split_of(p.question) == "train" for p in train)
    assert all(split_of(p.question) == "eval" for p in held_out)
    assert not {p.question for p in train} & {p.question for p in held_out}
    # The split is a fixed property of the question, whatever the seed: another seed's eval problems are eval too.
    assert all(split_of(p.question) == "eval" for p in generate(100, seed=99, split="eval"))
    # The bucket is roughly a fifth of the space.
    rng = random.Random(0)
    drawn = [draw(rng, "mul", 3).question for _ in range(2000)]
    assert 0.15 < sum(split_of(q) == "eval" for q in drawn) / len(drawn) < 0.25


def test_unique_eval_sets_and_exhaustion_is_an_error():
    held_out = generate(40, seed=1, split="eval", families=("pow",), levels=(2,), unique=True)
    assert len({p.question for p in held_out}) == 40
    # pow at level 2 has 270 questions (2-digit bases, exponents 3-5): about 54 held out, never 100.
    with pytest.raises(ValueError, match="could not draw 100 unique eval"):
        generate(100, seed=1, split="eval", families=("pow",), levels=(2,), unique=True)


@pytest.mark.parametrize("kwargs, field", [({"n": -1}, "n"), ({"split": "test"}, "split"),
                                           ({"families": ("div",)}, "families"), ({"levels": (5,)}, "levels"),
                                           ({"seed": 1.5}, "seed")])
def test_bad_arguments_raise_naming_the_argument(kwargs, field):
    args = {"n": 3, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=field):
        generate(args.pop("n"), **args)


def test_answers_are_exact_and_the_level_sets_the_size():
    for p in every_cell(20, "train") + every_cell(5, "eval"):
        assert p.answer == str(evaluate(p.expr))
        numbers = [int(x) for x in re.findall(r"\d+", p.question)]
        if p.family == "mul":
            assert int(p.answer) == numbers[0] * numbers[1]
        elif p.family == "pow":
            assert int(p.answer) == numbers[0] ** numbers[1]
        elif p.family == "mod":
            assert int(p.answer) == numbers[0] % numbers[1]
        elif p.family == "add":
            assert int(p.answer) == numbers[0] + numbers[1]
        elif p.family == "units":
            assert int(p.answer) == numbers[0] * numbers[1] % 10
        else:
            a, b, c, a2, b2 = numbers
            assert (a, b) == (a2, b2) and int(p.answer) == c
    # The knob: longer operands, longer answers (for the families whose answer grows).
    for family in ("add", "mul", "pow", "mod"):
        mean = [sum(len(p.answer) for p in generate(50, seed=2, families=(family,), levels=(level,))) / 50
                for level in LEVELS]
        assert mean == sorted(mean) and mean[-1] > mean[0] + 1, (family, mean)
    # The cancel family's code grows with the level while its prose answer stays one step.
    code_len = [max(len(p.expr) for p in generate(20, seed=2, families=("cancel",), levels=(level,)))
                for level in LEVELS]
    assert code_len == sorted(code_len) and code_len[-1] >= code_len[0] + 8


def test_every_answer_verifies_and_a_wrong_one_does_not():
    problems = every_cell(6, "train") + every_cell(3, "eval")
    items = []
    for p in problems:
        items += [(p.prose, p.answer), (p.code_demo(FMT).text, p.answer)]
    verdicts = verify_batch(items)
    bad = [(text, gold, v.reason) for (text, gold), v in zip(items, verdicts) if v.reward != 1.0]
    assert not bad, bad[:5]
    wrong = verify_batch([(p.prose, str(int(p.answer) + 1)) for p in problems[:10]])
    assert all(v.reward == 0.0 for v in wrong)


def test_code_demonstration_is_in_cell_format_and_its_output_is_what_python_prints():
    for p in every_cell(3, "train"):
        demo = p.code_demo(FMT)
        assert demo.cell == f"```python\nprint({p.expr})\n```"
        assert demo.tail == f"\\boxed{{{p.answer}}}"
        # What the rollout loop does: code = the text between the opening and closing fence, after the first line.
        text = demo.text
        i = text.find(FMT.open)
        j = text.find(FMT.close, i + len(FMT.open))
        assert i == 0 and j == len(demo.cell) - len(FMT.close)
        code = text[i + len(FMT.open):j].partition("\n")[2]
        assert code == p.code
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code, {})
        # The loop appends block_prefix(fence) + output without its final newline + output_close.
        assert demo.output == FMT.block_prefix(FMT.close) + out.getvalue().rstrip("\n") + FMT.output_close
        assert demo.output == f"\n```output\n{out.getvalue().rstrip()}\n```\n"
        # Prose never opens a cell: forced prose (the fence banned) can still produce every prose demonstration.
        assert "`" not in p.prose and p.prose.endswith(f"\\boxed{{{p.answer}}}")


def test_texts_are_short_for_a_short_context_model():
    for p in every_cell(30, "train", seed=5):
        assert len(build_prompt(p.question).text) < 80, p.question
        assert len(p.prose) < 200 and len(p.code_demo(FMT).text) < 200, p.question


def test_evaluate_takes_our_expressions_only():
    assert evaluate("12*3+4-5%3**2") == 12 * 3 + 4 - 5 % 3 ** 2
    for bad in ("__import__('os')", "1/2", ""):
        with pytest.raises(ValueError, match="expr"):
            evaluate(bad)


def test_to_problem_is_a_data_record():
    p = generate(1, seed=0, families=("mod",), levels=(2,))[0]
    record = p.to_problem()
    assert isinstance(record, Problem)
    assert (record.problem, record.answer, record.level) == (p.question, p.answer, 2)
    assert record.extra["family"] == "mod" and record.id.startswith("mod-2-")
