"""Crash-safe checkpoints of a run: one directory per iteration, complete or absent.

What it does:
- `save(run_dir, iteration, policy, trainer_state, files)` writes `checkpoints/iter_NNNN/`: the model in Hugging Face
  format (config.json + model.safetensors, `CausalLM.save_pretrained`), the tokenizer files (`save_pretrained` of the
  policy's tokenizer), `trainer.pt` (optimiser, schedule and anything else the trainer needs to continue) and the
  given extra files (e.g. the evaluation report). Everything goes to a temporary sibling directory first, each file is
  flushed to disk, and the directory is renamed into place (then the parent directory is synced): a reader, or a
  resumed run after a SIGKILL at any moment, sees either the whole checkpoint or none of it.
- `latest(run_dir)`: the newest complete checkpoint (temporary directories are ignored); `clean(run_dir)` removes
  the temporary directories a killed run left behind.
- `load_trainer_state(checkpoint)`: `trainer.pt`, loaded on the CPU.

What it does not do: sharded or distributed checkpoints (torch.distributed.checkpoint belongs to the distributed
loop), or pruning old checkpoints (a run keeps every iteration's model; the tiny one is 1.4 MB).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from acim_fast.policy import Policy

_NAME = re.compile(r"^iter_(\d{4,})$")
_TMP_PREFIX = ".tmp-"


def path_of(run_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"iter_{iteration:04d}"


def save(run_dir: str | os.PathLike, iteration: int, policy: Policy, trainer_state: Mapping[str, Any],
         files: Mapping[str, str] | None = None) -> Path:
    """Write the checkpoint of `iteration` atomically (see the module docstring); returns its path. An existing
    checkpoint of that iteration is replaced only once the new one is complete."""
    final = path_of(run_dir, iteration)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    policy.model.save_pretrained(tmp)
    if policy.tokenizer is not None:
        policy.tokenizer.save_pretrained(str(tmp))
    torch.save(dict(trainer_state), tmp / "trainer.pt")
    for name, text in (files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # a rerun of an iteration whose checkpoint a crash left behind: swap it out
        old = final.parent / f"{_TMP_PREFIX}old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(final.parent)
    return final


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint of the highest iteration, or None."""
    root = Path(run_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()] \
        if root.is_dir() else []
    return max(found)[1] if found else None


def iteration_of(checkpoint: str | os.PathLike) -> int:
    m = _NAME.match(Path(checkpoint).name)
    if not m:
        raise ValueError(f"{checkpoint} is not a checkpoint directory (iter_NNNN)")
    return int(m.group(1))


def clean(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary directories of interrupted saves; returns what was removed."""
    root = Path(run_dir) / "checkpoints"
    stale = [p for p in root.iterdir() if p.name.startswith(_TMP_PREFIX)] if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def load_trainer_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint) / "trainer.pt"
    if not path.is_file():
        raise ValueError(f"{checkpoint}: no trainer.pt: not a checkpoint written by acim_fast.run")
    return torch.load(path, map_location="cpu", weights_only=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
