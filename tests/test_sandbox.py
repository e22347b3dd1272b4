"""Tests for acim_fast.execution.sandbox: every hostile cell is contained and leaves nothing behind, the pool and the
test process survive it, replay gives a cell its trajectory's earlier definitions, the API validates input.

Most tests run twice, with namespaces (the default here: root, `unshare` allowed) and with the forced
fallbacks (subreaper + audit hook), so that both code paths are exercised on this machine.
"""

import asyncio
import glob
import os
import signal
import socket
import subprocess
import time

import pytest

from acim_fast.execution.sandbox import Isolation, Result, Sandbox, SandboxOptions, next_history

TIMEOUT_S = 2.0
OPTIONS = dict(
    timeout_s=TIMEOUT_S,
    memory_bytes=1 << 30,
    max_processes=32,
    max_file_bytes=16 << 20,
    tmp_bytes=64 << 20,
    max_output_bytes=1000,
    concurrency=4,
    # Demoted cells yield to every other process of this (shared, loaded) machine; that is tested on its own.
    demote_after_s=TIMEOUT_S,
)
SECRET = "ACIM_SANDBOX_TEST_SECRET"
SERVER_MARK = b"_acim_sandbox_server"  # in the command line of a server, hence of every process it forks


@pytest.fixture(scope="module", params=["namespaces", "fallback"])
def sandbox(request):
    os.environ[SECRET] = "hunter2"  # present when the server starts: it must not inherit it
    try:
        with Sandbox(SandboxOptions(**OPTIONS, namespaces=request.param == "namespaces")) as sb:
            yield sb
    finally:
        del os.environ[SECRET]


