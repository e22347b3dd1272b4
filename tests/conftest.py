"""Test session setup: without a GPU, Triton kernels run in the Triton interpreter on CPU tensors; the warmed-up
tiny model shared by the tests that need one.

TRITON_INTERPRET must be set before any `@triton.jit` decorator runs, i.e. before a kernel module is
imported, which is why it is set here, at collection time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def warm_model(tmp_path_factory):
    """The embedded tiny model after the default warm-up SFT (what `python -m acim_fast.run` starts from), made once
    per session (~1.5 min on 2 cores): the E-step, M-step and run tests need a model that solves some problems.
    ACIM_WARM_MODEL=DIR reuses one made earlier by `acim_fast.embedded.warmup.warm_up(DIR)` (to iterate on those tests quickly)."""
    from acim_fast.embedded.warmup import warm_up

    if os.environ.get("ACIM_WARM_MODEL"):
        return os.environ["ACIM_WARM_MODEL"]
    path = tmp_path_factory.mktemp("warm") / "tiny"
    warm_up(path)
    return path


@pytest.fixture(scope="session")
def policy(warm_model):
    """The warmed-up tiny model as a `RolloutModel` (model, tokenizer, stop ids)."""
    from acim_fast.execution.rollout_model import load_rollout_model

    return load_rollout_model(warm_model)


@pytest.fixture(scope="session")
def sandbox():
    """A code sandbox with the default run's 5 s cell timeout, for the rollout-driven tests (modules that need other
    limits define their own)."""
    from acim_fast.execution.sandbox import Sandbox, SandboxOptions

    with Sandbox(SandboxOptions(timeout_s=5.0)) as box:
        yield box
