"""Paged attention: the reference against dense SDPA, the Triton kernel (interpreter on CPU) against the reference.

Batches mix prefill, decode, appended chunks and an idle sequence; block tables are shuffled and padded with
-1 past the used blocks; block sizes and lengths are odd.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import acim_kernels.paged_attention_ref as ref_module
from acim_kernels.paged_attention import _paged_attention_triton, _tiles, paged_attention
from acim_kernels.paged_attention_ref import paged_attention_ref

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
# Triton runs on CUDA when present, else in the interpreter on CPU tensors (see conftest.py).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on(args, device):
    return tuple(a.to(device) for a in args)

# (seq_len, q_len): prefill, decode, appended chunk, a sequence with no queries this step, a longer decode.
MIXED = [(13, 13), (8, 1), (11, 4), (6, 0), (37, 1)]


def _make_case(specs, num_q_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32, seed=0):
    """Random per-sequence dense K/V scattered into a shuffled paged cache, plus the packed queries."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-s // block_size) for s, _ in specs]
    num_blocks = sum(needed) + 3  # a few blocks nobody uses
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    block_tables = torch.full((len(specs), max(needed) + 1), -1, dtype=torch.int32)
    dense = []
    for b, ((seq_len, _), n) in enumerate(zip(specs, needed)):
        ids, perm = perm[:n], perm[n:]
        block_tables[b, :n] = torch.tensor(ids, dtype=torch.int32)
        flat = lambda c: c[ids].reshape(-1, num_kv_heads, head_dim)[:seq_len]  # noqa: E731
        dense.append((flat(k_cache), flat(v_cache)))
    q_lens = [q for _, q in specs]
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=g)
    seq_lens = torch.tensor([s for s, _ in specs], dtype=torch.int32)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    args = (q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), block_tables, seq_lens, qsl)
    return args, dense


def _dense_gold(q, dense, specs, scale):
    """fp32 SDPA per sequence over its contiguous K/V; queries are the last q_len positions."""
    outs, start = [], 0
    for (seq_len, q_len), (k, v) in zip(specs, dense):
        qs = q[start:start + q_len].float().transpose(0, 1)  # [Hq, q_len, D]
        start += q_len
        group = qs.shape[0] // k.shape[1]
        ks = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
        vs = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        q_pos = torch.arange(seq_len - q_len, seq_len)
        mask = torch.arange(seq_len)[None, :] <= q_pos[:, None]
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 2), (4, 4), (6, 2)])
@pytest.mark.parametrize("block_size", [5, 16])
def test_reference_matches_dense_sdpa(num_q_heads, num_kv_heads, block_size):
    args, dense = _make_case(MIXED, num_q_heads, num_kv_heads, 24, block_size)
    out = paged_attention_ref(*args, scale=0.3)
    assert out.shape == args[0].shape and out.dtype == torch.float32
    torch.testing.assert_close(out, _dense_gold(args[0], dense, MIXED, 0.3), rtol=1e-5, atol=1e-5)


def test_reference_in_chunks_of_sequences_matches_dense_sdpa(monkeypatch):
    # Room for 26 padded tokens per chunk (8 bytes of fp32 K+V per head-dim element, Hkv=2, D=16): runs of
    # one or two sequences, each run gathered to its own longest length.
    monkeypatch.setattr(ref_module, "_CHUNK_BYTES", 26 * 8 * 2 * 16)
    assert list(ref_module._chunks([s for s, _ in MIXED], 26)) == [(0, 2), (2, 4), (4, 5)]
    assert list(ref_module._chunks([6, 9, 10, 2, 2, 25], 20)) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    args, dense = _make_case(MIXED, 4, 2, 16, 5)
    torch.testing.assert_close(paged_attention_ref(*args, scale=0.3), _dense_gold(args[0], dense, MIXED, 0.3),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["ref", pytest.param("triton", marks=requires_triton)])
