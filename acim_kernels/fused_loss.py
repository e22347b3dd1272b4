"""Public entry points of the policy loss: argument checks and the choice of implementation.

`impl` selects how the loss is computed; every implementation computes the same thing:
- "ref":     `policy_loss_ref` (pg_loss_ref.py) - full fp32 logits and autograd; the specification.
- "chunked": `pg_loss_chunked` with the PyTorch row function - no [N x V] tensor; the CPU path.
- "triton":  the same chunking with the Triton row function (CUDA, or CPU under TRITON_INTERPRET=1).
- "auto":    "triton" on CUDA when Triton is installed, "chunked" otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .pg_loss_chunked import RowsFn, linear_loss, logits_loss, torch_rows
from .pg_loss_ref import (
    LossConfig,
    LossOutput,
    loss_metrics,
    policy_loss_from_logits_ref,
    policy_loss_ref,
    prepare_inputs,
)

IMPLS = ("auto", "ref", "chunked", "triton")


def _resolve(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    has_triton = importlib.util.find_spec("triton") is not None
    if impl == "auto":
        return "triton" if device.type == "cuda" and has_triton else "chunked"
    if impl == "triton":
        if not has_triton:
            raise ValueError("impl='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"impl='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1")
    return impl


def _rows_fn(impl: str) -> RowsFn:
    if impl == "triton":
        from .pg_loss import triton_rows  # imports triton: only when asked for
        return triton_rows
    return torch_rows


def _check_float(name: str, tensor, dims: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {list(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {tensor.dtype}")


def _finish(loss, logp, entropy, inputs, config) -> LossOutput:
    return LossOutput(loss, logp, entropy, loss_metrics(logp.to(inputs.weight.dtype), entropy, inputs, config))


def policy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, old_logp: torch.Tensor,
                advantages: torch.Tensor, loss_mask: torch.Tensor, bias: torch.Tensor | None = None,
                seq_ids: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                rollout_is_weight: torch.Tensor | None = None, sft_mask: torch.Tensor | None = None,
                config: LossConfig = LossConfig(), normalizer: float | None = None, impl: str = "auto",
                chunk_rows: int | None = None) -> LossOutput:
    """The clipped off-policy loss from hidden states, without materialising [N x V] logits.

    hidden [N, H] and weight [V, H] (the lm_head), bias [V] or None, all one dtype and device;
    targets [N] int; old_logp [N] (behaviour log-probs), advantages [N], loss_mask [N] (nonzero = trained);
    seq_ids [N] int (needed by gspo and seq_mean_token_mean), ref_logp [N] (needed when kl_coef > 0),
    rollout_is_weight [N] (multiplies the policy term), sft_mask [N] (tokens that also get the NLL term,
    needed when sft_coef > 0). `normalizer` is the aggregation's denominator summed over micro-batches
    and ranks (valid tokens, or valid sequences for seq_mean_token_mean); default: this call's own.
    `chunk_rows` overrides the rows per chunk of the chunked/triton paths.
    Returns LossOutput(loss, logp [N] fp32, entropy [N] or None, metrics). Gradients flow to hidden,
    weight and bias through `loss` only.
    """
    _check_float("hidden", hidden, 2)
    _check_float("weight", weight, 2)
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] disagree on H: {hidden.shape[1]} vs {weight.shape[1]}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) must match hidden "
                         f"({hidden.dtype}, {hidden.device})")
    if bias is not None:
        _check_float("bias", bias, 1)
        if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"bias must be [{weight.shape[0]}] {weight.dtype} on {weight.device}, "
                             f"got {list(bias.shape)} {bias.dtype} on {bias.device}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    impl = _resolve(impl, hidden.device)
    side = dict(old_logp=old_logp, advantages=advantages, loss_mask=loss_mask, seq_ids=seq_ids, ref_logp=ref_logp,
                rollout_is_weight=rollout_is_weight, sft_mask=sft_mask, config=config, normalizer=normalizer)
    if impl == "ref":
        return policy_loss_ref(hidden, weight, targets, bias=bias, **side)
    inputs = prepare_inputs(hidden.shape[0], weight.shape[0], hidden.device, torch.float32, targets=targets, **side)
    loss, logp, entropy = linear_loss(hidden, weight, bias, inputs, config, _rows_fn(impl), chunk_rows)
    return _finish(loss, logp, entropy, inputs, config)


def policy_loss_from_logits(logits: torch.Tensor, targets: torch.Tensor, *, old_logp: torch.Tensor,
                            advantages: torch.Tensor, loss_mask: torch.Tensor, seq_ids: torch.Tensor | None = None,
                            ref_logp: torch.Tensor | None = None, rollout_is_weight: torch.Tensor | None = None,
                            sft_mask: torch.Tensor | None = None, config: LossConfig = LossConfig(),
                            normalizer: float | None = None, impl: str = "auto",
                            overwrite_logits: bool = False) -> LossOutput:
    """The same loss on materialised logits [N, V] (same keywords as `policy_loss`).

    With `overwrite_logits=True` (chunked/triton) the gradient is written over `logits` during the
    forward pass instead of into a second [N x V] buffer: the caller's logits are destroyed.
    """
    _check_float("logits", logits, 2)
    impl = _resolve(impl, logits.device)
    side = dict(old_logp=old_logp, advantages=advantages, loss_mask=loss_mask, seq_ids=seq_ids, ref_logp=ref_logp,
                rollout_is_weight=rollout_is_weight, sft_mask=sft_mask, config=config, normalizer=normalizer)
    if impl == "ref":
        return policy_loss_from_logits_ref(logits, targets, **side)
    inputs = prepare_inputs(logits.shape[0], logits.shape[1], logits.device, torch.float32, targets=targets, **side)
    loss, logp, entropy = logits_loss(logits, inputs, config, _rows_fn(impl), overwrite_logits)
    return _finish(loss, logp, entropy, inputs, config)
