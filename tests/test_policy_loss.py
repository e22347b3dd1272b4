"""The fused policy loss: the reference against hand-computed cases and gradcheck, and the chunked and
Triton (interpreter on CPU) implementations against the reference, outputs and gradients."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from acim_kernels import LossConfig, policy_loss, policy_loss_from_logits
from acim_kernels.pg_loss_ref import OBJECTIVES

FAST = ("chunked", "triton")
# As parameters: the Triton kernel in the interpreter takes seconds a case, so it is out of the quick loop.
FAST_PARAMS = ("chunked", pytest.param("triton", marks=pytest.mark.slow))
VALUE_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(autouse=True)
def small_triton_blocks(monkeypatch):
    """Several vocabulary blocks per row even at V=123, with a ragged last block."""
    triton_module = importlib.import_module("acim_kernels.pg_loss")
    monkeypatch.setitem(triton_module.BLOCK_V_MAX, "cpu", 32)


def make_batch(n=47, h=16, v=123, seed=0, dtype=torch.float32, mask_p=0.2, seq_len=5, ratio_noise=0.3):
    """A batch whose behaviour log-probs sit near the model's, so ratios fall on both sides of the band."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = 0.3 * torch.randn(v, h, generator=g)
    bias = 0.5 * torch.randn(v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T + bias, -1).gather(1, targets[:, None]).squeeze(1)
    return dict(
        hidden=hidden.to(dtype), weight=weight.to(dtype), bias=bias.to(dtype), targets=targets,
        old_logp=logp + ratio_noise * torch.randn(n, generator=g), advantages=torch.randn(n, generator=g),
        loss_mask=torch.rand(n, generator=g) > mask_p, seq_ids=torch.arange(n) // seq_len,
        ref_logp=logp + 0.2 * torch.randn(n, generator=g), sft_mask=torch.rand(n, generator=g) > 0.7)


def run(batch, config, impl, grads=True, **kwargs):
    """Loss, logp, entropy, metrics and the gradients of hidden, weight and bias."""
    leaves = {k: batch[k].detach().clone().requires_grad_(grads) for k in ("hidden", "weight", "bias")}
    side = {k: v for k, v in batch.items() if k not in leaves}
    out = policy_loss(leaves["hidden"], leaves["weight"], side.pop("targets"), bias=leaves["bias"], **side,
                      config=config, impl=impl, **kwargs)
    result = {"loss": out.loss.detach(), "logp": out.logp, "entropy": out.entropy, "metrics": out.metrics}
    if grads:
        out.loss.backward()
        result.update({f"d_{k}": t.grad for k, t in leaves.items()})
    return result


def assert_match(got, want, value_tol=VALUE_TOL, grad_tol=GRAD_TOL):
    for key, expected in want.items():
        if key == "metrics":
            assert got[key].keys() == expected.keys()
            for name in expected:
                torch.testing.assert_close(got[key][name], expected[name], **value_tol, msg=name)
        elif expected is None:
            assert got[key] is None, key
        else:
            tol = grad_tol if key.startswith("d_") else value_tol
            torch.testing.assert_close(got[key], expected, **tol, msg=key)


FULL = dict(temperature=0.7, kl_coef=0.1, entropy_coef=0.01, sft_coef=0.5)
CASES = [LossConfig(objective=o, aggregation=a, **FULL) for o in OBJECTIVES
         for a in ("token_mean", "seq_mean_token_mean")] + [
    LossConfig(objective="ppo", dual_clip=2.0, eps_high=0.28),
    LossConfig(objective="gspo", dual_clip=1.5, entropy_coef=0.02, return_entropy=True),
    LossConfig(objective="clip", eps_low=0.1, eps_high=0.3, return_entropy=True),
    LossConfig(objective="tis", tis_cap=1.2, temperature=1.3),
]


# ---------------------------------------------------------------- the reference against hand computation

def test_ratio_one_gives_minus_mean_advantage():
    batch = make_batch()
    logp = run(batch, LossConfig(), "ref", grads=False)["logp"]
    batch["old_logp"] = logp  # ratio exactly 1: inside the band, nothing clipped
    valid = batch["loss_mask"]
    for objective in ("ppo", "clip"):
        loss = run(batch, LossConfig(objective=objective), "ref", grads=False)["loss"]
        torch.testing.assert_close(loss, -batch["advantages"][valid].mean(), rtol=1e-6, atol=1e-6)


