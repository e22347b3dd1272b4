"""`ScriptedLM`: a CausalLM that an `Engine` runs like any model but whose next token a test chooses, for the
rollout tests (the embedded byte vocabulary in test_rollout.py, the real Qwen2.5 vocabulary in test_qwen.py).

Its K cache stores token ids, so each query reads its whole sequence back through the block table (forks, appended
tool output and preemptions included, as the engine laid them out); `next_token(ids)` gets logit `logit` and every
other token 0, so greedy decoding follows it and the behaviour log-prob of each sampled token is known.
"""

from __future__ import annotations

import torch

from acim_fast.engine.model import CausalLM, ModelConfig


class ScriptedLM(CausalLM):
    """See the module docstring; subclasses define `next_token`."""

    def __init__(self, vocab_size: int, *, logit: float = 5.0):
        # fp32 K entries hold the ids exactly (below 2**24).
        super().__init__(ModelConfig.from_hf_dict(dict(
            model_type="llama", vocab_size=vocab_size, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
            num_attention_heads=1)))
        self.logit = logit

    def next_token(self, ids: list[int]) -> int:
        """The token after `ids` (the prompt and response so far)."""
        raise NotImplementedError

    def forward_paged(self, input_ids, kv, batch):
        k = input_ids.to(self.dtype)[:, None, None].expand(-1, 1, self.config.head_dim)
        if batch.write_rows is None:
            kv.write(0, k, k, batch.slot_mapping, validate=False)
        else:  # a fork kept at a past position re-reads its last token without rewriting it
            kv.write(0, k[batch.write_rows], k[batch.write_rows], batch.write_slots, validate=False)
        cache = kv.k[0][..., 0, 0].reshape(-1)
        logits = torch.zeros(len(input_ids), self.config.vocab_size)
        bs, qsl = kv.block_size, batch.query_start_loc.tolist()
        for b, (table, n) in enumerate(zip(batch.block_tables.tolist(), batch.seq_lens.tolist())):
            slots = [table[p // bs] * bs + p % bs for p in range(n)]
            logits[qsl[b + 1] - 1, self.next_token(cache[slots].long().tolist())] = self.logit
        return logits

    def logits(self, hidden):
        return hidden
