"""The one typed configuration of the trainer, and its command line.

`Config` holds the run-level fields and the phases' typed groups (`estep`, `mstep`, `loss`, `eval`, `vllm`), each
defined next to the code that reads it; every field carries a help text and is validated in `__post_init__` with a
`ValueError` naming it. The command line is derived from the dataclasses (`--name VALUE`, `--estep.name VALUE`,
hyphens or underscores); flags override a preset (`--preset`, plain functions returning a `Config`), and
`--resume RUN_DIR` reloads a run's saved config (`Config.from_dict`, the inverse of `to_dict`).

This module runs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acim_fast.common.fields import add_field_flags, check_int, option
from acim_fast.engine.vllm_backend import VLLMOptions
from acim_fast.evaluate import EvalOptions
from acim_fast.execution.sandbox import SandboxConfig
from acim_fast.loggers import parse_backends
from acim_fast.train.estep import Algo, EStepConfig
from acim_fast.train.mstep import MStepConfig
from acim_kernels import LossConfig

BACKENDS = ("ours", "vllm")
PRESETS = ("default", "smoke")


@dataclass(kw_only=True, slots=True)
class Config:
    """Everything a run needs. Defaults are the embedded CPU default (`default_preset`)."""

    # -- model and data --
    model: str | None = option(None, "Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer); "
                               "none = the embedded tiny model, created and warmed up in <out_dir>/warmup",
                               group="model and data")
    data: str | None = option(None, "training problems: a jsonl with 'problem' and 'answer', a bundled benchmark "
                              "(math500, gsm8k, aime24, amc23) or hf:<name>...; none = the embedded task",
                              group="model and data")
    eval_data: str | None = option(None, "held-out problems, as --data; none = eval_problems problems split off --data "
                                   "(or the embedded task's held-out split)", group="model and data")
    device: str = option("cpu", "torch device of the model (cpu, cuda, cuda:1 ...)", group="model and data")
    dtype: str | None = option(None, "float32 | bfloat16 (the samplers' weights and the training compute; the "
                               "trainer's master weights are fp32 either way); none = the checkpoint's",
                               group="model and data")
    # -- run --
    out_dir: str = option("runs/default", "run directory: config.json, metrics.jsonl, report.png, checkpoints/",
                          group="run")
    seed: int = option(0, "seed of every random choice of the run (warm-up data, rollouts, shuffles)", group="run")
    algo: Algo = option(Algo.EM, "em: AutoCode's EM (E-step exploration + off-policy M-step); grpo: the on-policy "
                       "baseline at the same rollout budget (unguided samples, ppo objective, no decision loss)",
                       group="run")
    iterations: int = option(6, "EM iterations (E-step, M-step, evaluation, checkpoint)", group="run")
    problems_per_iter: int = option(64, "problems explored per iteration (a deterministic walk through the "
                                    "shuffled training set)", group="run")
    eval_problems: int = option(96, "held-out problems evaluated after every iteration", group="run")
    warmup_steps: int = option(1200, "warm-up SFT steps of the embedded tiny model (ignored with --model)",
                               group="run")
    keep_trainer_states: int = option(0, "trainer states (optimiser, fp32 masters: 12-16 bytes per parameter) kept: "
                                      "those of the newest N checkpoints; older ones keep their model and eval "
                                      "report, and --resume needs only the newest; 0 = keep all", group="run")
    rollout_backend: str = option("ours", "engine of the E-step and evaluation rollouts: ours (the paged sampler "
                                  "that forks with copy-on-write) | vllm (vLLM's offline engine, one per process; "
                                  "see --vllm.*)", group="run")
    log: tuple[str, ...] = option((), "logging backends beside metrics.jsonl, comma-separated (rank 0 only): "
                                  "tensorboard (event files in the run directory; pip extra 'tensorboard') | wandb "
                                  "(RUN/wandb, offline unless WANDB_MODE says otherwise or an API key and the network "
                                  "are there; pip extra 'wandb')", group="run")
    # -- the phases (see each class for its fields) --
    estep: EStepConfig = field(default_factory=EStepConfig, metadata={"group": "estep"})
    mstep: MStepConfig = field(default_factory=MStepConfig, metadata={"group": "mstep"})
    loss: LossConfig = field(default_factory=lambda: LossConfig(objective="clip", sft_coef=1.0),
                             metadata={"group": "loss"})
    eval: EvalOptions = field(default_factory=lambda: EvalOptions(
        k=4, max_new_tokens=200, max_code_calls=2, max_tool_tokens=64, sandbox_timeout_s=5.0, max_num_seqs=256),
        metadata={"group": "eval"})
    vllm: VLLMOptions = field(default_factory=VLLMOptions, metadata={"group": "vllm"})
    sandbox: SandboxConfig = field(default_factory=SandboxConfig, metadata={"group": "sandbox"})

    def __post_init__(self) -> None:
        for name, minimum in (("seed", 0), ("iterations", 0), ("problems_per_iter", 1), ("eval_problems", 1),
                              ("warmup_steps", 0), ("keep_trainer_states", 0)):
            check_int(self, name, minimum)
        if not self.out_dir:
            raise ValueError("Config.out_dir must not be empty")
        self.algo = Algo.parse(self.algo, "Config.algo")
        if self.rollout_backend not in BACKENDS:
            raise ValueError(f"Config.rollout_backend must be one of {BACKENDS}, got {self.rollout_backend!r}")
        self.log = parse_backends(self.log, "Config.log")
        if self.dtype not in (None, "float32", "bfloat16"):  # float16 would need loss scaling
            raise ValueError(f"Config.dtype must be float32, bfloat16 or none, got {self.dtype!r}")
        if self.loss.temperature != self.estep.temperature:
            # The sampler's behaviour log-probs are the raw model at the sampling temperature; the loss must score
            # the policy at the same one or every ratio is off by the temperature change.
            raise ValueError(f"Config.loss.temperature ({self.loss.temperature}) must equal "
                             f"Config.estep.temperature ({self.estep.temperature})")

    def effective_loss(self) -> LossConfig:
        """The M-step's loss: `loss` for em; for grpo its definition, the ppo objective with no decision loss."""
        if self.algo == "grpo":
            return dataclasses.replace(self.loss, objective="ppo", sft_coef=0.0)
        return self.loss

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "config") -> Config:
        """The inverse of `to_dict`; an unknown or ill-typed field raises ValueError naming it and `where`."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(values).__name__}")
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if name not in hints:
                raise ValueError(f"{where}: unknown field {name!r}")
            kind = hints[name]
            if dataclasses.is_dataclass(kind):
                if not isinstance(value, dict):
                    raise ValueError(f"{where}: field {name!r} must be an object")
                known = {f.name: f for f in dataclasses.fields(kind)}
                unknown = sorted(set(value) - set(known))
                if unknown:
                    raise ValueError(f"{where}: unknown field(s) {[f'{name}.{u}' for u in unknown]}")
                # JSON has no tuples: give tuple-typed fields (e.g. betas) their type back.
                value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                try:
                    value = kind(**value)
                except TypeError as e:
                    raise ValueError(f"{where}: field {name!r}: {e}") from None
            kwargs[name] = value
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


def default_preset() -> Config:
    """The embedded default: the tiny built-in model, warmed up, then EM on the built-in task, on CPU (~5 min on
    2 cores)."""
    return Config()


def smoke_preset() -> Config:
    """A reduced default for CI and quick checks: 2 small iterations (seconds each on 2 cores, given a warm model)."""
    return Config(out_dir="runs/smoke", iterations=2, problems_per_iter=8, eval_problems=8,
                  estep=EStepConfig(k_code=4, k_prose=4, k_free=2, fork_cap=2, buffer_per_problem=4),
                  mstep=MStepConfig(epochs=1, samples_per_step=16, warmup_steps=1),
                  eval=EvalOptions(k=2, max_new_tokens=200, max_code_calls=2, max_tool_tokens=64,
                                   sandbox_timeout_s=5.0, max_num_seqs=256))


PRESET_FUNCTIONS = {"default": default_preset, "smoke": smoke_preset}


def build_parser(prog: str = "python -m acim_fast.run") -> argparse.ArgumentParser:
    """The command line: `--preset`, `--resume` and one flag per leaf field (`--estep.k_code 4`, also spelt
    `--estep.k-code 4`). Field flags have no argparse default (what was not given is absent from the namespace);
    `--help` shows the default preset's."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Train a math LM with AutoCode (EM over the decision to write code).")
    parser.add_argument("--preset", choices=PRESETS, default="default",
                        help="the defaults the flags override: default (the embedded ~5 min CPU run) | smoke (CI)")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="continue RUN_DIR from its last checkpoint with its saved config and data order "
                             "(no other flag may be given)")
    add_field_flags(parser, Config, default_preset(),
                    group_of=lambda name, f: name.split(".")[0] if "." in name else f.metadata["group"])
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[Config, Path | None]:
    """(the Config of the command line, the run directory to resume or None). A flag that sets an invalid value
    exits with the field named."""
    parser = build_parser()
    namespace = vars(parser.parse_args(argv))
    preset, resume = namespace.pop("preset"), namespace.pop("resume")
    if resume is not None:
        if namespace or preset != "default":
            parser.error(f"--resume takes the saved config of the run as it is; drop "
                         f"{' '.join('--' + k for k in namespace) or '--preset'}")
        path = Path(resume) / "config.json"
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            parser.error(f"--resume {resume}: cannot read {path}: {e}")
        return Config.from_dict(values, where=str(path)), Path(resume)
    values = PRESET_FUNCTIONS[preset]().to_dict()
    for name, value in namespace.items():
        outer, _, inner = name.partition(".")
        if inner:
            values[outer][inner] = value
        else:
            values[outer] = value
    try:
        return Config.from_dict(values, where="command line"), None
    except ValueError as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits
