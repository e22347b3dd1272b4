"""Paged K/V cache: the block pool tensors (`KVPool`) and the block bookkeeping (`BlockManager`).

`KVPool` owns one K and one V tensor per layer, `[num_blocks, block_size, Hkv, D]` (the layout
`acim_kernels.paged_attention` reads), writes new K/V by slot and copies blocks for copy-on-write.
`BlockManager` hands out block ids with reference counts, so sequences can share blocks: `fork` gives children
the parent's blocks without copying, `append` returns the copy-on-write copies a write into a shared partial
block needs, and optional prefix caching reuses full blocks across sequences with the same leading tokens.

It knows nothing about models, tokenizers or scheduling: it never runs attention and never decides whom to
preempt (it raises `OutOfBlocks`; the engine decides). `BlockManager` is pure Python and touches no tensor.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch


class OutOfBlocks(RuntimeError):
    """Not enough free blocks for the request; the manager's state is unchanged (the engine may preempt)."""


def write_kv(k_cache, v_cache, k, v, slot_mapping, *, validate=True):
    """Write new tokens' K/V into one layer's paged cache, in place.

    k_cache/v_cache [num_blocks, block_size, Hkv, D]
    k/v             [T, Hkv, D]  (cast to the cache dtype)
    slot_mapping    [T] int64    slot = block_id * block_size + offset in block (see BlockManager.slot_mapping)
    validate        check slot values are in range (on a GPU that costs a device-to-host copy)
    """
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache/v_cache must share a [num_blocks, block_size, Hkv, D] shape, "
                         f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache/v_cache must be contiguous (slots index their flattened first two dims)")
    token_shape = k_cache.shape[2:]
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or t.shape[1:] != token_shape:
            raise ValueError(f"{name} must be [T, {token_shape[0]}, {token_shape[1]}], got {tuple(t.shape)}")
        if t.device != k_cache.device:
            raise ValueError(f"{name} is on {t.device} but the cache is on {k_cache.device}")
    if v.shape[0] != k.shape[0]:
        raise ValueError(f"v has {v.shape[0]} tokens but k has {k.shape[0]}")
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype != torch.int64 \
            or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be an int64 tensor of shape [{k.shape[0]}], got "
                         f"{getattr(slot_mapping, 'dtype', type(slot_mapping))} "
                         f"{tuple(getattr(slot_mapping, 'shape', ()))}")
    if slot_mapping.device != k_cache.device:
        raise ValueError(f"slot_mapping is on {slot_mapping.device} but the cache is on {k_cache.device}")
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if validate and slot_mapping.numel() and (int(slot_mapping.min()) < 0 or int(slot_mapping.max()) >= num_slots):
        raise ValueError(f"slot_mapping holds slots outside [0, {num_slots})")
    k_cache.view(num_slots, *token_shape).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(num_slots, *token_shape).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


