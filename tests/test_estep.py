"""acim_fast.train.estep: the reference strategy, whitening, subsampling and samples by hand; exploration on the
warmed-up tiny model (forking from one prompt, forced decisions, decision-point siblings, determinism)."""

import math
import random

import pytest

from acim_fast.embedded.task import generate
from acim_fast.execution.prompts import CODE_TRIGGER
from acim_fast.execution.rollout import RolloutRecord
from acim_fast.train.estep import (
    EStepConfig,
    EStepResult,
    ProblemStats,
    Sample,
    _Origin,
    _sample,
    build_buffer,
    explore,
    reference_strategy,
    subsample,
    whiten,
)

# -- the reference strategy --


@pytest.mark.parametrize("form, expected", [
    # pi 0.5, Q 0.8 / 0.4: w = 0.4 / 0.2
    ("posterior", 0.4 / 0.6),
    ("tempered", 1 / (1 + math.exp(-4.0 * 0.2))),
    ("hardmax", 1.0),
])
def test_reference_strategy_forms_by_hand(form, expected):
    assert reference_strategy(0.5, 0.8, 0.4, form=form, alpha=4.0) == pytest.approx(expected)


def test_reference_strategy_ties_and_no_evidence():
    # Equal weights: hardmax prefers prose (no tool call needed), the soft forms split evenly.
    assert reference_strategy(0.5, 1.0, 1.0, form="hardmax") == 0.0
    assert reference_strategy(0.5, 1.0, 1.0, form="posterior") == pytest.approx(0.5)
    assert reference_strategy(0.5, 1.0, 1.0, form="tempered") == pytest.approx(0.5)
    for form in ("posterior", "tempered", "hardmax", "value"):
        assert reference_strategy(0.3, 0.0, 0.0, form=form) is None


def test_reference_strategy_floors_pi_so_an_untried_decision_can_win():
    # The model never codes (pi 0), but only code works: with the floor, code wins; without it, nothing has weight.
    assert reference_strategy(0.0, 1.0, 0.0, form="hardmax", pi_floor=0.1) == 1.0
    assert reference_strategy(0.0, 1.0, 0.0, form="posterior", pi_floor=0.1) == 1.0
    assert reference_strategy(0.0, 1.0, 0.0, form="posterior", pi_floor=0.0) is None
    # Posterior: the floor enters the weights, 0.1 * 0.5 vs 0.9 * 0.5.
    assert reference_strategy(0.0, 0.5, 0.5, form="posterior", pi_floor=0.1) == pytest.approx(0.1)


def test_value_form_ignores_pi_and_prefers_prose_within_the_margin():
    # pi_hat would make code win under hardmax (0.9 * 0.9 > 0.1 * 1.0); by value, prose works as well: prose.
    assert reference_strategy(0.9, 0.9, 1.0, form="hardmax") == 1.0
    assert reference_strategy(0.9, 0.9, 1.0, form="value") == 0.0
    assert reference_strategy(0.9, 1.0, 0.95, form="value", margin=0.1) == 0.0  # within the margin: prose
    assert reference_strategy(0.1, 1.0, 0.5, form="value", margin=0.1) == 1.0  # clearly better: code
    assert reference_strategy(0.5, 0.0, 0.0, form="value") is None


def test_reference_strategy_rejects_bad_input():
    with pytest.raises(ValueError, match="q_code"):
        reference_strategy(0.5, 1.5, 0.0)
    with pytest.raises(ValueError, match="form"):
        reference_strategy(0.5, 1.0, 0.0, form="argmax")


# -- whitening and subsampling --

def test_whiten_by_hand_and_per_group():
    # Rewards 1, 0, 0, 1: mean 0.5, std 0.5 -> +-1 (up to the 1e-6 guard).
    assert whiten([1, 0, 0, 1], [0] * 4) == pytest.approx([1, -1, -1, 1], abs=1e-5)
    # 1, 0, 0 : mean 1/3, std sqrt(2)/3.
    s = math.sqrt(2) / 3
    assert whiten([1, 0, 0], [0] * 3) == pytest.approx([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s], abs=1e-5)
    # Two groups: "a" has equal rewards (advantage 0), "b" is whitened on its own.
    assert whiten([1, 1, 0, 1], ["a", "a", "b", "b"]) == pytest.approx([0, 0, -1, 1], abs=1e-5)
    with pytest.raises(ValueError, match="differ in length"):
        whiten([1, 0], [0])


