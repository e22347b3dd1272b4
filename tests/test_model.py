"""acim_fast.engine.model against Hugging Face transformers on tiny random Llama / Qwen2 checkpoints (fp32, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from acim_fast.engine.kv_cache import KVPool
from acim_fast.engine.model import (
    CausalLM,
    ModelConfig,
    PagedInputs,
    decode_attention_shared_prefix,
    default_varlen_path,
    plan_shared_prefix,
)
from acim_kernels.paged_attention_ref import paged_attention_ref

VOCAB = 97
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}

CASES = {
    "llama-gqa": (LlamaConfig, {}),
    "llama-mha-bias": (LlamaConfig, {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}),
    "llama-tied-llama3-rope": (LlamaConfig, {"tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE,
                                             "rope_theta": 500000.0}),
    "llama-linear-rope": (LlamaConfig, {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "qwen2-gqa-tied": (Qwen2Config, {"tie_word_embeddings": True}),
    "qwen2-untied": (Qwen2Config, {"num_key_value_heads": 1}),
}


def _hf_model(case: str, seed: int = 0):
    config_cls, extra = CASES[case]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
    kw.update(extra)
    torch.manual_seed(seed)
    model = (LlamaForCausalLM if config_cls is LlamaConfig else Qwen2ForCausalLM)(config_cls(**kw)).eval()
    # Random init leaves biases and norms at 0 / 1; perturb them so a wrong bias or norm cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    hf = _hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, path


def _seqs(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


def _packed(seqs):
    cu = [0]
    for s in seqs:
        cu.append(cu[-1] + len(s))
    return torch.cat(seqs), cu


@torch.no_grad()
def test_logits_equal_transformers(checkpoint):
    hf, path = checkpoint
    ours = CausalLM.from_pretrained(path)
    seqs = _seqs([37, 5, 60])  # 60 > the llama3 case's original context (16): the scaled band is exercised
    ids, cu = _packed(seqs)
    logits = ours(ids, cu_seqlens=cu)
    for s, a, b in zip(seqs, cu, cu[1:]):
        ref = hf(s[None]).logits[0]
        torch.testing.assert_close(logits[a:b], ref, atol=1e-5, rtol=0)


@torch.no_grad()
def test_paged_path_equals_dense(checkpoint):
    _, path = checkpoint
    model = CausalLM.from_pretrained(path)
    cfg = model.config
    block_size, num_blocks = 4, 64
    pool = KVPool(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    seqs = _seqs([22, 7, 16], seed=2)
    dense = [model.forward_hidden(s) for s in seqs]
    # Scattered, non-contiguous physical blocks per sequence.
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(3)).tolist()
    tables = [perm[0:6], perm[6:9], perm[9:13]]
    tables_padded = [t + [0] * (6 - len(t)) for t in tables]

    def run(chunks):
        """chunks: per sequence (start, end) of the tokens computed this step."""
        ids, pos, slots, qsl = [], [], [], [0]
        for s, table, (a, b) in zip(seqs, tables, chunks):
            ids.append(s[a:b])
            pos.extend(range(a, b))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(a, b))
            qsl.append(qsl[-1] + b - a)
        batch = PagedInputs(
            positions=torch.tensor(pos), slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor(tables_padded, dtype=torch.int32),
            seq_lens=torch.tensor([b for _, b in chunks], dtype=torch.int32),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32))
        return model.forward_paged(torch.cat(ids), pool, batch)

    # Step 1: prefills of different lengths; step 2: an appended chunk, a decode and a 3-token chunk mixed;
    # steps 3-5: one decode each.
    schedule = [[(0, 15), (0, 3), (0, 10)], [(15, 19), (3, 4), (10, 13)]]
    schedule += [[(19 + i, 20 + i), (4 + i, 5 + i), (13 + i, 14 + i)] for i in range(3)]
    for chunks in schedule:
        out = run(chunks)
        start = 0
        for d, (a, b) in zip(dense, chunks):
            torch.testing.assert_close(out[start:start + b - a], d[a:b], atol=1e-5, rtol=0)
            start += b - a


def test_paged_rereading_a_cached_token_does_not_rewrite_it(checkpoint):
    """A query row whose K/V is already in the pool (a fork re-reading its last shared token) leaves the pool as
    it was and still gives the dense hidden state."""
    _, path = checkpoint
    model = CausalLM.from_pretrained(path)
    cfg = model.config
    pool = KVPool(cfg.num_layers, 8, 4, cfg.num_kv_heads, cfg.head_dim, torch.float32, "cpu")
    s = _seqs([10], seed=4)[0]
    with torch.no_grad():
        dense = model.forward_hidden(s)
        table = torch.tensor([[5, 2, 7]], dtype=torch.int32)
        slots = torch.tensor([int(table[0, p // 4]) * 4 + p % 4 for p in range(10)])
        model.forward_paged(s, pool, PagedInputs(
            positions=torch.arange(10), slot_mapping=slots, block_tables=table,
            seq_lens=torch.tensor([10], dtype=torch.int32), query_start_loc=torch.tensor([0, 10], dtype=torch.int32)))
        before = [t.clone() for t in pool.k + pool.v]
        # Re-read token 9 with its write suppressed.
        out = model.forward_paged(s[9:], pool, PagedInputs(
            positions=torch.tensor([9]), slot_mapping=slots[9:], block_tables=table,
            seq_lens=torch.tensor([10], dtype=torch.int32), query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
            write_rows=torch.tensor([], dtype=torch.int64), write_slots=torch.tensor([], dtype=torch.int64)))
    torch.testing.assert_close(out[0], dense[9], atol=1e-5, rtol=0)
    for a, b in zip(before, pool.k + pool.v):
        assert torch.equal(a, b)


@pytest.mark.parametrize("num_q_heads, num_kv_heads", [(4, 2), (3, 3)])
def test_shared_prefix_decode_attention_equals_paged_reference(num_q_heads, num_kv_heads):
    g = torch.Generator().manual_seed(10)
    bs, d = 4, 8
    k_cache = torch.randn(40, bs, num_kv_heads, d, generator=g)
    v_cache = torch.randn(40, bs, num_kv_heads, d, generator=g)
    tables = [
        [3, 7, 1, 20, 21],  # rows 0-2 share blocks 3, 7, 1, but row 2 (a fork re-reading its last kept
        [3, 7, 1, 22],  # token) has its query in block 1: the shared prefix stops before it
        [3, 7, 1],
        [9, 30],  # rows 3-4 share block 9
        [9, 31, 32],
        [11, 12],  # alone
    ]
    seq_lens = [19, 14, 12, 6, 10, 5]
    q = torch.randn(len(tables), num_q_heads, d, generator=g)
    plan = plan_shared_prefix(tables, seq_lens, bs)
    assert [(r.tolist(), b.tolist()) for r, b in plan.groups] == [([0, 1, 2], [3, 7]), ([3, 4], [9])]
    assert plan.suffix_start.tolist() == [8, 8, 8, 4, 4, 0]
    width = max(map(len, tables))
    ref = paged_attention_ref(q, k_cache, v_cache,
                              torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
                              torch.tensor(seq_lens, dtype=torch.int32),
                              torch.arange(len(tables) + 1, dtype=torch.int32), scale=0.3)
    out = decode_attention_shared_prefix(q, k_cache, v_cache, torch.tensor(seq_lens, dtype=torch.int32), plan,
                                         scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_the_packed_forward_is_one_attention_call_per_layer_off_the_cpu(monkeypatch):
    """The masked path (CUDA fp32) calls SDPA once per layer whatever the number of sequences; the loop (CPU) once
    per sequence and layer; CUDA half precision takes FlashAttention's varlen kernel (run by bench/gpu_check.sh)."""
    model = CausalLM(ModelConfig.from_hf_dict(_hf_model("qwen2-gqa-tied").config.to_dict()))
    ids, cu = _packed(_seqs([11, 1, 30, 7], seed=5))
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    for path, per_layer in (("masked", 1), ("loop", 4)):
        calls.clear()
        with torch.no_grad():
            model.forward_hidden(ids, cu_seqlens=cu, varlen_path=path)
        assert len(calls) == per_layer * model.config.num_layers, path
    assert default_varlen_path(torch.device("cuda"), torch.bfloat16) == "flash"
    assert default_varlen_path(torch.device("cuda"), torch.float32) == "masked"
    assert default_varlen_path(torch.device("cpu"), torch.bfloat16) == "loop"
    with pytest.raises(ValueError, match="path must be one of"):
        model.forward_hidden(ids, cu_seqlens=cu, varlen_path="flex")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention's varlen kernel needs a CUDA GPU "
                                                         "(bench/gpu_check.sh runs this file on one)")
