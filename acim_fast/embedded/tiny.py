"""The tiny default model: a character-level tokenizer and a small Llama initialised from scratch, in HF format.

`build_tokenizer` is a `tokenizers` BPE without merges over printable ASCII, newline and tab, plus EOS, PAD and
UNK; with no pre-tokenizer or normaliser `decode(encode(text)) == text`, which the rollout loop relies on (stop
strings on decoded text, output blocks tokenised on their own). `create_tiny(path, config)` writes a directory that
transformers, our `CausalLM.from_pretrained` and vLLM (head_dim >= 32) all load, with weights drawn N(0, 0.02):
PyTorch's default init is too wide for training from scratch. `codec` gives the `encode` / `decode` callables the
engine, the rollout loop and the trainer take.

It does not train (`acim_fast.embedded.warmup`), use chat templates, or know characters beyond ASCII.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, PreTrainedTokenizerFast

from acim_fast.common.fields import check_int
from acim_fast.engine.model import CausalLM, ModelConfig

EOS = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
SPECIAL_TOKENS = (EOS, PAD, UNK)
# string.printable minus the rarely meaningful \r \x0b \x0c: one token each.
CHARACTERS = "".join(c for c in string.printable if c not in "\r\x0b\x0c")


def build_tokenizer() -> Tokenizer:
    """The character-level tokenizer: specials first (ids 0, 1, 2), then one id per character."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARACTERS))}
    # BPE without merges splits its input into characters and maps each to its id; with no pre-tokenizer the whole
    # text is one "word", so spaces and newlines are characters like any other.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    # Fuse joins token strings with nothing in between (the default decoder would insert spaces).
    tok.decoder = decoders.Fuse()
    return tok


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """tokenizer.json + tokenizer_config.json, loadable with `AutoTokenizer.from_pretrained(path)`."""
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   clean_up_tokenization_spaces=False)  # would turn " ." into "."
    fast.save_pretrained(str(path))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise ValueError(f"{file} not found")
    return Tokenizer.from_file(str(file))


def codec(tokenizer: Tokenizer) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """(encode, decode): text -> ids with no special tokens added; ids -> text with special tokens skipped."""

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    return encode, decode


@dataclass(kw_only=True, slots=True)
class TinyConfig:
    """Architecture and init of the tiny Llama. Defaults: 0.34M parameters; two layers are the fewest that learn to
    copy (a previous-token head feeding an induction head), which is all the code route needs."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 32  # vLLM needs >= 32
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_position_embeddings"):
            check_int(self, name, 1)
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 32 \
                or self.head_dim % 2:
            raise ValueError(f"TinyConfig.head_dim must be an even int >= 32 (vLLM's minimum), got {self.head_dim!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TinyConfig.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if not self.rope_theta > 0:
            raise ValueError(f"TinyConfig.rope_theta must be > 0, got {self.rope_theta}")
        if not self.init_std > 0:
            raise ValueError(f"TinyConfig.init_std must be > 0, got {self.init_std}")
        check_int(self, "seed", 0)


def hf_config(config: TinyConfig, tokenizer: Tokenizer) -> dict:
    """The Hugging Face config.json of the tiny model (written by transformers' LlamaConfig, so it loads there)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings, rope_theta=config.rope_theta,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=None, eos_token_id=vocab[EOS],
        pad_token_id=vocab[PAD], architectures=["LlamaForCausalLM"],
    ).to_dict()


def build_model(config: TinyConfig, tokenizer: Tokenizer) -> CausalLM:
    """A freshly initialised tiny model (fp32, CPU), seeded by `config.seed`."""
    model = CausalLM(ModelConfig.from_hf_dict(hf_config(config, tokenizer)), dtype=torch.float32)
    g = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * config.init_std)
    return model


def create_tiny(path: str | os.PathLike, config: TinyConfig = TinyConfig()) -> Path:
    """Write a fresh tiny model and its tokenizer to `path` (a Hugging Face checkpoint directory); returns it."""
    path = Path(path)
    tokenizer = build_tokenizer()
    build_model(config, tokenizer).save_pretrained(path)
    save_tokenizer(tokenizer, path)
    return path
