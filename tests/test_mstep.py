"""acim_fast.train.mstep: the M-step loss against a hand computation on dense logits, micro-batch invariance, the NaN
guard, tool tokens kept out of the loss, recomputed log-probs, and the optimiser state round trip."""

import copy
import math
import random
import sys
from dataclasses import replace

import pytest
import torch

from acim_fast.embedded.tiny import TinyConfig, build_model, build_tokenizer
from acim_fast.train import mstep
from acim_fast.train.estep import Sample
from acim_fast.train.mstep import MStep, MStepConfig, behaviour_gap, recompute_logprobs
from acim_kernels import LossConfig

SMALL = TinyConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=32, intermediate_size=128,
                   max_position_embeddings=512, seed=0)
LOSS = LossConfig(objective="clip", sft_coef=0.5, eps_low=0.2, eps_high=0.2)


@pytest.fixture()
def model():
    return build_model(SMALL, build_tokenizer())


def _samples(n=6, seed=0, vocab=90):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(3, 8))]
        length = rng.randint(4, 12)
        response = [rng.randrange(3, vocab) for _ in range(length)]
        mask = [1] * length
        if length > 6:  # a tool-output block in the middle
            mask[3:5] = [0, 0]
        decision = [0] * length
        decision[0] = 1
        out.append(Sample(problem=i, origin="free", decision="code" if i % 2 else "prose", prompt_ids=prompt,
                          response_ids=response, behaviour_logprobs=[rng.uniform(-6, -3) for _ in range(length)],
                          loss_mask=mask, decision_mask=decision, reward=float(i % 2),
                          advantage=rng.choice([-1.0, 0.5, 1.0]), off_context=False))
    return out


def _dense_logp(model, s):
    with torch.no_grad():
        logits = model(torch.tensor(s.ids)).float()
    logp = logits.log_softmax(-1)[:-1].gather(1, torch.tensor(s.ids[1:])[:, None])[:, 0]
    return logp[len(s.prompt_ids) - 1:]  # the response tokens'


def test_loss_equals_the_hand_computation_on_dense_logits(model):
    samples = _samples()
    total, n = 0.0, 0
    for s in samples:
        logp = _dense_logp(model, s)
        for j, lp in enumerate(logp.tolist()):
            if not s.loss_mask[j]:
                continue
            r = math.exp(lp - s.behaviour_logprobs[j])
            total += -min(max(r, 0.8), 1.2) * s.advantage + LOSS.sft_coef * s.decision_mask[j] * -lp
            n += 1
    trainer = MStep(model, MStepConfig(lr=0.0, epochs=1, samples_per_step=len(samples)), total_steps=1)
    before = copy.deepcopy(model.state_dict())
    metrics = trainer.train(samples, LOSS)
    assert metrics["mstep/steps"] == 1 and metrics["mstep/skipped"] == 0
    assert metrics["mstep/loss"] == pytest.approx(total / n, rel=1e-5, abs=1e-6)
    for k, v in model.state_dict().items():  # lr 0: nothing moves
        assert torch.equal(v, before[k]), k


def test_tool_tokens_never_reach_the_loss(model):
    samples = _samples()
    # Change everything about the masked (tool-output) tokens: their ids stay context, so the loss and gradient
    # may only change through the context they give; their old log-probs and advantages must not matter at all.
    noisy = [replace(s, behaviour_logprobs=[b if m else 123.0 for b, m in zip(s.behaviour_logprobs, s.loss_mask)])
             for s in samples]
    results = []
    for batch in (samples, noisy):
        m = copy.deepcopy(model)
        trainer = MStep(m, MStepConfig(lr=1e-2, epochs=1, samples_per_step=len(batch), warmup_steps=0),
                        total_steps=1)
        results.append((trainer.train(batch, LOSS)["mstep/loss"], m.state_dict()))
    assert results[0][0] == results[1][0]
    for k in results[0][1]:
        assert torch.equal(results[0][1][k], results[1][1][k]), k


