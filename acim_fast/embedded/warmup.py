"""Warm-up SFT (the preconditioning before RL) on the embedded task, and the measurement of its decision regions.

`demonstration` renders one example: the plain prompt (loss mask 0), then the prose or code demonstration and EOS
(mask 1), except a code demonstration's output block (tool output, mask 0) and, for a `triggered` one, the forced
code prefix (mask 0: a model that never learns to write the prefix keeps deciding at its first token). `examples`
flips prose or code by `code_fraction`, independently of family and level, so the warmed-up model picks code at
random (deciding is RL's job); `trigger_fraction` of them are code after the forced prefix, so that the prefix
forces code in the tiny model too. `train_sft` packs them (`train.packing`) and trains with AdamW + warm-up/cosine
through the fused loss's `sft_coef` term alone; `warm_up(path)` creates the tiny model, trains and saves it.
`measure_regions` measures greedy accuracy per family, level and mode through the real rollout loop ("prose" is
forced by a ban in a model wrapper, since the Engine's `forbid` lasts one step); `format_regions` prints it.

It does not do RL, distributed training, mid-run checkpoints, or SFT on external data.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import torch

from acim_fast.common.fields import check_int
from acim_fast.embedded.task import FAMILIES, LEVELS, TaskProblem, generate
from acim_fast.embedded.tiny import EOS, TinyConfig, codec, create_tiny, load_tokenizer
from acim_fast.engine.model import CausalLM
from acim_fast.engine.paged_engine import Engine
from acim_fast.engine.sampling import SamplingParams
from acim_fast.execution.prompts import MODES, CellFormat, build_prompt, fence_start_ids
from acim_fast.execution.rollout import RolloutLoop
from acim_fast.execution.sandbox import Sandbox, SandboxOptions
from acim_fast.train.optim import adamw, lr_factor
from acim_fast.train.packing import Pack, Row, pack
from acim_kernels import LossConfig, policy_loss

SFT_LOSS = LossConfig(sft_coef=1.0)


@dataclass(frozen=True, slots=True)
class Example:
    ids: list[int]
    mask: list[int]  # 1: the token is trained on (predicted); 0: prompt, forced prefix or tool output


@dataclass(kw_only=True, slots=True)
class SFTConfig:
    """The warm-up run. Defaults: the tiny model's warm-up, 75-90 s on 2 CPU cores (2.5M tokens), measured to leave it
    copying reliably (see `measure_regions`)."""

    steps: int = 1200
    pack_tokens: int = 2048  # tokens per step (one pack)
    lr: float = 1e-3  # measured: copying forms by step ~500; not by step 1000 at 3e-3, nor 1600 at 1e-2
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    warmup_steps: int = 50
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # Probability that an example whose response the model writes from its first token is a code demonstration:
    # the rate at which the warmed-up model opens a cell by itself.
    code_fraction: float = 0.5
    # Probability that an example is instead a code demonstration after the forced code prefix (masked). These teach
    # that the prefix forces code; they train no first response token, so they leave the rate above alone.
    trigger_fraction: float = 0.25
    families: tuple[str, ...] = FAMILIES
    levels: tuple[int, ...] = LEVELS
    seed: int = 0

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 1), ("pack_tokens", 1), ("warmup_steps", 0), ("seed", 0)):
            check_int(self, name, minimum)
        if not self.lr > 0:
            raise ValueError(f"SFTConfig.lr must be > 0, got {self.lr}")
        for name in ("min_lr_ratio", "code_fraction", "trigger_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"SFTConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.weight_decay >= 0:
            raise ValueError(f"SFTConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"SFTConfig.betas must be two numbers in [0, 1), got {self.betas}")
        if not self.grad_clip >= 0:
            raise ValueError(f"SFTConfig.grad_clip must be >= 0, got {self.grad_clip}")
        if not self.families or set(self.families) - set(FAMILIES):
            raise ValueError(f"SFTConfig.families must be a non-empty subset of {FAMILIES}, got {self.families}")
        if not self.levels or set(self.levels) - set(LEVELS):
            raise ValueError(f"SFTConfig.levels must be a non-empty subset of {LEVELS}, got {self.levels}")


# -- data --

def demonstration(problem: TaskProblem, *, code: bool, encode: Callable[[str], list[int]], eos_id: int,
                  triggered: bool = False, fmt: CellFormat = CellFormat()) -> Example:
    """One training example (see the module docstring for what is masked)."""
    if triggered and not code:
        raise ValueError("triggered applies to code demonstrations only")
    segments: list[tuple[str, int]] = [(build_prompt(problem.question).text, 0)]
    if code:
        demo = problem.code_demo(fmt)
        if triggered:
            # The forced prefix ends its line: the cell opens at a line start, as in an untriggered demonstration.
            segments.append((build_prompt(problem.question, mode="code").response_prefix, 0))
        segments += [(demo.cell, 1), (demo.output, 0), (demo.tail, 1)]
    else:
        segments.append((problem.prose, 1))
    ids: list[int] = []
    mask: list[int] = []
    for text, m in segments:
        # Each segment is tokenised on its own, as the rollout loop tokenises an output block on its own.
        part = encode(text)
        ids += part
        mask += [m] * len(part)
    return Example(ids=ids + [eos_id], mask=mask + [1])


def examples(config: SFTConfig, count: int, *, encode: Callable[[str], list[int]], eos_id: int,
             chunk: int = 0) -> list[Example]:
    """`count` training examples, a deterministic function of `config` (seed, families, levels, fractions) and
    `chunk` (the index of a batch of examples in a longer stream)."""
    rng = random.Random(f"sft/{config.seed}/{chunk}")
    problems = generate(count, seed=rng.getrandbits(62), split="train", families=config.families,
                        levels=config.levels)
    out = []
    for p in problems:
        triggered = rng.random() < config.trigger_fraction
        code = triggered or rng.random() < config.code_fraction
        out.append(demonstration(p, code=code, triggered=triggered, encode=encode, eos_id=eos_id))
    return out


# -- training --

def sft_loss(model: CausalLM, p: Pack) -> torch.Tensor:
    """Mean NLL over the pack's masked-in targets, through the dense path and the fused loss."""
    hidden = model.forward_hidden(p.input_ids, cu_seqlens=p.cu_seqlens)
    zeros = torch.zeros(p.targets.shape[0], device=hidden.device)
    mask = p.values["loss_mask"]
    # With advantages 0 the policy term is 0 (value and gradient): only the sft_coef NLL term remains.
    return policy_loss(hidden, model.lm_head_weight, p.targets, old_logp=zeros, advantages=zeros,
                       loss_mask=mask, sft_mask=mask, config=SFT_LOSS).loss


