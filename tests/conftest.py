"""Test session setup: without a GPU, Triton kernels run in the Triton interpreter on CPU tensors; a sandbox for
the rollout-driven tests (the warmed-up tiny model is in the repository's root conftest.py, shared with bench/).

TRITON_INTERPRET must be set before any `@triton.jit` decorator runs, i.e. before a kernel module is
imported, which is why it is set here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def sandbox():
    """A code sandbox with the default run's 5 s cell timeout, for the rollout-driven tests (modules that need other
    limits define their own)."""
    from acim_fast.execution.sandbox import Sandbox, SandboxOptions

    with Sandbox(SandboxOptions(timeout_s=5.0)) as box:
        yield box


@pytest.fixture(scope="session")
def tensorboard_scalars():
    """A function: run directory -> {tag: [(step, value), ...]} of its TensorBoard event files, read back with
    TensorBoard's own EventAccumulator (which applies purge_step, as TensorBoard shows it)."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

    def read(run_dir):
        events = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
        events.Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    return read
