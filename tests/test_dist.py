"""acim_fast.train.dist: one M-step under torchrun with 2 CPU processes (FSDP2 on gloo) equals the single-process step,
KL term against a sharded reference included, and with the GPU's bf16 mixed precision tracks it; a 2-process run
equals a 1-process run and resumes on another world size. CPU only, even on a GPU machine."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acim_fast.data import Problem, shuffle
from acim_fast.train.dist import Dist

STEP = Path(__file__).with_name("dist_mstep_step.py")
CPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPU: 2 ranks need no 2 GPUs


def _run(args, out, *extra):
    done = subprocess.run([sys.executable, *args, str(STEP), str(out), *extra], capture_output=True, text=True,
                          timeout=300, env=CPU)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


TORCHRUN_2 = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.dist
def test_two_process_fsdp_step_equals_the_single_process_step(tmp_path):
    """Also with activation checkpointing, where backward recomputes each block inside FSDP's per-block gathers. The
    KL's reference is sharded too: after the M-step each rank holds half of its bytes, not a gathered copy."""
    one = _run([], tmp_path / "one.pt")
    assert one["metrics"]["mstep/kl"] > 0.01  # another model: the KL term and its gradient take part
    for flags in ((), ("checkpointed",)):
        two = _run(TORCHRUN_2, tmp_path / "two.pt", *flags)
        assert set(one["metrics"]) == set(two["metrics"])
        for key, value in one["metrics"].items():  # loss, kl, grad norm, clip fractions, behaviour gap ...
            assert abs(value - two["metrics"][key]) < 1e-6, (flags, key)
        ((whole, total, _),) = one["reference_bytes"]
        assert sum(held for held, _, _ in two["reference_bytes"]) == whole == total
        for held, _, sharded in two["reference_bytes"]:  # dim-0 shards: halves up to one row of a tensor
            assert sharded and abs(held - whole / 2) <= 0.01 * whole, (held, whole)
        assert one["metrics"]["mstep/steps"] == two["metrics"]["mstep/steps"] == 1
        moved = 0.0
        for name, value in one["state"].items():
            torch.testing.assert_close(two["state"][name], value, rtol=0, atol=1e-5)
            moved = max(moved, (value - one["initial"][name]).abs().max().item())
        assert moved > 1e-5, "the step changed nothing: the comparison would be empty"
        if not flags:
            plain_calls = two["block_calls"]
    # A block's calls without autograd (the behaviour-gap pass) are unchanged; those with autograd double: each
    # training forward, and its recomputation in backward.
    assert two["block_calls"] == [plain_calls[0], 2 * plain_calls[1]] and plain_calls[1] > 0


