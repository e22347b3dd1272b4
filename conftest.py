"""Shared by tests/ and bench/: the warmed-up tiny model of the embedded default (made once per session), and the
`slow` marker for every test that needs it or starts several processes, so `pytest -m "not slow"` is a quick loop."""

import os

import pytest


@pytest.fixture(scope="session")
def warm_model(tmp_path_factory):
    """The embedded tiny model after the default warm-up SFT (what `python -m acim_fast.run` starts from), made once
    per session (~1.5 min on 2 cores): the E-step, M-step and run tests need a model that solves some problems.
    ACIM_WARM_MODEL=DIR reuses one made earlier by `acim_fast.embedded.warmup.warm_up(DIR)` (to iterate
    on those tests quickly)."""
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


def pytest_collection_modifyitems(items):
    # The warm-up alone takes ~1.5 min: whatever needs the warmed-up model is slow, whatever else it does; so is
    # whatever starts several processes. Other slow tests carry the mark themselves.
    for item in items:
        if "warm_model" in getattr(item, "fixturenames", ()) or item.get_closest_marker("dist"):
            item.add_marker(pytest.mark.slow)
