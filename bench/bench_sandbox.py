"""Sandbox pool throughput and latency (pytest-benchmark): trivial cells per second, per-cell latency when
cells arrive at the 100 cells/s goal, and the same two loads with 10% of the cells looping until their
timeout, next to a baseline without them, to show that the other cells are not held back.

The first three run in both isolation modes ("namespaces", the default, and the opt-in "weak").

Run: pytest bench/bench_sandbox.py --benchmark-only  (figures are printed and stored in extra_info)
"""

import os
import statistics
import threading
import time

import pytest

from acim_fast.execution.sandbox import Sandbox, SandboxOptions

CORES = os.cpu_count() or 1
TRIVIAL = "x = 6 * 7\nprint(x)"
LOOP = "while True:\n    pass"
LOOP_TIMEOUT_S = 1.0
# 10% of 100 cells/s looping for 1 s keeps ~10 loops running: the pool needs slots beyond those.
MIX_CONCURRENCY = 32


def _percentiles_ms(latencies: list[float], prefix: str = "") -> dict[str, float]:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    figures = {"p50_ms": 1e3 * cuts[49], "p99_ms": 1e3 * cuts[98], "max_ms": 1e3 * max(latencies)}
    return {prefix + k: v for k, v in figures.items()}


def _report(benchmark, capsys, name: str, figures: dict[str, float]) -> None:
    benchmark.extra_info.update({k: round(v, 2) for k, v in figures.items()})
    with capsys.disabled():
        print(f"\n{name}: " + ", ".join(f"{k}={v:.1f}" for k, v in figures.items()))


def _submit_all(sb: Sandbox, codes: list[str], period: float) -> list[float]:
    """Submit `codes` one every `period` seconds (0: all at once); latency of each, submit to result."""
    latencies = [0.0] * len(codes)
    done = threading.Semaphore(0)
    start = time.perf_counter()
    for i, code in enumerate(codes):
        time.sleep(max(0.0, start + i * period - time.perf_counter()))
        submitted = time.perf_counter()

        def finished(_future, i=i, submitted=submitted) -> None:
            latencies[i] = time.perf_counter() - submitted
            done.release()

        sb.submit(code).add_done_callback(finished)
    for _ in codes:
        done.acquire()
    return latencies


def _mixed(n: int) -> list[str]:
    return [LOOP if i % 10 == 5 else TRIVIAL for i in range(n)]


@pytest.fixture(scope="module", params=["namespaces", "weak"])
def sandbox(request):
    """Both isolation modes side by side: what a cell's own namespaces and private root cost per cell."""
    with Sandbox(SandboxOptions(timeout_s=5.0, isolation=request.param)) as sb:
        sb.run_batch([(TRIVIAL, ())] * 20)  # warm the server
        yield sb


@pytest.fixture(scope="module")
def mix_sandbox():
    with Sandbox(SandboxOptions(timeout_s=LOOP_TIMEOUT_S, concurrency=MIX_CONCURRENCY)) as sb:
        sb.run_batch([(TRIVIAL, ())] * 20)
        yield sb


def test_trivial_cells_per_second(benchmark, capsys, sandbox):
    n = 300
    results = benchmark.pedantic(lambda: sandbox.run_batch([(TRIVIAL, ())] * n), rounds=3, iterations=1)
    assert all(r.ok for r in results)
    stats = benchmark.stats.stats
    figures = {"cells_per_s": n / stats.mean, "best_cells_per_s": n / stats.min}
    name = f"throughput, {sandbox.options.isolation} ({n} at once, concurrency {sandbox.options.concurrency})"
    _report(benchmark, capsys, name, figures)


def test_latency_one_cell_at_a_time(benchmark, capsys, sandbox):
    benchmark.pedantic(sandbox.run, args=(TRIVIAL,), rounds=200, iterations=1)
    name = f"latency, {sandbox.options.isolation}, one cell at a time"
    _report(benchmark, capsys, name, _percentiles_ms(benchmark.stats.stats.data))


def test_latency_at_100_cells_per_second(benchmark, capsys, sandbox):
    """Open loop: a cell arrives every 10 ms, as from a decoder that needs 100 cells/s."""
    n = 300
    latencies = benchmark.pedantic(_submit_all, args=(sandbox, [TRIVIAL] * n, 0.01), rounds=1, iterations=1)
    figures = {"achieved_cells_per_s": n / benchmark.stats.stats.mean} | _percentiles_ms(latencies)
    _report(benchmark, capsys, f"latency, {sandbox.options.isolation}, at 100 cells/s", figures)


def test_stream_with_ten_percent_timeouts(benchmark, capsys, mix_sandbox):
    """100 cells/s, every tenth one loops until its 1 s timeout; baseline: the same stream, no loops."""
    n = 300
    baseline = _submit_all(mix_sandbox, [TRIVIAL] * n, 0.01)
    codes = _mixed(n)
    latencies = benchmark.pedantic(_submit_all, args=(mix_sandbox, codes, 0.01), rounds=1, iterations=1)
    others = [t for t, code in zip(latencies, codes) if code == TRIVIAL]
    loops = [t for t, code in zip(latencies, codes) if code == LOOP]
    figures = _percentiles_ms(others, "others_") | _percentiles_ms(baseline, "no_loops_")
    figures |= {"loop_cells_mean_s": statistics.mean(loops), "timeout_s": LOOP_TIMEOUT_S}
    _report(benchmark, capsys, f"100 cells/s, 10% time out (concurrency {MIX_CONCURRENCY})", figures)


def test_batch_with_ten_percent_timeouts(benchmark, capsys, mix_sandbox):
    """200 cells submitted at once, every tenth one loops until its 1 s timeout; baseline: no loops.
    Latency counts the wait in the queue behind the rest of the batch."""
    n = 200
    baseline = _submit_all(mix_sandbox, [TRIVIAL] * n, 0.0)
    codes = _mixed(n)
    latencies = benchmark.pedantic(_submit_all, args=(mix_sandbox, codes, 0.0), rounds=1, iterations=1)
    others = [t for t, code in zip(latencies, codes) if code == TRIVIAL]
    figures = _percentiles_ms(others, "others_") | _percentiles_ms(baseline, "no_loops_")
    figures |= {"batch_s": benchmark.stats.stats.mean, "timeout_s": LOOP_TIMEOUT_S}
    _report(benchmark, capsys, f"batch of {n}, 10% time out (concurrency {MIX_CONCURRENCY})", figures)
