"""Evaluation: greedy Pass@1 with the tool loop, code-use rate, code-selection accuracy (python -m acim_fast.evaluate).

`evaluate` runs, per problem, one greedy rollout whose prompt carries no methodology instruction (its Pass@1, and
whether it opens a python cell: the model's own choice) and k seeded samples with each decision forced, code and
prose; `oracle_decision` labels the decision that succeeds from their success rates, and a `Report` holds a row per
problem and the aggregates (overall, per source, per level) as JSON and as a table. The CLI (every `EvalOptions`
field is a flag) prints the table; under torchrun each rank evaluates its share and rank 0 prints and writes.

It does not compute Pass@k or majority votes, estimate the model's decision distribution from samples (its choice is
the greedy one), or checkpoint partial results (the report is written once, at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import tqdm

from acim_fast.common.atomic import atomic_write
from acim_fast.common.fields import add_field_flags, check_int, option
from acim_fast.common.hashing import stable_seed
from acim_fast.data import Problem, load_problems
from acim_fast.engine.sampling import SamplingParams
from acim_fast.engine.vllm_backend import VLLMBackend
from acim_fast.execution.rollout import RolloutLoop, RolloutRecord, rollout_engine
from acim_fast.execution.rollout_model import RolloutModel, load_rollout_model
from acim_fast.execution.sandbox import ISOLATIONS, Sandbox, SandboxConfig, SandboxOptions
from acim_fast.train.dist import Dist, Ranks, from_env

DECISIONS = ("code", "prose")


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalOptions:
    """What `evaluate` runs; every field is validated with a ValueError naming it, and is a CLI flag."""

    k: int = option(4, "sampled rollouts per forced decision (code, prose) and problem")
    temperature: float = option(1.0, "temperature of the forced-decision samples (the autonomous rollout is greedy)")
    top_p: float = option(1.0, "top-p of the forced-decision samples")
    seed: int = option(0, "seed of the forced-decision samples")
    max_new_tokens: int = option(1024, "response budget of every rollout (what the model writes + tool output)")
    threshold: float = option(0.5, "a forced decision succeeds on a problem when its success rate is above this")
    max_code_calls: int = option(4, "python cells run per rollout; later ones get a limit notice")
    max_tool_tokens: int = option(256, "tokens of one appended output block")
    sandbox_timeout_s: float = option(10.0, "wall-clock limit of one python cell")
    max_num_seqs: int = option(64, "sequences decoded together; the KV pool is sized for this many")

    def __post_init__(self) -> None:
        def number(name: str, ok: Callable[[float], bool], expected: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ValueError(f"EvalOptions.{name} must be {expected}, got {value!r}")

        for name, minimum in (("k", 1), ("seed", 0), ("max_new_tokens", 1), ("max_code_calls", 0),
                              ("max_tool_tokens", 1), ("max_num_seqs", 1)):
            check_int(self, name, minimum)
        number("temperature", lambda v: 0 <= v < float("inf"), "a finite number >= 0")
        number("top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        # At 1 no rate could exceed it: nothing would ever be labelled.
        number("threshold", lambda v: 0 <= v < 1, "in [0, 1)")
        number("sandbox_timeout_s", lambda v: 0.01 <= v < float("inf"), "a finite number >= 0.01")


# -- the oracle and the aggregates (pure functions) --

def oracle_decision(code_rate: float, prose_rate: float, threshold: float = 0.5) -> str | None:
    """"prose" if prose_rate > threshold, else "code" if code_rate > threshold, else None (no label).

    A decision succeeds when it is right more often than `threshold` (0.5: more often than wrong); when both do, the
    method without a tool call is the better choice. The strict ">" and the default are our reading of the paper's
    definition, hence a parameter."""
    for name, rate in (("code_rate", code_rate), ("prose_rate", prose_rate)):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ValueError(f"{name} must be a success rate in [0, 1], got {rate!r}")
    if prose_rate > threshold:
        return "prose"
    if code_rate > threshold:
        return "code"
    return None


def selection_accuracy(choices: Sequence[str], oracles: Sequence[str | None]) -> float | None:
    """Share of labelled problems (oracle not None) whose choice equals the oracle; None when none is labelled."""
    if len(choices) != len(oracles):
        raise ValueError(f"choices and oracles differ in length: {len(choices)} != {len(oracles)}")
    pairs = [(c, o) for c, o in zip(choices, oracles) if o is not None]
    for c, o in pairs:
        if c not in DECISIONS or o not in DECISIONS:
            raise ValueError(f"decisions must be one of {DECISIONS} (or a None oracle), got choice {c!r}, oracle {o!r}")
    return sum(c == o for c, o in pairs) / len(pairs) if pairs else None


@dataclass(frozen=True, kw_only=True, slots=True)
class ProblemResult:
    """One problem's row of the report."""

    id: str
    source: str
    level: int | None
    answer: str  # the gold answer
    correct: bool  # the greedy autonomous rollout's reward was 1 (Pass@1)
    used_code: bool  # ... and it opened a python cell: the model's choice
    code_calls: int  # cells it ran
    finish_reason: str
    predicted: str | None  # the answer the verifier extracted from it
    response: str  # its text, tool output included
    k: int
    code_correct: int  # forced-code samples with reward 1
    prose_correct: int  # forced-prose samples with reward 1
    code_mode_used_code: int  # forced-code samples that did open a cell (the trigger only invites code)
    # Forced-prose samples that opened a cell: 0 unless a tokenizer writes fences fence_start_ids does not catch
    # (that would make the prose rate and the oracle label meaningless, so it is reported, not assumed).
    prose_mode_used_code: int
    oracle: str | None  # oracle_decision of the two success rates
    choice: str  # "code" if used_code else "prose"

    @property
    def code_rate(self) -> float:
        return self.code_correct / self.k

    @property
    def prose_rate(self) -> float:
        return self.prose_correct / self.k

    @property
    def selection_correct(self) -> bool | None:
        return None if self.oracle is None else self.choice == self.oracle

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(code_rate=self.code_rate, prose_rate=self.prose_rate, selection_correct=self.selection_correct)
        return d