def test_a_step_does_not_depend_on_its_micro_batches_or_activation_checkpointing(model):
    samples = _samples(8, seed=1)
    longest = max(len(s.ids) for s in samples) - 1
    results = []
    for tokens, checkpointed in ((10_000, False), (longest, False), (longest, True)):
        m = copy.deepcopy(model)
        trainer = MStep(m, MStepConfig(lr=1e-2, epochs=1, samples_per_step=8, micro_batch_tokens=tokens,
                                       warmup_steps=0, grad_clip=0.0, activation_checkpointing=checkpointed),
                        total_steps=1)
        # The step's gradient, as the optimiser gets it: Adam's first update (about lr * sign) would hide it.
        grads = {}
        trainer.optimizer.register_step_pre_hook(
            lambda *_: grads.update({k: p.grad.clone() for k, p in m.named_parameters()}))
        metrics = trainer.train(samples, LOSS)
        assert all(p.grad is None for p in m.parameters()), "gradients outlived the M-step"
        results.append((metrics["mstep/loss"], grads))
    for loss, grads in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        for k, grad in results[0][1].items():
            torch.testing.assert_close(grads[k], grad, rtol=1e-5, atol=1e-8)


def _tree_samples(problems=3, rollouts=3, seed=2):
    """Rollouts sharing their problem's prompt, each with a forked sibling sharing its response up to the fork (tool
    output, loss mask 0, included), plus an identical pair and a rollout that is a prefix of another."""
    rng = random.Random(seed)
    base = _samples(problems * rollouts, seed=seed)
    out = []
    for i, s in enumerate(base):
        prompt = base[i // rollouts * rollouts].prompt_ids  # the problem's
        s = replace(s, problem=i // rollouts, prompt_ids=prompt)
        fork = rng.randint(1, len(s.response_ids) - 1)
        tail = [rng.randrange(3, 90) for _ in range(rng.randint(1, 5))]
        sibling = replace(s, response_ids=s.response_ids[:fork] + tail,
                          behaviour_logprobs=s.behaviour_logprobs[:fork] + [-4.0] * len(tail),
                          loss_mask=s.loss_mask[:fork] + [1] * len(tail),
                          decision_mask=s.decision_mask[:fork] + [0] * len(tail), advantage=-s.advantage)
        out += [s, sibling]
    s = out[0]
    out += [s, replace(s, response_ids=s.response_ids[:2], behaviour_logprobs=s.behaviour_logprobs[:2],
                       loss_mask=s.loss_mask[:2], decision_mask=s.decision_mask[:2])]
    return out


def test_tree_pack_step_equals_the_flat_step(model):
    samples = _tree_samples()
    rows = mstep._rows(samples, [s.behaviour_logprobs for s in samples])
    ((_, p),) = mstep._packs(rows, 10_000, None)
    assert len(mstep.tree(p).input_ids) < 0.6 * len(p.input_ids)  # shared prompts and forks stored once
    longest = max(len(s.ids) for s in samples) - 1
    results = []
    for tokens, tree_pack, checkpointed in ((10_000, False, False), (10_000, True, False), (longest, True, False),
                                            (10_000, True, True)):
        m = copy.deepcopy(model)
        trainer = MStep(m, MStepConfig(lr=1e-2, epochs=1, samples_per_step=len(samples), micro_batch_tokens=tokens,
                                       warmup_steps=0, grad_clip=0.0, activation_checkpointing=checkpointed,
                                       tree_pack=tree_pack, behaviour="recompute"), total_steps=1)
        grads = {}
        trainer.optimizer.register_step_pre_hook(
            lambda *_: grads.update({k: p.grad.clone() for k, p in m.named_parameters()}))
        metrics = trainer.train(samples, LOSS)
        logps = recompute_logprobs(m, samples, micro_batch_tokens=tokens, tree_pack=tree_pack)
        results.append((metrics, grads, logps))
    flat_metrics, flat_grads, flat_logps = results[0]
    for metrics, grads, logps in results[1:]:
        assert metrics.keys() == flat_metrics.keys()
        for k, v in flat_metrics.items():
            assert metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-6, nan_ok=True), k
        for k, grad in flat_grads.items():
            torch.testing.assert_close(grads[k], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item())
        for a, b in zip(logps, flat_logps):
            assert a == pytest.approx(b, abs=1e-5)


def test_non_finite_step_is_skipped_and_counted(model):
    samples = _samples(4)
    bad = replace(samples[0], advantage=float("nan"))
    trainer = MStep(model, MStepConfig(lr=1e-2, epochs=1, samples_per_step=1, warmup_steps=0), total_steps=4)
    before = copy.deepcopy(model.state_dict())
    metrics = trainer.train([bad], LOSS)
    assert metrics["mstep/skipped"] == 1 and metrics["mstep/steps"] == 0 and trainer.steps == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    metrics = trainer.train(samples, LOSS)
    assert metrics["mstep/steps"] == 4 and math.isfinite(metrics["mstep/loss"]) and trainer.steps == 4


def test_recomputed_logprobs_match_the_dense_forward_and_the_gap_report(model):
    samples = _samples(5, seed=2)
    recomputed = recompute_logprobs(model, samples, micro_batch_tokens=40)
    assert any(0 in s.loss_mask for s in samples)
    for s, r in zip(samples, recomputed):
        # Like the sampler's behaviour log-probs: 0.0 on tokens outside the loss (tool output).
        mask = torch.tensor(s.loss_mask, dtype=torch.bool)
        expected = torch.where(mask, _dense_logp(model, s), 0.0)
        torch.testing.assert_close(torch.tensor(r), expected, rtol=1e-5, atol=1e-5)
    exact = [replace(s, behaviour_logprobs=r)
             for s, r in zip(samples, recomputed)]
    assert behaviour_gap(exact, recomputed)["mstep/behaviour_gap_max"] == 0.0
    shifted = [replace(s, behaviour_logprobs=[x + 0.25 for x in r]) for s, r in zip(samples, recomputed)]
    assert behaviour_gap(shifted, recomputed)["mstep/behaviour_gap_max"] == pytest.approx(0.25, abs=1e-6)
    # Off-context samples (a cut prefix) are left out of the gap: nothing left is nan.
    off = [replace(s, off_context=True) for s in shifted]
    assert math.isnan(behaviour_gap(off, recomputed)["mstep/behaviour_gap_max"])


def test_only_a_seeded_sample_of_the_buffer_is_recomputed_for_the_gap(model, monkeypatch):
    samples = _samples()
    samples[1] = replace(samples[1], off_context=True)  # the gap cannot use it: never drawn
    seen = []
    real = mstep.recompute_logprobs
    monkeypatch.setattr(mstep, "recompute_logprobs",
                        lambda m, probed, **kw: seen.append(probed) or real(m, probed, **kw))
    for n, expected in ((2, 2), (0, 0), (100, len(samples) - 1)):
        seen.clear()
        trainer = MStep(model, MStepConfig(lr=0.0, epochs=1, behaviour_gap_samples=n), total_steps=1)
        metrics = trainer.train(samples, LOSS)
        assert [len(p) for p in seen] == ([expected] if expected else [])
        assert all(not s.off_context for p in seen for s in p)
        assert math.isnan(metrics["mstep/behaviour_gap_max"]) == (expected == 0)
    assert mstep.gap_probe(samples, 2, seed=7) == mstep.gap_probe(samples, 2, seed=7)  # every rank draws the same
    seen.clear()
    MStep(model, MStepConfig(lr=0.0, epochs=1, behaviour="recompute", behaviour_gap_samples=0),
          total_steps=1).train(samples, LOSS)
    assert [len(p) for p in seen] == [len(samples)]  # the ratio's old log-probs: every sample


def test_a_step_brings_its_metrics_to_the_host_once(model, monkeypatch):
    """Loss, tokens, loss metrics and the gradient norm cross to the host in one transfer per optimiser step (on a
    GPU: one sync), however many micro-batches the step has."""
    reads, packs = [], []
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        def counted(self, *args, _real=getattr(torch.Tensor, name), _name=name, **kwargs):
            if sys._getframe(1).f_code.co_filename == mstep.__file__:
                reads.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    real_loss = mstep._loss
    monkeypatch.setattr(mstep, "_loss", lambda *a, **k: packs.append(1) or real_loss(*a, **k))
    config = MStepConfig(lr=1e-3, epochs=1, samples_per_step=3, micro_batch_tokens=40, behaviour_gap_samples=0)
    metrics = MStep(model, config, total_steps=2).train(_samples(), LOSS)
    assert metrics["mstep/steps"] == 2 and len(packs) > 2  # several micro-batches per step
    assert reads == ["tolist", "tolist"]


def test_recompute_behaviour_starts_at_ratio_one(model):
    trainer = MStep(model, MStepConfig(lr=0.0, epochs=1, samples_per_step=6, behaviour="recompute"), total_steps=1)
    metrics = trainer.train(_samples(), LOSS)
    assert metrics["mstep/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and metrics["mstep/clip_frac"] == 0.0


def test_optimiser_state_round_trips(model):
    samples = _samples()
    a = MStep(model, MStepConfig(lr=1e-2, epochs=1, samples_per_step=3), total_steps=10)
    a.train(samples, LOSS)
    twin = copy.deepcopy(model)
    b = MStep(twin, MStepConfig(lr=1e-2, epochs=1, samples_per_step=3), total_steps=10)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.steps == a.steps == 2 and b.scheduler.get_last_lr() == a.scheduler.get_last_lr()
    a.train(samples, LOSS, seed=1)
    b.train(samples, LOSS, seed=1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, twin.state_dict()[k]), k


def test_samples_that_do_not_fit_are_named(model):
    trainer = MStep(model, MStepConfig(micro_batch_tokens=8), total_steps=1)
    with pytest.raises(ValueError, match=r"samples\[0\] has .* tokens: raise MStepConfig.micro_batch_tokens"):
        trainer.train(_samples(1), LOSS)
    broken = replace(_samples(1)[0], loss_mask=[1])
    with pytest.raises(ValueError, match=r"samples\[0\]: .* aligned"):
        MStep(model, MStepConfig(), total_steps=1).train([broken], LOSS)


@pytest.mark.parametrize("field, value", [("epochs", 0), ("lr", -1.0), ("behaviour", "vllm"), ("beta2", 1.0),
                                          ("min_lr_ratio", 1.5), ("grad_clip", -1.0), ("micro_batch_tokens", 1),
                                          ("activation_checkpointing", "yes")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"MStepConfig.{field}"):
        MStepConfig(**{field: value})


# -- the KL term against a frozen reference policy --

KL = replace(LOSS, kl_coef=0.05)


def test_kl_loss_equals_the_hand_computation_against_another_reference(model):
    """The reference (another random model) scored densely by hand: the loss gains kl_coef * k3 per trained token,
    mstep/kl is k3's token mean, and neither model moves at lr 0."""
    reference = build_model(replace(SMALL, seed=1), build_tokenizer())
    samples = _samples()
    total, kl, n = 0.0, 0.0, 0
    for s in samples:
        for j, (lp, ref) in enumerate(zip(_dense_logp(model, s).tolist(), _dense_logp(reference, s).tolist())):
            if s.loss_mask[j]:
                r, x = math.exp(lp - s.behaviour_logprobs[j]), ref - lp
                k3 = math.exp(x) - x - 1.0
                total += -min(max(r, 0.8), 1.2) * s.advantage + LOSS.sft_coef * s.decision_mask[j] * -lp + 0.05 * k3
                kl += k3
                n += 1
    frozen = copy.deepcopy(reference.state_dict())
    trainer = MStep(model, MStepConfig(lr=0.0, epochs=1, samples_per_step=len(samples)), total_steps=1,
                    reference=reference)
    metrics = trainer.train(samples, KL)
    assert metrics["mstep/loss"] == pytest.approx(total / n, rel=1e-5, abs=1e-6)
    assert metrics["mstep/kl"] == pytest.approx(kl / n, rel=1e-5) and kl / n > 0.01
    assert all(not p.requires_grad for p in reference.parameters())
    for k, v in reference.state_dict().items():
        assert torch.equal(v, frozen[k]), k


def test_a_reference_equal_to_the_policy_gives_kl_zero_at_the_first_step(model):
    """The starting model as its own reference: the first step's KL is 0 (the same forward); once the policy has
    moved, the next M-step's is not."""
    trainer = MStep(model, MStepConfig(lr=1e-2, epochs=1, samples_per_step=6, warmup_steps=0), total_steps=2,
                    reference=copy.deepcopy(model))
    first = trainer.train(_samples(), KL)
    assert first["mstep/steps"] == 1 and first["mstep/kl"] == pytest.approx(0.0, abs=1e-7)
    assert trainer.train(_samples(), KL, seed=1)["mstep/kl"] > 1e-6


def test_kl_coef_zero_with_a_reference_is_the_old_step_plus_the_kl_metric(model):
    results = []
    for reference in (None, build_model(replace(SMALL, seed=1), build_tokenizer())):
        m = copy.deepcopy(model)
        trainer = MStep(m, MStepConfig(lr=1e-2, epochs=1, samples_per_step=6, warmup_steps=0), total_steps=1,
                        reference=reference)
        results.append((trainer.train(_samples(), LOSS), m.state_dict()))
    (plain, plain_state), (with_ref, ref_state) = results
    assert with_ref.pop("mstep/kl") > 0 and with_ref.keys() == plain.keys()
    for k, v in plain.items():
        assert with_ref[k] == v or (math.isnan(v) and math.isnan(with_ref[k])), k
    for k, v in plain_state.items():
        assert torch.equal(ref_state[k], v), k


def test_kl_without_a_reference_is_refused(model):
    with pytest.raises(ValueError, match=r"LossConfig.kl_coef is 0.05: the KL term needs MStep\(reference=...\)"):
        MStep(model, MStepConfig(), total_steps=1).train(_samples(1), KL)
