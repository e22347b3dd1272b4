"""acim_fast.embedded.tiny: the char-level tokenizer round-trips (ours and transformers'), and the tiny model saved in
HF format gives the same logits in transformers and in our CausalLM."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from acim_fast.embedded.task import generate
from acim_fast.embedded.tiny import (
    CHARACTERS,
    EOS,
    PAD,
    UNK,
    TinyConfig,
    build_model,
    build_tokenizer,
    codec,
    create_tiny,
    load_tokenizer,
)
from acim_fast.engine.model import CausalLM

SMALL = TinyConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=96,
                   max_position_embeddings=128, seed=3)
TEXTS = [CHARACTERS, "Problem: What is 12*3?\nSolution:\n```python\nprint(12*3)\n```\n```output\n36\n```\n\\boxed{36}",
         "  two  spaces \t tab\n\nblank line ", " . , ! ?"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return create_tiny(tmp_path_factory.mktemp("tiny"), SMALL)


def test_one_token_per_character_and_exact_round_trip():
    tok = build_tokenizer()
    encode, decode = codec(tok)
    texts = TEXTS + [p.prose + p.code_demo().text for p in generate(50, seed=0)]
    for text in texts:
        ids = encode(text)
        assert len(ids) == len(text)
        assert decode(ids) == text
    assert len(set(encode(CHARACTERS))) == len(CHARACTERS)  # distinct ids


def test_special_tokens_and_unknown_characters():
    tok = build_tokenizer()
    encode, decode = codec(tok)
    eos = tok.token_to_id(EOS)
    assert encode(f"ab{EOS}") == encode("ab") + [eos]
    assert decode(encode("ab") + [eos, tok.token_to_id(PAD)]) == "ab"  # specials are skipped
    assert encode("a\u00e9b") == [encode("a")[0], tok.token_to_id(UNK), encode("b")[0]]
    assert tok.get_vocab_size(with_added_tokens=True) == len(CHARACTERS) + 3


def test_saved_tokenizer_loads_in_transformers_with_the_same_ids_and_text(tiny_dir):
    ours = load_tokenizer(tiny_dir)
    theirs = AutoTokenizer.from_pretrained(tiny_dir)
    assert (theirs.eos_token, theirs.pad_token, theirs.unk_token) == (EOS, PAD, UNK)
    assert theirs.eos_token_id == ours.token_to_id(EOS)
    encode, decode = codec(ours)
    for text in TEXTS:
        ids = theirs(text, add_special_tokens=False)["input_ids"]
        assert ids == encode(text)
        assert theirs.decode(ids) == text == decode(ids)


def test_model_logits_match_between_transformers_and_ours(tiny_dir):
    ours = CausalLM.from_pretrained(tiny_dir).eval()
    theirs = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    assert ours.config.head_dim == 32 and theirs.config.head_dim == 32
    ids = torch.randint(0, ours.config.vocab_size, (47,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(ids[None]).logits[0]
        got = ours(ids)
    assert expected.abs().max() > 1e-3  # not a degenerate all-zero model
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_init_is_seeded_and_small():
    tok = build_tokenizer()
    a, b = build_model(SMALL, tok), build_model(SMALL, tok)
    c = build_model(dataclasses.replace(SMALL, seed=4), tok)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        if "norm" in name:
            assert torch.all(pa == 1.0)
        else:
            assert not torch.equal(pa, pc), name
            assert 0.015 < pa.std().item() < 0.025, name


@pytest.mark.parametrize("field, value", [("head_dim", 16), ("num_layers", 0), ("num_kv_heads", 3),
                                          ("init_std", 0.0), ("seed", -1)])
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TinyConfig(**{field: value})
