"""The one entry point: `python -m acim_fast.run [--preset P] [--field value ...] | --resume RUN_DIR` (see `--help`).

What it does (`train`):
1. The run directory (`--out_dir`): a fresh run refuses a directory that already holds checkpoints (resume it, or
   pick another); the resolved config is printed and saved as config.json.
2. The model: `--model DIR`, or the embedded tiny model created and warmed up (`acim_fast.embedded.warmup.warm_up`,
   `--warmup_steps`) in RUN/warmup, written to a temporary directory and renamed, so a killed warm-up restarts clean.
3. The problems: `--data` (training) and `--eval_data` (held out), or `--eval_problems` split off `--data`
   (`data.split`), or the embedded task's train and held-out splits. The held-out set does not depend on `--seed`, so
   runs of different seeds are scored on the same problems. Iteration i explores the next `--problems_per_iter`
   problems of the training set shuffled per epoch (`data.shuffle`): a pure function of the seed and i.
4. Iteration 0 evaluates the starting model; each iteration i >= 1 runs the E-step (`estep.explore`), the M-step
   (`mstep.MStep.train`: an fp32 model is trained in place, and the next E-step's engine reads the same module, which
   is the weight sync of a single process; a bf16 model is sampled as it is and trained on an fp32 master copy, as
   under torchrun below, in a world of one) and the evaluation (`evaluate.evaluate`), then appends one line of metrics
   to RUN/metrics.jsonl (and prints it) and writes RUN/checkpoints/iter_NNNN atomically (`acim_fast.train.checkpoint`:
   the HF-format model and tokenizer, the optimiser state, the evaluation report).
5. At the end: RUN/report.png (`acim_fast.report`) and a summary table.

`--resume RUN_DIR` reloads RUN_DIR/config.json, drops the temporary directories of an interrupted save, restarts
after the newest complete checkpoint (its weights and optimiser state), keeps the metrics lines up to it and goes on
with the same data order and seeds: a run killed at any moment resumes without losing a finished iteration.

Under `torchrun --nproc_per_node N -m acim_fast.run ...` (see `acim_fast.train.dist`) every rank runs this same function:
rank 0 prepares the run directory and the starting model, every rank explores its share of each iteration's problems
with its own sampler (a whole copy of the weights), the shares are merged into the single-process E-step result, the
M-step trains an FSDP2-sharded copy on the merged buffer, the trained weights are gathered into every sampler, every
rank evaluates its share of the held-out problems, and rank 0 merges the report and writes metrics and the HF export;
the trainer state is saved by all ranks.

What it does not do: choose hyper-parameters (see `--help`).
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

from acim_fast.train import checkpoint
from acim_fast.common.atomic import atomic_write
from acim_fast.config import Config, parse_args
from acim_fast.data import Problem, load_problems, shuffle, split
from acim_fast.train.dist import Dist, copy_full_weights, from_env, shard, world_of_one
from acim_fast.train.estep import EStepResult, explore
from acim_fast.evaluate import Report, evaluate
from acim_fast.engine.model import CausalLM
from acim_fast.train.mstep import MStep
from acim_fast.execution.rollout_model import load_rollout_model
from acim_fast.report import METRICS_FILE, plot, read_metrics, summary_table
from acim_fast.common.hashing import stable_seed
from acim_fast.execution.sandbox import Sandbox, SandboxOptions
from acim_fast.embedded.warmup import SFTConfig, warm_up
from acim_fast.embedded.task import generate
from acim_fast.embedded.tiny import create_tiny
from acim_fast.engine.vllm_backend import VLLMBackend

EVAL_SEED = 0  # the embedded task's held-out draw: fixed, so every seed is scored on the same problems


def main(argv: list[str] | None = None) -> int:
    config, resume = parse_args(argv)
    train(config, resume_dir=resume)
    return 0


def train(config: Config, *, resume_dir: str | os.PathLike | None = None,
          log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run (or resume) the training of `config`; returns the metrics of every iteration (see the module docstring).
    Under torchrun every rank calls it; rank 0 logs, evaluates and writes the run's files."""
    dist = from_env()
    with contextlib.ExitStack() as owned:
        records = _train(config, dist, resume_dir, log, owned)
    if dist is not None:  # on an error, no barrier: the rank dies and torchrun stops the others
        dist.close()
    return records


