"""Paged attention: a Triton kernel over block tables, and the public `paged_attention` dispatcher.

Causal attention of packed queries (prefill, decode and appended chunks mixed in one batch) against a
block-paged K/V cache. The kernel uses online softmax with fp32 accumulation and serves a whole GQA group
per program, so each K/V tile is loaded once for all query heads that share it. It works for any block size
(tokens are gathered one by one through the block table) and any head_dim (padded to a power of two).

Semantics, argument checks and the CPU path live in `paged_attention_ref.py`. This module does not write
K/V, manage blocks, or compute gradients (it serves sampling, not training). It does not split long contexts
across programs (flash-decoding); one program walks a sequence's whole context.
"""

from __future__ import annotations

import math
import os

import torch

from acim_kernels.paged_attention_ref import check_inputs, paged_attention_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference serves; impl="triton" raises a ValueError.
    triton = None

if triton is not None:

    @triton.jit
    def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
        """Sequence owning global query block `q_block`. Sequence b's blocks start at qsl[b] // BLOCK_Q + b,
        an upper bound that needs no host-side prefix sum; the largest b whose start is <= q_block wins."""
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
            if start <= q_block:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @triton.jit
    def _paged_attention_kernel(
        out_ptr, q_ptr, k_ptr, v_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
        scale_log2e, num_seqs, block_size,
        stride_qt, stride_qh, stride_qd,
        stride_ot, stride_oh, stride_od,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_bt,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        # One program: BLOCK_Q consecutive queries of one sequence x the GROUP query heads of one kv head,
        # laid out as BLOCK_M rows (row r = query r // GROUP, head r % GROUP; rows past BLOCK_Q*GROUP pad).
        q_block = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        q_block_in_seq = q_block - (q_start // BLOCK_Q + seq)
        if q_block_in_seq * BLOCK_Q >= q_len:
            return  # the grid over-provisions query blocks (see _find_seq); this one has no queries
        seq_len = tl.load(seq_lens_ptr + seq)
        context_len = seq_len - q_len

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q_idx = q_block_in_seq * BLOCK_Q + offs_m // GROUP
        head = kv_head * GROUP + offs_m % GROUP
        row_ok = (offs_m // GROUP < BLOCK_Q) & (q_idx < q_len)
        d_ok = offs_d < HEAD_DIM
        token = (q_start + q_idx).to(tl.int64)
        q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        q_pos = context_len + q_idx
        # Keys past the last query of this block are causally invisible to all of its rows.
        kv_end = context_len + tl.minimum((q_block_in_seq + 1) * BLOCK_Q, q_len)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
        for start in range(0, kv_end, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < kv_end
            blk = tl.load(bt_row + offs_n // block_size, mask=n_ok, other=0).to(tl.int64)
            in_blk = offs_n % block_size
            k_off = blk * stride_kb + in_blk * stride_ks + kv_head * stride_kh
            v_off = blk * stride_vb + in_blk * stride_vs + kv_head * stride_vh
            k = tl.load(k_ptr + k_off[None, :] + offs_d[:, None] * stride_kd,
                        mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
            s = tl.dot(q.to(DOT_DTYPE), k.to(DOT_DTYPE), input_precision=DOT_PRECISION) * scale_log2e
            visible = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
            s = tl.where(visible, s, float("-inf"))
            # Every real row sees key 0 in the first tile, so m_new is finite for it. Padding rows see nothing
            # and turn NaN (-inf - -inf); rows are independent in both dots and padding is never stored.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + v_off[:, None] + offs_d[None, :] * stride_vd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16} \
    if triton is not None else {}


def _tiles(cache_dtype: torch.dtype, block_d: int, group: int, decode: bool) -> tuple[int, int, int]:
    """(block_m, block_n, num_warps) for a launch: rows (queries x heads) per program, keys per K/V tile, warps.

    tl.dot needs >= 16 rows; decode-only batches gain nothing from taller tiles, prefill does (each K/V tile is
    loaded once for all its rows), and tall tiles get 8 warps. fp32 caches take fp32 dots, which run on the FMA
    units with operands and products in registers: with 64-key tiles and 4 warps they spilled up to 32 KB per
    thread at head_dim 128, so their K/V tiles narrow with the head. The widths are the widest that
    `compile_check` found spill-free on sm_80 and sm_90 for every driven head_dim and GQA group (ptxas is not
    monotonic in them: 32 keys spill 16 B at head_dim 64, group 6, sm_90). Keyed on the cache dtype, not the dot
    dtype, so that the interpreter (fp32 dots throughout) takes the tiles a GPU takes.
    """
    block_m = max(16 if decode else 64, triton.next_power_of_2(group))
    num_warps = 8 if block_m >= 64 else 4
    if cache_dtype != torch.float32:
        return block_m, 64, num_warps
    return block_m, 64 if block_d <= 32 else 32 if decode else 16, num_warps


def _paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, *,
                            block_m=None, block_n=None):
    """Launch the kernel. Inputs are already checked; block_m/block_n override `_tiles` (for tests)."""
    assert triton is not None
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    tile_m, tile_n, num_warps = _tiles(k_cache.dtype, block_d, group, decode=num_tokens <= num_seqs)
    block_m, block_n = block_m or tile_m, block_n or tile_n
    block_q = block_m // group
    assert block_q >= 1 and block_n >= 16, (block_m, block_n, group)
    # Upper bound on query blocks without reading query_start_loc on the host (see _find_seq).
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    # Dots take the cache dtype (tensor cores for 16-bit caches). The Triton interpreter multiplies bf16
    # operands as their raw uint16 bits (triton 3.7.1), so there every dot runs in fp32 instead.
    dot_dtype = tl.float32 if os.environ.get("TRITON_INTERPRET") == "1" else _TL_DTYPES[k_cache.dtype]
    # fp32 operands get exact fp32 products rather than TF32; the setting is moot for 16-bit operands.
    precision = "ieee" if dot_dtype == tl.float32 else "tf32"
    _paged_attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale * math.log2(math.e), num_seqs, block_size,
        *q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, DOT_DTYPE=dot_dtype, DOT_PRECISION=precision,
        num_warps=num_warps,
    )
    return out


def _paged_attention_flash(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    """flash-attn's varlen kernel reading the paged cache through its block table (GPU, fp16/bf16 only)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise ValueError("impl='flash' needs the flash-attn package (GPU only)") from e
    if not q.is_cuda or k_cache.dtype not in (torch.float16, torch.bfloat16) or q.dtype != k_cache.dtype:
        raise ValueError("impl='flash' needs CUDA tensors with q and k_cache both fp16 or both bf16")
    if k_cache.shape[1] % 256 != 0:
        raise ValueError(f"impl='flash' needs a block size that is a multiple of 256, got {k_cache.shape[1]}")
    if q.shape[0] == 0:
        return torch.empty_like(q)
    cu_seqlens_k = torch.nn.functional.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    # flash-attn aligns the causal mask bottom-right when seqlen_q < seqlen_k: our "queries are the last
    # q_len positions" semantics.
    return flash_attn_varlen_func(
        q, k_cache, v_cache, cu_seqlens_q=query_start_loc, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=int(q_lens.max()), max_seqlen_k=int(seq_lens.max()),
        softmax_scale=scale, causal=True, block_table=block_tables,
    )


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, *, scale, impl="auto",
                    validate=True):
    """Causal attention of packed queries against a paged K/V cache.

    q               [T, Hq, D]   queries of all sequences packed; any float dtype (out has q's dtype)
    k_cache/v_cache [num_blocks, block_size, Hkv, D]; Hq % Hkv == 0 (query head h reads kv head h // (Hq//Hkv))
    block_tables    [B, max_blocks] int32  physical block ids; entries past a sequence's used blocks are ignored
    seq_lens        [B] int32  tokens in the cache per sequence, including this step's (already written) tokens
    query_start_loc [B+1] int32  sequence b's queries are q[qsl[b]:qsl[b+1]], its last q_len_b positions
    scale           softmax scale (usually D ** -0.5)
    impl            "auto" (Triton on CUDA, the reference elsewhere), "triton", "ref" or "flash" (flash-attn,
                    CUDA + fp16/bf16 + block_size % 256 == 0; never picked by "auto" until benchmarked here)
    validate        check argument values too; on a GPU that costs a device-to-host copy, so hot loops may pass
                    False once the step's metadata is known good (shape/dtype/device checks always run)
    returns         [T, Hq, D] in q's dtype

    Query j of sequence b sits at position seq_lens[b] - q_len_b + j and attends to positions <= it.
    """
    if impl not in ("auto", "triton", "ref", "flash"):
        raise ValueError(f"impl must be 'auto', 'triton', 'ref' or 'flash', got {impl!r}")
    check_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, values=validate)
    if impl == "auto":
        impl = "triton" if q.is_cuda and triton is not None and k_cache.dtype in _TL_DTYPES else "ref"
    if impl == "ref":
        return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale=scale,
                                   validate=False)
    if impl == "flash":
        return _paged_attention_flash(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    if triton is None:
        raise ValueError("impl='triton' needs the triton package")
    if k_cache.dtype not in _TL_DTYPES:
        raise ValueError(f"impl='triton' supports fp32/bf16/fp16 caches, got k_cache {k_cache.dtype}")
    return _paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
