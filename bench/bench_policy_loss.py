"""Fused policy loss: forward+backward time and peak memory of every implementation, side by side.

    pytest bench/bench_policy_loss.py --benchmark-only

Cases: `eager` (the fp32 reference, full logits), `compiled` (the reference under torch.compile),
`chunked` (PyTorch, no [N x V] tensor), `triton` (GPU only: the interpreter is no speed path) and
`liger` (LigerFusedLinearGRPOLoss, only when liger-kernel happens to be installed). A summary table
with time and memory ratios against eager closes the run; with BENCH_JSON=path it is also saved.

Peak memory: on CUDA, the allocator's peak above the inputs. On CPU, the process's peak resident set
above the inputs, measured in a fresh subprocess (`bench/peak_memory.py`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from peak_memory import device_name, peak_bytes, ratios, step_peak_bytes

from acim_kernels import LossConfig, policy_loss
from acim_kernels.pg_loss_ref import policy_loss_ref

CUDA = torch.cuda.is_available()
# (N, H, V, dtype): the CPU shapes, and Qwen2.5-7B's head on GPU.
SHAPES = [(1024, 256, 32000, "float32"), (1024, 256, 151936, "float32")]
if CUDA:
    SHAPES += [(16384, 3584, 152064, "bfloat16")]
IMPLS = ["eager", "compiled", "chunked", "triton", "liger"]
CONFIG = LossConfig(objective="ppo", eps_high=0.28)
RESULTS: dict[tuple, dict] = {}


def make_inputs(n: int, h: int, v: int, dtype: str, device: str):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device, getattr(torch, dtype))
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(device, getattr(torch, dtype))
    side = dict(targets=torch.randint(0, v, (n,), generator=g), old_logp=-torch.rand(n, generator=g) * 12,
                advantages=torch.randn(n, generator=g), loss_mask=torch.rand(n, generator=g) > 0.1)
    return hidden.requires_grad_(), weight.requires_grad_(), {k: t.to(device) for k, t in side.items()}


def make_step(impl: str, hidden, weight, side):
    """A closure running one forward+backward, or None when the implementation is unavailable here."""
    if impl in ("chunked", "triton"):
        if impl == "triton" and not hidden.is_cuda:
            return None

        def loss():
            targets = side["targets"]
            rest = {k: t for k, t in side.items() if k != "targets"}
            return policy_loss(hidden, weight, targets, **rest, config=CONFIG, impl=impl).loss
    elif impl in ("eager", "compiled"):
        def reference(hidden, weight, targets, old_logp, advantages, loss_mask):
            return policy_loss_ref(hidden, weight, targets, old_logp=old_logp, advantages=advantages,
                                   loss_mask=loss_mask, config=CONFIG).loss
        fn = torch.compile(reference) if impl == "compiled" else reference

        def loss():
            return fn(hidden, weight, **side)
    else:
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError:
            return None
        liger = LigerFusedLinearGRPOLoss(beta=0.0, epsilon_low=CONFIG.eps_low, epsilon_high=CONFIG.eps_high,
                                         use_ref_model=False)
        batch = 8  # Liger wants [batch, time] with one advantage per sequence

        def loss():
            def rows(t):
                return t.reshape(batch, -1, *t.shape[1:])
            return liger(rows(hidden), weight, rows(side["targets"]), rows(side["loss_mask"]).long(),
                         rows(side["advantages"])[:, 0], old_per_token_logps=rows(side["old_logp"]))[0]

    def step():
        drop_grads(hidden, weight)
        loss().backward()
    return step


def drop_grads(*tensors: torch.Tensor) -> None:
    for t in tensors:
        t.grad = None


@pytest.fixture(scope="module", autouse=True)
def summary(report):
    yield
    lines = [f"{'N x H x V dtype':<28}{'impl':<10}{'ms':>10}{'x eager':>9}{'peak MiB':>10}{'x eager':>9}{'TFLOP/s':>9}"]
    for (n, h, v, dtype, impl), r in RESULTS.items():
        time_ratio, mem_ratio = ratios(r, RESULTS.get((n, h, v, dtype, "eager"), {}))
        lines.append(f"{f'{n}x{h}x{v} {dtype}':<28}{impl:<10}{r['ms']:>10.1f}{time_ratio:>9.2f}"
                     f"{r['peak_mib']:>10.0f}{mem_ratio:>9.3f}{r['tflops']:>9.2f}")
    device = device_name()
    report += [f"policy loss fwd+bwd on {device}, torch {torch.__version__} (median of the rounds)", *lines, ""]
    if os.environ.get("BENCH_JSON"):
        rows = [dict(zip(("n", "h", "v", "dtype", "impl"), key), **value) for key, value in RESULTS.items()]
        Path(os.environ["BENCH_JSON"]).write_text(json.dumps({"device": device, "rows": rows}, indent=2))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-H{s[1]}-V{s[2]}-{s[3]}")
def test_policy_loss_fwd_bwd(benchmark, shape, impl):
    device = "cuda" if CUDA else "cpu"
    hidden, weight, side = make_inputs(*shape, device)
    step = make_step(impl, hidden, weight, side)
    if step is None:
        pytest.skip(f"{impl} is not available on {device}")
    try:
        step()  # warm-up (and compilation)
    except Exception as error:  # e.g. torch.compile without a working compiler, a changed Liger API
        pytest.skip(f"{impl} failed here: {type(error).__name__}: {str(error)[:200]}")
    peak = peak_bytes(step, lambda: drop_grads(hidden, weight), __file__, json.dumps([*shape, impl]))

    def timed():
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    benchmark.pedantic(timed, rounds=3 if device == "cpu" else 10, iterations=1)
    n, h, v, _ = shape
    ms = benchmark.stats.stats.median * 1e3
    RESULTS[(*shape, impl)] = {"ms": ms, "peak_mib": peak / 2**20, "tflops": 8 * n * h * v / (ms * 1e-3) / 1e12}
    benchmark.extra_info.update(RESULTS[(*shape, impl)])


if __name__ == "__main__":  # the CPU measurement of peak_bytes
    n, h, v, dtype, impl = json.loads(sys.argv[1])
    hidden, weight, side = make_inputs(n, h, v, dtype, "cpu")
    print(step_peak_bytes(make_step(impl, hidden, weight, side), lambda: drop_grads(hidden, weight)))
