"""Tests for acim_fast.data: loading (good rows, every bad-input error with its file and line, the four real
benchmarks, the optional hub path), and the deterministic split and shuffle."""

import json
import random
import re
import sys
import types
from pathlib import Path

import pytest

from acim_fast.data import BENCHMARKS_DIR, Problem, bundled_names, bundled_path, load_problems, shuffle, split

COUNTS = {"math500": 500, "gsm8k": 1319, "aime24": 30, "amc23": 40}  # as acim_fast/benchmarks/README.md states


def write(tmp_path: Path, content: str | bytes, name: str = "set.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def rows(*objs) -> str:
    return "".join(json.dumps(o) + "\n" for o in objs)


def make(n: int, prefix: str = "p") -> list[Problem]:
    return [Problem(id=f"{prefix}{i}", problem=f"What is {i} + {i}?", answer=str(2 * i), source="t") for i in range(n)]


# -- loading: good input --

def test_fields_defaults_and_extras(tmp_path):
    path = write(tmp_path, rows(
        {"problem": " 1+1? ", "answer": "2", "id": "a", "level": 3, "source": "mine", "solution": "1+1=2",
         "tags": ["x"]},
        {"problem": "2+2?", "answer": 4},
        {"problem": "half?", "answer": 0.5, "id": 7, "level": "Level 2"},
        {"problem": "gsm", "answer": "She has 1,000 + 234 = <<1000+234=1234>>1,234 apples.\n#### 1,234",
         "level": "Level ?", "id": None},
    ), name="mix.jsonl")
    a, b, c, d = load_problems(path)
    assert a == Problem(id="a", problem="1+1?", answer="2", level=3, source="mine",
                        extra={"solution": "1+1=2", "tags": ["x"]})
    assert dict(a.extra) == {"solution": "1+1=2", "tags": ["x"]}
    with pytest.raises(TypeError):
        a.extra["solution"] = "changed"  # read-only
    # Defaults: source = file stem, id = stem/line number (1-based).
    assert (b.id, b.answer, b.level, b.source, dict(b.extra)) == ("mix/2", "4", None, "mix", {})
    assert (c.id, c.answer, c.level) == ("7", "0.5", 2)
    assert (d.id, d.answer, d.level) == ("mix/4", "1234", None)
    assert len({a, b, c, d}) == 4  # hashable although extra holds a list


def test_blank_lines_bom_crlf_and_line_numbers(tmp_path):
    text = "\ufeff" + json.dumps({"problem": "p1", "answer": "1"}) + "\r\n\r\n   \n" + \
        json.dumps({"problem": "p2 \u2028 still p2", "answer": "2"}) + "\r\n\n"
    got = load_problems(write(tmp_path, text, name="b.jsonl"))
    assert [(p.id, p.problem) for p in got] == [("b/1", "p1"), ("b/4", "p2 \u2028 still p2")]


def test_fields_mapping(tmp_path):
    path = write(tmp_path, rows({"question": "q?", "final": "5", "unique_id": "u1", "problem": "other"}))
    (p,) = load_problems(path, fields={"problem": "question", "answer": "final", "id": "unique_id"})
    assert (p.id, p.problem, p.answer, dict(p.extra)) == ("u1", "q?", "5", {"problem": "other"})
    with pytest.raises(ValueError, match="unknown field 'question'"):
        load_problems(path, fields={"question": "problem"})
    with pytest.raises(ValueError, match="same source field"):
        load_problems(path, fields={"problem": "answer"})


# -- loading: every bad input names its file and line --

BAD_ROWS = [
    ('{"problem": "x", "answer": }', "bad JSON at column 28"),
    ('{"problem": "x", "answer": "1"', "bad JSON"),
    ('[1, 2]', "expected a JSON object, got an array"),
    ('"just a string"', "expected a JSON object, got a string"),
    ('{"answer": "1"}', "missing field 'problem' (the row has: answer)"),
    ('{"problem": "x"}', "missing field 'answer'"),
    ('{"problem": 5, "answer": "1"}', "field 'problem' must be a string, got a number"),
    ('{"problem": "  ", "answer": "1"}', "field 'problem' is empty"),
    ('{"problem": "x", "answer": ["1"]}', "field 'answer' must be a string or a number, got an array"),
    ('{"problem": "x", "answer": true}', "got a boolean"),
    ('{"problem": "x", "answer": null}', "got null"),
    ('{"problem": "x", "answer": NaN}', "must be a finite number"),
    ('{"problem": "x", "answer": " "}', "field 'answer' is empty"),
    ('{"problem": "x", "answer": "#### "}', "field 'answer' is empty"),
    ('{"problem": "x", "answer": "1", "id": ""}', "field 'id' must be a non-empty string or an int"),
    ('{"problem": "x", "answer": "1", "id": false}', "field 'id' must be"),
    ('{"problem": "x", "answer": "1", "id": 1.5}', "field 'id' must be"),
    ('{"problem": "x", "answer": "1", "level": "hard"}', "field 'level' must be an int"),
    ('{"problem": "x", "answer": "1", "source": 3}', "field 'source' must be a string"),
]


@pytest.mark.parametrize("bad,message", BAD_ROWS)
def test_bad_row_names_file_and_line(tmp_path, bad, message):
    # The bad row is on physical line 4: a good row, a blank line, a good row before it.
    good = json.dumps({"problem": "ok", "answer": "1"})
    path = write(tmp_path, f"{good}\n\n{json.dumps({'problem': 'ok2', 'answer': '2'})}\n{bad}\n{good}\n")
    with pytest.raises(ValueError) as info:
        load_problems(path)
    assert str(info.value).startswith(f"{path}:4: ")
    assert message in str(info.value)


def test_non_utf8(tmp_path):
    path = write(tmp_path, b'{"problem": "a", "answer": "1"}\n{"problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(ValueError) as info:
        load_problems(path)
    assert str(info.value) == f"{path}:2: not UTF-8 (byte 17 of the line is b'\\xe9')"


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write(tmp_path, rows({"problem": "a", "answer": "1", "id": "x"}, {"problem": "b", "answer": "2", "id": 1},
                                {"problem": "c", "answer": "3", "id": "1"}))
    with pytest.raises(ValueError) as info:
        load_problems(path)
    assert str(info.value) == f"{path}:3: duplicate id '1' (first at {path}:2)"


@pytest.mark.parametrize("content", ["", "\n", "  \n\r\n\t\n"])
def test_empty_file(tmp_path, content):
    path = write(tmp_path, content)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: no problems"):
        load_problems(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'nope.jsonl'))}: cannot read"):
        load_problems(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}: cannot read"):
        load_problems(tmp_path)


