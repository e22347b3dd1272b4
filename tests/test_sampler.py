"""acim_fast.engine.sampling: greedy equality with transformers, fork/copy-on-write, sampling, bans, pause/append,
preemption."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from acim_fast.engine.model import CausalLM
from acim_fast.engine.paged_engine import Engine
from acim_fast.engine.sampling import SamplingParams, filtered_logprobs

VOCAB = 101
# A toy detokenizer: token i is a run of 1-3 copies of one letter, so tokens have different lengths.
PIECES = [chr(97 + i % 26) * (1 + i % 3) for i in range(VOCAB)]


def detok(ids):
    return "".join(PIECES[i] for i in ids)


def _hf(family: str):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2)
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**kw)).eval()
    return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **kw)).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for family in ("llama", "qwen2"):
        hf = _hf(family)
        path = tmp_path_factory.mktemp(family)
        hf.save_pretrained(path)
        out[family] = (hf, CausalLM.from_pretrained(path))
    return out


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints["llama"][1]


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _run(engine, ids=None):
    """Step to completion; outputs of finished or paused sequences by id (the last report wins)."""
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            done[out.seq_id] = out
    return done


def _dense_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).float()


def _assert_pool_whole(engine):
    bm = engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.stats()["used_blocks"] == 0 and bm.stats()["num_seqs"] == 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_greedy_equals_transformers_generate(checkpoints, family):
    hf, model = checkpoints[family]
    prompts = _prompts([3, 17, 9, 30, 1])
    # A small token budget forces chunked prefill of the long prompt mixed with other sequences' decodes.
    engine = Engine(model, num_blocks=80, block_size=4, max_num_batched_tokens=24)
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=(2,)))
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, eos_token_id=2,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == ref
        assert o.finish_reason == ("stop" if ref[-1] == 2 else "length")
        assert o.loss_mask == [1] * len(ref) and o.logprobs == [0.0] * len(ref)
    assert engine.stats.prefill_tokens == sum(map(len, prompts))
    _assert_pool_whole(engine)


@pytest.mark.parametrize("at_offset", [None, 4])
def test_fork_children_equal_unforked_recomputation(model, at_offset):
    params = SamplingParams(temperature=0.9, top_k=40, max_new_tokens=24, seed=11, train_temperature=1.1)
    prompt = _prompts([10], seed=1)[0]
    engine = Engine(model, num_blocks=64, block_size=4)
    parent = engine.add(prompt, params)
    for _ in range(8):
        engine.step()
    computed = dict(prefill=engine.stats.prefill_tokens, recomputed=engine.stats.recomputed_tokens)
    at = None if at_offset is None else len(prompt) + at_offset  # mid-block with block_size 4
    children = engine.fork(parent, 2, at=at)
    child_params = {c: engine.params(c) for c in children}
    assert child_params[children[0]].seed != child_params[children[1]].seed
    done = _run(engine)

    # No prefix token is computed again: children only decode.
    assert engine.stats.prefill_tokens == computed["prefill"]
    assert engine.stats.recomputed_tokens == computed["recomputed"] == 0
    assert engine.stats.replayed_tokens == (0 if at is None else 2)
    assert engine.stats.prefix_reused_tokens == 2 * (len(prompt) + (7 if at is None else at_offset))
    assert engine.block_manager.stats()["cow_copies"] >= 2  # siblings wrote into a shared partial block
    _assert_pool_whole(engine)

    # The parent is untouched by its children's writes (copy-on-write isolates siblings) ...
    alone = Engine(model, num_blocks=64, block_size=4)
    pid = alone.add(prompt, params)
    assert _run(alone)[pid].token_ids == done[parent].token_ids
    # ... and each child decodes what a fresh sequence holding the kept tokens decodes.
    for c in children:
        out = done[c]
        assert out.parent == parent and out.fork_pos == (at or len(prompt) + 8)
        assert out.token_ids[:out.fork_pos - len(prompt)] == done[parent].token_ids[:out.fork_pos - len(prompt)]
        fresh = Engine(model, num_blocks=64, block_size=4)
        kept = prompt + out.token_ids[:out.fork_pos - len(prompt)]
        fid = fresh.add(kept, replace(child_params[c], max_new_tokens=len(prompt) + 24 - len(kept)))
        ref = _run(fresh)[fid]
        n = out.fork_pos - len(prompt)
        assert out.token_ids[n:] == ref.token_ids
        torch.testing.assert_close(out.logprobs[n:], ref.logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.behaviour_logprobs[n:], ref.behaviour_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompt_len, forks, shared_path", [(64, 8, True), (8, 2, False)])
def test_forks_of_a_long_prompt_read_it_once_with_the_same_results(model, monkeypatch, prompt_len, forks,
                                                                   shared_path):
    """Decode steps of forks take the shared-prefix attention only when it removes at least half of the K/V reads
    (a long prompt), and either way every child samples what a fresh sequence would."""
    import acim_fast.engine.model as model_module

    calls = []
    real = model_module.decode_attention_shared_prefix
    monkeypatch.setattr(model_module, "decode_attention_shared_prefix",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    prompt = _prompts([prompt_len], seed=3)[0]
    params = SamplingParams(temperature=0.8, max_new_tokens=4, seed=5)
    engine = Engine(model, num_blocks=128, block_size=4)
    parent = engine.add(prompt, params)
    engine.step()
    engine.pause(parent)
    children = engine.fork(parent, forks, at=len(prompt))
    child_params = [engine.params(c) for c in children]
    done = _run(engine)
    assert bool(calls) == shared_path
    for c, p in zip(children, child_params):
        fresh = Engine(model, num_blocks=64, block_size=4)
        fid = fresh.add(prompt, p)
        ref = _run(fresh)[fid]
        assert done[c].token_ids == ref.token_ids
        torch.testing.assert_close(done[c].logprobs, ref.logprobs, atol=1e-5, rtol=0)
    engine.release(parent)
    _assert_pool_whole(engine)


def test_fork_forbid_bans_only_the_next_token(model):
    prompt = _prompts([6], seed=2)[0]
    engine = Engine(model, num_blocks=32, block_size=4)
    parent = engine.add(prompt, SamplingParams(temperature=0, max_new_tokens=6))
    engine.step()
    engine.pause(parent)
    at = len(prompt) + 1
    greedy_next = int(_dense_logits(model, engine.output(parent).prompt_ids + engine.output(parent).token_ids)
                      [-1].argmax())
    (child,) = engine.fork(parent, 1, forbid=[greedy_next])
    out = _run(engine)[child]
    logits = _dense_logits(model, out.prompt_ids + out.token_ids)
    first = out.token_ids[1]
    masked = logits[at - 1].clone()
    masked[greedy_next] = float("-inf")
    assert first != greedy_next and first == int(masked.argmax())
    # The behaviour log-prob is the raw model's (the ban is an intervention, not the model).
    assert out.behaviour_logprobs[1] == pytest.approx(float(logits[at - 1].log_softmax(-1)[first]), abs=1e-5)
    # Later steps are unconstrained greedy again.
    for i in range(2, len(out.token_ids)):
        assert out.token_ids[i] == int(logits[len(prompt) + i - 1].argmax())
    # A ban on the token greedy picks one step later than the fork is gone by then: plain greedy output.
    greedy = Engine(model, num_blocks=32, block_size=4).generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=6))[0].token_ids
    assert greedy[2] not in greedy[1:2]
    (child2,) = engine.fork(parent, 1, forbid=[greedy[2]])
    assert _run(engine)[child2].token_ids == greedy
    assert engine.output(parent).finish_reason == "paused"
    engine.release(parent)
    _assert_pool_whole(engine)


def test_banned_ids_are_never_sampled_and_logprobs_stay_honest(model):
    prompts = _prompts([5, 11, 8, 3], seed=12)
    free = SamplingParams(temperature=1.5, max_new_tokens=40, seed=21)
    # Ban the ids the unconstrained run samples most, so the ban has something to remove.
    unbanned = Engine(model, num_blocks=64, block_size=8).generate(prompts, free)
    counts = torch.bincount(torch.tensor([t for o in unbanned for t in o.token_ids]), minlength=VOCAB)
    banned = tuple(counts.argsort(descending=True)[:10].tolist())
    assert counts[list(banned)].sum() >= 20
    params = replace(free, banned_token_ids=banned)
    outs = Engine(model, num_blocks=64, block_size=8).generate(prompts, params)
    assert sum(len(o.token_ids) for o in outs) == 4 * 40
    for o in outs:
        assert not set(o.token_ids) & set(banned)
        rows = _dense_logits(model, o.prompt_ids + o.token_ids)[len(o.prompt_ids) - 1:-1]
        toks = torch.tensor(o.token_ids)[:, None]
        masked = rows.clone()
        masked[:, list(banned)] = float("-inf")
        # Sampling log-probs are under the banned distribution; behaviour log-probs under the raw model's.
        torch.testing.assert_close(torch.tensor(o.logprobs), (masked / 1.5).log_softmax(-1).gather(1, toks)[:, 0],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(o.behaviour_logprobs), rows.log_softmax(-1).gather(1, toks)[:, 0],
                                   atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def padded_model(model):
    """`model` with its last rows made a vocabulary's padding that the untrained model loves: logits far above the
    rest, as an unconstrained sampler would draw (and a tool call would then feed back as text that does not exist)."""
    padded = copy.deepcopy(model)
    with torch.no_grad():
        padded.lm_head_weight[PADDED_FROM:] = padded.lm_head_weight[PADDED_FROM:] * 4 + padded.lm_head_weight.mean(0)
    return padded


PADDED_FROM = 90  # the toy tokenizer's size: ids 90..100 are padding rows


def test_padding_ids_are_never_sampled_and_behaviour_logprobs_cover_every_row(padded_model):
    prompts = _prompts([5, 11, 8, 3], seed=14)
    params = SamplingParams(temperature=1.5, max_new_tokens=40, seed=22)
    unlimited = Engine(padded_model, num_blocks=64, block_size=8).generate(prompts, params)
    assert sum(t >= PADDED_FROM for o in unlimited for t in o.token_ids) >= 20  # the limit has something to remove
    engine = Engine(padded_model, num_blocks=64, block_size=8, sample_vocab_size=PADDED_FROM)
    sids = [engine.add(p, params) for p in prompts]
    engine.step()
    engine.pause(sids[0])
    children = engine.fork(sids[0], 2, forbid=[3])  # a fork's own path through the sampler: the limit holds there too
    outs = {sids[0]: engine.output(sids[0]), **_run(engine)}
    engine.release(sids[0])
    assert set(outs) == {*sids, *children}
    for o in outs.values():
        assert o.token_ids and max(o.token_ids) < PADDED_FROM
        rows = _dense_logits(padded_model, o.prompt_ids + o.token_ids)[len(o.prompt_ids) - 1:-1]
        toks = torch.tensor(o.token_ids)[:, None]
        # Behaviour log-probs: the raw distribution over all 101 rows, which the M-step recomputes.
        torch.testing.assert_close(torch.tensor(o.behaviour_logprobs), rows.log_softmax(-1).gather(1, toks)[:, 0],
                                   atol=1e-5, rtol=1e-5)
    plain = outs[sids[1]]  # no fork: sampling log-probs are under the distribution over the first 90 ids
    rows = _dense_logits(padded_model, plain.prompt_ids + plain.token_ids)[len(plain.prompt_ids) - 1:-1]
    torch.testing.assert_close(torch.tensor(plain.logprobs),
                               (rows[:, :PADDED_FROM] / 1.5).log_softmax(-1).gather(
                                   1, torch.tensor(plain.token_ids)[:, None])[:, 0], atol=1e-5, rtol=1e-5)
    greedy = Engine(padded_model, num_blocks=64, block_size=8, sample_vocab_size=PADDED_FROM).generate(
        prompts[:1], SamplingParams(temperature=0, max_new_tokens=8))[0]
    logits = _dense_logits(padded_model, greedy.prompt_ids + greedy.token_ids)[len(greedy.prompt_ids) - 1:-1]
    assert greedy.token_ids == logits[:, :PADDED_FROM].argmax(-1).tolist()


def test_sample_vocab_size_is_checked(model):
    for bad in (0, VOCAB + 1, 2.0, True):
        with pytest.raises(ValueError, match="sample_vocab_size must be None or an int in"):
            Engine(model, num_blocks=8, block_size=4, sample_vocab_size=bad)
    engine = Engine(model, num_blocks=8, block_size=4, sample_vocab_size=PADDED_FROM)
    # Banning every id below the limit bans everything samplable, though ids past it stay unbanned.
    with pytest.raises(ValueError, match="bans all 90 samplable tokens"):
        engine.add([1], SamplingParams(banned_token_ids=tuple(range(PADDED_FROM)), max_new_tokens=4))
    sid = engine.add([1, 2], SamplingParams(max_new_tokens=4, banned_token_ids=tuple(range(1, PADDED_FROM))))
    with pytest.raises(ValueError, match="together bans all 90 samplable tokens"):
        engine.fork(sid, 1, forbid=[0])


def test_greedy_with_a_ban_picks_the_best_allowed_token(model):
    prompt = _prompts([7], seed=13)[0]
    greedy = Engine(model, num_blocks=32, block_size=4).generate([prompt], SamplingParams(temperature=0,
                                                                                           max_new_tokens=12))[0]
    banned = tuple(sorted(set(greedy.token_ids[:3])))
    out = Engine(model, num_blocks=32, block_size=4).generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=12, banned_token_ids=banned))[0]
    assert out.token_ids[0] != greedy.token_ids[0]
    logits = _dense_logits(model, out.prompt_ids + out.token_ids)
    for i, tok in enumerate(out.token_ids):
        masked = logits[len(prompt) + i - 1].clone()
        masked[list(banned)] = float("-inf")
        assert tok == int(masked.argmax())


def test_fork_children_inherit_the_ban_and_add_forbid_for_one_step(model):
    prompt = _prompts([6], seed=14)[0]
    params = SamplingParams(temperature=0, max_new_tokens=10)

    def forked(banned):
        """Greedy parent paused after one token, forked twice with its best allowed next token forbidden for one
        step. Returns (the forbidden id, [(child params, child output)])."""
        engine = Engine(model, num_blocks=32, block_size=4)
        parent = engine.add(prompt, replace(params, banned_token_ids=banned))
        engine.step()
        engine.pause(parent)
        nxt = _dense_logits(model, prompt + engine.output(parent).token_ids)[-1]
        nxt[list(banned)] = float("-inf")
        forbid = int(nxt.argmax())
        children = engine.fork(parent, 2, forbid=[forbid])
        child_params = [engine.params(c) for c in children]
        done = _run(engine)
        engine.release(parent)
        _assert_pool_whole(engine)
        return forbid, [(p, done[c]) for p, c in zip(child_params, children)]

    forbid, [(_, free), _] = forked(())
    ref = free.token_ids
    # Ban a token the unbanned child picks at a step j >= 2, after the fork: only an inherited ban can remove it.
    j = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i] and ref[i] != forbid)
    banned = (ref[j],)
    forbid_banned, children = forked(banned)
    assert forbid_banned == forbid
    for child_params, out in children:
        assert child_params.banned_token_ids == banned
        assert out.token_ids[:j] == ref[:j] and out.token_ids[j] != ref[j] and banned[0] not in out.token_ids
        logits = _dense_logits(model, out.prompt_ids + out.token_ids)
        for i in range(1, len(out.token_ids)):
            masked = logits[len(prompt) + i - 1].clone()
            masked[list(banned) + ([forbid] if i == 1 else [])] = float("-inf")
            assert out.token_ids[i] == int(masked.argmax())
    assert children[0][1].token_ids == children[1][1].token_ids  # greedy siblings agree


def test_fork_with_params_bans_from_the_fork_on_and_keeps_the_parent_seed_lineage(model):
    prompt = _prompts([5], seed=15)[0]
    engine = Engine(model, num_blocks=32, block_size=4)
    parent = engine.add(prompt, SamplingParams(temperature=0, max_new_tokens=8, seed=7))
    engine.step()
    engine.pause(parent)
    (first,) = engine.fork(parent, 1)  # the unbanned greedy continuation
    free_out = _run(engine)[first]
    banned = tuple(sorted(set(free_out.token_ids[1:])))  # everything it would say after the fork
    (child,) = engine.fork(parent, 1, params=SamplingParams(temperature=0, max_new_tokens=8, seed=123,
                                                            banned_token_ids=banned))
    assert engine.params(child).banned_token_ids == banned
    assert engine.params(child).seed != 123  # derived from the parent's, like any fork
    out = _run(engine)[child]
    assert out.token_ids[0] == free_out.token_ids[0] and not set(out.token_ids[1:]) & set(banned)
    with pytest.raises(ValueError, match="params must be None or a SamplingParams"):
        engine.fork(parent, 1, params={"temperature": 0})
    with pytest.raises(ValueError, match="no max_new_tokens budget"):
        engine.fork(parent, 1, params=SamplingParams(max_new_tokens=1))
    engine.release(parent)
    _assert_pool_whole(engine)


def test_seeded_sampling_is_reproducible_regardless_of_batch(model):
    prompt = _prompts([12], seed=3)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=1234)

    def alone(p):
        engine = Engine(model, num_blocks=64, block_size=4)
        sid = engine.add(prompt, p)
        return _run(engine)[sid]

    a = alone(params)
    # Other sequences (greedy, top-k, other temperatures), added first, and another block size.
    crowd = Engine(model, num_blocks=64, block_size=8)
    for i, other in enumerate(_prompts([5, 20, 9], seed=4)):
        crowd.add(other, SamplingParams(temperature=[0, 0.5, 1.3][i], top_k=[0, 5, 0][i], max_new_tokens=10 + i))
    sid = crowd.add(prompt, params)
    b = _run(crowd)[sid]
    assert b.token_ids == a.token_ids
    torch.testing.assert_close(b.logprobs, a.logprobs, atol=1e-5, rtol=0)
    assert alone(params).token_ids == a.token_ids
    assert alone(replace(params, seed=99)).token_ids != a.token_ids
    # generate() gives repeated prompts distinct derived seeds.
    outs = Engine(model, num_blocks=64, block_size=4).generate([prompt] * 2, params)
    assert outs[0].token_ids != outs[1].token_ids


def test_filtered_logprobs_exact_small_vocabulary():
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = p.log()[None].repeat(6, 1)
    temperature = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 0.0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.6, 0.5, 1.0])
    top_k = torch.tensor([0, 0, 2, 0, 3, 0])
    got = filtered_logprobs(logits, temperature, top_p, top_k).exp()
    sq = p.sqrt()
    expected = torch.stack([
        p,
        sq / sq.sum(),  # temperature 2: p^(1/2), renormalised
        torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7,  # top-k 2
        torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7,  # top-p 0.6: 0.5 < 0.6, so the second token is kept too
        torch.tensor([1.0, 0, 0, 0, 0]),  # top-k 3 then top-p 0.5: 0.5/0.85 >= 0.5 already
        torch.tensor([1.0, 0, 0, 0, 0]),  # greedy
    ])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def _chi2_critical(df, z=3.719):
    """Wilson-Hilferty approximation of the chi-square quantile at normal quantile z (3.719: p = 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature, top_p, top_k", [(0.6, 1.0, 0), (1.5, 0.8, 0), (1.0, 1.0, 6)])
def test_sampled_frequencies_follow_the_filtered_distribution(model, temperature, top_p, top_k):
    prompt = _prompts([4], seed=5)[0]
    n = 1500
    params = [SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=1, seed=s)
              for s in range(n)]
    engine = Engine(model, num_blocks=n + 8, block_size=8, max_num_seqs=512, max_num_batched_tokens=4096)
    for prm in params:
        engine.add(prompt, prm)
    done = _run(engine)
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in done.values()]), minlength=VOCAB).float()
    logits = _dense_logits(model, prompt)[-1:]
    logp = filtered_logprobs(logits, torch.tensor([temperature]), torch.tensor([top_p]), torch.tensor([top_k]))[0]
    probs = logp.exp()
    assert counts[probs == 0].sum() == 0, "a token outside the top-k/top-p support was sampled"
    # Pool the rare categories so every expected count is >= 5.
    expected = probs * n
    order = expected.argsort(descending=True)
    keep = order[expected[order] >= 5]
    rest = order[expected[order] < 5]
    obs = torch.cat([counts[keep], counts[rest].sum()[None]])
    exp_ = torch.cat([expected[keep], expected[rest].sum()[None]])
    nonzero = exp_ > 0
    chi2 = float(((obs[nonzero] - exp_[nonzero]) ** 2 / exp_[nonzero]).sum())
    df = int(nonzero.sum()) - 1
    assert df >= 3
    assert chi2 < _chi2_critical(df), (chi2, df)
    # The sampling log-prob reported is that distribution's.
    o = next(iter(done.values()))
    assert o.logprobs[0] == pytest.approx(float(logp[o.token_ids[0]]), abs=1e-5)


