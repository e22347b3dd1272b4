"""The M-step: off-policy updates of the model on the E-step's buffer, with the fused loss of `acim_kernels`.

`MStep` owns the optimiser and the learning-rate schedule of a run (both carry across EM iterations and are
checkpointed); `MStep.train` makes seeded passes over a buffer, packed into micro-batches, one optimiser step per
`samples_per_step` samples. `recompute_logprobs` and `behaviour_gap` compare the training forward with the sampler,
on a seeded sample of the buffer (`gap_probe`) unless the ratio's old log-probs are recomputed for all of it.
Given a frozen `reference` model (the run's starting model), the same pass computes its log-probs of the whole buffer
once per M-step, for the loss's KL term (`LossConfig.kl_coef`) and the `mstep/kl` metric.
With a `Dist` (FSDP2) every rank trains its share of each step, and a step equals the single-process step.

It does not sample, sync weights into a separate inference copy (in one process the sampler reads this very module;
with several, `acim_fast.train.dist.copy_full_weights`), or write checkpoint files (run.py).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from acim_fast.common.fields import check_int, option
from acim_fast.engine.model import CausalLM
from acim_fast.train.dist import Dist
from acim_fast.train.estep import Sample
from acim_fast.train.optim import adamw, lr_factor
from acim_fast.train.packing import Pack, Row, pack, plan, tree
from acim_kernels import LossConfig, policy_loss

BEHAVIOURS = ("sampler", "recompute")


@dataclass(kw_only=True, slots=True)
class MStepConfig:
    """How the M-step trains on a buffer (see `MStep.train`)."""

    epochs: int = option(2, "passes over the buffer per EM iteration")
    lr: float = option(1e-4, "peak learning rate")
    warmup_steps: int = option(4, "optimiser steps of linear learning-rate warm-up")
    min_lr_ratio: float = option(0.1, "the cosine decays to lr * this at the run's last step")
    weight_decay: float = option(0.0, "AdamW weight decay (matrices only)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "max global gradient norm; 0 = off")
    samples_per_step: int = option(64, "samples per optimiser step")
    micro_batch_tokens: int = option(8192, "rows (tokens) per micro-batch; a sample longer than this is an error")
    activation_checkpointing: bool = option(False, "recompute each decoder block in backward instead of storing "
                                            "its activations (for long sequences on large models: about one more "
                                            "forward of compute, a fraction of the activation memory)")
    behaviour: str = option("sampler", "old_logp of the ratio: sampler (behaviour log-probs) | recompute (training "
                          "forward before the first update)")
    behaviour_gap_samples: int = option(16, "samples (a seeded draw of those whose context the sampler saw) that "
                                        "the training forward recomputes to measure mstep/behaviour_gap_*, rather "
                                        "than a whole extra forward of the buffer; 0 = none (with behaviour "
                                        "recompute every sample is recomputed anyway)")
    tree_pack: bool = option(False, "compute each micro-batch's shared prefixes (a problem's prompt, forked "
                             "siblings' response up to the fork) once: the forward runs over the trie of its "
                             "sequences under a tree attention mask, equal to the flat forward to within rounding; "
                             "micro-batches are still cut by flat tokens")

    def __post_init__(self) -> None:
        for name, minimum in (("epochs", 1), ("warmup_steps", 0), ("samples_per_step", 1),
                              ("micro_batch_tokens", 2), ("behaviour_gap_samples", 0)):
            check_int(self, name, minimum)
        if not self.lr >= 0:  # 0 is allowed: a step that changes nothing (ratio checks)
            raise ValueError(f"MStepConfig.lr must be >= 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"MStepConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"MStepConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"MStepConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.tree_pack, bool):
            raise ValueError(f"MStepConfig.tree_pack must be a bool, got {self.tree_pack!r}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"MStepConfig.activation_checkpointing must be a bool, "
                             f"got {self.activation_checkpointing!r}")
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"MStepConfig.behaviour must be one of {BEHAVIOURS}, got {self.behaviour!r}")


def _rows(samples: Sequence[Sample], old_logps: Sequence[Sequence[float]],
          ref_logps: Sequence[Sequence[float]] | None = None) -> list[Row]:
    """Packing rows: the prompt's tokens carry zeros; response values sit on their own tokens. Per token, the loss
    reads the sample's advantage, its behaviour (or recomputed) log-prob as `old_logp`, its loss mask, its
    decision mask as `sft_mask` and, given `ref_logps`, the reference policy's log-prob as `ref_logp`."""
    rows = []
    for i, (s, old) in enumerate(zip(samples, old_logps)):
        pad = [0.0] * len(s.prompt_ids)
        values = {"loss_mask": pad + [float(m) for m in s.loss_mask],
                  "old_logp": pad + list(old),
                  "advantage": pad + [s.advantage] * len(s.response_ids),
                  "decision": pad + [float(m) for m in s.decision_mask]}
        if ref_logps is not None:
            values["ref_logp"] = pad + list(ref_logps[i])
        rows.append(Row(s.ids, values))
    return rows


