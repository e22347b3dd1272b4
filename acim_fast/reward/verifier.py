"""The answer verifier: binary reward for a model response against a gold answer.

`verify_answer` / `verify_batch` extract the response's final answer and return a `Verdict`. Cheap cases are decided
in the calling process, the rest by math-verify in a pool of persistent, killable worker subprocesses.
It does not grade proofs or free-form text beyond exact text answers, does not look at how the response was
produced (truncation, code use) and does not retry a check that timed out.
"""

from __future__ import annotations

import collections
import os
import queue
import re
import selectors
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal

from acim_fast.reward.extract import extract_answer

try:  # loaded by path in a worker process (see acim_fast.common.worker)
    from _acim_worker import FrameDecoder, boot_argv, recv_frame, write_frame
except ImportError:  # imported as part of the package
    from acim_fast.common.worker import FrameDecoder, boot_argv, recv_frame, write_frame

DEFAULT_TIMEOUT = 5.0  # seconds per math-verify check; typical checks take ~5 ms
STARTUP_TIMEOUT = 60.0  # a worker must import sympy + math-verify within this, even on a loaded machine
MEMORY_LIMIT_MB = 4096  # address-space cap per worker: a runaway sympy power must not take the host down
# Longer answers that the quick rules cannot decide are wrong without math-verify: the benchmarks' longest gold
# answer has 53 characters, and a megabyte of degenerate LaTeX would cost a worker its whole timeout and a restart.
MAX_ANSWER_CHARS = 4096


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check. `reward` is 1.0 iff `reason == "correct"`; `predicted` is the
    extracted answer (None when there was none). Reasons: "correct", "wrong", "no_answer", "too_long" (over
    MAX_ANSWER_CHARS and not equal to the gold by the quick rules), "timeout", "parse_error: ...",
    "worker_error: ...", "internal_error: ..."."""

    reward: float
    predicted: str | None
    reason: str


# ----------------------------------------------------------------------------------------------
# Extraction

# Everything before the workers runs in the trainer's process, outside the verifier's timeout, on whatever the
# model wrote: each step here is linear in the length of the answer (a pattern is applied a bounded number of times
# and cannot backtrack quadratically).
_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textsf|mathrm|mathbf|mathit|mbox)\s*\{([^{}]*)\}")
_MAX_TEXT_NESTING = 8  # passes of _TEXT_WRAPPER_RE: one pass per level would be quadratic in `\text{` * 100000
_SPACING_RE = re.compile(r"\\(?:left|right|displaystyle|quad|qquad)(?![A-Za-z])|\\[,!;: ]|~|\s+")
_SCIENTIFIC_RE = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*[eE]\s*([+-]?\d+)\s*")
# A number with the decorations the MATH graders strip (Hendrycks' strip_string: `\$`, `\%`, `^\circ`, a
# `\text{ unit}`; Minerva's normaliser: unit words such as "dollars", "cm") and GSM8K's (the number alone).
# Text-mode words after a number are a unit; bare words only from this list, so "5x" stays algebra.
_UNIT_WORDS = (
    "dollars?|cents?|pounds?|units?|ways|points?|digits?|integers?|degrees?|inches|inch|feet|foot|ft|yards?|miles?|"
    "meters?|metres?|km|cm|mm|kg|gm|mph|seconds?|minutes?|hours?|days?|weeks?|months?|years?|students?|meals?|edges?"
)
_WHOLE_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textsf|textnormal|mbox)\s*\{([^{}]*)\}")
_LEADING_NUMBER_RE = re.compile(r"(?:\\\$)?(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)")
# Applied to what follows the number, spaces removed: no two parts can match the same characters.
_NUMBER_SUFFIX_RE = re.compile(
    r"(?P<percent>\\?%|percent)?(?:\^\{?\\circ\}?)?"
    rf"(?:(?:\\(?:text|textrm|textnormal|mbox)\{{[A-Za-z]*\}}|(?:square|sq|cubic)?(?:{_UNIT_WORDS}))(?:\^\{{?[23]\}}?)?)?"
    r"\.?"
)


def _unwrap_text(s: str) -> tuple[str, bool]:
    """`s` with `\\text{..}`-like wrappers replaced by their content, and whether there were any. Each pass unwraps
    one level of nesting in linear time; wrappers nested deeper than `_MAX_TEXT_NESTING` (no answer does) stay."""
    unwrapped = s
    for _ in range(_MAX_TEXT_NESTING):
        unwrapped, count = _TEXT_WRAPPER_RE.subn(r"\1", unwrapped)
        if not count:
            break
    return unwrapped, unwrapped != s


def _text_key(s: str) -> str:
    return re.sub(r"[\s$()\\.]", "", _unwrap_text(s)[0]).lower()


def _gold_text_key(gold: str) -> str | None:
    """The comparison key of a text gold answer (`\\text{(C)}` -> "c"), None if the gold is math."""
    _, wrapped = _unwrap_text(gold)
    key = _text_key(gold)
    return key if wrapped and re.fullmatch(r"[a-z,]+", key) else None


def _normalize(s: str) -> str:
    s = _SPACING_RE.sub("", s.replace("{,}", ","))
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    return s.strip("$").removeprefix("\\$").rstrip(".")


def _as_number(s: str) -> tuple[Decimal, bool] | None:
    """(value, exact) of an answer that is one number with only the decorations the MATH and GSM8K graders strip
    (`\\$5`, `12.5\\%`, `30^\\circ`, `5 cm`, `5\\text{ cm}`, `\\text{5 cm}`, "1,000 dollars"); None for anything else.
    `exact`: an integer without a percent sign, wrong against any other such integer. A Decimal, not an int: int()
    refuses more than 4300 digits."""
    s = s.strip().strip("$").replace("{,}", ",").replace("\\!", "")
    if (whole := _WHOLE_TEXT_RE.fullmatch(s)) is not None:
        s = whole.group(1).strip()
    # Spaces count only after the number: "1, 234" is a set of two numbers, "1,234" a number.
    if (number := _LEADING_NUMBER_RE.match(s)) is None:
        return None
    if (suffix := _NUMBER_SUFFIX_RE.fullmatch(_SPACING_RE.sub("", s[number.end() :]))) is None:
        return None
    digits = number.group(1).replace(",", "")
    return Decimal(digits), "." not in digits and suffix.group("percent") is None


def _to_latex(s: str) -> str:
    """Scientific notation as LaTeX ("1.5e3" -> `1.5\\times10^{3}`): math-verify reads "1.5e3" as 1.5*e*3."""
    m = _SCIENTIFIC_RE.fullmatch(s)
    return f"{m.group(1)}\\times10^{{{m.group(2)}}}" if m else s


def _quick_reason(pred: str, gold: str) -> str | None:
    """"correct"/"wrong" when decidable without math-verify, else None (then math-verify decides, both sides
    wrapped in `\\boxed{}`, after `_to_latex`)."""
    # A gold wrapped in `\text{..}` (or `\textbf`, `\mathrm`, ...) that is only letters once unwrapped
    # (`\text{(C)}`, `\text{Evelyn}`) matches the same letters, ignoring case, spaces, parentheses and wrappers:
    # math-verify would read "Evelyn" as the product E*v*e*l*y*n and accept "Evenly".
    text_key = _gold_text_key(gold)
    if text_key is not None:
        return "correct" if _text_key(pred) == text_key else "wrong"
    if _normalize(pred) == _normalize(gold):  # spaces, `\left`/`\right`, `\dfrac`, `$`
        return "correct"
    # Both numbers once units, `\$` and `%` are stripped, as the MATH and GSM8K graders strip them ("12.5\%" is
    # 12.5; math-verify reads it as 0.125). Unequal, two plain integers are wrong; with a decimal or a percent sign
    # math-verify decides (it rounds floats, and takes 0.5 for 50\%).
    pred_number, gold_number = _as_number(pred), _as_number(gold)
    if pred_number is not None and gold_number is not None:
        if pred_number[0] == gold_number[0]:
            return "correct"
        if pred_number[1] and gold_number[1]:
            return "wrong"
    return None


# ----------------------------------------------------------------------------------------------
# Worker subprocess (runs `_worker_main`)

# The time of a check is bounded by SIGKILLing its worker: math-verify's own timeouts use `signal.alarm`, which works
# only in the main thread, so they are off. The kill is safe from any thread and also stops computations that never
# return to Python (sympy expanding `9^{9^{9^9}}`). Workers persist: starting one (Python + sympy + math-verify)
# costs ~0.5 s, a check ~4 ms. A worker loads this file by path (acim_fast.common.worker); of the package it
# imports only `acim_fast.reward.extract`, which needs nothing but `re`.
_WORKER_MODULE = "_acim_verify_worker"


def _math_verify_reason(pred: str, gold: str) -> str:
    """Runs in the worker: math-verify's judgement with its signal-based timeouts off."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    gold_parsed = parse(f"\\boxed{{{_to_latex(gold)}}}", config, parsing_timeout=None)
    if not gold_parsed:
        return "parse_error: gold answer not parseable"
    pred_parsed = parse(f"\\boxed{{{_to_latex(pred)}}}", config, parsing_timeout=None)
    if not pred_parsed:
        return "parse_error: answer not parseable"
    if verify(gold_parsed, pred_parsed, timeout_seconds=None):
        return "correct"
    # parse() falls back to the raw string when LaTeX conversion fails; then only string equality was tried.
    if all(isinstance(g, str) for g in gold_parsed):
        return "parse_error: gold answer not parseable"
    if all(isinstance(p, str) for p in pred_parsed):
        return "parse_error: answer not parseable"
    return "wrong"


