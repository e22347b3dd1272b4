"""Crash-safe writes: a file is replaced whole or not at all, so a reader (or a resumed run) never sees half of it.

It writes to a temporary file in the target's folder (same filesystem) and renames it into place, with the
permissions a plainly created file would get (mkstemp's are 0600, which would hide checkpoints from other users).
It does not fsync (a power cut may lose the newest file, never corrupt the old one) or write folders.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it back at once (import time, one thread)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def atomic_write(target: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call `write(temporary_path)`, then rename the temporary file onto `target`; on any error remove it."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target
