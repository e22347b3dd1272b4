"""Prompt formats: how a problem is shown to the model in each decision mode, and how prose is forced.

`build_prompt(problem, mode=..., tokenizer=...)` gives a `Prompt(text, response_prefix)` whose `text` is the same in
every mode, so no trained sample carries a methodology instruction: the tokenizer's chat template with the problem
and `ANSWER_INSTRUCTION` (the answer format only: a "reason step by step" or "use programs" prompt would push one
decision), else `PLAIN_TEMPLATE` (its final newline lets a response open a cell on its first line). Mode "code"
puts `CODE_TRIGGER` in the response prefix; "prose" is forced only by banning `fence_start_ids`: every token that
contains all of `CellFormat.open` or ends with a proper prefix of it, so no fence can start at a banned step (other
tokens with a backtick stay allowed: on Qwen2.5's vocabulary 25 of the 108 are banned, "`\n" and " ```\n" are not).
`CellFormat` is the text of a python cell and of its output block.

It does not tokenise (callers encode text and prefix apart, so the prompt ends where sampling starts), apply the
ban (the sampler does), or add few-shot examples, system prompts of its own or multiple turns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, NamedTuple

from acim_fast.common.fields import Choice

__all__ = ["ANSWER_INSTRUCTION", "CODE_TRIGGER", "CellFormat", "MODES", "Mode", "PLAIN_TEMPLATE", "Prompt",
           "build_prompt", "fence_start_ids", "has_chat_template"]

CODE_TRIGGER = "Let's first analyze the problem, then consider if python code could help."
ANSWER_INSTRUCTION = "Put your final answer within \\boxed{}."
PLAIN_TEMPLATE = "Problem: {problem}\nSolution:\n"

Mode = Literal["autonomous", "code", "prose"]
MODES: tuple[str, ...] = ("autonomous", "code", "prose")


class Decision(Choice):
    """The latent decision of a response: it opened a python cell (code) or not (prose)."""

    CODE = "code"
    PROSE = "prose"


@dataclass(frozen=True, kw_only=True)
class CellFormat:
    """The text of a python cell and of its output block. The default is Qwen2.5-Math's / ToRA's format."""

    open: str = "```python"  # opens a cell; the rest of its line is not code
    close: str = "\n```"  # closes an open cell; also the stop string the loop needs in every sequence's params
    output_open: str = "```output\n"
    output_close: str = "\n```\n"
    truncated: str = "\n[... output truncated ...]\n"  # replaces the middle of an output that does not fit
    limit_notice: str = "Code call limit reached: this cell was not run."

    def __post_init__(self) -> None:
        for name in ("open", "close", "output_open", "output_close", "truncated", "limit_notice"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"CellFormat.{name} must be a non-empty str, got {value!r}")

    def block_prefix(self, tail: str) -> str:
        """The text that opens the output block after `tail`, the response text from the closing fence on.

        Usually `tail` is the fence alone and the block goes on a line of its own. When the model went on writing
        the block itself in the fence's token (e.g. "```output\\n"), only the rest of the opening is returned.
        """
        fence = self.close.lstrip("\n")
        forms = [self.close + "\n" + self.output_open]
        if fence and self.output_open.startswith(fence):  # "\n```output\n": the closing fence doubles as opening
            forms.append(self.close + self.output_open[len(fence):])
        for form in forms:
            if form.startswith(tail):
                return form[len(tail):]
        return ("" if tail.endswith("\n") else "\n") + self.output_open


class Prompt(NamedTuple):
    text: str  # what the model is conditioned on
    response_prefix: str  # forced first line of the response ("" unless the mode is "code")


def has_chat_template(tokenizer: Any) -> bool:
    """Whether `tokenizer` is a transformers tokenizer carrying a chat template."""
    return bool(getattr(tokenizer, "chat_template", None)) and callable(getattr(tokenizer, "apply_chat_template", None))


def build_prompt(problem: str, *, mode: Mode = "autonomous", tokenizer: Any = None) -> Prompt:
    """The prompt for `problem` in `mode`; the chat template of `tokenizer` when it has one, else `PLAIN_TEMPLATE`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"problem must be a non-empty str, got {problem!r:.80}")
    if has_chat_template(tokenizer):
        messages = [{"role": "user", "content": f"{problem}\n{ANSWER_INSTRUCTION}"}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if not isinstance(text, str):
            raise ValueError(f"tokenizer.apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    else:
        text = PLAIN_TEMPLATE.format(problem=problem)
    # The prefix ends the line: what the model writes after it is laid out exactly as an autonomous response, so a
    # forced-code sample with the prefix cut out reads as a response the model could have chosen by itself.
    return Prompt(text=text, response_prefix=CODE_TRIGGER + "\n" if mode == "code" else "")


def fence_start_ids(decode: Callable[[list[int]], str], vocab_size: int, *,
                    fence: str = CellFormat().open) -> frozenset[int]:
    """Ids (0 <= id < vocab_size) of the tokens that can start `fence`; `decode([id])` gives a token's text.

    Pass the full vocabulary size, added tokens included (`len(tokenizer)` for transformers); a special token that
    decodes to "" is never banned. Byte-level tokens that decode to U+FFFD alone cannot hold the ASCII backtick.
    """
    if not isinstance(fence, str) or not fence:
        raise ValueError(f"fence must be a non-empty str, got {fence!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
    prefixes = tuple(fence[:k] for k in range(1, len(fence)))  # the proper prefixes
    banned = set()
    for token_id in range(vocab_size):
        text = decode([token_id])
        if fence in text or text.endswith(prefixes):
            banned.add(token_id)
    return frozenset(banned)
