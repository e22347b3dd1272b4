"""A Qwen2.5-shaped checkpoint for the real-model tests: the real Qwen2.5 tokenizer, built offline, and a tiny random
decoder with Qwen2.5's vocabulary, special tokens and config fields.

The tokenizer's BPE ranks are `qwen.tiktoken` (151,643 "base64-token rank" lines, the base vocabulary of Qwen2 and
Qwen2.5) from PyPI's dashscope 2.0.2 wheel (Apache-2.0). `fetch_wheel` downloads that wheel once with pip into
`cache_dir()` (`$XDG_CACHE_HOME/acim_fast`, else `~/.cache/acim_fast`), checks its sha256 and renames it into place,
so a killed download never leaves a wheel behind; a cached wheel is checked again on every use. A hash mismatch
raises `ValueError`; `RegistryUnreachable` (the one error a test may skip on) only when pip's output shows that it
could not reach the registry. `build_tokenizer` turns the ranks into a `tokenizers` BPE with transformers'
`TikTokenConverter` (whose own loader needs tiktoken, which we do not depend on), Qwen2's pre-tokenizer pattern, NFC,
the 22 special tokens and Qwen2.5's ChatML template (tool calls left out), and saves it as a fast tokenizer that
`AutoTokenizer` loads. `build_model` saves a random `Qwen2ForCausalLM` (2 layers, hidden 64, GQA) of a fixed seed.
`sft_checkpoint` fine-tunes a checkpoint on given token sequences with transformers' own model (loss on the masked-in
response tokens only), cached under `cache_dir()` by a hash of everything it depends on.

It does not choose what to fine-tune on (the run test does) or download anything but the one pinned wheel.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

WHEEL_REQUIREMENT = "dashscope==2.0.2"
WHEEL_NAME = "dashscope-2.0.2-py3-none-any.whl"
WHEEL_SHA256 = "0602d1800f7433bdb7953560986eaf5146454ed3988636c0a91963ba24e74258"
RANKS_MEMBER = "dashscope/resources/qwen.tiktoken"
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
NUM_RANKS = 151_643

# Qwen2's pre-tokenizer split: single digits (\p{N}), where tiktoken's cl100k groups up to three.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
# Ids NUM_RANKS, NUM_RANKS + 1, ... in this order, as in Qwen2.5's tokenizer.json.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
TOKENIZER_SIZE = NUM_RANKS + len(SPECIAL_TOKENS)  # 151,665: len(tokenizer)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = NUM_RANKS, NUM_RANKS + 1, NUM_RANKS + 2
VOCAB_SIZE = 151_936  # the model's rows: Qwen2.5 pads its vocabulary past the tokenizer's
DEFAULT_SYSTEM = "You are a helpful assistant."
# Qwen2.5's ChatML template without its tool-call branches.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
# What pip prints when it cannot reach an index (urllib3's and the OS's connection errors).
NETWORK_ERROR_MARKERS = (
    "NewConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ProxyError", "Max retries exceeded",
    "Temporary failure in name resolution", "Name or service not known", "nodename nor servname",
    "Network is unreachable", "No route to host", "Connection refused", "connection broken by",
)


class RegistryUnreachable(RuntimeError):
    """pip could not reach the package registry: the only reason the real-tokenizer tests may be skipped."""


def cache_dir() -> Path:
    """Where the wheel is kept between sessions: `$XDG_CACHE_HOME/acim_fast`, else `~/.cache/acim_fast`."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "acim_fast"


