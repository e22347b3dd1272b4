"""atomic_write: the target is replaced whole, or left as it was with no temporary file behind."""

from pathlib import Path

import pytest

from acim_fast.common.atomic import atomic_write


def test_replaces_the_target_whole(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    assert atomic_write(target, lambda tmp: Path(tmp).write_text("new")) == target
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")

    def half_write(tmp: str) -> None:
        Path(tmp).write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_write)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_the_file_gets_the_permissions_of_a_plainly_created_one(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    target = atomic_write(tmp_path / "atomic", lambda tmp: Path(tmp).write_text("y"))
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
