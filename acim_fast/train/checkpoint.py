"""Crash-safe checkpoints of a run: one directory per iteration, complete or absent.

`save` writes `checkpoints/iter_NNNN/`: the HF model (rank 0's full copy) and tokenizer, `trainer/` (optimiser,
schedule, step count, fp32 masters, through `torch.distributed.checkpoint`: each rank writes its shard, and another
world size reshards on load) and extra files (the evaluation report). All goes to a temporary sibling directory,
each file flushed, then rank 0 renames it into place and syncs the parent: after a SIGKILL at any moment a reader
sees the whole checkpoint or none. `latest` finds the newest complete one, `clean` removes temporary ones,
`load_trainer_state` loads `trainer/` into a freshly built trainer's state, `prune_trainer_states` drops `trainer/`
(most of a checkpoint's size) from all but the newest `keep`. Several ranks need a filesystem they all see.

It does not remove whole checkpoints: every iteration's model and evaluation report stay.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Collection, Mapping

import torch.distributed.checkpoint as dcp

from acim_fast.execution.rollout_model import RolloutModel
from acim_fast.train.dist import Dist

_NAME = re.compile(r"^iter_(\d{4,})$")
_TMP_PREFIX = ".tmp-"
TRAINER_DIR = "trainer"  # the trainer state (optimiser, schedule), in torch.distributed.checkpoint format


def path_of(run_dir: str | os.PathLike, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"iter_{iteration:04d}"


def save(run_dir: str | os.PathLike, iteration: int, policy: RolloutModel, trainer_state: dict[str, Any],
         files: Mapping[str, str] | None = None, *, dist: Dist | None = None) -> Path:
    """Write the checkpoint of `iteration` atomically (see the module docstring); returns its path. Collective when
    `dist` is given: every rank writes its shard of `trainer_state`, rank 0 the rest (its `policy` holds the full
    weights). An existing checkpoint of that iteration is replaced only once the new one is complete."""
    main = dist is None or dist.is_main
    final = path_of(run_dir, iteration)
    tmp = final.parent / f"{_TMP_PREFIX}{final.name}"
    if main:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    _barrier(dist)
    with _single_process_ok():
        dcp.save(trainer_state, checkpoint_id=tmp / TRAINER_DIR)  # each rank its shard; no process group: all
    _barrier(dist)
    if main:
        policy.model.save_pretrained(tmp)
        if policy.tokenizer is not None:
            policy.tokenizer.save_pretrained(str(tmp))
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for f in tmp.rglob("*"):
            _fsync(f)
        _fsync(tmp / TRAINER_DIR)
        _fsync(tmp)
        if final.exists():  # a rerun of an iteration whose checkpoint a crash left behind: swap it out
            old = final.parent / f"{_TMP_PREFIX}old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync(final.parent)
    _barrier(dist)
    return final


def load_trainer_state(checkpoint: str | os.PathLike, template: dict[str, Any],
                       optional: Collection[str] = ()) -> dict[str, Any]:
    """The trainer state saved with `checkpoint`, loaded into `template` (the state of a freshly built trainer, which
    gives the shapes and, with FSDP, the sharding of this world size: a run may resume on another). The `optional`
    entries of `template` are left out when the checkpoint has none of them (a trainer that saves more than the one
    that wrote it); entries the checkpoint has and `template` lacks are not read."""
    path = Path(checkpoint) / TRAINER_DIR
    if not (path / ".metadata").is_file():
        raise ValueError(f"{checkpoint}: no {TRAINER_DIR}/: not a checkpoint written by acim_fast.run")
    saved = {key.split(".", 1)[0] for key in dcp.FileSystemReader(path).read_metadata().state_dict_metadata}
    template = {k: v for k, v in template.items() if k in saved or k not in optional}
    with _single_process_ok():
        dcp.load(template, checkpoint_id=path)
    return template


def prune_trainer_states(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Remove the `trainer/` of every complete checkpoint but the newest `keep` (>= 1); returns what was removed.
    A crash midway leaves an older checkpoint with part of a trainer state that nothing reads: resuming loads the
    newest, which this never touches."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    removed = [p / TRAINER_DIR for _, p in _complete(run_dir)[:-keep] if (p / TRAINER_DIR).is_dir()]
    for path in removed:
        shutil.rmtree(path)
    return removed


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint of the highest iteration, or None."""
    found = _complete(run_dir)
    return found[-1][1] if found else None


def _complete(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(iteration, path) of every complete checkpoint, oldest first (temporary directories are not complete)."""
    root = Path(run_dir) / "checkpoints"
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()) \
        if root.is_dir() else []


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


@contextlib.contextmanager
def _single_process_ok():
    """Without a process group torch.distributed.checkpoint warns that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier(dist: Dist | None) -> None:
    if dist is not None:
        dist.barrier()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