def train_sft(model: CausalLM, config: SFTConfig, *, encode: Callable[[str], list[int]], eos_id: int,
              log: Callable[[int, float], None] | None = None) -> list[float]:
    """Train `model` in place for `config.steps` packs; returns the loss of every step. Deterministic given the
    model's initial weights and the config (the data stream is seeded; nothing else draws random numbers)."""
    stream = _pack_stream(config, encode=encode, eos_id=eos_id)
    optimizer = adamw(model, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, warmup_steps=config.warmup_steps, total_steps=config.steps, min_lr_ratio=config.min_lr_ratio))
    model.train()
    losses: list[float] = []
    for step in range(config.steps):
        loss = sft_loss(model, next(stream))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log is not None:
            log(step, losses[-1])
    model.eval()
    return losses


def _pack_stream(config: SFTConfig, *, encode: Callable[[str], list[int]], eos_id: int):
    """Packs forever: chunks of fresh examples (the chunk index joins the seed), each chunk packed."""
    chunk = 0
    while True:
        # Examples average ~100 tokens: a chunk fills ~20 packs. Its last pack, usually partial, is dropped so
        # that every step sees about pack_tokens tokens.
        items = examples(config, config.pack_tokens // 5, encode=encode, eos_id=eos_id, chunk=chunk)
        yield from pack([Row(e.ids, {"loss_mask": e.mask}) for e in items], config.pack_tokens)[:-1]
        chunk += 1


def warm_up(path: str | os.PathLike, *, tiny: TinyConfig = TinyConfig(), config: SFTConfig = SFTConfig(),
            log: Callable[[int, float], None] | None = None) -> list[float]:
    """Create the tiny model in `path`, warm it up with SFT and save it there; returns the per-step losses."""
    path = create_tiny(path, tiny)
    model = CausalLM.from_pretrained(path)
    tokenizer = load_tokenizer(path)
    encode, _ = codec(tokenizer)
    losses = train_sft(model, config, encode=encode, eos_id=tokenizer.token_to_id(EOS), log=log)
    model.save_pretrained(path)
    return losses


# -- measurement --

@dataclass(frozen=True, slots=True)
class RegionRow:
    family: str
    level: int
    mode: str  # "prose" | "code" | "autonomous"
    n: int
    correct: int
    used_code: int  # rollouts that opened a python cell
    # Autonomous rows only: the model's mean probability that its first response token opens a cell, i.e. its
    # decision before greedy decoding turns it into an all-or-nothing choice per problem.
    p_code: float | None = None

    @property
    def accuracy(self) -> float:
        return self.correct / self.n


def measure_regions(model_dir: str | os.PathLike, *, per_cell: int = 20, seed: int = 1,
                    families: Sequence[str] = FAMILIES, levels: Sequence[int] = LEVELS,
                    modes: Sequence[str] = MODES, max_new_tokens: int = 200,
                    sandbox_options: SandboxOptions | None = None) -> list[RegionRow]:
    """Greedy accuracy on `per_cell` unique held-out problems per (family, level), in each mode.

    `max_new_tokens` counts the response after the prompt, the forced code prefix and tool output included.
    """
    if not set(modes) <= set(MODES) or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {tuple(modes)}")
    model = CausalLM.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)
    encode, decode = codec(tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens,
                            stop_token_ids=(tokenizer.token_to_id(EOS),))
    problems = [p for f in families for level in levels
                for p in generate(per_cell, seed=seed, split="eval", families=(f,), levels=(level,), unique=True)]
    fence_ids = fence_start_ids(decode, model.config.vocab_size)
    p_code = first_token_code_prob(model, [encode(build_prompt(p.question).text) for p in problems], fence_ids)
    rows: list[RegionRow] = []
    options = sandbox_options or SandboxOptions(timeout_s=5.0)
    with Sandbox(options) as sandbox:
        for mode in modes:
            # Forced prose: the fence-start ids banned at every sampled step.
            mode_params = replace(params, banned_token_ids=tuple(fence_ids)) if mode == "prose" else params
            longest = max(len(encode(build_prompt(p.question, mode=mode).text)) for p in problems)
            per_seq = -(-(longest + max_new_tokens) // 16)
            engine = Engine(model, num_blocks=per_seq * min(len(problems), 256), block_size=16,
                            max_num_seqs=256, detokenize=decode)
            loop = RolloutLoop(engine, sandbox, encode=encode, decode=decode, max_code_calls=2, max_tool_tokens=64)
            for p in problems:
                prompt = build_prompt(p.question, mode=mode)
                seq = engine.add(encode(prompt.text), loop.sampling_params(mode_params))
                if prompt.response_prefix:
                    engine.append(seq, encode(prompt.response_prefix))  # forced response tokens (loss mask 0)
                loop.submit(seq, p.answer)
            records = loop.run_until_done()
            cells: dict[tuple[str, int], list] = {}
            for p, r, q in zip(problems, records, p_code):
                cells.setdefault((p.family, p.level), []).append((r, q))
            for (family, level), rq in cells.items():
                rows.append(RegionRow(family=family, level=level, mode=mode, n=len(rq),
                                      correct=sum(r.reward == 1.0 for r, _ in rq),
                                      used_code=sum(r.used_code for r, _ in rq),
                                      p_code=sum(q for _, q in rq) / len(rq) if mode == "autonomous" else None))
    return rows


@torch.no_grad()
def first_token_code_prob(model: CausalLM, prompts: Sequence[list[int]], fence_ids: Iterable[int]) -> list[float]:
    """For each prompt, the probability that the model's next token starts a python cell (one packed forward)."""
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=model.device)
    bounds = [0]
    for p in prompts:
        bounds.append(bounds[-1] + len(p))
    hidden = model.forward_hidden(ids, cu_seqlens=bounds)
    last = torch.tensor(bounds[1:], device=model.device) - 1
    probs = model.logits(hidden[last]).float().softmax(dim=-1)
    return probs[:, sorted(fence_ids)].sum(dim=-1).tolist()


def format_regions(rows: Sequence[RegionRow]) -> str:
    """A table: one line per (family, level), one accuracy column per mode, and for the autonomous mode the share
    of greedy rollouts that used code and the mean first-token probability of code."""
    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    table: dict[tuple[str, int], dict[str, RegionRow]] = {}
    for r in rows:
        table.setdefault((r.family, r.level), {})[r.mode] = r
    head = "family  level  " + "  ".join(f"{m:>10}" for m in modes)
    if "autonomous" in modes:
        head += "  greedy code rate  p(code)"
    lines = [head]
    for (family, level), by_mode in table.items():
        line = f"{family:<7} {level:>5}  " + "  ".join(
            f"{by_mode[m].accuracy:>10.2f}" if m in by_mode else f"{'-':>10}" for m in modes)
        if "autonomous" in by_mode:
            a = by_mode["autonomous"]
            line += f"  {a.used_code / a.n:>16.2f}  {a.p_code:>7.2f}"
        lines.append(line)
    return "\n".join(lines)
