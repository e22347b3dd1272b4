"""The training entry point: `python -m acim_fast.run [--preset P] [--field value ...] | --resume RUN_DIR` (see
`--help`), in one process or on every rank of `torchrun --nproc_per_node N -m acim_fast.run ...`.

It prepares the run directory (config.json), the starting model and the problems; evaluates the starting model
(iteration 0); then runs each EM iteration (E-step `estep.explore`, M-step `mstep.MStep`, held-out evaluation
`evaluate.evaluate`), appending a line to RUN/metrics.jsonl (and to the `--log` backends: `loggers.MetricsLog`)
and writing RUN/checkpoints/iter_NNNN atomically (`acim_fast.train.checkpoint`); it ends with RUN/report.png and a
summary table. `--resume RUN_DIR` goes on after the newest complete checkpoint with the same data order and seeds,
so a killed run loses no finished iteration.

It does not do the work of each phase (the modules named above) or choose hyper-parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import tqdm

from acim_fast.common.atomic import atomic_write
from acim_fast.common.hashing import stable_seed
from acim_fast.config import Config, parse_args
from acim_fast.data import Problem, load_problems, shuffle, split
from acim_fast.embedded.task import generate
from acim_fast.embedded.tiny import create_tiny
from acim_fast.embedded.warmup import SFTConfig, warm_up
from acim_fast.engine.model import CausalLM
from acim_fast.engine.vllm_backend import VLLMBackend
from acim_fast.evaluate import Report, evaluate
from acim_fast.execution.rollout_model import RolloutModel, load_rollout_model
from acim_fast.execution.sandbox import STATUSES, Sandbox
from acim_fast.loggers import MetricsLog, require
from acim_fast.report import METRICS_FILE, plot, read_metrics, summary_table
from acim_fast.train import checkpoint
from acim_fast.train.dist import Ranks, copy_full_weights, from_env, shard, world_of_one
from acim_fast.train.estep import EStepResult, explore
from acim_fast.train.mstep import MStep

EVAL_SEED = 0  # the embedded task's held-out draw: fixed, so every seed is scored on the same problems


def main(argv: list[str] | None = None) -> int:
    config, resume = parse_args(argv)
    train(config, resume_dir=resume)
    return 0


def train(config: Config, *, resume_dir: str | os.PathLike | None = None,
          log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run (or resume) the training of `config`; returns the metrics of every iteration (see the module docstring).
    Under torchrun every rank calls it; rank 0 logs, keeps the metrics and writes the run's files."""
    ranks = Ranks(from_env())
    # What the run opens for itself (a world of one, the vLLM engine) closes here, last opened first closed: before
    # the process group is left.
    with contextlib.ExitStack() as owned:
        records = _Trainer.setup(config, ranks, resume_dir, log, owned).run()
    ranks.close()  # not on an error (no barrier then): the rank dies and torchrun stops the others
    return records


@dataclasses.dataclass(eq=False)
class _Trainer:
    """One run: set up once (`setup`), then one method per phase of an iteration (`run` calls them in turn)."""

    config: Config
    ranks: Ranks
    run_dir: Path
    log: Callable[[str], None]
    train_set: list[Problem]
    held_out: list[Problem]
    policy: RolloutModel  # what the sampler of this rank runs
    trained: CausalLM  # what the M-step trains: the sampler's own module, or a sharded copy (see `_models`)
    backend: VLLMBackend | None
    mstep: MStep
    first: int = 0  # the first iteration this process runs
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    metrics: MetricsLog | None = None  # rank 0's writer of metrics.jsonl and the --log backends

    @classmethod
    def setup(cls, config: Config, ranks: Ranks, resume_dir: str | os.PathLike | None, log: Callable[[str], None],
              owned: contextlib.ExitStack) -> _Trainer:
        """The run directory, problems, models and trainer state; what it opens for itself is entered on `owned`."""
        log = log if ranks.is_main else _silent
        run_dir = Path(resume_dir) if resume_dir is not None else Path(config.out_dir)
        if config.problems_per_iter < ranks.world:
            raise ValueError(f"--problems_per_iter {config.problems_per_iter} leaves some of the {ranks.world} ranks "
                             f"without a problem to explore")
        if ranks.is_main:
            require(config.log)  # a missing package fails now, not after the warm-up
            if resume_dir is None:
                _open_run_dir(config, run_dir)
        log(f"run {run_dir}\nresolved config:\n{config.to_json()}")
        train_set, held_out = problems_of(config)
        last, start, base = _starting_point(config, run_dir, ranks, log)
        ranks, policy, trained, backend = _models(config, start, ranks, owned)
        reference = _reference(config, base, ranks, policy.model.dtype)
        trainer = cls(config=config, ranks=ranks, run_dir=run_dir, log=log, train_set=train_set, held_out=held_out,
                      policy=policy, trained=trained, backend=backend,
                      mstep=MStep(trained, config.mstep, total_steps=planned_steps(config), dist=ranks.dist,
                                  reference=reference))
        trainer.resume(last)
        if ranks.is_main:
            trainer.metrics = owned.enter_context(contextlib.closing(
                MetricsLog(run_dir, config.log, first=trainer.first, config=config.to_dict())))
        return trainer

    def resume(self, last: Path | None) -> None:
        """Go on after checkpoint `last` (its trainer state, the metrics lines up to it), or start from iteration 0."""
        metrics = self.run_dir / METRICS_FILE
        if last is None:
            if self.ranks.is_main and metrics.exists():
                metrics.unlink()  # lines of a run that died before its first checkpoint
            return
        self.first = checkpoint.iteration_of(last) + 1
        # A plain fp32 process saved no separate trainer weights: its export is them.
        self.mstep.load_state_dict(checkpoint.load_trainer_state(last, self.mstep.state_dict(), optional=("model",)))
        # Lines after the checkpoint belong to an iteration that did not finish: it runs again.
        self.records = [r for r in read_metrics(self.run_dir) if r["iteration"] < self.first]
        if self.ranks.is_main:
            text = "".join(json.dumps(r) + "\n" for r in self.records)
            atomic_write(metrics, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        self.log(f"resuming after {last} (iteration {self.first - 1})")

    def run(self) -> list[dict[str, Any]]:
        """The iterations from `first` on (iteration 0 only evaluates the starting model), then the report."""
        cfg = self.config
        elapsed = self.records[-1]["time_s"] if self.records else 0.0  # time_s counts the earlier processes' time
        began = time.monotonic()
        with (Sandbox(cfg.sandbox.options(cfg.estep.sandbox_timeout_s)) as explore_box,
              Sandbox(cfg.sandbox.options(cfg.eval.sandbox_timeout_s)) as eval_box):
            isolation = str(explore_box.isolation)
            self.log(f"sandbox isolation: {isolation}")
            for it in tqdm.tqdm(range(self.first, cfg.iterations + 1), desc="EM iterations",
                                disable=not (self.ranks.is_main and sys.stderr.isatty())):
                record: dict[str, Any] = {"iteration": it, "algo": cfg.algo, "seed": cfg.seed,
                                          "sandbox/isolation": isolation}
                if it > 0:
                    before = explore_box.tally()
                    result = self.e_step(it, explore_box)
                    record.update(self.cell_outcomes("estep", explore_box, before))  # before training on them
                    record.update(result.metrics)
                    record.update(self.m_step(it, result))
                before = eval_box.tally()
                report = self.evaluation(it, eval_box)
                record.update(self.cell_outcomes("eval", eval_box, before))
                self.save(it, record, report, time_s=elapsed + time.monotonic() - began)
        self.finish()
        return self.records

    def e_step(self, it: int, sandbox: Sandbox) -> EStepResult:
        """Each rank explores its share of the iteration's problems; the result is that of exploring them all."""
        batch = self.ranks.share(iteration_problems(self.train_set, self.config, it))
        part = explore(self.policy, batch, self.config.estep, algo=self.config.algo, sandbox=sandbox,
                       seed=self.config.seed, iteration=it)
        return self.ranks.merge(part, EStepResult.merge)

    def cell_outcomes(self, phase: str, sandbox: Sandbox, before: dict[str, int]) -> dict[str, int]:
        """The phase's cells by status over every rank, as metrics; raises SandboxFailed (every rank alike) when
        the sandbox itself failed too many of them."""
        mine = {status: n - before[status] for status, n in sandbox.tally().items()}
        counts = self.ranks.merge(mine, lambda parts: {s: sum(part[s] for part in parts) for s in mine})
        return self.config.sandbox.outcomes(phase, counts)

    def m_step(self, it: int, result: EStepResult) -> dict[str, float]:
        """Train on the merged buffer and bring the new weights to the sampler; returns the M-step's metrics."""
        if self.backend is not None:
            self.backend.sleep()  # its GPU memory is the M-step's until the weights come back
        metrics = self.mstep.train(result.buffer, self.config.effective_loss(),
                                   seed=stable_seed(self.config.seed, it, sep="/"))
        if self.trained is not self.policy.model:  # weight sync: the full weights, one tensor at a time
            copy_full_weights(self.trained, self.policy.model)
        if self.backend is not None:  # weight sync: vLLM's copy, in place
            self.backend.load_weights(self.policy.model)
        return metrics

    def evaluation(self, it: int, sandbox: Sandbox) -> Report:
        """The held-out report (each rank evaluates its share; every rank gets the whole report)."""
        return evaluate(self.policy, self.held_out, options=self.config.eval, sandbox=sandbox, dist=self.ranks.dist,
                        meta={"iteration": it, "run": str(self.run_dir)})

    def save(self, it: int, record: dict[str, Any], report: Report, *, time_s: float) -> None:
        """The iteration's metrics line, then its checkpoint (every rank writes its share of the trainer state)."""
        main = self.ranks.is_main
        if main:
            record.update(eval_metrics(report))
            record["time_s"] = time_s
            self.records.append(record)
            self.metrics.write(record)
        checkpoint.save(self.run_dir, it, self.policy, self.mstep.state_dict(),
                        files={"eval.json": report.to_json()} if main else None, dist=self.ranks.dist)
        if main:
            if self.config.keep_trainer_states:
                checkpoint.prune_trainer_states(self.run_dir, self.config.keep_trainer_states)
            self.log(format_line(record))

    def finish(self) -> None:
        if not self.ranks.is_main:
            return
        plot({f"{self.config.algo} seed {self.config.seed}": self.records}, self.run_dir / "report.png")
        self.log(summary_table(self.records))
        self.log(f"wrote {self.run_dir / METRICS_FILE}, {self.run_dir / 'report.png'}, {self.run_dir / 'checkpoints'}")


def _silent(_: str) -> None:
    pass


# -- the pieces --

def _open_run_dir(config: Config, run_dir: Path) -> None:
    """A fresh run's directory, with its resolved config.json; one that already holds checkpoints is refused."""
    if checkpoint.latest(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds checkpoints: continue it with --resume {run_dir}, or choose "
                         f"another --out_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "config.json", lambda tmp: Path(tmp).write_text(config.to_json(), encoding="utf-8"))


def _starting_point(config: Config, run_dir: Path, ranks: Ranks,
                    log: Callable[[str], None]) -> tuple[Path | None, Path, Path | None]:
    """(the newest complete checkpoint or None, the weights to start from, the run's starting model or None): rank 0
    finds them (dropping the temporary directories of an interrupted save, making the base model if need be), the
    other ranks take them from it. The starting model is the base model, also on a resumed run when the KL term
    needs it as its reference (otherwise None there: a resumed run does not need it)."""
    found = None
    if ranks.is_main:
        checkpoint.clean(run_dir)
        last = checkpoint.latest(run_dir)
        base = base_model(config, run_dir, log) if last is None or config.loss.kl_coef > 0 else None
        found = (last, base if last is None else last, base)
    return ranks.from_main(found)


def _models(config: Config, start: Path, ranks: Ranks,
            owned: contextlib.ExitStack) -> tuple[Ranks, RolloutModel, CausalLM, VLLMBackend | None]:
    """(the ranks, this rank's sampler, the model the M-step trains, the vLLM engine or None), from `start`.

    A plain fp32 process trains the sampler's own module in place: the next E-step reads it, which is the weight sync
    of one process. With ranks, the M-step trains a second copy, fp32 and FSDP2-sharded as it loads, that computes in
    the sampler's dtype through FSDP2's mixed precision; the sampler's copy stays whole and gets the trained weights
    after each M-step."""
    device = ranks.device(config.device)
    policy = load_rollout_model(start, dtype=config.dtype, device=device)
    compute = policy.model.dtype
    if compute == torch.float16:
        raise ValueError(f"{start} is float16: training computes in the model's dtype, and float16 gradients would "
                         f"need loss scaling, which this trainer does not do: pass --dtype bfloat16 (or float32)")
    if ranks.dist is None and compute != torch.float32:
        # A bf16 model trained in place would round away AdamW's updates (at lr 1e-6, nearly all of them): one
        # process trains like a torchrun rank instead, in a world of one.
        ranks = Ranks(owned.enter_context(world_of_one(torch.device(device))))
    backend = None
    if config.rollout_backend == "vllm":  # one engine per process, which its rank alone drives
        backend = owned.enter_context(contextlib.closing(VLLMBackend(
            start, config.vllm, dtype=config.dtype, seed=config.seed, per_rank=ranks.world > 1)))
        policy = dataclasses.replace(policy, backend=backend)
    dist = ranks.dist
    if dist is None:
        return ranks, policy, policy.model, backend
    trained = CausalLM.from_pretrained(start, dtype="float32", device=device,
                                       prepare=lambda model: shard(model, dist, compute_dtype=compute))
    return ranks, policy, trained, backend


def _reference(config: Config, base: Path | None, ranks: Ranks, dtype: torch.dtype) -> CausalLM | None:
    """The frozen reference policy of the KL term, or None when `--loss.kl_coef` is 0: the run's starting model
    `base` (the same weights however often the run resumes, so a resumed run is the uninterrupted one), in the
    sampler's `dtype` (the trained copy's compute dtype), placed as the trained copy is: whole in a plain fp32
    process, FSDP2-sharded under ranks (each rank holds 1/N of it)."""
    if config.loss.kl_coef == 0:
        return None
    dist = ranks.dist
    prepare = None if dist is None else (lambda model: shard(model, dist))
    return CausalLM.from_pretrained(base, dtype=dtype, device=ranks.device(config.device), prepare=prepare)


def base_model(config: Config, run_dir: Path, log: Callable[[str], None]) -> Path:
    """`--model`, or the embedded tiny model warmed up in RUN/warmup (made once: a complete directory is reused). The
    warm-up writes a temporary directory renamed when complete, so a killed warm-up restarts clean."""
    if config.model is not None:
        path = Path(config.model)
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {path}: no config.json there (a Hugging Face checkpoint directory is needed)")
        return path
    final = run_dir / "warmup"
    if final.is_dir():
        return final
    tmp = run_dir / ".warmup.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    began = time.monotonic()
    if config.warmup_steps == 0:
        create_tiny(tmp)
    else:
        log(f"warming up the embedded tiny model ({config.warmup_steps} SFT steps)...")
        bar = tqdm.tqdm(total=config.warmup_steps, desc="warm-up SFT", disable=not sys.stderr.isatty())
        losses = warm_up(tmp, config=SFTConfig(steps=config.warmup_steps, seed=config.seed),
                         log=lambda step, loss: bar.update(1))
        bar.close()
        log(f"warm-up: {config.warmup_steps} steps in {time.monotonic() - began:.0f} s, final loss {losses[-1]:.3f}")
    tmp.rename(final)
    return final


def problems_of(config: Config) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems): `--data` and `--eval_data`, or `--eval_problems` split off `--data`,
    or the embedded task's train and held-out splits. The held-out set does not depend on `--seed`, so runs of
    different seeds are scored on the same problems."""
    if config.data is None:
        train_set = [p.to_problem() for p in generate(max(config.problems_per_iter * config.iterations, 1),
                                                      seed=config.seed, split="train")]
    else:
        train_set = load_problems(config.data)
    if config.eval_data is not None:
        held_out = load_problems(config.eval_data)[:config.eval_problems]
    elif config.data is None:
        held_out = [p.to_problem() for p in generate(config.eval_problems, seed=EVAL_SEED, split="eval",
                                                    unique=True)]
    else:
        if config.eval_problems >= len(train_set):
            raise ValueError(f"--eval_problems {config.eval_problems} would hold out all {len(train_set)} problems "
                             f"of {config.data}: lower it or pass --eval_data")
        train_set, held_out = split(train_set, config.eval_problems / len(train_set), seed=EVAL_SEED)
    if not train_set or not held_out:
        raise ValueError(f"no {'training' if not train_set else 'held-out'} problems")
    return train_set, held_out


def iteration_problems(train_set: list[Problem], config: Config, iteration: int) -> list[Problem]:
    """The problems of `iteration` (>= 1): the next problems_per_iter of the per-epoch shuffled training set."""
    n = len(train_set)
    orders: dict[int, list[Problem]] = {}
    out = []
    for g in range((iteration - 1) * config.problems_per_iter, iteration * config.problems_per_iter):
        epoch = g // n
        if epoch not in orders:
            orders[epoch] = shuffle(train_set, config.seed, epoch)
        out.append(orders[epoch][g % n])
    return out


def planned_steps(config: Config) -> int:
    """Optimiser steps of the whole run (the schedule's length): the buffer is at most this large."""
    e = config.estep
    per_problem = e.buffer_per_problem if config.algo == "em" else e.k_code + e.k_prose + e.k_free
    per_iteration = config.mstep.epochs * math.ceil(config.problems_per_iter * per_problem
                                                    / config.mstep.samples_per_step)
    return max(1, config.iterations * per_iteration)


def eval_metrics(report: Report) -> dict[str, Any]:
    s = report.overall
    return {"eval/pass_at_1": s.pass_at_1, "eval/code_use_rate": s.code_use_rate,
            "eval/selection_accuracy": s.selection_accuracy, "eval/code_success": s.code_success,
            "eval/prose_success": s.prose_success, "eval/labelled": s.labelled}


def format_line(r: dict[str, Any]) -> str:
    """One fixed ` | `-separated line per iteration."""
    def f(key: str, fmt: str = ".3f") -> str:
        value = r.get(key)
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    cells = " ".join(f"{status} {f(f'estep/cells_{status}', 'd')}" for status in STATUSES)
    return (f"iter {r['iteration']} | pass@1 {f('eval/pass_at_1')} | code use {f('eval/code_use_rate')} | "
            f"sel acc {f('eval/selection_accuracy')} | reward {f('estep/reward_mean')} | "
            f"buffer {f('estep/buffer', 'd')} | loss {f('mstep/loss', '.4f')} | clip {f('mstep/clip_frac')} | "
            f"cells {cells} | {r['time_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