def _worker_main(memory_limit_mb: str) -> None:
    """Serve checks: one request frame {"pred", "gold", "timeout"} on stdin, one {"reason"} frame on stdout.
    Sends {"ready": true} once imports are done; exits when stdin closes."""
    import logging
    import resource
    import warnings

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer; the parent kills us
    replies = os.dup(1)
    os.dup2(2, 1)  # a stray print() in a library must not corrupt the protocol
    warnings.simplefilter("ignore")
    # math-verify warns once that its timeouts are off (they are bounded here) and on each failed parse.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    if (limit := int(memory_limit_mb) << 20) > 0:  # a backstop: no check may take the host's memory
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    _math_verify_reason("\\frac{1}{2}", "0.5")  # imports and warms the parser before the clock runs
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    write_frame(replies, {"ready": True})
    while (request := recv_frame(0)) is not None:
        try:
            # The parent kills us at `timeout` seconds of wall time. If it cannot (it was killed itself,
            # and a check stuck in C code never reads the closed stdin), the kernel ends the check a few
            # CPU seconds later; CPU time never runs ahead of wall time, so this never fires first.
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu_soft = int(usage.ru_utime + usage.ru_stime + request["timeout"]) + 2
            if cpu_hard != resource.RLIM_INFINITY:
                cpu_soft = min(cpu_soft, cpu_hard)
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_soft, cpu_hard))
            reason = _math_verify_reason(request["pred"], request["gold"])
        except Exception as e:  # math-verify catches most errors itself; whatever escapes is a verdict
            reason = f"parse_error: {type(e).__name__}: {e}"[:300]
        write_frame(replies, {"reason": reason})