def test_temperature_sharpens_and_flattens(model):
    """Lower temperature puts more mass on the mode, higher less (entropy is monotone in temperature)."""
    logits = _dense_logits(model, _prompts([4], seed=5)[0])[-1:]
    ent = []
    for t in (0.3, 1.0, 3.0):
        lp = filtered_logprobs(logits, torch.tensor([t]), torch.tensor([1.0]), torch.tensor([0]))
        ent.append(float(-(lp.exp() * lp).sum()))
    assert ent[0] < ent[1] < ent[2]


def test_behaviour_logprobs_equal_dense_forward(model):
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.95, max_new_tokens=12, seed=5, train_temperature=1.3)
    prompts = _prompts([7, 13], seed=6)
    engine = Engine(model, num_blocks=64, block_size=4)
    for o in engine.generate(prompts, params):
        ids = o.prompt_ids + o.token_ids
        logits = _dense_logits(model, ids)
        rows = logits[len(o.prompt_ids) - 1:-1]
        toks = torch.tensor(o.token_ids)
        behaviour = (rows / 1.3).log_softmax(-1).gather(1, toks[:, None])[:, 0]
        sampling = filtered_logprobs(rows, torch.full((len(toks),), 0.7), torch.full((len(toks),), 0.95),
                                     torch.full((len(toks),), 20)).gather(1, toks[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(o.behaviour_logprobs), behaviour, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(o.logprobs), sampling, atol=1e-5, rtol=0)


def test_pause_append_resume_equals_one_prompt(model):
    prompt = _prompts([9], seed=7)[0]
    tool = _prompts([6], seed=8)[0]
    params = SamplingParams(temperature=0, max_new_tokens=30)
    engine = Engine(model, num_blocks=64, block_size=4)
    sid = engine.add(prompt, params)
    for _ in range(5):
        engine.step()
    engine.pause(sid)
    assert not engine.has_unfinished()
    assert engine.step() == []
    paused = engine.output(sid)
    assert paused.finish_reason == "paused" and len(paused.token_ids) == 5
    engine.append(sid, tool)
    out = _run(engine)[sid]
    assert out.loss_mask == [1] * 5 + [0] * 6 + [1] * 19
    assert out.logprobs[5:11] == [0.0] * 6 and out.behaviour_logprobs[5:11] == [0.0] * 6
    assert out.token_ids[5:11] == tool

    single = Engine(model, num_blocks=64, block_size=4)
    ref_id = single.add(prompt + out.token_ids[:11], SamplingParams(temperature=0, max_new_tokens=19))
    ref = _run(single)[ref_id]
    assert out.token_ids[11:] == ref.token_ids
    torch.testing.assert_close(out.behaviour_logprobs[11:], ref.behaviour_logprobs, atol=1e-5, rtol=0)
    _assert_pool_whole(engine)


def test_stop_strings_pause_including_mid_token_and_stop_tokens_finish(model):
    prompt = _prompts([5], seed=9)[0]
    base = SamplingParams(temperature=0, max_new_tokens=24)
    free = Engine(model, num_blocks=64, block_size=4, detokenize=detok).generate([prompt], base)[0]
    toks = free.token_ids
    # A stop string = the last letter of token k-1 + the first letter of token k (2+ letters): it ends inside
    # token k. Take the first k where it does not occur earlier.
    k = next(k for k in range(2, len(toks)) if len(PIECES[toks[k]]) >= 2
             and PIECES[toks[k - 1]][-1] + PIECES[toks[k]][0] not in detok(toks[:k]))
    stop = PIECES[toks[k - 1]][-1] + PIECES[toks[k]][0]
    engine = Engine(model, num_blocks=64, block_size=4, detokenize=detok)
    sid = engine.add(prompt, SamplingParams(temperature=0, max_new_tokens=24, stop_strings=("@@", stop)))
    reported = []
    while engine.has_unfinished():
        reported += engine.step()
    assert [o.seq_id for o in reported] == [sid]
    out = reported[0]
    assert out.finish_reason == "stop_string" and out.stop_string == stop
    assert out.token_ids == toks[:k + 1]  # the token holding the stop string is kept
    engine.resume(sid)
    rest = _run(engine)[sid]
    assert rest.token_ids == toks[:len(rest.token_ids)] and rest.finish_reason in ("length", "stop_string")

    stop_tok = toks[3]
    first = toks.index(stop_tok)
    out = Engine(model, num_blocks=64, block_size=4).generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=(stop_tok,)))[0]
    assert out.finish_reason == "stop" and out.token_ids == toks[:first + 1]


