"""BlockManager bookkeeping (refcounts, fork, copy-on-write, prefix caching, OutOfBlocks) and KVPool data."""

import math
import random

import pytest
import torch

from acim_fast.engine.kv_cache import BlockManager, KVPool, OutOfBlocks, write_kv
from acim_kernels.paged_attention_ref import paged_attention_ref


def _prefix_values(tokens):
    """Stand-in for a model's K/V: the value at position p depends on every token up to p (as real K/V
    does), so a block revived under the wrong prefix reads back wrong."""
    out, h = [], 0
    for t in tokens:
        h = (h * 31 + t) % 1_000_003
        out.append(float(h))
    return out


def _write_tokens(pool, bm, seq_id, start, values):
    """Write K = V = `values` (one float per token, in every layer) for positions [start, start+len)."""
    slots = torch.tensor(bm.slot_mapping(seq_id, start, start + len(values)), dtype=torch.int64)
    kv = torch.tensor(values, dtype=pool.k.dtype)[:, None, None].expand(-1, *pool.k.shape[3:])
    for layer in range(pool.num_layers):
        pool.write(layer, kv + layer, kv + layer, slots)


def _read_tokens(pool, bm, seq_id, layer=0):
    slots = torch.tensor(bm.slot_mapping(seq_id, 0, bm.num_tokens(seq_id)), dtype=torch.int64)
    flat = pool.k[layer].reshape(-1, *pool.k.shape[3:])
    assert torch.equal(flat[slots], pool.v[layer].reshape(-1, *pool.k.shape[3:])[slots])
    return (flat[slots][:, 0, 0] - layer).tolist()


