"""What both engines share: their parameters and outputs, the batched sampler, the stop decision and `EngineBase`.

`sample` draws one token per row by inverse CDF from one uniform each (the row's own seeded generator, so a
sequence's tokens do not depend on its batch): greedy, temperature, top-k, top-p, minus a `forbid` mask, among the
first `sample_vocab_size` ids only (a model pads its vocabulary past its tokenizer's: Qwen2.5 has 151,936 rows for
151,665 tokens, and a padding id has no text to feed back after a tool call). It returns the log-prob under that
sampling distribution (0.0 for greedy) and the behaviour log-prob under the raw model distribution at
`train_temperature`, over all rows, before any filtering or mask: the distribution the M-step recomputes.
`stop_reason` decides whether a sequence stops after a token; `EngineBase` keeps the live sequences, checks
`add`/`fork`/`append` arguments and implements `append`.

It runs no model, holds no KV cache and schedules nothing: `paged_engine.Engine` and `vllm_backend.VLLMEngine` do.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch

from acim_fast.common.fields import Choice
from acim_fast.common.hashing import stable_seed


class SeqStatus(Choice):
    """Where `Engine` keeps a sequence: queued for (re)computation, scheduled every step, or held until `resume`."""

    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"


class FinishReason(Choice):
    """`SeqOutput.finish_reason`: why a sequence is no longer stepped (None while it runs)."""

    STOP = "stop"  # it sampled one of its stop_token_ids (finished, token kept)
    LENGTH = "length"  # its response reached max_new_tokens (finished)
    STOP_STRING = "stop_string"  # a stop string ended in its last token (paused, token kept)
    PAUSED = "paused"  # paused by the caller (`pause`, `append`)


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256  # bound on everything after the prompt (sampled + appended)
    stop_token_ids: tuple[int, ...] = ()  # the sequence FINISHES (FinishReason.STOP), token kept
    stop_strings: tuple[str, ...] = ()  # the sequence PAUSES (FinishReason.STOP_STRING); needs Engine(detokenize=...)
    seed: int | None = None  # per-sequence torch.Generator; None = drawn from the OS
    train_temperature: float = 1.0  # behaviour log-probs: raw model distribution at this temperature
    # Masked at every sampled step, inherited by forks; stored sorted and deduplicated. Ids are range-checked
    # against the vocabulary at `Engine.add` (the params do not know the vocabulary).
    banned_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an int >= 0, got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not self.train_temperature > 0:
            raise ValueError(f"SamplingParams.train_temperature must be > 0, got {self.train_temperature}")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ValueError(f"SamplingParams.stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if not all(isinstance(t, int) for t in self.stop_token_ids):
            raise ValueError(f"SamplingParams.stop_token_ids must be ints, got {self.stop_token_ids!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"SamplingParams.seed must be None or an int >= 0, got {self.seed!r}")
        banned = self.banned_token_ids
        if not isinstance(banned, (tuple, list, set, frozenset)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in banned):
            raise ValueError(f"SamplingParams.banned_token_ids must be a tuple (list, set) of ints, "
                             f"got {banned!r:.200}")
        # Sorted and deduplicated: equal bans give equal (and hashable) params whatever set they came from.
        object.__setattr__(self, "banned_token_ids", tuple(sorted(set(banned))))


@dataclass
class SeqOutput:
    seq_id: int
    prompt_ids: list[int]
    token_ids: list[int]  # everything after the prompt (sampled and appended)
    logprobs: list[float]  # under the sampling distribution; 0.0 for appended (and greedy) tokens
    behaviour_logprobs: list[float]  # raw model distribution at train_temperature; 0.0 for appended tokens
    loss_mask: list[int]  # 1 sampled, 0 appended (tool output)
    finish_reason: FinishReason | None  # compares equal to "stop", "length", "stop_string", "paused"; None: running
    stop_string: str | None
    parent: int | None  # lineage: the sequence this one was forked from
    fork_pos: int | None  # tokens (prompt + response) shared with the parent at the fork


@dataclass
class EngineStats:
    steps: int = 0
    decode_steps: int = 0  # steps that sampled at least one token
    sampled_tokens: int = 0
    prefill_tokens: int = 0  # K/V computed for prompt or appended tokens, the first time
    decode_tokens: int = 0  # K/V computed for sampled tokens, the first time
    recomputed_tokens: int = 0  # K/V computed again after a preemption
    prefix_reused_tokens: int = 0  # tokens whose K/V came from a fork or the prefix cache instead of compute
    replayed_tokens: int = 0  # query-only rows of forks kept at a past position (no K/V written)
    preemptions: int = 0
    peak_kv_blocks: int = 0
    peak_kv_bytes: int = 0


@dataclass(eq=False, kw_only=True)
class SeqState:
    """A sequence as every engine keeps it (`EngineBase`); engines add their own state in a subclass."""

    id: int
    prompt_len: int
    ids: list[int]  # prompt + response
    params: SamplingParams
    parent: int | None = None
    fork_pos: int | None = None
    logprobs: list[float] = field(default_factory=list)
    behaviour: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_string: str | None = None
    forbid: tuple[int, ...] = ()  # ids banned at the next sampled step
    num_forks: int = 0

    def output(self) -> SeqOutput:
        p = self.prompt_len
        return SeqOutput(seq_id=self.id, prompt_ids=self.ids[:p], token_ids=self.ids[p:],
                         logprobs=list(self.logprobs), behaviour_logprobs=list(self.behaviour),
                         loss_mask=list(self.loss_mask), finish_reason=self.finish_reason,
                         stop_string=self.stop_string, parent=self.parent, fork_pos=self.fork_pos)


@dataclass(eq=False, kw_only=True)
class _Seq(SeqState):
    generator: torch.Generator
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # leading tokens whose K/V is in the pool (when the sequence holds blocks)
    high_water: int = 0  # most tokens ever computed: K/V below it computed again counts as recomputation
    replay: bool = False  # re-read token num_computed-1 as a query (its K/V is cached) to get its logits


def filtered_logprobs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                      top_k: torch.Tensor) -> torch.Tensor:
    """Log-probs `[B, V]` (fp32, -inf outside the support) of the sampling distribution of each row.

    logits [B, V]; temperature [B] (0 = greedy: a point mass on the argmax); top_p [B] in (0, 1]; top_k [B] int
    (0 = off). Order as in transformers: temperature, then top-k, then top-p on the renormalised top-k
    distribution, keeping the smallest set of most likely tokens whose mass reaches top_p.
    """
    logits = logits.float()
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    if bool(((top_k > 0) | (top_p < 1)).any()):
        vocab = logits.shape[1]
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)
        k = torch.where(top_k > 0, top_k, vocab)
        sorted_logits = sorted_logits.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
        scaled = torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)
    out = scaled.log_softmax(dim=-1)
    if bool(greedy.any()):
        point = torch.full_like(out, float("-inf"))
        point.scatter_(1, logits.argmax(dim=-1, keepdim=True), 0.0)
        out = torch.where(greedy[:, None], point, out)
    return out


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           train_temperature: torch.Tensor, uniforms: torch.Tensor, forbid: torch.Tensor | None = None, *,
           sample_vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row by inverse CDF. Returns (tokens [B] int64, logprobs [B], behaviour_logprobs [B]).

    logits [B, V]; uniforms [B] in [0, 1) (one per row, from the row's own generator); only ids below
    `sample_vocab_size` (None: V) can be drawn; forbid [B, V] bool or None: ids removed from the
    sampling distribution. Neither restriction touches the behaviour distribution (the raw model distribution over
    all V at train_temperature); a row must keep at least one id.
    """
    logits = logits.float()
    behaviour = (logits / train_temperature[:, None]).log_softmax(dim=-1)
    masked = logits[:, :sample_vocab_size]
    if forbid is not None:
        masked = masked.masked_fill(forbid[:, :sample_vocab_size], float("-inf"))
    logp = filtered_logprobs(masked, temperature, top_p, top_k)
    cdf = logp.exp().cumsum(dim=-1)
    tokens = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True)[:, 0]
    # Rounding can put u * total at the total itself: fall back to the last token with positive probability
    # (the first index where the CDF reaches its maximum), never onto a zero-probability tail.
    tokens = torch.minimum(tokens, cdf.argmax(dim=-1))
    col = tokens[:, None]
    return tokens, logp.gather(1, col)[:, 0], behaviour.gather(1, col)[:, 0]


