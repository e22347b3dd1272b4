"""Benchmark session setup: summary tables handed to the `report` fixture are printed at the end.

pytest-benchmark prints one timing table per run; the ratios and peak memory that our benchmarks
compute side by side go through `report` so they appear together after it.
"""

import pytest

_REPORT = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[_REPORT] = []


@pytest.fixture(scope="session")
def report(request) -> list[str]:
    """Append lines (a title first) to print them in the terminal summary."""
    return request.config.stash[_REPORT]


def pytest_terminal_summary(terminalreporter, config):
    lines = config.stash.get(_REPORT, [])
    if lines:
        terminalreporter.section("benchmark summary")
        for line in lines:
            terminalreporter.write_line(line)
