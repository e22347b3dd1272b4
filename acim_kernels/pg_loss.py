"""Triton row function of the policy loss: online log-sum-exp, target gather, loss epilogue and dlogits.

One program handles one row of a logits chunk [r, V] in two sweeps over vocabulary blocks: first online
statistics (running max, sum of exp, sum of exp * z for the entropy) reduced to the row's log-sum-exp, target
log-prob and entropy; then, in the gradient modes, dL/dlogits = (g_logp (onehot - p) - g_H p (log p + H)) / T
written over the chunk in place (each block is read before it is written, by the same program). In `epilogue`
mode the per-token loss of a token-level objective and its dL/dlogp are computed in the kernel between the
sweeps; in `grads` mode (gspo) dL/dlogp and dL/dH come from outside. The formulas mirror `pg_loss_ref.token_loss`.

It does not do the matmul producing the chunk (cuBLAS, in `pg_loss_chunked.linear_loss`). It imports triton at
import time: `acim_kernels` imports it only when the Triton implementation is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pg_loss_chunked import RowsResult
from .pg_loss_ref import LossConfig, TokenInputs

_STATS, _EPILOGUE, _GIVEN = 0, 1, 2
_OBJECTIVE_CODES = {"ppo": 0, "clip": 1, "tis": 2}


@triton.jit
def _policy_rows_kernel(
    logits_ptr, stride, targets_ptr, logp_ptr, entropy_ptr, loss_ptr, g_logp_ptr, g_entropy_ptr,
    old_ptr, adv_ptr, weight_ptr, is_weight_ptr, ref_ptr, sft_ptr,
    V, temperature, eps_low, eps_high, dual_clip, tis_cap, kl_coef, entropy_coef, sft_coef, clamp,
    MODE: tl.constexpr, OBJECTIVE: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_IS: tl.constexpr,
    HAS_KL: tl.constexpr, HAS_SFT: tl.constexpr, NEED_ENTROPY: tl.constexpr, ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    cols = tl.arange(0, BLOCK_V)

    # Sweep 1, per lane: running max M, S = sum exp(z - M) and D = sum exp(z - M) (z - M), rescaled
    # whenever the lane's max grows. D is kept relative to M so large logits lose nothing to cancellation.
    run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_V], tl.float32)
    run_dot = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        z = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32) / temperature
        new_max = tl.maximum(run_max, z)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # keeps -inf - -inf out
        rescale = tl.exp(run_max - shift)
        e = tl.exp(z - shift)
        if NEED_ENTROPY:
            moved = tl.where(rescale > 0, run_max - shift, 0.0)
            run_dot = rescale * (run_dot + moved * run_sum) + e * tl.where(e > 0, z - shift, 0.0)
        run_sum = run_sum * rescale + e
        run_max = new_max
    row_max = tl.max(run_max, 0)
    row_shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    lane_factor = tl.exp(run_max - row_shift)
    total = tl.sum(run_sum * lane_factor, 0)
    log_total = tl.log(total)
    lse = row_shift + log_total
    target = tl.load(targets_ptr + row)
    logp = (tl.load(base + target).to(tl.float32) / temperature - row_shift) - log_total
    tl.store(logp_ptr + row, logp)
    entropy = 0.0
    if NEED_ENTROPY:
        lane_moved = tl.where(lane_factor > 0, run_max - row_shift, 0.0)
        dot = tl.sum(lane_factor * (run_dot + lane_moved * run_sum), 0)
        entropy = log_total - dot / total
        tl.store(entropy_ptr + row, entropy)

    if MODE != 0:
        g_entropy = 0.0
        if MODE == 1:
            # The loss epilogue: w * l and dL/dlogp for one token (see policy_loss_ref.token_loss).
            w = tl.load(weight_ptr + row)
            adv = tl.load(adv_ptr + row)
            raw = logp - tl.load(old_ptr + row)
            log_ratio = tl.minimum(tl.maximum(raw, -clamp), clamp)
            passes = (raw >= -clamp) & (raw <= clamp)  # clamp passes its gradient inclusively
            ratio = tl.exp(log_ratio)
            if OBJECTIVE == 2:
                capped = tl.minimum(ratio, tis_cap)
                term = -capped * adv * logp
                g_logp = -capped * adv
            else:
                low = 1.0 - eps_low
                high = 1.0 + eps_high
                clipped = -tl.minimum(tl.maximum(ratio, low), high) * adv
                in_band = (ratio >= low) & (ratio <= high)
                g_unclipped = tl.where(passes, -adv * ratio, 0.0)
                if OBJECTIVE == 1:
                    term = clipped
                    g_logp = tl.where(in_band, g_unclipped, 0.0)
                else:
                    unclipped = -ratio * adv
                    take_clipped = clipped > unclipped
                    term = tl.where(take_clipped, clipped, unclipped)
                    g_logp = tl.where(take_clipped & ~in_band, 0.0, g_unclipped)
                    if HAS_DUAL:
                        bound = -dual_clip * adv
                        bounded = (adv < 0) & (bound < term)
                        term = tl.where(bounded, bound, term)
                        g_logp = tl.where(bounded, 0.0, g_logp)
            if HAS_IS:
                is_weight = tl.load(is_weight_ptr + row)
                term = term * is_weight
                g_logp = g_logp * is_weight
            if HAS_KL:
                raw_kl = tl.load(ref_ptr + row) - logp
                x = tl.minimum(tl.maximum(raw_kl, -clamp), clamp)
                term += kl_coef * (tl.exp(x) - x - 1.0)
                g_logp += tl.where((raw_kl >= -clamp) & (raw_kl <= clamp), -kl_coef * (tl.exp(x) - 1.0), 0.0)
            if ENTROPY_GRAD:
                term -= entropy_coef * entropy
                g_entropy = -entropy_coef * w
            if HAS_SFT:
                sft = tl.load(sft_ptr + row)
                term -= sft_coef * sft * logp
                g_logp -= sft_coef * sft
            tl.store(loss_ptr + row, tl.where(w != 0, w * term, 0.0))
            g_logp = w * g_logp
        else:
            g_logp = tl.load(g_logp_ptr + row)
            if ENTROPY_GRAD:
                g_entropy = tl.load(g_entropy_ptr + row)

        # Sweep 2: dL/dlogits, over the chunk in place.
        for start in range(0, V, BLOCK_V):
            in_row = start + cols < V
            z = tl.load(base + start + cols, mask=in_row, other=float("-inf")).to(tl.float32) / temperature - lse
            p = tl.exp(z)
            if ENTROPY_GRAD:
                grad = -p * (g_logp + g_entropy * (tl.where(p > 0, z, 0.0) + entropy))
            else:
                grad = -p * g_logp
            grad = tl.where(start + cols == target, grad + g_logp, grad) / temperature
            tl.store(base + start + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


# Largest vocabulary block per loop step. Under the interpreter every step costs milliseconds, so
# fewer, larger blocks are faster there; tests lower it to exercise several blocks at small V.
BLOCK_V_MAX = {"cuda": 4096, "cpu": 16384}


def _block_size(vocab: int, device: torch.device) -> int:
    return min(triton.next_power_of_2(vocab), BLOCK_V_MAX[device.type])


def triton_rows(logits: torch.Tensor, inputs: TokenInputs, config: LossConfig, *,
                grads: tuple[torch.Tensor, torch.Tensor | None] | None = None, epilogue: bool = False) -> RowsResult:
    """The chunk row function in Triton (same contract as `pg_loss_chunked.torch_rows`).

    dlogits is written over `logits` (the caller's scratch chunk), in its dtype.
    """
    assert logits.dim() == 2 and logits.stride(1) == 1, "rows must be contiguous"
    if epilogue and not config.token_level:
        raise AssertionError("gspo couples tokens: use a statistics pass and `grads`")
    rows, vocab = logits.shape
    device = logits.device
    mode = _EPILOGUE if epilogue else _GIVEN if grads is not None else _STATS
    logp = torch.empty(rows, dtype=torch.float32, device=device)
    entropy = torch.empty_like(logp) if config.needs_entropy else logp
    loss = torch.empty_like(logp) if epilogue else logp

    def f32(tensor: torch.Tensor | None) -> torch.Tensor:
        return logp if tensor is None else tensor.to(torch.float32).contiguous()

    g_logp, g_entropy = grads if grads is not None else (None, None)
    entropy_grad = config.entropy_coef != 0.0 and mode != _STATS
    _policy_rows_kernel[(rows,)](
        logits, logits.stride(0), inputs.targets, logp, entropy, loss, f32(g_logp), f32(g_entropy),
        f32(inputs.old_logp), f32(inputs.advantages), f32(inputs.weight), f32(inputs.rollout_is_weight),
        f32(inputs.ref_logp), f32(inputs.sft_mask),
        vocab, config.temperature, config.eps_low, config.eps_high, config.dual_clip or 0.0,
        config.tis_cap, config.kl_coef, config.entropy_coef, config.sft_coef, config.log_ratio_clamp,
        MODE=mode, OBJECTIVE=_OBJECTIVE_CODES.get(config.objective, 0), HAS_DUAL=config.dual_clip is not None,
        HAS_IS=inputs.rollout_is_weight is not None, HAS_KL=config.kl_coef != 0.0, HAS_SFT=config.sft_coef != 0.0,
        NEED_ENTROPY=config.needs_entropy, ENTROPY_GRAD=entropy_grad, BLOCK_V=_block_size(vocab, device),
        num_warps=8 if device.type == "cuda" else 1,
    )
    return RowsResult(logp, entropy if config.needs_entropy else None,
                      loss.sum() if epilogue else None, logits if mode != _STATS else None)