def test_subsample_follows_s_star_and_cycles_a_short_pool():
    pools = {"code": [0, 1, 2, 3, 4, 5, 6, 7], "prose": [8, 9, 10, 11]}
    chosen = subsample(pools, 0.75, 8, random.Random(0))
    assert sum(i < 8 for i in chosen) == 6 and sum(i >= 8 for i in chosen) == 2
    assert len(set(chosen)) == 8  # enough in each pool: no repeats
    # Hardmax on code with 3 code rollouts for 8 slots: every rollout used, evenly (3, 3, 2 times).
    chosen = subsample({"code": [0, 1, 2], "prose": [3]}, 1.0, 8, random.Random(1))
    assert sorted(chosen.count(i) for i in (0, 1, 2)) == [2, 3, 3] and 3 not in chosen
    # A share whose pool is empty is left out; the same rng seed gives the same draw.
    assert subsample({"code": [], "prose": [5, 6]}, 0.5, 4, random.Random(2)) in ([5, 6], [6, 5])
    assert subsample(pools, 0.5, 6, random.Random(3)) == subsample(pools, 0.5, 6, random.Random(3))


def _toy_sample(problem, decision, reward=1.0):
    return Sample(problem=problem, origin="free", decision=decision, prompt_ids=[1, 2], response_ids=[3],
                  behaviour_logprobs=[-0.5], loss_mask=[1], decision_mask=[1], reward=reward, advantage=0.0,
                  off_context=False)


def test_build_buffer_skips_dropped_problems_and_mixes_by_s_star():
    samples = [_toy_sample(0, "code")] * 3 + [_toy_sample(0, "prose")] * 3 + [_toy_sample(1, "code")] * 4
    stats = [ProblemStats(key="t/0", pi_code=0.5, q_code=1, q_prose=0.5, n_code=3, n_prose=3, s_code=0.5,
                          dropped=False),
             ProblemStats(key="t/1", pi_code=0.5, q_code=0, q_prose=0, n_code=4, n_prose=0, s_code=None, dropped=True)]
    cfg = EStepConfig(buffer_per_problem=4)
    em = build_buffer(samples, stats, cfg, algo="em", seed=0, iteration=1)
    assert [s.problem for s in em] == [0] * 4 and sorted(s.decision for s in em) == ["code"] * 2 + ["prose"] * 2
    grpo = build_buffer(samples, stats, cfg, algo="grpo", seed=0, iteration=1)
    assert len(grpo) == 6 and all(s.problem == 0 for s in grpo)


# -- one sample from one rollout --

def _record(response, mask, first_code_token, logprobs=None):
    return RolloutRecord(seq_id=0, prompt_ids=[7, 7, 7], response_ids=response,
                         behaviour_logprobs=logprobs or [-0.1 * (i + 1) for i in range(len(response))],
                         loss_mask=mask, finish_reason="stop", reward=1.0, answer="1", reason="correct", cells=[],
                         first_code_token=first_code_token, parent=None, fork_pos=None)


def test_forced_code_sample_cuts_the_prefix_and_flags_the_fence_token():
    # Response: 2 prefix tokens (mask 0), a fence token at 2, code, 2 tool-output tokens (mask 0), the answer.
    rec = _record([50, 51, 60, 61, 70, 71, 80], [0, 0, 1, 1, 0, 0, 1], first_code_token=2)
    cut = _sample(rec, _Origin(problem=3, kind="code", prefix=2), "code", 0.7, keep_trigger=False)
    assert cut.response_ids == [60, 61, 70, 71, 80] and cut.loss_mask == [1, 1, 0, 0, 1]
    assert cut.behaviour_logprobs == rec.behaviour_logprobs[2:] and cut.off_context
    assert cut.decision_mask == [1, 0, 0, 0, 0] and cut.advantage == 0.7 and cut.problem == 3
    kept = _sample(rec, _Origin(problem=3, kind="code", prefix=2), "code", 0.7, keep_trigger=True)
    assert kept.response_ids == rec.response_ids and kept.loss_mask == rec.loss_mask and not kept.off_context
    assert kept.decision_mask == [0, 0, 1, 0, 0, 0, 0]