def _proc(pid: str, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _pids() -> list[str]:
    return [p for p in os.listdir("/proc") if p.isdigit()]


def _servers() -> dict[str, bytes]:
    """This test process's sandbox servers (children running the server code) and their command lines."""
    me = str(os.getpid()).encode()
    return {
        p: _proc(p, "cmdline")
        for p in _pids()
        if _proc(p, "stat").rsplit(b")", 1)[-1].split()[1:2] == [me] and SERVER_MARK in _proc(p, "cmdline")
    }


def _cell_processes(servers: dict[str, bytes] | None = None) -> list[int]:
    """Live processes forked by one of the servers: they share its command line (which names the sandbox's
    unique working root) without being the server. Pass `servers` taken before a server went away."""
    servers = _servers() if servers is None else servers
    lines = set(servers.values())
    return [int(p) for p in _pids() if p not in servers and _proc(p, "cmdline") in lines]


def _wait_until_no_cell_processes(servers: dict[str, bytes]) -> list[int]:
    """For exits the sandbox does not wait for (its server was killed): give the kernel a moment."""
    deadline = time.monotonic() + 2.0
    while (left := _cell_processes(servers)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def _assert_healthy(sandbox: Sandbox) -> None:
    result = sandbox.run("print(6 * 7)")
    assert (result.status, result.output, result.error) == ("ok", "42\n", "")


GRANDCHILD = """
import os, time
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(w, b"1")
        time.sleep(60)
    os._exit(0)
os.read(r, 1)
print("grandchild running")
"""
BUSY_THREADS = """
import threading
def spin():
    while True:
        pass
threads = [threading.Thread(target=spin) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""
WRITE_10GB = """
chunk = b"0" * 2**20
with open("big.bin", "wb") as f:
    for _ in range(10 * 1024):
        f.write(chunk)
"""

PRINTED_100MB = "x" * 500 + "\n... [99999001 bytes truncated] ...\n" + "x" * 499 + "\n"  # only head + tail

# (id, code, allowed statuses, part of the error line, output)
THREATS = [
    ("infinite_loop", "while True:\n    pass", ("timeout",), "timed out", ""),
    ("ignores_sigterm", "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass",
     ("timeout",), "timed out", ""),
    ("fork_bomb", "import os\nwhile True:\n    os.fork()", ("error",), "BlockingIOError", ""),
    ("alloc_10gb", "x = bytearray(10 * 2**30)", ("memory",), "MemoryError", ""),
    ("alloc_gradually", "xs = []\nwhile True:\n    xs.append(bytes(2**26))", ("memory",), "MemoryError", ""),
    ("write_10gb_file", WRITE_10GB, ("error",), "File too large", ""),
    ("kill_parent", "import os\nos.kill(os.getppid(), 9)", ("error",), "PermissionError", ""),
    # kill(-1) reaches only the cell's own uid (and namespace): nothing, or nothing but itself.
    ("kill_everything", "import os\nos.kill(-1, 9)", ("ok", "error"), "", ""),
    ("detached_grandchild", GRANDCHILD, ("ok",), "", "grandchild running\n"),
    ("print_100mb", "print('x' * 100_000_000)", ("ok",), "", PRINTED_100MB),
    ("read_stdin", "input()", ("error",), "EOFError: EOF when reading a line", ""),
    ("sys_exit_3", "import sys\nsys.exit(3)", ("error",), "SystemExit: 3", ""),
    ("os_exit_0", "import os\nos._exit(0)", ("error",), "exited with code 0", ""),
    ("segfault", "import ctypes\nctypes.string_at(0)", ("killed",), "SIGSEGV", ""),
    ("deep_recursion", "def f(n):\n    return f(n + 1)\nf(0)", ("error",), "RecursionError", ""),
    ("busy_threads", BUSY_THREADS, ("timeout",), "time", ""),  # wall clock or RLIMIT_CPU, whichever first
]  # fmt: skip
THREAT_IDS = [t[0] for t in THREATS]
THREAT_CASES = [t[1:] for t in THREATS]


@pytest.mark.slow
@pytest.mark.parametrize("code, statuses, error, output", THREAT_CASES, ids=THREAT_IDS)
def test_hostile_cell_is_contained(sandbox, code, statuses, error, output):
    start = time.monotonic()
    result = sandbox.run(code)
    assert time.monotonic() - start < TIMEOUT_S + 1
    assert result.status in statuses, result
    assert error in result.error, result
    assert result.output == output
    assert _cell_processes() == []  # the grandchild too, although it was running when the cell ended
    _assert_healthy(sandbox)


DEEP_TREE = "import os\ntop = os.getcwd()\nfor _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\n"


@pytest.mark.slow
@pytest.mark.parametrize(
    "code",
    ["import os\nos.write(3, b'[' * 30000)",  # a report that makes json.loads raise RecursionError
     DEEP_TREE + "print(top)"],  # a tree too deep for a recursive rmtree
    ids=["nested_report", "deep_tree"],
)  # fmt: skip
def test_cell_cannot_crash_the_server(sandbox, code):
    servers = _servers()
    result = sandbox.run(code)
    assert result.status in ("ok", "error")
    _assert_healthy(sandbox)
    assert _servers() == servers  # the same server process: it was not restarted
    if code.startswith(DEEP_TREE):
        assert result.ok and result.output.startswith("/")
        assert not os.path.exists(result.output.strip())


def test_cells_run_unprivileged_and_apart(sandbox):
    code = "import os, time\ntime.sleep(0.3)\nprint(os.getuid(), os.geteuid(), os.getgroups())"
    outputs = [r.output.split(maxsplit=2) for r in sandbox.run_batch([(code, ())] * 2)]
    uids = {int(uid) for uid, euid, groups in outputs} | {int(euid) for uid, euid, groups in outputs}
    assert 0 not in uids
    assert len(uids) == 2  # two concurrent cells, two slots, two uids: they cannot signal each other
    assert all(groups == "[]\n" for *_, groups in outputs)


def test_two_sandboxes_get_different_uids(sandbox):
    code = "import os\nprint(os.getuid())"
    with Sandbox(SandboxOptions(**OPTIONS)) as other:
        assert other.run(code).output != sandbox.run(code).output  # random ranges: 1 in 32768 to collide


def test_cell_cannot_see_the_trainers_secrets(sandbox):
    # A process started with the secret in its environment, as the trainer would be; its /proc entry is
    # readable by root (the check below would find it) but must not be by a cell.
    holder = subprocess.Popen(["sleep", "30"], env={SECRET: "hunter2"})
    try:
        deadline = time.monotonic() + 2.0  # until it has exec'd
        while SECRET.encode() not in _proc(str(holder.pid), "environ") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert SECRET.encode() in _proc(str(holder.pid), "environ")
        code = f"""
import os
found = [k for k in os.environ if k == {SECRET!r}]
for pid in os.listdir("/proc"):
    try:
        with open(f"/proc/{{pid}}/environ", "rb") as f:
            if {SECRET!r}.encode() in f.read():
                found.append(pid)
    except OSError:
        pass
print(found)
"""
        assert sandbox.run(code).output == "[]\n"
    finally:
        holder.kill()
        holder.wait()


def test_network_is_blocked(sandbox):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        port = listener.getsockname()[1]
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), 1)\nprint('connected')"
        result = sandbox.run(code)
        assert result.status == "error"
        assert "connected" not in result.output
        expected = {"netns": "Network is unreachable", "audit-hook": "blocked in this sandbox"}
        assert expected[sandbox.isolation.network] in result.error
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_files_do_not_outlive_the_cell(sandbox):
    first = sandbox.run("import os\nopen('note.txt', 'w').write('x')\nopen('/tmp/note.txt', 'w').write('x')\n"
                        "print(os.getcwd())")  # fmt: skip
    workdir = first.output.strip()
    assert first.ok and workdir
    assert not os.path.exists(workdir)  # the trainer's view: removed (or never on the host at all)
    second = sandbox.run(f"import os\nprint(os.path.exists({workdir + '/note.txt'!r}), os.listdir('.'))")
    assert second.output == "False []\n"
    # A private tmpfs per cell with pidns; in the fallback, the slot's files are removed from the host's.
    assert sandbox.run("import os\nprint(os.path.exists('/tmp/note.txt'))").output == "False\n"
    assert not os.path.exists("/tmp/note.txt")


def test_output_keeps_head_and_tail(sandbox):
    result = sandbox.run("print('a' * 3000 + 'b' * 3000)")
    assert result.output == "a" * 500 + "\n... [5001 bytes truncated] ...\n" + "b" * 499 + "\n"


def test_error_is_the_last_traceback_line_and_output_is_kept(sandbox):
    result = sandbox.run("print('before')\n1 / 0")
    assert result == Result("error", "before\n", "ZeroDivisionError: division by zero", result.duration_s)
    assert sandbox.run("x = (").error.startswith("SyntaxError: ")


def test_later_cells_see_earlier_definitions_but_not_their_output(sandbox):
    history: tuple[str, ...] = ()
    for code in ("x = 6\nprint('noise')", "def double(v):\n    return 2 * v"):
        result = sandbox.run(code, history)
        history = next_history(history, code, result)
    assert sandbox.run("print(double(x) + 30)", history).output == "42\n"


def test_failed_cell_is_not_replayed(sandbox):
    code = "y = 1\n1 / 0"
    result = sandbox.run(code)
    history = next_history((), code, result)
    assert result.status == "error" and history == ()
    assert sandbox.run("print('y' in dir())", history).output == "False\n"


def test_forked_trajectories_keep_independent_histories(sandbox):
    root = ("a = 1",)
    left = next_history(root, "a += 1", sandbox.run("a += 1", root))
    right = next_history(root, "a += 10", sandbox.run("a += 10", root))
    results = sandbox.run_batch([("print(a)", left), ("print(a)", right), ("print(a)", root)])
    assert [r.output for r in results] == ["2\n", "11\n", "1\n"]


def test_replay_is_deterministic_across_servers(sandbox):
    code = "import random\nr = random.random()\ns = sorted('abcdefgh', key=lambda c: hash(c))\nprint(r, s)"
    first = sandbox.run(code)
    namespaces = sandbox.isolation.processes == "pidns"
    with Sandbox(SandboxOptions(**OPTIONS, namespaces=namespaces)) as other:  # a new interpreter
        assert other.run("print(r, s)", (code,)).output == first.output


@pytest.mark.slow
def test_slow_cell_does_not_hold_back_others(sandbox):
    slow = sandbox.submit("while True:\n    pass")
    fast = sandbox.submit("print('fast')")
    assert fast.result().output == "fast\n"
    assert not slow.done()
    assert slow.result().status == "timeout"


@pytest.mark.slow
@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "fallback"])
def test_long_running_cell_is_demoted(namespaces):
    options = {**OPTIONS, "demote_after_s": 0.05, "concurrency": 1}  # one slot: the next cell reuses it
    with Sandbox(SandboxOptions(**options, namespaces=namespaces)) as sb:
        code = "import os, time\nend = time.monotonic() + 1.0\nwhile time.monotonic() < end:\n    pass\n"
        assert sb.run(code + "print(os.nice(0))").output == "19\n"
        assert sb.run("import os\nprint(os.nice(0))").output == "0\n"


def test_async_and_batch_apis(sandbox):
    async def main():
        return await asyncio.gather(*(sandbox.arun(f"print({i} ** 2)") for i in range(6)))

    assert [r.output for r in asyncio.run(main())] == [f"{i**2}\n" for i in range(6)]
    results = sandbox.run_batch([(f"print({i})", ()) for i in range(6)])
    assert [r.output for r in results] == [f"{i}\n" for i in range(6)]


def test_fallback_reports_its_isolation():
    with Sandbox(SandboxOptions(**OPTIONS, namespaces=False)) as sb:
        assert sb.isolation == Isolation("audit-hook", "subreaper", "per-slot-uid")
        # Without a network namespace, a fresh interpreter would not carry the audit hook: no programs.
        assert "blocked" in sb.run("import subprocess\nsubprocess.run(['true'])").error


@pytest.mark.slow
@pytest.mark.parametrize("namespaces", [True, False], ids=["namespaces", "fallback"])
def test_server_death_fails_in_flight_cells_and_recovers(namespaces):
    others = _servers()  # the module's sandbox may be alive too
    with Sandbox(SandboxOptions(**OPTIONS, namespaces=namespaces)) as sb:
        in_flight = sb.submit("import time\ntime.sleep(30)")
        time.sleep(0.3)
        servers = {pid: line for pid, line in _servers().items() if pid not in others}
        assert len(servers) == 1 and _cell_processes(servers)
        os.kill(int(next(iter(servers))), signal.SIGKILL)
        assert in_flight.result() == Result("killed", "", "sandbox server exited", 0.0)
        assert _wait_until_no_cell_processes(servers) == []
        _assert_healthy(sb)


def test_close_kills_running_cells():
    others = _servers()
    sb = Sandbox(SandboxOptions(**OPTIONS))
    running = sb.submit("import time\ntime.sleep(30)")
    time.sleep(0.3)
    servers = {pid: line for pid, line in _servers().items() if pid not in others}
    assert _cell_processes(servers)
    sb.close()
    assert running.result() == Result("killed", "", "sandbox closed", 0.0)
    assert _cell_processes(servers) == []  # close() returns once they are gone
    with pytest.raises(RuntimeError, match="closed"):
        sb.submit("pass")


@pytest.mark.slow
def test_close_removes_what_a_dead_server_left():
    others = _servers()
    sb = Sandbox(SandboxOptions(**OPTIONS, namespaces=False))  # cells' directories are on the host
    running = sb.submit(DEEP_TREE + "os.chdir(top)\nopen('ready', 'w')\nimport time\ntime.sleep(30)")
    ((server, cmdline),) = [(p, line) for p, line in _servers().items() if p not in others]
    workroot = cmdline.split(b"\0")[-3].decode()  # argv ends with the workroot and the config
    deadline = time.monotonic() + TIMEOUT_S
    while not glob.glob(f"{workroot}/cell-*/ready") and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(int(server), signal.SIGKILL)
    assert running.result().status == "killed"
    assert os.path.isdir(workroot)
    sb.close()
    assert not os.path.exists(workroot)  # with its 3000-deep tree, too deep for a recursive rmtree


@pytest.mark.parametrize(
    "field, value",
    [("timeout_s", 0), ("timeout_s", float("inf")), ("cpu_time_s", 0), ("memory_bytes", 1000),
     ("max_processes", 0), ("max_output_bytes", 1), ("concurrency", 0), ("concurrency", True),
     ("demote_after_s", -1), ("uid_base", 2**32 - 3), ("uid_base", 0), ("namespaces", 1),
     ("allow_shared_uid", "no"), ("preload", ["numpy"]), ("preload", ("not a module",))],
)  # fmt: skip
def test_options_are_validated(field, value):
    with pytest.raises(ValueError, match=f"SandboxOptions.{field}"):
        SandboxOptions(**{field: value})
    with pytest.raises(ValueError, match="SandboxOptions.concurrency"):  # more slots than a random range
        SandboxOptions(concurrency=5000)


def test_preload_imports_modules_once_in_the_server(sandbox):
    code = "import sys\nprint('fractions' in sys.modules)"
    assert sandbox.run(code).output == "False\n"
    with Sandbox(SandboxOptions(**OPTIONS, preload=("fractions",))) as sb:
        assert sb.run(code).output == "True\n"


def test_preload_failure_names_the_field():
    with pytest.raises(ValueError, match="SandboxOptions.preload"):
        Sandbox(SandboxOptions(preload=("no_such_module_xyz",)))


def test_submit_validates_its_arguments(sandbox):
    with pytest.raises(ValueError, match="code"):
        sandbox.submit(b"print(1)")
    with pytest.raises(ValueError, match="history"):
        sandbox.submit("pass", "x = 1")
    with pytest.raises(ValueError, match=r"history\[1\]"):
        sandbox.submit("pass", ["x = 1", 2])
