"""One M-step micro-batch (the model's forward, the fused loss, backward), with and without activation checkpointing,
and with the fused loss against the eager one at Qwen2.5's vocabulary: time and peak memory side by side.

    pytest bench/bench_mstep.py --benchmark-only

The micro-batch is what `MStep` runs: packed sequences through `CausalLM.forward_hidden` and
`acim_kernels.policy_loss` (chunked on the CPU, Triton on CUDA), then backward into every parameter. Shapes: on the
CPU a small decoder on 4 sequences of 1024 tokens; on CUDA additionally Qwen2.5-1.5B's shape (random weights, bf16)
on 4 x 4096 tokens. Peak memory: on CUDA the allocator's peak above the model and inputs; on CPU the peak resident
set above them, in a fresh process (`bench/peak_memory.py`). A summary table with the ratios closes the run.

`test_mstep_loss_at_qwen_vocab`: the same micro-batch at V = 151,936 (Qwen2.5's padded vocabulary), the loss fused
(`impl="auto"`: chunked on the CPU, Triton on CUDA, no [N x V] tensor) against eager (`impl="ref"`: the full
[N x V] fp32 logits through autograd). On the CPU a small decoder on 2 x 1024 tokens (eager's logits alone are
1.2 GiB); on CUDA also Qwen2.5-1.5B's shape on 4 x 4096.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from peak_memory import device_name, peak_bytes, ratios, step_peak_bytes

from acim_fast.engine.model import CausalLM, ModelConfig
from acim_kernels import LossConfig, policy_loss

CUDA = torch.cuda.is_available()
# name: (hidden, layers, heads, kv heads, intermediate, vocab, sequences x tokens, dtype)
SHAPES = {"small-4x1024": (256, 4, 4, 2, 704, 8192, (4, 1024), "float32")}
if CUDA:
    SHAPES["qwen2.5-1.5b-4x4096"] = (1536, 28, 12, 2, 8960, 151936, (4, 4096), "bfloat16")
# The fused loss against eager at V = 151,936: name -> shape as above.
LOSS_SHAPES = {"small-v151936-2x1024": (256, 4, 4, 2, 704, 151936, (2, 1024), "float32")}
if CUDA:
    LOSS_SHAPES["qwen2.5-1.5b-4x4096"] = SHAPES["qwen2.5-1.5b-4x4096"]
LOSS_IMPLS = {"eager": "ref", "fused": "auto"}
RESULTS: dict[tuple[str, bool], dict] = {}
LOSS_RESULTS: dict[tuple[str, str], dict] = {}


def make_step(name: str, checkpoint_layers: bool, device: str, loss: str = "fused"):
    """A closure running one micro-batch forward+backward (the loss `loss`, a LOSS_IMPLS key), and one that drops the
    gradients."""
    hidden, layers, heads, kv_heads, inter, vocab, (seqs, length), dtype = {**SHAPES, **LOSS_SHAPES}[name]
    config = ModelConfig.from_hf_dict({
        "model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": length, "tie_word_embeddings": False})
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: a 1.5B model initialised on the CPU would take a while
        model = CausalLM(config, dtype=getattr(torch, dtype))
    for p in model.parameters():  # PyTorch's default init makes the loss's logits degenerate
        torch.nn.init.normal_(p, std=0.02)
    n = seqs * length
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n,), generator=g).to(device)
    cu = torch.arange(0, n + 1, length).to(device)
    side = dict(old_logp=-torch.rand(n, generator=g) * 10, advantages=torch.randn(n, generator=g),
                loss_mask=torch.rand(n, generator=g) > 0.2)
    side = {k: t.to(device) for k, t in side.items()}
    targets = torch.roll(ids, -1)
    loss_config = LossConfig(objective="clip", sft_coef=0.0)

    def step():
        model.zero_grad(set_to_none=True)
        out = model.forward_hidden(ids, cu_seqlens=cu, checkpoint_layers=checkpoint_layers)
        policy_loss(out, model.lm_head_weight, targets, **side, config=loss_config,
                    impl=LOSS_IMPLS[loss]).loss.backward()

    return step, lambda: model.zero_grad(set_to_none=True)


@pytest.fixture(scope="module", autouse=True)
def summary(report):
    yield
    lines = [f"{'shape':<24}{'checkpointing':<15}{'ms':>10}{'x off':>8}{'peak MiB':>10}{'x off':>8}"]
    for (name, checkpointed), r in RESULTS.items():
        time_ratio, mem_ratio = ratios(r, RESULTS.get((name, False), {}))
        lines.append(f"{name:<24}{'on' if checkpointed else 'off':<15}{r['ms']:>10.1f}{time_ratio:>8.2f}"
                     f"{r['peak_mib']:>10.0f}{mem_ratio:>8.3f}")
    device = device_name()
    if RESULTS:
        report += [f"M-step micro-batch fwd+bwd on {device}, torch {torch.__version__} (median of the rounds)", *lines,
                   ""]
    lines = [f"{'shape':<24}{'loss':<8}{'ms':>10}{'x eager':>9}{'peak MiB':>10}{'x eager':>9}"]
    for (name, loss), r in LOSS_RESULTS.items():
        time_ratio, mem_ratio = ratios(r, LOSS_RESULTS.get((name, "eager"), {}))
        lines.append(f"{name:<24}{loss:<8}{r['ms']:>10.1f}{time_ratio:>9.2f}{r['peak_mib']:>10.0f}{mem_ratio:>9.3f}")
    if LOSS_RESULTS:
        report += [f"M-step micro-batch fwd+bwd, fused vs eager loss at V=151936, on {device} (median of the rounds)",
                   *lines, ""]


def measure(benchmark, name: str, checkpointed: bool, loss: str) -> dict[str, float]:
    """Time (median of the rounds) and peak memory of one micro-batch, also put in the benchmark's extra_info."""
    device = "cuda" if CUDA else "cpu"
    step, drop_grads = make_step(name, checkpointed, device, loss)
    peak = peak_bytes(step, drop_grads, __file__, json.dumps([name, checkpointed, loss]))

    def timed():
        step()
        if CUDA:
            torch.cuda.synchronize()
    benchmark.pedantic(timed, rounds=3 if device == "cpu" else 10, iterations=1, warmup_rounds=1)
    result = {"ms": benchmark.stats.stats.median * 1e3, "peak_mib": peak / 2**20}
    benchmark.extra_info.update(result)
    return result


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "activation-checkpointing"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_mstep_micro_batch(benchmark, name, checkpointed):
    RESULTS[(name, checkpointed)] = measure(benchmark, name, checkpointed, "fused")


@pytest.mark.parametrize("loss", list(LOSS_IMPLS))
@pytest.mark.parametrize("name", list(LOSS_SHAPES))
def test_mstep_loss_at_qwen_vocab(benchmark, name, loss):
    LOSS_RESULTS[(name, loss)] = measure(benchmark, name, False, loss)


if __name__ == "__main__":  # the CPU measurement of peak_bytes
    name, checkpointed, loss = json.loads(sys.argv[1])
    print(step_peak_bytes(*make_step(name, checkpointed, "cpu", loss)))
