"""`Engine`: continuous batching over a paged KV cache, with fork (copy-on-write), pause/append and preemption.

Each `step` schedules the running sequences (oldest first), admits waiting ones, runs ONE packed model forward over
decodes, chunked prefills and appended tool output together, and samples a token for every sequence whose tokens are
all computed. `fork` shares the parent's KV blocks (no K/V recomputed). When the pool runs out the youngest running
sequence is preempted (then the youngest paused one holding blocks, then the one asking): its blocks are freed and
it recomputes later, keeping what it sampled; `add` refuses a sequence that could not fit the pool on its own.

It does not tokenise (stop strings need the `detokenize` callable), beam search, decode speculatively, capture CUDA
graphs or serve over several devices.
"""

from __future__ import annotations

import bisect
from dataclasses import replace
from typing import Callable, Sequence

import torch

from acim_fast.engine.kv_cache import BlockManager, KVPool, OutOfBlocks
from acim_fast.engine.model import CausalLM, PagedInputs, plan_shared_prefix
from acim_fast.engine.sampling import (
    EngineBase,
    EngineStats,
    FinishReason,
    SamplingParams,
    SeqOutput,
    SeqStatus,
    _Seq,
    derive_seed,
    sample,
    stop_reason,
)


class Engine(EngineBase):
    """See the module docstring. Sequence ids are ints in creation order; a smaller id is an older sequence."""

    def __init__(self, model: CausalLM, *, num_blocks: int, block_size: int = 16, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 4096, detokenize: Callable[[list[int]], str] | None = None,
                 enable_prefix_caching: bool = False, sample_vocab_size: int | None = None):
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Engine {name} must be an int >= 1, got {value!r}")
        cfg = model.config
        super().__init__(cfg.vocab_size, detokenize, sample_vocab_size)
        self.model = model
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.pool = KVPool(cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim,
                           model.dtype, model.device)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
        self.stats = EngineStats()
        self._running: list[int] = []  # ids, sorted (oldest first)
        self._waiting: list[int] = []  # ids, sorted
        self._ban_index: dict[tuple[int, ...], torch.Tensor] = {}  # see _banned_index

    # -- public API --

    def add(self, prompt_ids: list[int], params: SamplingParams) -> int:
        prompt, params = self._checked_add(prompt_ids, params)
        need = -(-(len(prompt) + params.max_new_tokens) // self.block_size)
        if need > self.block_manager.num_blocks:
            raise ValueError(f"prompt over the budget: {len(prompt)} prompt tokens + max_new_tokens "
                             f"{params.max_new_tokens} need {need} KV blocks, the pool has "
                             f"{self.block_manager.num_blocks}")
        seq = _Seq(id=self._new_id(), prompt_len=len(prompt), ids=prompt, params=params,
                   generator=torch.Generator().manual_seed(params.seed))
        self._seqs[seq.id] = seq
        bisect.insort(self._waiting, seq.id)
        return seq.id

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting or self._filled)

    def pause(self, seq_id: int) -> None:
        """Stop scheduling the sequence; its KV blocks stay (until `release`, or a preemption under pressure)."""
        seq = self._get(seq_id)
        if seq.status == SeqStatus.PAUSED:
            return
        (self._running if seq.status == SeqStatus.RUNNING else self._waiting).remove(seq.id)
        seq.status, seq.finish_reason = SeqStatus.PAUSED, FinishReason.PAUSED

    def resume(self, seq_id: int) -> None:
        seq = self._get(seq_id)
        if seq.status != SeqStatus.PAUSED or seq.id in self._filled:
            return
        seq.finish_reason = seq.stop_string = None
        if seq.id in self.block_manager:
            seq.status = SeqStatus.RUNNING
            bisect.insort(self._running, seq.id)
        else:  # preempted while paused: recompute on admission
            seq.status = SeqStatus.WAITING
            bisect.insort(self._waiting, seq.id)

    def fork(self, seq_id: int, n: int, *, at: int | None = None, forbid: Sequence[int] = (),
             params: SamplingParams | None = None) -> list[int]:
        """Start n children holding the parent's first `at` tokens (prompt + response; default all), sharing its
        KV blocks. Each child is forbidden `forbid` at its next sampled token (on top of the `banned_token_ids` of
        its params) and samples with its own seed derived from the parent's. The children's params are the
        parent's, or `params` (its seed is ignored: the derived one is used). The parent keeps its state (a paused
        parent stays paused)."""
        parent, at, children = self._checked_fork(seq_id, n, at, forbid, params)
        resident = parent.id in self.block_manager
        kept = min(at, parent.num_computed) if resident else 0
        child_ids = [fields["id"] for fields in children]
        if resident:
            self.block_manager.fork(parent.id, child_ids, at=kept)
        for fields in children:
            child = _Seq(**fields, generator=torch.Generator().manual_seed(fields["params"].seed),
                         num_computed=kept, high_water=kept, replay=resident and kept == at)
            self._seqs[child.id] = child
            if resident:
                child.status = SeqStatus.RUNNING
                bisect.insort(self._running, child.id)
            else:
                # The parent's blocks were preempted: the children recompute, like the parent would.
                child.high_water = min(at, parent.high_water)
                bisect.insort(self._waiting, child.id)
        self.stats.prefix_reused_tokens += kept * n
        return child_ids

    def release(self, seq_id: int) -> None:
        """Forget the sequence and free its blocks (finished sequences are released when `step` returns them)."""
        seq = self._get(seq_id)
        if seq.id in self._filled:
            self._filled.remove(seq.id)
        if seq.status == SeqStatus.RUNNING:
            self._running.remove(seq.id)
        elif seq.status == SeqStatus.WAITING:
            self._waiting.remove(seq.id)
        if seq.id in self.block_manager:
            self.block_manager.free(seq.id)
        del self._seqs[seq.id]

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[SeqOutput]:
        """Add every prompt and step until all finish or pause; paused ones (stop strings) are released too.
        With a seed, prompt i samples with a seed derived from (seed, i), so repeated prompts give distinct
        samples. Needs an idle engine, so that no other sequence's output is swallowed."""
        if self._seqs:
            raise ValueError(f"generate needs an idle engine; {len(self._seqs)} sequences are live")
        ids = [self.add(p, params if params.seed is None else replace(params, seed=derive_seed(params.seed, -1, i)))
               for i, p in enumerate(prompts)]
        done: dict[int, SeqOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                done[out.seq_id] = out
        for sid in ids:
            if sid in self._seqs:  # paused on a stop string
                self.release(sid)
        return [done[sid] for sid in ids]

    # -- the step --

    def step(self) -> list[SeqOutput]:
        """One scheduler step; returns the sequences that finished (then released) or paused in it."""
        self.stats.steps += 1
        results = self._finish_filled()
        scheduled, copies = self._schedule()
        if scheduled:
            results += self._postprocess(self._forward(scheduled, copies))
        return results

    def _schedule(self) -> tuple[list[tuple[_Seq, int, int]], list[tuple[int, int]]]:
        """Pick this step's (sequence, first query position, end) and the copy-on-write copies to apply first."""
        bm = self.block_manager
        scheduled: list[tuple[_Seq, int, int]] = []
        chosen: set[int] = set()
        copies: list[tuple[int, int]] = []
        budget = self.max_num_batched_tokens
        for sid in list(self._running):
            if len(scheduled) == self.max_num_seqs or budget == 0:
                break
            seq = self._seqs[sid]
            if seq.status != SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            total = len(seq.ids)
            limit = bm.num_tokens(sid)
            # New tokens get slots only once the reserved ones are computed (the prefix cache's contract).
            if seq.num_computed == limit < total:
                if not self._append_blocks(seq, limit, total, chosen, copies):
                    continue
                limit = total
            start = seq.num_computed - 1 if seq.replay else seq.num_computed
            end = min(limit, start + budget)
            assert end > start, f"running sequence {sid} has nothing to compute"
            scheduled.append((seq, start, end))
            chosen.add(sid)
            budget -= end - start
        for sid in list(self._waiting):
            if len(scheduled) == self.max_num_seqs or budget == 0:
                break
            seq = self._seqs[sid]
            if not self._admit(seq):
                break  # first come, first served: no overtaking, so the oldest waiting cannot starve
            start = seq.num_computed
            end = min(len(seq.ids), start + budget)
            scheduled.append((seq, start, end))
            chosen.add(sid)
            budget -= end - start
        return scheduled, copies

    def _forward(self, scheduled: list[tuple[_Seq, int, int]],
                 copies: list[tuple[int, int]]) -> list[tuple[_Seq, int, float, float]]:
        """Apply the copy-on-write copies, run the model over the scheduled tokens and sample the next token of every
        sequence whose tokens are now all computed: (sequence, token, log-prob, behaviour log-prob) each."""
        bm = self.block_manager
        used = bm.num_blocks - bm.num_free_blocks
        if used > self.stats.peak_kv_blocks:
            self.stats.peak_kv_blocks = used
            self.stats.peak_kv_bytes = used * (self.pool.nbytes // bm.num_blocks)
        self.pool.copy_blocks(copies)
        ids, batch, qsl = self._pack(scheduled)
        with torch.inference_mode():
            hidden = self.model.forward_paged(ids, self.pool, batch)
            samplers = []
            for i, (seq, _, end) in enumerate(scheduled):
                seq.num_computed = max(seq.num_computed, end)
                seq.replay = False
                seq.high_water = max(seq.high_water, end)
                if end == len(seq.ids):
                    samplers.append((i, seq))
            if not samplers:
                return []
            rows = torch.tensor([qsl[i + 1] - 1 for i, _ in samplers], device=self.model.device)
            logits = self.model.logits(hidden[rows])
            seqs = [s for _, s in samplers]
            tokens, logprobs, behaviour = self._sample(logits, seqs)
            # One transfer to the host per step (fp64 holds every token id exactly).
            host = torch.stack([tokens.double(), logprobs.double(), behaviour.double()]).tolist()
        return [(seq, int(t), lp, b) for seq, t, lp, b in zip(seqs, *host)]

    def _postprocess(self, sampled: list[tuple[_Seq, int, float, float]]) -> list[SeqOutput]:
        """Append each sampled token to its sequence and decide its stop; the sequences that finished or paused."""
        if not sampled:
            return []
        self.stats.decode_steps += 1
        self.stats.sampled_tokens += len(sampled)
        results = []
        for seq, tok, lp, bp in sampled:
            seq.ids.append(tok)
            seq.logprobs.append(lp)
            seq.behaviour.append(bp)
            seq.loss_mask.append(1)
            seq.forbid = ()
            if (stop := stop_reason(seq, self.detokenize)) is not None:
                results.append(self._stopped(seq, *stop))
        return results

    def _append_blocks(self, seq: _Seq, have: int, total: int, chosen: set[int],
                       copies: list[tuple[int, int]]) -> bool:
        """Reserve slots for the sequence's uncomputed tokens, preempting others if needed; False if it was the
        one preempted."""
        while True:
            try:
                copies.extend(self.block_manager.append(seq.id, seq.ids[have:total]))
                return True
            except OutOfBlocks:
                victim = self._victim(seq, chosen)
                self._preempt(victim)
                if victim is seq:
                    return False

    def _victim(self, seq: _Seq, chosen: set[int]) -> _Seq:
        """Youngest running sequence not yet scheduled this step, else youngest paused one holding blocks, else
        `seq` itself."""
        for sid in reversed(self._running):
            if sid != seq.id and sid not in chosen:
                return self._seqs[sid]
        paused = [s for s in self._seqs.values() if s.status == SeqStatus.PAUSED and s.id in self.block_manager]
        return max(paused, key=lambda s: s.id) if paused else seq

    def _admit(self, seq: _Seq) -> bool:
        """Allocate blocks for a waiting sequence. With running sequences around, keep one free block per running
        sequence (room for their next tokens) so that admitting does not force a preemption at once."""
        bm = self.block_manager
        need = -(-len(seq.ids) // self.block_size)
        while True:
            busy = bool(self._running)
            if not busy or need + len(self._running) <= bm.num_free_blocks:
                try:
                    cached = bm.allocate(seq.id, seq.ids)
                    break
                except OutOfBlocks:
                    pass
            if busy:
                return False
            # Nothing runs, so nothing will free blocks by itself: take them from paused sequences.
            paused = [s for s in self._seqs.values() if s.status == SeqStatus.PAUSED and s.id in bm]
            assert paused, "add() guarantees a lone sequence fits the pool"
            self._preempt(max(paused, key=lambda s: s.id))
        self._waiting.remove(seq.id)
        seq.status = SeqStatus.RUNNING
        bisect.insort(self._running, seq.id)
        seq.num_computed = cached
        self.stats.prefix_reused_tokens += cached
        return True

    def _preempt(self, seq: _Seq) -> None:
        self.block_manager.free(seq.id)
        seq.num_computed = 0
        seq.replay = False
        self.stats.preemptions += 1
        if seq.status == SeqStatus.RUNNING:
            self._running.remove(seq.id)
            seq.status = SeqStatus.WAITING
            bisect.insort(self._waiting, seq.id)

    def _pack(self, scheduled: list[tuple[_Seq, int, int]]) -> tuple[torch.Tensor, PagedInputs, list[int]]:
        """The scheduled tokens as one packed batch: (token ids, `PagedInputs`, query start of each sequence and the
        end). Counts the tokens computed in the stats."""
        bm = self.block_manager
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        seq_lens: list[int] = []
        qsl = [0]
        replay_rows: list[int] = []
        for seq, start, end in scheduled:
            if seq.replay and start == seq.num_computed - 1:
                replay_rows.append(qsl[-1])
            ids.extend(seq.ids[start:end])
            positions.extend(range(start, end))
            slots.extend(bm.slot_mapping(seq.id, start, end))
            tables.append(bm.block_table(seq.id))
            seq_lens.append(end)
            qsl.append(qsl[-1] + end - start)
            self._count_computed(seq, start, end)
        width = max(len(t) for t in tables)
        device = self.model.device
        slot_t = torch.tensor(slots, dtype=torch.int64)
        batch = PagedInputs(
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slot_mapping=slot_t.to(device),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                      device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device))
        if device.type == "cpu" and len(ids) == len(scheduled) > 1:
            # A decode-only step: let forks of one prompt read its K/V once (on CUDA the paged kernel serves).
            plan = plan_shared_prefix(tables, seq_lens, self.block_size)
            # Worth its extra per-group work only when sharing removes at least half of the K/V reads (measured:
            # forks of a 512-token prompt gain ~10x per layer; the E-step's ~35-token prompts lose 1.5x overall).
            batch.shared = plan if plan.groups and 2 * plan.saved_tokens >= sum(seq_lens) else None
        if replay_rows:
            keep = torch.ones(len(slots), dtype=torch.bool)
            keep[replay_rows] = False
            rows = keep.nonzero()[:, 0]
            batch.write_rows, batch.write_slots = rows.to(device), slot_t[rows].to(device)
        return torch.tensor(ids, dtype=torch.int64, device=device), batch, qsl

    def _count_computed(self, seq: _Seq, start: int, end: int) -> None:
        if seq.replay and start == seq.num_computed - 1:
            self.stats.replayed_tokens += 1
            start += 1
        again = max(0, min(end, seq.high_water) - start)
        self.stats.recomputed_tokens += again
        first = max(start, seq.high_water)
        if first < end:
            p = seq.prompt_len
            sampled = sum(seq.loss_mask[max(first - p, 0):end - p]) if end > p else 0
            self.stats.decode_tokens += sampled
            self.stats.prefill_tokens += end - first - sampled

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]):
        dev = logits.device
        params = [s.params for s in seqs]
        temperature = torch.tensor([p.temperature for p in params], device=dev)
        # Greedy rows draw nothing, so a sequence's random stream does not depend on its neighbours' settings.
        uniforms = torch.stack([torch.zeros(()) if p.temperature == 0 else torch.rand((), generator=s.generator)
                                for p, s in zip(params, seqs)]).to(dev)  # CPU generators: no device sync per row
        forbid = None
        if any(s.forbid or s.params.banned_token_ids for s in seqs):
            forbid = torch.zeros(logits.shape, dtype=torch.bool, device=dev)
            for row, s in enumerate(seqs):
                if s.params.banned_token_ids:
                    forbid[row].index_fill_(0, self._banned_index(s.params.banned_token_ids), True)
                if s.forbid:
                    forbid[row, list(s.forbid)] = True
        return sample(logits, temperature, torch.tensor([p.top_p for p in params], device=dev),
                      torch.tensor([p.top_k for p in params], device=dev),
                      torch.tensor([p.train_temperature for p in params], device=dev), uniforms, forbid,
                      sample_vocab_size=self.sample_vocab_size)

    def _banned_index(self, banned: tuple[int, ...]) -> torch.Tensor:
        """`banned` as an index tensor on the model's device, built once per distinct ban: a BPE vocabulary has
        hundreds of fence-start ids, and every sampled step of every banned sequence needs them."""
        index = self._ban_index.get(banned)
        if index is None:
            index = self._ban_index[banned] = torch.tensor(banned, dtype=torch.int64, device=self.model.device)
        return index
