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
import re
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

# Linux constants (sched.h, mount.h, prctl.h, capability.h); Python 3.11's os module has neither unshare nor setns.
_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT = 1, 2, 4, 8, 32
_MS_BIND, _MS_REC, _MS_PRIVATE, _MNT_DETACH = 4096, 16384, 1 << 18, 2
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38
_CAPABILITY_VERSION_3 = 0x20080522
# pivot_root(2) has no glibc wrapper: its syscall number, by `uname -m`.
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

ISOLATIONS = ("namespaces", "weak")
_UID_FIRST, _UID_STRIDE, _UID_RANGES = 1_900_000_000, 4096, 2**15  # all below 2**31
_CELL_DIR = "/tmp/cell"  # the working directory inside a cell's own tmpfs (namespaces)
_TMPFS_INODES = 65536  # tmpfs `size` does not bound inodes, which cost memory too
_READ_CHUNK = 1 << 16
# What a cell's root holds besides the interpreter's own directories, all read-only: the system's programs and
# libraries (the dynamic loader needs /etc/ld.so.cache; symlinks such as /lib -> usr/lib are copied as links).
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_DEVICES = ("null", "zero", "full", "random", "urandom")  # bound from the host's /dev, writable
_SETUP_FAILED = 255  # exit code of a cell's init whose setup failed; mirrored cell exits are 0..127 and 129..192


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class SandboxOptions:
    """Limits and pool size of a `Sandbox`; every field is validated with a ValueError naming it."""

    timeout_s: float = 10.0  # wall clock per cell, replay of its history included
    cpu_time_s: int | None = None  # RLIMIT_CPU per process; None: ceil(timeout_s) + 1 (bounds busy threads)
    memory_bytes: int = 4 << 30  # RLIMIT_AS per process
    max_processes: int = 64  # RLIMIT_NPROC per cell (threads count); not in weak isolation without root
    max_file_bytes: int = 64 << 20  # RLIMIT_FSIZE: the largest file a cell can write
    tmp_bytes: int = 256 << 20  # size of a cell's private tmpfs (/tmp, /var/tmp, /dev/shm), namespaces
    max_output_bytes: int = 8192  # head + tail of the output kept; the rest is replaced by a marker
    # Cells running at once (each holds a slot, i.e. a uid, and up to memory_bytes per process). Size it
    # above (rate of cells that time out) x timeout_s + cores, or looping cells fill every slot.
    concurrency: int = dataclasses.field(default_factory=lambda: 4 * (os.cpu_count() or 1))
    # A cell running (wall clock) longer than this gets nice 19, which it cannot undo: the many short cells
    # keep the CPU while a few slow or looping ones run out their time (shortest first, in effect).
    demote_after_s: float = 0.05
    # "namespaces": every cell in pid, mount, IPC and network namespaces of its own (and, without root, a user
    # namespace) with a root filesystem of its own; refuses to start where the kernel does not allow them.
    # "weak": no namespaces (process groups, a subreaper, an audit hook); without root, cells keep your uid.
    isolation: str = "namespaces"
    # Cells run as uid_base + slot when root. None: a random range of 4096 uids above systemd's ranges,
    # so that two Sandboxes on one host (which must not share uids) practically never collide.
    uid_base: int | None = None
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
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"SandboxOptions.isolation: expected one of {ISOLATIONS}, got {self.isolation!r}")
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
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
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
        _set_name("acim-sandbox")
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
        """Set up the isolation the options ask for and prove it by running one cell through it.
        Raises _Refused rather than run cells under less, or with the server's uid when that uid is root."""
        self.root = os.geteuid() == 0
        self.namespaces = self.opts.isolation == "namespaces"
        if self.namespaces:
            if os.uname().machine not in _SYS_PIVOT_ROOT:
                raise _Refused(_no_namespaces(f"pivot_root's syscall number on {os.uname().machine} is not known",
                                              self.root))
            self.outer_ids = os.geteuid(), os.getegid()
            try:
                if not self.root:  # the server becomes root of a user namespace, where it may make the others
                    _enter_user_namespace(inner=(0, 0), outer=self.outer_ids)
                self._lead_a_pid_namespace()
            except OSError as exc:
                raise _Refused(_no_namespaces(exc, self.root)) from None
            self.pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY)
            self.root_paths = _cell_root_paths(self.workroot)
            failure = self._probe_cell()
            if failure is not None:
                raise _Refused(_no_namespaces(failure, self.root))
            users = "per-slot-uid" if self.root else "userns"
            return {"mode": "namespaces", "network": "netns", "processes": "pidns", "users": users,
                    "filesystem": "private-root"}
        if self.root:
            paths = _interpreter_paths()
            probe = functools.partial(_check_readable_as, self.opts.uid_base, paths)
            if not _succeeds(_fork(probe)):
                try:
                    _expose(paths)
                except OSError as exc:
                    raise _Refused(_UNREADABLE.format(paths=paths, why=exc)) from None
                if not _succeeds(_fork(probe)):
                    raise _Refused(_UNREADABLE.format(paths=paths, why="still unreadable when exposed"))
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        return {"mode": "weak", "network": "audit-hook", "processes": "subreaper",
                "users": "per-slot-uid" if self.root else "shared", "filesystem": "host"}

    def _lead_a_pid_namespace(self) -> None:
        """Go on as pid 1 of a new pid namespace, which this process only waits for: the server forks each
        cell's init into a pid namespace of its own and must enter its own again after (setns), which a user
        namespace's root may do only for one its user namespace owns, not the host's. If the server dies, the
        kernel kills every cell at once."""
        _sys("unshare", _CLONE_NEWPID)
        pid = os.fork()
        if pid:
            os.close(self.cmd_fd)
            os.close(self.res_fd)  # the trainer's reader sees EOF when the server's end closes
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            os._exit(code if code >= 0 else 128 - code)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # the waiting process was killed (Sandbox.close): go too

    def _probe_cell(self) -> str | None:
        """Run one cell, as the cells will run, that lists the interpreter's directories: None if it succeeded,
        else what went wrong (the kernel's refusals show at start, not in the first rollout)."""
        out_r, out_w = os.pipe()
        res_r, res_w = os.pipe()
        job = {"id": -1, "code": f"import os\nfor p in {_interpreter_paths()!r}:\n    os.listdir(p)", "history": []}
        uid = self.opts.uid_base if self.root else None
        try:
            pid = self._fork_in_new_pidns(lambda: self._cell_init(job, uid, _CELL_DIR, out_w, res_w))
        except OSError as exc:
            return f"{exc} (creating a pid namespace)"
        finally:
            os.close(out_w)
            os.close(res_w)
        output, report = _read_to_end(out_r), _read_to_end(res_r)  # the cell's output is small: no deadlock
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code == 0 and report.strip() == b'["ok", ""]':
            return None
        lines = (output + report).decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else f"the probe cell exited with code {code}"

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
        uid = self.opts.uid_base + slot if self.root else None
        workdir = _CELL_DIR
        if not self.namespaces:
            workdir = os.path.join(self.workroot, f"cell-{job['id']}")
            os.mkdir(workdir, 0o700)
            if uid is not None:
                os.chown(workdir, uid, uid)
        out_r, out_w = os.pipe()
        res_r, res_w = os.pipe()
        args = (job, uid, workdir, out_w, res_w)
        try:
            if self.namespaces:
                pid = self._fork_in_new_pidns(lambda: self._cell_init(*args))
            else:
                server = os.getpid()
                pid = _fork(lambda: self._cell_child(*args, parent=server))
        except OSError as exc:  # fork failed (out of memory or pids): report it, the pool stays up
            for fd in (out_r, out_w, res_r, res_w):
                os.close(fd)
            self.free_slots.append(slot)
            if not self.namespaces:
                remove_tree(workdir)
            self._send(job, "failed", "", f"the sandbox could not start the cell: {exc}", 0.0)
            return
        os.close(out_w)
        os.close(res_w)
        cell = _Cell(job, slot, uid, pid, out_r, res_r, self.opts)
        if not self.namespaces:
            cell.workdir = workdir
        for fd, kind in ((out_r, "out"), (res_r, "res")):
            os.set_blocking(fd, False)
            self.sel.register(fd, selectors.EVENT_READ, (kind, cell))
        self.cells[pid] = cell

    def _child_fds(self, out_w: int, res_w: int) -> None:
        """In a fresh child: stdin from /dev/null, stdout+stderr to the output pipe, fd 3 for the
        runner's report, nothing else (the server's pipes must be out of a cell's reach)."""
        _set_name("acim-cell")  # ps tells cells from their server (both run the server's command line)
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
        """Pid 1 of the cell's namespaces: builds its root, forks the cell, mirrors its exit. When this process
        exits the kernel kills the rest of the namespace, and the server's waitpid returns only then."""
        try:
            self._child_fds(out_w, res_w)
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # the server died: take the namespace down
            os.setpgid(0, 0)  # the cell stays in this group: the server renices it by this pid (_demote)
            _enter_cell_root(self.workroot, self.opts.tmp_bytes, self.root_paths)
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
        os._exit(_SETUP_FAILED)

    def _cell_child(
        self, job: dict, uid: int | None, workdir: str, out_w: int, res_w: int, parent: int
    ) -> None:
        try:
            if out_w >= 0:
                self._child_fds(out_w, res_w)
            # Without root, a user namespace of its own: RLIMIT_NPROC counts per (user namespace, uid), so the
            # limit then bounds this cell's processes alone, not all of the trainer's user's.
            own_userns = self.namespaces and not self.root
            if own_userns:
                _enter_user_namespace(inner=self.outer_ids, outer=(0, 0))
            _run_cell(job, self.opts, uid, workdir, weak=not self.namespaces,
                      limit_processes=uid is not None or own_userns, parent=parent)
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
            if cell is not None and not self.namespaces:
                self._kill_cell(cell.pid)
            status = os.waitpid(info.si_pid, 0)[1]
            if cell is not None:
                self._finish(cell, status)

    def _finish(self, cell: _Cell, status: int) -> None:
        duration = time.monotonic() - cell.started
        if not self.namespaces:
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
        if not self.namespaces and cell.uid is not None:
            _remove_files_of(cell.uid)
        self.free_slots.append(cell.slot)
        code = os.waitstatus_to_exitcode(status)
        if self.namespaces and code == _SETUP_FAILED and not cell.timed_out:  # its traceback is the output
            lines = cell.output.text().strip().splitlines() or ["no traceback"]
            state, error = "failed", f"the sandbox could not set up the cell: {lines[-1]}"
        else:
            if self.namespaces and code > 128:  # _cell_init mirrors "killed by signal s" as 128 + s
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
        if not self.namespaces:
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
        if not self.namespaces:
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


