"""Where a run's metrics go: RUN/metrics.jsonl always, and the `--log` backends beside it (TensorBoard, wandb).

`MetricsLog(run_dir, backends, first=..., config=...)` is the one writer: `write(record)` appends the record to
metrics.jsonl (flushed to disk) and hands its numeric, finite values to each backend at step = the record's
"iteration"; `close()` closes the backends. The trainer builds it on rank 0 only. `require(backends)` imports the
backends' packages up front, so a missing one fails at startup with the pip extra to install.

- `tensorboard`: `torch.utils.tensorboard.SummaryWriter` writing event files into the run directory itself (so
  `tensorboard --logdir runs` names each run by its directory), opened with `purge_step=first`: on resume, the events
  of the iteration that was redone (logged before the process died, never checkpointed) are hidden, as
  metrics.jsonl drops its line, so every step is read once.
- `wandb`: `wandb.init(dir=run_dir, config=the run's Config, id=..., resume="allow")`; the run id is stored in
  RUN/wandb_id, so a resumed run continues the same wandb run. Mode: `WANDB_MODE` when set; otherwise "online" only
  with an API key (`WANDB_API_KEY` or a netrc entry for the wandb host) and the host reachable (TCP, 3 s), else
  "offline" (the run lands in RUN/wandb/offline-run-*; `wandb sync` uploads it). wandb ignores a step it has
  already seen, so an iteration redone after a resume keeps the first attempt's point there.

Strings (e.g. "algo", "sandbox/isolation") and non-finite values stay in metrics.jsonl only. This module reads no
metrics back (that is `report.read_metrics`) and draws nothing.
"""

from __future__ import annotations

import importlib
import json
import math
import netrc
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Protocol, Sequence
from urllib.parse import urlparse

from acim_fast.report import METRICS_FILE

BACKENDS = ("tensorboard", "wandb")  # each the name of the package it imports and of the pip extra installing it
WANDB_ID_FILE = "wandb_id"


def parse_backends(value: object, name: str = "Config.log") -> tuple[str, ...]:
    """`value` (a comma-separated string or a sequence of names) as a tuple of known backends without repeats;
    ValueError naming the field `name` otherwise."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
        raise ValueError(f"{name} must be a list of backend names from {BACKENDS}, got {value!r}")
    names = tuple(dict.fromkeys(x.strip() for x in items if x.strip()))
    unknown = [x for x in names if x not in BACKENDS]
    if unknown:
        raise ValueError(f"{name}: unknown logging backend(s) {unknown}; known: {BACKENDS}")
    return names


def require(backends: Sequence[str]) -> None:
    """Import each backend's package; ImportError saying which pip extra installs a missing one."""
    for backend in backends:
        try:
            importlib.import_module(backend)
        except ImportError as e:
            raise ImportError(f"--log {backend} needs the {backend} package: pip install 'acim-fast[{backend}]' "
                              f"(or pip install {backend})") from e


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric, finite values (bools as 0/1), less "iteration" (the step)."""
    return {k: float(v) for k, v in record.items()
            if k != "iteration" and isinstance(v, (int, float)) and math.isfinite(v)}


class _Backend(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class _TensorBoard:
    def __init__(self, run_dir: Path, first: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=first)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # as metrics.jsonl: on disk before the checkpoint that follows

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        id_file = run_dir / WANDB_ID_FILE
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:16], encoding="utf-8")
        self.run = wandb.init(dir=str(run_dir), project=os.environ.get("WANDB_PROJECT", "acim_fast"),
                              name=run_dir.resolve().name, id=id_file.read_text(encoding="utf-8").strip(),
                              resume="allow", mode=wandb_mode(), config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_mode(timeout_s: float = 3.0) -> str | None:
    """None (wandb reads WANDB_MODE itself) when WANDB_MODE is set; else "online" when there is an API key and the
    wandb host answers, "offline" otherwise (see the module docstring)."""
    if os.environ.get("WANDB_MODE"):
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        key = os.environ.get("WANDB_API_KEY") or (netrc.netrc().authenticators(host) or (None, None, None))[2]
    except (OSError, netrc.NetrcParseError):
        key = None
    if not key:
        return "offline"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return "offline"
    return "online"


class MetricsLog:
    """RUN/metrics.jsonl and the backends of one process (rank 0): see the module docstring."""

    def __init__(self, run_dir: str | os.PathLike, backends: Sequence[str] = (), *, first: int = 0,
                 config: dict[str, Any] | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        require(backends)
        self.backends: list[_Backend] = []
        try:
            for backend in backends:
                self.backends.append(_TensorBoard(Path(run_dir), first) if backend == "tensorboard"
                                     else _Wandb(Path(run_dir), config or {}))
        except BaseException:
            self.close()
            raise

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:  # flushed to disk: a checkpoint never lacks its line
            f.write(json.dumps(clean) + "\n")
            f.flush()
            os.fsync(f.fileno())
        values = scalars(record)
        for backend in self.backends:
            backend.log(values, record["iteration"])

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []
