"""acim_fast.execution.rollout: cells stop generation, run in the sandbox, and come back as appended tokens the model
reads.

The model is a real `Engine` over `ScriptedLM` (tests/scripted_lm.py), a CausalLM whose K cache stores token ids, so
each query reads its whole sequence back through the block table and puts all its mass on the next character of a
scripted response.
Scripts are functions of the response so far: they read the output blocks the loop appended, so a test that
checks the final text proves that the real output arrived as tokens and that the model resumed after it.
"""

from __future__ import annotations

import math
import re

import pytest
import scripted_lm

from acim_fast.engine.paged_engine import Engine
from acim_fast.engine.sampling import SamplingParams
from acim_fast.execution.prompts import CellFormat
from acim_fast.execution.rollout import KV_BLOCK_SIZE, Cell, RolloutLoop, rollout_engine
from acim_fast.execution.sandbox import Sandbox, SandboxOptions

EOS = 256
MERGED = 257  # one token for "```output\n", as BPE vocabularies have: lets a model write an output fence at once
MERGED_TEXT = "```output\n"
VOCAB = 258
LOGIT = 5.0
# The behaviour log-prob of every sampled token: LOGIT on the scripted token, 0 on the other VOCAB - 1.
SAMPLED_LOGP = -math.log1p((VOCAB - 1) * math.exp(-LOGIT))
PARAMS = SamplingParams(temperature=0, max_new_tokens=400, stop_token_ids=(EOS,))
BLOCK = "\n```output\n{}\n```\n"  # what the loop appends after a model's closing fence
OUT_RE = re.compile(r"```output\n(.*?)\n```\n", re.S)
FMT = CellFormat()


def encode(text: str) -> list[int]:
    return list(text.encode())


def decode(ids: list[int]) -> str:
    return b"".join(MERGED_TEXT.encode() if i == MERGED else bytes([i]) if i < 256 else b"" for i in ids).decode(
        errors="replace")


def cells(*segments):
    """A script that writes segments[0], reads the output block the loop appends, writes segments[1], ...
    A segment is a str or a function of the outputs seen so far."""
    def script(resp: str) -> str:
        outs = OUT_RE.findall(resp)
        parts = []
        for k, seg in enumerate(segments):
            parts.append(seg(outs) if callable(seg) else seg)
            if k == len(outs) or k == len(segments) - 1:
                break
            parts.append(BLOCK.format(outs[k]))
        return "".join(parts)
    return script


def fake_output(resp: str) -> str:
    """Means to write its own (wrong) output block; boxes whatever output block its text holds."""
    out = (OUT_RE.findall(resp) or ["41"])[0]
    return f"```python\nprint(6 * 7)\n```\n```output\n{out}\n```\nSo \\boxed{{{out}}}."


def merged_fence(resp: str) -> str:
    """Writes "```output\\n" right after its code in one token (no closing fence line of its own)."""
    out = (OUT_RE.findall(resp) or ["41"])[0]
    return f"```python\nprint(6 * 7)\n```output\n{out}\n```\n\\boxed{{{out}}}"


BIG_CELL = "```python\nprint('a' * 500 + 'b' * 500 + 'c' * 500)\n```"
SCRIPTS = {
    "add:": cells("Compute.\n```python\nprint(6 * 7)\n```", lambda o: f"So \\boxed{{{o[0]}}}."),
    "wrong:": cells("```python\nprint(6 * 7 - 1)\n```", lambda o: f"\\boxed{{{o[0]}}}"),
    "prose:": cells("2 + 2 = \\boxed{4}."),
    "unstated:": cells("```python\nprint(6 * 7)\n```", "Done."),
    "hist:": cells("```python\nx = 20\nprint(x)\n```", "```python\ny = 5\nprint(y)\n1 / 0\n```",
                   "```python\nprint(x + 22, 'y' in globals())\n```", lambda o: f"\\boxed{{{o[2].split()[0]}}}"),
    "cap:": cells(*[f"```python\nprint({k})\n```" for k in range(1, 6)], lambda o: f"\\boxed{{{o[3]}}}"),
    "big:": cells(BIG_CELL, "Long output."),
    "room:": cells(BIG_CELL, "Long output."),
    "noroom:": cells(BIG_CELL, "Long output."),
    "slow:": cells("```python\nwhile True:\n    pass\n```", "\\boxed{0}"),
    # Needs 22 tokens more once "slow:" closed its cell; "slow:" needs 10 once its output arrives.
    "long:": cells("I will not write code. " * 2 + "\\boxed{5}"),
    "fake:": fake_output,
    "merged:": merged_fence,
    "stray:": cells("```output\n5\n```\nSo \\boxed{5}."),
    "fork:": cells("```python\nx = 20\nprint(x)\n```", "```python\nprint(x + 22)\n```", lambda o: f"\\boxed{{{o[1]}}}"),
}


