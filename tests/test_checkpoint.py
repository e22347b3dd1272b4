"""acim_fast.train.checkpoint: the trainer state loads into a template with optional entries (here the trainer's own
weights, which a plain fp32 process does not save: a run resumed under torchrun or in bf16 takes them from the export),
and old trainer states are pruned without touching the newest or anything but `trainer/`."""

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from acim_fast.train.checkpoint import TRAINER_DIR, latest, load_trainer_state, prune_trainer_states


def _save(path, state):
    with warnings.catch_warnings():  # no process group: torch.distributed.checkpoint assumes one process
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=path / TRAINER_DIR)


def _template():
    return {"optimizer": {"exp_avg": torch.zeros(4)}, "steps": 0, "model": {"model.w": torch.zeros(2, 2)}}


def test_optional_entries_are_left_out_only_when_the_checkpoint_has_none_of_them(tmp_path):
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    _save(plain, {"optimizer": {"exp_avg": torch.arange(4.0)}, "steps": 3})
    _save(sharded, {"optimizer": {"exp_avg": torch.arange(4.0)}, "steps": 3, "model": {"model.w": torch.eye(2)}})
    with pytest.raises(CheckpointException):  # not optional: a missing entry is an error
        load_trainer_state(plain, _template())
    state = load_trainer_state(plain, _template(), optional=("model",))
    assert set(state) == {"optimizer", "steps"} and state["steps"] == 3
    assert torch.equal(state["optimizer"]["exp_avg"], torch.arange(4.0))
    state = load_trainer_state(sharded, _template(), optional=("model",))
    assert torch.equal(state["model"]["model.w"], torch.eye(2))
    # A template without the entry (a plain fp32 process resuming a sharded run) does not read it.
    assert set(load_trainer_state(sharded, {"steps": 0})) == {"steps"}
    with pytest.raises(ValueError, match="not a checkpoint written by acim_fast.run"):
        load_trainer_state(tmp_path / "nothing", _template())


def test_pruning_keeps_the_newest_trainer_states_and_every_model(tmp_path):
    root = tmp_path / "checkpoints"
    for it in (0, 1, 2, 10):
        (root / f"iter_{it:04d}" / TRAINER_DIR).mkdir(parents=True)
        (root / f"iter_{it:04d}" / "model.safetensors").write_text("weights")
    (root / ".tmp-iter_0011" / TRAINER_DIR).mkdir(parents=True)  # a save in progress: not a checkpoint yet
    removed = prune_trainer_states(tmp_path, 2)
    assert sorted(p.parent.name for p in removed) == ["iter_0000", "iter_0001"]  # 10 is newer than 2
    for it, kept in ((0, False), (1, False), (2, True), (10, True)):
        assert (root / f"iter_{it:04d}" / TRAINER_DIR).is_dir() == kept
        assert (root / f"iter_{it:04d}" / "model.safetensors").is_file()
    assert (root / ".tmp-iter_0011" / TRAINER_DIR).is_dir()
    assert latest(tmp_path) == root / "iter_0010"
    assert prune_trainer_states(tmp_path, 2) == []
    with pytest.raises(ValueError, match="keep must be >= 1"):
        prune_trainer_states(tmp_path, 0)

