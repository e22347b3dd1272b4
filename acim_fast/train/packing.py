"""Sequence packing for the dense training path: token-budgeted packs of whole sequences, with `cu_seqlens`.

A `Row` is one sequence's token ids and per-token values aligned with them (e.g. loss mask, behaviour log-prob,
advantage). Packed, each sequence gives its tokens but the last as inputs and its tokens but the first as targets;
the values that go with a target row are the target token's (the value of the token being predicted). Sequences are
concatenated in order into `Pack`s of at most `pack_tokens` rows; attention never crosses their boundaries
(`CausalLM.forward_hidden(..., cu_seqlens=...)`).

`tree(pack)` stores a pack's shared prefixes once (`TreePack`: a trie under a tree attention mask), for
sequences that share their prompt or, forked, part of their response.

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


@dataclass(frozen=True, slots=True)
class TreePack:
    """A `Pack` whose sequences' shared prefixes (a problem's prompt; forked siblings' response up to the fork) are
    stored once: the nodes of the trie of its sequences' input tokens, in depth-first pre-order. Inputs at a node
    depend on the tokens along its path alone (causal attention), so a node's hidden state is every sharing row's;
    `index` maps the flat pack's rows back to their nodes (`hidden[index]`), where the flat pack's targets and values
    apply unchanged (one node may predict different next tokens for different rows)."""

    flat: Pack
    input_ids: torch.Tensor  # [M] int64, one token per trie node, pre-order
    position_ids: torch.Tensor  # [M] int64, a node's depth (its position in every sequence through it)
    parents: torch.Tensor  # [M] int64, the parent node (-1 for a sequence's first token)
    ends: torch.Tensor  # [M] int64, the end of a node's subtree: its descendants are the nodes (i, ends[i])
    index: torch.Tensor  # [N] int64, the node of each row of `flat`

    def blocks(self) -> list[int]:
        """The bounds of its independent subtrees (one per distinct first token), host ints: `cu_seqlens` for
        `CausalLM.forward_hidden(..., attention_mask=...)`."""
        roots = torch.nonzero(self.parents < 0).flatten().tolist()
        return roots + [len(self.parents)]

    def attention_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[M, M] bool: node i attends to node j iff j is i or an ancestor of i (i within j's pre-order subtree)."""
        i = torch.arange(len(self.ends), device=device)
        j, ends = i[None, :], self.ends.to(device)[None, :]
        return (j <= i[:, None]) & (i[:, None] < ends)


def tree(p: Pack) -> TreePack:
    """`p`'s sequences as a trie of their input tokens (see `TreePack`); exact, whatever they share (nothing: as
    many nodes as rows)."""
    children: list[dict[int, int]] = [{}]  # node 0 is a virtual root; trie node k is children[k + 1]
    tokens: list[int] = []
    order: list[int] = []  # trie node of each flat row, in insertion order
    bounds = p.cu_seqlens.tolist()
    ids = p.input_ids.tolist()
    for a, b in zip(bounds, bounds[1:]):
        node = 0
        for t in ids[a:b]:
            nxt = children[node].get(t)
            if nxt is None:
                nxt = len(children)
                children[node][t] = nxt
                children.append({})
                tokens.append(t)
            node = nxt
            order.append(node - 1)
    # Pre-order renumbering, so that each subtree is one contiguous range (the attention mask's test).
    pre = [0] * len(tokens)
    new_tokens, depths, parents, ends = [], [], [], [0] * len(tokens)
    stack = [(child, -1, 0) for child in reversed(list(children[0].values()))]
    open_: list[int] = []  # the new numbers of the nodes on the current path, to close their subtrees
    while stack:
        node, parent, depth = stack.pop()
        while len(open_) > depth:
            ends[open_.pop()] = len(new_tokens)
        k = len(new_tokens)
        pre[node - 1] = k
        new_tokens.append(tokens[node - 1])
        depths.append(depth)
        parents.append(parent)
        open_.append(k)
        stack.extend((child, k, depth + 1) for child in reversed(list(children[node].values())))
    while open_:
        ends[open_.pop()] = len(new_tokens)
    return TreePack(flat=p, input_ids=torch.tensor(new_tokens, dtype=torch.int64),
                    position_ids=torch.tensor(depths, dtype=torch.int64),
                    parents=torch.tensor(parents, dtype=torch.int64), ends=torch.tensor(ends, dtype=torch.int64),
                    index=torch.tensor([pre[n] for n in order], dtype=torch.int64))