class KVPool:
    """K/V tensors of every layer: `k[layer]`, `v[layer]` are `[num_blocks, block_size, Hkv, D]` views.

    All layers live in one `[num_layers, num_blocks, ...]` tensor per K and V so a block copy is one
    indexing op across every layer.
    """

    def __init__(self, num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
        for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def write(self, layer, k, v, slot_mapping, *, validate=True):
        """Write K/V `[T, Hkv, D]` of layer `layer` at `slot_mapping` `[T]` int64 (see `write_kv`)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        write_kv(self.k[layer], self.v[layer], k, v, slot_mapping, validate=validate)

    def copy_blocks(self, pairs):
        """Copy the contents of block src into block dst, in every layer, for each (src, dst) in `pairs`.
        The copies are simultaneous: every source is read before any destination is written."""
        if not pairs:
            return
        for src, dst in pairs:
            if not (0 <= src < self.num_blocks and 0 <= dst < self.num_blocks):
                raise ValueError(f"pairs holds ({src}, {dst}), outside [0, {self.num_blocks})")
        if len({dst for _, dst in pairs}) != len(pairs):
            raise ValueError(f"pairs writes a destination block twice: {pairs}")
        src = torch.tensor([p[0] for p in pairs], device=self.k.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.k.device)
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


@dataclass(slots=True)
class _Seq:
    blocks: list[int]
    num_tokens: int
    # Only with prefix caching: the token ids, the chain hashes of the first len(hashes) full blocks, and how
    # many leading full blocks have been offered for registration (their K/V is known to be written).
    tokens: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0


class BlockManager:
    """Reference-counted block allocator for paged K/V, with fork, copy-on-write and optional prefix caching.

    Block ids index the first axis of `KVPool.k[layer]`. Token position p of a sequence lives in slot
    `block_table[p // block_size] * block_size + p % block_size`.

    Free blocks come in two kinds: plain free blocks, and (with prefix caching) freed full blocks that still
    hold a hashed prefix and can be revived by a later `allocate` until they are evicted, least recently
    freed first. Both count as free.

    Caller contract: write the K/V of the tokens given to `allocate`/`append` (from the returned cached count
    on) before the next `append` of the same sequence. Prefix caching relies on it: a full block is offered
    for reuse only once its sequence has been appended to past it, when its K/V is known to be in the cache,
    so `allocate` never reports tokens whose K/V has yet to be computed. (Consequently sequences allocated
    in the same step do not hit each other's blocks; fork them from one parent to share a prompt instead.)
    """

    def __init__(self, num_blocks, block_size, *, enable_prefix_caching=False):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._refcount = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()  # refcount-0 blocks with a hash, LRU first
        self._hash_of_block: dict[int, bytes] = {}
        self._block_of_hash: dict[bytes, int] = {}
        self._seqs: dict[object, _Seq] = {}
        self._prefix_queries = 0
        self._prefix_hits = 0
        self._hit_tokens = 0
        self._cow_copies = 0

    # ---- queries ------------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._cached)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._seqs

    def num_tokens(self, seq_id) -> int:
        return self._seq(seq_id).num_tokens

    def block_table(self, seq_id) -> list[int]:
        return list(self._seq(seq_id).blocks)

    def slot_mapping(self, seq_id, start, end) -> list[int]:
        """Slots of token positions [start, end) of the sequence."""
        seq = self._seq(seq_id)
        if not 0 <= start <= end <= seq.num_tokens:
            raise ValueError(f"need 0 <= start <= end <= num_tokens ({seq.num_tokens}), got [{start}, {end})")
        bs, blocks = self.block_size, seq.blocks
        return [blocks[p // bs] * bs + p % bs for p in range(start, end)]

    def stats(self) -> dict:
        used = sum(1 for r in self._refcount if r > 0)
        return {
            "num_blocks": self.num_blocks,
            "used_blocks": used,
            "free_blocks": self.num_free_blocks,
            "cached_free_blocks": len(self._cached),
            "shared_blocks": sum(1 for r in self._refcount if r > 1),
            "num_seqs": len(self._seqs),
            "prefix_queries": self._prefix_queries,
            "prefix_hits": self._prefix_hits,
            "prefix_hit_tokens": self._hit_tokens,
            "cow_copies": self._cow_copies,
        }

    # ---- mutations ----------------------------------------------------------------------------------------

    def allocate(self, seq_id, token_ids) -> int:
        """Reserve blocks for a new sequence holding `token_ids`.

        Returns how many leading tokens already have their K/V in the cache (a prefix-cache hit on whole
        blocks; always 0 without prefix caching). The caller computes and writes only the rest. At least one
        token is always left to compute, so the caller gets logits for the next token.
        Raises ValueError if `seq_id` exists, OutOfBlocks (state unchanged) if the pool is too small.
        """
        if seq_id in self._seqs:
            raise ValueError(f"seq_id {seq_id!r} is already allocated")
        token_ids = list(token_ids)
        num_blocks = self._blocks_for(len(token_ids))
        hashes = self._chain_hashes(b"", token_ids, 0) if self.enable_prefix_caching else []
        hit = []
        for h in hashes[: (len(token_ids) - 1) // self.block_size]:
            block = self._block_of_hash.get(h)
            if block is None:
                break
            hit.append(block)
        revived = sum(1 for b in hit if self._refcount[b] == 0)
        if num_blocks - len(hit) > self.num_free_blocks - revived:
            raise OutOfBlocks(f"allocate({seq_id!r}) needs {num_blocks - len(hit)} new blocks, "
                              f"{self.num_free_blocks - revived} free")
        for b in hit:
            self._incref(b)
        blocks = hit + [self._take_free() for _ in range(num_blocks - len(hit))]
        seq = _Seq(blocks, len(token_ids))
        if self.enable_prefix_caching:
            seq.tokens, seq.hashes, seq.num_registered = token_ids, hashes, len(hit)
            self._prefix_queries += 1
            self._prefix_hits += bool(hit)
            self._hit_tokens += len(hit) * self.block_size
        self._seqs[seq_id] = seq
        return len(hit) * self.block_size

    def append(self, seq_id, token_ids) -> list[tuple[int, int]]:
        """Extend the sequence by `token_ids`; the caller then writes their K/V at
        `slot_mapping(seq_id, old_len, new_len)`.

        Returns the copy-on-write copies (src_block, dst_block) to apply with `KVPool.copy_blocks` BEFORE that
        write: when the sequence's last block is partial and shared, the sequence gets a private copy.
        Raises OutOfBlocks (state unchanged) if the pool is too small.
        """
        seq = self._seq(seq_id)
        token_ids = list(token_ids)
        if not token_ids:
            return []
        bs = self.block_size
        start = seq.num_tokens
        # The block receiving the first new token is already ours iff start is mid-block.
        tail = seq.blocks[start // bs] if start % bs else None
        cow = tail is not None and self._refcount[tail] > 1
        new_blocks = self._blocks_for(start + len(token_ids)) - len(seq.blocks)
        if new_blocks + cow > self.num_free_blocks:
            raise OutOfBlocks(f"append({seq_id!r}) needs {new_blocks + cow} blocks, {self.num_free_blocks} free")
        copies = []
        if cow:
            private = self._take_free()
            self._decref(tail)
            seq.blocks[start // bs] = private
            copies.append((tail, private))
            self._cow_copies += 1
        elif tail is not None and tail in self._hash_of_block:
            # Our sole copy of a block registered under other contents (the tokens past a fork point, left
            # by a parent that has since been freed): it is about to be overwritten, so it no longer matches.
            self._unregister(tail)
        if self.enable_prefix_caching:
            # By the caller contract the K/V of every token before `start` is written: offer the full
            # blocks among them for reuse.
            full = start // bs
            seq.hashes.extend(self._chain_hashes(seq.hashes[-1] if seq.hashes else b"",
                                                 seq.tokens[: full * bs], len(seq.hashes)))
            for i in range(seq.num_registered, full):
                self._register(seq.blocks[i], seq.hashes[i])
            seq.num_registered = full
            seq.tokens.extend(token_ids)
        seq.blocks.extend(self._take_free() for _ in range(new_blocks))
        seq.num_tokens += len(token_ids)
        return copies

    def fork(self, parent_id, child_ids, *, at=None):
        """Start each child as a copy of the parent's first `at` tokens (default: all), sharing its blocks.

        Bookkeeping only, O(shared blocks) per child (plus a copy of the token ids with prefix caching): no
        block is copied and no block is needed, so this never raises OutOfBlocks.
        With `at` mid-block, the children share the block holding position `at`, which may still hold parent
        tokens past `at`; attention never reads past a sequence's length, and the first write into that block
        (by anyone sharing it) copies it first (see `append`).
        """
        parent = self._seq(parent_id)
        at = parent.num_tokens if at is None else at
        if not isinstance(at, int) or not 0 <= at <= parent.num_tokens:
            raise ValueError(f"at must be an int in [0, {parent.num_tokens}], got {at!r}")
        child_ids = list(child_ids)
        for cid in child_ids:
            if cid in self._seqs:
                raise ValueError(f"child id {cid!r} is already allocated")
        if len(set(child_ids)) != len(child_ids):
            raise ValueError(f"child_ids has duplicates: {child_ids!r}")
        shared = parent.blocks[: self._blocks_for(at)]
        for cid in child_ids:
            for b in shared:
                self._incref(b)
            child = _Seq(list(shared), at)
            if self.enable_prefix_caching:
                child.tokens = parent.tokens[:at]
                child.hashes = parent.hashes[: at // self.block_size]
                child.num_registered = min(parent.num_registered, at // self.block_size)
            self._seqs[cid] = child

    def free(self, seq_id):
        """Release the sequence. Blocks nobody else holds return to the pool (hashed full ones stay cached)."""
        seq = self._seq(seq_id)
        # Tail blocks first, so that LRU eviction drops a prefix's end before its start (a block is only
        # reusable while every block before it in its chain is).
        for b in reversed(seq.blocks):
            self._decref(b)
        del self._seqs[seq_id]

    def check_invariants(self):
        """Assert the bookkeeping is consistent (for tests): refcounts equal the references held by live
        sequences, and every block is exactly one of used / free / cached."""
        expected = [0] * self.num_blocks
        for seq in self._seqs.values():
            assert len(seq.blocks) == self._blocks_for(seq.num_tokens), seq
            for b in seq.blocks:
                expected[b] += 1
        assert expected == self._refcount, (expected, self._refcount)
        free, cached = set(self._free), set(self._cached)
        assert len(free) == len(self._free) and not free & cached
        for b in range(self.num_blocks):
            assert (self._refcount[b] > 0) + (b in free) + (b in cached) == 1, b
        for b in free:
            assert b not in self._hash_of_block, b
        for b in cached:
            assert b in self._hash_of_block, b
        assert {self._block_of_hash[h]: h for h in self._block_of_hash} == self._hash_of_block

    # ---- internals ----------------------------------------------------------------------------------------

    def _seq(self, seq_id) -> _Seq:
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise ValueError(f"unknown seq_id {seq_id!r}") from None

    def _blocks_for(self, num_tokens) -> int:
        return -(-num_tokens // self.block_size)

    def _chain_hashes(self, prev, tokens, first_block):
        """Chain hashes of the full blocks of `tokens` from index `first_block` on; `prev` is the hash of the
        block before it. Each hash covers every token up to its block's end, so equal hashes mean equal
        prefixes (a 128-bit digest rather than Python's `hash` so that collisions are not a practical risk)."""
        bs = self.block_size
        out = []
        for i in range(first_block, len(tokens) // bs):
            prev = hashlib.blake2b(prev + array("q", tokens[i * bs:(i + 1) * bs]).tobytes(),
                                   digest_size=16).digest()
            out.append(prev)
        return out

    def _register(self, block, h):
        # The first block registered under a hash keeps it: duplicates computed in parallel stay private.
        if h not in self._block_of_hash and block not in self._hash_of_block:
            self._block_of_hash[h] = block
            self._hash_of_block[block] = h

    def _unregister(self, block):
        del self._block_of_hash[self._hash_of_block.pop(block)]

    def _take_free(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._cached.popitem(last=False)
            self._unregister(block)
        assert self._refcount[block] == 0
        self._refcount[block] = 1
        return block

    def _incref(self, block):
        if self._refcount[block] == 0:
            del self._cached[block]
        self._refcount[block] += 1

    def _decref(self, block):
        self._refcount[block] -= 1
        assert self._refcount[block] >= 0, block
        if self._refcount[block] == 0:
            if block in self._hash_of_block:
                self._cached[block] = None
            else:
                self._free.append(block)