class ScriptedLM(scripted_lm.ScriptedLM):
    """Greedy decoding follows `scripts[prompt](response so far)`; EOS once the script is done or contradicted."""

    def __init__(self, scripts):
        super().__init__(VOCAB, logit=LOGIT)
        self.scripts = scripts

    def next_token(self, ids: list[int]) -> int:
        text = decode(ids)
        prompt = next(p for p in self.scripts if text.startswith(p))
        resp = text[len(prompt):]
        target = self.scripts[prompt](resp)
        if not (target.startswith(resp) and len(target) > len(resp)):
            return EOS
        rest = target[len(resp):]
        return MERGED if rest.startswith(MERGED_TEXT) else ord(rest[0])


@pytest.fixture(scope="module")
def model():
    return ScriptedLM(SCRIPTS)


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(SandboxOptions(timeout_s=1.0, memory_bytes=1 << 30, max_processes=32, concurrency=4)) as sb:
        yield sb


def _engine(model, num_blocks=256):
    return Engine(model, num_blocks=num_blocks, block_size=16, detokenize=decode)


def _assert_pool_whole(engine):
    bm = engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and bm.stats()["num_seqs"] == 0


def _run(engine, sandbox, prompts, golds, params):
    """One rollout per prompt, records in prompt order."""
    loop = RolloutLoop(engine, sandbox, encode=encode, decode=decode)
    for prompt, gold in zip(prompts, golds):
        loop.add(prompt, gold, params)
    return loop.run_until_done()


def _text(rec) -> str:
    return decode(rec.response_ids)


def _check_alignment(rec, appended: list[tuple[int, int]]):
    """loss mask 0 exactly on the [start, end) spans of appended tokens; behaviour log-probs aligned with it."""
    n = len(rec.response_ids)
    mask = [1] * n
    for a, b in appended:
        mask[a:b] = [0] * (b - a)
    assert rec.loss_mask == mask
    assert len(rec.behaviour_logprobs) == n
    for m, lp in zip(mask, rec.behaviour_logprobs):
        assert (lp == pytest.approx(SAMPLED_LOGP, abs=1e-5)) if m else lp == 0.0
    assert [c.end_at - c.close_at for c in rec.cells] == [b - a for a, b in appended]


def test_cell_output_is_appended_as_tokens_then_generation_resumes(model, sandbox):
    engine = _engine(model)
    prompts = [encode(p) for p in ("add:", "wrong:", "prose:", "unstated:")]
    add, wrong, prose, unstated = _run(engine, sandbox, prompts, ["42", "42", "4", "42"], PARAMS)

    code_part = "Compute.\n```python\nprint(6 * 7)\n```"
    appended = BLOCK.format("42")
    assert _text(add) == code_part + appended + "So \\boxed{42}."
    assert add.response_ids[-1] == EOS and add.finish_reason == "stop"
    a = len(code_part)  # byte-level: token index == character index
    assert add.cells == [Cell(code="print(6 * 7)", status="ok", output="42", truncated=False, open_at=9,
                              close_at=a, end_at=a + len(appended))]
    _check_alignment(add, [(a, a + len(appended))])
    assert add.response_ids[a:a + len(appended)] == encode(appended)
    assert (add.used_code, add.code_calls, add.first_code_token, add.tool_tokens) == (True, 1, 9, len(appended))
    assert (add.reward, add.answer, add.reason) == (1.0, "42", "correct")
    assert (add.errors, add.timeouts, add.parent, add.fork_pos) == (0, 0, None, None)

    assert _text(wrong).endswith("```output\n41\n```\n\\boxed{41}")
    assert (wrong.reward, wrong.answer, wrong.reason) == (0.0, "41", "wrong")

    assert _text(prose) == "2 + 2 = \\boxed{4}."
    assert (prose.used_code, prose.code_calls, prose.first_code_token, prose.cells) == (False, 0, None, [])
    _check_alignment(prose, [])
    assert (prose.reward, prose.reason) == (1.0, "correct")
    # The right number stands only in the tool's output: the model stated no answer, so no reward.
    assert _text(unstated).endswith("```output\n42\n```\nDone.")
    assert (unstated.reward, unstated.answer, unstated.reason) == (0.0, None, "no_answer")
    _assert_pool_whole(engine)


