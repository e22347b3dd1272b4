"""acim_fast.train.packing and acim_fast.train.optim: packs shift tokens and values to target rows within the budget;
the lr schedule warms up then decays to its floor."""

import math

import pytest
import torch

from acim_fast.train.optim import adamw, lr_factor
from acim_fast.train.packing import Row, pack, plan, tree


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


def _tree_rows():
    """Two problems x three rollouts sharing their prompt; rollout 1 of problem 0 has a forked sibling sharing its
    response up to the fork; one row is a prefix of another, one is identical to another, one shares nothing."""
    p0, p1 = [5, 6, 7, 8, 9], [5, 6, 40, 41]  # the prompts share their first two tokens too
    seqs = [p0 + [11, 12, 13], p0 + [14, 15, 16, 17], p0 + [14, 15, 18, 19], p0 + [21],
            p1 + [30, 31], p1 + [30, 31, 32, 33], p1 + [30, 31], [70, 71, 72]]
    return [Row(s, {"loss_mask": [0.0] * 2 + [1.0] * (len(s) - 2), "adv": [float(i)] * len(s)})
            for i, s in enumerate(seqs)]


def _check_tree(t, p):
    # Every row's node holds its input token at its position; parents and subtrees are consistent.
    assert torch.equal(t.input_ids[t.index], p.input_ids)
    flat_pos = torch.cat([torch.arange(b - a) for a, b in zip(p.cu_seqlens.tolist(), p.cu_seqlens[1:].tolist())])
    assert torch.equal(t.position_ids[t.index], flat_pos)
    mask = t.attention_mask()
    for i, parent in enumerate(t.parents.tolist()):
        ancestors = {i}
        while parent >= 0:
            ancestors.add(parent)
            parent = t.parents[parent].item()
        assert set(torch.nonzero(mask[i]).flatten().tolist()) == ancestors


def test_tree_pack_stores_shared_prefixes_once():
    (p,) = pack(_tree_rows(), pack_tokens=100)
    t = tree(p)
    _check_tree(t, p)
    # Trie of the inputs (tokens but the last): [5,6] shared by 7 rows; p0's [7,8,9], [11,12], [14,15] and its two
    # forks; p1's [40,41,30,31,32] (a row that is another's prefix and an identical pair add nothing); the odd one.
    assert len(t.input_ids) == 2 + 3 + 2 + 4 + 5 + 2 == 18 < len(p.input_ids) == 47
    # The node at the fork predicts 16 in one row and 18 in its sibling's: one node, two targets.
    fork = [i for i, n in enumerate(t.index.tolist()) if t.index.tolist().count(n) == 2 and p.targets[i] in (16, 18)]
    assert len(fork) == 2 and t.index[fork[0]] == t.index[fork[1]]
    for rows in ([_tree_rows()[7]], _tree_rows()[:1] * 3, [_tree_rows()[0], _tree_rows()[7]]):
        (p,) = pack(rows, pack_tokens=100)
        t = tree(p)
        _check_tree(t, p)
        assert len(t.input_ids) == len(set(tuple(r.ids[:k]) for r in rows for k in range(1, len(r.ids))))


@pytest.mark.parametrize(("checkpointed", "blocked"), [(False, False), (False, True), (True, True)])
def test_tree_forward_gathered_to_rows_equals_the_flat_forward(checkpointed, blocked):
    from acim_fast.engine.model import CausalLM, ModelConfig

    config = ModelConfig.from_hf_dict({
        "model_type": "qwen2", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "tie_word_embeddings": False})
    torch.manual_seed(0)
    model = CausalLM(config, dtype=torch.float64)
    (p,) = pack(_tree_rows(), pack_tokens=100)
    t = tree(p)
    weights = torch.randn(len(p.input_ids), 32, dtype=torch.float64)
    flat = model.forward_hidden(p.input_ids, cu_seqlens=p.cu_seqlens, checkpoint_layers=checkpointed)
    (flat * weights).sum().backward()
    flat_grads = {k: q.grad.clone() for k, q in model.named_parameters() if q.grad is not None}  # lm_head: none
    model.zero_grad()
    # One SDPA call with the whole mask, or one per independent subtree (the CPU's loop path).
    assert t.blocks() == [0, 16, 18]
    nodes = model.forward_hidden(t.input_ids, position_ids=t.position_ids, attention_mask=t.attention_mask(),
                                 cu_seqlens=t.blocks() if blocked else None,
                                 checkpoint_layers=checkpointed)
    gathered = nodes[t.index]
    (gathered * weights).sum().backward()
    assert (gathered - flat).abs().max().item() < 1e-12
    # RMSNorm's statistics are fp32 whatever the model's dtype: rows summed into one node round as fp32 does.
    assert {k for k, q in model.named_parameters() if q.grad is not None} == flat_grads.keys()
    for k, q in model.named_parameters():
        if q.grad is not None:
            torch.testing.assert_close(q.grad, flat_grads[k], rtol=1e-5, atol=1e-5 * flat_grads[k].abs().max().item())
