"""Sampler benchmarks on CPU: decode throughput and a branching (fork) workload, against transformers `generate`.

Run: `pytest bench/bench_sampler.py --benchmark-only` (a few minutes on 2 cores). The timed function of each
benchmark is our engine; the baseline (transformers, vLLM when importable) is timed once in the same test, after a
warm-up, and both land side by side in `benchmark.extra_info` (also printed): wall times, their ratio, tokens/s,
recomputed prefix tokens and peak KV memory.

Model: a random Llama-architecture checkpoint (hidden 256, 4 layers, 4 query / 2 KV heads of head_dim 64,
vocab 8192), fp32, saved with `save_pretrained` to a temp dir and loaded by both sides from it.

Branching workload (b): one 512-token prompt; 16 branches sample 128 new tokens each; when a branch has 32, 64
and 96 new tokens, a sub-branch forks off and samples until it too has 128 (so 96 + 64 + 32 more tokens per
branch): 16 * 128 + 16 * 192 = 5120 sampled tokens. transformers has no KV sharing, so it runs the 16 branches as
one batch and each fork point as one batch of 16 re-prefilled prefixes (the best it can do with `generate`).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from acim_fast.engine.model import CausalLM
from acim_fast.engine.paged_engine import Engine
from acim_fast.engine.sampling import SamplingParams

VOCAB = 8192
PROMPT_LEN, BRANCHES, NEW_TOKENS, FORK_POINTS = 512, 16, 128, (32, 64, 96)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    path = tmp_path_factory.mktemp("bench_model")
    LlamaForCausalLM(config).save_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    return path, hf, CausalLM.from_pretrained(path)


def _kv_bytes_per_token(cfg) -> int:
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4  # fp32 K and V, every layer


def _report(benchmark, capsys, name, info):
    benchmark.extra_info.update(info)
    with capsys.disabled():
        print(f"\n[{name}] " + " | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in info.items()))


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


@pytest.mark.parametrize("batch", [1, 16, 64])
def test_decode_throughput(benchmark, capsys, models, batch):
    _, hf, model = models
    prompt_len, new = 32, 64
    prompts = torch.randint(0, VOCAB, (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    params = SamplingParams(temperature=0, max_new_tokens=new)
    blocks = batch * -(-(prompt_len + new) // 16)

    def ours():
        engine = Engine(model, num_blocks=blocks, block_size=16)
        outs = engine.generate(prompts.tolist(), params)
        return engine, outs

    def theirs():
        with torch.no_grad():
            return hf.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    theirs()  # warm-up
    hf_s, ref = _timed(theirs)
    engine, outs = benchmark.pedantic(ours, rounds=2, iterations=1, warmup_rounds=1)
    ours_s = benchmark.stats.stats.min
    # Same greedy tokens (random weights: a near-tie may flip late tokens; report, do not assert timing).
    agree = sum(o.token_ids == r[prompt_len:].tolist() for o, r in zip(outs, ref))
    _report(benchmark, capsys, f"decode batch={batch}", {
        "ours_s": ours_s, "transformers_s": hf_s, "speedup_vs_transformers": hf_s / ours_s,
        "ours_tok_per_s": batch * new / ours_s, "transformers_tok_per_s": batch * new / hf_s,
        "greedy_sequences_identical": f"{agree}/{batch}",
        "ours_peak_kv_mb": engine.stats.peak_kv_bytes / 2**20,
    })


def _branching_ours(model, prompt):
    """Returns the engine (its stats count sampled, prefilled, reused and recomputed tokens)."""
    cfg_blocks = -(-(PROMPT_LEN + NEW_TOKENS) // 16) * BRANCHES * (1 + len(FORK_POINTS))
    engine = Engine(model, num_blocks=cfg_blocks, block_size=16, max_num_seqs=256)
    root = engine.add(prompt, SamplingParams(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=0))
    engine.step()  # prefill the prompt once; the root samples its first token
    branches = [root] + engine.fork(root, BRANCHES - 1, at=PROMPT_LEN)
    pending = {b: list(FORK_POINTS) for b in branches}
    while engine.has_unfinished():
        for out in engine.step():
            pending.pop(out.seq_id, None)
        for b, points in pending.items():
            if points and len(engine.output(b).token_ids) == points[0]:
                engine.fork(b, 1)  # at the branch's current end: its newest token is computed by the children
                points.pop(0)
    return engine


def _branching_transformers(hf, prompt):
    """Returns (recomputed prefix tokens, peak KV bytes of its largest cache, sampled token count)."""
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    with torch.no_grad():
        ids = torch.tensor([prompt] * BRANCHES)
        out = hf.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kw)
        prefilled, sampled = ids.numel(), out[:, PROMPT_LEN:].numel()
        for k in FORK_POINTS:
            prefix = out[:, :PROMPT_LEN + k]
            more = hf.generate(prefix, max_new_tokens=NEW_TOKENS - k, min_new_tokens=NEW_TOKENS - k, **kw)
            prefilled += prefix.numel()
            sampled += more[:, prefix.shape[1]:].numel()
    return prefilled - PROMPT_LEN, BRANCHES * (PROMPT_LEN + NEW_TOKENS), sampled


def test_branching_vs_transformers(benchmark, capsys, models):
    _, hf, model = models
    prompt = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    per_token = _kv_bytes_per_token(model.config)
    hf_s, (hf_recomputed, hf_kv_tokens, hf_sampled) = _timed(lambda: _branching_transformers(hf, prompt))
    engine = benchmark.pedantic(lambda: _branching_ours(model, prompt), rounds=1, iterations=1)
    ours_s = benchmark.stats.stats.min
    st = engine.stats
    sampled = st.sampled_tokens
    assert sampled == hf_sampled == BRANCHES * (NEW_TOKENS + sum(NEW_TOKENS - k for k in FORK_POINTS))
    _report(benchmark, capsys, "branching vs transformers", {
        "ours_s": ours_s, "transformers_s": hf_s, "speedup_vs_transformers": hf_s / ours_s,
        "sampled_tokens": sampled, "ours_tok_per_s": sampled / ours_s, "transformers_tok_per_s": sampled / hf_s,
        "ours_recomputed_prefix_tokens": st.recomputed_tokens + st.prefill_tokens - PROMPT_LEN,
        "transformers_recomputed_prefix_tokens": hf_recomputed,
        "ours_prefix_reused_tokens": st.prefix_reused_tokens, "ours_replayed_tokens": st.replayed_tokens,
        "ours_peak_kv_mb": st.peak_kv_bytes / 2**20,
        # transformers' DynamicCache: its largest batch (16 sequences of 640 tokens), before torch.cat's transient
        # copy; an analytic lower bound.
        "transformers_peak_kv_mb": hf_kv_tokens * per_token / 2**20,
        "ours_decode_steps": st.decode_steps,
    })


def test_branching_vs_vllm(benchmark, capsys, models):
    vllm = pytest.importorskip("vllm")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    path, _, model = models
    prompt = torch.randint(0, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    llm = vllm.LLM(model=str(path), skip_tokenizer_init=True, enable_prefix_caching=True, dtype="float32")

    def theirs(prompt):
        sp = [vllm.SamplingParams(temperature=1.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, seed=i,
                                  detokenize=False) for i in range(BRANCHES)]
        outs = llm.generate([{"prompt_token_ids": prompt}] * BRANCHES, sp, use_tqdm=False)
        branches = [list(o.outputs[0].token_ids) for o in outs]
        reqs, sps = [], []
        for k in FORK_POINTS:  # every fork prefix is a new request; prefix caching finds its blocks
            for i, b in enumerate(branches):
                reqs.append({"prompt_token_ids": prompt + b[:k]})
                sps.append(vllm.SamplingParams(temperature=1.0, max_tokens=NEW_TOKENS - k,
                                               min_tokens=NEW_TOKENS - k, seed=1000 + i, detokenize=False))
        llm.generate(reqs, sps, use_tqdm=False)

    # Warm up on another prompt: start-up costs paid, no prefix-cache hits on the timed run's prompt.
    theirs(torch.randint(0, VOCAB, (PROMPT_LEN,), generator=torch.Generator().manual_seed(2)).tolist())
    vllm_s, _ = _timed(lambda: theirs(prompt))
    engine = benchmark.pedantic(lambda: _branching_ours(model, prompt), rounds=1, iterations=1)
    ours_s = benchmark.stats.stats.min
    sampled = engine.stats.sampled_tokens
    _report(benchmark, capsys, "branching vs vLLM (prefix caching)", {
        "ours_s": ours_s, "vllm_s": vllm_s, "speedup_vs_vllm": vllm_s / ours_s,
        "ours_tok_per_s": sampled / ours_s, "vllm_tok_per_s": sampled / vllm_s,
        "ours_peak_kv_mb": engine.stats.peak_kv_bytes / 2**20,
    })
