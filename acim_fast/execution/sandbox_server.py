"""The sandbox's server process and the cells it forks (the trainer's side is `acim_fast.execution.sandbox`).

One event loop reads jobs from the trainer, forks one confined process per cell (isolation: see `Isolation` in
`acim_fast.execution.sandbox`), kills cells at their deadline, renices slow ones and sends each result back as the
cell's processes end. It runs loaded by path (`acim_fast.common.worker`), so it imports the standard library only,
never the `acim_fast` package, which that interpreter may not find and which would pull the trainer into every cell.
"""

from __future__ import annotations

import builtins
import ctypes
import dataclasses
import functools
import importlib
import json
import math
import os
import random
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable

try:  # loaded by path in the server process: the package is off limits there
    from _acim_worker import FrameDecoder, write_frame
except ImportError:  # imported by the trainer as part of the package
    from acim_fast.common.worker import FrameDecoder, write_frame

# Linux constants (sched.h, mount.h, prctl.h); Python 3.11's os module has neither unshare nor setns.
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38

_UID_FIRST, _UID_STRIDE, _UID_RANGES = 1_900_000_000, 4096, 2**15  # all below 2**31
_CELL_DIR = "/tmp/cell"  # the working directory inside a cell's own tmpfs (pidns mode)
_TMPFS_INODES = 65536  # tmpfs `size` does not bound inodes, which cost memory too
_READ_CHUNK = 1 << 16


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SandboxOptions:
    """Limits and pool size of a `Sandbox`; every field is validated with a ValueError naming it."""

    timeout_s: float = 10.0  # wall clock per cell, replay of its history included
    cpu_time_s: int | None = None  # RLIMIT_CPU per process; None: ceil(timeout_s) + 1 (bounds busy threads)
    memory_bytes: int = 4 << 30  # RLIMIT_AS per process
    max_processes: int = 64  # RLIMIT_NPROC per cell (threads count); only with per-slot uids
    max_file_bytes: int = 64 << 20  # RLIMIT_FSIZE: the largest file a cell can write
    tmp_bytes: int = 256 << 20  # size of a cell's private tmpfs (/tmp, /var/tmp, /dev/shm) with pidns
    max_output_bytes: int = 8192  # head + tail of the output kept; the rest is replaced by a marker
    # Cells running at once (each holds a slot, i.e. a uid, and up to memory_bytes per process). Size it
    # above (rate of cells that time out) x timeout_s + cores, or looping cells fill every slot.
    concurrency: int = dataclasses.field(default_factory=lambda: 4 * (os.cpu_count() or 1))
    # A cell running (wall clock) longer than this gets nice 19, which it cannot undo: the many short cells
    # keep the CPU while a few slow or looping ones run out their time (shortest first, in effect).
    demote_after_s: float = 0.05
    namespaces: bool = True  # pid/net namespaces when the kernel allows; False forces the fallbacks
    # Cells run as uid_base + slot when root. None: a random range of 4096 uids above systemd's ranges,
    # so that two Sandboxes on one host (which must not share uids) practically never collide.
    uid_base: int | None = None
    # Not root: cells can only keep the trainer's uid, and then kill(-1) kills the trainer. Opt-in only.
    allow_shared_uid: bool = False
    preload: tuple[str, ...] = ()  # modules imported once by the server, so cells do not pay for them

    def __post_init__(self) -> None:
        def number(name: str, minimum: float, kinds: tuple[type, ...] = (int,)) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kinds) or not value >= minimum:
                raise ValueError(f"SandboxOptions.{name}: expected a number >= {minimum}, got {value!r}")

        number("timeout_s", 0.01, (int, float))
        if not math.isfinite(self.timeout_s):
            raise ValueError(f"SandboxOptions.timeout_s: expected a finite number, got {self.timeout_s!r}")
        if self.cpu_time_s is not None:
            number("cpu_time_s", 1)
        number("memory_bytes", 64 << 20)
        number("max_processes", 1)
        number("max_file_bytes", 0)
        number("tmp_bytes", 1 << 20)
        number("max_output_bytes", 16)
        number("concurrency", 1)
        number("demote_after_s", 0, (int, float))
        if self.uid_base is None:
            if self.concurrency > _UID_STRIDE:
                raise ValueError(f"SandboxOptions.concurrency: above {_UID_STRIDE}, set uid_base too")
        else:
            number("uid_base", 1)
            if self.uid_base + self.concurrency > 2**32 - 2:  # (uid_t)-1 and -2 are reserved
                raise ValueError("SandboxOptions.uid_base: uid_base + concurrency must stay below 2**32 - 2")
        for name in ("namespaces", "allow_shared_uid"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"SandboxOptions.{name}: expected a bool, got {getattr(self, name)!r}")
        if not isinstance(self.preload, tuple) or not all(
            isinstance(m, str) and m and all(p.isidentifier() for p in m.split(".")) for m in self.preload
        ):
            raise ValueError(f"SandboxOptions.preload: expected a tuple of module names: {self.preload!r}")

    def with_uid_base(self) -> SandboxOptions:
        """These options with `uid_base` drawn when None: a random range of 4096 uids above systemd's ranges. A
        Sandbox resolves it once, so that a restarted server keeps the same uids."""
        if self.uid_base is not None:
            return self
        first = _UID_FIRST + _UID_STRIDE * random.SystemRandom().randrange(_UID_RANGES)
        return dataclasses.replace(self, uid_base=first)

    @property
    def cpu_limit_s(self) -> int:
        """RLIMIT_CPU in effect: `cpu_time_s`, or one second past the timeout rounded up. The process's CPU clock
        starts at its fork, before the cell's wall clock: at exactly the timeout, one busy thread could hit the CPU
        limit first, and a cell that merely ran too long would be reported as a CPU-limit kill."""
        return self.cpu_time_s if self.cpu_time_s is not None else math.ceil(self.timeout_s) + 1