class _Worker:
    """One worker subprocess and the bytes it has sent that do not yet form a full frame."""

    def __init__(self, memory_limit_mb: int) -> None:
        self.proc = subprocess.Popen(
            boot_argv(_WORKER_MODULE, __file__, "_worker_main", str(memory_limit_mb)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.started = time.monotonic()
        self.ready = False
        self._frames = FrameDecoder()

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, pred: str, gold: str, timeout: float) -> bool:
        """Send one check; False if the worker is gone."""
        try:
            write_frame(self.proc.stdin.fileno(), {"pred": pred, "gold": gold, "timeout": timeout})
            return True
        except OSError:  # BrokenPipeError among them
            return False

    def read(self) -> list[dict] | None:
        """The complete messages now readable (call when select says readable); None at EOF."""
        chunk = os.read(self.fileno(), 65536)
        if not chunk:
            return None
        return self._frames.feed(chunk)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:  # stdin of a killed process: flushing pending bytes fails
                pass


def _kill_all(workers: set[_Worker]) -> None:
    for worker in list(workers):
        worker.kill()
    workers.clear()


# ----------------------------------------------------------------------------------------------
# Pool


class VerifierPool:
    """Persistent math-verify worker processes. Thread-safe: each call checks workers out, so
    concurrent calls run side by side on different workers (or wait for one to come free)."""

    def __init__(
        self,
        workers: int = 2,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        memory_limit_mb: int = MEMORY_LIMIT_MB,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"VerifierPool: workers must be an int >= 1, got {workers!r}")
        _check_timeout("timeout", timeout)
        _check_timeout("startup_timeout", startup_timeout)
        if not isinstance(memory_limit_mb, int) or memory_limit_mb < 0:
            raise ValueError(f"VerifierPool: memory_limit_mb must be an int >= 0 (0 = no cap), got {memory_limit_mb!r}")
        self.timeout = float(timeout)
        self.startup_timeout = float(startup_timeout)
        self._memory_limit_mb = memory_limit_mb
        self._lock = threading.Lock()
        self._closed = False
        self._workers: set[_Worker] = set()  # every live worker, idle or checked out
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)
        for _ in range(workers):
            self._idle.put(self._spawn())

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill every worker. Calls in flight end with "worker_error"; later calls raise ValueError."""
        with self._lock:
            self._closed = True
        self._finalizer()

    def verify(
        self, response_text: str, gold: str, *, timeout: float | None = None, last_number: bool = True
    ) -> Verdict:
        """One check; see `verify_batch`."""
        return self.verify_batch([(response_text, gold)], timeout=timeout, last_number=last_number)[0]

    def verify_batch(
        self,
        items: Iterable[tuple[str, str]],
        *,
        timeout: float | None = None,
        last_number: bool = True,
    ) -> list[Verdict]:
        """Verdicts for (response_text, gold) pairs, in order. Checks that need math-verify run in
        parallel on the idle workers; each gets `timeout` seconds (default: the pool's) from the moment
        a ready worker receives it. Nothing in a response or gold answer makes it raise; ValueError only for
        invalid arguments (wrong types, a timeout <= 0, a closed pool), i.e. programming errors."""
        timeout = self.timeout if timeout is None else _check_timeout("timeout", timeout)
        if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
            raise ValueError(
                f"verify_batch: items must be an iterable of (response_text, gold) pairs, got {type(items).__name__}"
            )
        items = list(items)
        for index, item in enumerate(items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) for x in item)):
                raise ValueError(
                    f"verify_batch: items[{index}] must be a (response_text: str, gold: str) pair, got {item!r:.100}"
                )
        with self._lock:
            if self._closed:
                raise ValueError("VerifierPool is closed")

        verdicts: list[Verdict | None] = [None] * len(items)
        tasks: list[tuple[int, str, str]] = []  # (item index, pred, gold) for the workers
        for index, (text, gold) in enumerate(items):
            try:
                pred = extract_answer(text, last_number=last_number)
                if pred is None:
                    verdicts[index] = Verdict(0.0, None, "no_answer")
                elif (reason := _quick_reason(pred, gold)) is not None:
                    verdicts[index] = _verdict(pred, reason)
                elif len(pred) > MAX_ANSWER_CHARS:
                    verdicts[index] = Verdict(0.0, pred, "too_long")
                else:
                    tasks.append((index, pred, gold))
            except Exception as e:  # a bug here must cost one reward, not the training run
                verdicts[index] = Verdict(0.0, None, f"internal_error: {type(e).__name__}: {e}")
        if tasks:
            try:
                reasons = self._run([(pred, gold) for _, pred, gold in tasks], timeout)
            except Exception as e:
                reasons = [f"internal_error: {type(e).__name__}: {e}"] * len(tasks)
            for (index, pred, _), reason in zip(tasks, reasons):
                verdicts[index] = _verdict(pred, reason)
        assert all(v is not None for v in verdicts)
        return verdicts  # type: ignore[return-value]

    # -- internals --

    def _spawn(self) -> _Worker:
        worker = _Worker(self._memory_limit_mb)
        with self._lock:
            if self._closed:
                worker.kill()  # close() ran while this call was replacing a worker
            else:
                self._workers.add(worker)
        return worker

    def _retire(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.discard(worker)
        worker.kill()

    def _checkin(self, worker: _Worker) -> None:
        with self._lock:
            alive = not self._closed and worker in self._workers
        if alive:
            self._idle.put(worker)
        else:
            worker.kill()

    def _checkout(self, wanted: int) -> list[_Worker]:
        """At least one worker (waiting for one if all are busy), up to `wanted`."""
        while True:
            with self._lock:
                if self._closed:
                    return []
            try:
                first = self._idle.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        workers = [first]
        while len(workers) < wanted:
            try:
                workers.append(self._idle.get_nowait())
            except queue.Empty:
                break
        return workers

    def _run(self, checks: list[tuple[str, str]], timeout: float) -> list[str]:
        """A reason per (pred, gold) check, computed on checked-out workers."""
        return _Batch(self, checks, timeout).run()


class _Batch:
    """One `VerifierPool._run` call: an event loop over the workers it holds. Each is starting (awaiting its
    ready frame), busy (awaiting a reply) or done; the loop sleeps in select() until a frame arrives or the
    earliest deadline passes. A busy worker past its deadline is killed and replaced, and the replacement
    joins the loop. A worker that dies or stalls while starting is replaced but not reused in this call,
    so a broken environment ends the call instead of spinning."""

    def __init__(self, pool: VerifierPool, checks: list[tuple[str, str]], timeout: float) -> None:
        self.pool, self.checks, self.timeout = pool, checks, timeout
        self.reasons: list[str | None] = [None] * len(checks)
        self.todo = collections.deque(range(len(checks)))
        self.active: dict[_Worker, tuple[int | None, float]] = {}  # -> (check index, None if starting; deadline)
        self.selector = selectors.DefaultSelector()
        self.startup_failures: list[str] = []
        self.held: set[_Worker] = set()  # workers this call must check back in

    def run(self) -> list[str]:
        self.held = set(self.pool._checkout(len(self.checks)))
        try:
            for worker in list(self.held):
                self._dispatch(worker)
            while self.active:
                if not self.todo:  # a worker still starting has nothing left to do in this call
                    self._release_starting()
                    if not self.active:
                        break
                self._read_ready()
                self._expire(time.monotonic())
        finally:
            # Normally empty; non-empty only if this loop itself failed. Such a worker may be in the
            # middle of a check, and its late reply would be read as the answer to the next one.
            for worker in self.held:
                self.pool._retire(worker)
                self.pool._checkin(self.pool._spawn())
            self.selector.close()
        unresolved = self.startup_failures[-1] if self.startup_failures else "worker_error: verifier pool closed"
        return [reason if reason is not None else unresolved for reason in self.reasons]

    def _watch(self, worker: _Worker, index: int | None, deadline: float) -> None:
        self.active[worker] = (index, deadline)
        self.selector.register(worker, selectors.EVENT_READ)

    def _unwatch(self, worker: _Worker) -> int | None:
        """Stop waiting on `worker`; the check it was busy with (None if it was starting)."""
        index, _ = self.active.pop(worker)
        self.selector.unregister(worker)
        return index

    def _release(self, worker: _Worker) -> None:
        self.held.discard(worker)
        self.pool._checkin(worker)

    def _dispatch(self, worker: _Worker) -> None:
        """Give a worker its next check, or hand it back to the pool when there is none."""
        while True:
            if not self.todo:
                self._release(worker)
                return
            if not worker.ready:
                self._watch(worker, None, worker.started + self.pool.startup_timeout)
                return
            index = self.todo.popleft()
            if worker.send(*self.checks[index], self.timeout):
                self._watch(worker, index, time.monotonic() + self.timeout)
                return
            # It died while idle (e.g. OOM-killed): not this check's fault, so requeue the check.
            self.todo.appendleft(index)
            self.held.discard(worker)
            self.pool._retire(worker)
            worker = self.pool._spawn()
            self.held.add(worker)

    def _fail(self, worker: _Worker, reason: str) -> None:
        """Kill `worker`; its check (or, if it was starting, the call) ends with `reason`."""
        index = self._unwatch(worker)
        self.held.discard(worker)
        self.pool._retire(worker)
        replacement = self.pool._spawn()
        if index is None:
            self.startup_failures.append(reason)
            self.pool._checkin(replacement)
        else:
            self.reasons[index] = reason
            self.held.add(replacement)
            self._dispatch(replacement)

    def _release_starting(self) -> None:
        for worker, (index, _) in list(self.active.items()):
            if index is None:
                self._unwatch(worker)
                self._release(worker)

    def _read_ready(self) -> None:
        """Wait for frames until the earliest deadline and handle those that arrive."""
        # Read what has arrived before enforcing deadlines: a worker spawned long ago whose ready frame
        # waits unread in its pipe is ready, not late.
        wait = max(0.0, min(deadline for _, deadline in self.active.values()) - time.monotonic())
        for key, _ in self.selector.select(wait):
            worker = key.fileobj
            messages = worker.read()
            if messages is None:
                self._fail(worker, _exit_reason(worker))
                continue
            assert len(messages) <= 1, "a worker has at most one message outstanding"
            for message in messages:
                index = self._unwatch(worker)
                if "ready" in message:
                    worker.ready = True
                else:
                    self.reasons[index] = message["reason"]
                self._dispatch(worker)

    def _expire(self, now: float) -> None:
        for worker, (index, deadline) in list(self.active.items()):
            if now >= deadline:
                self._fail(worker, "timeout" if index is not None else "worker_error: worker did not start in time")


def _exit_reason(worker: _Worker) -> str:
    """The reason for a check whose worker closed its stdout."""
    try:
        code = worker.proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:  # closed its stdout yet still running
        code = None
    # SIGXCPU is the worker's own CPU-time backstop, i.e. a timeout seen late.
    return "timeout" if code == -signal.SIGXCPU else f"worker_error: worker exited (code {code})"


def _check_timeout(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


def _verdict(pred: str, reason: str) -> Verdict:
    return Verdict(1.0 if reason == "correct" else 0.0, pred, reason)


# ----------------------------------------------------------------------------------------------
# Process-wide default pool

# `verify_answer` / `verify_batch` share one pool, created on first use, its workers killed at exit; a trainer
# that wants to size or close its pool creates its own.
_default_pool: VerifierPool | None = None
_default_pool_lock = threading.Lock()


def _shared_pool() -> VerifierPool:
    global _default_pool
    with _default_pool_lock:
        if _default_pool is None:
            _default_pool = VerifierPool(workers=min(4, os.cpu_count() or 1))
        return _default_pool


def verify_answer(
    response_text: str, gold: str, *, timeout: float = DEFAULT_TIMEOUT, last_number: bool = True
) -> Verdict:
    """Extract the answer of `response_text` and check it against `gold`, in at most about `timeout`
    seconds of math-verify time (plus a worker start, ~1 s, right after a timeout or on first use)."""
    return _shared_pool().verify(response_text, gold, timeout=timeout, last_number=last_number)


def verify_batch(
    items: Iterable[tuple[str, str]], *, timeout: float = DEFAULT_TIMEOUT, last_number: bool = True
) -> list[Verdict]:
    """`verify_answer` for many (response_text, gold) pairs, in parallel on the shared pool."""
    return _shared_pool().verify_batch(items, timeout=timeout, last_number=last_number)