def test_preemption_under_tiny_budget_matches_unconstrained(model):
    prompts = _prompts([30, 12, 21, 5, 17, 9], seed=10)
    params = SamplingParams(temperature=0, max_new_tokens=26)
    big = Engine(model, num_blocks=256, block_size=4)
    ref = big.generate(prompts, params)
    # 14 blocks of 4 hold the longest sequence (30 + 26 tokens) alone, and barely two others.
    tiny = Engine(model, num_blocks=14, block_size=4)
    got = tiny.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.behaviour_logprobs, b.behaviour_logprobs, atol=1e-5, rtol=0)
    assert tiny.stats.preemptions > 0 and tiny.stats.recomputed_tokens > 0
    assert tiny.stats.peak_kv_blocks <= 14
    _assert_pool_whole(tiny)


def test_preemption_with_forks_and_paused_sequences(model):
    """Forked families and a paused sequence under memory pressure: same tokens as with plenty of memory."""
    prompts = _prompts([14, 8, 11], seed=11)

    def scenario(num_blocks):
        engine = Engine(model, num_blocks=num_blocks, block_size=4)
        ids = [engine.add(p, SamplingParams(temperature=0.8, max_new_tokens=20, seed=i))
               for i, p in enumerate(prompts)]
        kids, done = [], {}
        # Act at fixed token counts (a step adds at most one token per sequence), whatever the schedule.
        fork_at = {ids[0]: (3, 4), ids[1]: (2, 3)}  # parent: (children, tokens kept after the prompt)
        paused = False
        while fork_at or not paused:
            for out in engine.step():
                done[out.seq_id] = out
            for parent, (n, r) in list(fork_at.items()):
                if len(engine.output(parent).token_ids) >= r:
                    kids += engine.fork(parent, n, at=len(engine.output(parent).prompt_ids) + r)
                    del fork_at[parent]
            if not paused and len(engine.output(ids[2]).token_ids) == 3:
                engine.pause(ids[2])
                paused = True
        done.update(_run(engine))
        engine.append(ids[2], [1, 2, 3])
        done.update(_run(engine))
        _assert_pool_whole(engine)
        return {k: done[k].token_ids for k in ids + kids}, engine.stats

    ref, _ = scenario(256)
    got, stats = scenario(9)
    assert got == ref
    assert stats.preemptions > 0


