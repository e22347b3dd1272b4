"""The E-step: explore both decisions for each problem, estimate how well each works, and build the training buffer.

What it does (`explore`), per problem:
- Rollouts: `k_free` unguided (the model decides), `k_code` with code forced by the code prefix (appended as forced
  response tokens, loss mask 0), `k_prose` with prose forced by banning the fence-start ids at every step; with
  `algo=grpo` all of them unguided. All are forked from one root rollout once its prompt is computed (the forced-code
  ones from the first forced-code rollout once the prefix is), sharing KV blocks copy-on-write.
- Decision-point forking (`decision_fork` first | every, at most `fork_cap` per problem): when a rollout closes a
  python cell, before it runs, a sibling is forked where the cell opened and banned from opening any cell.
- Estimates: a rollout's decision is code iff it opened a python cell. pi_hat(code|x) = share of unguided rollouts
  that did (0.5 with none); Q_hat(x, c) = mean reward of all rollouts whose decision is c (0 with none).
- `reference_strategy` s*(code|x) from w_c = pi_hat(c|x) Q_hat(x, c), pi_hat clipped by `pi_floor`: posterior,
  tempered (softmax of alpha w), hardmax (ties to prose), or value (code iff Q_hat(code) > Q_hat(prose) + margin).
- Problems without signal are dropped (`drop`); rewards are whitened per problem or per decision
  (`advantage_group`); `build_buffer` draws `buffer_per_problem` samples per kept problem whose decision mix
  follows s* (grpo: every rollout once).
- `Sample`: the response as trained on. Unless `keep_trigger`, the forced code prefix is cut (`off_context` marks
  such samples: the M-step's importance ratio corrects for it). `decision_mask` flags the decision token: the first
  code fence of a code sample; for a prose sample its first chosen token, or for a sibling the token where the
  cell was forbidden.

What it does not do: train, recompute log-probs with the training forward (`mstep.recompute_logprobs`), or choose
problems (the caller passes them).
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

from acim_fast.common.fields import Choice, check_int, option
from acim_fast.common.hashing import stable_seed
from acim_fast.data import Problem
from acim_fast.engine.sampling import SamplingParams
from acim_fast.execution.prompts import Decision
from acim_fast.execution.rollout import RolloutLoop, RolloutRecord, rollout_engine
from acim_fast.execution.rollout_model import RolloutModel
from acim_fast.execution.sandbox import Sandbox


class Algo(Choice):
    """The training algorithm: AutoCode's EM, or the GRPO baseline at the same rollout budget."""

    EM = "em"
    GRPO = "grpo"


class Origin(Choice):
    """How a rollout was started: unguided, with code or prose forced, or as a decision-point sibling."""

    FREE = "free"
    CODE = "code"
    PROSE = "prose"
    FORK = "fork"