@dataclass(frozen=True, kw_only=True, slots=True)
class Summary:
    """Aggregates over a group of rows. Rates over problems, except `code_mode_code_rate` (over forced samples)."""

    n: int
    pass_at_1: float
    code_use_rate: float  # greedy autonomous rollouts that opened a cell
    code_success: float  # mean forced-code success rate
    prose_success: float  # mean forced-prose success rate
    code_mode_code_rate: float  # forced-code samples that opened a cell
    prose_mode_code_rate: float  # forced-prose samples that opened a cell (0 unless the fence ban leaks)
    labelled: int
    oracle_code: int
    oracle_prose: int
    selection_accuracy: float | None  # None when no problem is labelled
    over_code: int  # labelled prose, the model chose code
    under_code: int  # labelled code, the model chose prose


def summarize(rows: Sequence[ProblemResult]) -> Summary:
    if not rows:
        raise ValueError("summarize needs at least one row")
    n = len(rows)
    labelled = [r for r in rows if r.oracle is not None]
    return Summary(
        n=n, pass_at_1=sum(r.correct for r in rows) / n, code_use_rate=sum(r.used_code for r in rows) / n,
        code_success=sum(r.code_rate for r in rows) / n, prose_success=sum(r.prose_rate for r in rows) / n,
        code_mode_code_rate=sum(r.code_mode_used_code for r in rows) / sum(r.k for r in rows),
        prose_mode_code_rate=sum(r.prose_mode_used_code for r in rows) / sum(r.k for r in rows),
        labelled=len(labelled), oracle_code=sum(r.oracle == "code" for r in labelled),
        oracle_prose=sum(r.oracle == "prose" for r in labelled),
        selection_accuracy=selection_accuracy([r.choice for r in rows], [r.oracle for r in rows]),
        over_code=sum(r.oracle == "prose" and r.choice == "code" for r in labelled),
        under_code=sum(r.oracle == "code" and r.choice == "prose" for r in labelled))


