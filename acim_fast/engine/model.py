"""A Llama / Qwen2 decoder as a plain `nn.Module`, loaded from and saved to Hugging Face checkpoint directories.

`ModelConfig.from_hf_dict` reads config.json (transformers 4.x or 5.x RoPE fields; RoPE "default", "linear",
"llama3"; GQA; biases; tied embeddings). `CausalLM.from_pretrained` reads (sharded) safetensors without
transformers; `prepare=` runs on the meta-device model first (FSDP2 sharding, so each rank loads only its shards);
`save_pretrained` writes every file atomically. Two paths over packed tokens `[N, ...]`: `forward_hidden` (dense
through `varlen_attention`, one FlashAttention varlen call per layer on CUDA in half precision; differentiable,
optional activation checkpointing) for training, `forward_paged` over a paged KV pool (via
`acim_kernels.paged_attention`) for sampling. On CPU a decode-only batch whose sequences share leading
blocks (forks) goes through `decode_attention_shared_prefix`, which reads each shared prefix once per step. The
final hidden states and `lm_head_weight` are exposed so a fused loss never materialises the logits.

It does not do sliding windows, other RoPE types, tensor parallelism, init schemes, tokenisation or sampling.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from acim_fast.common.atomic import atomic_write
from acim_kernels.paged_attention import paged_attention

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Old Llama checkpoints carry the RoPE table as a tensor; it is recomputed from the config, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The architecture, parsed from a Hugging Face config dict; `hf` keeps that dict so it can be saved back."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    rope_params: dict[str, Any]
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    hf: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        model_type = d.get("model_type")
        if model_type not in ("llama", "qwen2"):
            raise ValueError(f"config model_type must be 'llama' or 'qwen2', got {model_type!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config hidden_act must be 'silu', got {d['hidden_act']!r}")
        if model_type == "qwen2" and d.get("use_sliding_window", False):
            raise ValueError("config use_sliding_window=true is not supported")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(d.get(key), int) or d[key] <= 0:
                raise ValueError(f"config {key} must be a positive int, got {d.get(key)!r}")
        num_heads = d["num_attention_heads"]
        num_kv_heads = d.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"config num_attention_heads={num_heads} is not a multiple of "
                             f"num_key_value_heads={num_kv_heads}")
        # transformers 5 writes `rope_parameters` (theta inside); 4.x writes `rope_theta` + `rope_scaling`.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"config rope type {rope_type!r} is not supported (default, linear, llama3)")
        if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("config partial_rotary_factor != 1 is not supported")
        if rope_type == "llama3":
            rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
            missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                                   "original_max_position_embeddings") if rope.get(k) is None]
            if missing:
                raise ValueError(f"config llama3 rope parameters lack {missing}")
        if rope_type == "linear" and rope.get("factor") is None:
            raise ValueError("config linear rope parameters lack 'factor'")
        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_params=rope,
            # Qwen2 always has q/k/v biases and no o bias; Llama's `attention_bias` covers q, k, v and o.
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            hf=dict(d),
        )

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim/2] in fp32 on the CPU (also under a meta-device context), computed
        exactly as transformers does."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
        p = self.rope_params
        if self.rope_type == "linear":
            inv = inv / p["factor"]
        elif self.rope_type == "llama3":
            factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
            old_ctx = p["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < old_ctx / hi) * ~(wavelen > old_ctx / lo)
            inv = torch.where(medium, smoothed, scaled)
        return inv


@dataclass
class SharedPrefix:
    """Plan for a decode-only paged batch (one query per sequence, at its last position) whose sequences share
    leading KV blocks, as forks of one prompt do (see `plan_shared_prefix`).

    groups: (rows [g] int64, block ids [n] int64) per group of sequences sharing their first n (full) blocks.
    suffix_tables [B, S] int64: each sequence's blocks after its group's prefix (all of them when in no group),
    padded with block 0; suffix_start [B] int64: the first position the suffix covers (prefix tokens).
    """

    groups: list[tuple[torch.Tensor, torch.Tensor]]
    suffix_tables: torch.Tensor
    suffix_start: torch.Tensor
    saved_tokens: int = 0  # K/V token reads the plan saves against reading every sequence whole


def plan_shared_prefix(tables: list[list[int]], seq_lens: list[int], block_size: int,
                       device: torch.device | str = "cpu") -> SharedPrefix:
    """Group decode sequences by shared leading blocks. A group's prefix stops before the block holding any
    member's newest token (so it holds only full blocks nobody writes to)."""
    by_first: dict[int, list[int]] = {}
    for row, t in enumerate(tables):
        by_first.setdefault(t[0], []).append(row)
    prefix = [0] * len(tables)
    groups = []
    saved = 0
    for rows in by_first.values():
        if len(rows) < 2:
            continue
        limit = (min(seq_lens[r] for r in rows) - 1) // block_size
        n = 0
        for col in zip(*(tables[r][:limit] for r in rows)):
            if col.count(col[0]) != len(col):
                break
            n += 1
        if n:
            groups.append((torch.tensor(rows, device=device), torch.tensor(tables[rows[0]][:n], device=device)))
            for r in rows:
                prefix[r] = n
            saved += (len(rows) - 1) * n * block_size
    width = max(len(t) - p for t, p in zip(tables, prefix))
    suffix = [t[p:] + [0] * (width - len(t) + p) for t, p in zip(tables, prefix)]
    return SharedPrefix(groups=groups, suffix_tables=torch.tensor(suffix, device=device),
                        suffix_start=torch.tensor([p * block_size for p in prefix], device=device),
                        saved_tokens=saved)


