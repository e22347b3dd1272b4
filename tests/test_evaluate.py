"""acim_fast.evaluate: the oracle and the aggregates by hand, and end to end on a tiny model trained to known habits.

The end-to-end model is the tiny char-level Llama of acim_fast.embedded.tiny, trained here for a few seconds to
memorise:
- "7*8": a python cell (any mode), so only forced code succeeds -> oracle code; it chooses code.
- "2+3": prose on its own, a cell after the code trigger -> both succeed -> oracle prose; it chooses prose.
- "9-4": a cell 3 times out of 4, prose once -> greedy codes, and with the fence banned it writes the prose ->
  both succeed -> oracle prose; it chooses code (a wrong selection).
- "123*457" is unseen: nothing succeeds -> no label.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from acim_fast.data import load_problems
from acim_fast.embedded.tiny import EOS, TinyConfig, build_tokenizer, codec, create_tiny, save_tokenizer
from acim_fast.engine.model import CausalLM
from acim_fast.evaluate import (
    EvalOptions,
    ProblemResult,
    Report,
    evaluate,
    main,
    oracle_decision,
    selection_accuracy,
    summarize,
)
from acim_fast.execution.prompts import CODE_TRIGGER, build_prompt
from acim_fast.execution.rollout_model import RolloutModel, load_rollout_model

ROWS = [
    {"id": "a", "problem": "7*8", "answer": 56, "level": 1, "source": "set1"},
    {"id": "b", "problem": "2+3", "answer": 5, "level": 1, "source": "set1"},
    {"id": "c", "problem": "9-4", "answer": 5, "level": 2, "source": "set1"},
    {"id": "d", "problem": "123*457", "answer": 56211, "source": "set2"},
]
FAST = dict(k=2, max_new_tokens=100, max_tool_tokens=64, max_code_calls=2, sandbox_timeout_s=5.0)


def _code(expr: str, value: int) -> str:
    return f"```python\nprint({expr})\n```\n```output\n{value}\n```\n\\boxed{{{value}}}"


def _prose(expr: str, value: int) -> str:
    return f"{expr}={value} \\boxed{{{value}}}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = create_tiny(tmp_path_factory.mktemp("tiny"), TinyConfig(
        hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=128,
        max_position_embeddings=512))
    model = CausalLM.from_pretrained(path)
    encode, _ = codec(build_tokenizer())
    eos = build_tokenizer().token_to_id(EOS)

    def plain(q):
        return build_prompt(q).text

    data = [(plain("7*8"), _code("7*8", 56)), (plain("2+3"), _prose("2+3", 5))]
    data += [(plain("9-4"), _code("9-4", 5))] * 3 + [(plain("9-4"), _prose("9-4", 5))]
    data += [(plain(q) + CODE_TRIGGER + "\n", _code(q, v)) for q, v in (("7*8", 56), ("2+3", 5), ("9-4", 5))]
    seqs = [(encode(p), encode(r) + [eos]) for p, r in data]
    ids = torch.tensor([t for p, r in seqs for t in p + r])
    bounds, targets, weight = [0], [], []
    for p, r in seqs:
        bounds.append(bounds[-1] + len(p) + len(r))
        whole = p + r
        targets += whole[1:] + [0]
        weight += [0] * (len(p) - 1) + [1] * len(r) + [0]  # predict the response only, nothing across sequences
    targets, weight = torch.tensor(targets), torch.tensor(weight, dtype=torch.bool)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(model(ids, cu_seqlens=bounds)[weight], targets[weight])
        opt.zero_grad()
        loss.backward()
        opt.step()
    # The floor is the 3:1 choice of "9-4"'s first token (~0.56 nats over ~600 tokens).
    assert loss.item() < 0.03, f"the tiny model did not memorise its habits (loss {loss.item():.3f})"
    out = tmp_path_factory.mktemp("trained")
    model.save_pretrained(out)
    save_tokenizer(build_tokenizer(), out)
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "set.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


# -- the oracle and the aggregates, by hand --

def test_oracle_decision_rules():
    assert oracle_decision(1.0, 1.0) == "prose"  # both succeed: prose is preferred
    assert oracle_decision(0.75, 0.75) == "prose"
    assert oracle_decision(1.0, 0.25) == "code"  # only code succeeds
    assert oracle_decision(0.0, 0.75) == "prose"
    assert oracle_decision(0.0, 0.0) is None  # neither: no label
    assert oracle_decision(0.5, 0.5) is None  # "succeeds" means strictly above the threshold
    assert oracle_decision(0.75, 0.5) == "code"
    assert oracle_decision(0.25, 0.0, threshold=0.0) == "code"  # threshold 0: any success counts
    assert oracle_decision(0.25, 0.25, threshold=0.0) == "prose"
    assert oracle_decision(1.0, 0.75, threshold=0.75) == "code"
    for bad in ((1.5, 0.0), (0.0, -0.1), (True, 0.0), ("1", 0.0)):
        with pytest.raises(ValueError, match="rate must be a success rate"):
            oracle_decision(*bad)


def _row(pid, *, source="s", level=None, correct=False, used_code=False, code=0, prose=0, code_mode=0, k=4,
         threshold=0.5):
    return ProblemResult(id=pid, source=source, level=level, answer="1", correct=correct, used_code=used_code,
                         code_calls=int(used_code), finish_reason="stop", predicted=None, response="", k=k,
                         code_correct=code, prose_correct=prose, code_mode_used_code=code_mode,
                         prose_mode_used_code=0, oracle=oracle_decision(code / k, prose / k, threshold),
                         choice="code" if used_code else "prose")


def test_selection_accuracy_and_summary_arithmetic():
    assert selection_accuracy(["code", "prose", "code"], ["code", None, "prose"]) == 0.5
    assert selection_accuracy(["code"], [None]) is None
    with pytest.raises(ValueError, match="differ in length"):
        selection_accuracy(["code"], [])
    with pytest.raises(ValueError, match="decisions must be one of"):
        selection_accuracy(["python"], ["code"])

    rows = [
        _row("1", source="x", level=1, correct=True, used_code=True, code=4, prose=1, code_mode=4),  # code, right
        _row("2", source="x", level=1, correct=True, used_code=True, code=4, prose=4, code_mode=3),  # prose, over
        _row("3", source="y", level=2, used_code=False, code=3, prose=2, code_mode=2),  # code, under
        _row("4", source="y", level=None, correct=True, used_code=False, code=2, prose=2, code_mode=1),  # tie at 0.5
        _row("5", source="y", level=2, used_code=False, code=0, prose=3),  # prose, right
    ]
    assert [r.oracle for r in rows] == ["code", "prose", "code", None, "prose"]
    assert [r.selection_correct for r in rows] == [True, False, False, None, True]
    s = summarize(rows)
    assert (s.n, s.labelled, s.oracle_code, s.oracle_prose, s.over_code, s.under_code) == (5, 4, 2, 2, 1, 1)
    assert s.pass_at_1 == pytest.approx(3 / 5)
    assert s.code_use_rate == pytest.approx(2 / 5)
    assert s.code_success == pytest.approx((1 + 1 + 0.75 + 0.5 + 0) / 5)
    assert s.prose_success == pytest.approx((0.25 + 1 + 0.5 + 0.5 + 0.75) / 5)
    assert s.code_mode_code_rate == pytest.approx(10 / 20)
    assert s.prose_mode_code_rate == 0
    assert s.selection_accuracy == pytest.approx(2 / 4)

    report = Report.build(rows, EvalOptions(k=4), {})
    assert list(report.by_source) == ["x", "y"] and list(report.by_level) == [1, 2]  # level None: in no level
    assert report.by_source["x"].selection_accuracy == 0.5 and report.by_source["y"].n == 3
    assert report.by_level[2].n == 2 and report.by_level[2].selection_accuracy == 0.5
    unlabelled = summarize([rows[3]])
    assert unlabelled.labelled == 0 and unlabelled.selection_accuracy is None
    assert "sel acc" in report.table() and report.table().splitlines()[1].split()[0] == "all"
    with pytest.raises(ValueError, match="at least one row"):
        summarize([])


# -- end to end --

def test_evaluate_end_to_end_labels_and_scores_known_habits(model_dir, data_file, sandbox):
    report = evaluate(model_dir, load_problems(data_file), sandbox=sandbox, temperature=0.0, **FAST)
    rows = {r.id: r for r in report.rows}
    assert [r.id for r in report.rows] == ["a", "b", "c", "d"]
    assert {i: (r.correct, r.choice, r.code_correct, r.prose_correct, r.oracle) for i, r in rows.items()} == {
        "a": (True, "code", 2, 0, "code"),
        "b": (True, "prose", 2, 2, "prose"),
        "c": (True, "code", 2, 2, "prose"),
        "d": (False, "code", 0, 0, None),  # unseen: it starts the cell its training favours, and fails
    }
    # The tool loop ran the greedy cells: the output block came from the sandbox, then the model boxed it.
    assert rows["a"].response == _code("7*8", 56) and rows["a"].code_calls == 1 and rows["a"].predicted == "56"
    assert rows["b"].response == _prose("2+3", 5) and rows["b"].code_calls == 0
    assert all(r.code_mode_used_code == 2 and r.prose_mode_used_code == 0 for r in report.rows)
    o = report.overall
    assert (o.n, o.pass_at_1, o.code_use_rate, o.labelled, o.oracle_code, o.oracle_prose) == (4, 0.75, 0.75, 3, 1, 2)
    assert o.selection_accuracy == pytest.approx(2 / 3) and (o.over_code, o.under_code) == (1, 0)
    assert o.code_success == 0.75 and o.prose_success == 0.5
    assert list(report.by_source) == ["set1", "set2"] and report.by_source["set1"].selection_accuracy == 2 / 3
    assert report.by_source["set2"].selection_accuracy is None
    assert list(report.by_level) == [1, 2] and report.by_level[1].selection_accuracy == 1.0
    assert report.by_level[2].selection_accuracy == 0.0
    assert report.meta == {"model": str(model_dir)} and report.options.k == 2


def test_cli_writes_the_json_report_and_prints_the_table(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "report.json"
    report = main(["--model", str(model_dir), "--data", str(data_file), "--k", "2", "--limit", "3",
                   "--temperature", "0", "--max-new-tokens", "100", "--max-tool-tokens", "64",
                   "--sandbox-timeout-s", "5", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(report.to_json())
    assert set(written) == {"options", "meta", "oracle", "overall", "by_source", "by_level", "problems"}
    assert written["meta"] == {"model": str(model_dir), "data": str(data_file), "limit": 3, "backend": "ours"}
    assert written["options"]["k"] == 2 and written["options"]["threshold"] == 0.5
    assert [p["id"] for p in written["problems"]] == ["a", "b", "c"]
    assert written["overall"]["selection_accuracy"] == pytest.approx(2 / 3)
    assert written["by_level"]["1"]["n"] == 2 and written["by_source"]["set1"]["n"] == 3
    c = written["problems"][2]
    assert (c["code_rate"], c["prose_rate"], c["oracle"], c["choice"], c["selection_correct"]) == \
        (1.0, 1.0, "prose", "code", False)
    assert [f.name for f in tmp_path.iterdir()] == ["report.json"]  # no temp file left behind
    printed = capsys.readouterr().out
    assert printed.startswith(report.table()) and f"report: {out}" in printed


def test_cli_under_torchrun_shards_the_problems_and_writes_the_one_process_report(model_dir, data_file, tmp_path):
    """2 CPU processes: each evaluates every other problem (sampled at temperature 1, seeded per problem), rank 0
    writes the merged report, which equals the one-process report row for row."""
    import os
    import subprocess
    import sys

    args = ["--model", str(model_dir), "--data", str(data_file), "--k", "2", "--temperature", "1", "--seed", "3",
            "--max-new-tokens", "100", "--max-tool-tokens", "64", "--sandbox-timeout-s", "5"]
    one = main(args + ["--out", str(tmp_path / "one.json")])
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "acim_fast.evaluate", *args, "--out", str(tmp_path / "two.json")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two == json.loads(one.to_json())
    assert [p["id"] for p in two["problems"]] == ["a", "b", "c", "d"]
    assert done.stdout.count("report: ") == 1  # rank 0 alone prints and writes


def test_reports_are_deterministic_and_independent_of_problem_order(model_dir, data_file, sandbox):
    problems = load_problems(data_file)
    lm = load_rollout_model(model_dir)
    options = EvalOptions(temperature=1.0, seed=3, **FAST)
    first = evaluate(lm, problems, options=options, sandbox=sandbox)
    second = evaluate(lm, problems, options=options, sandbox=sandbox)
    assert first.to_json() == second.to_json()
    # Samples are seeded per problem, not per position: reversed input, the same rows.
    backwards = evaluate(lm, problems[::-1], options=options, sandbox=sandbox)
    assert [r.to_dict() for r in backwards.rows[::-1]] == [r.to_dict() for r in first.rows]
    assert first.meta == {}  # an RolloutModel has no path to record


def test_bad_input_raises_value_error(model_dir, data_file, tmp_path, sandbox):
    problems = load_problems(data_file)
    missing = tmp_path / "no_such_model"
    with pytest.raises(ValueError, match=re.escape(f"model directory {missing} does not exist")):
        evaluate(missing, problems)
    weights_only = tmp_path / "weights_only"
    CausalLM.from_pretrained(model_dir).save_pretrained(weights_only)
    with pytest.raises(ValueError, match=re.escape(f"{weights_only}: cannot load its tokenizer")):
        load_rollout_model(weights_only)
    for bad in (dict(k=0), dict(threshold=1.0), dict(temperature=-1.0), dict(top_p=0.0), dict(max_new_tokens=0),
                dict(seed=-1), dict(max_code_calls=-1), dict(sandbox_timeout_s=0.0), dict(k=True)):
        with pytest.raises(ValueError, match="EvalOptions." + next(iter(bad))):
            EvalOptions(**bad)
    lm = load_rollout_model(model_dir)
    with pytest.raises(ValueError, match="unknown evaluate option"):
        evaluate(lm, problems, sandbox=sandbox, kk=2)
    with pytest.raises(ValueError, match="at least one problem"):
        evaluate(lm, [], sandbox=sandbox)
    with pytest.raises(ValueError, match=r"problems\[0\] must be a Problem"):
        evaluate(lm, [dict(ROWS[0])], sandbox=sandbox)
    with pytest.raises(ValueError, match="exceed the model's max_position_embeddings 512"):
        evaluate(lm, problems, sandbox=sandbox, max_new_tokens=500)
    no_fence = dataclasses.replace(lm, decode=lambda ids: "x" * len(ids))
    with pytest.raises(ValueError, match="can start a code fence"):
        evaluate(no_fence, problems, sandbox=sandbox, **FAST)
    with pytest.raises(ValueError, match="directory .* does not exist"):
        main(["--model", str(model_dir), "--data", str(data_file), "--out", str(tmp_path / "nope" / "r.json")])
    with pytest.raises(ValueError, match="--limit must be >= 1"):
        main(["--model", str(model_dir), "--data", str(data_file), "--limit", "0"])
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "absent.jsonl"))):
        main(["--model", str(model_dir), "--data", str(tmp_path / "absent.jsonl")])
    assert isinstance(lm, RolloutModel) and lm.stop_token_ids == (build_tokenizer().token_to_id(EOS),)