# ----------------------------------------------------------------------------------------------------------
# Shared with the trainer (the options above, too).


def remove_tree(path: str) -> None:
    """rmtree, which does not follow a cell's symlinks; but it recurses (before Python 3.12), and a cell
    can nest directories thousands deep: then rm, which does not, rather than a RecursionError."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except RecursionError:
        subprocess.run(["rm", "-rf", "--one-file-system", "--", path], check=False)


# ----------------------------------------------------------------------------------------------------------
# The server: one event loop, one fork per cell.


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _sys(name: str, *args: object) -> None:
    if getattr(_libc(), name)(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def _prctl(option: int, value: int) -> None:
    _sys("prctl", option, value, 0, 0, 0)


class _HeadTail:
    """Keeps the first and last bytes of a stream of unbounded length."""

    def __init__(self, limit: int) -> None:
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        if len(self.tail) > self.tail_limit:
            del self.tail[: len(self.tail) - self.tail_limit]

    def text(self) -> str:
        dropped = self.total - len(self.head) - len(self.tail)
        if dropped == 0:
            return (self.head + self.tail).decode("utf-8", "replace")
        marker = f"\n... [{dropped} bytes truncated] ...\n"
        return self.head.decode("utf-8", "replace") + marker + self.tail.decode("utf-8", "replace")


class _Cell:
    """Server-side state of one running cell."""

    def __init__(
        self, job: dict, slot: int, uid: int | None, pid: int, out_fd: int, res_fd: int, opts: SandboxOptions
    ) -> None:
        self.job, self.slot, self.uid, self.pid = job, slot, uid, pid
        self.out_fd, self.res_fd = out_fd, res_fd
        self.output = _HeadTail(opts.max_output_bytes)
        self.report = bytearray()  # the runner's last line; only a bounded tail is kept against flooding
        self.report_limit = 4 * opts.max_output_bytes + 256
        self.started = time.monotonic()
        self.deadline = self.started + opts.timeout_s
        self.demote_at = self.started + opts.demote_after_s
        self.timed_out = False
        self.demoted = False
        self.workdir: str | None = None


def serve(cmd_fd: str, res_fd: str, workroot: str, config: str) -> None:
    """Entry point of the server process."""
    fields = json.loads(config)
    fields["preload"] = tuple(fields["preload"])
    assert fields["uid_base"] is not None, "the trainer resolves uid_base (SandboxOptions.with_uid_base)"
    _Server(SandboxOptions(**fields), int(cmd_fd), int(res_fd), workroot).serve()


class _Server:
    def __init__(self, options: SandboxOptions, cmd_fd: int, res_fd: int, workroot: str) -> None:
        self.opts = options
        self.cmd_fd, self.res_fd, self.workroot = cmd_fd, res_fd, workroot
        self.queue: deque[dict] = deque()
        self.free_slots = list(range(options.concurrency - 1, -1, -1))
        self.cells: dict[int, _Cell] = {}  # by pid of the cell's top process
        self.commands = FrameDecoder()
        self.pidns_fd = -1

    def serve(self) -> None:
        for name in self.opts.preload:
            try:
                importlib.import_module(name)
            except BaseException as exc:
                msg = f"SandboxOptions.preload: cannot import {name!r}: {exc!r}"
                write_frame(self.res_fd, {"error": msg, "config": True})
                return
        sys.stdout.reconfigure(line_buffering=True)  # inherited by cells: partial output survives a kill
        try:
            isolation = self._isolate()
        except _Refused as exc:
            write_frame(self.res_fd, {"error": str(exc), "config": False})
            return
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that the finally below kills the cells
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake select() through the wakeup fd
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.cmd_fd, selectors.EVENT_READ, "cmd")
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")
        try:
            write_frame(self.res_fd, {"isolation": isolation})
            self._loop()
        except BrokenPipeError:
            pass  # the trainer is gone
        finally:
            self._kill_all()

    def _isolate(self) -> dict[str, str]:
        """Pick the strongest isolation this kernel grants, probing each piece in a throwaway child.
        Raises _Refused rather than let a cell run with the server's uid when that uid is root."""
        network = "audit-hook"
        if self.opts.namespaces:
            try:
                _sys("unshare", _CLONE_NEWNET)
                network = "netns"
            except OSError:
                pass
        self.uid_drop = os.geteuid() == 0
        if self.uid_drop:
            paths = _interpreter_paths()
            probe = functools.partial(_check_readable_as, self.opts.uid_base, paths)
            if not _succeeds(_fork(probe)):
                try:
                    _expose(paths)
                except OSError as exc:
                    raise _Refused(_UNREADABLE.format(paths=paths, why=exc)) from None
                if not _succeeds(_fork(probe)):
                    raise _Refused(_UNREADABLE.format(paths=paths, why="still unreadable when exposed"))
        elif not self.opts.allow_shared_uid:
            raise _Refused(
                "the sandbox runs cells as unprivileged uids, which needs root; set "
                "SandboxOptions.allow_shared_uid=True to run them as your own uid (they can then signal "
                "your processes, the trainer included)"
            )
        self.pidns = False
        if self.opts.namespaces:
            try:
                self.pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY)
                probe = functools.partial(_enter_cell_namespaces, self.opts.tmp_bytes)
                self.pidns = _succeeds(self._fork_in_new_pidns(probe))
            except OSError:
                pass
        if not self.pidns:
            _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        self.audit_hook = network == "audit-hook"
        users = "per-slot-uid" if self.uid_drop else "shared"
        return {"network": network, "processes": "pidns" if self.pidns else "subreaper", "users": users}

    def _fork_in_new_pidns(self, child: Callable[[], object]) -> int:
        """`_fork(child)` as pid 1 of a new pid namespace; the server itself stays where it is."""
        _sys("unshare", _CLONE_NEWPID)  # moves only the children forked from now on
        try:
            return _fork(child)
        finally:
            # Later forks must land in the server's own namespace again (also when fork failed).
            _sys("setns", self.pidns_fd, _CLONE_NEWPID)

    def _loop(self) -> None:
        while True:
            events = [c.deadline for c in self.cells.values() if not c.timed_out]
            events += [c.demote_at for c in self.cells.values() if not (c.timed_out or c.demoted)]
            timeout = max(0.0, min(events) - time.monotonic()) if events else None
            for key, _ in self.sel.select(timeout):
                if key.data == "cmd":
                    if not self._read_commands():
                        return
                elif key.data == "wake":
                    while True:
                        try:
                            if not os.read(key.fd, 4096):
                                break
                        except BlockingIOError:
                            break
                else:
                    self._read_cell(*key.data)
            now = time.monotonic()
            for cell in self.cells.values():
                if not cell.timed_out and now >= cell.deadline:
                    cell.timed_out = True
                    self._kill_cell(cell.pid)
                elif not (cell.timed_out or cell.demoted) and now >= cell.demote_at:
                    cell.demoted = True
                    _demote(cell)
            self._reap()
            while self.queue and self.free_slots:
                self._start(self.queue.popleft())

    def _read_commands(self) -> bool:
        data = os.read(self.cmd_fd, 1 << 20)
        if not data:
            return False
        self.queue.extend(self.commands.feed(data))
        return True

    def _read_cell(self, kind: str, cell: _Cell) -> None:
        fd = cell.out_fd if kind == "out" else cell.res_fd
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        if data:
            _keep(cell, kind, data)
        else:
            self.sel.unregister(fd)

    def _start(self, job: dict) -> None:
        slot = self.free_slots.pop()
        uid = self.opts.uid_base + slot if self.uid_drop else None
        workdir = _CELL_DIR
        if not self.pidns:
            workdir = os.path.join(self.workroot, f"cell-{job['id']}")
            os.mkdir(workdir, 0o700)
            if uid is not None:
                os.chown(workdir, uid, uid)
        out_r, out_w = os.pipe()
        res_r, res_w = os.pipe()
        args = (job, uid, workdir, out_w, res_w)
        try:
            if self.pidns:
                pid = self._fork_in_new_pidns(lambda: self._cell_init(*args))
            else:
                server = os.getpid()
                pid = _fork(lambda: self._cell_child(*args, parent=server))
        except OSError as exc:  # fork failed (out of memory or pids): report it, the pool stays up
            for fd in (out_r, out_w, res_r, res_w):
                os.close(fd)
            self.free_slots.append(slot)
            if not self.pidns:
                remove_tree(workdir)
            self._send(job, "killed", "", f"sandbox could not start the cell: {exc}", 0.0)
            return
        os.close(out_w)
        os.close(res_w)
        cell = _Cell(job, slot, uid, pid, out_r, res_r, self.opts)
        if not self.pidns:
            cell.workdir = workdir
        for fd, kind in ((out_r, "out"), (res_r, "res")):
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, (kind, cell))
        self.cells[pid] = cell

    def _child_fds(self, out_w: int, res_w: int) -> None:
        """In a fresh child: stdin from /dev/null, stdout+stderr to the output pipe, fd 3 for the
        runner's report, nothing else (the server's pipes must be out of a cell's reach)."""
        signal.set_wakeup_fd(-1)  # else a signal would write into whatever file reuses that fd number
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        os.dup2(out_w, 1)
        os.dup2(out_w, 2)
        os.dup2(res_w, 3)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.closerange(4, os.sysconf("SC_OPEN_MAX"))

    def _cell_init(self, job: dict, uid: int | None, workdir: str, out_w: int, res_w: int) -> None:
        """Pid 1 of the cell's namespaces (root): mounts, forks the cell, mirrors its exit. When this process
        exits the kernel kills the rest of the namespace, and the server's waitpid returns only then."""
        try:
            self._child_fds(out_w, res_w)
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # the server died: take the namespace down
            _enter_cell_namespaces(self.opts.tmp_bytes)
            os.mkdir(workdir, 0o700)
            if uid is not None:
                os.chown(workdir, uid, uid)
            pid = os.fork()
            if pid == 0:
                self._cell_child(job, uid, workdir, -1, -1, parent=1)
            while True:  # as init, reap every orphan until the cell itself ends
                child, status = os.waitpid(-1, 0)
                if child == pid:
                    code = os.waitstatus_to_exitcode(status)
                    os._exit(128 - code if code < 0 else min(code, 127))
        except BaseException:
            traceback.print_exc()
        os._exit(126)

    def _cell_child(
        self, job: dict, uid: int | None, workdir: str, out_w: int, res_w: int, parent: int
    ) -> None:
        try:
            if out_w >= 0:
                self._child_fds(out_w, res_w)
            _run_cell(job, self.opts, uid, workdir, self.audit_hook, parent)
        except BaseException:
            traceback.print_exc()
        os._exit(126)

    def _reap(self) -> None:
        while True:
            try:
                # WNOWAIT: the process stays a zombie, which keeps its pid, hence its process group id,
                # from being reused while what is left of the group is killed.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            cell = self.cells.pop(info.si_pid, None)  # None: an orphan the subreaper inherited
            if cell is not None and not self.pidns:
                self._kill_cell(cell.pid)
            status = os.waitpid(info.si_pid, 0)[1]
            if cell is not None:
                self._finish(cell, status)

    def _finish(self, cell: _Cell, status: int) -> None:
        duration = time.monotonic() - cell.started
        if not self.pidns:
            self._sweep()
        for kind, fd in (("out", cell.out_fd), ("res", cell.res_fd)):
            while True:  # every writer is dead now: what is left in the pipe ends with EOF
                try:
                    data = os.read(fd, _READ_CHUNK)
                except BlockingIOError:
                    break
                if not data:
                    break
                _keep(cell, kind, data)
            if fd in self.sel.get_map():
                self.sel.unregister(fd)
            os.close(fd)
        if cell.workdir is not None:
            remove_tree(cell.workdir)
        if not self.pidns and cell.uid is not None:
            _remove_files_of(cell.uid)
        self.free_slots.append(cell.slot)
        code = os.waitstatus_to_exitcode(status)
        if self.pidns and code > 128:  # _cell_init mirrors "killed by signal s" as 128 + s
            code = 128 - code
        state, error = _classify(cell, code, self.opts.timeout_s)
        self._send(cell.job, state, cell.output.text(), error, duration)

    def _send(self, job: dict, status: str, output: str, error: str, duration: float) -> None:
        msg = {"id": job["id"], "status": status, "output": output, "error": error, "duration": duration}
        write_frame(self.res_fd, msg)

    def _kill_cell(self, pid: int) -> None:
        """With pidns, killing the namespace's init kills everything in it. Without, the cell's process
        group goes at once (a fork bomb cannot outrun one killpg), setsid'ed escapees by `_sweep`."""
        _kill(pid)
        if not self.pidns:
            try:
                os.killpg(pid, signal.SIGKILL)  # the cell made its own group: its id is the cell's pid
            except ProcessLookupError:
                pass

    def _sweep(self) -> None:
        """Subreaper fallback: kill every child that is not a running cell (escaped descendants of a
        finished one), wait for it, and repeat, since its own children are re-parented to us in turn."""
        running = set(self.cells)
        while strays := _children(os.getpid()) - running:
            for pid in strays:
                _kill(pid)
            for pid in strays:
                try:
                    os.waitpid(pid, 0)
                except ChildProcessError:
                    pass

    def _kill_all(self) -> None:
        for pid, cell in self.cells.items():
            self._kill_cell(pid)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            if cell.workdir is not None:
                remove_tree(cell.workdir)
        self.cells.clear()
        if not self.pidns:
            self._sweep()