def test_prose_and_sibling_samples_flag_where_prose_was_chosen():
    rec = _record([40, 41, 42], [1, 1, 1], first_code_token=None)
    prose = _sample(rec, _Origin(problem=0, kind="prose", prefix=0), "prose", -1.0, keep_trigger=False)
    assert prose.decision_mask == [1, 0, 0] and not prose.off_context
    sibling = _sample(rec, _Origin(problem=0, kind="fork", prefix=0, fork_at=2), "prose", 0.0, keep_trigger=False)
    assert sibling.decision_mask == [0, 0, 1]


# -- exploration on the warmed-up tiny model --

PROBLEMS = [p.to_problem() for p in generate(6, seed=11, split="train")]


def test_explore_forks_every_rollout_of_a_problem_from_one_prompt(policy, sandbox):
    cfg = EStepConfig(k_code=3, k_prose=3, k_free=2, decision_fork="first", fork_cap=2, buffer_per_problem=4)
    result = explore(policy, PROBLEMS, cfg, sandbox=sandbox, seed=0, iteration=1)
    m = result.metrics
    assert m["estep/rollouts"] == 6 * 8 + m["estep/siblings"] and 0 < m["estep/siblings"] <= 6 * 2
    prompt_tokens = [len(policy.prompt_ids(p.problem)[0]) for p in PROBLEMS]
    # Each prompt is computed once (its root); the 7 others of its group and the siblings reuse its blocks.
    assert m["estep/prefix_reused_tokens"] >= 7 * sum(prompt_tokens)
    assert m["estep/recomputed_tokens"] == 0
    trigger = policy.encode(CODE_TRIGGER)
    for s in result.samples:
        text = policy.decode(s.response_ids)
        assert CODE_TRIGGER not in text  # the prefix is cut ...
        if s.origin != "fork":  # (a sibling's parent may be either)
            assert s.off_context == (s.origin == "code")  # ... which changes the context the sampler saw
        assert (s.decision == "code") == ("```python" in text)
        if s.origin in ("prose", "fork"):
            assert s.decision == "prose"
        assert sum(s.decision_mask) == 1 and all(m for d, m in zip(s.decision_mask, s.loss_mask) if d)
        assert len(s.response_ids) == len(s.loss_mask) == len(s.behaviour_logprobs)
        # Tool output stays in the sample with loss mask 0 (it is context, never a target).
        if "```output" in text:
            assert 0 in s.loss_mask
    assert len(trigger) > 0
    for p, stats in enumerate(result.stats):
        mine = [s for s in result.samples if s.problem == p]
        assert stats.n_code + stats.n_prose == len(mine)
        free = [s for s in mine if s.origin == "free"]
        assert stats.pi_code == sum(s.decision == "code" for s in free) / len(free)
        code = [s.reward for s in mine if s.decision == "code"]
        assert stats.q_code == (sum(code) / len(code) if code else 0.0)
    kept = [p for p, st in enumerate(result.stats) if not st.dropped]
    assert len(result.buffer) == 4 * len(kept)


def _key(s):
    return (s.problem, s.origin, tuple(s.response_ids), s.reward)


