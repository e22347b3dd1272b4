"""The E-step: explore both decisions for each problem, estimate how well each works, and build the training buffer.

What it does, per problem (`explore`):
- Rollouts forked from ONE shared prompt: a first unguided rollout is added to the engine; once its prompt is
  computed, every other rollout of the problem is forked from it at the end of the prompt, so the prompt's KV blocks
  are computed once and shared copy-on-write. Per problem: `k_free` unguided rollouts (the model decides, estimating
  pi(code|x)), `k_code` with code forced by the code prefix of `prompts.build_prompt` (its ids appended as forced
  response tokens: loss mask 0, not the model's choice; the first forced-code rollout computes them and the others
  fork from it) and `k_prose` with prose forced by banning the fence-start ids at every step (`RolloutModel.fence_ids`).
  With `algo="grpo"` all `k_free + k_code + k_prose` are unguided.
- Decision-point forking (`decision_fork`): when a rollout closes a python cell, before it runs, a sibling is forked
  at the token where the cell opened, forbidden to open it there and banned from opening any cell afterwards (it
  continues in prose). "first": at a rollout's first cell only; "every": at each cell; at most `fork_cap` siblings
  per problem. Siblings share the prefix KV blocks, so each gives a paired sample of "code here" vs "no code here"
  for the cost of its own suffix. A sibling's decision is "prose" when it forked at the first cell.
- Estimates: the decision of a rollout is "code" iff it opened a python cell. pi_hat(code|x) = the share of unguided
  rollouts that did (0.5 when there are none); Q_hat(x, c) = mean reward of ALL rollouts whose decision is c (forced,
  unguided and siblings alike; 0 with no such rollout).
- The reference strategy `reference_strategy` (`s_star`), from w_c = pi_hat(c|x) Q_hat(x,c) with pi_hat floored at
  `pi_floor` (so that a decision the model never takes can still win when it alone succeeds):
  "posterior" s*(code) = w_code / (w_code + w_prose); "tempered" softmax(alpha * w); "hardmax" 1 for the larger w,
  ties to prose (when both work equally, the answer without a tool call is preferred, as evaluation's oracle does).
  With w_code = w_prose = 0 there is no evidence: None. A fourth form, "value", leaves pi_hat out: code iff
  Q_hat(x, code) > Q_hat(x, prose) + `margin`. The forms weighted by pi_hat reinforce whatever the model already
  does more often (see the README's experiment); "value" asks only which decision works, prose unless code is
  clearly better.
- Dropping: a problem whose rollouts all fail carries no signal (`drop="all_fail"`); with `drop="uniform"` so does one
  whose rollouts all got the same reward. (A problem that every rollout solves still teaches the decision through the
  cross-entropy term: s* prefers prose there.)
- Advantages: rewards whitened within a group, (r - mean) / (std + 1e-6), 0 when the group's rewards are equal;
  groups: all rollouts of the problem (`advantage_group="problem"`) or those of one decision ("decision").
- The buffer (`build_buffer`): per kept problem `buffer_per_problem` samples whose decision mix follows s*: round(s* B)
  code samples and the rest prose, drawn without replacement from that decision's rollouts, then repeated in the same
  shuffled order when a decision has fewer rollouts than its share (so the mix holds). `grpo`: every rollout of every
  kept problem, once.
- Samples (`Sample`): the prompt ids and the response as the trainer sees it. With `keep_trigger=False` (default) the
  forced code prefix is cut out, so a forced-code sample reads as a response the model chose by itself (the prompt
  carries no methodology instruction in training); its behaviour log-probs stay those of the sampler, which saw the
  prefix: the importance ratio of the M-step corrects for that (`off_context` marks such samples). With
  `keep_trigger=True` the prefix stays as masked response tokens. `decision_mask` flags the decision token for the
  M-step's cross-entropy (`LossConfig.sft_coef`): for a code sample the token where its first code fence starts; for
  a prose sample the token where it chose prose: its first response token (after a cut prefix), or for a sibling the
  token sampled where the cell was forbidden.

What it does not do: train, recompute log-probs with the training forward (the M-step does, see
`mstep.recompute_logprobs`), or choose problems (the caller passes them).
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

import tqdm

from acim_fast.data import Problem
from acim_fast.common.fields import Choice, check_int, option
from acim_fast.execution.rollout_model import RolloutModel
from acim_fast.execution.rollout import RolloutLoop, RolloutRecord
from acim_fast.common.hashing import stable_seed
from acim_fast.engine.sampling import SamplingParams
from acim_fast.execution.sandbox import Sandbox



class Algo(Choice):
    """The training algorithm: AutoCode's EM, or the GRPO baseline at the same rollout budget."""

    EM = "em"
    GRPO = "grpo"