def _check_sha256(data: bytes, expected: str, what: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ValueError(f"{what}: sha256 {actual}, expected {expected} (a corrupt or tampered file: delete it and "
                         f"run again to download it afresh)")


def fetch_wheel(cache: Path | None = None, *, pip_args: tuple[str, ...] = ()) -> Path:
    """The dashscope wheel in `cache` (default `cache_dir()`), downloaded by pip if absent; sha256 checked.
    `pip_args` go to `pip download` (e.g. an index to use)."""
    cache = cache_dir() if cache is None else Path(cache)
    path = cache / WHEEL_NAME
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            _pip_download(Path(tmp), pip_args)
            got = Path(tmp) / WHEEL_NAME
            if not got.is_file():
                raise RuntimeError(f"pip download {WHEEL_REQUIREMENT} succeeded but wrote no {WHEEL_NAME} in {tmp}: "
                                   f"{sorted(p.name for p in Path(tmp).iterdir())}")
            _check_sha256(got.read_bytes(), WHEEL_SHA256, f"downloaded {WHEEL_NAME}")
            os.replace(got, path)  # same directory: atomic, so the cache never holds a partial wheel
    _check_sha256(path.read_bytes(), WHEEL_SHA256, str(path))
    return path


def _pip_download(dest: Path, pip_args: tuple[str, ...]) -> None:
    # pip names a connection error only in the warning of a retry (its final error is "from versions: none", as for
    # a reachable index that lacks the wheel): hence one retry, never none.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "20", *pip_args,
               WHEEL_REQUIREMENT, "-d", str(dest)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode == 0:
        return
    output = done.stdout + done.stderr
    tail = "\n".join(output.strip().splitlines()[-15:])
    if any(marker in output for marker in NETWORK_ERROR_MARKERS):
        raise RegistryUnreachable(f"pip cannot reach the package registry to download {WHEEL_REQUIREMENT} (the "
                                  f"real Qwen2.5 tokenizer's ranks):\n{tail}")
    raise RuntimeError(f"`{' '.join(command)}` failed with exit status {done.returncode}:\n{tail}")


def read_ranks(wheel: str | os.PathLike) -> dict[bytes, int]:
    """The BPE ranks of `qwen.tiktoken` inside the wheel (its sha256 checked): token bytes -> rank."""
    with zipfile.ZipFile(wheel) as z:
        data = z.read(RANKS_MEMBER)
    _check_sha256(data, RANKS_SHA256, f"{wheel}!{RANKS_MEMBER}")
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    assert len(ranks) == NUM_RANKS and sorted(ranks.values()) == list(range(NUM_RANKS)), "checked by the sha256"
    return ranks


def _converter_class():
    """`TikTokenConverter` reading the ranks itself (transformers imported only when a tokenizer is built)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class QwenConverter(TikTokenConverter):
        # The base class calls self.load_tiktoken_bpe(vocab_file) and would import tiktoken; our vocab_file is the
        # wheel.
        load_tiktoken_bpe = staticmethod(read_ranks)

    return QwenConverter


def build_tokenizer(out_dir: str | os.PathLike, wheel: str | os.PathLike):
    """Save Qwen2.5's tokenizer (tokenizer.json, tokenizer_config.json, its chat template) in `out_dir`; returns it."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast

    backend = _converter_class()(vocab_file=str(wheel), pattern=QWEN2_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    assert backend.get_vocab_size(with_added_tokens=True) == TOKENIZER_SIZE
    assert [backend.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(NUM_RANKS, TOKENIZER_SIZE))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=131_072, split_special_tokens=False)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_model(out_dir: str | os.PathLike, *, seed: int = 0) -> None:
    """Save a random Qwen2 decoder with Qwen2.5's vocabulary and token ids in `out_dir` (safetensors, fp32)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128,
        vocab_size=VOCAB_SIZE, tie_word_embeddings=True, rope_theta=10_000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32_768, bos_token_id=ENDOFTEXT_ID, pad_token_id=ENDOFTEXT_ID,
        eos_token_id=IM_END_ID, dtype="float32")
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(str(out_dir))


def build_checkpoint(out_dir: str | os.PathLike, *, cache: Path | None = None, seed: int = 0) -> Path:
    """`out_dir` as a Hugging Face checkpoint directory: the random model and the real tokenizer (see the module)."""
    out_dir = Path(out_dir)
    wheel = fetch_wheel(cache)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build_model(tmp, seed=seed)
    build_tokenizer(tmp, wheel)
    tmp.rename(out_dir)
    return out_dir


@dataclass(frozen=True)
class SFTSample:
    """One fine-tuning sequence: the prompt (context only) and the response, trained where `mask` is 1."""

    prompt: list[int]
    response: list[int]
    mask: list[int]


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 60
    lr: float = 1e-2
    seed: int = 0


def sft_checkpoint(base_dir: str | os.PathLike, samples: list[SFTSample], config: SFTConfig = SFTConfig(), *,
                   cache: Path | None = None) -> Path:
    """`base_dir` fine-tuned on `samples` (full batch, AdamW), with `base_dir`'s tokenizer files and the losses
    (sft_losses.json): a directory under
    `cache` (default `cache_dir()`) named by a hash of the base weights, the samples and `config`, made once (renamed
    into place when complete)."""
    base_dir = Path(base_dir)
    key = hashlib.sha256((base_dir / "model.safetensors").read_bytes())
    key.update(json.dumps([[asdict(s) for s in samples], asdict(config)]).encode())
    out = (cache_dir() if cache is None else Path(cache)) / f"sft-{key.hexdigest()[:20]}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".sft-") as tmp:
        model, losses = _fine_tune(base_dir, samples, config)
        model.save_pretrained(tmp)
        Path(tmp, "sft_losses.json").write_text(json.dumps(losses))
        for f in base_dir.iterdir():  # the tokenizer's files
            if not (Path(tmp) / f.name).exists():
                shutil.copy(f, tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process made it meanwhile: same inputs, same use
            if not out.is_dir():
                raise
    return out


def _fine_tune(base_dir: Path, samples: list[SFTSample], config: SFTConfig):
    """(the fine-tuned transformers model, the loss of each step)."""
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(config.seed)
    model = Qwen2ForCausalLM.from_pretrained(base_dir, dtype=torch.float32).train()
    width = max(len(s.prompt) + len(s.response) for s in samples)
    ids = torch.full((len(samples), width), ENDOFTEXT_ID)
    attention = torch.zeros_like(ids)
    targets = torch.full_like(ids, -100)  # at position p: the token p + 1, where trained
    for b, s in enumerate(samples):
        seq = s.prompt + s.response
        ids[b, :len(seq)] = torch.tensor(seq)
        attention[b, :len(seq)] = 1
        for j, (token, trained) in enumerate(zip(s.response, s.mask)):
            if trained:
                targets[b, len(s.prompt) + j - 1] = token
    where = targets != -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    losses = []
    for _ in range(config.steps):
        hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state[where]
        loss = F.cross_entropy(model.lm_head(hidden), targets[where])  # logits of the trained positions only
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), losses