def test_allocate_append_free_accounting():
    bm = BlockManager(10, 4)
    assert bm.allocate("a", list(range(6))) == 0
    assert len(bm.block_table("a")) == 2 and bm.num_tokens("a") == 6 and bm.num_free_blocks == 8
    table = bm.block_table("a")
    assert bm.slot_mapping("a", 0, 6) == [table[p // 4] * 4 + p % 4 for p in range(6)]
    assert bm.slot_mapping("a", 6, 6) == []
    assert bm.append("a", [7, 8]) == []  # fills block 1 in place
    assert bm.num_free_blocks == 8
    assert bm.append("a", [9]) == []  # opens block 2
    assert bm.num_tokens("a") == 9 and len(bm.block_table("a")) == 3 and bm.block_table("a")[:2] == table
    assert bm.allocate("b", []) == 0 and bm.block_table("b") == []
    assert bm.append("b", [1] * 5) == [] and len(bm.block_table("b")) == 2
    assert bm.stats()["used_blocks"] == 5 and bm.stats()["num_seqs"] == 2
    assert bm.num_free_blocks == 5  # room for 20 more tokens, not 21
    bm.check_invariants()
    bm.free("a")
    bm.free("b")
    bm.check_invariants()
    assert bm.num_free_blocks == 10 and bm.stats()["used_blocks"] == 0 and "a" not in bm


def test_fork_shares_every_block():
    bm = BlockManager(8, 4)
    bm.allocate("p", list(range(10)))
    table = bm.block_table("p")
    bm.fork("p", ["c1", "c2"])
    assert bm.block_table("c1") == table == bm.block_table("c2")
    assert bm.num_tokens("c1") == 10 and bm.num_free_blocks == 5
    assert [bm._refcount[b] for b in table] == [3, 3, 3]
    assert bm.stats()["shared_blocks"] == 3
    bm.free("p")
    assert [bm._refcount[b] for b in table] == [2, 2, 2] and bm.num_free_blocks == 5
    bm.free("c1")
    bm.free("c2")
    bm.check_invariants()
    assert bm.num_free_blocks == 8 and all(r == 0 for r in bm._refcount)


def test_cow_isolates_siblings_and_attention_sees_its_own_branch():
    bm = BlockManager(12, 4)
    pool = KVPool(2, 12, 4, 1, 3, torch.float32, "cpu")
    prompt = [float(p) for p in range(6)]
    bm.allocate("p", [0] * 6)
    _write_tokens(pool, bm, "p", 0, prompt)
    bm.fork("p", ["a", "b"])
    # Every sibling's first write lands in the shared partial block 1: each gets a private copy first.
    for seq_id, value in (("a", 100.0), ("b", 200.0), ("p", 300.0)):
        copies = bm.append(seq_id, [0])
        if seq_id != "p":
            assert len(copies) == 1 and copies[0][0] == bm.block_table("p")[1]
        else:  # by now the parent is the block's only holder: it writes in place
            assert copies == []
        pool.copy_blocks(copies)
        _write_tokens(pool, bm, seq_id, 6, [value])
    for layer in range(2):
        assert _read_tokens(pool, bm, "a", layer) == prompt + [100.0]
        assert _read_tokens(pool, bm, "b", layer) == prompt + [200.0]
        assert _read_tokens(pool, bm, "p", layer) == prompt + [300.0]
    tables = [bm.block_table(s) for s in ("p", "a", "b")]
    assert tables[0][0] == tables[1][0] == tables[2][0]  # the full block 0 stays shared
    assert len({t[1] for t in tables}) == 3
    assert bm.stats()["cow_copies"] == 2
    bm.check_invariants()

    # Paged attention over the three branches equals dense attention over each branch's own K/V.
    seq_ids = ["p", "a", "b"]
    q = torch.randn(3, 2, 3)
    block_tables = torch.tensor([bm.block_table(s) for s in seq_ids], dtype=torch.int32)
    seq_lens = torch.tensor([7, 7, 7], dtype=torch.int32)
    out = paged_attention_ref(q, pool.k[1], pool.v[1], block_tables, seq_lens,
                              torch.arange(4, dtype=torch.int32), scale=0.5)
    for i, s in enumerate(seq_ids):
        kv = torch.tensor(_read_tokens(pool, bm, s, 1)) + 1
        probs = torch.softmax(0.5 * q[i] @ kv[:, None].expand(-1, 3).T, dim=-1)  # [H, 7]
        torch.testing.assert_close(out[i], probs @ kv[:, None].expand(-1, 3), rtol=1e-5, atol=1e-5)


def test_fork_at_shares_only_the_prefix():
    bm = BlockManager(10, 4)
    pool = KVPool(1, 10, 4, 1, 1, torch.float32, "cpu")
    bm.allocate("p", [0] * 10)
    parent_vals = [float(i) for i in range(10)]
    _write_tokens(pool, bm, "p", 0, parent_vals)
    p0, p1, p2 = bm.block_table("p")

    bm.fork("p", ["mid"], at=6)
    assert bm.block_table("mid") == [p0, p1] and bm.num_tokens("mid") == 6
    assert [bm._refcount[b] for b in (p0, p1, p2)] == [2, 2, 1]
    assert _read_tokens(pool, bm, "mid") == parent_vals[:6]
    copies = bm.append("mid", [0, 0])
    assert copies and copies[0][0] == p1 and bm.block_table("mid")[0] == p0
    pool.copy_blocks(copies)
    _write_tokens(pool, bm, "mid", 6, [-1.0, -2.0])
    assert _read_tokens(pool, bm, "mid") == parent_vals[:6] + [-1.0, -2.0]
    assert _read_tokens(pool, bm, "p") == parent_vals  # parent tokens 6, 7 in block p1 untouched

    bm.fork("p", ["edge"], at=8)  # on a block boundary: nothing partial is shared, no copy needed
    assert bm.block_table("edge") == [p0, p1]
    assert bm.append("edge", [0]) == [] and len(bm.block_table("edge")) == 3
    bm.fork("p", ["empty"], at=0)
    assert bm.block_table("empty") == [] and bm.num_tokens("empty") == 0
    with pytest.raises(ValueError, match="at"):
        bm.fork("p", ["bad"], at=11)
    with pytest.raises(ValueError, match="at"):
        bm.fork("p", ["bad"], at=-1)
    for s in ("p", "mid", "edge", "empty"):
        bm.free(s)
    bm.check_invariants()
    assert bm.num_free_blocks == 10


def test_prefix_cache_hits_whole_written_blocks_and_shares_them():
    bm = BlockManager(16, 4, enable_prefix_caching=True)
    prompt = list(range(1, 11))  # 2 full blocks + 2 tokens
    assert bm.allocate("a", prompt) == 0
    # Not written yet as far as the manager knows (no append past it): no hit.
    assert bm.allocate("early", prompt) == 0
    bm.append("a", [50])
    assert bm.allocate("b", prompt) == 8
    assert bm.block_table("b")[:2] == bm.block_table("a")[:2] and bm.block_table("b")[2] != bm.block_table("a")[2]
    assert bm.allocate("c", prompt[:4] + [0] * 6) == 4  # diverges in block 1
    assert bm.allocate("d", prompt[:8]) == 4  # a whole-prompt hit still leaves one block to compute
    # Block 1's tokens at position 0 are a different prefix: no hit (hashes chain over all earlier tokens).
    assert bm.allocate("g", prompt[4:8] + prompt[4:8] + [0]) == 0
    assert bm._refcount[bm.block_table("a")[0]] == 4
    st = bm.stats()
    assert st["prefix_hits"] == 3 and st["prefix_hit_tokens"] == 16 and st["prefix_queries"] == 6
    for s in ("a", "b", "c", "d", "early", "g"):
        bm.free(s)
    bm.check_invariants()
    # Freed hashed blocks stay cached (and count as free) until evicted.
    assert bm.num_free_blocks == 16 and bm.stats()["cached_free_blocks"] == 2
    assert bm.allocate("e", prompt) == 8
    bm.free("e")
    # Using every block evicts the cached ones (tail block first), after which nothing hits.
    bm.allocate("hog", [0] * 64)
    bm.free("hog")
    assert bm.allocate("f", prompt) == 0
    bm.free("f")
    bm.check_invariants()


def test_prefix_cache_hashes_whole_prefixes_and_evicts_tails_first():
    bm = BlockManager(3, 4, enable_prefix_caching=True)
    prompt = list(range(1, 10))
    bm.allocate("a", prompt)
    bm.fork("a", ["child"], at=8)
    bm.free("a")
    bm.append("child", [0])  # a child's first append offers the blocks it shares with its parent
    bm.free("child")
    assert bm.stats()["cached_free_blocks"] == 2
    # Two hits revived from the cache plus two new blocks do not fit in three: refuse cleanly.
    snapshot = (bm.stats(), list(bm._refcount))
    with pytest.raises(OutOfBlocks):
        bm.allocate("big", prompt[:8] + [0] * 5)
    assert snapshot == (bm.stats(), list(bm._refcount)) and "big" not in bm
    # Needing two blocks with one plain free block evicts one cached block: the prefix's tail, not its head.
    bm.allocate("x", [0] * 8)
    bm.free("x")
    assert bm.allocate("again", prompt) == 4
    bm.free("again")
    bm.check_invariants()


def test_prefix_cache_forgets_a_block_overwritten_in_place():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    bm.allocate("p", list(range(1, 9)))
    bm.append("p", [9])  # registers blocks 0 and 1
    bm.fork("p", ["c"], at=6)
    bm.free("p")  # the child now holds block 1 alone, with parent tokens 7, 8 past its length
    assert bm.append("c", [99]) == []  # written in place: block 1 no longer holds tokens 1..8
    assert bm.allocate("q", list(range(1, 9)) + [10]) == 4
    bm.free("c")
    bm.free("q")
    bm.check_invariants()


def test_out_of_blocks_leaves_state_unchanged():
    bm = BlockManager(4, 4)
    bm.allocate("a", [0] * 10)  # 3 blocks
    snapshot = (bm.stats(), bm.block_table("a"), list(bm._refcount))
    with pytest.raises(OutOfBlocks):
        bm.allocate("b", [0] * 8)
    assert "b" not in bm
    with pytest.raises(OutOfBlocks):
        bm.append("a", [0] * 7)  # needs 2 more blocks
    assert bm.num_tokens("a") == 10
    bm.fork("a", ["c"])
    bm.allocate("d", [0])  # takes the last block
    snapshot = (bm.stats(), bm.block_table("a"), bm.block_table("c"), list(bm._refcount))
    with pytest.raises(OutOfBlocks):
        bm.append("c", [0])  # the copy-on-write copy needs a block
    assert snapshot == (bm.stats(), bm.block_table("a"), bm.block_table("c"), list(bm._refcount))
    assert bm.num_tokens("c") == 10
    assert issubclass(OutOfBlocks, RuntimeError)
    bm.check_invariants()


def test_unknown_and_duplicate_ids_raise_value_error():
    bm = BlockManager(4, 4)
    bm.allocate("a", [1, 2])
    for call in (lambda: bm.num_tokens("x"), lambda: bm.block_table("x"), lambda: bm.slot_mapping("x", 0, 0),
                 lambda: bm.append("x", [1]), lambda: bm.free("x"), lambda: bm.fork("x", ["y"]),
                 lambda: bm.allocate("a", [1]), lambda: bm.fork("a", ["a"]), lambda: bm.fork("a", ["y", "y"]),
                 lambda: bm.slot_mapping("a", 0, 3), lambda: bm.slot_mapping("a", 2, 1)):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
    assert bm.block_table("a") and "y" not in bm
    bm.check_invariants()


def test_kv_pool_write_copy_and_errors():
    pool = KVPool(3, 5, 2, 2, 4, torch.bfloat16, "cpu")
    assert pool.k[0].shape == (5, 2, 2, 4) and pool.nbytes == 2 * 3 * 5 * 2 * 2 * 4 * 2
    k, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    pool.write(1, k, v, torch.tensor([9, 0, 3]))
    torch.testing.assert_close(pool.k[1][4, 1], k[0].bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(pool.v[1][1, 1], v[2].bfloat16(), rtol=0, atol=0)
    assert pool.k[0].abs().sum() == 0 and pool.k[2].abs().sum() == 0
    before = pool.k.clone()
    pool.copy_blocks([(4, 2), (2, 4)])  # a swap: every source is read before any destination is written
    assert torch.equal(pool.k[:, 2], before[:, 4]) and torch.equal(pool.k[:, 4], before[:, 2])
    for bad in (lambda: pool.write(3, k, v, torch.tensor([0, 1, 2])),
                lambda: pool.write(0, k, v, torch.tensor([0, 1, 10])),
                lambda: pool.write(0, k, v, torch.tensor([0, 1], dtype=torch.int64)),
                lambda: pool.write(0, k, v, torch.tensor([0, 1, 2], dtype=torch.int32)),
                lambda: pool.write(0, k[:, :1], v, torch.tensor([0, 1, 2])),
                lambda: pool.copy_blocks([(0, 5)]), lambda: pool.copy_blocks([(0, 1), (2, 1)])):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(ValueError, match="num_blocks"):
        KVPool(1, 0, 2, 2, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="contiguous"):
        write_kv(pool.k[0].transpose(0, 1), pool.v[0].transpose(0, 1), k, v, torch.tensor([0, 1, 2]))
    cache = torch.zeros(2, 2, 1, 1)
    write_kv(cache, cache.clone(), torch.ones(1, 1, 1), torch.ones(1, 1, 1), torch.tensor([3]))
    assert cache[1, 1, 0, 0] == 1


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_random_operations_keep_invariants_and_contents(prefix_caching):
    """Random allocate/append/fork/free against a model in which every sequence is its list of tokens and
    the cached K of a position is a function of the prefix up to it: after every operation each live sequence
    must read back exactly its own values, however its blocks are shared, copied or revived from the cache."""
    rng = random.Random(1234 + prefix_caching)
    bs, nblocks = 3, 24
    bm = BlockManager(nblocks, bs, enable_prefix_caching=prefix_caching)
    pool = KVPool(1, nblocks, bs, 1, 1, torch.float32, "cpu")
    model: dict[int, list[int]] = {}
    prompts = [[rng.randrange(1, 5) for _ in range(rng.randrange(1, 12))] for _ in range(4)]
    next_id, out_of_blocks, hits = 0, 0, 0
    for _ in range(400):
        op = rng.choice(["allocate", "append", "append", "fork", "free"] if model else ["allocate"])
        before = (bm.stats(), {s: bm.block_table(s) for s in model}, list(bm._refcount))
        try:
            if op == "allocate":
                tokens = list(rng.choice(prompts)) + [rng.randrange(1, 5) for _ in range(rng.randrange(3))]
                cached = bm.allocate(next_id, tokens)
                assert cached % bs == 0 and 0 <= cached < max(len(tokens), 1)
                hits += cached > 0
                _write_tokens(pool, bm, next_id, cached, _prefix_values(tokens)[cached:])
                model[next_id] = tokens
                next_id += 1
            elif op == "append":
                seq_id = rng.choice(list(model))
                tokens = [rng.randrange(1, 5) for _ in range(rng.randrange(1, 6))]
                pool.copy_blocks(bm.append(seq_id, tokens))
                start = len(model[seq_id])
                model[seq_id] += tokens
                _write_tokens(pool, bm, seq_id, start, _prefix_values(model[seq_id])[start:])
            elif op == "fork":
                parent = rng.choice(list(model))
                at = rng.choice([None, rng.randrange(len(model[parent]) + 1)])
                children = list(range(next_id, next_id + rng.randrange(1, 3)))
                next_id += len(children)
                bm.fork(parent, children, at=at)
                for c in children:
                    model[c] = list(model[parent][: len(model[parent]) if at is None else at])
            else:
                seq_id = rng.choice(list(model))
                bm.free(seq_id)
                del model[seq_id]
        except OutOfBlocks:
            out_of_blocks += 1
            assert before == (bm.stats(), {s: bm.block_table(s) for s in model}, list(bm._refcount))
        bm.check_invariants()
        for seq_id, tokens in model.items():
            assert bm.num_tokens(seq_id) == len(tokens)
            assert _read_tokens(pool, bm, seq_id) == _prefix_values(tokens), seq_id
        assert bm.num_free_blocks == nblocks - bm.stats()["used_blocks"]
        assert sum(math.ceil(len(t) / bs) for t in model.values()) >= bm.stats()["used_blocks"]
    assert out_of_blocks > 0 and bm.stats()["cow_copies"] > 0  # the run did exercise the hard paths
    assert (hits > 0) == prefix_caching
    for seq_id in list(model):
        bm.free(seq_id)
    bm.check_invariants()
    assert all(r == 0 for r in bm._refcount) and bm.num_free_blocks == nblocks
