"""The policy loss without an `[N x V]` tensor: row chunks, gradients computed during the forward pass.

`linear_loss(hidden, weight, bias, ...)` computes, per chunk of valid rows, `logits = hidden @ weight.T + bias`;
a pluggable row function (`torch_rows` here, exact fp32; or the Triton one of `pg_loss.py`) turns the chunk into
log-probs, entropy, loss and dlogits, which go straight into `dhidden`, `dweight`, `dbias`. `logits_loss` does the
same over materialised logits (optionally writing dlogits over them). For a token-level objective dL/dlogp_i and
dL/dH_i depend on token i alone (see `pg_loss_ref`), so gradients are computed in the forward pass with one matmul
per chunk, as eager needs, and backward only scales them (hence one backward per forward); gspo's sequence ratio
takes a statistics pass first (one extra matmul). Masked rows are skipped. Chunks are rows bounded by an element
budget, not vocabulary slices: dlogits needs the whole row's log-sum-exp, so slicing V would cost a second matmul.

It does not validate arguments (`fused_loss.py` does).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .pg_loss_ref import LossConfig, TokenInputs, token_loss


class RowsResult(NamedTuple):
    logp: torch.Tensor  # [r] fp32
    entropy: torch.Tensor | None  # [r] fp32
    loss: torch.Tensor | None  # scalar: sum of w_i l_i over the chunk (epilogue mode)
    dlogits: torch.Tensor | None  # [r, V]: dL/dlogits of the chunk (raw logits, i.e. before temperature)


# rows_fn(logits [r, V], inputs of those rows, config, *, grads=None, epilogue=False) -> RowsResult.
# `logits` is a scratch chunk owned by the caller: the row function may overwrite it.
RowsFn = Callable[..., RowsResult]


def epilogue_grads(logp: torch.Tensor, entropy: torch.Tensor | None, inputs: TokenInputs,
                   config: LossConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(sum_i w_i l_i, dL/dlogp, dL/dentropy or None) by autograd through the specification."""
    with torch.enable_grad():
        logp = logp.detach().requires_grad_()
        wants_entropy = config.entropy_coef != 0.0
        entropy = entropy.detach().requires_grad_() if wants_entropy else entropy
        loss = token_loss(logp, entropy, inputs, config).sum()
        grads = torch.autograd.grad(loss, [logp, entropy] if wants_entropy else [logp])
    return loss.detach(), grads[0], grads[1] if wants_entropy else None


def torch_rows(logits: torch.Tensor, inputs: TokenInputs, config: LossConfig, *,
               grads: tuple[torch.Tensor, torch.Tensor | None] | None = None, epilogue: bool = False) -> RowsResult:
    """The chunk row function in PyTorch: statistics, then (optionally) the loss and dlogits, in fp32."""
    # Divide (not multiply by 1/T): the scaled logits then round exactly as the reference's do.
    z = logits.float().div_(config.temperature)  # logits is the caller's scratch chunk: fp32 ones are reused
    targets = inputs.targets[:, None]
    row_max = z.amax(1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), 0.0, row_max)  # rows of -inf stay finite
    # Everything below works on shifted logits z - max: large logits lose no precision to cancellation.
    z.sub_(row_max)
    z_target = z.gather(1, targets).squeeze(1)
    entropy = None
    if config.needs_entropy:  # the entropy needs z beside p: a second [rows x V] buffer
        z.clamp_(min=torch.finfo(z.dtype).min)  # -inf logits have p = 0: keep p * z at 0, not nan
        p = z.exp()
    else:  # one buffer: z becomes p, then dlogits
        p = z.exp_()
    total = p.sum(1, keepdim=True)
    log_total = total.log()
    p.div_(total)
    logp = z_target - log_total.squeeze(1)
    if config.needs_entropy:
        entropy = log_total.squeeze(1) - torch.linalg.vecdot(p, z)
    loss = None
    if epilogue:
        loss, g_logp, g_entropy = epilogue_grads(logp, entropy, inputs, config)
    elif grads is not None:
        g_logp, g_entropy = grads
    else:
        return RowsResult(logp, entropy, None, None)
    # dlogp/dz = onehot - p;  dH/dz = -p (log p + H);  log p = (z - max) - log total;  d/dlogits = d/dz / T.
    if g_entropy is not None:
        z.sub_(log_total - entropy[:, None]).mul_(g_entropy[:, None]).add_(g_logp[:, None])
        dlogits = p.mul_(z).neg_()
    else:
        dlogits = p.mul_(-g_logp[:, None])
    dlogits.scatter_add_(1, targets, g_logp[:, None])
    if config.temperature != 1.0:
        dlogits.div_(config.temperature)
    return RowsResult(logp, entropy, loss, dlogits)