def test_hand_computed_single_token():
    """One token, V=2 logits [0, log 3] with target 1: p = 3/4, so logp = log 0.75 by hand."""
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    old = torch.tensor([math.log(0.75) - math.log(1.5)])  # ratio 1.5, above the band [0.8, 1.2]
    args = dict(old_logp=old, advantages=torch.tensor([2.0]), loss_mask=torch.tensor([True]))
    for impl in ("ref", *FAST):
        logits.grad = None
        out = policy_loss_from_logits(logits, torch.tensor([1]), **args, impl=impl)
        out.loss.backward()
        assert out.logp.item() == pytest.approx(math.log(0.75), abs=1e-6)
        assert out.loss.item() == pytest.approx(-1.2 * 2.0, abs=1e-6)  # -clip(1.5) * A
        assert torch.equal(logits.grad, torch.zeros(1, 2)), impl  # clipped: no gradient at all
        assert out.metrics["clip_frac_high"].item() == 1.0


def test_hand_computed_kl_term():
    """The single token above with ratio 1 and advantage 0 (no policy-gradient term), ref_logp = log 0.5: the log-ratio
    x = log(0.5 / 0.75), the loss kl_coef * (e^x - x - 1) and dL/dlogits = kl_coef * (1 - e^x) * (onehot - p)."""
    logits = torch.tensor([[0.0, math.log(3.0)]], requires_grad=True)
    x = math.log(0.5 / 0.75)
    args = dict(old_logp=torch.tensor([math.log(0.75)]), advantages=torch.tensor([0.0]),
                loss_mask=torch.tensor([True]), ref_logp=torch.tensor([math.log(0.5)]))
    config = LossConfig(objective="clip", kl_coef=0.1)
    for impl in ("ref", *FAST):
        logits.grad = None
        out = policy_loss_from_logits(logits, torch.tensor([1]), **args, config=config, impl=impl)
        out.loss.backward()
        assert out.loss.item() == pytest.approx(0.1 * (math.exp(x) - x - 1.0), abs=1e-7), impl
        assert out.metrics["kl"].item() == pytest.approx(math.exp(x) - x - 1.0, abs=1e-7), impl
        g = 0.1 * (1.0 - math.exp(x))
        torch.testing.assert_close(logits.grad, torch.tensor([[-0.25 * g, 0.25 * g]]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ("ref", *FAST_PARAMS))
def test_kl_coef_zero_is_exactly_the_loss_without_a_reference(impl):
    """ref_logp given with kl_coef 0 changes nothing but the kl metric: the same loss and gradients, bit for bit."""
    batch = make_batch()
    config = LossConfig(objective="clip", sft_coef=0.5)
    without = run({k: v for k, v in batch.items() if k != "ref_logp"}, config, impl)
    with_ref = run(batch, config, impl)
    assert with_ref["metrics"].pop("kl") > 0
    for key, value in without.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(with_ref[key], value), key
    assert with_ref["metrics"].keys() == without["metrics"].keys()


@pytest.mark.parametrize("objective", ["ppo", "clip"])
def test_clipped_tokens_get_zero_gradient(objective):
    """Set each token's ratio exactly; tokens the clip removes have zero gradient in their hidden row."""
    batch = make_batch(n=18, mask_p=0.0)
    logp = run(batch, LossConfig(), "ref", grads=False)["logp"]
    ratios = torch.tensor([0.5, 0.9, 1.0, 1.1, 1.5, 5.0]).repeat(3)
    advantages = torch.tensor([-1.0] * 6 + [0.0] * 6 + [1.0] * 6)
    batch.update(old_logp=logp - ratios.log(), advantages=advantages)
    config = LossConfig(objective=objective)
    outside_low, outside_high = ratios < 0.8, ratios > 1.2
    if objective == "ppo":  # ppo clips only the side that would push the ratio further out
        zero_grad = (outside_low & (advantages < 0)) | (outside_high & (advantages > 0)) | (advantages == 0)
    else:
        zero_grad = outside_low | outside_high | (advantages == 0)
    for impl in ("ref", *FAST):
        row_norms = run(batch, config, impl)["d_hidden"].norm(dim=1)
        assert torch.all(row_norms[zero_grad] == 0), impl
        assert torch.all(row_norms[~zero_grad] > 0), impl


@pytest.mark.parametrize("config", [c for c in CASES if c.objective != "tis"],  # tis stops a gradient on purpose
                         ids=lambda c: f"{c.objective}-{c.aggregation}")
def test_reference_gradcheck_fp64(config):
    batch = make_batch(n=7, h=3, v=5, dtype=torch.float64, seq_len=3, ratio_noise=0.05)
    batch["old_logp"] = batch["old_logp"].double()
    side = {k: v for k, v in batch.items() if k not in ("hidden", "weight", "bias", "targets")}
    inputs = [batch[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]

    def loss(hidden, weight, bias):
        return policy_loss(hidden, weight, batch["targets"], bias=bias, **side, config=config, impl="ref").loss

    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6)


def test_tis_gradient_is_the_truncated_weight():
    """tis: dL/dlogits_i = -w_i min(r_i, C) A_i (onehot(t_i) - softmax_i), by hand."""
    batch = make_batch(n=10, v=7, mask_p=0.0)
    logits = torch.nn.functional.linear(batch["hidden"], batch["weight"], batch["bias"]).detach()
    probs = torch.softmax(logits, -1)
    logp = probs.log().gather(1, batch["targets"][:, None]).squeeze(1)
    ratio = torch.exp(logp - batch["old_logp"])
    coef = -torch.clamp(ratio, max=1.2) * batch["advantages"] / 10
    want = coef[:, None] * (torch.nn.functional.one_hot(batch["targets"], 7) - probs)
    for impl in ("ref", *FAST):
        leaf = logits.clone().requires_grad_()
        policy_loss_from_logits(leaf, batch["targets"], old_logp=batch["old_logp"], advantages=batch["advantages"],
                                loss_mask=batch["loss_mask"], config=LossConfig(objective="tis", tis_cap=1.2),
                                impl=impl).loss.backward()
        torch.testing.assert_close(leaf.grad, want, **GRAD_TOL)


# ---------------------------------------------------------------- fast implementations against the reference

@pytest.mark.parametrize("impl", FAST_PARAMS)
@pytest.mark.parametrize("config", CASES, ids=lambda c: f"{c.objective}-{c.aggregation}-T{c.temperature}")
def test_matches_reference(impl, config):
    batch = make_batch()
    assert_match(run(batch, config, impl, chunk_rows=16), run(batch, config, "ref"))


@pytest.mark.parametrize("impl", FAST_PARAMS)
@pytest.mark.parametrize("case", ["all_masked_rows", "single_valid_token", "nothing_valid", "odd_shape"])
def test_edge_batches(impl, case):
    batch = make_batch(n=31 if case == "odd_shape" else 12, v=97 if case == "odd_shape" else 123)
    mask = batch["loss_mask"]
    if case == "all_masked_rows":
        mask[:] = True
        mask[3:9] = False  # a whole sequence and parts of its neighbours
    elif case == "single_valid_token":
        mask[:] = False
        mask[5] = True
    elif case == "nothing_valid":
        mask[:] = False
    config = LossConfig(objective="gspo", aggregation="seq_mean_token_mean", **FULL)
    want = run(batch, config, "ref")
    assert_match(run(batch, config, impl, chunk_rows=4), want)
    if case == "nothing_valid":
        assert want["loss"].item() == 0.0 and torch.count_nonzero(want["d_weight"]) == 0


@pytest.mark.parametrize("impl", FAST_PARAMS)
def test_extreme_logits(impl):
    """Very large logits and -inf logits (but not at the targets) on materialised logits."""
    batch = make_batch(n=20, v=77)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 77, generator=g) * 3
    logits[0] += 1e4  # large but shifted: log_softmax is shift-invariant
    logits[1, :40] = -float("inf")
    logits[2, 7] = 80.0  # a near one-hot row
    targets = torch.randint(40, 77, (20,), generator=g)
    config = LossConfig(**FULL, return_entropy=True)
    side = {k: batch[k] for k in ("old_logp", "advantages", "loss_mask", "seq_ids", "ref_logp", "sft_mask")}
    results = {}
    for name in ("ref", impl):
        leaf = logits.clone().requires_grad_()
        out = policy_loss_from_logits(leaf, targets, **side, config=config, impl=name)
        out.loss.backward()
        results[name] = {"loss": out.loss.detach(), "logp": out.logp, "entropy": out.entropy, "d_logits": leaf.grad}
        assert torch.isfinite(leaf.grad).all() and torch.isfinite(out.loss)
    assert_match(results[impl], results["ref"])