def derive_seed(base: int, fork_index: int, child_index: int) -> int:
    """The seed of child `child_index` of fork `fork_index` of a sequence seeded `base` (a 63-bit int)."""
    return stable_seed(base, fork_index, child_index, sep="/")


def check_token_ids(ids: Sequence[int], name: str, vocab_size: int) -> list[int]:
    """`ids` as a list, or ValueError naming `name` if one is not a token id of the vocabulary."""
    ids = list(ids)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"{name} holds {t!r}, not a token id in [0, {vocab_size})")
    return ids


def check_params(params: SamplingParams, vocab_size: int, detokenize: Callable | None, *,
                 sample_vocab_size: int | None = None, name: str = "params") -> None:
    """What an engine checks of `params` that the params cannot check alone: ids against its vocabulary (and that
    the ban leaves one of the first `sample_vocab_size` ids to sample), stop strings against its detokenizer."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"{name} must be a SamplingParams, got {type(params).__name__}")
    check_token_ids(params.stop_token_ids, "stop_token_ids", vocab_size)
    check_token_ids(params.banned_token_ids, "banned_token_ids", vocab_size)
    check_samplable(params.banned_token_ids, sample_vocab_size or vocab_size, "banned_token_ids")
    if params.stop_strings and detokenize is None:
        raise ValueError("SamplingParams.stop_strings needs Engine(detokenize=...)")


def check_samplable(banned: Sequence[int], sample_vocab_size: int, what: str) -> None:
    """ValueError unless some id below `sample_vocab_size` is outside `banned` (sorted, deduplicated ids)."""
    if bisect.bisect_left(banned, sample_vocab_size) == sample_vocab_size:
        raise ValueError(f"{what} bans all {sample_vocab_size} samplable tokens: nothing could be sampled")


def stop_string_hit(ids: list[int], prompt_len: int, stops: Sequence[str],
                    detokenize: Callable[[list[int]], str]) -> str | None:
    """The stop string that ends inside the text of `ids[-1]`, if any (earliest end wins). Only response text
    (`ids[prompt_len:]`) is searched: a stop string never starts in the prompt."""
    # Every token decodes to at least one character in practice; a few extra tokens cover byte-level pieces.
    window = max(map(len, stops)) + 4
    tail = ids[max(prompt_len, len(ids) - window):]
    before = detokenize(tail[:-1])
    text = detokenize(tail)
    common = 0
    for a, b in zip(before, text):
        if a != b:
            break
        common += 1
    best = None
    for s in stops:
        i = text.find(s, max(0, common - len(s) + 1))
        if i >= 0 and (best is None or i + len(s) < best[0]):
            best = (i + len(s), s)
    return None if best is None else best[1]


def stop_reason(seq: SeqState, detokenize: Callable[[list[int]], str] | None) -> tuple[FinishReason, str | None] | None:
    """Whether `seq` stops after the token it just sampled (`seq.ids[-1]`), and the stop string it hit: a stop token
    id finishes it (STOP), a full response budget finishes it (LENGTH), a stop string ending in that token pauses it
    (STOP_STRING), checked in that order; None: it goes on. Both engines decide with this, then call `_stopped`."""
    p = seq.params
    if seq.ids[-1] in p.stop_token_ids:
        return FinishReason.STOP, None
    if len(seq.ids) - seq.prompt_len >= p.max_new_tokens:
        return FinishReason.LENGTH, None
    if p.stop_strings and (hit := stop_string_hit(seq.ids, seq.prompt_len, p.stop_strings, detokenize)) is not None:
        return FinishReason.STOP_STRING, hit
    return None


class EngineBase:
    """What every engine shares (ours, `vllm_engine.VLLMEngine`): the table of live sequences, the argument checks of
    `add`, `append` and `fork`, `append` itself, and outputs. Subclasses start sequences and implement `pause`,
    `resume`, `release` and `step`. Sequence ids are ints in creation order; a smaller id is an older sequence."""

    def __init__(self, vocab_size: int, detokenize: Callable[[list[int]], str] | None,
                 sample_vocab_size: int | None = None):
        if sample_vocab_size is not None and (isinstance(sample_vocab_size, bool) or not isinstance(
                sample_vocab_size, int) or not 1 <= sample_vocab_size <= vocab_size):
            raise ValueError(f"sample_vocab_size must be None or an int in [1, {vocab_size}] (the model's "
                             f"vocabulary), got {sample_vocab_size!r}")
        self.vocab_size = vocab_size
        # Only ids below it are sampled: the tokenizer's size where the model pads its vocabulary past it.
        self.sample_vocab_size = sample_vocab_size or vocab_size
        self.detokenize = detokenize
        self._seqs: dict[int, SeqState] = {}
        self._filled: list[int] = []  # paused sequences whose append used up max_new_tokens: finish next step
        self._next_id = 0
        self._os_random = random.SystemRandom()

    def append(self, seq_id: int, token_ids: list[int]) -> None:
        """Add tool output (loss_mask 0) after the sequence's tokens; the sequence then goes on decoding."""
        seq = self._get(seq_id)
        ids = self._check_ids(token_ids, "token_ids")
        have = len(seq.ids) - seq.prompt_len
        if have + len(ids) > seq.params.max_new_tokens:
            raise ValueError(f"append of {len(ids)} tokens to sequence {seq_id} with {have} response tokens exceeds "
                             f"max_new_tokens {seq.params.max_new_tokens}")
        self.pause(seq_id)  # nothing is sampled while the tokens go in
        seq.ids.extend(ids)
        seq.logprobs.extend([0.0] * len(ids))
        seq.behaviour.extend([0.0] * len(ids))
        seq.loss_mask.extend([0] * len(ids))
        if have + len(ids) == seq.params.max_new_tokens:
            # Nothing more may be sampled: the next step reports it finished with reason "length".
            self._filled.append(seq.id)
        else:
            self.resume(seq_id)

    def output(self, seq_id: int) -> SeqOutput:
        return self._get(seq_id).output()

    def params(self, seq_id: int) -> SamplingParams:
        """The sequence's parameters, with the seed it actually uses (drawn, derived at a fork, or given)."""
        return self._get(seq_id).params

    # -- for subclasses --

    def _checked_add(self, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], SamplingParams]:
        """`add`'s arguments checked: the prompt as a list, and the params with a seed (drawn if none)."""
        check_params(params, self.vocab_size, self.detokenize, sample_vocab_size=self.sample_vocab_size)
        prompt = self._check_ids(prompt_ids, "prompt_ids")
        if not prompt:
            raise ValueError("prompt_ids must not be empty")
        if params.seed is None:
            params = replace(params, seed=self._os_random.getrandbits(63))
        return prompt, params

    def _checked_fork(self, seq_id: int, n: int, at: int | None, forbid: Sequence[int],
                      params: SamplingParams | None) -> tuple[SeqState, int, list[dict]]:
        """`fork`'s arguments checked: (the parent, `at` resolved, the `SeqState` fields of each child: the parent's
        first `at` tokens, `params` or the parent's with a seed derived from the parent's, `forbid`)."""
        parent = self._get(seq_id)
        if params is not None:
            if not isinstance(params, SamplingParams):
                raise ValueError(f"params must be None or a SamplingParams, got {type(params).__name__}")
            check_params(params, self.vocab_size, self.detokenize, sample_vocab_size=self.sample_vocab_size)
        base = parent.params if params is None else params
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        total = len(parent.ids)
        at = total if at is None else at
        if not isinstance(at, int) or not parent.prompt_len <= at <= total:
            raise ValueError(f"at must be an int in [{parent.prompt_len}, {total}] (prompt length .. all tokens) "
                             f"for sequence {seq_id}, got {at!r}")
        if at - parent.prompt_len >= base.max_new_tokens:
            raise ValueError(f"fork at {at} leaves the children of sequence {seq_id} no max_new_tokens budget")
        forbid = tuple(self._check_ids(forbid, "forbid"))
        check_samplable(sorted(set(forbid).union(base.banned_token_ids)), self.sample_vocab_size,
                        f"forbid and the banned_token_ids of sequence {seq_id} together")
        r = at - parent.prompt_len
        children = [dict(id=self._new_id(), prompt_len=parent.prompt_len, ids=parent.ids[:at],
                         params=replace(base, seed=derive_seed(parent.params.seed, parent.num_forks, i)),
                         parent=parent.id, fork_pos=at, logprobs=parent.logprobs[:r],
                         behaviour=parent.behaviour[:r], loss_mask=parent.loss_mask[:r], forbid=forbid)
                    for i in range(n)]
        parent.num_forks += 1
        return parent, at, children

    def _finish(self, seq: SeqState, reason: FinishReason) -> SeqOutput:
        seq.finish_reason = reason
        out = seq.output()
        self.release(seq.id)
        return out

    def _finish_filled(self) -> list[SeqOutput]:
        """Finish (LENGTH) the sequences whose `append` used up max_new_tokens: a step's first results."""
        filled, self._filled = self._filled, []  # a copy: `release` removes finished ids from `_filled`
        return [self._finish(self._seqs[sid], FinishReason.LENGTH) for sid in filled]

    def _stopped(self, seq: SeqState, reason: FinishReason, stop_string: str | None) -> SeqOutput:
        """Apply a `stop_reason`: a stop string pauses the sequence (it goes on after `append` or `resume`), any
        other reason finishes and releases it. Its output either way."""
        if reason == FinishReason.STOP_STRING:
            self.pause(seq.id)
            seq.finish_reason, seq.stop_string = reason, stop_string
            return seq.output()
        return self._finish(seq, reason)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _get(self, seq_id: int) -> SeqState:
        try:
            return self._seqs[seq_id]
        except (KeyError, TypeError):
            raise ValueError(f"unknown seq_id {seq_id!r} (never added, or already finished/released)") from None

    def _check_ids(self, ids: Sequence[int], name: str) -> list[int]:
        return check_token_ids(ids, name, self.vocab_size)