def _keep(cell: _Cell, kind: str, data: bytes) -> None:
    if kind == "out":
        cell.output.feed(data)
    else:
        cell.report += data
        del cell.report[: -cell.report_limit]


def _remove_files_of(uid: int) -> None:
    """Subreaper fallback, where cells share the host's temporary directories: remove what the slot's uid
    (used by nobody else, and with no process left) put at their top level, so the slot's next cell finds
    nothing of it. What it put inside another uid's world-writable directory goes with that one."""
    for top in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    remove_tree(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass


def _demote(cell: _Cell) -> None:
    """Nice 19 for every process of the cell: all of its slot's uid, or its process group when cells share
    the server's uid. A process that calls setsid gets an autogroup of its own and escapes the demotion
    (not the timeout)."""
    try:
        if cell.uid is not None:
            os.setpriority(os.PRIO_USER, cell.uid, 19)
        else:
            os.setpriority(os.PRIO_PGRP, cell.pid, 19)
    except OSError:
        pass  # it has just ended


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:  # the server is single-threaded
            return {int(p) for p in f.read().split()}
    except FileNotFoundError:  # kernel without CONFIG_PROC_CHILDREN: scan every process's parent
        found = set()
        for name in os.listdir("/proc"):
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == pid:
                        found.add(int(name))
            except (OSError, ValueError, IndexError):
                continue
        return found


def _fork(child: Callable[[], object]) -> int:
    """Fork; the child runs `child` and exits 0, or 1 if it raised. Returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        try:
            child()
            os._exit(0)
        except BaseException:
            os._exit(1)
    return pid


def _succeeds(pid: int) -> bool:
    """Waits for a probe child (which may have changed its own namespaces or uid)."""
    return os.waitpid(pid, 0)[1] == 0


class _Refused(Exception):
    """The server will not run cells under the isolation this machine allows."""


_UNREADABLE = (
    "cells run as unprivileged uids, which cannot read this interpreter's directories {paths}, and no "
    "mount namespace can expose them ({why}); install Python where other users can read it"
)


def _interpreter_paths() -> list[str]:
    """The outermost directories this interpreter needs (stdlib, site-packages, its binary)."""
    found = set()
    for path in (*sys.path, sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable))):
        if path and os.path.isdir(path):
            found.add(os.path.realpath(path))
    return sorted(p for p in found if not any(p.startswith(q.rstrip("/") + "/") for q in found if q != p))


def _check_readable_as(uid: int, paths: list[str]) -> None:
    _drop_privileges(uid)
    for path in paths:
        os.listdir(path)


def _expose(paths: list[str]) -> None:
    """Give the server a mount namespace of its own in which each directory that other users cannot
    search and that holds the interpreter (e.g. /root, for a pyenv) is hidden behind an empty tmpfs, into
    which only the interpreter's directories are bind-mounted back. Cells inherit it."""
    _sys("unshare", _CLONE_NEWNS)
    _sys("mount", None, b"/", None, _MS_REC | _MS_PRIVATE, None)  # else mounts would propagate to the host
    hidden: dict[str, list[str]] = {}
    for path in paths:
        parts = path.split("/")
        for i in range(2, len(parts)):  # the topmost proper ancestor that others cannot search
            ancestor = "/".join(parts[:i])
            if not os.stat(ancestor).st_mode & 0o001:
                hidden.setdefault(ancestor, []).append(path)
                break
    for ancestor, inside in hidden.items():
        fds = [os.open(path, os.O_PATH | os.O_DIRECTORY) for path in inside]  # reachable once covered
        _sys("mount", b"tmpfs", ancestor.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=1m,mode=0755")
        for path, fd in zip(inside, fds):
            os.makedirs(path, 0o755)
            _sys("mount", f"/proc/self/fd/{fd}".encode(), path.encode(), None, _MS_BIND | _MS_REC, None)
            os.close(fd)


def _enter_cell_namespaces(tmp_bytes: int) -> None:
    """In the pid-1 child: own mount and IPC namespaces, a /proc of its own pid namespace, and one fresh
    tmpfs behind /tmp, /var/tmp and /dev/shm; all of it vanishes with the namespace."""
    _sys("unshare", _CLONE_NEWNS | _CLONE_NEWIPC)
    _sys("mount", None, b"/", None, _MS_REC | _MS_PRIVATE, None)  # else mounts would propagate to the host
    _sys("mount", b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
    opts = f"size={tmp_bytes},nr_inodes={_TMPFS_INODES},mode=1777".encode()
    _sys("mount", b"tmpfs", b"/tmp", b"tmpfs", _MS_NOSUID | _MS_NODEV, opts)
    for target, source in (("/var/tmp", "/tmp/.var-tmp"), ("/dev/shm", "/tmp/.shm")):
        if os.path.isdir(target) and not os.path.islink(target):
            os.mkdir(source)
            os.chmod(source, 0o1777)
            _sys("mount", source.encode(), target.encode(), None, _MS_BIND, None)


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


# ----------------------------------------------------------------------------------------------------------
# Inside the cell process.

_BLOCKED_EVENTS = frozenset(
    {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.sethostname",
     "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.system"}
)  # fmt: skip


def _deny_network(event: str, args: tuple) -> None:
    """Audit-hook fallback when there is no network namespace. Programs are refused too, since a fresh
    interpreter or curl would not carry this hook. ctypes can still get around it."""
    if (event == "socket.__new__" and args[1] != socket.AF_UNIX) or event in _BLOCKED_EVENTS:
        raise PermissionError(f"{event} is blocked in this sandbox (no network, no programs)")


def _run_cell(
    job: dict, opts: SandboxOptions, uid: int | None, workdir: str, hook: bool, parent: int
) -> None:
    """Limit, confine, replay `job["history"]` silently, run `job["code"]`, report on fd 3, exit."""
    # A process group of its own, for killpg; not setsid: a new session is a new scheduler autogroup,
    # and nice values (see _demote) only weigh against the other processes of the same autogroup.
    os.setpgid(0, 0)
    # Limits first, as root, so that the cell cannot raise them back.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (opts.memory_bytes, opts.memory_bytes))
    # The soft limit sends SIGXCPU (reported as a timeout); the hard one SIGKILLs a cell that ignores it.
    resource.setrlimit(resource.RLIMIT_CPU, (opts.cpu_limit_s, opts.cpu_limit_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (opts.max_file_bytes, opts.max_file_bytes))
    if uid is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (opts.max_processes, opts.max_processes))
        _drop_privileges(uid)
    if os.geteuid() == 0 or os.getuid() == 0:  # as root, kill(-1) would take down the whole machine
        raise RuntimeError("refusing to run a cell as root")
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it: die with our parent
    if os.getppid() != parent:  # it died before the line above
        os._exit(125)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary can hand root back
    os.chdir(workdir)
    os.environ["HOME"] = os.environ["TMPDIR"] = workdir
    tempfile.tempdir = None  # the server may have cached its own
    if hook:
        sys.addaudithook(_deny_network)
    random.seed(0)
    main_pid = os.getpid()
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    if job["history"]:
        _flush()
        saved = os.dup(1), os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        for i, source in enumerate(job["history"]):
            _execute(source, namespace, f"<history {i}>", main_pid, opts.max_output_bytes)
        _flush()
        for fd, target in zip(saved, (1, 2)):
            os.dup2(fd, target)
        for fd in (*saved, null):
            os.close(fd)
    status, error = _execute(job["code"], namespace, "<cell>", main_pid, opts.max_output_bytes)
    _flush()
    try:
        os.write(3, (json.dumps([status, error]) + "\n").encode())
    except OSError:
        pass  # the cell closed fd 3: the server reports the bare exit
    os._exit(0)  # not sys.exit: neither wait for the cell's threads nor run its atexit hooks


def _execute(source: str, namespace: dict, name: str, main_pid: int, limit: int) -> tuple[str, str]:
    try:
        exec(compile(source, name, "exec"), namespace)
        result = ("ok", "")
    except SystemExit as exc:
        result = ("ok", "") if exc.code in (None, 0) else ("error", _last_line(exc, limit))
    except MemoryError as exc:
        result = ("memory", _last_line(exc, limit))
    except BaseException as exc:
        result = ("error", _last_line(exc, limit))
    if os.getpid() != main_pid:  # a process the cell forked reached the end of the cell: no report
        _flush()
        os._exit(0 if result[0] == "ok" else 1)
    return result


def _last_line(exc: BaseException, limit: int) -> str:
    try:
        lines = [line.strip() for line in traceback.format_exception_only(type(exc), exc)]
        line = next(line for line in reversed(lines) if line)
    except BaseException:  # a hostile __str__ or __repr__
        line = type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass


def _classify(cell: _Cell, code: int, timeout: float) -> tuple[str, str]:
    """Status and error line from the runner's report, or else from how the cell's process ended."""
    if cell.timed_out:
        return "timeout", f"timed out after {timeout:g} s"
    report = bytes(cell.report).rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        status, error = json.loads(report)
        if status in ("ok", "error", "memory") and isinstance(error, str):
            return status, error
    except Exception:  # anything the cell wrote there itself, e.g. RecursionError from "[[[[..."
        pass  # no report (killed, os._exit) or a bad one: judge by how the process ended
    if code == -signal.SIGXCPU:
        return "timeout", "CPU time limit exceeded"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return "killed", f"killed by {name} ({signal.strsignal(-code)})"
    return "error", f"exited with code {code} before the cell finished"