def _no_namespaces(why: object, root: bool) -> str:
    """Why the server refuses to start in "namespaces" isolation: the kernel's refusal, what to change, and the
    explicit opt-in to weaker isolation."""
    where = "" if root else (
        " Without root they need unprivileged user namespaces, which are off where sysctl "
        "user.max_user_namespaces is 0, kernel.unprivileged_userns_clone is 0 (older Debian kernels) or "
        "kernel.apparmor_restrict_unprivileged_userns is 1 (Ubuntu 23.10 and later: set it to 0, or give this "
        "interpreter an AppArmor profile that allows them)."
    )
    return (
        f"the sandbox runs every cell in pid, mount, IPC and network namespaces of its own, and this machine "
        f"refused them ({why}).{where} Or opt in to weaker isolation with --sandbox.isolation weak "
        f"(SandboxOptions(isolation='weak')): cells then share the host's processes, network and files"
        f"{'' if root else ', keep your uid, and can signal your processes, the trainer included'}."
    )


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


def _cell_root_paths(staging: str) -> list[str]:
    """The host paths a cell's root holds read-only: the system's (`_SYSTEM_PATHS`, those that exist) and the
    interpreter's directories, outermost first. None may hold `staging`, where the root is built."""
    found = {p for p in _SYSTEM_PATHS if os.path.lexists(p)} | set(_interpreter_paths())
    paths = sorted(p for p in found if not any(p.startswith(q.rstrip("/") + "/") for q in found if q != p))
    for path in paths:
        if path == "/" or (staging + "/").startswith(path.rstrip("/") + "/"):
            raise _Refused(f"the interpreter directory {path} holds the sandbox's working root {staging}: "
                           f"set TMPDIR to a directory outside it")
    return paths


