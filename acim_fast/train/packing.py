"""Sequence packing for the dense training path: token-budgeted packs of whole sequences, with `cu_seqlens`.

A `Row` is one sequence's token ids and per-token values aligned with them (e.g. loss mask, behaviour log-prob,
advantage). Packed, each sequence gives its tokens but the last as inputs and its tokens but the first as targets;
the values that go with a target row are the target token's (the value of the token being predicted). Sequences are
concatenated in order into `Pack`s of at most `pack_tokens` rows; attention never crosses their boundaries
(`CausalLM.forward_hidden(..., cu_seqlens=...)`).

It does not shuffle, sort by length, or split a sequence across packs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch


@dataclass(frozen=True, slots=True)
class Row:
    ids: Sequence[int]
    values: Mapping[str, Sequence[float]]  # name -> one value per token of `ids`


@dataclass(frozen=True, slots=True)
class Pack:
    input_ids: torch.Tensor  # [N] int64
    targets: torch.Tensor  # [N] int64, the next token of each row within its sequence
    cu_seqlens: torch.Tensor  # [B+1] int64, sequence boundaries
    values: dict[str, torch.Tensor]  # name -> [N] float32, the target token's value
    rows: list[int]  # indices (into the packed iterable) of the sequences in this pack, in order

    def seq_ids(self) -> torch.Tensor:
        """[N] int64: the position of each row's sequence within this pack."""
        lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
        return torch.repeat_interleave(torch.arange(len(lengths)), lengths)


def plan(lengths: Iterable[int], pack_tokens: int) -> list[list[int]]:
    """Greedy packing in order, by sequence lengths alone: the indices of the sequences of each pack. A sequence of
    n tokens takes n - 1 rows (inputs and targets are shifted by one)."""
    bins: list[list[int]] = []
    used = pack_tokens  # no open pack yet
    for index, length in enumerate(lengths):
        n = length - 1
        if n < 1 or n > pack_tokens:
            raise ValueError(f"a sequence of {length} tokens does not fit pack_tokens={pack_tokens} "
                             f"(it needs 2..{pack_tokens + 1} tokens)")
        if used + n > pack_tokens:
            bins.append([])
            used = 0
        bins[-1].append(index)
        used += n
    return bins


def pack(rows: Iterable[Row], pack_tokens: int) -> list[Pack]:
    """`plan`'s packs, made: a sequence goes into the current pack if its rows fit, else starts the next."""
    rows = list(rows)
    names = tuple(rows[0].values) if rows else ()
    for index, row in enumerate(rows):
        if tuple(row.values) != names or any(len(v) != len(row.ids) for v in row.values.values()):
            raise ValueError(f"row {index}: values must name {names} with one value per token "
                             f"({len(row.ids)}), got { {k: len(v) for k, v in row.values.items()} }")
    packs = []
    for members in plan((len(r.ids) for r in rows), pack_tokens):
        current = [rows[i] for i in members]
        bounds = [0]
        for r in current:
            bounds.append(bounds[-1] + len(r.ids) - 1)
        packs.append(Pack(
            input_ids=torch.tensor([t for r in current for t in r.ids[:-1]], dtype=torch.int64),
            targets=torch.tensor([t for r in current for t in r.ids[1:]], dtype=torch.int64),
            cu_seqlens=torch.tensor(bounds, dtype=torch.int64),
            values={k: torch.tensor([v for r in current for v in r.values[k][1:]], dtype=torch.float32)
                    for k in names},
            rows=members))
    return packs