FORKS = ("off", "first", "every")
FORMS = ("posterior", "tempered", "hardmax", "value")
DROPS = ("all_fail", "uniform")
GROUPS = ("problem", "decision")


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
    for decision, n in ((Decision.CODE, n_code), (Decision.PROSE, size - n_code)):
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
    origin: Origin
    decision: Decision
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
    kind: Origin
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
    records, origins, engine_stats = _Rollouts(policy, problems, cfg, algo, sandbox, seed, iteration).run()
    per_problem: list[list[int]] = [[] for _ in problems]
    for i, o in enumerate(origins):
        per_problem[o.problem].append(i)

    samples: list[Sample | None] = [None] * len(records)
    stats: list[ProblemStats] = []
    for p, idx in enumerate(per_problem):
        decisions = [Decision.CODE if records[i].used_code else Decision.PROSE for i in idx]
        rewards = [records[i].reward for i in idx]
        free = [records[i].used_code for i in idx if origins[i].kind == Origin.FREE]
        pi_code = sum(free) / len(free) if free else 0.5
        q = {c: [r for r, d in zip(rewards, decisions) if d == c] for c in Decision}
        q_code = sum(q[Decision.CODE]) / len(q[Decision.CODE]) if q[Decision.CODE] else 0.0
        q_prose = sum(q[Decision.PROSE]) / len(q[Decision.PROSE]) if q[Decision.PROSE] else 0.0
        if algo == Algo.GRPO:
            s_code = None
            dropped = min(rewards) == max(rewards)  # no advantage anywhere: GRPO learns nothing from it
        else:
            s_code = reference_strategy(pi_code, q_code, q_prose, form=cfg.s_star, alpha=cfg.alpha,
                                        pi_floor=cfg.pi_floor, margin=cfg.margin)
            dropped = (s_code is None or max(rewards) == 0
                       or (cfg.drop == "uniform" and min(rewards) == max(rewards)))
        stats.append(ProblemStats(key=f"{problems[p].source}/{problems[p].id}", pi_code=pi_code, q_code=q_code,
                                  q_prose=q_prose, n_code=len(q[Decision.CODE]), n_prose=len(q[Decision.PROSE]),
                                  s_code=s_code, dropped=dropped))
        groups = decisions if cfg.advantage_group == "decision" and algo == Algo.EM else [0] * len(idx)
        for i, d, a in zip(idx, decisions, whiten(rewards, groups)):
            samples[i] = _sample(records[i], origins[i], d, a, cfg.keep_trigger)

    buffer = build_buffer(samples, stats, cfg, algo=algo, seed=seed, iteration=iteration)
    counters = {"estep/tool_tokens": sum(r.tool_tokens - o.prefix for r, o in zip(records, origins)),
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
        if algo == Algo.GRPO:
            buffer += [samples[i] for i in idx]
            continue
        pools = {c: [i for i in idx if samples[i].decision == c] for c in Decision}
        rng = random.Random(stable_seed("buffer", seed, iteration, stats[p].key))
        buffer += [samples[i] for i in subsample(pools, stats[p].s_code, cfg.buffer_per_problem, rng)]
    return buffer


def _sample(record: RolloutRecord, origin: _Origin, decision: Decision, advantage: float, keep_trigger: bool) -> Sample:
    cut = 0 if keep_trigger else origin.prefix
    response = record.response_ids[cut:]
    mask = record.loss_mask[cut:]
    decision_mask = [0] * len(response)
    if decision == Decision.CODE:
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


class _Rollouts:
    """Every rollout of one E-step, with where each came from (`run`). A problem's whole group is admitted while
    fewer than `max_num_seqs` rollouts are in flight, so the batch stays full; the pool is sized for `max_num_seqs`
    sequences, and the engine preempts (and later recomputes) the youngest if the overflow outgrows it."""

    def __init__(self, policy: RolloutModel, problems: list[Problem], cfg: EStepConfig, algo: Algo, sandbox: Sandbox,
                 seed: int, iteration: int) -> None:
        self.problems, self.cfg, self.algo, self.seed, self.iteration = problems, cfg, algo, seed, iteration
        total = cfg.k_free + cfg.k_code + cfg.k_prose
        self.k_free, self.k_code, self.k_prose = ((total, 0, 0) if algo == Algo.GRPO
                                                  else (cfg.k_free, cfg.k_code, cfg.k_prose))
        self.group = total
        self.prompts = [policy.prompt_ids(p.problem) for p in problems]  # (prompt ids, code prefix ids) each
        longest = max(len(ids) for ids, _ in self.prompts) + max(len(t) for _, t in self.prompts)
        self.max_num_seqs = max(cfg.max_num_seqs, self.group)
        self.engine = rollout_engine(policy, seq_tokens=longest + cfg.max_new_tokens, pool_seqs=self.max_num_seqs,
                                     max_num_seqs=self.max_num_seqs, detokenize=policy.decode)
        self.loop = RolloutLoop(self.engine, sandbox, encode=policy.encode, decode=policy.decode,
                                max_code_calls=cfg.max_code_calls, max_tool_tokens=cfg.max_tool_tokens,
                                on_cell=self._on_cell)
        self.fence = policy.fence_ids
        self.base = SamplingParams(temperature=cfg.temperature, train_temperature=cfg.temperature,
                                   max_new_tokens=cfg.max_new_tokens, stop_token_ids=policy.stop_token_ids)
        self.origins: dict[int, _Origin] = {}
        self.siblings = [0] * len(problems)  # decision-point siblings forked per problem
        self.waiting = list(range(len(problems)))  # problems not started
        # Rollouts still to fork: from a root once its prompt is computed, from a code root once its prefix is.
        self.roots: dict[int, int] = {}  # root seq id -> problem
        self.code_roots: dict[int, int] = {}  # first forced-code rollout -> problem
        self.finished: set[int] = set()

    def run(self) -> tuple[list[RolloutRecord], list[_Origin], dict[str, int]]:
        bar = tqdm.tqdm(total=len(self.problems) * self.group, desc=f"E-step rollouts ({self.algo})",
                        disable=not sys.stderr.isatty())
        while self.waiting or self.roots or self.code_roots or self.loop.has_unfinished():
            self._admit()
            done = self.loop.step()
            self.finished.update(done)
            bar.total = len(self.origins) + self._pending() + len(self.waiting) * self.group  # siblings add to it
            bar.update(len(done))
            self._fork_groups()
            self._fork_code_groups()
        bar.close()
        records = self.loop.run_until_done()
        return records, [self.origins[r.seq_id] for r in records], dataclasses.asdict(self.engine.stats)

    def _pending(self) -> int:
        """Rollouts not forked yet from the roots and code roots waiting for their prefix."""
        return (self.group - 1) * len(self.roots) + (self.k_code - 1) * len(self.code_roots)

    def _admit(self) -> None:
        """Start problems while fewer than max_num_seqs rollouts are in flight (started and not finished, siblings
        included, plus those still to fork): the batch stays full, and the engine holds the overflow (at most one
        group) until sequences finish."""
        while self.waiting and len(self.origins) - len(self.finished) + self._pending() < self.max_num_seqs:
            p = self.waiting.pop(0)
            problem = self.problems[p]
            params = replace(self.base, seed=stable_seed("estep", self.seed, self.iteration, problem.source,
                                                         problem.id))
            root = self.loop.add(self.prompts[p][0], problem.answer, params)
            self.origins[root] = _Origin(problem=p, kind=Origin.FREE, prefix=0)
            self.roots[root] = p

    def _fork_groups(self) -> None:
        """Fork each root's group once its prompt is computed (it sampled its first token), sharing those blocks."""
        for root, p in list(self.roots.items()):
            if not self.engine.output(root).token_ids and root not in self.finished:
                continue
            del self.roots[root]
            ids, trigger = self.prompts[p]
            self._spawn(root, p, self.k_free - 1, len(ids), self.base, Origin.FREE, [])
            self._spawn(root, p, self.k_prose, len(ids), replace(self.base, banned_token_ids=self.fence),
                        Origin.PROSE, [])
            if self.k_code:
                (code_root,) = self._spawn(root, p, 1, len(ids), self._code_params(trigger), Origin.CODE, trigger)
                if self.k_code > 1:
                    self.code_roots[code_root] = p

    def _fork_code_groups(self) -> None:
        """The other forced-code rollouts fork from the first once it has computed the prefix."""
        for code_root, p in list(self.code_roots.items()):
            ids, trigger = self.prompts[p]
            if len(self.engine.output(code_root).token_ids) <= len(trigger) and code_root not in self.finished:
                continue
            del self.code_roots[code_root]
            self._spawn(code_root, p, self.k_code - 1, len(ids) + len(trigger), self._code_params(trigger),
                        Origin.CODE, [])

    def _code_params(self, trigger: list[int]) -> SamplingParams:
        # The code prefix is extra: every mode leaves the model the same max_new_tokens of its own.
        return replace(self.base, max_new_tokens=self.base.max_new_tokens + len(trigger))

    def _spawn(self, parent: int, p: int, n: int, at: int, params: SamplingParams, kind: Origin,
               append: list[int]) -> list[int]:
        """n rollouts of problem p forked from `parent` at `at` (started fresh if it already ended), each with
        `append` added as forced response tokens."""
        if n == 0:
            return []
        ids, trigger = self.prompts[p]
        if parent in self.finished:  # it ended at its first sampled token: nothing to fork from
            problem = self.problems[p]
            children = [self.loop.add(ids, problem.answer, replace(params, seed=stable_seed(
                "estep", self.seed, self.iteration, problem.source, problem.id, kind, j))) for j in range(n)]
            append = trigger if kind == Origin.CODE else []
        else:
            children = self.loop.fork(parent, n, at=at, params=params)
        for child in children:
            if append:
                self.engine.append(child, append)  # loss mask 0: not the model's choice
            self.origins[child] = _Origin(problem=p, kind=kind, prefix=len(trigger) if kind == Origin.CODE else 0)
        return children

    def _on_cell(self, seq_id: int, open_at: int, index: int) -> None:
        """Decision-point forking: a sibling forked where the cell opened, banned from opening any cell."""
        origin = self.origins[seq_id]
        cfg = self.cfg
        if (self.algo == Algo.GRPO or cfg.decision_fork == "off" or (cfg.decision_fork == "first" and index > 0)
                or self.siblings[origin.problem] >= cfg.fork_cap or origin.kind == Origin.FORK):
            return
        params = self.engine.params(seq_id)
        prose = replace(params, banned_token_ids=params.banned_token_ids + self.fence)
        prompt_len = len(self.engine.output(seq_id).prompt_ids)
        (child,) = self.loop.fork(seq_id, 1, at=prompt_len + open_at, forbid=self.fence, params=prose)
        self.origins[child] = _Origin(problem=origin.problem, kind=Origin.FORK, prefix=origin.prefix, fork_at=open_at)
        self.siblings[origin.problem] += 1


def summarize(samples: Sequence[Sample], stats: Sequence[ProblemStats], buffer: Sequence[Sample],
              counters: dict[str, int]) -> dict[str, float]:
    """The E-step's metrics: counts, mean rewards per origin, the estimates and the buffer's make-up."""
    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else float("nan")

    by_origin = {k: [s.reward for s in samples if s.origin == k] for k in Origin}
    kept = [s for s in stats if not s.dropped]
    return {
        "estep/problems": len(stats),
        "estep/rollouts": len(samples),
        "estep/siblings": len(by_origin[Origin.FORK]),
        "estep/sampled_tokens": sum(sum(s.loss_mask) for s in samples),
        "estep/reward_mean": mean([s.reward for s in samples]),
        **{f"estep/reward_{k}": mean(v) for k, v in by_origin.items()},
        "estep/pi_code": mean([s.pi_code for s in stats]),
        "estep/q_code": mean([s.q_code for s in stats if s.n_code]),
        "estep/q_prose": mean([s.q_prose for s in stats if s.n_prose]),
        "estep/s_code": mean([s.s_code for s in kept if s.s_code is not None]),
        "estep/dropped": len(stats) - len(kept),
        "estep/buffer": len(buffer),
        "estep/buffer_code_share": mean([s.decision == Decision.CODE for s in buffer]),
        **counters,
    }