def test_history_replays_successful_cells_only_and_errors_are_shown(model, sandbox):
    engine = _engine(model)
    loop = RolloutLoop(engine, sandbox, encode=encode, decode=decode)
    loop.add(encode("hist:"), "42", PARAMS)
    (rec,) = loop.run_until_done()
    # Cell 3 sees x from cell 1; the failed cell 2 is not replayed, so its y is undefined there.
    assert [(c.status, c.output) for c in rec.cells] == [
        ("ok", "20"), ("error", "5\nZeroDivisionError: division by zero"), ("ok", "42 False")]
    assert rec.cells[1].code == "y = 5\nprint(y)\n1 / 0"
    assert (rec.errors, rec.code_calls, rec.answer, rec.reward) == (1, 3, "42", 1.0)
    _check_alignment(rec, [(c.close_at, c.end_at) for c in rec.cells])
    _assert_pool_whole(engine)


def test_cells_past_the_call_cap_are_not_run(model, sandbox):
    engine = _engine(model)
    loop = RolloutLoop(engine, sandbox, encode=encode, decode=decode, max_code_calls=4)
    loop.add(encode("cap:"), "4", PARAMS)
    (rec,) = loop.run_until_done()
    assert [c.status for c in rec.cells] == ["ok"] * 4 + ["limit"]
    assert [c.output for c in rec.cells] == ["1", "2", "3", "4", FMT.limit_notice]
    assert rec.code_calls == 4 and rec.cells[4].code == "print(5)"
    assert BLOCK.format(FMT.limit_notice) + "\\boxed{4}" in _text(rec)
    _check_alignment(rec, [(c.close_at, c.end_at) for c in rec.cells])
    assert rec.reward == 1.0
    _assert_pool_whole(engine)


def test_tool_output_is_truncated_to_the_token_cap_and_to_max_new_tokens(model, sandbox):
    engine = _engine(model)
    loop = RolloutLoop(engine, sandbox, encode=encode, decode=decode, max_tool_tokens=64)
    cell_len = len(BIG_CELL)
    loop.add(encode("big:"), "0", PARAMS)
    loop.add(encode("room:"), "0", SamplingParams(temperature=0, max_new_tokens=cell_len + 50, stop_token_ids=(EOS,)))
    loop.add(encode("noroom:"), "0", SamplingParams(temperature=0, max_new_tokens=cell_len + 10,
                                                    stop_token_ids=(EOS,)))
    big, room, noroom = loop.run_until_done()

    (cell,) = big.cells
    assert cell.truncated and cell.status == "ok"
    assert cell.end_at - cell.close_at == 64  # the longest head + tail that fits (one token per byte here)
    head, tail = cell.output.split(FMT.truncated)
    assert head and set(head) == {"a"} and tail and set(tail) == {"c"} and len(head) - len(tail) in (0, 1)
    assert _text(big) == BIG_CELL + BLOCK.format(cell.output) + "Long output."
    _check_alignment(big, [(cell.close_at, cell.end_at)])

    # 50 tokens left after the cell: the block takes them all and the response ends at max_new_tokens.
    assert len(room.response_ids) == cell_len + 50 and room.finish_reason == "length"
    assert room.cells[0].truncated and room.cells[0].end_at - room.cells[0].close_at == 50
    _check_alignment(room, [(cell_len, cell_len + 50)])

    # 10 tokens left: not even a truncated block fits, so the cell is not run and the trajectory ends.
    assert _text(noroom) == BIG_CELL and noroom.finish_reason == "length"
    assert (noroom.cells, noroom.used_code, noroom.first_code_token, noroom.tool_tokens) == ([], True, 0, 0)
    _assert_pool_whole(engine)


