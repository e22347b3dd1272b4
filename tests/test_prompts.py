"""Tests for acim_fast.execution.prompts: rendering with and without a chat template, the modes, and the token ids that
can open a python cell, for a char-level vocabulary and for a small BPE trained here."""

import random
import string

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from acim_fast.execution import rollout
from acim_fast.execution.prompts import (
    ANSWER_INSTRUCTION,
    CODE_TRIGGER,
    PLAIN_TEMPLATE,
    CellFormat,
    Prompt,
    build_prompt,
    fence_start_ids,
    has_chat_template,
)

FENCE = "```python"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CELL = "```python\nx = {n} * 7\nprint(x)\n```\n```output\n{m}\n```\n"
INLINE = "Let `x` be {n}; then ``x`` doubled is `2x` = {m}, see `f(x)`."


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A byte-level BPE whose merges cross punctuation (no regex pre-split): it learns fence pieces like "\\n```"."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    corpus = []
    for n in range(300):
        corpus.append(f"We compute it.\n{CELL.format(n=n, m=7 * n)}So the answer is \\boxed{{{7 * n}}}.")
        corpus.append(INLINE.format(n=n, m=2 * n))
    trainer = trainers.BpeTrainer(vocab_size=420, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def test_plain_prompt_and_modes():
    auto = build_prompt("What is 2+2?")
    assert auto == Prompt(text="Problem: What is 2+2?\nSolution:\n", response_prefix="")
    assert auto.text == PLAIN_TEMPLATE.format(problem="What is 2+2?")
    text, prefix = build_prompt("What is 2+2?", mode="code")
    assert (text, prefix) == (auto.text, CODE_TRIGGER + "\n")
    assert CODE_TRIGGER == "Let's first analyze the problem, then consider if python code could help."
    assert build_prompt("What is 2+2?", mode="prose") == auto  # prose is forced by the ban, not by words


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of autonomous, code, prose"):
        build_prompt("x", mode="cot")
    with pytest.raises(ValueError, match="problem must be a non-empty str"):
        build_prompt("  ")
    with pytest.raises(ValueError, match="vocab_size"):
        fence_start_ids(lambda ids: "", 0)
    with pytest.raises(ValueError, match="fence"):
        fence_start_ids(lambda ids: "", 3, fence="")


def test_chat_template_is_used_when_present(bpe):
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe)
    assert not has_chat_template(hf) and not has_chat_template(bpe) and not has_chat_template(None)
    assert build_prompt("What is 2+2?", tokenizer=hf) == build_prompt("What is 2+2?")  # no template: plain
    hf.chat_template = CHATML
    assert has_chat_template(hf)
    for mode in ("autonomous", "code", "prose"):
        text, prefix = build_prompt("What is 2+2?", mode=mode, tokenizer=hf)
        assert text == ("<|im_start|>user\nWhat is 2+2?\nPut your final answer within \\boxed{}.<|im_end|>\n"
                        "<|im_start|>assistant\n")
        assert prefix == (CODE_TRIGGER + "\n" if mode == "code" else "")
    assert ANSWER_INSTRUCTION not in build_prompt("What is 2+2?").text  # plain: no instruction


def test_cell_format_is_the_one_the_rollout_loop_uses():
    assert rollout.CellFormat is CellFormat and CellFormat().open == FENCE


def test_char_level_bans_only_the_backtick():
    vocab = list(string.printable)
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    assert fence_start_ids(decode, len(vocab)) == {vocab.index("`")}
    # Another fence: "\n```" can only start with a newline.
    assert fence_start_ids(decode, len(vocab), fence="\n```") == {vocab.index("\n")}


def can_start(token: str, fence: str) -> bool:
    """Oracle, position by position: could a fence begin at some character of `token`?"""
    return any(fence.startswith(token[k:]) or token[k:].startswith(fence) for k in range(len(token)))


def test_bpe_ban_matches_the_oracle_and_is_not_trivial(bpe):
    size = bpe.get_vocab_size()
    texts = [bpe.decode([i]) for i in range(size)]
    banned = fence_start_ids(bpe.decode, size)
    assert banned == {i for i, t in enumerate(texts) if can_start(t, FENCE)}
    # The BPE learnt multi-character fence pieces, and keeps backtick tokens that cannot start the fence.
    banned_texts = {texts[i] for i in banned}
    assert "`" in banned_texts and any(len(t) > 1 and "```" in t for t in banned_texts)
    assert any("`" in t for i, t in enumerate(texts) if i not in banned)
    assert not any(texts[i] in ("", "<|im_start|>") for i in banned)  # special tokens decode to "": never banned
    # The same vocabulary seen through transformers gives the same ids.
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe)
    assert fence_start_ids(hf.decode, len(hf)) == banned


def test_every_fence_starts_at_a_banned_token(bpe):
    banned = fence_start_ids(bpe.decode, bpe.get_vocab_size())
    for n in range(0, 600, 7):
        for text in (CELL.format(n=n, m=n), f"Try:\n{CELL.format(n=n, m=1)}", f"a{FENCE}b", f"``{FENCE}",
                     f"{INLINE.format(n=n, m=n)}\n{FENCE}\nprint({n})\n```"):
            ids = bpe.encode(text).ids
            assert bpe.decode(ids) == text
            starts = [len(bpe.decode(ids[:j])) for j in range(len(ids))]  # character offset of each token
            at = text.index(FENCE)
            owner = max(j for j, s in enumerate(starts) if s <= at)
            assert ids[owner] in banned


def test_allowed_tokens_never_spell_the_fence(bpe):
    size = bpe.get_vocab_size()
    texts = [bpe.decode([i]) for i in range(size)]
    banned = fence_start_ids(bpe.decode, size)
    pieces = [i for i, t in enumerate(texts) if t and set(t) & set("`python\n")]  # the tokens a fence is made of
    rng = random.Random(0)

    def fences(pool: list[int]) -> int:
        return sum(FENCE in "".join(texts[i] for i in rng.choices(pool, k=12)) for _ in range(3000))

    assert fences([i for i in pieces if i not in banned]) == 0
    assert fences(pieces) > 0  # the same walk without the ban does spell fences: the check above can fail