def test_the_flash_varlen_path_equals_the_per_sequence_loop_on_cuda():
    hf = _hf_model("qwen2-gqa-tied")
    model = CausalLM(ModelConfig.from_hf_dict(hf.config.to_dict()), dtype=torch.bfloat16).cuda()
    model.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    ids, cu = _packed(_seqs([11, 1, 30, 7], seed=5))
    outputs, grads = {}, {}
    for path in ("flash", "loop"):
        model.zero_grad(set_to_none=True)
        outputs[path] = model.forward_hidden(ids.cuda(), cu_seqlens=cu, varlen_path=path)
        outputs[path].float().square().mean().backward()
        grads[path] = {n: p.grad.float() for n, p in model.named_parameters()}
    torch.testing.assert_close(outputs["flash"].float(), outputs["loop"].float(), atol=2e-2, rtol=2e-2)
    for n in grads["loop"]:
        torch.testing.assert_close(grads["flash"][n], grads["loop"][n], atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize("varlen_path", ["loop", "masked"])
def test_varlen_packed_equals_per_sequence_with_gradients(varlen_path):
    hf = _hf_model("qwen2-gqa-tied")
    # fp64, so that packed and per-sequence agree to rounding (fp32 gradients differ by summation order).
    model = CausalLM(ModelConfig.from_hf_dict(hf.config.to_dict()), dtype=torch.float64)
    model.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    seqs = _seqs([11, 1, 30, 7], seed=5)
    ids, cu = _packed(seqs)
    w = torch.randn(ids.shape[0], model.config.hidden_size, dtype=torch.float64)

    packed = model.forward_hidden(ids, cu_seqlens=torch.tensor(cu), varlen_path=varlen_path)
    (packed * w).sum().backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    single = [model.forward_hidden(s) for s in seqs]
    sum((h * w[a:b]).sum() for h, a, b in zip(single, cu, cu[1:])).backward()

    torch.testing.assert_close(packed, torch.cat(single), atol=1e-6, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads_packed[n], p.grad, atol=1e-5, rtol=1e-5)
    # Explicit position ids (e.g. a packed continuation) reach RoPE as transformers' position_ids do.
    with torch.no_grad():
        pos = torch.arange(30) + 5
        ref = hf(seqs[2][None], position_ids=pos[None]).logits[0]
        torch.testing.assert_close(model(seqs[2], position_ids=pos).float(), ref, atol=1e-5, rtol=0)


def test_activation_checkpointing_recomputes_each_block_and_changes_nothing():
    hf = _hf_model("llama-gqa")
    model = CausalLM(ModelConfig.from_hf_dict(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict())
    ids, cu = _packed(_seqs([13, 4, 21]))
    w = torch.randn(ids.shape[0], model.config.hidden_size)
    calls = []
    # A pre-hook: the recomputation stops early, once it has what backward needs, so a block's end may not be reached.
    model.model.layers[1].register_forward_pre_hook(lambda *_: calls.append(1))

    def run(checkpoint_layers):
        model.zero_grad()
        calls.clear()
        hidden = model.forward_hidden(ids, cu_seqlens=cu, checkpoint_layers=checkpoint_layers)
        (hidden * w).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return hidden.detach(), grads, len(calls)

    plain, plain_grads, plain_calls = run(False)
    kept, kept_grads, kept_calls = run(True)
    assert (plain_calls, kept_calls) == (1, 2)  # the block ran again in backward
    torch.testing.assert_close(kept, plain, rtol=0, atol=0)
    assert set(kept_grads) == set(plain_grads) and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # nothing to recompute without autograd: the flag is ignored
        calls.clear()
        torch.testing.assert_close(model.forward_hidden(ids, cu_seqlens=cu, checkpoint_layers=True), plain)
        assert len(calls) == 1


@torch.no_grad()
def test_sharded_round_trip_and_transformers_loads_our_save(tmp_path):
    hf = _hf_model("llama-gqa")
    hf.save_pretrained(tmp_path / "orig")
    ours = CausalLM.from_pretrained(tmp_path / "orig")
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=60_000)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours.state_dict())
    again = CausalLM.from_pretrained(tmp_path / "sharded")
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert not list((tmp_path / "sharded").glob(".*.tmp"))

    ids = _seqs([19], seed=6)[0]
    ref = hf(ids[None]).logits[0]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()
    torch.testing.assert_close(loaded(ids[None]).logits[0], ref, atol=1e-6, rtol=0)
    # Saving unsharded over a sharded directory leaves one consistent checkpoint.
    again.save_pretrained(tmp_path / "sharded")
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["config.json", "model.safetensors"]
    torch.testing.assert_close(CausalLM.from_pretrained(tmp_path / "sharded")(ids), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["qwen2-gqa-tied", "llama-tied-llama3-rope", "llama-mha-bias"])
