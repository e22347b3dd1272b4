"""The optimiser both training phases use (warm-up SFT and the M-step): AdamW with decay on matrices only, and a
learning-rate schedule of linear warm-up then cosine decay to a floor."""

from __future__ import annotations

import math

import torch


def adamw(model: torch.nn.Module, *, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only (norm gains and biases stay free)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, betas=betas)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up to 1 over `warmup_steps`, then cosine down to
    `min_lr_ratio` at `total_steps`, flat after."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
