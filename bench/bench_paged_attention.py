"""Decode attention over a paged cache vs dense SDPA over a padded contiguous cache (the baseline).

Batch 1/16/64, contexts 384..512 tokens, 4 heads of dim 64, block size 16, fp32 on CPU (bf16 on CUDA).
extra_info carries tokens/s and the ratio to the dense baseline measured on the same inputs.
CPU runs use one thread: on our shared 2-core machines two threads spend most of their time waiting for
each other (medians were 10-100x worse and erratic); these sizes are memory-bound anyway.
Run: pytest bench/bench_paged_attention.py --benchmark-only
The Triton case needs CUDA (the interpreter is not a speed path) and is skipped without it.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
import torch.utils.benchmark as tbench

from acim_kernels.paged_attention import paged_attention

HEADS, HEAD_DIM, BLOCK_SIZE = 4, 64, 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    threads = torch.get_num_threads()
    if DEVICE == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _case(batch):
    g = torch.Generator().manual_seed(batch)
    lens = torch.randint(384, 513, (batch,), generator=g)
    max_len = int(lens.max())
    blocks_per_seq = -(-max_len // BLOCK_SIZE)
    k_dense = torch.randn(batch, HEADS, max_len, HEAD_DIM, generator=g)
    v_dense = torch.randn(batch, HEADS, max_len, HEAD_DIM, generator=g)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=g)
    # The paged copy of the same K/V, blocks scattered in a shuffled pool.
    num_blocks = batch * blocks_per_seq
    perm = torch.randperm(num_blocks, generator=g).view(batch, blocks_per_seq)
    k_cache = torch.zeros(num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM)
    v_cache = torch.zeros(num_blocks, BLOCK_SIZE, HEADS, HEAD_DIM)
    pad = blocks_per_seq * BLOCK_SIZE - max_len
    k_cache[perm] = F.pad(k_dense, (0, 0, 0, pad)).view(batch, HEADS, blocks_per_seq, BLOCK_SIZE, HEAD_DIM) \
        .permute(0, 2, 3, 1, 4)
    v_cache[perm] = F.pad(v_dense, (0, 0, 0, pad)).view(batch, HEADS, blocks_per_seq, BLOCK_SIZE, HEAD_DIM) \
        .permute(0, 2, 3, 1, 4)
    mask = (torch.arange(max_len)[None, :] < lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
    to = lambda t: t.to(DEVICE, DTYPE) if t.is_floating_point() else t.to(DEVICE)  # noqa: E731
    paged = (to(q), to(k_cache), to(v_cache), perm.to(DEVICE, torch.int32), lens.to(DEVICE, torch.int32),
             torch.arange(batch + 1, dtype=torch.int32, device=DEVICE))
    dense = (to(q[:, :, None]), to(k_dense), to(v_dense), mask.to(DEVICE))
    return paged, dense


def _dense_sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=HEAD_DIM ** -0.5)


def _sync(fn):
    if DEVICE == "cuda":
        return lambda: (fn(), torch.cuda.synchronize())
    return fn


_DENSE_MEDIAN = {}  # batch -> seconds, from the dense_sdpa benchmark of this run (it runs first)


def _dense_seconds(batch):
    if batch not in _DENSE_MEDIAN:  # the dense case was deselected: time it here
        _, dense = _case(batch)
        timer = tbench.Timer("fn()", globals={"fn": _sync(lambda: _dense_sdpa(*dense))})
        _DENSE_MEDIAN[batch] = timer.blocked_autorange(min_run_time=0.5).median
    return _DENSE_MEDIAN[batch]


@pytest.mark.parametrize("batch", [1, 16, 64])
@pytest.mark.parametrize("impl", ["dense_sdpa", "ref", "triton"])
def test_decode_attention(benchmark, impl, batch):
    if impl == "triton" and DEVICE != "cuda":
        pytest.skip("Triton timing needs CUDA")
    paged, dense = _case(batch)
    if impl == "dense_sdpa":
        fn = lambda: _dense_sdpa(*dense)  # noqa: E731
    else:
        # Metadata is validated once per step in a real loop, not per layer: time the attention alone.
        fn = lambda: paged_attention(*paged, scale=HEAD_DIM ** -0.5, impl=impl, validate=False)  # noqa: E731
        out = paged_attention(*paged, scale=HEAD_DIM ** -0.5, impl=impl)
        torch.testing.assert_close(out.float(), _dense_sdpa(*dense)[:, :, 0].float(), rtol=2e-2, atol=2e-2)
    benchmark.group = f"decode batch={batch}"
    benchmark(_sync(fn))
    seconds = benchmark.stats.stats.median
    if impl == "dense_sdpa":
        _DENSE_MEDIAN[batch] = seconds
    benchmark.extra_info.update({
        "device": DEVICE, "dtype": str(DTYPE), "batch": batch, "tokens_per_s": batch / seconds,
        "dense_sdpa_tokens_per_s": batch / _dense_seconds(batch),
        "time_vs_dense_sdpa": seconds / _dense_seconds(batch),
    })