@torch.no_grad()
def test_save_then_transformers_gives_same_logits(case, tmp_path):
    hf = _hf_model(case, seed=7)
    hf.save_pretrained(tmp_path / "a")
    ours = CausalLM.from_pretrained(tmp_path / "a")
    ours.save_pretrained(tmp_path / "b")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    ids = _seqs([25], seed=8)[0]
    torch.testing.assert_close(back(ids[None]).logits[0], ours(ids), atol=1e-5, rtol=0)


def _edit_checkpoint(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"lacks .*model\.layers\.1\.mlp\.up_proj\.weight"),
    (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}), r"unexpected .*model\.layers\.0\.extra"),
    (lambda t: t.update({"model.norm.weight": torch.ones(63)}), r"model\.norm\.weight .*\(63,\).*\(64,\)"),
    (lambda t: t.update({"lm_head.weight": torch.zeros(VOCAB + 1, 64)}), r"lm_head\.weight .*\(98, 64\)"),
])
def test_bad_checkpoint_raises_naming_the_tensor(tmp_path, edit, message):
    _hf_model("qwen2-gqa-tied").save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        CausalLM.from_pretrained(tmp_path)


def test_tied_checkpoint_with_stored_lm_head_loads(tmp_path):
    _hf_model("qwen2-gqa-tied").save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    model = CausalLM.from_pretrained(tmp_path)
    assert model.lm_head_weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("field, value, message", [
    ("model_type", "gpt2", "model_type"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}, "rope type 'yarn'"),
    ("num_key_value_heads", 3, "num_key_value_heads=3"),
])
def test_bad_config_raises(tmp_path, field, value, message):
    _hf_model("llama-gqa").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        CausalLM.from_pretrained(tmp_path)


def test_directory_without_weights_raises(tmp_path):
    _hf_model("llama-gqa").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="neither model.safetensors nor"):
        CausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="config.json not found"):
        CausalLM.from_pretrained(tmp_path / "missing")


def test_dtype_and_device(tmp_path):
    hf = _hf_model("llama-gqa")
    hf.save_pretrained(tmp_path)
    model = CausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.device == torch.device("cpu")
    ids = _seqs([12], seed=9)[0]
    with torch.no_grad():
        low = model(ids).float()
        ref = hf(ids[None]).logits[0]
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=0.1, rtol=0.05)
    model.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert CausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        CausalLM.from_pretrained(tmp_path, dtype="float64")
    with pytest.raises(ValueError, match="input_ids"):
        model.forward_hidden(ids[None])
    with pytest.raises(ValueError, match="cu_seqlens"):
        model.forward_hidden(ids, cu_seqlens=[0, 5, 5, 12])