def default_chunk_rows(vocab: int, num_rows: int, budget_elements: int = 1 << 22, min_rows: int = 128) -> int:
    """Rows per chunk: a power of two with rows x V near the element budget (one fp32 buffer of that
    size is live per chunk, two with entropy), but at least `min_rows`: below that the CPU matmuls of
    a chunk (dlogits @ weight reduces over all of V) lose more time than the memory saved is worth."""
    rows = max(min_rows, budget_elements // max(vocab, 1))
    return max(1, min(num_rows, 1 << (rows.bit_length() - 1)))


def _forward_passes(num_rows: int, chunk: int, make_logits: Callable[[slice], torch.Tensor],
                    inputs: TokenInputs, config: LossConfig, rows_fn: RowsFn, wants_grad: bool,
                    consume: Callable[[slice, torch.Tensor], None]):
    """Run the row function over all chunks; return (loss, logp [n], entropy [n] or None).

    `make_logits(rows)` computes a chunk's logits; `consume(rows, dlogits)` takes its gradient.
    """
    device = inputs.targets.device
    logp = torch.empty(num_rows, dtype=torch.float32, device=device)
    entropy = torch.empty_like(logp) if config.needs_entropy else None
    chunks = [slice(start, min(start + chunk, num_rows)) for start in range(0, num_rows, chunk)]

    def keep(rows: slice, result: RowsResult) -> None:
        logp[rows] = result.logp
        if entropy is not None:
            entropy[rows] = result.entropy

    if wants_grad and config.token_level:
        loss = torch.zeros((), dtype=inputs.weight.dtype, device=device)
        for rows in chunks:
            result = rows_fn(make_logits(rows), inputs.select(rows), config, epilogue=True)
            keep(rows, result)
            loss += result.loss
            consume(rows, result.dlogits)
            del result  # free this chunk's dlogits before the next chunk's logits exist
        return loss, logp, entropy

    for rows in chunks:
        keep(rows, rows_fn(make_logits(rows), inputs.select(rows), config))
    if not wants_grad:
        return token_loss(logp.to(inputs.weight.dtype), entropy, inputs, config).sum(), logp, entropy
    loss, g_logp, g_entropy = epilogue_grads(logp.to(inputs.weight.dtype), entropy, inputs, config)
    for rows in chunks:
        given = (g_logp[rows].float(), None if g_entropy is None else g_entropy[rows].float())
        consume(rows, rows_fn(make_logits(rows), inputs.select(rows), config, grads=given).dlogits)
    return loss, logp, entropy


class _LinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, inputs: TokenInputs, config: LossConfig, rows_fn: RowsFn,
                chunk_rows: int | None):
        needs = ctx.needs_input_grad[:3]
        valid = inputs.mask.nonzero().squeeze(1)
        h = hidden.index_select(0, valid)
        picked = inputs.select(valid)
        n, vocab = h.shape[0], weight.shape[0]
        chunk = chunk_rows or default_chunk_rows(vocab, max(n, 1))
        grad_h = torch.zeros_like(h) if needs[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if needs[2] else None

        def make_logits(rows: slice) -> torch.Tensor:
            return torch.nn.functional.linear(h[rows], weight, bias)

        def consume(rows: slice, dlogits: torch.Tensor) -> None:
            dlogits = dlogits.to(weight.dtype)
            if grad_h is not None:
                torch.mm(dlogits, weight, out=grad_h[rows])
            if grad_w is not None and weight.dtype == torch.float32:
                grad_w.addmm_(dlogits.t(), h[rows])
            elif grad_w is not None:  # low precision: accumulate the chunks' products in fp32
                grad_w.add_(dlogits.t() @ h[rows])
            if grad_b is not None:
                grad_b.add_(dlogits.sum(0))

        loss, logp, entropy = _forward_passes(n, chunk, make_logits, picked, config, rows_fn, any(needs), consume)
        # Plain attributes, not save_for_backward: backward scales them in place (no second copy of
        # dweight), so it must run once; `_take` enforces that.
        ctx.grads = (valid, grad_h, grad_w, grad_b)
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return _outputs(ctx, hidden.shape[0], valid, loss, logp, entropy)

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        valid, grad_h, grad_w, grad_b = _take(ctx)
        hidden_shape, hidden_dtype, weight_dtype, bias_dtype = ctx.shapes
        dh = dw = db = None
        if grad_h is not None:
            dh = torch.zeros(hidden_shape, dtype=hidden_dtype, device=grad_h.device)
            dh.index_copy_(0, valid, grad_h.mul_(grad_loss).to(hidden_dtype))
        if grad_w is not None:
            dw = grad_w.mul_(grad_loss).to(weight_dtype)
        if grad_b is not None:
            db = grad_b.mul_(grad_loss).to(bias_dtype)
        return dh, dw, db, None, None, None, None


class _LogitsLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, inputs: TokenInputs, config: LossConfig, rows_fn: RowsFn, overwrite: bool):
        wants_grad = ctx.needs_input_grad[0]
        valid = inputs.mask.nonzero().squeeze(1)
        picked = inputs.select(valid)
        n, vocab = valid.shape[0], logits.shape[1]
        chunk = default_chunk_rows(vocab, max(n, 1))
        # dlogits of masked rows are 0. With overwrite the caller's logits become the gradient: each
        # chunk copies its rows out before its gradient is written back to the same rows, and masked
        # rows are never read, so no row is read after it has been overwritten.
        grad_logits = None
        if wants_grad and overwrite:
            grad_logits = logits.detach().masked_fill_(~inputs.mask[:, None], 0.0)
        elif wants_grad:
            grad_logits = torch.zeros_like(logits)

        def make_logits(rows: slice) -> torch.Tensor:
            return logits.index_select(0, valid[rows])

        def consume(rows: slice, dlogits: torch.Tensor) -> None:
            grad_logits.index_copy_(0, valid[rows], dlogits.to(grad_logits.dtype))

        loss, logp, entropy = _forward_passes(n, chunk, make_logits, picked, config, rows_fn, wants_grad, consume)
        ctx.grads = (grad_logits,)
        return _outputs(ctx, logits.shape[0], valid, loss, logp, entropy)

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        (grad_logits,) = _take(ctx)
        return grad_logits.mul_(grad_loss.to(grad_logits.dtype)), None, None, None, None