def test_problem_record_validates():
    with pytest.raises(ValueError, match="Problem.answer must be a non-empty str"):
        Problem(id="a", problem="x", answer=3)
    with pytest.raises(ValueError, match="Problem.level"):
        Problem(id="a", problem="x", answer="3", level="5")
    with pytest.raises(AttributeError):
        make(1)[0].answer = "9"  # frozen


# -- the four real benchmarks, bundled with the package (they must exist: a missing file fails, it does not skip) --

def test_bundled_names_and_their_readme():
    assert bundled_names() == tuple(COUNTS)
    readme = (BENCHMARKS_DIR / "README.md").read_text()
    for name, count in COUNTS.items():
        assert bundled_path(name) == BENCHMARKS_DIR / f"{name}.jsonl" and bundled_path(name).is_file()
        assert f"| {name}.jsonl | {count} |" in readme
    assert "licence" in readme.lower()
    with pytest.raises(ValueError, match="'nope' is not a bundled benchmark.*math500, gsm8k, aime24, amc23"):
        bundled_path("nope")


@pytest.mark.parametrize("name,count", list(COUNTS.items()))
def test_real_benchmarks_load(name, count):
    problems = load_problems(name)
    assert problems == load_problems(bundled_path(name))
    assert len(problems) == count
    assert len({p.id for p in problems}) == count
    assert all(p.source == name and p.problem and p.answer for p in problems)
    if name == "math500":
        assert {p.level for p in problems} == {1, 2, 3, 4, 5}
        assert all({"solution", "subject"} <= set(p.extra) for p in problems)
        assert problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    if name == "gsm8k":
        assert problems[0].answer == "18" and "####" in problems[0].extra["solution"]
        assert all("####" not in p.answer and "," not in p.answer for p in problems)
    if name == "aime24":
        assert all(p.answer.isdigit() for p in problems)


def test_a_bundled_name_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(load_problems("math500")) == 500


def test_an_existing_path_beats_a_bundled_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "math500").write_text('{"problem": "1+1?", "answer": 2}\n')
    assert [(p.id, p.answer, p.source) for p in load_problems("math500")] == [("math500/1", "2", "math500")]
    assert len(load_problems("gsm8k")) == 1319  # no such file here: the bundled one


@pytest.mark.parametrize("spec", ["math5000", "MATH500", "gsm8k.jsonl", "data/math500.jsonl"])
def test_an_unknown_name_names_the_spec_and_lists_the_bundled_ones(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"^{re.escape(spec)}: cannot read: .*bundled benchmark name "
                                         rf"\(math500, gsm8k, aime24, amc23\) or hf:"):
        load_problems(spec)


def test_real_split_is_exact_and_stable():
    problems = load_problems("gsm8k")
    train, held_out = split(problems, 0.1, seed=3)
    assert len(held_out) == 132 and len(train) == 1319 - 132  # 131.9 rounds to 132
    again = split(random.Random(0).sample(problems, len(problems)), 0.1, seed=3)
    assert {p.id for p in again[1]} == {p.id for p in held_out}