def test_prefix_caching_reuses_a_finished_prompt(model):
    prompt = _prompts([21], seed=12)[0]
    engine = Engine(model, num_blocks=64, block_size=4, enable_prefix_caching=True)
    params = SamplingParams(temperature=0, max_new_tokens=8)
    first = engine.generate([prompt], params)[0]
    second = engine.generate([prompt], params)[0]
    assert second.token_ids == first.token_ids
    assert engine.stats.prefix_reused_tokens == 20  # 5 full blocks of the 21-token prompt
    assert engine.stats.prefill_tokens == 21 + 1


def test_append_that_fills_the_budget_finishes_with_length(model):
    engine = Engine(model, num_blocks=32, block_size=4)
    sid = engine.add([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=5))
    engine.step()
    engine.pause(sid)
    with pytest.raises(ValueError, match="exceeds max_new_tokens"):
        engine.append(sid, [4] * 5)
    engine.append(sid, [4] * 4)
    assert engine.has_unfinished()
    (out,) = engine.step()
    assert out.finish_reason == "length" and len(out.token_ids) == 5 and out.loss_mask == [1, 0, 0, 0, 0]
    _assert_pool_whole(engine)


def test_several_appends_that_fill_the_budget_before_one_step_all_finish(model):
    # Each filled sequence is reported once by the next step (a loop that released while iterating skipped some).
    engine = Engine(model, num_blocks=32, block_size=4)
    sids = [engine.add([1, 2, 3 + i], SamplingParams(temperature=0, max_new_tokens=3)) for i in range(3)]
    engine.step()
    for sid in sids:
        engine.append(sid, [4, 4])
    outs = engine.step()
    assert sorted(o.seq_id for o in outs) == sorted(sids) and {o.finish_reason for o in outs} == {"length"}
    assert not engine.has_unfinished()
    _assert_pool_whole(engine)


