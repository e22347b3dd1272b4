"""acim_fast.dist: one M-step under torchrun with 2 CPU processes (FSDP2 on gloo) equals the single-process step."""

import subprocess
import sys
from pathlib import Path

import torch

STEP = Path(__file__).with_name("dist_mstep_step.py")


def _run(args, out):
    done = subprocess.run([sys.executable, *args, str(STEP), str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_two_process_fsdp_step_equals_the_single_process_step(tmp_path):
    one = _run([], tmp_path / "one.pt")
    two = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], tmp_path / "two.pt")
    assert set(one["metrics"]) == set(two["metrics"])
    for key, value in one["metrics"].items():  # loss, grad norm, clip fractions, behaviour gap ...
        assert abs(value - two["metrics"][key]) < 1e-6, key
    assert one["metrics"]["mstep/steps"] == two["metrics"]["mstep/steps"] == 1
    moved = 0.0
    for name, value in one["state"].items():
        torch.testing.assert_close(two["state"][name], value, rtol=0, atol=1e-5)
        moved = max(moved, (value - one["initial"][name]).abs().max().item())
    assert moved > 1e-5, "the step changed nothing: the comparison would be empty"
