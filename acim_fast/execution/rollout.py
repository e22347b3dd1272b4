"""Tool-integrated rollouts: the model writes Python cells, the sandbox runs them, their output is appended as tokens.

What it does:
- `RolloutLoop` drives an `Engine` and a `Sandbox` together. A sequence pauses on the stop string `CellFormat.close`
  (a fence at the start of a line); if that fence closes an open python cell, the cell's code (decoded from the
  response, never re-tokenised) goes to the sandbox with the trajectory's history (its earlier successful cells),
  and the output block, tokenised ON ITS OWN, is appended (loss mask 0, behaviour log-prob 0.0); the sequence then
  resumes. Any other pause is resumed at once. Cells of many trajectories run in parallel while the others decode.
- Caps per trajectory: at most `max_code_calls` cells run; a later cell gets `CellFormat.limit_notice` (status
  `CellStatus.LIMIT`). An output block is at most `max_tool_tokens` and never takes the response past
  `max_new_tokens` (its text keeps head and tail around `CellFormat.truncated`); a cell is run only if a fully
  truncated block still fits, otherwise the trajectory ends with finish_reason "length".
- An output block the model writes itself is cut at the fence that closes its cell: what it wrote stays (loss
  mask 1) and the real output continues it. A fence outside an open python cell runs nothing.
- `submit` drives sequences the caller added; `fork` forks a trajectory (children inherit the cells before the
  fork point); `on_cell(seq_id, open_at, index)` is called when a cell closes, before it runs, and may fork there.
  Rewards come from the verifier in one batch when `run_until_done` returns (it reads the whole response).
- `rollout_engine`: a rollout engine whose KV pool is sized for a number of sequences of a given length.

What it does not do: prompts or chat templates (only response text is parsed), fences other than `CellFormat`'s,
closing fences that do not start a line, running a cell closed by the last token the sequence may have,
decision-point forking policy (the E-step's `on_cell`), or training. Every sequence of the engine must belong to
the loop while it steps.
"""

from __future__ import annotations

import concurrent.futures
import functools
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

from acim_fast.engine.paged_engine import Engine
from acim_fast.engine.sampling import SamplingParams, SeqOutput
from acim_fast.execution.prompts import CellFormat
from acim_fast.execution.sandbox import CellStatus, Result, Sandbox, next_history
from acim_fast.reward.verifier import Verdict, verify_batch

if TYPE_CHECKING:
    from acim_fast.execution.rollout_model import RolloutModel

# Rewards need an answer the model stated (a box, '####', 'the answer is'): with the last-number fallback, a
# number printed by a trailing tool output would count as the model's answer.
verify_stated = functools.partial(verify_batch, last_number=False)

KV_BLOCK_SIZE = 16  # tokens per KV block of a rollout engine