@pytest.mark.dist
def test_mixed_precision_step_computes_in_bf16_and_tracks_the_fp32_step(tmp_path):
    """The GPU's FSDP2 policy (bf16 parameters for compute, fp32 gradient reduction, fp32 master shards), run on
    2 CPU processes: gloo carries bf16 as nccl does, so only the device differs from the GPU path."""
    one = _run([], tmp_path / "one.pt")
    mixed = _run(TORCHRUN_2, tmp_path / "mixed.pt", "mixed")
    assert one["compute_dtypes"] == {(torch.float32, torch.float32)}
    assert mixed["compute_dtypes"] == {(torch.bfloat16, torch.bfloat16)}
    assert mixed["master_dtypes"] == {torch.float32}
    assert abs(mixed["metrics"]["mstep/loss"] - one["metrics"]["mstep/loss"]) < 1e-3
    assert abs(mixed["metrics"]["mstep/kl"] - one["metrics"]["mstep/kl"]) < 1e-2 * one["metrics"]["mstep/kl"]
    # The reference in bf16: 2 bytes a parameter, half of them on each rank.
    assert [total for _, total, _ in mixed["reference_bytes"]] == [one["reference_bytes"][0][1] // 2] * 2
    assert abs(mixed["metrics"]["mstep/grad_norm"] - one["metrics"]["mstep/grad_norm"]) < 1e-2
    # Adam's first step is about lr·sign(grad) per element, so compare the update's direction: bf16 rounding flips
    # the sign only of near-zero gradients (0.995 measured), while a wrong reduction or a lost shard falls far below.
    names = sorted(one["state"])
    step = {run: torch.cat([(r["state"][k] - one["initial"][k]).flatten() for k in names])
            for run, r in (("one", one), ("mixed", mixed))}
    assert torch.nn.functional.cosine_similarity(step["one"], step["mixed"], dim=0) > 0.98
    assert not torch.equal(step["one"], step["mixed"]), "bf16 compute changed nothing: it did not run"


@pytest.mark.dist
def test_two_process_run_matches_one_process_and_resumes_on_one(warm_model, tmp_path):
    """torchrun with 2 CPU processes on the reduced preset: E-step shards merge into the single-process E-step, the
    M-step equals it, and a 2-process run killed after iteration 1 resumes in ONE process (the optimiser state
    reshards on load) to the single-process result."""
    import dataclasses
    import json
    import signal
    import time

    from safetensors.torch import load_file

    from acim_fast.config import smoke_preset
    from acim_fast.run import train

    train(dataclasses.replace(smoke_preset(), model=str(warm_model), out_dir=str(tmp_path / "one")),
          log=lambda _: None)
    two = tmp_path / "two"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "acim_fast.run", "--preset", "smoke", "--model", str(warm_model),
                             "--out_dir", str(two)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env=CPU)
    deadline = time.monotonic() + 300
    while not (two / "checkpoints" / "iter_0001").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
    proc.wait()
    done = subprocess.run([sys.executable, "-m", "acim_fast.run", "--resume", str(two)], capture_output=True,
                          text=True, timeout=300, env=CPU)
    assert done.returncode == 0, done.stderr[-3000:]

    def lines(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    mine, ref = lines(two), lines(tmp_path / "one")
    assert [r["iteration"] for r in mine] == [0, 1, 2]
    for a, b in zip(mine, ref):
        for key in ("estep/rollouts", "estep/buffer", "estep/reward_mean", "eval/pass_at_1", "eval/code_use_rate",
                    "eval/selection_accuracy", "eval/labelled"):
            assert a.get(key) == b.get(key), (a["iteration"], key)
        if a["iteration"]:
            assert abs(a["mstep/loss"] - b["mstep/loss"]) < 1e-5

    # Iterations 0 and 1 ran in 2 processes, each evaluating every other held-out problem: rank 0's merged report
    # holds the one-process report's rows, in its order.
    def rows(run, it):
        return json.loads((run / "checkpoints" / f"iter_{it:04d}" / "eval.json").read_text())["problems"]

    for it in (0, 1):
        assert rows(two, it) == rows(tmp_path / "one", it)
    final = load_file(two / "checkpoints" / "iter_0002" / "model.safetensors")
    expected = load_file(tmp_path / "one" / "checkpoints" / "iter_0002" / "model.safetensors")
    for k, v in expected.items():
        torch.testing.assert_close(final[k], v, rtol=1e-4, atol=1e-5)


def _problems(n):
    return [Problem(id=str(i), problem=f"q{i}", answer=str(i), source="t") for i in range(n)]


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_shares_are_disjoint_covering_and_balanced(world_size):
    for n in (0, 1, 5, 6, 22):
        problems = shuffle(_problems(n), seed=4, epoch=2)
        shares = [Dist(rank, world_size, torch.device("cpu"), None).share(problems) for rank in range(world_size)]
        ids = [p.id for s in shares for p in s]
        assert sorted(ids) == sorted(p.id for p in problems) and len(set(ids)) == n
        sizes = [len(s) for s in shares]
        assert max(sizes) - min(sizes) <= 1
        whole = [None] * n  # what gather_shares does with the ranks' shares
        for rank, part in enumerate(shares):
            whole[rank::world_size] = part
        assert whole == problems
