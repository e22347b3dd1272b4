"""The off-policy policy-gradient loss: its configuration (`LossConfig`), its per-token specification, the reference.

`policy_loss_ref` materialises the full `[N, V]` logits in fp32 (fp64 stays fp64, for gradcheck), takes
`log_softmax` and lets autograd differentiate everything: slow and memory-hungry on purpose, obviously correct, and
the oracle the chunked and Triton implementations are tested against. The loss is `sum_i w_i * l_i`, the weights
carrying the loss mask and the aggregation (`token_weights`) and depending on nothing the model computes, with

    l_i = is_w_i * pg_i  +  kl_coef * k3_i  -  entropy_coef * H_i  +  sft_coef * sft_i * (-logp_i)

(`pg_i` the configured objective's term). That split is what lets the fast implementations compute dL/dlogp per
token during the forward pass.

It does not pick an implementation or dispatch (`fused_loss.py` holds the public entry points).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import NamedTuple

import torch

OBJECTIVES = ("ppo", "clip", "tis", "gspo")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean")


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, kw_only=True, slots=True)
class LossConfig:
    """What the loss computes. Every implementation honours every field."""

    objective: str = _opt("ppo", "ppo: -min(rA, clip(r)A) [+ dual clip]; clip: -clip(r)A (AutoCode's M-step); "
                          "tis: -sg(min(r, tis_cap)) A logp; gspo: ppo on the sequence ratio exp(mean log r)")
    eps_low: float = _opt(0.2, "lower clip width: the band is [1 - eps_low, 1 + eps_high]")
    eps_high: float = _opt(0.2, "upper clip width (DAPO's clip-higher uses 0.28)")
    dual_clip: float | None = _opt(None, "dual-clip constant c > 1 bounding -rA for negative advantages (ppo, gspo)")
    tis_cap: float = _opt(2.0, "truncation C of the importance weight for the tis objective")
    temperature: float = _opt(1.0, "logits are divided by this before log_softmax (match the sampler's)")
    kl_coef: float = _opt(0.0, "weight of the k3 KL estimator exp(ref-logp) - (ref-logp) - 1; needs ref_logp")
    entropy_coef: float = _opt(0.0, "weight of the entropy bonus (subtracted from the loss)")
    return_entropy: bool = _opt(False, "return per-token entropy even when entropy_coef is 0")
    sft_coef: float = _opt(0.0, "weight of the NLL on tokens flagged by sft_mask (the decision cross-entropy)")
    aggregation: str = _opt("token_mean", "token_mean: sum over valid tokens / their count; seq_mean_token_mean: "
                            "mean over sequences of each sequence's token mean (needs seq_ids)")
    log_ratio_clamp: float = _opt(20.0, "log-ratios (and the KL's log-ratio) are clamped to +-this before exp")

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"LossConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"LossConfig.aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        # Written as `not (valid)`, so that nan (which fails every comparison) is refused too. An infinite clip
        # width, dual clip or cap is allowed (no bound); an infinite weight, temperature or clamp is not.
        finite = math.isfinite
        for name, valid, what in (
                ("eps_low", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
                ("eps_high", lambda v: v >= 0.0, ">= 0"),
                ("dual_clip", lambda v: v is None or v > 1.0, "> 1 (or None)"),
                ("tis_cap", lambda v: v > 0.0, "> 0"),
                ("temperature", lambda v: v > 0.0 and finite(v), "finite and > 0"),
                ("kl_coef", lambda v: v >= 0.0 and finite(v), "finite and >= 0"),
                ("entropy_coef", lambda v: v >= 0.0 and finite(v), "finite and >= 0"),
                ("sft_coef", lambda v: v >= 0.0 and finite(v), "finite and >= 0"),
                ("log_ratio_clamp", lambda v: v > 0.0 and finite(v), "finite and > 0")):
            if not valid(getattr(self, name)):
                raise ValueError(f"LossConfig.{name} must be {what}, got {getattr(self, name)}")

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef != 0.0 or self.return_entropy

    @property
    def token_level(self) -> bool:
        """Whether dL/dlogp_i depends on token i alone (false for gspo's sequence ratio)."""
        return self.objective != "gspo"


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    logp: torch.Tensor  # [N] fp32, detached; 0 on masked rows
    entropy: torch.Tensor | None  # [N] fp32, detached; 0 on masked rows; None unless config.needs_entropy
    metrics: dict[str, torch.Tensor]  # detached 0-d fp32 tensors, local means over valid tokens


@dataclass(kw_only=True)
class TokenInputs:
    """Per-token side inputs of the loss, validated, on the logits' device, fp32 (fp64 under gradcheck).

    `weight` already holds the mask and the aggregation: the loss is sum_i weight_i * l_i.
    `seq_index` maps each token to 0..num_seqs-1 (only when some term needs sequences).
    """

    targets: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor  # bool
    weight: torch.Tensor
    seq_index: torch.Tensor | None = None
    num_seqs: int = 0
    rollout_is_weight: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    sft_mask: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> TokenInputs:
        """The inputs of a subset of rows (an index tensor or a slice)."""
        picked = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in picked.items():
            if isinstance(value, torch.Tensor):
                picked[name] = value[rows]
        return TokenInputs(**picked)


def prepare_inputs(num_rows: int, vocab: int, device: torch.device, compute_dtype: torch.dtype, *,
                   targets, old_logp, advantages, loss_mask, seq_ids, ref_logp, rollout_is_weight, sft_mask,
                   config: LossConfig, normalizer: float | None) -> TokenInputs:
    """Validate the per-token arguments (ValueError naming the argument) and build `TokenInputs`."""

    def vector(name: str, value, required: bool) -> torch.Tensor | None:
        if value is None:
            if required:
                raise ValueError(f"{name} is required")
            return None
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.shape != (num_rows,):
            raise ValueError(f"{name} must have shape [{num_rows}], got {list(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the logits/hidden are on {device}")
        return value

    targets = vector("targets", targets, True)
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32, got {targets.dtype}")
    loss_mask = vector("loss_mask", loss_mask, True)
    mask = loss_mask != 0
    valid_targets = targets[mask]
    if valid_targets.numel() and bool(((valid_targets < 0) | (valid_targets >= vocab)).any()):
        raise ValueError(f"targets of valid (loss_mask != 0) rows must lie in [0, {vocab})")
    floats = {}
    for name, value, required in (("old_logp", old_logp, True), ("advantages", advantages, True),
                                  ("ref_logp", ref_logp, config.kl_coef > 0),
                                  ("rollout_is_weight", rollout_is_weight, False)):
        value = vector(name, value, required)
        if value is not None and not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
        floats[name] = None if value is None else value.detach().to(compute_dtype)
    sft = vector("sft_mask", sft_mask, config.sft_coef > 0)
    needs_seqs = config.objective == "gspo" or config.aggregation == "seq_mean_token_mean"
    seq_ids = vector("seq_ids", seq_ids, needs_seqs)
    if seq_ids is not None and (seq_ids.is_floating_point() or seq_ids.dtype == torch.bool):
        raise ValueError(f"seq_ids must be an integer tensor, got {seq_ids.dtype}")
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")

    seq_index, num_seqs = None, 0
    if needs_seqs:
        _, seq_index = torch.unique(seq_ids, return_inverse=True)
        num_seqs = int(seq_index.max()) + 1 if num_rows else 0
    return TokenInputs(
        targets=torch.where(mask, targets, 0).long(), mask=mask,
        weight=token_weights(mask, seq_index, num_seqs, config.aggregation, normalizer, compute_dtype),
        seq_index=seq_index, num_seqs=num_seqs,
        old_logp=floats["old_logp"], advantages=floats["advantages"], ref_logp=floats["ref_logp"],
        rollout_is_weight=floats["rollout_is_weight"],
        sft_mask=None if sft is None else (sft != 0) & mask)


def token_weights(mask: torch.Tensor, seq_index: torch.Tensor | None, num_seqs: int, aggregation: str,
                  normalizer: float | None, dtype: torch.dtype) -> torch.Tensor:
    """w_i such that sum_i w_i l_i is the aggregated loss.

    token_mean: w_i = mask_i / D, D = normalizer or the number of valid tokens.
    seq_mean_token_mean: w_i = mask_i / (n_b(i) * S), n_b the valid tokens of token i's sequence and
    S = normalizer or the number of sequences with a valid token.
    A normalizer summed over micro-batches and ranks makes the gradient independent of the split
    (for seq_mean_token_mean, a sequence must not be split across micro-batches).
    """
    m = mask.to(dtype)
    if aggregation == "token_mean":
        denominator = normalizer if normalizer is not None else m.sum().clamp(min=1.0)
        return m / denominator
    counts = torch.zeros(num_seqs, dtype=dtype, device=mask.device).index_add_(0, seq_index, m)
    sequences = normalizer if normalizer is not None else (counts > 0).sum().clamp(min=1).to(dtype)
    return m / (counts[seq_index].clamp(min=1.0) * sequences)


def log_ratio(logp: torch.Tensor, inputs: TokenInputs, config: LossConfig) -> torch.Tensor:
    """Clamped log importance ratio per token; for gspo, its sequence's mean over valid tokens."""
    raw = logp - inputs.old_logp
    if config.objective == "gspo":
        m = inputs.mask.to(raw.dtype)
        sums = torch.zeros(inputs.num_seqs, dtype=raw.dtype, device=raw.device)
        sums = sums.index_add(0, inputs.seq_index, torch.where(inputs.mask, raw, 0.0))
        counts = torch.zeros_like(sums).index_add_(0, inputs.seq_index, m).clamp(min=1.0)
        raw = (sums / counts)[inputs.seq_index]
    return raw.clamp(-config.log_ratio_clamp, config.log_ratio_clamp)


def policy_term(logp: torch.Tensor, inputs: TokenInputs, config: LossConfig) -> torch.Tensor:
    """pg_i of the configured objective (unweighted)."""
    ratio = torch.exp(log_ratio(logp, inputs, config))
    adv = inputs.advantages
    if config.objective == "tis":
        return -torch.clamp(ratio, max=config.tis_cap).detach() * adv * logp
    clipped = -torch.clamp(ratio, 1.0 - config.eps_low, 1.0 + config.eps_high) * adv
    if config.objective == "clip":
        return clipped
    unclipped = -ratio * adv
    # torch.where, not torch.maximum: on ties maximum splits the gradient between the branches.
    pg = torch.where(clipped > unclipped, clipped, unclipped)
    if config.dual_clip is not None:
        bound = -config.dual_clip * adv
        pg = torch.where((adv < 0) & (bound < pg), bound, pg)
    return pg


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref), with the log-ratio clamped like the policy ratio."""
    x = (ref_logp - logp).clamp(-config.log_ratio_clamp, config.log_ratio_clamp)
    return torch.exp(x) - x - 1.0


def token_loss(logp: torch.Tensor, entropy: torch.Tensor | None, inputs: TokenInputs,
               config: LossConfig) -> torch.Tensor:
    """w_i * l_i for every row: differentiable in logp and entropy; rows with w_i = 0 give exactly 0."""
    terms = policy_term(logp, inputs, config)
    if inputs.rollout_is_weight is not None:
        terms = terms * inputs.rollout_is_weight
    if config.kl_coef:
        terms = terms + config.kl_coef * k3_kl(logp, inputs.ref_logp, config)
    if config.entropy_coef:
        terms = terms - config.entropy_coef * entropy
    if config.sft_coef:
        terms = terms - config.sft_coef * inputs.sft_mask.to(logp.dtype) * logp
    # where, not a product: a masked row's term may be inf/nan (e.g. -inf logp) and 0 * inf is nan.
    return torch.where(inputs.weight != 0, inputs.weight * terms, 0.0)


@torch.no_grad()
def loss_metrics(logp: torch.Tensor, entropy: torch.Tensor | None, inputs: TokenInputs,
                 config: LossConfig) -> dict[str, torch.Tensor]:
    """Diagnostics as local means over valid tokens.

    clip_frac_low / clip_frac_high: fraction of valid tokens whose gradient the clip removed, at the low
    end (ratio < 1 - eps_low, advantage < 0 for ppo/gspo) or the high end (ratio > 1 + eps_high,
    advantage > 0; for tis: ratio above tis_cap). dual_clip_frac: tokens bounded by the dual clip.
    """
    m = inputs.mask
    count = m.sum().clamp(min=1).float()

    def mean(values: torch.Tensor) -> torch.Tensor:
        return torch.where(m, values.float(), 0.0).sum() / count

    ratio = torch.exp(log_ratio(logp, inputs, config))
    adv = inputs.advantages
    lo, hi = ratio < 1.0 - config.eps_low, ratio > 1.0 + config.eps_high
    if config.objective == "tis":
        lo, hi = torch.zeros_like(m), ratio > config.tis_cap
    elif config.objective != "clip":
        lo, hi = lo & (adv < 0), hi & (adv > 0)
    metrics = {"ratio_mean": mean(ratio), "clip_frac_low": mean(lo), "clip_frac_high": mean(hi),
               "num_valid_tokens": m.sum().float()}
    if config.dual_clip is not None and config.objective != "tis":
        metrics["dual_clip_frac"] = mean((adv < 0) & (ratio > config.dual_clip))
    if inputs.ref_logp is not None:
        metrics["kl"] = mean(k3_kl(logp, inputs.ref_logp, config))
    if entropy is not None:
        metrics["entropy"] = mean(entropy)
    return metrics


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def policy_loss_from_logits_ref(logits: torch.Tensor, targets: torch.Tensor, *, old_logp, advantages, loss_mask,
                                seq_ids=None, ref_logp=None, rollout_is_weight=None, sft_mask=None,
                                config: LossConfig = LossConfig(), normalizer: float | None = None) -> LossOutput:
    """The specification on materialised logits [N, V]: log_softmax in fp32, gather, autograd."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {list(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    dtype = _compute_dtype(logits.dtype)
    inputs = prepare_inputs(logits.shape[0], logits.shape[1], logits.device, dtype, targets=targets,
                            old_logp=old_logp, advantages=advantages, loss_mask=loss_mask, seq_ids=seq_ids,
                            ref_logp=ref_logp, rollout_is_weight=rollout_is_weight, sft_mask=sft_mask,
                            config=config, normalizer=normalizer)
    scaled = logits.to(dtype) / config.temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    logp = logprobs.gather(1, inputs.targets[:, None]).squeeze(1)
    entropy = None
    if config.needs_entropy:
        # -sum p log p, with 0 * log 0 = 0: -inf logits must not turn into nan (also in the gradient).
        entropy = -(logprobs.exp() * torch.where(torch.isinf(logprobs), 0.0, logprobs)).sum(-1)
    loss = token_loss(logp, entropy, inputs, config).sum()
    logp_out = torch.where(inputs.mask, logp.detach(), 0.0).float()
    entropy_out = None if entropy is None else torch.where(inputs.mask, entropy.detach(), 0.0).float()
    return LossOutput(loss, logp_out, entropy_out, loss_metrics(logp.detach(), entropy_out, inputs, config))


def policy_loss_ref(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, old_logp, advantages,
                    loss_mask, bias=None, seq_ids=None, ref_logp=None, rollout_is_weight=None, sft_mask=None,
                    config: LossConfig = LossConfig(), normalizer: float | None = None) -> LossOutput:
    """The specification from hidden states: logits = hidden @ weight.T + bias, then the logits spec."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return policy_loss_from_logits_ref(logits, targets, old_logp=old_logp, advantages=advantages,
                                       loss_mask=loss_mask, seq_ids=seq_ids, ref_logp=ref_logp,
                                       rollout_is_weight=rollout_is_weight, sft_mask=sft_mask, config=config,
                                       normalizer=normalizer)