def _check(samples: Sequence[Sample], micro_batch_tokens: int) -> None:
    for i, s in enumerate(samples):
        n = len(s.response_ids)
        if not (len(s.behaviour_logprobs) == len(s.loss_mask) == len(s.decision_mask) == n) or not s.prompt_ids:
            raise ValueError(f"samples[{i}]: prompt_ids must be non-empty and the response lists aligned "
                             f"({n} response tokens)")
        if len(s.ids) - 1 > micro_batch_tokens:
            raise ValueError(f"samples[{i}] has {len(s.ids)} tokens: raise MStepConfig.micro_batch_tokens "
                             f"({micro_batch_tokens}) to at least {len(s.ids) - 1}")


def _packs(rows: list[Row], micro_batch_tokens: int, dist: Dist | None) -> list[tuple[list[int], Pack]]:
    """This rank's micro-batches as (indices into `rows`, pack). With several ranks, each takes its share of the rows
    (`Dist.share`); every rank gets the same number of micro-batches (FSDP gathers parameters collectively in each
    forward), short ranks padding with an all-masked two-token pack that adds nothing to loss or gradient."""
    if dist is None:
        return [(p.rows, p) for p in pack(rows, micro_batch_tokens)]
    # Every rank's share, to count every rank's micro-batches without a collective.
    shares = [dataclasses.replace(dist, rank=r).share(range(len(rows))) for r in range(dist.world)]
    counts = [len(plan([len(rows[i].ids) for i in share], micro_batch_tokens)) for share in shares]
    share = shares[dist.rank]
    mine = [([share[j] for j in p.rows], p) for p in pack([rows[i] for i in share], micro_batch_tokens)]
    names = rows[0].values.keys() if rows else ("loss_mask", "old_logp", "advantage", "decision")
    (empty,) = pack([Row([0, 0], {k: [0.0, 0.0] for k in names})], micro_batch_tokens)
    return mine + [([], empty)] * (max(counts) - len(mine))


def _loss(model: CausalLM, p: Pack, loss: LossConfig, normalizer: float, checkpoint_layers: bool = False,
          tree_pack: bool = False):
    if tree_pack:  # shared prefixes once, then every row gathers its node's hidden state: the flat rows again
        t = tree(p)
        device = model.device
        nodes = model.forward_hidden(t.input_ids.to(device), cu_seqlens=t.blocks(),
                                     position_ids=t.position_ids.to(device), attention_mask=t.attention_mask(device),
                                     checkpoint_layers=checkpoint_layers)
        hidden = nodes.index_select(0, t.index.to(device))
    else:
        hidden = model.forward_hidden(p.input_ids.to(model.device), cu_seqlens=p.cu_seqlens,
                                      checkpoint_layers=checkpoint_layers)
    v = {k: t.to(model.device) for k, t in p.values.items()}
    return policy_loss(hidden, model.lm_head_weight, p.targets.to(model.device), old_logp=v["old_logp"],
                       advantages=v["advantage"], loss_mask=v["loss_mask"], sft_mask=v["decision"],
                       ref_logp=v.get("ref_logp"), seq_ids=p.seq_ids().to(model.device), config=loss,
                       normalizer=normalizer)


@torch.no_grad()
def recompute_logprobs(model: CausalLM, samples: Sequence[Sample], *, temperature: float = 1.0,
                       micro_batch_tokens: int = 8192, dist: Dist | None = None,
                       tree_pack: bool = False) -> list[list[float]]:
    """Each sample's response log-probs under the training forward (fp32), at `temperature`; 0.0 on tokens outside the
    loss mask, as in the sampler's behaviour log-probs."""
    _check(samples, micro_batch_tokens)
    out: list[list[float]] = [[] for _ in samples]
    was_training = model.training
    model.eval()
    config = LossConfig(temperature=temperature)
    for rows, p in _packs(_rows(samples, [s.behaviour_logprobs for s in samples]), micro_batch_tokens, dist):
        logp = _loss(model, p, config, 1.0, tree_pack=tree_pack).logp.cpu()
        for j, row in enumerate(rows):
            s = samples[row]
            # Rows of a sequence end at cu_seqlens[j + 1]; its response tokens are the last len(response) targets.
            end = int(p.cu_seqlens[j + 1])
            out[row] = logp[end - len(s.response_ids):end].tolist()
    model.train(was_training)
    if isinstance(model, FSDPModule):
        # FSDP2 keeps the root's parameters gathered from forward to backward, and a pass without backward never
        # frees them: a frozen model (the KL's reference) would hold its whole embedding and head until its next pass.
        model.reshard()
    if dist is not None:  # each rank computed its share: put every share in every rank's list
        out = dist.gather_shares(dist.share(out))
    return out


