"""Run untrusted generated code in a separate, limited process and report how it ended.

What each layer does (and does not do):

- a fresh process per program, its own session (killed as a group at the deadline), a wall-clock
  timeout, and RLIMIT_CPU / RLIMIT_AS (memory) / RLIMIT_FSIZE (file size) / RLIMIT_NPROC (processes);
- a temporary working directory that is also HOME and TMPDIR, removed afterwards, and an
  environment with nothing of the caller's (no PATH tricks, `python -I` ignores PYTHON* vars);
- no network: as root the child enters a new network namespace (only a down loopback: every connect
  fails); otherwise `unshare(CLONE_NEWUSER | CLONE_NEWNET)` when the kernel allows it; and always an
  audit hook in the child that refuses to create sockets (a second layer, bypassable by ctypes);
- as root the child drops to its own unprivileged uid/gid (60000 + slot), so it cannot write or delete
  files it does not own and RLIMIT_NPROC really binds (root ignores RLIMIT_NPROC); after the run
  every process of that uid is killed, so a fork bomb that escaped the session leaves nothing behind.

Not contained: reading world-readable files (the uid change blocks writes, not reads), CPU and
memory pressure up to the limits, and — when not root — deleting the caller's own files (only the
working directory changes). Run evaluations as root in a container, or in a VM, for real isolation.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
UID_BASE = 60000
# Opened here, not in the forked child: dlopen there could wait on a lock another thread held at fork.
_LIBC = ctypes.CDLL(None, use_errno=True)

# Runs in the child before the program: the socket refusal hook (audit events cannot be removed).
_BOOT = """\
import sys
def _deny(event, args):
    if event in ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo"):
        raise PermissionError("network access is disabled in the sandbox")
sys.addaudithook(_deny)
sys.argv = sys.argv[1:]
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclass(frozen=True)
class Limits:
    timeout: float = 10.0  # wall-clock seconds
    memory: int = 2 << 30  # bytes of address space
    file_size: int = 16 << 20  # bytes per file written
    processes: int = 32  # processes of the sandbox uid (root only; see module doc)


@dataclass
class Outcome:
    status: str  # "ok" (exit 0), "error" (non-zero exit), "timeout"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    files: dict[str, bytes] = field(default_factory=dict)  # the `collect` files the program left

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_python(code: str, limits: Limits = Limits(), slot: int = 0, files: dict[str, bytes] | None = None,
               collect: tuple[str, ...] = ()) -> Outcome:
    """Run `code` as a script in a fresh sandbox; `files` are written into its working dir first,
    and the `collect` files it leaves there come back in Outcome.files. Give concurrent runs
    different `slot`s (as root each slot is its own uid, so process limits do not add up)."""
    workdir = tempfile.mkdtemp(prefix="qwenkit-sandbox-")
    uid = UID_BASE + slot if os.geteuid() == 0 else None
    try:
        for name, data in {"main.py": code.encode(), **(files or {})}.items():
            with open(os.path.join(workdir, name), "wb") as f:
                f.write(data)
        if uid is not None:
            _chown_tree(workdir, uid)
        outcome = _run(workdir, limits, uid)
        for name in collect:
            path = os.path.join(workdir, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    outcome.files[name] = f.read()
        return outcome
    finally:
        if uid is not None:
            _kill_uid(uid)
        shutil.rmtree(workdir, ignore_errors=True)


def _run(workdir: str, limits: Limits, uid: int | None) -> Outcome:
    argv = [_interpreter(uid), "-I", "-c", _BOOT, "main.py"]
    env = {"HOME": workdir, "TMPDIR": workdir, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    start = time.monotonic()
    # Output goes to files, not pipes: RLIMIT_FSIZE then bounds a program that prints forever.
    with open(os.path.join(workdir, ".stdout"), "w+b") as out, open(os.path.join(workdir, ".stderr"), "w+b") as err:
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, preexec_fn=lambda: _enter(limits, uid))
        try:
            proc.wait(timeout=limits.timeout)
            status = "ok" if proc.returncode == 0 else "error"
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            status = "timeout"
        _kill_group(proc.pid)  # grandchildren left in the session
        return Outcome(status, proc.returncode, _tail(out), _tail(err), time.monotonic() - start)


def _enter(limits: Limits, uid: int | None) -> None:
    """In the forked child, before exec: namespaces, limits, then the unprivileged uid."""
    _isolate_network(as_root=uid is not None)
    cpu = int(limits.timeout) + 1
    for rlimit, value in [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, limits.memory),
                          (resource.RLIMIT_FSIZE, limits.file_size), (resource.RLIMIT_CORE, 0)]:
        resource.setrlimit(rlimit, (value, value))
    if uid is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def _isolate_network(as_root: bool) -> None:
    """A private network namespace; silently skipped where the kernel refuses (the audit hook remains)."""
    _LIBC.unshare(CLONE_NEWNET if as_root else CLONE_NEWUSER | CLONE_NEWNET)


def _interpreter(uid: int | None) -> str:
    """An interpreter the sandbox uid can execute: ours if every directory on its path is
    world-traversable, else the system python (a pyenv under /root is not)."""
    exe = os.path.realpath(sys.executable)
    if uid is None or _world_reachable(exe):
        return exe
    for candidate in (f"/usr/bin/python{sys.version_info[0]}.{sys.version_info[1]}", "/usr/bin/python3"):
        if os.path.exists(candidate) and _world_reachable(os.path.realpath(candidate)):
            return candidate
    return exe


def _world_reachable(path: str) -> bool:
    parts = path.split(os.sep)
    dirs = [os.sep.join(parts[:i]) or os.sep for i in range(1, len(parts))]
    return all(os.stat(d).st_mode & 0o001 for d in dirs) and bool(os.stat(path).st_mode & 0o005)


def _chown_tree(path: str, uid: int) -> None:
    for root, dirs, files in os.walk(path):
        for name in [root, *[os.path.join(root, n) for n in dirs + files]]:
            os.chown(name, uid, uid)
    os.chmod(path, 0o700)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_uid(uid: int) -> None:
    """kill(-1) from a process running as `uid` reaches every process of that uid, and only those."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            for _ in range(3):
                os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _tail(f, limit: int = 20000) -> str:
    f.seek(max(0, os.fstat(f.fileno()).st_size - limit))
    return f.read().decode("utf-8", "replace")
