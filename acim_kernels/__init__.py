"""acim_kernels: fused training kernels (Triton) with pure-PyTorch references, usable by any PyTorch trainer.

    from acim_kernels import policy_loss, policy_loss_from_logits, LossConfig

Imports with torch alone; Triton is loaded only when a Triton implementation is asked for.
"""

from .fused_loss import policy_loss, policy_loss_from_logits
from .pg_loss_ref import LossConfig, LossOutput

__all__ = ["LossConfig", "LossOutput", "policy_loss", "policy_loss_from_logits"]
