"""Peak memory of one step of a benchmark, above what was allocated before it, and the summaries' side-by-side
ratios (`ratios`) and device label (`device_name`).

`peak_bytes(step, reset, script, arg)`: on CUDA the allocator's peak (`cuda_step_peak_bytes`, in this process); on
the CPU the peak resident set, measured in a fresh process: `peak_rss_bytes(script, arg)` runs `python script arg`
with glibc's mmap threshold pinned low, so that freed blocks leave the resident set at once and the high-water mark
is the true peak. The script ends by printing `step_peak_bytes(step, reset)`: one warm-up step (one-time costs such
as compilation, thread pools and allocator arenas stay out), `reset()` (e.g. drop gradients, so that the measured
step allocates them afresh), then the high-water mark of a second step above the resident set just before it. Linux
only (/proc/self).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def peak_rss_bytes(script: str, arg: str) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, script, arg], env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def step_peak_bytes(step: Callable[[], object], reset: Callable[[], object] = lambda: None) -> int:
    def status(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
        return int(line.split()[1]) * 1024

    step()
    reset()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current resident set
    base = status("VmRSS")
    step()
    return status("VmHWM") - base


def cuda_step_peak_bytes(step: Callable[[], object], reset: Callable[[], object] = lambda: None) -> int:
    """As `step_peak_bytes`, with the CUDA allocator's peak."""
    step()
    reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_bytes(step: Callable[[], object], reset: Callable[[], object], script: str, arg: str) -> int:
    """`cuda_step_peak_bytes(step, reset)` when CUDA is available, else `peak_rss_bytes(script, arg)`, where running
    `script` with `arg` must measure the same step on the CPU."""
    return cuda_step_peak_bytes(step, reset) if torch.cuda.is_available() else peak_rss_bytes(script, arg)


def ratios(row: dict[str, float], base: dict[str, float]) -> tuple[float, float]:
    """(time, peak memory) of `row` over the baseline's (its "ms" and "peak_mib"); nan where the baseline lacks one."""
    time_ratio = row["ms"] / base["ms"] if base.get("ms") else float("nan")
    mem_ratio = row["peak_mib"] / base["peak_mib"] if base.get("peak_mib") else float("nan")
    return time_ratio, mem_ratio


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"