def _enter_cell_root(staging: str, tmp_bytes: int, paths: list[str]) -> None:
    """In the pid-1 child: mount, IPC and network namespaces of its own (its network has no interface up), and
    a root of its own, built at `staging` and then pivoted to: the host's `paths` read-only, /dev with the
    `_DEVICES` alone, a /proc of its own pid namespace, and one fresh tmpfs of `tmp_bytes` behind /tmp,
    /var/tmp and /dev/shm. The rest is read-only; no host directory a cell could write is reachable, and all
    of it vanishes with the namespace."""
    _sys("unshare", _CLONE_NEWNS | _CLONE_NEWIPC | _CLONE_NEWNET)
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # else mounts would propagate to the host
    _mount("tmpfs", staging, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    os.mkdir(f"{staging}/tmp")  # first: an interpreter under /tmp (a venv in a clone there) is bound inside it
    _mount("tmpfs", f"{staging}/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV,
           f"size={tmp_bytes},nr_inodes={_TMPFS_INODES},mode=1777")
    for path in paths:
        target = staging + path
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if os.path.islink(path):  # /lib -> usr/lib on a merged-/usr system
            os.symlink(os.readlink(path), target)
        else:
            os.makedirs(target, mode=0o755, exist_ok=True)
            _mount(path, target, None, _MS_BIND | _MS_REC)
            _readonly(target)
    os.makedirs(f"{staging}/dev", mode=0o755, exist_ok=True)
    for name in _DEVICES:
        os.close(os.open(f"{staging}/dev/{name}", os.O_CREAT | os.O_EXCL, 0o666))
        _mount(f"/dev/{name}", f"{staging}/dev/{name}", None, _MS_BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{staging}/dev/{name}")
    os.mkdir(f"{staging}/proc")
    _mount("proc", f"{staging}/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)  # while the host's is visible
    for target, source in (("var/tmp", ".var-tmp"), ("dev/shm", ".shm")):
        os.makedirs(f"{staging}/{target}", mode=0o755, exist_ok=True)
        os.mkdir(f"{staging}/tmp/{source}")
        os.chmod(f"{staging}/tmp/{source}", 0o1777)
        _mount(f"{staging}/tmp/{source}", f"{staging}/{target}", None, _MS_BIND)
    os.mkdir(f"{staging}/.host")
    os.chdir(staging)
    if _libc().syscall(_SYS_PIVOT_ROOT[os.uname().machine], b".", b".host") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root: {os.strerror(err)}")
    _sys("umount2", b"/.host", _MNT_DETACH)  # the host's whole tree leaves the namespace
    os.rmdir("/.host")
    _mount(None, "/", None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chdir("/")


def _readonly(top: str) -> None:
    """Remount read-only the mount at `top` and every one below it (a recursive bind brings the host's submounts
    along). Flags a user namespace may not clear (noexec; nosuid and nodev are set anyway) are kept, and a remount
    keeps the atime flags by itself."""
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    for point in points:
        if point == top or point.startswith(top + "/"):
            kept = os.statvfs(point).f_flag & _MS_NOEXEC  # ST_NOEXEC == MS_NOEXEC
            _mount(None, point, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | kept)


def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes come octal-escaped (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def raw(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    _sys("mount", raw(source), raw(target), raw(fstype), flags, raw(data))


def _enter_user_namespace(inner: tuple[int, int], outer: tuple[int, int]) -> None:
    """Move this process into a new user namespace where the (uid, gid) `inner` stands for `outer` of the parent
    namespace; the only ids it has. Needs no privilege where the kernel allows unprivileged user namespaces."""
    _sys("unshare", _CLONE_NEWUSER)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{inner[0]} {outer[0]} 1"),
                       ("gid_map", f"{inner[1]} {outer[1]} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_capabilities() -> None:
    """Clear this process's effective, permitted and inheritable capabilities (and so its ambient ones)."""
    _sys("capset", ctypes.byref(_CapHeader(_CAPABILITY_VERSION_3, 0)), ctypes.byref((_CapData * 2)()))


def _set_name(name: str) -> None:
    with open("/proc/self/comm", "w") as f:
        f.write(name)


def _read_to_end(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, _READ_CHUNK):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


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
    job: dict, opts: SandboxOptions, uid: int | None, workdir: str, *, weak: bool, limit_processes: bool,
    parent: int,
) -> None:
    """Limit, confine, replay `job["history"]` silently, run `job["code"]`, report on fd 3, exit."""
    if weak:  # a process group of its own, for killpg (with namespaces the cell stays in its init's)
        # Not setsid: a new session is a new scheduler autogroup, and nice values (see _demote) only weigh
        # against the other processes of the same autogroup.
        os.setpgid(0, 0)
    # Limits first, as root, so that the cell cannot raise them back.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_AS, (opts.memory_bytes, opts.memory_bytes))
    # The soft limit sends SIGXCPU (reported as a timeout); the hard one SIGKILLs a cell that ignores it.
    resource.setrlimit(resource.RLIMIT_CPU, (opts.cpu_limit_s, opts.cpu_limit_s + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (opts.max_file_bytes, opts.max_file_bytes))
    if limit_processes:
        resource.setrlimit(resource.RLIMIT_NPROC, (opts.max_processes, opts.max_processes))
    if uid is not None:
        _drop_privileges(uid)
    _drop_capabilities()  # a cell in a user namespace of its own starts with every capability in it
    if os.geteuid() == 0 or os.getuid() == 0:  # as root, kill(-1) would take down the whole machine
        raise RuntimeError("refusing to run a cell as root")
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid or unshare, which clear it: die with our parent
    if os.getppid() != parent:  # it died before the line above
        os._exit(125)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)  # no setuid binary or file capability can hand privileges back
    os.chdir(workdir)
    os.environ["HOME"] = os.environ["TMPDIR"] = workdir
    tempfile.tempdir = None  # the server may have cached its own
    if weak:  # no network namespace
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