def gap_probe(samples: Sequence[Sample], n: int, seed: int) -> list[Sample]:
    """Up to `n` of the samples whose context the sampler saw unchanged (the ones `behaviour_gap` can use), drawn
    with `seed` (every rank draws the same), in buffer order."""
    candidates = [i for i, s in enumerate(samples) if not s.off_context]
    drawn = random.Random(f"mstep-gap/{seed}").sample(candidates, min(n, len(candidates)))
    return [samples[i] for i in sorted(drawn)]


def behaviour_gap(samples: Sequence[Sample], recomputed: Sequence[Sequence[float]]) -> dict[str, float]:
    """Largest and mean |sampler - training forward| log-prob gap over trained tokens of samples whose context the
    sampler saw unchanged (a forced prefix cut out of a sample changes its context on purpose); nan when there are
    none."""
    gaps = [abs(a - b) for s, r in zip(samples, recomputed) if not s.off_context
            for a, b, m in zip(s.behaviour_logprobs, r, s.loss_mask) if m]
    if not gaps:
        return {"mstep/behaviour_gap_max": float("nan"), "mstep/behaviour_gap_mean": float("nan")}
    return {"mstep/behaviour_gap_max": max(gaps), "mstep/behaviour_gap_mean": sum(gaps) / len(gaps)}


