"""Training: the E-step, the M-step and what they use (packing, optimiser, FSDP2, checkpoints)."""
