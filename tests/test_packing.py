"""acim_fast.train.packing and acim_fast.train.optim: packs shift tokens and values to target rows within the budget;
the lr schedule warms up then decays to its floor."""

import math

import pytest
import torch

from acim_fast.train.optim import adamw, lr_factor
from acim_fast.train.packing import Row, pack, plan


def _rows(lengths):
    return [Row(list(range(10, 10 + n)), {"loss_mask": [0] * (n // 2) + [1] * (n - n // 2),
                                         "adv": [float(n)] * n}) for n in lengths]


def test_pack_concatenates_shifted_sequences_within_the_budget():
    packs = pack(_rows((5, 7, 3, 9, 6)), pack_tokens=12)
    # Rows per sequence: 4, 6, 2, 8, 5 -> [4, 6, 2] [8] [5]
    assert [p.cu_seqlens.tolist() for p in packs] == [[0, 4, 10, 12], [0, 8], [0, 5]]
    assert [p.rows for p in packs] == [[0, 1, 2], [3], [4]]
    p = packs[0]
    assert p.input_ids.tolist() == [10, 11, 12, 13] + [10, 11, 12, 13, 14, 15] + [10, 11]
    assert p.targets.tolist() == [11, 12, 13, 14] + [11, 12, 13, 14, 15, 16] + [11, 12]
    # A row's value is its target's: the first sequence's mask [0,0,1,1,1] becomes [0,1,1,1].
    assert p.values["loss_mask"].tolist() == [0, 1, 1, 1] + [0, 0, 1, 1, 1, 1] + [1, 1]
    assert p.values["adv"].tolist() == [5.0] * 4 + [7.0] * 6 + [3.0] * 2
    assert p.seq_ids().tolist() == [0] * 4 + [1] * 6 + [2] * 2


def test_pack_rejects_what_cannot_be_packed():
    with pytest.raises(ValueError, match="pack_tokens=4"):
        pack(_rows((9,)), pack_tokens=4)
    with pytest.raises(ValueError, match="2..5 tokens"):
        pack([Row([1], {"m": [1]})], pack_tokens=4)
    with pytest.raises(ValueError, match="row 1: values must name"):
        pack([Row([1, 2], {"m": [1, 1]}), Row([1, 2], {"m": [1]})], pack_tokens=8)
    with pytest.raises(ValueError, match="row 1: values must name"):
        pack([Row([1, 2], {"m": [1, 1]}), Row([1, 2], {"n": [1, 1]})], pack_tokens=8)


def test_plan_counts_the_packs_pack_makes_from_lengths_alone():
    # Ranks of the FSDP M-step agree on their micro-batch count with plan, without packing each other's shares.
    lengths = [5, 3, 9, 2, 2, 7, 4, 10, 3]
    rows = [Row(list(range(n)), {"m": [1.0] * n}) for n in lengths]
    for budget in (9, 12, 20):
        assert plan(lengths, budget) == [p.rows for p in pack(rows, budget)]
    assert plan(lengths, 9)[:3] == [[0, 1], [2, 3], [4, 5]]  # rows 4+2, then 8+1 (exactly 9), then 1+6
    assert plan([], 8) == []
    with pytest.raises(ValueError, match="does not fit"):
        plan([3, 1], 8)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    kw = dict(warmup_steps=10, total_steps=100, min_lr_ratio=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1) and lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(55, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, **kw) == pytest.approx(0.1) and lr_factor(500, **kw) == pytest.approx(0.1)
    values = [lr_factor(s, **kw) for s in range(10, 101)]
    assert values == sorted(values, reverse=True)


def test_adamw_decays_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = adamw(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    decayed, free = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.dim() for p in decayed["params"]] == [2]
    assert free["weight_decay"] == 0.0 and sorted(p.dim() for p in free["params"]) == [1, 1, 1]
