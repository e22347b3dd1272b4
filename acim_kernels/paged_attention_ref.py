"""Paged attention in pure PyTorch: the executable spec, the CPU path and the test oracle.

Computes causal attention of packed queries against a block-paged K/V cache (vLLM layout). One call serves
prefill (a sequence's queries are its whole prompt), decode (one query per sequence) and appending a chunk
(e.g. tool output) to a sequence whose earlier tokens are already cached: a sequence's queries are always its
LAST `q_len` positions, and their K/V must already be written to the cache.

It also holds the argument checks shared with the Triton path (`check_inputs`).
It does not write K/V (see `acim_fast.engine.kv_cache.write_kv`), manage blocks, or compute gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Gathered K/V per chunk of sequences, in bytes. Gathering a whole large batch at once allocates fresh
# buffers of tens of MiB per call (page faults, cache misses): measured 3-5x slower at batch 64 than chunks.
_CHUNK_BYTES = 4 << 20


def check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, *, values: bool):
    """Raise ValueError naming the bad argument. `values=False` skips the checks that read tensor values
    (on a GPU they cost a device-to-host copy), keeping only shape/dtype/device checks."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"q must be a float tensor [T, Hq, D], got {_describe(q)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(cache, torch.Tensor) or cache.dim() != 4 or not cache.is_floating_point():
            raise ValueError(f"{name} must be a float tensor [num_blocks, block_size, Hkv, D], "
                             f"got {_describe(cache)}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match "
                         f"k_cache {tuple(k_cache.shape)} {k_cache.dtype}")
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"k_cache head_dim {cache_head_dim} != q head_dim {head_dim}")
    if num_blocks == 0 or block_size == 0 or num_kv_heads == 0 or head_dim == 0:
        raise ValueError(f"k_cache has an empty dimension: {tuple(k_cache.shape)}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q heads ({num_q_heads}) must be a multiple of k_cache heads ({num_kv_heads})")
    for name, t, ndim in (("block_tables", block_tables, 2), ("seq_lens", seq_lens, 1),
                          ("query_start_loc", query_start_loc, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != ndim or t.dtype != torch.int32:
            raise ValueError(f"{name} must be a {ndim}-D int32 tensor, got {_describe(t)}")
    num_seqs = seq_lens.shape[0]
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows but seq_lens has {num_seqs} entries")
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(f"query_start_loc must have len(seq_lens) + 1 = {num_seqs + 1} entries, "
                         f"got {query_start_loc.shape[0]}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
                    ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    if not values:
        return
    qsl = query_start_loc.long()
    lens = seq_lens.long()
    if int(qsl[0]) != 0 or int(qsl[-1]) != num_tokens:
        raise ValueError(f"query_start_loc must start at 0 and end at q.shape[0] = {num_tokens}, "
                         f"got {int(qsl[0])} .. {int(qsl[-1])}")
    q_lens = qsl[1:] - qsl[:-1]
    needed = (lens + block_size - 1) // block_size
    for name, bad, what in (
        ("query_start_loc", q_lens < 0, "must be non-decreasing"),
        ("seq_lens", lens < q_lens, "is smaller than the sequence's query count (the new tokens' K/V must "
                                    "already be in the cache)"),
        ("block_tables", needed > block_tables.shape[1], f"has {block_tables.shape[1]} columns, too few for "
                                                         "seq_lens"),
    ):
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} {what}: sequence {b} has seq_len {int(lens[b])}, q_len {int(q_lens[b])}")
    used = _used_block_mask(block_tables, seq_lens, block_size)
    ids = block_tables[used]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_blocks):
        raise ValueError(f"block_tables holds block ids outside [0, {num_blocks}) in used entries: "
                         f"min {int(ids.min())}, max {int(ids.max())}")


def paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *, scale,
                        validate=True):
    """Causal attention of packed queries against a paged K/V cache, in fp32.

    Arguments and result as `paged_attention.paged_attention` documents them (without `impl`).

    Query j of sequence b sits at position seq_lens[b] - q_len_b + j and attends to positions <= it.
    Sequences are handled in chunks of several at once: their tokens are gathered through the block table
    into a [chunk, Hkv, L, D] tensor (L = the chunk's longest sequence rounded up to blocks), queries padded
    to the longest q_len, and SDPA runs in fp32 with the causal mask aligned to each sequence's end.
    """
    check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, values=validate)
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    device = q.device
    if num_tokens == 0:
        return q.new_empty(q.shape)

    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]
    max_q = int(q_lens.max())
    first_q_pos = seq_lens.long() - q_lens  # position of each sequence's first query

    # Scatter packed queries into [B, max_q, Hq, D]; padded slots stay zero and are dropped at the end.
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens,
                                           output_size=num_tokens)
    idx_in_seq = torch.arange(num_tokens, device=device) - qsl[seq_of_token]
    q_pad = q.new_zeros(num_seqs, max_q, num_q_heads, head_dim, dtype=torch.float32)
    q_pad[seq_of_token, idx_in_seq] = q.float()
    # A kv head's GQA group becomes extra query rows, ordered (group member, query): K/V are never repeated.
    q_pad = q_pad.view(num_seqs, max_q, num_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q_pad = q_pad.reshape(num_seqs, num_kv_heads, group * max_q, head_dim)

    out = torch.empty_like(q_pad)
    lens = seq_lens.tolist()
    for start, end in _chunks(lens, max(1, _CHUNK_BYTES // (8 * num_kv_heads * head_dim))):
        num_blocks = -(-max(lens[start:end]) // block_size)
        kv_len = num_blocks * block_size
        # Unused table entries may hold anything (e.g. -1): read block 0 instead so the gather stays in
        # bounds; the causal mask hides whatever it holds.
        tables = block_tables[start:end, :num_blocks]
        tables = torch.where(_used_block_mask(tables, seq_lens[start:end], block_size), tables.long(), 0)
        tables = tables.view(-1)
        # index_select copies whole blocks (fast for a contiguous cache, correct for any strides).
        k = k_cache.index_select(0, tables).view(end - start, kv_len, num_kv_heads, head_dim).transpose(1, 2)
        v = v_cache.index_select(0, tables).view(end - start, kv_len, num_kv_heads, head_dim).transpose(1, 2)
        q_pos = first_q_pos[start:end, None] + torch.arange(max_q, device=device)  # [chunk, max_q]
        # Causality alone keeps real rows below seq_len. Padded query rows see keys past it (never none,
        # since key 0 is always visible); they are dropped at the end.
        allowed = torch.arange(kv_len, device=device) <= q_pos[:, :, None]  # [chunk, max_q, L]
        allowed = allowed[:, None].expand(-1, group, -1, -1).reshape(end - start, 1, group * max_q, kv_len)
        out[start:end] = F.scaled_dot_product_attention(q_pad[start:end], k.float(), v.float(),
                                                        attn_mask=allowed, scale=scale)

    out = out.view(num_seqs, num_kv_heads, group, max_q, head_dim).permute(0, 3, 1, 2, 4)
    out = out.reshape(num_seqs, max_q, num_q_heads, head_dim)
    return out[seq_of_token, idx_in_seq].to(q.dtype)


def _chunks(lens, max_tokens):
    """Split sequences [0, B) into consecutive runs whose padded size (count x longest) stays within
    max_tokens, always at least one sequence per run."""
    start = 0
    while start < len(lens):
        end, longest = start + 1, lens[start]
        while end < len(lens) and (end + 1 - start) * max(longest, lens[end]) <= max_tokens:
            longest = max(longest, lens[end])
            end += 1
        yield start, end
        start = end


def _used_block_mask(block_tables, seq_lens, block_size):
    """[B, max_blocks] bool: which table entries cover a cached token."""
    num_used = (seq_lens.long() + block_size - 1) // block_size
    cols = torch.arange(block_tables.shape[1], device=block_tables.device)
    return cols[None, :] < num_used[:, None]


def _describe(x):
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
