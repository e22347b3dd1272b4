"""Worker processes started by file path, and the frames (a 4-byte length, then JSON) they talk in.

`boot_argv` starts a fresh interpreter that loads this file by path as `_acim_worker`, then the worker's own file
by path, and calls its entry point; the boot imports nothing of `acim_fast` or its dependencies. A worker module gets
the frame functions with `from _acim_worker import ...`, falling back to `acim_fast.common.worker` when the package
imports it normally (the trainer's side). Standard library only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import selectors
import struct
import sys
from collections.abc import Sequence
from types import ModuleType

_HEADER = struct.Struct("<I")  # the length of the JSON body that follows
# Runs as `python [flags] -c BOOT this_file name path entry *args`: loads this file, which loads the worker.
_BOOT = (
    "import importlib.util as u, sys; s = u.spec_from_file_location('_acim_worker', sys.argv[1]); "
    "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m); m._boot(*sys.argv[2:])"
)


def boot_argv(name: str, path: str, entry: str, *args: str, flags: Sequence[str] = ()) -> list[str]:
    """The command line of a process that loads the file `path` as module `name` and calls `entry(*args)`.
    `name` shows in the command line (`ps`, /proc), so make it one a test or a human can look for."""
    worker = os.path.abspath(__file__)
    return [sys.executable, *flags, "-c", _BOOT, worker, name, os.path.abspath(path), entry, *args]


def _boot(name: str, path: str, entry: str, *args: str) -> None:
    getattr(load_by_path(name, path), entry)(*args)


def load_by_path(name: str, path: str) -> ModuleType:
    """Execute the file `path` as module `name`, registered in sys.modules first (dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def write_frame(fd: int, obj: object) -> None:
    """Write `obj` as one frame to the file descriptor `fd` (blocking); OSError if the reader is gone."""
    data = json.dumps(obj).encode()
    view = memoryview(_HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int) -> bytes | None:
    parts, left = [], n
    while left:
        part = os.read(fd, left)
        if not part:
            return None
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def recv_frame(fd: int, timeout: float | None = None) -> object | None:
    """One frame from a blocking pipe; None on EOF (or if nothing arrives within `timeout`)."""
    if timeout is not None:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            if not sel.select(timeout):
                return None
    header = _read_exact(fd, _HEADER.size)
    body = header and _read_exact(fd, _HEADER.unpack(header)[0])
    return None if body is None else json.loads(body)


class FrameDecoder:
    """Frames from a non-blocking pipe: feed it whatever one read returned, get the frames now complete;
    the bytes of a partial frame wait in the buffer for the next read."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list:
        self._buffer += data
        frames = []
        while len(self._buffer) >= _HEADER.size:
            end = _HEADER.size + _HEADER.unpack_from(self._buffer)[0]
            if len(self._buffer) < end:
                break
            frames.append(json.loads(self._buffer[_HEADER.size : end]))
            del self._buffer[:end]
        return frames