FORKS = ("off", "first", "every")
FORMS = ("posterior", "tempered", "hardmax", "value")
DROPS = ("all_fail", "uniform")
GROUPS = ("problem", "decision")
_BLOCK_SIZE = 16


@dataclass(kw_only=True, slots=True)
class EStepConfig:
    """What the E-step samples and how it turns rollouts into a buffer (see the module docstring)."""

    k_code: int = option(8, "rollouts per problem with code forced by the code prefix")
    k_prose: int = option(8, "rollouts per problem with prose forced (fence-start tokens banned)")
    k_free: int = option(4, "unguided rollouts per problem (estimate pi(code|x)); grpo samples all k's unguided")
    temperature: float = option(1.0, "sampling temperature; must equal loss.temperature (behaviour log-probs)")
    max_new_tokens: int = option(200, "what a rollout may write, tool output included (the code prefix is extra)")
    decision_fork: str = option("first", "fork a prose sibling where a cell opens: off | first (first cell) | every")
    fork_cap: int = option(4, "siblings per problem at most")
    s_star: str = option("hardmax", "reference strategy: posterior | tempered | hardmax | value")
    alpha: float = option(4.0, "inverse temperature of the tempered reference strategy")
    margin: float = option(0.1, "the value form picks code only when its success rate beats prose's by more than this")
    pi_floor: float = option(0.1, "pi_hat(c|x) is clipped to [pi_floor, 1 - pi_floor] in the reference strategy")
    drop: str = option("all_fail", "problems without signal: all_fail (every rollout failed) | uniform (equal rewards)")
    buffer_per_problem: int = option(8, "training samples per kept problem (em); their decision mix follows s*")
    advantage_group: str = option("problem", "rewards are whitened over: problem (all rollouts) | decision")
    keep_trigger: bool = option(False, "keep the forced code prefix in training samples (masked) instead of cutting it")
    max_code_calls: int = option(2, "python cells run per rollout")
    max_tool_tokens: int = option(64, "tokens of one appended output block")
    sandbox_timeout_s: float = option(5.0, "wall-clock limit of one python cell")
    max_num_seqs: int = option(256, "rollouts decoded together; the KV pool is sized for this many")

    def __post_init__(self) -> None:
        for name in ("k_code", "k_prose", "fork_cap", "max_code_calls"):
            check_int(self, name, 0)
        check_int(self, "k_free", 1)  # the first unguided rollout is the one the others fork from
        for name in ("max_new_tokens", "buffer_per_problem", "max_tool_tokens", "max_num_seqs"):
            check_int(self, name, 1)
        if self.k_code + self.k_prose + self.k_free < 2:
            raise ValueError("EStepConfig: k_code + k_prose + k_free must be >= 2 (advantages need a group)")
        for name, allowed in (("decision_fork", FORKS), ("s_star", FORMS), ("drop", DROPS),
                              ("advantage_group", GROUPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"EStepConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise ValueError(f"EStepConfig.temperature must be > 0 (greedy rollouts explore nothing), "
                             f"got {self.temperature}")
        if not self.alpha > 0:
            raise ValueError(f"EStepConfig.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"EStepConfig.margin must be in [0, 1), got {self.margin}")
        if not 0 <= self.pi_floor < 0.5:
            raise ValueError(f"EStepConfig.pi_floor must be in [0, 0.5), got {self.pi_floor}")
        if not self.sandbox_timeout_s >= 0.01:
            raise ValueError(f"EStepConfig.sandbox_timeout_s must be >= 0.01, got {self.sandbox_timeout_s}")


# -- the pure parts --

def reference_strategy(pi_code: float, q_code: float, q_prose: float, *, form: str = "hardmax",
                       alpha: float = 4.0, pi_floor: float = 0.1, margin: float = 0.1) -> float | None:
    """s*(code | x) from pi_hat(code|x) and Q_hat(x, .); None when neither decision has any weight."""
    for name, value in (("pi_code", pi_code), ("q_code", q_code), ("q_prose", q_prose)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    pi = min(max(pi_code, pi_floor), 1 - pi_floor)
    w_code, w_prose = pi * q_code, (1 - pi) * q_prose
    if form == "value":
        return None if q_code == q_prose == 0 else float(q_code > q_prose + margin)
    if w_code == 0 and w_prose == 0:
        return None
    if form == "posterior":
        return w_code / (w_code + w_prose)
    if form == "tempered":
        return 1 / (1 + math.exp(-alpha * (w_code - w_prose)))
    return 1.0 if w_code > w_prose else 0.0


def whiten(rewards: Sequence[float], groups: Sequence[Any]) -> list[float]:
    """(r - mean) / (std + 1e-6) within each group (population std); 0 for a group whose rewards are all equal."""
    if len(rewards) != len(groups):
        raise ValueError(f"rewards and groups differ in length: {len(rewards)} != {len(groups)}")
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = [0.0] * len(rewards)
    for idx in members.values():
        values = [rewards[i] for i in idx]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        if std > 0:
            for i in idx:
                out[i] = (rewards[i] - mean) / (std + 1e-6)
    return out


def subsample(pools: dict[str, list[int]], s_code: float, size: int, rng: random.Random) -> list[int]:
    """`size` indices whose decision mix follows s_code: round(s_code * size) from pools["code"], the rest from
    pools["prose"]; without replacement, then cycling through the same shuffled order if a pool is short. A share
    whose pool is empty is left out (the buffer of that problem is then smaller)."""
    n_code = round(s_code * size)
    chosen: list[int] = []
    for decision, n in (("code", n_code), ("prose", size - n_code)):
        pool = list(pools.get(decision, ()))
        if n == 0 or not pool:
            continue
        rng.shuffle(pool)
        chosen += [pool[i % len(pool)] for i in range(n)]
    return chosen


# -- exploration --

@dataclass(frozen=True, slots=True)
class Sample:
    """One training sequence. Response lists are aligned; tool-output (and kept prefix) tokens have loss mask 0."""

    problem: int  # index into the problems given to `explore`
    origin: str  # "free" | "code" | "prose" (forced) | "fork" (a decision-point sibling)
    decision: str  # "code" | "prose"
    prompt_ids: list[int]
    response_ids: list[int]
    behaviour_logprobs: list[float]
    loss_mask: list[int]
    decision_mask: list[int]
    reward: float
    advantage: float
    off_context: bool  # the sampler saw a forced prefix this sample no longer holds

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


@dataclass(frozen=True, slots=True)
class ProblemStats:
    key: str  # the problem's source and id: what its random choices are seeded with
    pi_code: float
    q_code: float
    q_prose: float
    n_code: int  # rollouts whose decision was code
    n_prose: int
    s_code: float | None  # s*(code|x); None: no evidence
    dropped: bool


@dataclass
class EStepResult:
    samples: list[Sample]  # every rollout (the buffer draws from these)
    stats: list[ProblemStats]  # one per problem
    buffer: list[Sample]  # what the M-step trains on, in problem order
    counters: dict[str, int]  # sums over rollouts and engine steps (see `summarize`)
    time_s: float

    @property
    def metrics(self) -> dict[str, float]:
        return {**summarize(self.samples, self.stats, self.buffer, self.counters), "estep/time_s": self.time_s}

    @staticmethod
    def merge(parts: Sequence[EStepResult]) -> EStepResult:
        """The result of exploring all problems, from the results of world = len(parts) ranks where rank r explored
        problems r, r + world, r + 2 world, ... (a problem's rollouts and buffer share depend only on it, so the
        merged samples, stats and buffer are those of one process exploring them all; wall time is the slowest)."""
        world = len(parts)

        def glob(r: int, s: Sample) -> Sample:
            return replace(s, problem=r + s.problem * world)

        stats = [parts[g % world].stats[g // world] for g in range(sum(len(p.stats) for p in parts))]
        counters = {k: sum(p.counters[k] for p in parts) for k in parts[0].counters}
        return EStepResult(
            samples=sorted((glob(r, s) for r, p in enumerate(parts) for s in p.samples), key=lambda s: s.problem),
            stats=stats, buffer=sorted((glob(r, s) for r, p in enumerate(parts) for s in p.buffer),
                                       key=lambda s: s.problem),
            counters=counters, time_s=max(p.time_s for p in parts))


@dataclass(eq=False)
class _Origin:
    problem: int
    kind: str  # see Sample.origin
    prefix: int  # forced response tokens at the start (the code prefix), cut from the sample unless kept
    fork_at: int | None = None  # response index where a sibling was forked


def explore(policy: RolloutModel, problems: Sequence[Problem], cfg: EStepConfig, *, algo: str = "em",
            sandbox: Sandbox, seed: int = 0, iteration: int = 0) -> EStepResult:
    """Run the E-step on `problems` (see the module docstring). Every random choice is a function of `seed`,
    `iteration` and each problem's source and id, so a problem's rollouts do not depend on the other problems."""
    algo = Algo.parse(algo, "algo")
    problems = list(problems)
    if not problems:
        raise ValueError("explore needs at least one problem")
    start = time.monotonic()
    records, origins, engine_stats = _rollouts(policy, problems, cfg, algo, sandbox, seed, iteration)
    per_problem: list[list[int]] = [[] for _ in problems]
    for i, o in enumerate(origins):
        per_problem[o.problem].append(i)

    samples: list[Sample | None] = [None] * len(records)
    stats: list[ProblemStats] = []
    for p, idx in enumerate(per_problem):
        decisions = ["code" if records[i].used_code else "prose" for i in idx]
        rewards = [records[i].reward for i in idx]
        free = [records[i].used_code for i in idx if origins[i].kind == "free"]
        pi_code = sum(free) / len(free) if free else 0.5
        q = {c: [r for r, d in zip(rewards, decisions) if d == c] for c in ("code", "prose")}
        q_code = sum(q["code"]) / len(q["code"]) if q["code"] else 0.0
        q_prose = sum(q["prose"]) / len(q["prose"]) if q["prose"] else 0.0
        if algo == "grpo":
            s_code = None
            dropped = min(rewards) == max(rewards)  # no advantage anywhere: GRPO learns nothing from it
        else:
            s_code = reference_strategy(pi_code, q_code, q_prose, form=cfg.s_star, alpha=cfg.alpha,
                                        pi_floor=cfg.pi_floor, margin=cfg.margin)
            dropped = (s_code is None or max(rewards) == 0
                       or (cfg.drop == "uniform" and min(rewards) == max(rewards)))
        stats.append(ProblemStats(key=f"{problems[p].source}/{problems[p].id}", pi_code=pi_code, q_code=q_code,
                                  q_prose=q_prose, n_code=len(q["code"]), n_prose=len(q["prose"]), s_code=s_code,
                                  dropped=dropped))
        groups = decisions if cfg.advantage_group == "decision" and algo == "em" else [0] * len(idx)
        for i, d, a in zip(idx, decisions, whiten(rewards, groups)):
            samples[i] = _sample(records[i], origins[i], d, a, cfg.keep_trigger)

    buffer = build_buffer(samples, stats, cfg, algo=algo, seed=seed, iteration=iteration)
    counters = {"estep/tool_tokens": sum(r.tool_tokens - o.prefix for r, o in zip(records, origins)),
                "estep/cell_errors": sum(r.errors + r.timeouts for r in records),
                **{f"estep/{k}": engine_stats[k]
                   for k in ("prefix_reused_tokens", "prefill_tokens", "recomputed_tokens")}}
    return EStepResult(samples=samples, stats=stats, buffer=buffer, counters=counters,
                       time_s=time.monotonic() - start)


def build_buffer(samples: Sequence[Sample], stats: Sequence[ProblemStats], cfg: EStepConfig, *, algo: str,
                 seed: int, iteration: int) -> list[Sample]:
    """The training buffer (see the module docstring), in problem order."""
    buffer: list[Sample] = []
    by_problem: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_problem.setdefault(s.problem, []).append(i)
    for p, idx in sorted(by_problem.items()):
        if stats[p].dropped:
            continue
        if algo == "grpo":
            buffer += [samples[i] for i in idx]
            continue
        pools = {c: [i for i in idx if samples[i].decision == c] for c in ("code", "prose")}
        rng = random.Random(stable_seed("buffer", seed, iteration, stats[p].key))
        buffer += [samples[i] for i in subsample(pools, stats[p].s_code, cfg.buffer_per_problem, rng)]
    return buffer


def _sample(record: RolloutRecord, origin: _Origin, decision: str, advantage: float, keep_trigger: bool) -> Sample:
    cut = 0 if keep_trigger else origin.prefix
    response = record.response_ids[cut:]
    mask = record.loss_mask[cut:]
    decision_mask = [0] * len(response)
    if decision == "code":
        at = record.first_code_token - cut
    elif origin.fork_at is not None:
        at = origin.fork_at - cut
    else:
        at = origin.prefix - cut  # the first token the model chose
    if 0 <= at < len(response) and mask[at]:
        decision_mask[at] = 1
    return Sample(problem=origin.problem, origin=origin.kind, decision=decision, prompt_ids=list(record.prompt_ids),
                  response_ids=list(response), behaviour_logprobs=list(record.behaviour_logprobs[cut:]),
                  loss_mask=list(mask), decision_mask=decision_mask, reward=record.reward, advantage=advantage,
                  off_context=cut > 0)


def _rollouts(policy: RolloutModel, problems: list[Problem], cfg: EStepConfig, algo: str, sandbox: Sandbox, seed: int,
              iteration: int) -> tuple[list[RolloutRecord], list[_Origin], dict[str, int]]:
    """Every rollout of every problem, with where each came from. A problem's whole group is admitted while fewer
    than `max_num_seqs` rollouts are in flight, so the batch stays full; the pool is sized for `max_num_seqs`
    sequences, and the engine preempts (and later recomputes) the youngest if the overflow outgrows it."""
    k_free, k_code, k_prose = ((cfg.k_free + cfg.k_code + cfg.k_prose, 0, 0) if algo == "grpo"
                               else (cfg.k_free, cfg.k_code, cfg.k_prose))
    group = k_free + k_code + k_prose
    prompts = [policy.prompt_ids(p.problem) for p in problems]
    prefix_len = max(len(t) for _, t in prompts)
    per_seq = -(-(max(len(ids) for ids, _ in prompts) + prefix_len + cfg.max_new_tokens) // _BLOCK_SIZE)
    max_num_seqs = max(cfg.max_num_seqs, group)
    engine = policy.engine(num_blocks=per_seq * max_num_seqs, block_size=_BLOCK_SIZE, max_num_seqs=max_num_seqs,
                           detokenize=policy.decode)
    fence = policy.fence_ids
    base = SamplingParams(temperature=cfg.temperature, train_temperature=cfg.temperature,
                          max_new_tokens=cfg.max_new_tokens, stop_token_ids=policy.stop_token_ids)
    prose_params = replace(base, banned_token_ids=fence)

    def code_params(trigger: list[int]) -> SamplingParams:
        # The code prefix is extra: every mode leaves the model the same max_new_tokens of its own.
        return replace(base, max_new_tokens=base.max_new_tokens + len(trigger))

    origins: dict[int, _Origin] = {}
    siblings = [0] * len(problems)

    def on_cell(seq_id: int, open_at: int, index: int) -> None:
        origin = origins[seq_id]
        if (algo == "grpo" or cfg.decision_fork == "off" or (cfg.decision_fork == "first" and index > 0)
                or siblings[origin.problem] >= cfg.fork_cap or origin.kind == "fork"):
            return
        params = loop.engine.params(seq_id)
        prose = replace(params, banned_token_ids=params.banned_token_ids + fence)
        prompt_len = len(loop.engine.output(seq_id).prompt_ids)
        (child,) = loop.fork(seq_id, 1, at=prompt_len + open_at, forbid=fence, params=prose)
        origins[child] = _Origin(problem=origin.problem, kind="fork", prefix=origin.prefix, fork_at=open_at)
        siblings[origin.problem] += 1

    loop = RolloutLoop(engine, sandbox, encode=policy.encode, decode=policy.decode,
                       max_code_calls=cfg.max_code_calls, max_tool_tokens=cfg.max_tool_tokens, on_cell=on_cell)
    bar = tqdm.tqdm(total=len(problems) * group, desc=f"E-step rollouts ({algo})", disable=not sys.stderr.isatty())
    waiting = list(range(len(problems)))  # problems not started
    # Rollouts still to fork: from a root once its prompt is computed, from a code root once its prefix is.
    roots: dict[int, int] = {}  # root seq id -> problem
    code_roots: dict[int, int] = {}  # first forced-code rollout -> problem
    finished: set[int] = set()

    def spawn(parent: int, p: int, n: int, at: int, params: SamplingParams, kind: str, append: list[int]) -> list[int]:
        """n rollouts of problem p forked from `parent` at `at` (started fresh if it already ended), each with
        `append` added as forced response tokens."""
        ids, trigger = prompts[p]
        if n == 0:
            return []
        if parent in finished:  # it ended at its first sampled token: nothing to fork from
            problem = problems[p]
            children = [loop.add(ids, problem.answer, replace(params, seed=stable_seed(
                "estep", seed, iteration, problem.source, problem.id, kind, j))) for j in range(n)]
            append = trigger if kind == "code" else []
        else:
            children = loop.fork(parent, n, at=at, params=params)
        for child in children:
            if append:
                engine.append(child, append)  # loss mask 0: not the model's choice
            origins[child] = _Origin(problem=p, kind=kind, prefix=len(trigger) if kind == "code" else 0)
        return children

    def pending() -> int:
        return (group - 1) * len(roots) + (k_code - 1) * len(code_roots)

    while waiting or roots or code_roots or loop.has_unfinished():
        # Rollouts in flight: started (origins, siblings included) and not finished, plus those still to fork. A
        # problem is admitted while fewer than max_num_seqs are in flight: the batch stays full, and the engine holds
        # the overflow (at most one group) until sequences finish.
        while waiting and len(origins) - len(finished) + pending() < max_num_seqs:
            p = waiting.pop(0)
            problem = problems[p]
            params = replace(base, seed=stable_seed("estep", seed, iteration, problem.source, problem.id))
            root = loop.add(prompts[p][0], problem.answer, params)
            origins[root] = _Origin(problem=p, kind="free", prefix=0)
            roots[root] = p
        done = loop.step()
        finished.update(done)
        bar.total = len(origins) + pending() + len(waiting) * group  # siblings add to it
        bar.update(len(done))
        for root, p in list(roots.items()):
            # Fork the group once the root's prompt is computed (it sampled its first token), sharing those blocks.
            if not engine.output(root).token_ids and root not in finished:
                continue
            del roots[root]
            ids, trigger = prompts[p]
            spawn(root, p, k_free - 1, len(ids), base, "free", [])
            spawn(root, p, k_prose, len(ids), prose_params, "prose", [])
            if k_code:
                (code_root,) = spawn(root, p, 1, len(ids), code_params(trigger), "code", trigger)
                if k_code > 1:
                    code_roots[code_root] = p
        for code_root, p in list(code_roots.items()):
            # The other forced-code rollouts fork from the first once it has computed the prefix.
            ids, trigger = prompts[p]
            if len(engine.output(code_root).token_ids) <= len(trigger) and code_root not in finished:
                continue
            del code_roots[code_root]
            spawn(code_root, p, k_code - 1, len(ids) + len(trigger), code_params(trigger), "code", [])
    bar.close()
    records = loop.run_until_done()
    stats = dataclasses.asdict(engine.stats)
    return records, [origins[r.seq_id] for r in records], stats


def summarize(samples: Sequence[Sample], stats: Sequence[ProblemStats], buffer: Sequence[Sample],
              counters: dict[str, int]) -> dict[str, float]:
    """The E-step's metrics: counts, mean rewards per origin, the estimates and the buffer's make-up."""
    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    by_origin = {k: [s.reward for s in samples if s.origin == k] for k in ("free", "code", "prose", "fork")}
    kept = [s for s in stats if not s.dropped]
    return {
        "estep/problems": len(stats),
        "estep/rollouts": len(samples),
        "estep/siblings": len(by_origin["fork"]),
        "estep/sampled_tokens": sum(sum(s.loss_mask) for s in samples),
        "estep/reward_mean": mean([s.reward for s in samples]),
        **{f"estep/reward_{k}": mean(v) for k, v in by_origin.items()},
        "estep/pi_code": mean([s.pi_code for s in stats]),
        "estep/q_code": mean([s.q_code for s in stats if s.n_code]),
        "estep/q_prose": mean([s.q_prose for s in stats if s.n_prose]),
        "estep/s_code": mean([s.s_code for s in kept if s.s_code is not None]),
        "estep/dropped": len(stats) - len(kept),
        "estep/buffer": len(buffer),
        "estep/buffer_code_share": mean([s.decision == "code" for s in buffer]),
        **counters,
    }