@dataclass(frozen=True, kw_only=True)
class Report:
    """The rows and their aggregates. It holds no timings, so evaluating a checkpoint twice gives equal reports (as
    long as each sequence's floats do not depend on the batch it decodes in: see `_rollouts`)."""

    options: EvalOptions
    meta: Mapping[str, Any]  # where the model and data came from, as given
    rows: list[ProblemResult]
    overall: Summary
    by_source: dict[str, Summary]
    by_level: dict[int, Summary]  # problems with a level only

    @classmethod
    def build(cls, rows: Sequence[ProblemResult], options: EvalOptions, meta: Mapping[str, Any]) -> Report:
        sources = sorted({r.source for r in rows})
        levels = sorted({r.level for r in rows if r.level is not None})
        return cls(options=options, meta=dict(meta), rows=list(rows), overall=summarize(rows),
                   by_source={s: summarize([r for r in rows if r.source == s]) for s in sources},
                   by_level={lv: summarize([r for r in rows if r.level == lv]) for lv in levels})

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": dataclasses.asdict(self.options),
            "meta": dict(self.meta),
            "oracle": f"prose if its success rate over k={self.options.k} samples is > {self.options.threshold}, "
                      f"else code if its rate is > {self.options.threshold}, else unlabelled",
            "overall": dataclasses.asdict(self.overall),
            "by_source": {s: dataclasses.asdict(v) for s, v in self.by_source.items()},
            "by_level": {str(lv): dataclasses.asdict(v) for lv, v in self.by_level.items()},
            "problems": [r.to_dict() for r in self.rows],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n"

    def write(self, path: str | os.PathLike) -> Path:
        """Write the JSON report atomically (a reader never sees half a file); returns the path."""
        path = Path(path)
        if not path.parent.is_dir():
            raise ValueError(f"--out {path}: directory {path.parent} does not exist")
        text = self.to_json()
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def table(self) -> str:
        head = (f"{'group':<20} {'n':>5} {'pass@1':>7} {'code use':>8} {'code succ':>9} {'prose succ':>10} "
                f"{'labelled':>8} {'sel acc':>7}")
        groups = [("all", self.overall)] + [(f"source={s}", v) for s, v in self.by_source.items()] + \
                 [(f"level={lv}", v) for lv, v in self.by_level.items()]
        lines = [head]
        for name, s in groups:
            acc = "-" if s.selection_accuracy is None else f"{s.selection_accuracy:.3f}"
            lines.append(f"{name[:20]:<20} {s.n:>5} {s.pass_at_1:>7.3f} {s.code_use_rate:>8.3f} "
                         f"{s.code_success:>9.3f} {s.prose_success:>10.3f} {s.labelled:>8} {acc:>7}")
        return "\n".join(lines)


# -- the evaluation --

def evaluate(model: str | os.PathLike | RolloutModel, problems: Iterable[Problem], *,
             options: EvalOptions | None = None, sandbox: Sandbox | None = None,
             meta: Mapping[str, Any] | None = None, dist: Dist | None = None, **fields: Any) -> Report:
    """Evaluate `model` (a checkpoint directory, or a `RolloutModel`) on `problems`; see the module docstring.

    Options come from `options` (default `EvalOptions()`) with `fields` overriding it, e.g. `k=2`. A `sandbox`
    given is used and left open; otherwise one is started with `sandbox_timeout_s` and closed. `meta` goes into the
    report as is (the CLI records the model and data paths there). With a `dist` (torchrun), each rank evaluates its
    share of the problems (`Dist.share`) and every rank gets the whole report: a problem's samples are seeded by the
    problem alone, so its row is the one a single process would write.
    """
    base = EvalOptions() if options is None else options
    if not isinstance(base, EvalOptions):
        raise ValueError(f"options must be an EvalOptions, got {type(base).__name__}")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(EvalOptions)})
    if unknown:
        raise ValueError(f"unknown evaluate option(s) {unknown}; EvalOptions has "
                         f"{[f.name for f in dataclasses.fields(EvalOptions)]}")
    opts = dataclasses.replace(base, **fields)
    problems = list(problems)
    if not problems:
        raise ValueError("evaluate needs at least one problem")
    for i, p in enumerate(problems):
        if not isinstance(p, Problem):
            raise ValueError(f"problems[{i}] must be a Problem (see acim_fast.data.load_problems), got "
                             f"{type(p).__name__}")
    meta = dict(meta or {})
    if isinstance(model, RolloutModel):
        lm = model
    else:
        lm = load_rollout_model(model)
        meta.setdefault("model", str(model))
    ranks = Ranks(dist)
    share = ranks.share(problems)
    rows = ranks.gather_shares(_rows(lm, share, opts, sandbox) if share else [])
    return Report.build(rows, opts, meta)