@pytest.mark.parametrize("impl", ("ref", *FAST_PARAMS))
def test_log_probs_never_positive(impl):
    batch = make_batch(n=40, v=50, mask_p=0.0)
    batch["hidden"] = batch["hidden"] * 40  # near one-hot distributions: where rounding could go wrong
    for temperature in (0.3, 1.0):
        logp = run(batch, LossConfig(temperature=temperature), impl, grads=False)["logp"]
        assert (logp <= 0).all()


@pytest.mark.parametrize("impl", FAST_PARAMS)
def test_bf16_error_within_twice_eager_bf16(impl):
    """Against an fp32 gold, bf16 must be no worse than twice the eager bf16 reference's error."""
    config = LossConfig(**FULL)
    gold = run(make_batch(n=64, h=32, v=300), config, "ref")
    eager = run(make_batch(n=64, h=32, v=300, dtype=torch.bfloat16), config, "ref")
    fast = run(make_batch(n=64, h=32, v=300, dtype=torch.bfloat16), config, impl, chunk_rows=16)
    for key in ("loss", "logp", "d_hidden", "d_weight", "d_bias"):
        eager_error = (eager[key].float() - gold[key]).abs().max()
        fast_error = (fast[key].float() - gold[key]).abs().max()
        assert fast_error <= 2 * eager_error + 1e-6, (key, fast_error.item(), eager_error.item())