def test_strided_cache(impl):
    """A cache that is a view (here every other head of a wider tensor) is read through its strides."""
    args, dense = _make_case(MIXED, 4, 2, 16, 5)
    q, kc, vc, *meta = _on(args, TRITON_DEVICE if impl == "triton" else "cpu")
    wide = lambda c: torch.stack([c, torch.full_like(c, 1e4)], 3).flatten(2, 3)[:, :, ::2]  # noqa: E731
    assert not wide(kc).is_contiguous() and torch.equal(wide(kc), kc)
    out = paged_attention(q, wide(kc), wide(vc), *meta, scale=0.3, impl=impl)
    torch.testing.assert_close(out.cpu(), _dense_gold(args[0], dense, MIXED, 0.3), rtol=1e-5, atol=1e-5)


def test_reference_bf16_close_to_fp32_gold():
    args, _ = _make_case(MIXED, 4, 2, 16, 5)
    gold = paged_attention_ref(*args, scale=0.25)
    bf16 = paged_attention_ref(args[0].bfloat16(), args[1].bfloat16(), args[2].bfloat16(), *args[3:], scale=0.25)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), gold, rtol=0, atol=3e-2)


def test_reference_ignores_table_entries_past_used_blocks_without_validation():
    args, dense = _make_case(MIXED, 4, 2, 16, 5)
    q, kc, vc, tables, seq_lens, qsl = args
    tables = tables.clone()
    tables[tables == -1] = 10**6  # garbage the unvalidated path must not dereference
    out = paged_attention_ref(q, kc, vc, tables, seq_lens, qsl, scale=0.25, validate=False)
    torch.testing.assert_close(out, _dense_gold(q, dense, MIXED, 0.25), rtol=1e-5, atol=1e-5)


# ---- Triton kernel (interpreter on CPU: keep shapes small) ----------------------------------------------------

@requires_triton
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,block_size", [
    (4, 2, 24, 5),   # GQA, head_dim padded to 32, odd block size
    (4, 4, 16, 16),  # MHA
    (6, 2, 16, 7),   # group of 3: the 16-row tile holds 5 queries and one padding row
])
def test_triton_matches_reference_fp32(num_q_heads, num_kv_heads, head_dim, block_size):
    args, _ = _make_case(MIXED, num_q_heads, num_kv_heads, head_dim, block_size, seed=1)
    ref = paged_attention_ref(*args, scale=0.3)
    # block_n=16 walks the 37-token sequence in three K/V tiles; block_m=16 splits the 13-token prefill.
    out = _paged_attention_triton(*_on(args, TRITON_DEVICE), 0.3, block_m=16, block_n=16)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)


# Every tile choice of `_tiles` (block_m, block_n, num_warps), through the public API so that the dispatcher picks
# it: fp32 caches' three K/V tile widths, 16-bit caches' one, decode and prefill rows. Decode: 70 keys cross several
# K/V tiles of every width. Prefill (group 2, 32 queries per 64-row block): a 70-token prompt spans three query
# blocks, a chunk of 7 is appended to 33 cached tokens, and one sequence decodes in the same batch.
DECODE = [(45, 1), (70, 1), (3, 1)]
PREFILL = [(70, 70), (40, 7), (9, 1)]


@requires_triton
@pytest.mark.parametrize("dtype,head_dim,phase,tiles", [
    (torch.float32, 24, "decode", (16, 64, 4)),    # head_dim padded to 32: 64-key tiles
    (torch.float32, 24, "prefill", (64, 64, 8)),
    (torch.float32, 128, "decode", (16, 32, 4)),
    (torch.float32, 64, "prefill", (64, 16, 8)),
    (torch.float32, 128, "prefill", (64, 16, 8)),
    (torch.bfloat16, 64, "decode", (16, 64, 4)),
    (torch.bfloat16, 128, "prefill", (64, 64, 8)),
])
def test_triton_tiles_the_dispatcher_picks_match_reference(dtype, head_dim, phase, tiles):
    import triton

    specs = DECODE if phase == "decode" else PREFILL
    block_d = max(16, triton.next_power_of_2(head_dim))
    assert _tiles(dtype, block_d, 2, decode=phase == "decode") == tiles
    args, _ = _make_case(specs, 4, 2, head_dim, 16, dtype=dtype, seed=4)
    scale = head_dim ** -0.5
    out = paged_attention(*_on(args, TRITON_DEVICE), scale=scale, impl="triton")
    assert out.dtype == dtype
    # The reference computes in fp32 from the same (possibly bf16) inputs: the two differ by output rounding only.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.cpu().float(), paged_attention_ref(*args, scale=scale).float(), rtol=tol, atol=tol)


@requires_triton
def test_triton_public_api_decode_batch_and_strided_q():
    specs = [(9, 1), (30, 1), (1, 1)]
    args, dense = _make_case(specs, 4, 2, 16, 4, seed=2)
    q, *rest = _on(args, TRITON_DEVICE)
    qkv = torch.cat([q, torch.randn_like(q)], dim=1)  # q as a non-contiguous view, as a fused QKV would give
    out = paged_attention(qkv[:, :4], *rest, scale=0.25, impl="triton")
    torch.testing.assert_close(out.cpu(), _dense_gold(args[0], dense, specs, 0.25), rtol=1e-5, atol=1e-5)
    # auto: Triton on CUDA, the reference on CPU
    torch.testing.assert_close(paged_attention(q, *rest, scale=0.25), out, rtol=1e-5, atol=1e-5)


@requires_triton
def test_triton_bf16_close_to_fp32_gold():
    args, _ = _make_case(MIXED, 4, 2, 16, 5, seed=3)
    gold = paged_attention_ref(*args, scale=0.25)
    bf16_args = [a.bfloat16() if a.is_floating_point() else a for a in _on(args, TRITON_DEVICE)]
    out = paged_attention(*bf16_args, scale=0.25, impl="triton")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float().cpu(), gold, rtol=0, atol=3e-2)


def _bad_inputs(args):
    q, kc, vc, bt, sl, qsl = args
    i32 = lambda *x: torch.tensor(x, dtype=torch.int32, device=q.device)  # noqa: E731
    return [
        ("q", (q[0], kc, vc, bt, sl, qsl)),
        ("q", (q.int(), kc, vc, bt, sl, qsl)),
        ("k_cache", (q, kc[0], vc, bt, sl, qsl)),
        ("v_cache", (q, kc, vc[:, :, :1], bt, sl, qsl)),
        ("v_cache", (q, kc, vc.double(), bt, sl, qsl)),
        ("head_dim", (q[..., :4], kc, vc, bt, sl, qsl)),
        ("multiple", (q[:, :3], kc, vc, bt, sl, qsl)),
        ("block_tables", (q, kc, vc, bt.long(), sl, qsl)),
        ("block_tables", (q, kc, vc, bt[:1], sl, qsl)),
        ("seq_lens", (q, kc, vc, bt, sl.float(), qsl)),
        ("query_start_loc", (q, kc, vc, bt, sl, qsl[:-1])),
        ("query_start_loc", (q, kc, vc, bt, sl, i32(0, 3, 5))),      # does not end at T = 4
        ("query_start_loc", (q, kc, vc, bt, sl, i32(0, 5, 4))),      # decreasing
        ("seq_lens", (q, kc, vc, bt, i32(2, 5), qsl)),                # 3 queries, only 2 cached tokens
        ("block_tables", (q, kc, vc, bt[:, :1], sl, qsl)),            # 6 tokens need 2 blocks
        ("block_tables", (q, kc, vc, torch.where(bt == -1, bt, 99).to(torch.int32), sl, qsl)),  # id out of range
        ("seq_lens", (q, kc, vc, bt, sl.to("meta"), qsl)),            # another device
    ]


@pytest.mark.parametrize("impl", ["ref", pytest.param("triton", marks=requires_triton)])
def test_bad_input_raises_value_error_naming_the_argument(impl):
    good, _ = _make_case([(6, 3), (5, 1)], 4, 2, 8, 4)
    good = _on(good, TRITON_DEVICE if impl == "triton" else "cpu")
    assert paged_attention(*good, scale=0.5, impl=impl).shape == (4, 4, 8)
    for name, args in _bad_inputs(good):
        with pytest.raises(ValueError, match=name):
            paged_attention(*args, scale=0.5, impl=impl)
    for scale in (0.0, -1.0, None):
        with pytest.raises(ValueError, match="scale"):
            paged_attention(*good, scale=scale, impl=impl)
    with pytest.raises(ValueError, match="impl"):
        paged_attention(*good, scale=0.5, impl="cuda")