def _rows(lm: RolloutModel, problems: list[Problem], opts: EvalOptions, sandbox: Sandbox | None) -> list[ProblemResult]:
    """The report rows of `problems`, through `sandbox` or (None) one of its own, closed after."""
    own = sandbox is None
    if own:
        sandbox = Sandbox(SandboxOptions(timeout_s=opts.sandbox_timeout_s))
    try:
        records = _rollouts(lm, problems, opts, sandbox)
    finally:
        if own:
            sandbox.close()
    per = 1 + 2 * opts.k
    return [_row(p, records[i * per:(i + 1) * per], opts, lm.decode) for i, p in enumerate(problems)]


def _rollouts(lm: RolloutModel, problems: list[Problem], opts: EvalOptions, sandbox: Sandbox) -> list[RolloutRecord]:
    """Per problem, in this order: the greedy autonomous rollout, k forced-code ones, k forced-prose ones; all
    problems' rollouts in one continuous batch. Reports repeat only if each sequence's floats do not depend on which
    sequences share its steps (cells finish after varying wall-clock times): so on the CPU; other kernels may differ
    in the last bit, which can flip a near-tie."""
    fence = lm.fence_ids
    prompts = []
    for p in problems:
        # Forced code: the trigger's ids, encoded apart, end the prompt (the prompt ends where sampling starts, as
        # prompts.py requires), so max_new_tokens bounds only what the model writes and the verifier reads only that.
        ids, trigger = lm.prompt_ids(p.problem)
        prompts.append((ids, ids + trigger))
    longest = max(len(c) for _, c in prompts)
    context = lm.model.config.hf.get("max_position_embeddings")
    if isinstance(context, int) and longest + opts.max_new_tokens > context:
        # Past its trained context a model's output is noise: that would be scored as the model's failure.
        raise ValueError(f"EvalOptions.max_new_tokens {opts.max_new_tokens} + the longest prompt ({longest} tokens, "
                         f"code trigger included) exceed the model's max_position_embeddings {context}")
    total = len(problems) * (1 + 2 * opts.k)
    engine = rollout_engine(lm, seq_tokens=longest + opts.max_new_tokens, pool_seqs=min(total, opts.max_num_seqs),
                            max_num_seqs=opts.max_num_seqs, detokenize=lm.decode,
                            enable_prefix_caching=True)  # the 2k+1 rollouts of a problem share its prompt's blocks
    loop = RolloutLoop(engine, sandbox, encode=lm.encode, decode=lm.decode, max_code_calls=opts.max_code_calls,
                       max_tool_tokens=opts.max_tool_tokens)
    base = SamplingParams(temperature=opts.temperature, top_p=opts.top_p, max_new_tokens=opts.max_new_tokens,
                          stop_token_ids=lm.stop_token_ids)
    greedy = dataclasses.replace(base, temperature=0.0, top_p=1.0, seed=0)
    # Each sample is seeded by `seed`, the problem's source and id, the mode and its index: a problem's samples do
    # not depend on which other problems are evaluated, nor on their order. Forced prose: the fence-start ids banned.
    for p, (plain, triggered) in zip(problems, prompts):
        loop.add(plain, p.answer, greedy)
        for i in range(opts.k):
            code_seed = stable_seed(opts.seed, p.source, p.id, "code", i)
            loop.add(triggered, p.answer, dataclasses.replace(base, seed=code_seed))
        for i in range(opts.k):
            prose_seed = stable_seed(opts.seed, p.source, p.id, "prose", i)
            loop.add(plain, p.answer, dataclasses.replace(base, seed=prose_seed, banned_token_ids=fence))
    with tqdm.tqdm(total=total, desc="eval rollouts", disable=not sys.stderr.isatty()) as bar:
        while loop.has_unfinished():
            bar.update(len(loop.step()))
    return loop.run_until_done()  # nothing left to step: verifies and returns the records in submission order