def test_bad_input_raises_value_error(model):
    engine = Engine(model, num_blocks=8, block_size=4)
    ok = SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match="must not be empty"):
        engine.add([], ok)
    with pytest.raises(ValueError, match="prompt over the budget"):
        engine.add([1] * 30, ok)
    with pytest.raises(ValueError, match="prompt over the budget"):
        engine.add([1] * 4, SamplingParams(max_new_tokens=29))
    with pytest.raises(ValueError, match=r"prompt_ids holds 101"):
        engine.add([1, VOCAB], ok)
    with pytest.raises(ValueError, match=r"prompt_ids holds -1"):
        engine.add([-1], ok)
    with pytest.raises(ValueError, match="detokenize"):
        engine.add([1], SamplingParams(stop_strings=("x",), max_new_tokens=4))
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add([1], SamplingParams(stop_token_ids=(VOCAB + 5,), max_new_tokens=4))
    with pytest.raises(ValueError, match=r"banned_token_ids holds 101"):
        engine.add([1], SamplingParams(banned_token_ids=(3, VOCAB), max_new_tokens=4))
    with pytest.raises(ValueError, match=r"banned_token_ids holds -2"):
        engine.add([1], SamplingParams(banned_token_ids=(-2,), max_new_tokens=4))
    with pytest.raises(ValueError, match="bans all 101 samplable tokens"):
        engine.add([1], SamplingParams(banned_token_ids=tuple(range(VOCAB)), max_new_tokens=4))
    for bad in ((1.0,), (True,), "12", 5):
        with pytest.raises(ValueError, match="SamplingParams.banned_token_ids"):
            SamplingParams(banned_token_ids=bad)
    assert SamplingParams(banned_token_ids=frozenset({9, 2, 9})).banned_token_ids == (2, 9)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(max_new_tokens=0),
                dict(train_temperature=0), dict(stop_strings=("",)), dict(seed=-3)):
        with pytest.raises(ValueError, match="SamplingParams." + next(iter(bad))):
            SamplingParams(**bad)
    for call in (lambda: engine.pause(99), lambda: engine.resume(99), lambda: engine.append(99, [1]),
                 lambda: engine.fork(99, 1), lambda: engine.release(99), lambda: engine.output(99)):
        with pytest.raises(ValueError, match="unknown seq_id 99"):
            call()
    sid = engine.add([1, 2, 3], ok)
    with pytest.raises(ValueError, match=r"forbid holds 101"):
        engine.fork(sid, 1, forbid=[VOCAB])
    banned_sid = engine.add([1, 2], SamplingParams(max_new_tokens=4, banned_token_ids=tuple(range(1, VOCAB))))
    with pytest.raises(ValueError, match="together bans all 101 samplable tokens"):
        engine.fork(banned_sid, 1, forbid=[0])
    engine.release(banned_sid)
    with pytest.raises(ValueError, match=r"token_ids holds 200"):
        engine.append(sid, [200])
    with pytest.raises(ValueError, match="at must be"):
        engine.fork(sid, 1, at=2)
    with pytest.raises(ValueError, match="n must be"):
        engine.fork(sid, 0)
    with pytest.raises(ValueError, match="idle engine"):
        engine.generate([[1]], ok)
    with pytest.raises(ValueError, match="num_blocks"):
        Engine(model, num_blocks=0)
    engine.release(sid)
    _assert_pool_whole(engine)