def rollout_engine(model: RolloutModel, *, seq_tokens: int, pool_seqs: int, **options: Any) -> Engine:
    """`model.engine(...)` whose KV pool holds `pool_seqs` sequences of up to `seq_tokens` tokens (prompt +
    response) each; `options` are the other `Engine` keywords (`max_num_seqs`, `detokenize`, ...)."""
    per_seq = -(-seq_tokens // KV_BLOCK_SIZE)
    return model.engine(num_blocks=per_seq * pool_seqs, block_size=KV_BLOCK_SIZE, **options)


@dataclass(frozen=True)
class Cell:
    """One closed python cell of a trajectory; positions are indices into the response tokens."""

    code: str
    status: CellStatus  # LIMIT: not run (the code-call cap)
    output: str  # the text shown inside the output block (after truncation)
    truncated: bool  # the loop cut the output to fit the token budget
    open_at: int  # the token where the cell's opening fence starts
    close_at: int  # response length when the cell closed (its closing fence included)
    end_at: int  # response length once its output block was appended


@dataclass
class RolloutRecord:
    """One finished trajectory. `response_ids`, `behaviour_logprobs` and `loss_mask` are aligned; tool-output
    tokens have loss mask 0 and behaviour log-prob 0.0."""

    seq_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    behaviour_logprobs: list[float]
    loss_mask: list[int]
    finish_reason: str  # "stop" (a stop token) | "length" (max_new_tokens, or no room for a cell's output)
    reward: float
    answer: str | None  # what the verifier extracted
    reason: str  # the verifier's reason ("correct", "wrong", "no_answer", ...)
    cells: list[Cell]
    first_code_token: int | None  # the token where the first python cell opens (run or not); None: no code
    parent: int | None  # lineage, as the engine reports it
    fork_pos: int | None

    @property
    def used_code(self) -> bool:
        return self.first_code_token is not None

    @property
    def code_calls(self) -> int:
        return sum(c.status != CellStatus.LIMIT for c in self.cells)

    @property
    def errors(self) -> int:
        """Cells that failed other than by timing out."""
        return sum(c.status in (CellStatus.ERROR, CellStatus.MEMORY, CellStatus.KILLED) for c in self.cells)

    @property
    def timeouts(self) -> int:
        return sum(c.status == CellStatus.TIMEOUT for c in self.cells)

    @property
    def tool_tokens(self) -> int:
        return len(self.loss_mask) - sum(self.loss_mask)


@dataclass(frozen=True)
class _Closed:
    """A cell that closed and waits for its output block."""

    code: str
    open_at: int
    close_at: int
    prefix: str  # see CellFormat.block_prefix


@dataclass(eq=False)
class _Trajectory:
    seq_id: int
    gold: str
    cells: list[Cell]
    history: tuple[str, ...]
    scan: int  # response tokens before this index belong to handled cells: the next cell opens at or after it
    pending: tuple[concurrent.futures.Future[Result], _Closed] | None = None
    output: SeqOutput | None = None  # set once finished
    first_code_token: int | None = None


class RolloutLoop:
    """See the module docstring. Typical use: `add` (or `submit`/`fork`) trajectories, then `run_until_done`."""

    def __init__(self, engine: Engine, sandbox: Sandbox, *, encode: Callable[[str], list[int]],
                 decode: Callable[[list[int]], str], fmt: CellFormat = CellFormat(), max_code_calls: int = 4,
                 max_tool_tokens: int = 256,
                 verify: Callable[[list[tuple[str, str]]], list[Verdict]] = verify_stated,
                 on_cell: Callable[[int, int, int], None] | None = None):
        if not isinstance(fmt, CellFormat):
            raise ValueError(f"fmt must be a CellFormat, got {type(fmt).__name__}")
        for name, fn in (("encode", encode), ("decode", decode), ("verify", verify)):
            if not callable(fn):
                raise ValueError(f"{name} must be callable, got {fn!r}")
        if isinstance(max_code_calls, bool) or not isinstance(max_code_calls, int) or max_code_calls < 0:
            raise ValueError(f"max_code_calls must be an int >= 0, got {max_code_calls!r}")
        if isinstance(max_tool_tokens, bool) or not isinstance(max_tool_tokens, int) or max_tool_tokens < 1:
            raise ValueError(f"max_tool_tokens must be an int >= 1, got {max_tool_tokens!r}")
        self.engine, self.sandbox, self.fmt = engine, sandbox, fmt
        if on_cell is not None and not callable(on_cell):
            raise ValueError(f"on_cell must be None or callable, got {on_cell!r}")
        self.encode, self.decode, self.verify, self.on_cell = encode, decode, verify, on_cell
        self.max_code_calls, self.max_tool_tokens = max_code_calls, max_tool_tokens
        # The longest block prefix is a newline + the opening: every truncated block must fit the cap.
        smallest = len(encode("\n" + fmt.output_open + fmt.truncated + fmt.output_close))
        if smallest > max_tool_tokens:
            raise ValueError(f"max_tool_tokens {max_tool_tokens} is below the {smallest} tokens of an output block "
                             f"whose output is truncated away")
        self._trajs: dict[int, _Trajectory] = {}  # by seq id, in submission order; kept until run_until_done

    # -- adding trajectories --

    def sampling_params(self, params: SamplingParams) -> SamplingParams:
        """`params` with the loop's stop string added (every sequence the loop drives needs it)."""
        if self.fmt.close in params.stop_strings:
            return params
        return replace(params, stop_strings=(*params.stop_strings, self.fmt.close))

    def add(self, prompt_ids: list[int], gold: str, params: SamplingParams) -> int:
        """Add a fresh prompt to the engine and drive it; returns its seq id."""
        if not isinstance(gold, str):
            raise ValueError(f"gold must be a str, got {type(gold).__name__}")
        seq_id = self.engine.add(prompt_ids, self.sampling_params(params))
        self.submit(seq_id, gold)
        return seq_id

    def submit(self, seq_id: int, gold: str, *, cells: Sequence[Cell] = ()) -> None:
        """Drive a sequence already in the engine (e.g. one the caller forked). `cells` are the cells already in
        its response (their histories are replayed, they count against the cap); its params must hold the stop
        string (see `sampling_params`)."""
        if not isinstance(gold, str):
            raise ValueError(f"gold must be a str, got {type(gold).__name__}")
        if seq_id in self._trajs:
            raise ValueError(f"seq_id {seq_id} is already driven by this RolloutLoop")
        if self.fmt.close not in self.engine.params(seq_id).stop_strings:  # also rejects unknown ids
            raise ValueError(f"sequence {seq_id} lacks the stop string {self.fmt.close!r}: add it with "
                             f"RolloutLoop.sampling_params")
        out = self.engine.output(seq_id)
        cells = list(cells)
        end = 0
        for i, c in enumerate(cells):
            if not isinstance(c, Cell) or not end <= c.close_at <= c.end_at <= len(out.token_ids):
                raise ValueError(f"cells[{i}] is not a Cell lying, in order, within the {len(out.token_ids)} "
                                 f"response tokens of sequence {seq_id}: {c!r:.200}")
            end = c.end_at
        # What `next_history` would have built cell by cell: the successful cells only.
        history = tuple(c.code for c in cells if c.status == CellStatus.OK)
        traj = _Trajectory(seq_id=seq_id, gold=gold, cells=cells, history=history, scan=end,
                           first_code_token=cells[0].open_at if cells else None)
        self._trajs[seq_id] = traj
        if out.finish_reason in ("stop_string", "paused"):  # it would never be stepped again: handle it now
            self._on_pause(traj, out)

    def fork(self, seq_id: int, n: int, *, at: int | None = None, forbid: Sequence[int] = (),
             params: SamplingParams | None = None) -> list[int]:
        """`Engine.fork` of a driven trajectory; the children are driven too and inherit the cells that end
        before `at` (prompt + response tokens, default all). `at` may not cut a cell's closing fence from its
        output block, nor keep the fence of a cell still running. `params` (default: the parent's) get the
        loop's stop string added."""
        traj = self._trajs.get(seq_id)
        if traj is None or traj.output is not None:
            raise ValueError(f"seq_id {seq_id} is not a running trajectory of this RolloutLoop")
        if at is not None and (isinstance(at, bool) or not isinstance(at, int)):
            raise ValueError(f"at must be None or an int, got {at!r}")
        out = self.engine.output(seq_id)
        r = len(out.token_ids) if at is None else at - len(out.prompt_ids)  # the children's response length
        if traj.pending is not None and r >= traj.pending[1].close_at:
            raise ValueError(f"fork at {at} keeps the closing fence of a cell still running (it closed at response "
                             f"token {traj.pending[1].close_at}): fork before it, or after its output arrives")
        for c in traj.cells:
            if c.close_at <= r < c.end_at:
                raise ValueError(f"fork at {at} cuts the output block of a cell (response tokens "
                                 f"[{c.close_at}, {c.end_at}))")
        children = self.engine.fork(seq_id, n, at=at, forbid=forbid,
                                    params=None if params is None else self.sampling_params(params))
        for child in children:
            self.submit(child, traj.gold, cells=[c for c in traj.cells if c.end_at <= r])
        return children

    # -- running --

    def has_unfinished(self) -> bool:
        return any(t.output is None for t in self._trajs.values())

    def step(self) -> list[int]:
        """Append the outputs of finished cells, then one engine step; returns the seq ids of the trajectories that
        finished. Blocks on the sandbox only when no sequence can decode. A sequence of the engine that the loop
        does not drive raises ValueError when the engine reports it (finished, or paused at a stop string)."""
        done: list[int] = []
        self._poll()
        if not self.engine.has_unfinished():
            waiting = [t.pending[0] for t in self._trajs.values() if t.pending is not None]
            if waiting:
                concurrent.futures.wait(waiting, return_when=concurrent.futures.FIRST_COMPLETED)
                self._poll()
            else:  # paused by someone else since `submit`: nothing would ever step it again
                for traj in [t for t in self._trajs.values() if t.output is None]:
                    out = self.engine.output(traj.seq_id)  # raises if someone released it
                    if out.finish_reason in ("paused", "stop_string"):
                        done += self._on_pause(traj, out)
                assert (self.engine.has_unfinished() or not self.has_unfinished()
                        or any(t.pending is not None for t in self._trajs.values())), "a trajectory would never end"
        strangers = []
        for out in self.engine.step():
            traj = self._trajs.get(out.seq_id)
            if traj is None or traj.output is not None:
                strangers.append(out.seq_id)
            elif out.finish_reason == "stop_string":
                done += self._on_pause(traj, out)
            else:
                self._finish(traj, out)
                done.append(traj.seq_id)
        if strangers:
            raise ValueError(f"engine sequences {strangers} are not driven by this RolloutLoop (submit them)")
        return done

    def run_until_done(self) -> list[RolloutRecord]:
        """Step until every trajectory finished; verify them (one batch) and return their records in submission
        order. The loop forgets them."""
        while self.has_unfinished():
            self.step()
        trajs = list(self._trajs.values())
        self._trajs.clear()
        verdicts = self.verify([(self.decode(t.output.token_ids), t.gold) for t in trajs])
        return [self._record(t, v) for t, v in zip(trajs, verdicts)]

    # -- internals --

    def _on_pause(self, traj: _Trajectory, out: SeqOutput) -> list[int]:
        """Handle a paused sequence: run the cell it just closed, else resume it. Returns [seq_id] if it ended."""
        fmt, resp = self.fmt, out.token_ids
        text = self.decode(resp[traj.scan:])
        i = text.find(fmt.open)
        j = text.find(fmt.close, i + len(fmt.open)) if i >= 0 else -1
        if j < 0:
            self.engine.resume(traj.seq_id)
            return []
        code = text[i + len(fmt.open):j].partition("\n")[2]
        open_at = traj.scan + self._token_at(resp[traj.scan:], i)
        closed = _Closed(code=code, open_at=open_at, close_at=len(resp), prefix=fmt.block_prefix(text[j:]))
        if traj.first_code_token is None:
            traj.first_code_token = open_at
        if self.on_cell is not None:
            self.on_cell(traj.seq_id, open_at, len(traj.cells))
        if len(self.encode(closed.prefix + fmt.truncated + fmt.output_close)) > self._room(traj, closed):
            self.engine.release(traj.seq_id)
            self._finish(traj, replace(out, finish_reason="length", stop_string=None))
            return [traj.seq_id]
        if sum(c.status != CellStatus.LIMIT for c in traj.cells) >= self.max_code_calls:
            self._append(traj, closed, CellStatus.LIMIT, fmt.limit_notice)
        else:
            traj.pending = (self.sandbox.submit(code, traj.history), closed)
        return []

    def _poll(self) -> None:
        """Append the output of every cell that is done (in seq id order, so runs are reproducible). An append
        never ends a trajectory at once: one that fills max_new_tokens is reported by the engine's next step."""
        for traj in sorted((t for t in self._trajs.values() if t.pending is not None), key=lambda t: t.seq_id):
            if not traj.pending[0].done():
                continue
            future, closed = traj.pending
            traj.pending = None
            result = future.result()
            traj.history = next_history(traj.history, closed.code, result)
            text = result.output.rstrip("\n")
            if result.error:
                text = f"{text}\n{result.error}" if text else result.error
            self._append(traj, closed, result.status, text)

    def _room(self, traj: _Trajectory, closed: _Closed) -> int:
        return min(self.max_tool_tokens, self.engine.params(traj.seq_id).max_new_tokens - closed.close_at)

    def _append(self, traj: _Trajectory, closed: _Closed, status: CellStatus, output: str) -> None:
        """Tokenise the output block (only it) within the room left, append it, and record the cell."""
        budget = self._room(traj, closed)

        def block(shown: str) -> list[int]:
            return self.encode(closed.prefix + shown + self.fmt.output_close)

        shown, ids = output, block(output)
        truncated = len(ids) > budget
        if truncated:
            # Keep the longest head + tail that fits; lo = 0 always fits (checked before the cell ran).
            lo, hi = 0, len(output)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if len(block(_cut(output, mid, self.fmt.truncated))) <= budget:
                    lo = mid
                else:
                    hi = mid
            shown = _cut(output, lo, self.fmt.truncated)
            ids = block(shown)
        assert len(ids) <= budget, "a fully truncated block was checked to fit before the cell ran"
        self.engine.append(traj.seq_id, ids)
        traj.cells.append(Cell(code=closed.code, status=status, output=shown, truncated=truncated,
                               open_at=closed.open_at, close_at=closed.close_at, end_at=closed.close_at + len(ids)))
        traj.scan = closed.close_at + len(ids)

    def _token_at(self, ids: list[int], offset: int) -> int:
        """The index of the token whose text holds character `offset` of `decode(ids)`."""
        lo, hi = 0, len(ids) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.decode(ids[:mid + 1])) > offset:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _finish(self, traj: _Trajectory, out: SeqOutput) -> None:
        traj.output = out
        if traj.first_code_token is None:  # no cell closed: an opened one still counts as the decision to code
            text = self.decode(out.token_ids[traj.scan:])
            i = text.find(self.fmt.open)
            if i >= 0:
                traj.first_code_token = traj.scan + self._token_at(out.token_ids[traj.scan:], i)

    def _record(self, traj: _Trajectory, verdict: Verdict) -> RolloutRecord:
        out = traj.output
        return RolloutRecord(
            seq_id=out.seq_id, prompt_ids=out.prompt_ids, response_ids=out.token_ids,
            behaviour_logprobs=out.behaviour_logprobs, loss_mask=out.loss_mask, finish_reason=out.finish_reason,
            reward=verdict.reward, answer=verdict.predicted, reason=verdict.reason, cells=list(traj.cells),
            first_code_token=traj.first_code_token, parent=out.parent, fork_pos=out.fork_pos)


def _cut(text: str, keep: int, marker: str) -> str:
    """`text` reduced to its first ceil(keep/2) and last floor(keep/2) characters around `marker`."""
    head = (keep + 1) // 2
    return text[:head] + marker + text[len(text) - (keep - head):]