@pytest.mark.parametrize("impl", ("ref", *FAST_PARAMS))
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_micro_batch_invariance(impl, aggregation):
    """Split by whole sequences, with the global normaliser: the accumulated gradient is unchanged."""
    config = LossConfig(objective="gspo" if aggregation == "seq_mean_token_mean" else "ppo",
                        aggregation=aggregation, **FULL)
    batch = make_batch(n=40)
    full = run(batch, config, impl)
    mask, seq_ids = batch["loss_mask"], batch["seq_ids"]
    if aggregation == "token_mean":
        normalizer = float(mask.sum())
    else:
        normalizer = float(seq_ids[mask].unique().numel())
    parts = [run({k: v[rows] for k, v in batch.items() if k not in ("weight", "bias")}
                 | {"weight": batch["weight"], "bias": batch["bias"]}, config, impl, normalizer=normalizer)
             for rows in (slice(0, 15), slice(15, 40))]  # 15 = 3 whole sequences of 5
    torch.testing.assert_close(parts[0]["loss"] + parts[1]["loss"], full["loss"], **VALUE_TOL)
    for key in ("d_weight", "d_bias"):
        torch.testing.assert_close(parts[0][key] + parts[1][key], full[key], **GRAD_TOL)
    torch.testing.assert_close(torch.cat([parts[0]["d_hidden"], parts[1]["d_hidden"]]), full["d_hidden"], **GRAD_TOL)


@pytest.mark.parametrize("impl", FAST_PARAMS)
def test_from_logits_matches_and_overwrites(impl):
    batch = make_batch()
    logits = torch.nn.functional.linear(batch["hidden"], batch["weight"], batch["bias"]).detach()
    side = {k: batch[k] for k in ("old_logp", "advantages", "loss_mask", "seq_ids", "ref_logp", "sft_mask")}
    config = LossConfig(objective="gspo", **FULL)
    outs = {}
    for name, overwrite in (("ref", False), (impl, False), ("overwrite", True)):
        leaf = logits.clone().requires_grad_()
        out = policy_loss_from_logits(leaf, batch["targets"], **side, config=config,
                                      impl="ref" if name == "ref" else impl, overwrite_logits=overwrite)
        (3.0 * out.loss).backward()  # the upstream gradient must scale the stored one
        outs[name] = {"loss": out.loss.detach(), "logp": out.logp, "d_logits": leaf.grad,
                      "overwritten": leaf.detach().clone()}
    for name in (impl, "overwrite"):
        assert_match({k: outs[name][k] for k in ("loss", "logp", "d_logits")},
                     {k: outs["ref"][k] for k in ("loss", "logp", "d_logits")})
    # the logits storage now holds the (scaled) gradient itself: no second [N x V] buffer existed
    torch.testing.assert_close(outs["overwrite"]["overwritten"], outs["ref"]["d_logits"], **GRAD_TOL)
    torch.testing.assert_close(outs[impl]["overwritten"], logits)  # untouched without overwrite


@pytest.mark.parametrize("impl", FAST_PARAMS)
def test_no_grad_and_frozen_weight(impl):
    batch = make_batch()
    config = LossConfig(objective="gspo", **FULL)
    want = run(batch, config, "ref")
    with torch.no_grad():
        got = run(batch, config, impl, grads=False)
    torch.testing.assert_close(got["loss"], want["loss"], **VALUE_TOL)
    hidden = batch["hidden"].clone().requires_grad_()
    side = {k: v for k, v in batch.items() if k not in ("hidden", "weight", "bias", "targets")}
    out = policy_loss(hidden, batch["weight"], batch["targets"], bias=batch["bias"], **side, config=config, impl=impl)
    out.loss.backward()
    torch.testing.assert_close(hidden.grad, want["d_hidden"], **GRAD_TOL)