def _row(problem: Problem, records: list[RolloutRecord], opts: EvalOptions,
         decode: Callable[[list[int]], str]) -> ProblemResult:
    auto, code, prose = records[0], records[1:1 + opts.k], records[1 + opts.k:]
    assert len(prose) == opts.k
    code_correct = sum(r.reward == 1.0 for r in code)
    prose_correct = sum(r.reward == 1.0 for r in prose)
    return ProblemResult(
        id=problem.id, source=problem.source, level=problem.level, answer=problem.answer,
        correct=auto.reward == 1.0, used_code=auto.used_code, code_calls=auto.code_calls,
        finish_reason=auto.finish_reason, predicted=auto.answer, response=decode(auto.response_ids),
        k=opts.k, code_correct=code_correct, prose_correct=prose_correct,
        code_mode_used_code=sum(r.used_code for r in code), prose_mode_used_code=sum(r.used_code for r in prose),
        oracle=oracle_decision(code_correct / opts.k, prose_correct / opts.k, opts.threshold),
        choice="code" if auto.used_code else "prose")


# -- the processes --

# -- command line --

def _parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, EvalOptions]:
    parser = argparse.ArgumentParser(prog="python -m acim_fast.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory (with its tokenizer)")
    parser.add_argument("--data", required=True, help="problems: a jsonl file, a bundled benchmark (math500, gsm8k, "
                        "aime24, amc23) or hf:<name>[:<config>][:<split>]")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N problems only")
    parser.add_argument("--out", default=None, help="write the JSON report here (atomically)")
    parser.add_argument("--device", default="cpu", help="torch device of the model")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    parser.add_argument("--rollout-backend", "--rollout_backend", dest="backend", choices=("ours", "vllm"),
                        default="ours", help="rollout engine: ours (the paged sampler) | vllm (default ours)")
    isolation = next(f for f in dataclasses.fields(SandboxConfig) if f.name == "isolation")
    parser.add_argument("--sandbox.isolation", "--sandbox-isolation", dest="isolation", choices=ISOLATIONS,
                        default=isolation.default, help=f"{isolation.metadata['help']} (default {isolation.default})")
    add_field_flags(parser, EvalOptions, EvalOptions())
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.out is not None and not Path(args.out).parent.is_dir():  # found out now, not after the evaluation
        raise ValueError(f"--out {args.out}: directory {Path(args.out).parent} does not exist")
    options = EvalOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalOptions)
                             if hasattr(args, f.name)})
    return args, options


def main(argv: Sequence[str] | None = None) -> Report:
    """The CLI (see the module docstring); prints the table and the elapsed time (on stderr), returns the report."""
    args, options = _parse(argv)
    problems = load_problems(args.data)[:args.limit]
    start = time.monotonic()
    ranks = Ranks(from_env())  # under torchrun: every rank evaluates its share with its own copy of the model
    policy = load_rollout_model(args.model, dtype=args.dtype, device=ranks.device(args.device))
    with contextlib.ExitStack() as stack:  # a vLLM engine (one per rank) shuts down before the process group is left
        sandbox = stack.enter_context(Sandbox(SandboxOptions(timeout_s=options.sandbox_timeout_s,
                                                             isolation=args.isolation)))
        if args.backend == "vllm":
            backend = stack.enter_context(contextlib.closing(VLLMBackend(
                args.model, dtype=args.dtype, per_rank=ranks.world > 1)))
            policy = dataclasses.replace(policy, backend=backend)
        report = evaluate(policy, problems, options=options, sandbox=sandbox, dist=ranks.dist,
                          meta={"model": args.model, "data": args.data, "limit": args.limit, "backend": args.backend})
    if ranks.is_main:
        print(report.table())
        if args.out is not None:
            print(f"report: {report.write(args.out)}")
        print(f"evaluated {len(problems)} problems in {time.monotonic() - start:.1f} s", file=sys.stderr)
    ranks.close()
    return report


if __name__ == "__main__":
    main()
