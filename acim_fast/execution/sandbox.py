"""Run untrusted Python cells, written by a model under RL, in a hardened pool of forked processes.

`Sandbox` is the trainer's side of the pipes to one server process (`sandbox_server`, a fresh interpreter with a
scrubbed environment) that forks a confined process per cell. Nothing a cell does makes it raise.
It does not bound the memory of a cell's processes together (each has `memory_bytes`; a memory cgroup would), isolates
less in the fallbacks (see `Isolation`), and does not survive a `fork()` of the trainer: create it where it is used.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import json
import os
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Iterable, Sequence

from acim_fast.common.fields import Choice
from acim_fast.common.worker import boot_argv, recv_frame, write_frame
from acim_fast.execution import sandbox_server
from acim_fast.execution.sandbox_server import SandboxOptions, remove_tree

__all__ = ["STATUSES", "CellStatus", "Isolation", "Result", "Sandbox", "SandboxOptions", "next_history"]


class CellStatus(Choice):
    """How a cell ended: the five outcomes the sandbox reports, and LIMIT, a cell the rollout loop did not run (its
    code-call cap was reached)."""

    OK = "ok"
    ERROR = "error"  # the cell raised (the model's own mistake)
    TIMEOUT = "timeout"  # wall-clock or CPU time ran out
    MEMORY = "memory"  # the address-space limit was hit
    KILLED = "killed"  # stopped by a signal, or the sandbox could not run it
    LIMIT = "limit"


STATUSES = tuple(s for s in CellStatus if s is not CellStatus.LIMIT)  # what a sandbox run can return

_START_TIMEOUT_S = 120.0  # preloading heavy modules (torch) can take a while on a loaded machine
# The server's whole environment, inherited by every cell: nothing of the trainer's leaks through.
_SERVER_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",  # str hashes, hence set order, must replay identically after a server restart
    "PYTHONDONTWRITEBYTECODE": "1",
    # BLAS thread pools would count against RLIMIT_NPROC and the address-space limit of every cell.
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}
# The server's module name, hence in its command line (and that of every process it forks).
_SERVER_MODULE = "_acim_sandbox_server"


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    """What one cell did. `error` is the last traceback line (or why it was stopped); "" when ok."""

    status: CellStatus  # one of STATUSES
    # stdout and stderr interleaved, read as they come and only head + tail kept: a 100 MB print costs nothing
    output: str
    error: str
    duration_s: float  # from fork to the end of the cell's last process

    @property
    def ok(self) -> bool:
        return self.status == CellStatus.OK


@dataclasses.dataclass(frozen=True, slots=True)
class Isolation:
    """Which isolation a sandbox server got from this kernel, strongest first for each field.

    network: "netns" (the server unshares a network namespace whose loopback is down) or "audit-hook" (an audit
    hook refuses non-unix sockets, name lookups and starting programs; best effort: ctypes can open sockets).
    processes: "pidns" (each cell is pid 2 of a pid, mount and IPC namespace of its own, with a fresh /proc and a
    tmpfs behind /tmp, /var/tmp and /dev/shm; when the cell ends its init is killed, and the kernel kills every
    process left, setsid'ed ones included) or "subreaper" (the cell's process group is killed, then every orphan
    re-parented to the server; cells share the host's /tmp while they run, what a slot's uid leaves at its top
    level is removed afterwards, and they see the host's processes).
    users: "per-slot-uid" (cells run as `uid_base + slot`, so RLIMIT_NPROC applies, which it does not to root,
    and a cell can signal neither the server nor another slot) or "shared" (a non-root trainer that set
    `allow_shared_uid`: cells keep its uid, RLIMIT_NPROC is left alone since it would count all of that user's
    processes, and a cell can signal the trainer and read the environment of that user's other processes).
    If the cell uids cannot read the interpreter (pyenv under /root), the server shows them only its directories
    through a mount namespace; if it cannot, it refuses to start.
    """

    network: str
    processes: str
    users: str


def next_history(history: Sequence[str], code: str, result: Result) -> tuple[str, ...]:
    """The history a trajectory's next cell replays: a failed cell's definitions are not kept.

    A cell first replays its history with output suppressed (as Qwen2.5-Math's and rStar2's executors do), within
    its own timeout. Replay is deterministic (`random` is seeded, PYTHONHASHSEED=0) except for what depends on
    time, on numpy's global RNG when numpy is not preloaded, or on files outside the working directory. Histories
    are tuples, so forked trajectories keep independent ones."""
    return (*history, code) if result.ok else tuple(history)


class Sandbox:
    """A pool of hardened Python executors behind one forking server process. Thread-safe.

    `submit(code, history=()) -> Future[Result]`, `run(code, history=()) -> Result`,
    `run_batch([(code, history), ...]) -> list[Result]`, `await arun(code, history=())`; `close()` (or use
    it as a context manager) kills running cells. `isolation` says what the kernel granted.

    Each cell is a fork of the server (~1 ms to start; it cannot touch the state of the next cell or of the pool)
    with CPU-time, address-space, process-count and file-size limits, a wall-clock timeout, stdin on /dev/null,
    a private working directory removed afterwards, no network and, when the trainer is root, an unprivileged
    uid of its own slot; never root. Up to `concurrency` cells run at once, the rest queue in the server, and
    results come back as cells end. A cell running longer than `demote_after_s` is reniced to 19 (not one that
    calls setsid: its own autogroup, where nice does not weigh), so short cells keep the CPU while a few loops
    run out their timeout. If the server dies, in-flight cells come back `killed` and the next call starts a
    new server.
    """

    def __init__(self, options: SandboxOptions | None = None) -> None:
        if options is None:
            options = SandboxOptions()
        if not isinstance(options, SandboxOptions):
            raise ValueError(f"options: expected SandboxOptions, got {type(options).__name__}")
        self.options = options
        self._server_options = options.with_uid_base()
        self._ids = itertools.count()
        self._lock = threading.Lock()  # serialises submits and server restarts
        self._closed = False
        # The workroot holds the cells' directories in the subreaper fallback; the trainer owns it so that
        # it goes away even if the server is killed.
        self._workroot = tempfile.mkdtemp(prefix="acim-sandbox-")
        os.chmod(self._workroot, 0o711)  # cells may reach their own directory, not list the others
        try:
            # Shared with the finalizer; swapped on restart.
            self._client = [_Client(self._server_options, self._workroot)]
        except BaseException:
            remove_tree(self._workroot)
            raise
        self._finalizer = weakref.finalize(self, _close_clients, self._client, self._workroot)

    @property
    def isolation(self) -> Isolation:
        return self._client[0].isolation

    def submit(self, code: str, history: Sequence[str] = ()) -> concurrent.futures.Future[Result]:
        """Queue one cell after replaying `history`; the Future never raises for anything the cell does."""
        if not isinstance(code, str):
            raise ValueError(f"code: expected str, got {type(code).__name__}")
        if isinstance(history, str) or not isinstance(history, Sequence):
            raise ValueError(f"history: expected a sequence of str, got {type(history).__name__}")
        for i, source in enumerate(history):
            if not isinstance(source, str):
                raise ValueError(f"history[{i}]: expected str, got {type(source).__name__}")
        future: concurrent.futures.Future[Result] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # a started cell cannot be cancelled
        job = {"id": next(self._ids), "code": code, "history": list(history)}
        with self._lock:
            if self._closed:
                raise RuntimeError("Sandbox is closed")
            if not self._client[0].send(job, future):
                self._client[0].close()
                self._client[0] = _Client(self._server_options, self._workroot)
                if not self._client[0].send(job, future):
                    raise RuntimeError("sandbox server died right after starting (see its stderr)")
        return future

    def run(self, code: str, history: Sequence[str] = ()) -> Result:
        return self.submit(code, history).result()

    def run_batch(self, cells: Iterable[tuple[str, Sequence[str]]]) -> list[Result]:
        """Run (code, history) pairs in parallel, up to `concurrency` at a time; results in input order."""
        futures = [self.submit(code, history) for code, history in cells]
        return [f.result() for f in futures]

    async def arun(self, code: str, history: Sequence[str] = ()) -> Result:
        return await asyncio.wrap_future(self.submit(code, history))

    def close(self) -> None:
        """Kill running cells, stop the server, remove the working directories. Idempotent."""
        with self._lock:
            self._closed = True
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_clients(clients: list[_Client], workroot: str) -> None:
    for client in clients:
        client.close()
    remove_tree(workroot)  # what a server that died could not clean up


# ----------------------------------------------------------------------------------------------------------
# The client: one server process and the thread that reads its results.


class _Client:
    """Starts a server, sends it jobs, resolves the jobs' Futures from a reader thread."""

    def __init__(self, options: SandboxOptions, workroot: str) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        config = json.dumps(dataclasses.asdict(options))
        fds = (str(cmd_r), str(res_w))
        # -s: not even the user's site-packages; the server imports nothing of the trainer's.
        argv = boot_argv(_SERVER_MODULE, sandbox_server.__file__, "serve", *fds, workroot, config, flags=("-s",))
        try:
            self._proc = subprocess.Popen(
                argv, env=_SERVER_ENV, cwd=workroot, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                pass_fds=(cmd_r, res_w), start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(cmd_r)
            os.close(res_w)
        self._pending: dict[int, concurrent.futures.Future[Result]] = {}
        self._pending_lock = threading.Lock()  # never held while writing: the reader must always progress
        self._write_lock = threading.Lock()
        self._dead = False
        self._closing = False
        hello = recv_frame(self._res_r, timeout=_START_TIMEOUT_S)
        if hello is None or "error" in hello:
            self._proc.kill()
            self._proc.wait()
            os.close(self._cmd_w)
            os.close(self._res_r)
            if hello is None:
                raise RuntimeError(f"sandbox server failed to start (exit code {self._proc.returncode})")
            raise (ValueError if hello["config"] else RuntimeError)(hello["error"])
        self.isolation = Isolation(**hello["isolation"])
        self._reader = threading.Thread(target=self._read_results, name="sandbox-results", daemon=True)
        self._reader.start()

    def send(self, job: dict, future: concurrent.futures.Future[Result]) -> bool:
        """Hand a job to the server; False if the server is gone (then the future is untouched)."""
        with self._pending_lock:
            if self._dead:
                return False
            self._pending[job["id"]] = future
        try:
            with self._write_lock:
                if self._closing:
                    raise BrokenPipeError
                write_frame(self._cmd_w, job)
        except OSError:
            with self._pending_lock:
                self._pending.pop(job["id"], None)
            return False
        return True

    def _read_results(self) -> None:
        while (msg := recv_frame(self._res_r)) is not None:
            with self._pending_lock:
                future = self._pending.pop(msg["id"], None)
            if future is not None:
                future.set_result(Result(CellStatus(msg["status"]), msg["output"], msg["error"], msg["duration"]))
        os.close(self._res_r)
        with self._pending_lock:
            self._dead = True
            orphans = list(self._pending.values())
            self._pending.clear()
        why = "sandbox closed" if self._closing else "sandbox server exited"
        for future in orphans:
            future.set_result(Result(CellStatus.KILLED, "", why, 0.0))

    def close(self) -> None:
        """Idempotent. EOF on the command pipe makes the server kill its cells and exit."""
        with self._write_lock:
            if self._closing:
                return
            self._closing = True
            os.close(self._cmd_w)
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._reader.join()
