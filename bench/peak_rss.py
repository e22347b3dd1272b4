"""Peak resident memory of one step on the CPU, each measurement in a fresh process.

`peak_rss_bytes(script, arg)` runs `python script arg` with glibc's mmap threshold pinned low, so that freed blocks
leave the resident set at once and the high-water mark is the true peak. The script ends by printing
`step_peak_bytes(step, reset)`: one warm-up step (one-time costs such as compilation, thread pools and allocator
arenas stay out), `reset()` (e.g. drop gradients, so that the measured step allocates them afresh), then the
high-water mark of a second step above the resident set just before it. Linux only (/proc/self).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path


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