# ---------------------------------------------------------------- bad input

def _call(**overrides):
    batch = make_batch(n=6, v=9)
    args = {k: v for k, v in batch.items() if k not in ("hidden", "weight", "targets")}
    call = dict(hidden=batch["hidden"], weight=batch["weight"], targets=batch["targets"], **args, impl="chunked")
    call.update(overrides)
    return policy_loss(call.pop("hidden"), call.pop("weight"), call.pop("targets"), **call)


@pytest.mark.parametrize("overrides, name", [
    (dict(old_logp=torch.zeros(5)), "old_logp"),
    (dict(advantages=torch.zeros(6, 1)), "advantages"),
    (dict(targets=torch.zeros(6)), "targets"),
    (dict(targets=torch.full((6,), 9)), "targets"),
    (dict(targets=torch.full((6,), -1)), "targets"),
    (dict(hidden=torch.zeros(6, 15)), "hidden"),
    (dict(weight=torch.zeros(9, 16, dtype=torch.float64)), "weight"),
    (dict(bias=torch.zeros(8)), "bias"),
    (dict(loss_mask=torch.ones(6, device="meta")), "loss_mask"),
    (dict(seq_ids=None, config=LossConfig(objective="gspo")), "seq_ids"),
    (dict(seq_ids=None, config=LossConfig(aggregation="seq_mean_token_mean")), "seq_ids"),
    (dict(ref_logp=None, config=LossConfig(kl_coef=0.1)), "ref_logp"),
    (dict(sft_mask=None, config=LossConfig(sft_coef=0.1)), "sft_mask"),
    (dict(impl="fastest"), "impl"),
    (dict(normalizer=0.0), "normalizer"),
    (dict(chunk_rows=0), "chunk_rows"),
])
def test_bad_input_names_the_argument(overrides, name):
    with pytest.raises(ValueError, match=name):
        _call(**overrides)


def test_masked_rows_may_hold_ignore_index():
    """Targets outside the vocabulary are accepted where loss_mask is 0 (e.g. HF's -100)."""
    targets = make_batch(n=6, v=9)["targets"].clone()
    mask = torch.tensor([True, True, False, True, False, True])
    targets[~mask] = -100
    assert torch.isfinite(_call(targets=targets, loss_mask=mask).loss)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value", [
    ("objective", "grpo"), ("aggregation", "sum"), ("eps_low", 1.0), ("eps_low", NAN), ("eps_high", NAN),
    ("dual_clip", 1.0), ("dual_clip", NAN), ("tis_cap", NAN), ("temperature", 0.0), ("temperature", INF),
    ("log_ratio_clamp", INF), ("log_ratio_clamp", NAN),
    *((name, value) for name in ("kl_coef", "entropy_coef", "sft_coef") for value in (-1.0, NAN, INF, -INF))])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=f"LossConfig.{field} must be"):
        replace(LossConfig(), **{field: value})


def test_config_allows_unbounded_clips():
    """An infinite clip width, dual clip or cap means no bound (not an error)."""
    replace(LossConfig(), eps_high=INF, dual_clip=INF, tis_cap=INF)


def test_triton_without_gpu_or_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton'"):
        _call(impl="triton")


def test_second_backward_is_refused_not_silently_wrong():
    batch = make_batch()
    hidden = batch["hidden"].clone().requires_grad_()
    side = {k: v for k, v in batch.items() if k not in ("hidden", "weight", "targets")}
    loss = policy_loss(hidden, batch["weight"], batch["targets"], **side, impl="chunked").loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_imports_and_runs_without_triton():
    """acim_kernels needs torch alone: without triton the chunked path works and 'triton' is refused."""
    script = """
import sys
sys.modules["triton"] = None  # import triton now raises ImportError
import torch
from acim_kernels import LossConfig, policy_loss
h, w = torch.randn(5, 4, requires_grad=True), torch.randn(7, 4)
args = dict(old_logp=torch.zeros(5) - 2, advantages=torch.ones(5), loss_mask=torch.ones(5, dtype=torch.bool))
policy_loss(h, w, torch.arange(5), **args).loss.backward()
assert h.grad is not None and "triton" not in [m for m in sys.modules if sys.modules[m] is not None]
try:
    policy_loss(h, w, torch.arange(5), **args, impl="triton")
except ValueError as error:
    assert "triton package" in str(error)
else:
    raise AssertionError("impl='triton' without triton must raise")
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
