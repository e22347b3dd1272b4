"""acim_fast.common.worker: frames survive any split of the byte stream; a worker booted by path talks frames and
imports nothing of the package."""

import os
import subprocess
import textwrap

from acim_fast.common.worker import FrameDecoder, boot_argv, recv_frame, write_frame

MESSAGES = [{"a": 1}, [], "x" * 70_000, {"nested": {"ü": [1.5, None, True]}}]  # one body over a pipe buffer


def test_frames_round_trip_through_a_pipe_and_eof_and_timeout_give_none():
    r, w = os.pipe()
    try:
        assert recv_frame(r, timeout=0.05) is None  # nothing written yet
        pid = os.fork()
        if pid == 0:  # the writer: a 70 kB frame would block a single-threaded write-then-read
            os.close(r)
            for m in MESSAGES:
                write_frame(w, m)
            os._exit(0)
        os.close(w)
        w = -1
        assert [recv_frame(r, timeout=10) for _ in MESSAGES] == MESSAGES
        assert recv_frame(r) is None  # EOF
        os.waitpid(pid, 0)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_frame_decoder_reassembles_frames_split_anywhere():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        for m in MESSAGES:
            write_frame(w, m)
        os._exit(0)
    os.close(w)
    stream = b""
    while chunk := os.read(r, 1 << 16):
        stream += chunk
    os.close(r)
    os.waitpid(pid, 0)
    for step in (1, 3, 4, 4096, len(stream)):
        decoder, got = FrameDecoder(), []
        for i in range(0, len(stream), step):
            got += decoder.feed(stream[i:i + step])
        assert got == MESSAGES, step


def test_a_worker_booted_by_path_talks_frames_without_importing_the_package(tmp_path):
    worker = tmp_path / "echo_worker.py"
    worker.write_text(textwrap.dedent("""
        import sys
        from _acim_worker import recv_frame, write_frame

        def main(tag):
            request = recv_frame(0)
            write_frame(1, {"tag": tag, "echo": request, "name": __name__,
                            "package": sorted(m for m in sys.modules if m.split(".")[0] == "acim_fast")})
    """))
    argv = boot_argv("_test_echo_worker", str(worker), "main", "t1", flags=("-s",))
    assert "_test_echo_worker" in argv
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tmp_path)
    write_frame(proc.stdin.fileno(), {"q": 7})
    proc.stdin.close()
    reply = recv_frame(proc.stdout.fileno(), timeout=30)
    assert proc.wait(timeout=30) == 0
    assert reply == {"tag": "t1", "echo": {"q": 7}, "name": "_test_echo_worker", "package": []}