def test_a_timing_out_cell_does_not_hold_back_other_trajectories(model, sandbox):
    engine = _engine(model)
    loop = RolloutLoop(engine, sandbox, encode=encode, decode=decode)
    slow = loop.add(encode("slow:"), "0", PARAMS)
    long = loop.add(encode("long:"), "5", PARAMS)
    order = []
    while loop.has_unfinished():
        finished = loop.step()
        if long in finished:  # it decoded to the end while the slow cell was still running
            assert not order and slow not in finished
            assert engine.output(slow).finish_reason == "stop_string"
        order += finished
    assert order == [long, slow]
    rec_slow, rec_long = loop.run_until_done()
    assert [(c.status, c.output) for c in rec_slow.cells] == [("timeout", "timed out after 1 s")]
    assert (rec_slow.timeouts, rec_slow.reward, rec_long.reward) == (1, 1.0, 1.0)
    _assert_pool_whole(engine)


def test_output_written_by_the_model_is_cut_at_the_fence_and_replaced(model, sandbox):
    engine = _engine(model)
    loop = RolloutLoop(engine, sandbox, encode=encode, decode=decode)
    for name in ("fake:", "merged:", "stray:"):
        loop.add(encode(name), "42" if name != "stray:" else "5", PARAMS)
    fake, merged, stray = loop.run_until_done()

    # It meant to write "41" after its cell: it is stopped at the fence and reads the real output.
    assert _text(fake) == "```python\nprint(6 * 7)\n```" + BLOCK.format("42") + "So \\boxed{42}."
    assert "41" not in _text(fake) and fake.reward == 1.0
    _check_alignment(fake, [(fake.cells[0].close_at, fake.cells[0].end_at)])

    # Its fence token already opened the output block: that token stays (loss mask 1), only the rest is appended.
    assert _text(merged) == "```python\nprint(6 * 7)\n```output\n42\n```\n\\boxed{42}"
    m = merged.response_ids.index(MERGED)
    assert merged.cells[0].close_at == m + 1 and merged.loss_mask[m] == 1
    assert merged.response_ids[m + 1:merged.cells[0].end_at] == encode("42\n```\n")
    _check_alignment(merged, [(m + 1, merged.cells[0].end_at)])
    assert merged.reward == 1.0

    # An output block outside any python cell runs nothing.
    assert _text(stray) == "```output\n5\n```\nSo \\boxed{5}."
    assert (stray.used_code, stray.cells, stray.tool_tokens, stray.reward) == (False, [], 0, 1.0)
    _assert_pool_whole(engine)


def test_forked_children_inherit_the_cells_before_the_fork(model, sandbox):
    engine = _engine(model)
    loop = RolloutLoop(engine, sandbox, encode=encode, decode=decode)
    parent = loop.add(encode("fork:"), "42", PARAMS)
    p = len("fork:")
    while engine.output(parent).finish_reason != "stop_string":  # paused: cell 1 is running
        loop.step()
    with pytest.raises(ValueError, match="still running"):
        loop.fork(parent, 1)
    early = loop.fork(parent, 1, at=p + 5)  # inside cell 1's code: the child closes and runs it itself

    end1 = len("```python\nx = 20\nprint(x)\n```" + BLOCK.format("20"))
    while len(engine.output(parent).token_ids) < end1 + 3:
        loop.step()
    with pytest.raises(ValueError, match="output block"):
        loop.fork(parent, 1, at=p + end1 - 2)
    late = loop.fork(parent, 2, at=p + end1)
    recs = {r.seq_id: r for r in loop.run_until_done()}

    want = "```python\nx = 20\nprint(x)\n```" + BLOCK.format("20") + "```python\nprint(x + 22)\n```" + \
        BLOCK.format("42") + "\\boxed{42}"
    for sid in [parent, *early, *late]:
        rec = recs[sid]
        assert _text(rec) == want and rec.reward == 1.0
        assert [(c.status, c.output) for c in rec.cells] == [("ok", "20"), ("ok", "42")]  # x came from history
        _check_alignment(rec, [(c.close_at, c.end_at) for c in rec.cells])
    for sid in late:
        assert recs[sid].cells[0] == recs[parent].cells[0]  # inherited, not run again
        assert (recs[sid].parent, recs[sid].fork_pos, recs[sid].first_code_token) == (parent, p + end1, 0)
    assert (recs[early[0]].parent, recs[early[0]].fork_pos) == (parent, p + 5)
    _assert_pool_whole(engine)