# -- the optional hub path --

def test_hub_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ValueError, match=r"^hf:openai/gsm8k:main:test: .*needs the `datasets` package.*pip install"):
        load_problems("hf:openai/gsm8k:main:test")


def test_hub_with_a_fake_datasets(monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        if name == "down":
            raise ConnectionError("no network")
        return [{"question": "q0", "answer": "work\n#### 1,000"}, {"question": "q1", "answer": "#### 7"},
                {"question": "q2", "answer": ["bad"]}][: 3 if split == "broken" else 2]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    got = load_problems("hf:openai/gsm8k:main:test", fields={"problem": "question"})
    assert [(p.id, p.problem, p.answer, p.source) for p in got] == [
        ("openai/gsm8k/0", "q0", "1000", "openai/gsm8k"), ("openai/gsm8k/1", "q1", "7", "openai/gsm8k")]
    load_problems("hf:m:test", fields={"problem": "question"})
    load_problems("hf:m", fields={"problem": "question"})
    assert calls == [("openai/gsm8k", "main", "test"), ("m", None, "test"), ("m", None, "train")]
    with pytest.raises(ValueError, match=r"^hf:m:broken row 2: field 'answer' must be a string or a number"):
        load_problems("hf:m:broken", fields={"problem": "question"})
    with pytest.raises(ValueError, match=r"^hf:down: datasets.load_dataset.*ConnectionError: no network"):
        load_problems("hf:down")
    for spec in ("hf:", "hf:a::b", "hf:a:b:c:d"):
        with pytest.raises(ValueError, match=r"expected hf:<name>\[:<config>\]\[:<split>\]"):
            load_problems(spec)


# -- split --

def test_split_properties():
    problems = make(200)
    train, held_out = split(problems, 0.25, seed=1)
    assert len(held_out) == 50 and len(train) == 150
    assert {p.id for p in train}.isdisjoint(p.id for p in held_out)
    assert train == [p for p in problems if p in train]  # input order kept
    assert split(problems, 0.25, seed=1) == (train, held_out)  # deterministic
    reordered = split(list(reversed(problems)), 0.25, seed=1)
    assert set(reordered[1]) == set(held_out)  # independent of the order
    assert set(split(problems, 0.25, seed=2)[1]) != set(held_out)  # the seed matters
    # Ids do not matter, only the text: renamed problems land on the same side.
    renamed = [Problem(id=f"other{i}", problem=p.problem, answer=p.answer) for i, p in enumerate(problems)]
    assert {p.problem for p in split(renamed, 0.25, seed=1)[1]} == {p.problem for p in held_out}
    assert split(problems, 0, seed=1) == (problems, [])
    assert split(problems, 1, seed=1) == ([], problems)
    assert split([], 0.5) == ([], [])
    for bad in (-0.1, 1.5, "0.1", True, float("nan")):
        with pytest.raises(ValueError, match="eval_fraction"):
            split(problems, bad)
    with pytest.raises(ValueError, match="seed"):
        split(problems, 0.1, seed=1.0)


def test_split_never_separates_duplicate_texts():
    # Texts repeated 1 to 4 times under different ids: cuts at most sizes would split a group without the tie rule.
    problems = [Problem(id=f"{k}-{i}", problem=f"text {i}", answer="1") for i in range(40) for k in range(1 + i % 4)]
    for seed in range(10):
        for fraction in (0.05, 0.1, 0.25, 0.33, 0.5, 0.7, 0.9):
            train, held_out = split(problems, fraction, seed=seed)
            assert {p.problem for p in train}.isdisjoint(p.problem for p in held_out)
            assert len(train) + len(held_out) == len(problems)
            assert round(fraction * len(problems)) <= len(held_out) < round(fraction * len(problems)) + 4


def test_split_rounds_half_up():
    assert [len(split(make(n), 0.5)[1]) for n in (1, 3, 5, 7)] == [1, 2, 3, 4]  # round() would give 0, 2, 2, 4


# -- shuffle --

def test_shuffle_is_deterministic_per_epoch_and_order_free():
    problems = make(100)
    first = shuffle(problems, seed=0, epoch=0)
    assert sorted(first, key=lambda p: p.id) == sorted(problems, key=lambda p: p.id)  # a permutation
    assert first != problems
    assert shuffle(problems, seed=0, epoch=0) == first
    assert shuffle(reversed(problems), seed=0, epoch=0) == first
    assert shuffle(problems, seed=0, epoch=1) != first
    assert shuffle(problems, seed=1, epoch=0) != first
    with pytest.raises(ValueError, match="epoch"):
        shuffle(problems, seed=0, epoch="1")