def _train(config: Config, dist: Dist | None, resume_dir: str | os.PathLike | None, log: Callable[[str], None],
           owned: contextlib.ExitStack) -> list[dict[str, Any]]:
    """`owned` closes what this call opens for itself (a world of one, the vLLM engine) when the caller's block
    ends, last opened first closed."""
    main = dist is None or dist.is_main
    if not main:
        log = _silent
    run_dir = Path(resume_dir) if resume_dir is not None else Path(config.out_dir)
    if dist is not None and config.problems_per_iter < dist.world:
        raise ValueError(f"--problems_per_iter {config.problems_per_iter} leaves some of the {dist.world} ranks "
                         f"without a problem to explore")
    if main and resume_dir is None:
        if checkpoint.latest(run_dir) is not None:
            raise ValueError(f"{run_dir} already holds checkpoints: continue it with --resume {run_dir}, or choose "
                             f"another --out_dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "config.json", lambda tmp: Path(tmp).write_text(config.to_json(), encoding="utf-8"))
    log(f"run {run_dir}\nresolved config:\n{config.to_json()}")
    train_set, held_out = problems_of(config)
    if main:
        checkpoint.clean(run_dir)
        last = checkpoint.latest(run_dir)
        start = base_model(config, run_dir, log) if last is None else last
    if dist is not None:  # rank 0 found (or made) the starting point; the others take it from there
        last, start = dist.gather((last, start) if main else None)[0]
        device = str(dist.device)
    else:
        device = config.device
    policy = load_rollout_model(start, dtype=config.dtype, device=device)  # what the sampler of this rank runs
    compute = policy.model.dtype
    if compute == torch.float16:
        raise ValueError(f"{start} is float16: training computes in the model's dtype, and float16 gradients would "
                         f"need loss scaling, which this trainer does not do: pass --dtype bfloat16 (or float32)")
    if dist is None and compute != torch.float32:
        # A bf16 model trained in place would round away AdamW's updates (at lr 1e-6, nearly all of them): one
        # process trains like a torchrun rank instead, on an fp32 master copy through FSDP2's mixed precision.
        dist = owned.enter_context(world_of_one(torch.device(device)))
    trained = policy.model
    backend = None
    if config.rollout_backend == "vllm":  # one engine per process, which its rank alone drives
        # On `owned`, so that it shuts down before a world of one entered earlier is left.
        backend = owned.enter_context(contextlib.closing(VLLMBackend(
            start, config.vllm, dtype=config.dtype, seed=config.seed, per_rank=dist is not None and dist.world > 1)))
        policy = dataclasses.replace(policy, backend=backend)
    if dist is not None:  # a second copy, fp32 and sharded as it loads: the sampler's stays whole, refreshed after
        # each M-step
        trained = CausalLM.from_pretrained(start, dtype="float32", device=device,
                                           prepare=lambda model: shard(model, dist, compute_dtype=compute))
    mstep = MStep(trained, config.mstep, total_steps=planned_steps(config), dist=dist)
    records: list[dict[str, Any]] = []
    first = 0
    if last is not None:
        first = checkpoint.iteration_of(last) + 1
        # A plain fp32 process saved no separate trainer weights: its export is them.
        mstep.load_state_dict(checkpoint.load_trainer_state(last, mstep.state_dict(), optional=("model",)))
        records = [r for r in read_metrics(run_dir) if r["iteration"] < first]
        if main:
            text = "".join(json.dumps(r) + "\n" for r in records)
            atomic_write(run_dir / METRICS_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        log(f"resuming after {last} (iteration {first - 1})")
    elif main and (run_dir / METRICS_FILE).exists():
        (run_dir / METRICS_FILE).unlink()  # lines of a run that died before its first checkpoint
    elapsed = records[-1]["time_s"] if records else 0.0
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        explore_box = stack.enter_context(Sandbox(SandboxOptions(timeout_s=config.estep.sandbox_timeout_s)))
        eval_box = stack.enter_context(Sandbox(SandboxOptions(timeout_s=config.eval.sandbox_timeout_s)))
        bar = tqdm.tqdm(range(first, config.iterations + 1), desc="EM iterations",
                        disable=not (main and sys.stderr.isatty()))
        for it in bar:
            record: dict[str, Any] = {"iteration": it, "algo": config.algo, "seed": config.seed}
            if it > 0:
                batch = iteration_problems(train_set, config, it)
                if dist is not None:
                    batch = batch[dist.rank::dist.world]  # each rank explores its share; EStepResult.merge
                result = explore(policy, batch, config.estep, algo=config.algo, sandbox=explore_box,
                                 seed=config.seed, iteration=it)
                if dist is not None:
                    result = EStepResult.merge(dist.gather(result))
                record.update(result.metrics)
                if backend is not None:
                    backend.sleep()  # its GPU memory is the M-step's until the weights come back
                mstep_seed = stable_seed(config.seed, it, sep="/")
                record.update(mstep.train(result.buffer, config.effective_loss(), seed=mstep_seed))
                if dist is not None:  # weight sync: the full weights, one tensor at a time, into every sampler
                    copy_full_weights(trained, policy.model)
                if backend is not None:  # weight sync: vLLM's copy, in place
                    backend.load_weights(policy.model)
            report = evaluate(policy, held_out, options=config.eval, sandbox=eval_box, dist=dist,
                              meta={"iteration": it, "run": str(run_dir)})
            if main:
                record.update(eval_metrics(report))
                record["time_s"] = elapsed + time.monotonic() - began
                records.append(record)
                _append_line(run_dir / METRICS_FILE, record)
            checkpoint.save(run_dir, it, policy, mstep.state_dict(),
                            files={"eval.json": report.to_json()} if main else None, dist=dist)
            if main:
                if config.keep_trainer_states:
                    checkpoint.prune_trainer_states(run_dir, config.keep_trainer_states)
                log(format_line(record))
    if main:
        plot({f"{config.algo} seed {config.seed}": records}, run_dir / "report.png")
        log(summary_table(records))
        log(f"wrote {run_dir / METRICS_FILE}, {run_dir / 'report.png'}, {run_dir / 'checkpoints'}")
    return records


def _silent(_: str) -> None:
    pass


# -- the pieces --

def base_model(config: Config, run_dir: Path, log: Callable[[str], None]) -> Path:
    """`--model`, or the embedded tiny model warmed up in RUN/warmup (made once: a complete directory is reused)."""
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
    """(training problems, held-out problems); see the module docstring."""
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

    return (f"iter {r['iteration']} | pass@1 {f('eval/pass_at_1')} | code use {f('eval/code_use_rate')} | "
            f"sel acc {f('eval/selection_accuracy')} | reward {f('estep/reward_mean')} | "
            f"buffer {f('estep/buffer', 'd')} | loss {f('mstep/loss', '.4f')} | clip {f('mstep/clip_frac')} | "
            f"{r['time_s']:.0f} s")


def _append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk (a checkpoint written next never has its line missing)."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(clean) + "\n")
        f.flush()
        os.fsync(f.fileno())


if __name__ == "__main__":
    sys.exit(main())
