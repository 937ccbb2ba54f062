"""The sandbox stops or contains hostile generated programs, scores them as failures, and the
harness keeps going. Containment of writes and processes needs root (a uid to drop to)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import pytest

from qwenkit.eval.sandbox import UID_BASE, Limits, run_python

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="write and process containment drop to another uid (root only)")


def _still_works():
    assert run_python("print(6 * 7)").stdout.strip() == "42"


def test_plain_program_runs_in_a_temporary_home():
    out = run_python("import os; print(os.getcwd()); print(os.environ['HOME'])")
    cwd, home = out.stdout.split()
    assert out.ok and cwd == home and "qwenkit-sandbox-" in cwd and not os.path.exists(cwd)


def test_infinite_loop_times_out():
    out = run_python("while True:\n    pass\n", Limits(timeout=2))
    assert out.status == "timeout" and out.seconds < 10
    _still_works()


def test_ten_gigabytes_are_refused():
    out = run_python("x = bytearray(10 * 2**30)\nprint('allocated')", Limits(memory=1 << 30))
    assert out.status == "error" and "MemoryError" in out.stderr and "allocated" not in out.stdout
    _still_works()


def test_huge_file_is_cut_at_the_size_limit():
    out = run_python("with open('big', 'wb') as f:\n    f.write(b'x' * (64 << 20))\n", Limits(file_size=1 << 20))
    assert not out.ok


def test_socket_to_a_loopback_listener_fails():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(5)
    port = server.getsockname()[1]
    accepted = []
    waiter = threading.Thread(target=lambda: _accept(server, accepted))
    waiter.start()
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')"
    out = run_python(code, Limits(timeout=10))
    waiter.join()
    server.close()
    assert not out.ok and "connected" not in out.stdout and not accepted


def _accept(server, accepted):
    try:
        accepted.append(server.accept())
    except OSError:
        pass


@needs_root
def test_deleting_a_file_outside_the_sandbox_fails(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    out = run_python(f"import os, shutil\nos.remove({str(victim)!r})\n")
    assert not out.ok and "PermissionError" in out.stderr
    out = run_python(f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n")
    assert not out.ok and victim.read_text() == "precious"


@needs_root
def test_fork_bomb_is_bounded_and_cleaned_up():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    out = run_python(bomb, Limits(timeout=3, processes=16), slot=7)
    assert out.status == "timeout"
    assert _live_processes(UID_BASE + 7) == []
    _still_works()


def _live_processes(uid: int, wait: float = 10.0) -> list[str]:
    """Processes of `uid` that are not zombies (killed ones wait for init to reap them)."""
    deadline = time.monotonic() + wait
    while True:
        ps = subprocess.run(["ps", "-o", "stat=", "-u", str(uid)], capture_output=True, text=True).stdout
        live = [s for s in ps.split() if not s.startswith("Z")]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.2)


@needs_root
def test_runs_as_an_unprivileged_uid():
    out = run_python("import os; print(os.getuid())", slot=3)
    assert out.stdout.strip() == str(UID_BASE + 3)