def test_rollouts_are_the_same_when_paused_sequences_get_preempted(model, sandbox, monkeypatch):
    names, golds = ["hist:", "cap:", "add:", "fork:", "wrong:"], ["42", "4", "42", "42", "41"]
    params = SamplingParams(temperature=0, max_new_tokens=260, stop_token_ids=(EOS,))  # 17 blocks of 16
    appends_to_evicted = []
    append = Engine.append

    def spy(engine, seq_id, token_ids):  # a paused sequence lost its KV blocks while its cell ran
        appends_to_evicted.append(seq_id not in engine.block_manager)
        return append(engine, seq_id, token_ids)

    monkeypatch.setattr(Engine, "append", spy)

    def run(num_blocks):
        engine = _engine(model, num_blocks)
        recs = _run(engine, sandbox, [encode(n) for n in names], golds, params)
        _assert_pool_whole(engine)
        return engine.stats.preemptions, [(r.response_ids, r.loss_mask, r.cells, r.reward) for r in recs]

    roomy_preemptions, roomy = run(256)
    assert roomy_preemptions == 0 and not any(appends_to_evicted)
    tight_preemptions, tight = run(18)
    assert tight_preemptions > 0 and any(appends_to_evicted)
    assert tight == roomy and all(reward == 1.0 for *_, reward in tight)


def test_rollout_engine_sizes_the_pool_in_whole_blocks():
    class Model:
        def engine(self, **options):
            return options

    # 33 tokens take 3 blocks of 16 per sequence; the other keywords pass through.
    assert KV_BLOCK_SIZE == 16
    assert rollout_engine(Model(), seq_tokens=33, pool_seqs=4, max_num_seqs=8) == dict(
        num_blocks=12, block_size=16, max_num_seqs=8)
    assert rollout_engine(Model(), seq_tokens=32, pool_seqs=1)["num_blocks"] == 2


def test_block_prefix_continues_what_the_model_wrote():
    assert FMT.block_prefix("\n```") == "\n```output\n"
    assert FMT.block_prefix("\n```\n") == "```output\n"
    assert FMT.block_prefix("\n```\n```out") == "put\n"
    assert FMT.block_prefix("\n```output\n") == ""
    assert FMT.block_prefix("\n``` done") == "\n```output\n"
    assert FMT.block_prefix("\n```  \n") == "```output\n"


def test_invalid_use_raises_value_error_and_outside_pauses_are_resumed(model, sandbox):
    engine = _engine(model)
    kw = dict(encode=encode, decode=decode)
    with pytest.raises(ValueError, match="max_code_calls"):
        RolloutLoop(engine, sandbox, max_code_calls=-1, **kw)
    with pytest.raises(ValueError, match="max_tool_tokens"):
        RolloutLoop(engine, sandbox, max_tool_tokens=20, **kw)
    with pytest.raises(ValueError, match="CellFormat.open"):
        CellFormat(open="")
    loop = RolloutLoop(engine, sandbox, **kw)
    bare = engine.add(encode("prose:"), PARAMS)
    with pytest.raises(ValueError, match="stop string"):
        loop.submit(bare, "4")
    with pytest.raises(ValueError, match="unknown seq_id"):
        loop.submit(10_000, "4")
    with pytest.raises(ValueError, match="gold"):
        loop.add(encode("prose:"), 4, PARAMS)
    with pytest.raises(ValueError, match=rf"sequences \[{bare}\] are not driven"):  # `bare` belongs to nobody
        for _ in range(100):  # found out when it finishes (released by the engine then)
            loop.step()

    sid = engine.add(encode("prose:"), loop.sampling_params(PARAMS))
    loop.submit(sid, "4")
    with pytest.raises(ValueError, match="already driven"):
        loop.submit(sid, "4")
    for _ in range(4):
        loop.step()
    engine.pause(sid)  # someone paused it behind the loop's back: the loop resumes it
    (rec,) = loop.run_until_done()
    assert _text(rec) == "2 + 2 = \\boxed{4}." and rec.reward == 1.0
    _assert_pool_whole(engine)