def test_explore_is_deterministic_and_grpo_samples_unguided(policy, sandbox):
    cfg = EStepConfig(k_code=2, k_prose=2, k_free=2)
    a = explore(policy, PROBLEMS[:3], cfg, sandbox=sandbox, seed=5, iteration=2)
    b = explore(policy, PROBLEMS[:3], cfg, sandbox=sandbox, seed=5, iteration=2)
    # Same tokens and rewards; log-probs equal up to float summation order (which rollouts share a decode step
    # depends on when sandbox cells finish, and the shared-prefix attention groups them by step).
    assert [(s.response_ids, s.reward, s.advantage) for s in a.samples] == \
        [(s.response_ids, s.reward, s.advantage) for s in b.samples]
    for x, y in zip(a.samples, b.samples):
        assert x.behaviour_logprobs == pytest.approx(y.behaviour_logprobs, abs=1e-5)
    assert [s.response_ids for s in a.buffer] == [s.response_ids for s in b.buffer]
    # A problem's rollouts do not depend on the others.
    alone = explore(policy, PROBLEMS[1:2], cfg, sandbox=sandbox, seed=5, iteration=2)
    assert [s.response_ids for s in alone.samples] == [s.response_ids for s in a.samples if s.problem == 1]
    # Two "ranks" exploring problems 0, 2 and 1 merge into the result of one process exploring all three.
    merged = EStepResult.merge([explore(policy, PROBLEMS[0:3:2], cfg, sandbox=sandbox, seed=5, iteration=2),
                                explore(policy, PROBLEMS[1:3:2], cfg, sandbox=sandbox, seed=5, iteration=2)])
    assert merged.stats == a.stats
    assert [(s.problem, s.response_ids) for s in merged.buffer] == [(s.problem, s.response_ids) for s in a.buffer]
    assert sorted(map(_key, merged.samples)) == sorted(map(_key, a.samples))
    assert merged.metrics["estep/rollouts"] == a.metrics["estep/rollouts"]
    g = explore(policy, PROBLEMS[:3], cfg, algo="grpo", sandbox=sandbox, seed=5, iteration=2)
    assert g.metrics["estep/rollouts"] == 3 * 6 and {s.origin for s in g.samples} == {"free"}
    for s in g.samples:  # one decision token, chosen by the model: where its first cell opens, or its first token
        (at,) = [i for i, d in enumerate(s.decision_mask) if d]
        text = policy.decode(s.response_ids)
        assert s.loss_mask[at] == 1
        if s.decision == "code":
            assert policy.decode(s.response_ids[at:]).startswith("```python") and "```python" not in \
                policy.decode(s.response_ids[:at])
        else:
            assert at == 0 and "```python" not in text


@pytest.mark.parametrize("field, value", [("k_free", 0), ("k_code", -1), ("decision_fork", "always"),
                                          ("s_star", "argmax"), ("drop", "none"), ("temperature", 0.0),
                                          ("pi_floor", 0.5), ("advantage_group", "batch"),
                                          ("margin", 1.0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"EStepConfig.{field}"):
        EStepConfig(**{field: value})


def test_lr_zero_off_policy_step_sees_ratio_one(policy, sandbox):
    """Behaviour log-probs from the paged sampler equal the training forward's: at lr 0 every ratio is 1."""
    import copy

    from acim_fast.train.mstep import MStep, MStepConfig
    from acim_kernels import LossConfig

    cfg = EStepConfig(k_code=2, k_prose=2, k_free=2, keep_trigger=True)  # every sample keeps its sampled context
    result = explore(policy, PROBLEMS[:4], cfg, sandbox=sandbox, seed=3, iteration=1)
    assert result.buffer and not any(s.off_context for s in result.buffer)
    model = copy.deepcopy(policy.model)
    trainer = MStep(model, MStepConfig(lr=0.0, epochs=1, samples_per_step=len(result.buffer)), total_steps=1)
    metrics = trainer.train(result.buffer, LossConfig(objective="clip", sft_coef=1.0))
    print(f"largest behaviour log-prob gap: {metrics['mstep/behaviour_gap_max']:.2e}")
    assert metrics["mstep/behaviour_gap_max"] < 1e-4
    assert metrics["mstep/ratio_mean"] == pytest.approx(1.0, abs=1e-4) and metrics["mstep/clip_frac"] == 0.0
