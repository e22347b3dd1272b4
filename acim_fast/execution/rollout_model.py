"""A policy as rollouts (E-step, evaluation) need it: the network with its tokenizer, stop ids and prompt encoding.

`RolloutModel` bundles our `CausalLM`, `encode` / `decode` (no special tokens added; specials skipped), the stop
ids and optionally a transformers tokenizer whose chat template renders the prompt. `prompt_ids(problem)` encodes
the prompt and the forced code prefix each on its own (see prompts.py); `fence_ids` are the tokens banned to force
prose, computed once; `engine(...)` is our `engine.paged_engine.Engine` over the weights, or, with a `backend`
(`engine.vllm_backend.VLLMBackend`), the backend's engine with the same interface; either samples only ids the
tokenizer has (`tokenizer_size`), never the rows a model pads its vocabulary with. `load_rollout_model(dir)` loads
the model and the directory's `AutoTokenizer`; rollouts stop on its eos id and those of config.json.

It does not sample, train, or save.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from acim_fast.engine.model import CausalLM
from acim_fast.engine.paged_engine import Engine
from acim_fast.execution.prompts import build_prompt, fence_start_ids


@dataclass(frozen=True, kw_only=True)
class RolloutModel:
    model: CausalLM
    encode: Callable[[str], list[int]]  # text -> ids, no special tokens added
    decode: Callable[[list[int]], str]  # ids -> text, special tokens skipped
    stop_token_ids: tuple[int, ...]
    tokenizer: Any = None
    # The tokenizer's size where the model pads its vocabulary past it (None: the model's vocabulary): only ids below
    # it are sampled and scanned for fence starts, as a padding id has no text.
    tokenizer_size: int | None = None
    backend: Any = None  # a rollout backend with .engine(**Engine keywords); None: our sampler on `model`

    @functools.cached_property
    def fence_ids(self) -> tuple[int, ...]:
        """Sorted ids of every token that can start a code fence (see `prompts.fence_start_ids`)."""
        fence = tuple(sorted(fence_start_ids(self.decode, self.tokenizer_size or self.model.config.vocab_size)))
        if not fence:
            raise ValueError("no token of the vocabulary can start a code fence: forced prose would be no constraint")
        return fence

    def engine(self, **options: Any) -> Engine:
        """A fresh rollout engine (`Engine`'s constructor keywords) over the policy's current weights, sampling only
        ids below `tokenizer_size`."""
        options = {"sample_vocab_size": self.tokenizer_size, **options}
        if self.backend is not None:
            return self.backend.engine(**options)
        return Engine(self.model, **options)

    def prompt_ids(self, problem: str) -> tuple[list[int], list[int]]:
        """(the prompt's ids, the forced code prefix's ids): one prompt text in every mode, see prompts.py."""
        code = build_prompt(problem, mode="code", tokenizer=self.tokenizer)
        return self.encode(code.text), self.encode(code.response_prefix)


def load_rollout_model(model_dir: str | os.PathLike, *, dtype: str | None = None, device: str = "cpu") -> RolloutModel:
    """Our `CausalLM` and the directory's tokenizer (see the module docstring)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise ValueError(f"model directory {path} does not exist")
    model = CausalLM.from_pretrained(path, dtype=dtype, device=device).eval()
    from transformers import AutoTokenizer  # the slow import only where a directory needs it

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # a missing or malformed tokenizer file: a user-side problem with the directory
        raise ValueError(f"{path}: cannot load its tokenizer with transformers.AutoTokenizer: "
                         f"{type(e).__name__}: {e}") from e
    vocab = model.config.vocab_size
    eos = model.config.hf.get("eos_token_id")
    candidates = [tokenizer.eos_token_id] + (eos if isinstance(eos, list) else [eos])
    stops = tuple(sorted({t for t in candidates if isinstance(t, int) and 0 <= t < vocab}))
    if not stops:
        raise ValueError(f"{path}: neither the tokenizer nor config.json names an eos token id below the vocabulary "
                         f"size {vocab}: rollouts could only stop at max_new_tokens")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    # Models pad their vocabulary past the tokenizer's (Qwen2.5: 151,936 rows, 151,665 tokens).
    return RolloutModel(model=model, encode=encode, decode=decode, stop_token_ids=stops, tokenizer=tokenizer,
                        tokenizer_size=min(len(tokenizer), vocab))
