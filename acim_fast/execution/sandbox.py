"""Run untrusted Python cells, written by a model under RL, in a hardened pool of forked processes.

`Sandbox` is the trainer's side of the pipes to one server process (`sandbox_server`, a fresh interpreter with a
scrubbed environment) that forks a confined process per cell. Nothing a cell does makes it raise.
It does not bound the memory of a cell's processes together (each has `memory_bytes`; a memory cgroup would), isolates
far less in the opt-in "weak" mode (see `Isolation`), and does not survive a `fork()` of the trainer: create it where
it is used.
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

from acim_fast.common.fields import Choice, option
from acim_fast.common.worker import boot_argv, recv_frame, write_frame
from acim_fast.execution import sandbox_server
from acim_fast.execution.sandbox_server import ISOLATIONS, SandboxOptions, remove_tree

__all__ = ["ISOLATIONS", "STATUSES", "CellStatus", "Isolation", "Result", "Sandbox", "SandboxConfig", "SandboxFailed",
           "SandboxOptions", "next_history"]


class CellStatus(Choice):
    """How a cell ended: the six outcomes the sandbox reports, and LIMIT, a cell the rollout loop did not run (its
    code-call cap was reached). FAILED is the sandbox's own failure, never the model's: telemetry counts it apart."""

    OK = "ok"
    ERROR = "error"  # the cell raised (the model's own mistake)
    TIMEOUT = "timeout"  # wall-clock or CPU time ran out
    MEMORY = "memory"  # the address-space limit was hit
    KILLED = "killed"  # stopped by a signal (a segfault, the hard CPU limit)
    FAILED = "failed"  # the sandbox could not run it: its server died, a fork or the cell's setup failed
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
    """What isolation a sandbox server set up (`SandboxOptions.isolation` asks for one of the two modes).

    mode "namespaces": network "netns" (each cell has a network namespace of its own, no interface up: no
    network, and no abstract unix socket shared with another cell); processes "pidns" (each cell is pid 2 of pid,
    mount and IPC namespaces of its own; when it ends its init is killed, and the kernel kills every process left,
    setsid'ed daemons included); filesystem "private-root" (the cell's root is a read-only tmpfs holding the
    system's and the interpreter's directories read-only, a /dev of five devices, its own /proc, and one fresh
    tmpfs behind /tmp, /var/tmp and /dev/shm: no host directory it can write, /run/lock and the trainer's
    included, so nothing it writes outlives it or reaches another cell); users "per-slot-uid" (root: cells run as
    `uid_base + slot`) or "userns" (not root: each cell is in a user namespace of its own with no capabilities,
    keeping your uid outside it; RLIMIT_NPROC counts its own processes, and the namespaces keep it from
    signalling or reading anything of yours).

    mode "weak" (opt-in): network "audit-hook" (an audit hook refuses non-unix sockets, name lookups and starting
    programs; best effort: ctypes can open sockets); processes "subreaper" (the cell's process group is killed,
    then every orphan re-parented to the server; cells see the host's processes); filesystem "host" (cells share
    the host's /tmp while they run; what a slot's uid leaves at its top level is removed afterwards); users
    "per-slot-uid" (root) or "shared" (cells keep your uid: RLIMIT_NPROC is left alone, and a cell can signal
    the trainer and read the environment of your other processes). As root the server shows the slot uids only
    the interpreter's directories through a mount namespace if they cannot read them (pyenv under /root), or
    refuses to start.
    """

    mode: str
    network: str
    processes: str
    users: str
    filesystem: str

    def __str__(self) -> str:
        return (f"{self.mode} (network {self.network}, processes {self.processes}, users {self.users}, "
                f"filesystem {self.filesystem})")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SandboxConfig:
    """The trainer's sandbox settings (`--sandbox.*`); each phase's config holds its own cell timeout."""

    isolation: str = option("namespaces", "namespaces: every cell in pid, mount, IPC and network (without root also "
                            "user) namespaces of its own, with a private read-only root; refuses to start where the "
                            "kernel forbids them | weak: opt-in, no namespaces; without root, cells run as your uid")
    max_failed_share: float = option(0.1, "stop the run when more than this share of a phase's cells failed in the "
                                     "sandbox itself (its server died, a fork or a cell's setup failed; not the "
                                     "model's errors, timeouts or kills)")

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"SandboxConfig.isolation must be one of {ISOLATIONS}, got {self.isolation!r}")
        share = self.max_failed_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
            raise ValueError(f"SandboxConfig.max_failed_share must be in [0, 1], got {share!r}")

    def options(self, timeout_s: float) -> SandboxOptions:
        return SandboxOptions(timeout_s=timeout_s, isolation=self.isolation)

    def outcomes(self, phase: str, counts: dict[str, int]) -> dict[str, int]:
        """`counts` (cells by status) as the metrics `<phase>/cells_<status>`; raises SandboxFailed when the
        sandbox's own failures are more than `max_failed_share` of them: a silently broken sandbox would turn tool
        RL into plain RL."""
        total, failed = sum(counts.values()), counts[str(CellStatus.FAILED)]
        if total and failed / total > self.max_failed_share:
            raise SandboxFailed(f"{phase}: {failed} of {total} cells failed in the sandbox itself, more than "
                                f"--sandbox.max_failed_share {self.max_failed_share:g} (outcomes {counts}); the "
                                f"sandbox server's stderr above says why")
        return {f"{phase}/cells_{status}": n for status, n in counts.items()}


class SandboxFailed(RuntimeError):
    """The sandbox itself failed too many cells (see `SandboxConfig.outcomes`)."""


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
    it as a context manager) kills running cells. `isolation` says what was set up (`SandboxOptions.isolation`
    asks; a server that cannot set up "namespaces" refuses to start, naming the kernel setting and the opt-in).

    Each cell is a fork of the server (~1 ms to start; it cannot touch the state of the next cell or of the pool)
    with CPU-time, address-space, process-count and file-size limits, a wall-clock timeout, stdin on /dev/null,
    a private working directory removed afterwards, no network, no capability and, when the trainer is root, an
    unprivileged uid of its own slot; never root. Up to `concurrency` cells run at once, the rest queue in the
    server, and results come back as cells end. A cell running longer than `demote_after_s` is reniced to 19 (not
    one that calls setsid: its own autogroup, where nice does not weigh), so short cells keep the CPU while a few
    loops run out their timeout. If the server dies, in-flight cells come back `failed` and the next call starts a
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
        self._tally = dict.fromkeys(STATUSES, 0)  # results handed out, by status (see `tally`)
        self._tally_lock = threading.Lock()
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

    def tally(self) -> dict[str, int]:
        """How many cells ended with each status (all of `STATUSES`) since this Sandbox was created, server restarts
        included: the tool channel's telemetry (a run compares two tallies)."""
        with self._tally_lock:
            return {str(status): n for status, n in self._tally.items()}

    def _count(self, future: concurrent.futures.Future[Result]) -> None:
        with self._tally_lock:
            self._tally[future.result().status] += 1

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
        future.add_done_callback(self._count)
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
            future.set_result(Result(CellStatus.FAILED, "", why, 0.0))

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