def decode_attention_shared_prefix(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   seq_lens: torch.Tensor, plan: SharedPrefix, *, scale: float) -> torch.Tensor:
    """Decode attention (query b at position seq_lens[b]-1) reading each group's shared prefix once.

    Same result as `acim_kernels.paged_attention` on such a batch, in fp32: partial softmaxes over the suffix
    (gathered per sequence) and over each group's prefix (one matmul for all the group's queries) are merged by
    their log-sum-exp. Forks of one long prompt thus cost the prompt's K/V reads once per step, not once per fork.
    q [B, Hq, D]; caches [num_blocks, block_size, Hkv, D]; returns [B, Hq, D] in q's dtype.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    qf = q.float().view(num_seqs, num_kv_heads, group, head_dim)
    width = plan.suffix_tables.shape[1] * block_size
    # [B, Hkv, L, D]: each sequence's own blocks, gathered.
    k = k_cache[plan.suffix_tables].view(num_seqs, width, num_kv_heads, head_dim).transpose(1, 2).float()
    v = v_cache[plan.suffix_tables].view(num_seqs, width, num_kv_heads, head_dim).transpose(1, 2).float()
    scores = torch.matmul(qf, k.transpose(2, 3)) * scale  # [B, Hkv, G, L]
    pos = plan.suffix_start[:, None] + torch.arange(width, device=q.device)
    scores.masked_fill_((pos >= seq_lens[:, None].long())[:, None, None, :], float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)  # the newest token is always in the suffix: finite
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, v)  # [B, Hkv, G, D], unnormalised
    for rows, blocks in plan.groups:
        n = blocks.shape[0] * block_size
        kp = k_cache[blocks].view(n, num_kv_heads, head_dim).permute(1, 2, 0).float()  # [Hkv, D, n]
        vp = v_cache[blocks].view(n, num_kv_heads, head_dim).transpose(0, 1).float()  # [Hkv, n, D]
        # All the group's queries of a kv head in one matmul: [Hkv, g*G, D] @ [Hkv, D, n].
        qg = qf[rows].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)
        s = (torch.matmul(qg, kp) * scale).view(num_kv_heads, len(rows), group, n).transpose(0, 1)
        mp = s.amax(dim=-1, keepdim=True)
        pp = torch.exp(s - mp)
        lp = pp.sum(dim=-1, keepdim=True)
        op = torch.matmul(pp.transpose(0, 1).reshape(num_kv_heads, -1, n), vp)
        op = op.view(num_kv_heads, len(rows), group, head_dim).transpose(0, 1)
        mr = torch.maximum(m[rows], mp)
        a_own, a_pre = torch.exp(m[rows] - mr), torch.exp(mp - mr)
        o[rows] = o[rows] * a_own + op * a_pre
        denom[rows] = denom[rows] * a_own + lp * a_pre
        m[rows] = mr
    return (o / denom).view(num_seqs, num_q_heads, head_dim).to(q.dtype)


@dataclass
class PagedInputs:
    """Metadata of one paged forward over packed query tokens `[T]` of B sequences.

    positions [T] int64; slot_mapping [T] int64 (KV pool slot = block * block_size + offset of each query token);
    block_tables [B, max_blocks] int32; seq_lens [B] int32 (cache tokens including this step's);
    query_start_loc [B+1] int32. `write_rows`/`write_slots`, when set, restrict the K/V writes to those rows (query
    rows whose K/V is already in the pool, e.g. a forked child re-reading its last shared token, are not rewritten:
    their blocks may be shared with a sibling). `shared`, when set, marks a decode-only batch: on the CPU its
    attention goes through `decode_attention_shared_prefix` (on CUDA the Triton paged kernel serves every batch).
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    write_rows: torch.Tensor | None = None
    write_slots: torch.Tensor | None = None
    shared: SharedPrefix | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as transformers (fp32 statistics, cast back before the weight) so logits match bit-closely.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None = None):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias, dtype=dtype)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, dtype=dtype)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias, dtype=dtype)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.o_bias, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        n = x.shape[0]
        q = _rope(self.q_proj(x).view(n, self.num_heads, self.head_dim), cos, sin)
        k = _rope(self.k_proj(x).view(n, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        return self.o_proj(attend(q, k, v).reshape(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None = None):
        super().__init__()
        h, i, b = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b, dtype=dtype)
        self.up_proj = nn.Linear(h, i, bias=b, dtype=dtype)
        self.down_proj = nn.Linear(i, h, bias=b, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, dtype)

    def forward(self, x, cos, sin, attend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Named `model` inside `CausalLM` so that parameter names equal the Hugging Face checkpoint's."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


VARLEN_PATHS = ("flash", "masked", "loop")


def varlen_attention(bounds: list[int], *, scale: float, path: str | None = None,
                     ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Causal attention within each packed sequence `[bounds[i], bounds[i+1])` of q, k, v `[N, H(kv), D]` (GQA
    without repeating K/V), as one function for every layer. The path follows q's device and dtype unless `path`
    names one:
    - "flash": CUDA in bf16/fp16: one variable-length FlashAttention call per layer (torch's `varlen_attn`), no host
      sync, work proportional to the sum of squared lengths;
    - "masked": CUDA in fp32: one SDPA call per layer with a block-diagonal causal mask (built at the first layer,
      shared by the others), which costs N^2 instead of the sum of squared lengths;
    - "loop": CPU: one causal SDPA call per sequence. Boundaries are host ints there, so nothing syncs, and on a CPU
      the mask's N^2 is the dearer choice (4-15x slower for 16-128 sequences of 64-512 tokens, measured here).
    All three are equal to within rounding (tests/test_model.py)."""
    if path is not None and path not in VARLEN_PATHS:
        raise ValueError(f"path must be one of {VARLEN_PATHS}, got {path!r}")
    cache: dict[str, torch.Tensor] = {}

    def flash(q, k, v):
        from torch.nn.attention.varlen import varlen_attn

        if "cu" not in cache:
            cache["cu"] = torch.tensor(bounds, dtype=torch.int32, device=q.device)
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        return varlen_attn(q, k, v, cache["cu"], cache["cu"], longest, longest, scale=scale, window_size=(-1, 0),
                           enable_gqa=True)

    def masked(q, k, v):
        if "mask" not in cache:
            lengths = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])])
            seq = torch.repeat_interleave(torch.arange(len(lengths)), lengths).to(q.device)
            pos = torch.arange(bounds[-1], device=q.device)
            cache["mask"] = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])
        return _attend_blocks(q, k, v, [(0, bounds[-1], cache["mask"])], scale)

    causal_blocks = [(a, b, None) for a, b in zip(bounds, bounds[1:])]
    paths = {"flash": flash, "masked": masked, "loop": lambda q, k, v: _attend_blocks(q, k, v, causal_blocks, scale)}

    def attend(q, k, v):
        return paths[path or default_varlen_path(q.device, q.dtype)](q, k, v)

    return attend


def masked_attention(mask: torch.Tensor, bounds: list[int], *, scale: float, loop: bool
                     ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Attention of q, k, v `[N, H(kv), D]` under an explicit boolean mask `[N, N]` (row i attends to column j iff
    True; every row attends to something, e.g. itself) that is False outside the diagonal blocks `[bounds[i],
    bounds[i+1])`: the tree mask of `acim_fast.train.packing.TreePack`, whose blocks are its independent subtrees.
    One SDPA call per layer with the whole mask, or (`loop`, the CPU's choice as in `varlen_attention`) one per
    block with its diagonal block of the mask."""
    blocks = [(a, b, mask[a:b, a:b]) for a, b in zip(bounds, bounds[1:])] if loop else [(0, bounds[-1], mask)]
    if loop:  # a block that is one sequence (a chain) is plain causal attention: SDPA's is_causal, without the mask
        blocks = [(a, b, None if torch.equal(m, torch.ones_like(m).tril()) else m) for a, b, m in blocks]

    return lambda q, k, v: _attend_blocks(q, k, v, blocks, scale)


def default_varlen_path(device: torch.device, dtype: torch.dtype) -> str:
    """The `varlen_attention` path for q on `device` in `dtype` (see there)."""
    if device.type != "cuda":
        return "loop"
    return "flash" if dtype in (torch.bfloat16, torch.float16) else "masked"


def _attend_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   blocks: list[tuple[int, int, torch.Tensor | None]], scale: float) -> torch.Tensor:
    """One SDPA call per block `(start, end, mask)` of q, k, v `[N, H(kv), D]` (GQA without repeating K/V): under
    `mask`, or causal where it is None; the blocks' outputs in order."""
    outs = [F.scaled_dot_product_attention(_heads_first(q[a:b]), _heads_first(k[a:b]), _heads_first(v[a:b]),
                                           attn_mask=m, is_causal=m is None, scale=scale,
                                           enable_gqa=True)[0].transpose(0, 1)
            for a, b, m in blocks]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1)[None]  # [L, H, D] -> [1, H, L, D]


class CausalLM(nn.Module):
    """Decoder + lm_head. All forwards take packed tokens `input_ids [N]` (int64) and return `[N, ...]`."""

    def __init__(self, config: ModelConfig, *, dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.model = Backbone(config, dtype)
        # Tied: no separate module, so that state_dict keys equal the checkpoint's (which has no lm_head.weight).
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        # A plain attribute, not a buffer: `.to(bfloat16)` must not round the frequencies.
        self._inv_freq = config.inv_freq()

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection `[V, H]` (the embedding matrix when tied)."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 1:
            raise ValueError(f"input_ids must be packed 1-D [N], got shape {tuple(input_ids.shape)}")

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self._inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [N, 1, D], broadcast over heads
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _run(self, input_ids, positions, attend_for_layer, checkpoint_layers: bool = False) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos, sin = self._cos_sin(positions, x.dtype)
        checkpoint_layers = checkpoint_layers and torch.is_grad_enabled()
        for i, layer in enumerate(self.model.layers):
            if checkpoint_layers:  # keep only the block's input; backward runs the block again (non-reentrant,
                # through the module call, so FSDP's hooks gather its parameters for the recomputation too)
                x = checkpoint(layer, x, cos, sin, attend_for_layer(i), use_reentrant=False)
            else:
                x = layer(x, cos, sin, attend_for_layer(i))
        return self.model.norm(x)

    def forward_hidden(self, input_ids: torch.Tensor, *, cu_seqlens: torch.Tensor | list[int] | None = None,
                       position_ids: torch.Tensor | None = None, checkpoint_layers: bool = False,
                       varlen_path: str | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Dense/varlen path: final hidden states `[N, H]` of packed sequences, causal within each.

        cu_seqlens [B+1] (starts of each sequence, last = N; default: one sequence); position_ids [N] (default:
        0.. within each sequence). Differentiable (training-time log-prob passes). checkpoint_layers: activation
        checkpointing per decoder block while autograd records: backward keeps one `[N, H]` input per block instead
        of every intermediate (attention projections, the MLP's `[N, I]` tensors) and recomputes each block once;
        values and gradients are unchanged. varlen_path: the attention path (`varlen_attention`; default by device
        and dtype). attention_mask [N, N] bool (with position_ids; cu_seqlens then bound the blocks outside which it is
        False): an explicit mask instead of causal, e.g. a tree of shared prefixes (`masked_attention`; per block on
        the "loop" path, one call otherwise).
        """
        self._check_ids(input_ids)
        n = input_ids.shape[0]
        if attention_mask is not None and position_ids is None:
            raise ValueError("attention_mask needs position_ids")
        # Boundaries are read on the host once (pass them on the CPU: a device tensor costs one sync here).
        bounds = [0, n] if cu_seqlens is None else torch.as_tensor(cu_seqlens).tolist()
        if bounds[0] != 0 or bounds[-1] != n or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"cu_seqlens must rise strictly from 0 to N={n}, got {bounds}")
        if position_ids is None:
            position_ids = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])]).to(input_ids.device)
        elif position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != input_ids shape {(n,)}")
        if attention_mask is not None:
            if attention_mask.shape != (n, n) or attention_mask.dtype != torch.bool:
                raise ValueError(f"attention_mask must be bool [{n}, {n}], got {attention_mask.dtype} "
                                 f"{tuple(attention_mask.shape)}")
            attend = masked_attention(attention_mask, bounds, scale=self.config.head_dim ** -0.5,
                                      loop=(varlen_path or default_varlen_path(input_ids.device, self.dtype)) == "loop")
        else:
            attend = varlen_attention(bounds, scale=self.config.head_dim ** -0.5, path=varlen_path)
        return self._run(input_ids, position_ids, lambda _: attend, checkpoint_layers)

    def forward(self, input_ids: torch.Tensor, *, cu_seqlens: torch.Tensor | list[int] | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Dense/varlen logits `[N, V]` in the model dtype (see `forward_hidden`)."""
        return self.logits(self.forward_hidden(input_ids, cu_seqlens=cu_seqlens, position_ids=position_ids))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head_weight)

    def forward_paged(self, input_ids: torch.Tensor, kv: Any, batch: PagedInputs) -> torch.Tensor:
        """Paged path: writes this step's K/V into `kv` (an `acim_fast.engine.kv_cache.KVPool`) and returns hidden
        `[T, H]`.

        Sequence b's queries are the last `query_start_loc[b+1] - query_start_loc[b]` of its `seq_lens[b]` tokens.
        Inference only (no autograd through the pool writes). Metadata values are not checked (see PagedInputs).
        """
        self._check_ids(input_ids)
        scale = self.config.head_dim ** -0.5

        def attend_for_layer(layer: int):
            def attend(q, k, v):
                # The caller (the engine) builds the metadata; value checks would cost a sync per layer.
                if batch.write_rows is None:
                    kv.write(layer, k, v, batch.slot_mapping, validate=False)
                elif batch.write_rows.numel():
                    kv.write(layer, k[batch.write_rows], v[batch.write_rows], batch.write_slots, validate=False)
                if batch.shared is not None and not q.is_cuda:
                    return decode_attention_shared_prefix(q, kv.k[layer], kv.v[layer], batch.seq_lens, batch.shared,
                                                          scale=scale)
                return paged_attention(q, kv.k[layer], kv.v[layer], batch.block_tables, batch.seq_lens,
                                       batch.query_start_loc, scale=scale, validate=False)
            return attend

        return self._run(input_ids, batch.positions, attend_for_layer)

    # -- checkpoints --

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu",
                        prepare: Callable[[CausalLM], object] | None = None) -> CausalLM:
        """Load a Hugging Face checkpoint directory. dtype: default the checkpoint's config dtype, else fp32.

        prepare(model) runs on the model before any of its memory is allocated (it is on the meta device): with FSDP2
        sharding there, each parameter is allocated as its shard and takes only its shard of each checkpoint tensor,
        read one at a time, so the whole model never sits on the device.
        """
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{config_file} not found")
        hf = json.loads(config_file.read_text())
        cfg = ModelConfig.from_hf_dict(hf)
        dtype = _resolve_dtype(dtype if dtype is not None else declared_dtype(hf))
        # Build without allocating, then allocate once on the target device: every tensor is overwritten below.
        with torch.device("meta"):
            model = cls(cfg, dtype=dtype)
        if prepare is not None:
            prepare(model)
        model.to_empty(device=device)
        params = dict(model.named_parameters())
        files = _checkpoint_files(path)
        shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    if name in shapes:
                        raise ValueError(f"tensor {name} appears in both {shapes[name][1].name} and {file.name}")
                    shapes[name] = (tuple(f.get_slice(name).get_shape()), file)
        if cfg.tie_word_embeddings:
            # Some tied checkpoints also store the (identical) output projection; the embedding is what we use.
            head = shapes.pop("lm_head.weight", None)
            if head is not None and head[0] != tuple(params["model.embed_tokens.weight"].shape):
                raise ValueError(f"tensor lm_head.weight has shape {head[0]}, expected "
                                 f"{tuple(params['model.embed_tokens.weight'].shape)} (tied embeddings)")
        missing = sorted(set(params) - set(shapes))
        unexpected = sorted(set(shapes) - set(params))
        if missing:
            raise ValueError(f"checkpoint {path} lacks tensor(s) {missing}")
        if unexpected:
            raise ValueError(f"checkpoint {path} has unexpected tensor(s) {unexpected}")
        for name, (shape, file) in shapes.items():
            if shape != tuple(params[name].shape):
                raise ValueError(f"tensor {name} in {file.name} has shape {shape}, "
                                 f"the config expects {tuple(params[name].shape)}")
        with torch.no_grad():
            for file in files:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        if name in params:
                            _fill(params[name], f.get_tensor(name))
        return model

    def save_pretrained(self, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write config.json + model.safetensors, or shards + index when over `max_shard_bytes`; atomic per file.

        Checkpoint files of an earlier save in `path` that this save does not rewrite are removed, so a loader never
        mixes the two.
        """
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = list(self.state_dict().items())
        shards: list[list[tuple[str, torch.Tensor]]] = [[]]
        size = 0
        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, t))
            size += nbytes
        names = ([SINGLE_FILE] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for fname, shard in zip(names, shards):
            data = {n: t.detach().to("cpu").contiguous() for n, t in shard}
            atomic_write(path / fname, lambda tmp: save_file(data, tmp, metadata={"format": "pt"}))
        keep = set(names) | {"config.json"}
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for _, t in tensors)},
                     "weight_map": {n: fname for fname, shard in zip(names, shards) for n, _ in shard}}
            atomic_write(path / INDEX_FILE, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
            keep.add(INDEX_FILE)
        hf = dict(self.config.hf)
        hf["dtype"] = str(self.dtype).removeprefix("torch.")
        hf.pop("torch_dtype", None)
        atomic_write(path / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(hf, indent=2) + "\n"))
        for stale in list(path.glob("model*.safetensors")) + list(path.glob(INDEX_FILE)):
            if stale.name not in keep:
                stale.unlink()


def declared_dtype(hf: dict[str, Any]) -> str:
    """The dtype a Hugging Face config dict declares (transformers 5's `dtype`, 4.x's `torch_dtype`), else float32."""
    return hf.get("dtype") or hf.get("torch_dtype") or "float32"


def _fill(param: torch.Tensor, tensor: torch.Tensor) -> None:
    """Copy a whole checkpoint tensor into `param`; a sharded (DTensor) parameter keeps its own shard of it, cut
    locally since every rank reads the checkpoint (no communication)."""
    if isinstance(param, DTensor):
        tensor = distribute_tensor(tensor.to(param.device, param.dtype), param.device_mesh, param.placements,
                                   src_data_rank=None)
    param.copy_(tensor)


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _checkpoint_files(path: Path) -> list[Path]:
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    if (path / INDEX_FILE).is_file():
        weight_map = json.loads((path / INDEX_FILE).read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{path / INDEX_FILE} has no weight_map")
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{path / INDEX_FILE} names {f.name}, which does not exist")
        return files
    raise ValueError(f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")


