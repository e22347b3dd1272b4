"""The packed training forward's attention paths side by side (`engine.model.varlen_attention`): forward and
backward of a small decoder over one pack of many sequences, per path the device allows.

    pytest bench/bench_varlen.py --benchmark-only

On the CPU: "loop" (one SDPA call per sequence: the CPU default) against "masked" (one call per layer with a
block-diagonal causal mask, N^2 work). On CUDA also "flash" (one FlashAttention varlen call per layer: the default in
bf16/fp16), in bf16. The pack: 32 sequences of 128 tokens (4,096 tokens), as a micro-batch of short rollouts.
"""

from __future__ import annotations

import pytest
import torch

from acim_fast.engine.model import CausalLM, ModelConfig

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
PATHS = ["flash", "masked", "loop"] if CUDA else ["masked", "loop"]
SEQUENCES, LENGTH = 32, 128


@pytest.fixture(scope="module")
def model():
    config = ModelConfig.from_hf_dict({
        "model_type": "qwen2", "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 704,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": LENGTH, "tie_word_embeddings": True})
    torch.manual_seed(0)
    with torch.device(DEVICE):
        return CausalLM(config, dtype=DTYPE)


@pytest.mark.parametrize("path", PATHS)
def test_packed_forward_backward(benchmark, model, path):
    n = SEQUENCES * LENGTH
    ids = torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    cu = list(range(0, n + 1, LENGTH))

    def step():
        model.zero_grad(set_to_none=True)
        model.forward_hidden(ids, cu_seqlens=cu, varlen_path=path).float().square().mean().backward()
        if CUDA:
            torch.cuda.synchronize()

    step()  # warm-up: kernels, allocator
    benchmark.group = f"packed forward+backward, {SEQUENCES} x {LENGTH} tokens, {DEVICE} {DTYPE}"
    benchmark.pedantic(step, rounds=5, iterations=1)
