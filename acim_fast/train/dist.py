"""Data-parallel training with FSDP2 under torchrun: process group, sharding, collectives and weight gathering.

`from_env()` joins the group torchrun set up (gloo on CPU, nccl on `cuda:LOCAL_RANK`), or gives None; `world_of_one`
is a group of this process alone, so a plain process training a bf16 model takes the same path and gets fp32
masters. `shard` applies `fully_shard` per decoder block, then at the root, and registers `forward_hidden` as a
forward method; the root stays gathered from forward to backward (FSDP2's default), which lets the fused loss read
`lm_head_weight` after `forward_hidden`. With a lower `compute_dtype` (bf16), compute is in it; gradient reduction,
master shards and updates are fp32. `Dist` holds rank, world, device, mesh and the few collectives the trainer
uses (float sums, object gathers, `share` of a list and gathering back, barrier). `copy_full_weights` fills a
rank's sampler one gathered tensor at a time, never a full unsharded copy.

It does not launch processes, choose the world size, or do tensor or pipeline parallelism.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from acim_fast.engine.model import CausalLM


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (fp64 on the CPU with gloo, on the device with nccl)."""
        return self.sum_tensor(torch.tensor(values, dtype=torch.float64)).tolist()

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sums over ranks of `t`, reduced where the backend works (the device with nccl, the CPU with
        gloo) and returned on `t`'s device: no host sync on a GPU."""
        work = t.to(self.device if self.device.type == "cuda" else "cpu", copy=True)
        torch_dist.all_reduce(work)
        return work.to(t.device)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank (pickled; for results, not tensors in bulk)."""
        out: list[Any] = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def share(self, whole: Sequence[Any]) -> list[Any]:
        """This rank's share of `whole`: every world-th item from its rank on (disjoint, covering, sizes within one
        of each other). The one sharding rule of problems, samples and evaluation rows; `gather_shares` inverts it."""
        return list(whole[self.rank::self.world])

    def gather_shares(self, share: list[Any]) -> list[Any]:
        """The whole list, on every rank, from each rank's share `whole[rank::world]` (pickled, as `gather`)."""
        parts = self.gather(share)
        whole: list[Any] = [None] * sum(len(part) for part in parts)
        for r, part in enumerate(parts):
            whole[r::self.world] = part
        return whole

    def barrier(self) -> None:
        torch_dist.barrier()

    def close(self) -> None:
        """Wait for every rank, then leave the process group. A rank that exits with the group alive can abort in
        the backend's destructor while another still works (seen with gloo: "terminate called without an active
        exception"), so every rank calls this before it exits. An in-process vLLM engine destroys the group itself
        when it shuts down (after the ranks' last collective): then there is nothing left to do."""
        if torch_dist.is_initialized():
            torch_dist.barrier()
            torch_dist.destroy_process_group()


@dataclass(frozen=True)
class Ranks:
    """The processes that work together: a torchrun world (or a world of one), or none (`dist` None: one plain
    process). The trainer and the evaluator ask them the same questions in every case, so neither branches on it;
    with ranks, each works on its `share` of the problems and the results are gathered back."""

    dist: Dist | None

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    @property
    def world(self) -> int:
        return 1 if self.dist is None else self.dist.world

    def device(self, default: str) -> str:
        return default if self.dist is None else str(self.dist.device)

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (the others pass None)."""
        return value if self.dist is None else self.dist.gather(value)[0]

    def share(self, whole: Sequence[Any]) -> list[Any]:
        return list(whole) if self.dist is None else self.dist.share(whole)

    def gather_shares(self, part: list[Any]) -> list[Any]:
        """Every rank's `share` results, in the order of the whole list."""
        return part if self.dist is None else self.dist.gather_shares(part)

    def merge(self, part: Any, combine: Callable[[list[Any]], Any]) -> Any:
        """`combine` of every rank's `part`; one process keeps its part as it is."""
        return part if self.dist is None else combine(self.dist.gather(part))

    def close(self) -> None:
        """Leave the process group (after a barrier), if there is one."""
        if self.dist is not None:
            self.dist.close()


def from_env() -> Dist | None:
    """The process group of a torchrun launch (RANK and WORLD_SIZE set, even to a world of 1: that runs the sharded
    path on one device), or None for a plain process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend)
    return Dist(rank=rank, world=world, device=device, mesh=init_device_mesh(device.type, (world,)))


@contextlib.contextmanager
def world_of_one(device: torch.device) -> Iterator[Dist]:
    """A process group of this process alone (no torchrun), left when the block ends; see the module docstring."""
    if torch_dist.is_initialized():
        raise RuntimeError("a process group already exists: under torchrun use from_env()")
    if device.type == "cuda":  # nccl and the device mesh take the current device: make it this one
        torch.cuda.set_device(device.index if device.index is not None else torch.cuda.current_device())
    torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=torch_dist.HashStore(),
                                  rank=0, world_size=1)
    try:
        yield Dist(rank=0, world=1, device=device, mesh=init_device_mesh(device.type, (1,)))
    finally:
        if torch_dist.is_initialized():  # an in-process vLLM engine destroys it when it shuts down
            torch_dist.destroy_process_group()


def shard(model: CausalLM, dist: Dist, *, compute_dtype: torch.dtype | None = None) -> CausalLM:
    """Shard `model` in place with FSDP2 (see the module docstring); returns it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mixed = compute_dtype is not None and compute_dtype != model.dtype
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if mixed \
        else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=dist.mesh, mp_policy=policy)
    fully_shard(model, mesh=dist.mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "forward_hidden")
    return model


@torch.no_grad()
def copy_full_weights(sharded: torch.nn.Module, into: torch.nn.Module) -> None:
    """Copy `sharded`'s parameters (FSDP2's DTensor shards, or plain tensors) whole into `into`'s parameters of the same
    names, in place and in `into`'s dtype. Collective: every rank calls it (each tensor is all-gathered in turn)."""
    target = dict(into.named_parameters())
    source = dict(sharded.named_parameters())
    if set(source) != set(target):
        raise ValueError(f"parameter names differ: {sorted(set(source) ^ set(target))[:5]}")
    for name, param in source.items():  # the same order on every rank: the gathers pair up
        full = param.full_tensor() if isinstance(param, DTensor) else param
        target[name].copy_(full)
        del full
