"""Test session setup: without a GPU, Triton kernels run in the Triton interpreter on CPU tensors.

TRITON_INTERPRET must be set before any `@triton.jit` decorator runs, i.e. before a kernel module is
imported, which is why it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