class MStep:
    """The optimiser and schedule of a run; `train` does one M-step (see the module docstring)."""

    def __init__(self, model: CausalLM, cfg: MStepConfig, *, total_steps: int, dist: Dist | None = None,
                 reference: CausalLM | None = None):
        """`reference`: the frozen policy of the KL term (needed when the loss's kl_coef > 0), placed like `model`
        (FSDP2-sharded the same way under a Dist); never trained, not part of `state_dict`."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        self.model, self.cfg, self.total_steps, self.dist = model, cfg, total_steps, dist
        self.reference = None if reference is None else reference.requires_grad_(False).eval()
        # AdamW, decay on matrices only; linear warm-up, then cosine to min_lr_ratio over the whole run's steps.
        self.optimizer = adamw(model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(
            s, warmup_steps=cfg.warmup_steps, total_steps=total_steps, min_lr_ratio=cfg.min_lr_ratio))
        self.steps = 0  # optimiser steps taken (skipped ones excluded)

    def state_dict(self) -> dict[str, Any]:
        """Optimiser (keyed by parameter name, sharded as the model is: `torch.distributed.checkpoint` saves it and
        loads it back into any world size), schedule and step count; with a Dist also the trained copy's own (fp32,
        sharded) weights under "model", since the samplers' export may be rounded to bf16."""
        state = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer),
                 "scheduler": self.scheduler.state_dict(), "steps": self.steps}
        if self.dist is not None:
            state["model"] = get_model_state_dict(self.model)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """`state` as `state_dict` gives it; without "model" the weights stay as they are (loaded from the export)."""
        if "model" in state:
            set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]

    def train(self, samples: Sequence[Sample], loss: LossConfig, *, seed: int = 0) -> dict[str, float]:
        """One M-step over `samples`: `epochs` passes in a seeded shuffled order, `samples_per_step` samples per
        optimiser step; returns its metrics (means over steps, token-weighted within a step; skipped steps counted)."""
        cfg = self.cfg
        samples = list(samples)
        _check(samples, cfg.micro_batch_tokens)
        if loss.kl_coef > 0 and self.reference is None:
            raise ValueError(f"LossConfig.kl_coef is {loss.kl_coef}: the KL term needs MStep(reference=...)")
        metrics: dict[str, float] = {"mstep/steps": 0, "mstep/skipped": 0, "mstep/samples": len(samples)}
        if not samples:
            return metrics
        # "recompute": ratio 1 at the first step (PPO's usual choice); "sampler": forced-prefix samples are truly
        # off-policy, and only a sample of the buffer is recomputed, to watch the sampler-vs-training gap.
        probed = samples if cfg.behaviour == "recompute" else gap_probe(samples, cfg.behaviour_gap_samples, seed)
        recomputed = recompute_logprobs(self.model, probed, temperature=loss.temperature,
                                        micro_batch_tokens=cfg.micro_batch_tokens, dist=self.dist,
                                        tree_pack=cfg.tree_pack) if probed else []
        metrics.update(behaviour_gap(probed, recomputed))
        old = recomputed if cfg.behaviour == "recompute" else [s.behaviour_logprobs for s in samples]
        # The reference is frozen: its log-probs of the buffer, once, serve every epoch.
        ref = None if self.reference is None else recompute_logprobs(
            self.reference, samples, temperature=loss.temperature, micro_batch_tokens=cfg.micro_batch_tokens,
            dist=self.dist, tree_pack=cfg.tree_pack)
        self.model.train()
        sums: dict[str, float] = {}
        for epoch in range(cfg.epochs):
            order = list(range(len(samples)))
            random.Random(f"mstep/{seed}/{epoch}").shuffle(order)
            for start in range(0, len(order), cfg.samples_per_step):
                batch = order[start:start + cfg.samples_per_step]
                step = self._step([samples[i] for i in batch], [old[i] for i in batch],
                                  None if ref is None else [ref[i] for i in batch], loss)
                if step is None:
                    metrics["mstep/skipped"] += 1
                    continue
                metrics["mstep/steps"] += 1
                for k, v in step.items():
                    sums[k] = sums.get(k, 0.0) + v
        for k, v in sums.items():
            metrics[k] = v / max(1, metrics["mstep/steps"])
        metrics["mstep/lr"] = self.scheduler.get_last_lr()[0]
        self.optimizer.zero_grad(set_to_none=True)  # their memory is the E-step's KV cache's until the next M-step
        self.model.eval()
        return metrics

    def _step(self, samples: list[Sample], old: list[Sequence[float]], ref: list[Sequence[float]] | None,
              loss: LossConfig) -> dict[str, float] | None:
        rows = _rows(samples, old, ref)
        # The step's global normaliser (its valid tokens, or sequences): its loss does not depend on how it is cut
        # into micro-batches, nor over how many ranks.
        per_sequence = loss.aggregation == "seq_mean_token_mean"
        normalizer = float(sum(1 for s in samples if any(s.loss_mask)) if per_sequence
                           else sum(sum(s.loss_mask) for s in samples))
        self.optimizer.zero_grad(set_to_none=True)
        if normalizer == 0:
            return None
        # The loss, the tokens and the token-weighted loss metrics stay on the device: one host sync per step.
        sums, names = None, None
        # FSDP averages gradients over ranks; each rank's loss is already a share of the global sum.
        scale = self.dist.world if self.dist is not None else 1
        for _, p in _packs(rows, self.cfg.micro_batch_tokens, self.dist):
            out = _loss(self.model, p, loss, normalizer, self.cfg.activation_checkpointing, self.cfg.tree_pack)
            (out.loss * scale).backward()
            n = p.values["loss_mask"].sum().to(out.loss.device, torch.float64)
            names = names or sorted(k for k in out.metrics if k != "num_valid_tokens")
            part = torch.stack([out.loss.detach().double(), n, *(out.metrics[k].detach().double() * n for k in names)])
            sums = part if sums is None else sums + part
        if self.dist is not None:  # summed over ranks
            sums = self.dist.sum_tensor(sums)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.tensor(0.0)
        if isinstance(norm, DTensor):  # sharded gradients: the norm of the whole
            norm = norm.full_tensor()
        total, tokens, *weighted, norm_value = torch.cat([sums, norm.reshape(1).to(sums)]).tolist()  # the sync
        if not (math.isfinite(total) and math.isfinite(norm_value)):  # skipped: the schedule does not advance
            self.optimizer.zero_grad(set_to_none=True)
            return None
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, norm)
        self.optimizer.step()
        self.scheduler.step()
        self.steps += 1
        metrics = {f"mstep/{k}": v / max(tokens, 1.0) for k, v in zip(names, weighted)}
        metrics.update({"mstep/loss": total, "mstep/grad_norm": norm_value,
                        "mstep/clip_frac": metrics["mstep/clip_frac_low"] + metrics["mstep/clip_frac_high"]})
        return metrics
