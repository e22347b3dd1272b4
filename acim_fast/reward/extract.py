r"""Final-answer extraction from a model response: `extract_answer`, the first rule that applies wins.

1. `\boxed{...}` / `\fbox{...}` with balanced braces (escaped `\{ \}` do not count), or `\boxed X` without
   braces (X = the next run of non-space characters). The last box counts; boxes directly before it separated
   only by spaces, `$`, commas, "and" or "or" are joined to it with ", " ("\boxed{2} or \boxed{3}" is the hedge
   "2, 3"). A nested box is unwrapped. A malformed last box (unbalanced, empty) means no answer, no fallback.
2. The last line "#### X" (GSM8K) whose X is not blank and has no letters: "#### Step 2: ..." is a markdown
   heading.
3. The last "answer is X" / "answer: X" (also "Final Answer", markdown bold), X = the first math span
   (`$..$`, `\(..\)`, `\[..\]`) right after it, else the text up to the end of the sentence/line.
4. The last plain number (integer or decimal, optional sign, thousands commas), unless `last_number=False`.

It does not compare the answer with the gold one: `verifier` does. It runs in the trainer's process, outside the
verifier's timeout, so every step is linear in the length of the response: no pattern here can backtrack
quadratically (a response is whatever the model wrote: a megabyte of spaces after "####" is a valid input).
"""

from __future__ import annotations

import re

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BARE_BOX_ARG_RE = re.compile(r"[^\s$]+")
_BOX_JOIN_RE = re.compile(r"[\s$,]*(?:(?:and|or)[\s$,]*)?")
# A "####" line; whether it is GSM8K's answer line is decided in Python (`_hash_answer`): a single pattern that
# also excludes letters and blanks had `[ \t]*` and `[^A-Za-z\n]*` competing for the same spaces, which is
# quadratic in a run of spaces.
_HASH_LINE_RE = re.compile(r"(?m)^[ \t]*####([^\n]*)")
_LETTER_RE = re.compile(r"[A-Za-z]")
_ANSWER_IS_RE = re.compile(r"(?i)\banswer\b\**\s*(?:is\b\s*:?|:)[\s*]*")
_MATH_SPANS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)|\n")
# A minus sign counts only where it cannot be a binary minus of a preceding word ("x-3" gives 3).
_NUMBER_RE = re.compile(r"(?<![\w.])(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _closing_brace(text: str, open_at: int) -> int | None:
    """Index of the `}` matching the `{` at `open_at`; None if unbalanced. `\\{`, `\\}` are literals."""
    depth = 0
    i = open_at
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _boxes(text: str) -> list[tuple[int, int, str | None]]:
    """Every top-level box as (start, end, content); content None for a malformed box."""
    out: list[tuple[int, int, str | None]] = []
    pos = 0
    while (m := _BOX_RE.search(text, pos)) is not None:
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            close = _closing_brace(text, j)
            if close is None:
                out.append((m.start(), len(text), None))
                break
            content = text[j + 1 : close].strip()
            out.append((m.start(), close + 1, content or None))
            pos = close + 1
        elif j > m.end() and (tok := _BARE_BOX_ARG_RE.match(text, j)) is not None:
            content = tok.group().rstrip(".,;")
            out.append((m.start(), tok.end(), content or None))
            pos = tok.end()
        else:
            out.append((m.start(), m.end(), None))
            pos = m.end()
    return out


def _boxed_answer(text: str) -> tuple[bool, str | None]:
    """(whether the text has a box, the answer from the last box and the boxes joined to it)."""
    boxes = _boxes(text)
    if not boxes:
        return False, None
    start, _, content = boxes[-1]
    if content is None:
        return True, None
    parts = [content]  # collected backwards: inserting at the front would be quadratic in the number of boxes
    for prev_start, prev_end, prev_content in reversed(boxes[:-1]):
        if prev_content is None or not _BOX_JOIN_RE.fullmatch(text[prev_end:start]):
            break
        parts.append(prev_content)
        start = prev_start
    answer = ", ".join(dict.fromkeys(reversed(parts)))  # "\boxed{5} \boxed{5}" is one answer, not the set {5, 5}
    inner = _boxes(answer)
    if len(inner) == 1 and inner[0][0] == 0 and inner[0][1] == len(answer):
        return True, inner[0][2]  # "\boxed{\boxed{5}}"
    return True, answer


def _hash_answer(text: str) -> str | None:
    """X of the last "#### X" line whose X is not blank and has no letters (a line with letters is a markdown
    heading, "#### Step 2: ..."), or None."""
    answer = None
    for m in _HASH_LINE_RE.finditer(text):
        rest = m.group(1)
        if rest.strip() and _LETTER_RE.search(rest) is None:
            answer = rest
    return answer


def _clean_tail(tail: str) -> str | None:
    """The answer at the start of `tail`: a leading math span, else up to the end of the sentence."""
    tail = tail.strip()
    for opener, closer in _MATH_SPANS:
        if tail.startswith(opener):
            end = tail.find(closer, len(opener))
            tail = tail[len(opener) : end if end >= 0 else len(tail)]
            break
    else:
        end = _SENTENCE_END_RE.search(tail)
        if end is not None:
            tail = tail[: end.start()]
    tail = tail.strip().strip("*").strip().rstrip(".,;:").strip()
    return tail or None


def extract_answer(text: str, *, last_number: bool = True) -> str | None:
    """The final answer of a response, or None. See the module docstring for the order of rules."""
    if not isinstance(text, str):
        raise ValueError(f"extract_answer: text must be str, got {type(text).__name__}")
    has_box, boxed = _boxed_answer(text)
    if has_box:
        return boxed
    hashed = _hash_answer(text)
    if hashed is not None:
        return _clean_tail(hashed)
    answer_is = list(_ANSWER_IS_RE.finditer(text))
    if answer_is:
        return _clean_tail(text[answer_is[-1].end() :])
    if last_number:
        numbers = _NUMBER_RE.findall(text)
        if numbers:
            return numbers[-1]
    return None