def _outputs(ctx, num_rows: int, valid: torch.Tensor, loss, logp, entropy):
    """(loss, logp [N], entropy [N] or None): per-row results scattered back to all rows, 0 on masked ones."""
    out_logp = torch.zeros(num_rows, dtype=torch.float32, device=logp.device).index_copy_(0, valid, logp)
    out_entropy = None if entropy is None else torch.zeros_like(out_logp).index_copy_(0, valid, entropy)
    ctx.mark_non_differentiable(*[t for t in (out_logp, out_entropy) if t is not None])
    return loss.float(), out_logp, out_entropy


def _take(ctx) -> tuple:
    """The gradients computed in forward, handed out once (they are scaled in place)."""
    grads, ctx.grads = ctx.grads, None
    if grads is None:
        raise RuntimeError("the fused policy loss holds its gradient once: backward through it twice "
                           "(retain_graph=True) is not supported; recompute the loss instead")
    return grads


def linear_loss(hidden, weight, bias, inputs: TokenInputs, config: LossConfig, rows_fn: RowsFn = torch_rows,
                chunk_rows: int | None = None):
    """(loss, logp [N], entropy [N] or None) from hidden [N, H] and weight [V, H] (+ bias [V])."""
    return _LinearLoss.apply(hidden, weight, bias, inputs, config, rows_fn, chunk_rows)


def logits_loss(logits, inputs: TokenInputs, config: LossConfig, rows_fn: RowsFn = torch_rows,
                overwrite: bool = False):
    """(loss, logp [N], entropy [N] or None) from logits [N, V]."""
    return _LogitsLoss.apply(logits, inputs, config, rows_fn, overwrite)
