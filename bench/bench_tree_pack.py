"""One M-step micro-batch of tree-shaped samples, flat vs tree pack (`MStepConfig.tree_pack`): positions computed,
time and peak memory side by side.

    pytest bench/bench_tree_pack.py --benchmark-only

The micro-batch is what `MStep._loss` runs (forward, fused loss, backward into every parameter): 8 problems x 8
rollouts, a 256-token prompt per problem and 64-token responses, where 4 of each problem's rollouts are forked
siblings sharing the first 32 response tokens of another. Flat: every sequence whole (`forward_hidden` with
cu_seqlens, the device's varlen path); tree: the trie of the sequences (`packing.tree`) under its tree mask (one
SDPA call per layer with the mask), hidden states gathered back to the flat rows. Model: on the CPU a small decoder
in fp32; on CUDA additionally Qwen2.5-1.5B's shape (random weights, bf16). Peak memory as in bench_mstep.py
(`bench/peak_memory.py`).
"""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch
from peak_memory import device_name, peak_bytes, ratios, step_peak_bytes

from acim_fast.engine.model import CausalLM, ModelConfig
from acim_fast.train.estep import Sample
from acim_fast.train.mstep import _loss, _packs, _rows
from acim_fast.train.packing import tree
from acim_kernels import LossConfig

CUDA = torch.cuda.is_available()
# name: (hidden, layers, heads, kv heads, intermediate, vocab, dtype)
SHAPES = {"small": (256, 4, 4, 2, 704, 8192, "float32")}
if CUDA:
    SHAPES["qwen2.5-1.5b"] = (1536, 28, 12, 2, 8960, 151936, "bfloat16")
PROBLEMS, ROLLOUTS, FORKED, PROMPT, RESPONSE, SHARED = 8, 8, 4, 256, 64, 32
RESULTS: dict[tuple[str, bool], dict] = {}


def samples(vocab: int) -> list[Sample]:
    rng = random.Random(0)
    out = []
    for problem in range(PROBLEMS):
        prompt = [rng.randrange(3, vocab) for _ in range(PROMPT)]
        responses = [[rng.randrange(3, vocab) for _ in range(RESPONSE)] for _ in range(ROLLOUTS - FORKED)]
        responses += [r[:SHARED] + [rng.randrange(3, vocab) for _ in range(RESPONSE - SHARED)]
                      for r in responses[:FORKED]]
        for r in responses:
            out.append(Sample(problem=problem, origin="free", decision="code", prompt_ids=prompt, response_ids=r,
                              behaviour_logprobs=[-rng.uniform(0, 10) for _ in r], loss_mask=[1] * len(r),
                              decision_mask=[0] * len(r), reward=0.0, advantage=rng.choice([-1.0, 1.0]),
                              off_context=False))
    return out


def make_step(name: str, tree_pack: bool, device: str):
    hidden, layers, heads, kv_heads, inter, vocab, dtype = SHAPES[name]
    config = ModelConfig.from_hf_dict({
        "model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "max_position_embeddings": PROMPT + RESPONSE, "tie_word_embeddings": False})
    torch.manual_seed(0)
    with torch.device(device):
        model = CausalLM(config, dtype=getattr(torch, dtype))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    batch = samples(vocab)
    rows = _rows(batch, [s.behaviour_logprobs for s in batch])
    ((_, pack),) = _packs(rows, sum(len(r.ids) for r in rows), None)
    loss = LossConfig(objective="clip", sft_coef=0.0)
    normalizer = float(sum(len(s.response_ids) for s in batch))

    def step():
        model.zero_grad(set_to_none=True)
        _loss(model, pack, loss, normalizer, tree_pack=tree_pack).loss.backward()

    positions = len(tree(pack).input_ids) if tree_pack else len(pack.input_ids)
    return step, lambda: model.zero_grad(set_to_none=True), positions


@pytest.fixture(scope="module", autouse=True)
def summary(report):
    yield
    lines = [f"{'shape':<16}{'pack':<8}{'positions':>10}{'ms':>10}{'x flat':>8}{'peak MiB':>10}{'x flat':>8}"]
    for (name, tree_pack), r in RESULTS.items():
        time_ratio, mem_ratio = ratios(r, RESULTS.get((name, False), {}))
        lines.append(f"{name:<16}{'tree' if tree_pack else 'flat':<8}{r['positions']:>10}{r['ms']:>10.1f}"
                     f"{time_ratio:>8.2f}{r['peak_mib']:>10.0f}{mem_ratio:>8.3f}")
    report += [f"M-step micro-batch of {PROBLEMS} problems x {ROLLOUTS} rollouts ({PROMPT}-token prompts, "
               f"{RESPONSE}-token responses, {FORKED} forked at {SHARED}), fwd+bwd on {device_name()}, "
               f"torch {torch.__version__} (median of the rounds)", *lines, ""]


@pytest.mark.parametrize("tree_pack", [False, True], ids=["flat", "tree"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_tree_pack_micro_batch(benchmark, name, tree_pack):
    device = "cuda" if CUDA else "cpu"
    step, drop_grads, positions = make_step(name, tree_pack, device)
    peak = peak_bytes(step, drop_grads, __file__, json.dumps([name, tree_pack]))

    def timed():
        step()
        if CUDA:
            torch.cuda.synchronize()
    benchmark.pedantic(timed, rounds=3 if device == "cpu" else 10, iterations=1, warmup_rounds=1)
    RESULTS[(name, tree_pack)] = {"ms": benchmark.stats.stats.median * 1e3, "peak_mib": peak / 2**20,
                                  "positions": positions}
    benchmark.extra_info.update(RESULTS[(name, tree_pack)])


if __name__ == "__main__":  # the CPU measurement of peak_bytes
    step, drop_grads, _ = make_step(*json.loads(sys.argv[1]), "cpu")
    print(step_peak_bytes(step, drop_grads))
