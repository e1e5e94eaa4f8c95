"""A ``python`` for the tests' own processes that skips the ~8 s of importing torch and Lightning.

A new interpreter on a 2-core test machine spends most of a smoke run importing torch, torchvision and
Lightning. Here one server process per test worker imports them once; ``python ARGS`` through the launcher
this module writes (:func:`launcher`) asks the server to fork a child that runs ARGS, with the caller's
command line, environment, working folder, open files, signal mask and ignored signals. The caller (the
launcher's own small process, whose pid the test holds) forwards the signals it gets to the child, and
ends as the child ends: with its exit status, or killed by the same signal. A child's own ``python``
(``sys.executable``: Lightning's and torchrun's ranks, submitit's jobs) goes through the launcher too.

It is a stand-in for a new process and is used where the process is not the subject: a test of what a
process imports, or of an interpreter option, runs the real interpreter (the launcher falls back to it
for any option other than ``-u``/``-B``, when the server is not there, and for ``-m pip``). What differs
from a new process: the child's parent is a waiter process, not the caller, its ``/proc`` command line is
the server's, and the children of one server share its string-hash seed (unless ``PYTHONHASHSEED`` is set).

    python tests/zygote.py serve FOLDER        # the server, its socket FOLDER/sock (started by :func:`start`)
    python tests/zygote.py run FOLDER ARGS     # a client (the launcher FOLDER/python runs this)
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import sys

FORWARDED = [s for s in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGCONT", "SIGALRM")
             if hasattr(signal, s)]
# what the server imports once; a child imports the rest itself
PRELOAD = ("numpy", "PIL.Image", "torch", "torchvision", "pytorch_lightning", "torchmetrics", "hydra",
           "omegaconf", "hydra.core.global_hydra", "hydra._internal.utils", "matplotlib", "matplotlib.pyplot")
# read by the interpreter or a preloaded library at start: a child asking for other values gets a real start
START_ENV = ("PYTHONHASHSEED", "PYTHONWARNINGS", "PYTHONOPTIMIZE", "PYTHONDEVMODE", "PYTHONUTF8", "PYTHONHOME",
             "PYTHONIOENCODING", "PYTHONNOUSERSITE", "PYTHONSAFEPATH", "PYTHONFAULTHANDLER", "PYTHONMALLOC",
             "LD_PRELOAD", "LD_LIBRARY_PATH", "MPLBACKEND", "MPLCONFIGDIR", "CUDA_VISIBLE_DEVICES")


# ---------------------------------------------------------------------------------------------- the client

def _real(args: list[str]) -> None:
    os.execv(sys.executable, [sys.executable, *args])


def _plan(args: list[str]) -> dict | None:
    """What to run (``{"kind": script|module|code|stdin, ...}``), or None where only a real start will do."""
    flags, rest = [], list(args)
    while rest and rest[0] in ("-u", "-B"):
        flags.append(rest.pop(0))
    if not rest:
        return None
    head = rest[0]
    if head == "-m" and len(rest) > 1 and rest[1] not in ("pip", "ensurepip", "venv"):
        return {"kind": "module", "target": rest[1], "argv": rest[2:], "flags": flags}
    if head == "-c" and len(rest) > 1:
        return {"kind": "code", "target": rest[1], "argv": rest[2:], "flags": flags}
    if head == "-":
        return {"kind": "stdin", "target": "-", "argv": rest[1:], "flags": flags}
    if not head.startswith("-"):
        return {"kind": "script", "target": head, "argv": rest[1:], "flags": flags}
    return None


def client(path: str, args: list[str]) -> None:
    plan = _plan(args)
    if plan is None or any(os.environ.get(k) != v for k, v in _server_env(path).items()):
        _real(args)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(os.path.join(path, "sock"))
    except OSError:
        _real(args)
    pending: list[int] = []
    child = [0]

    def forward(signum, _frame):
        if not child[0]:
            pending.append(signum)
            return
        try:
            os.kill(child[0], signum)
        except ProcessLookupError:  # it has just ended: its status is on the way
            pass

    ignored = [s for s in FORWARDED + ["SIGPIPE", "SIGXFSZ", "SIGCHLD"]
               if hasattr(signal, s) and signal.getsignal(getattr(signal, s)) == signal.SIG_IGN]
    for name in FORWARDED:
        if name not in ignored:
            signal.signal(getattr(signal, name), forward)
    fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) != conn.fileno())
    fds = [fd for fd in fds if _is_open(fd)]
    if len(fds) > 250:  # more than one message can carry (the kernel's SCM_MAX_FD is 253)
        _real(args)
    request = dict(plan, launcher=os.path.join(path, "python"), caller=os.getpid(), cwd=os.getcwd(),
                   env=dict(os.environ), fds=fds,
                   inheritable=[os.get_inheritable(fd) for fd in fds], ignored=ignored,
                   blocked=sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])))
    body = json.dumps(request).encode()
    conn.sendmsg([len(body).to_bytes(8, "big")], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    conn.sendall(body)
    reader = conn.makefile("r")
    child[0] = int(reader.readline())
    for signum in pending:
        forward(signum, None)
    end = reader.readline().split()
    if not end:  # the server went away: the child was killed with it
        os._exit(255)
    if end[0] == "signal":
        signum = int(end[1])
        if signum not in (signal.SIGKILL, signal.SIGSTOP):  # the two whose handling cannot be set
            signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
    os._exit(int(end[1]))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _server_env(path: str) -> dict:
    with open(os.path.join(path, "env.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- the server

def serve(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(path, "sock"))
    listener.listen(64)
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    base_path = [p for p in sys.path[1:] if p not in os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the waiters are reaped by the kernel
    parent = os.getppid()
    listener.settimeout(1.0)
    while os.getppid() == parent:  # ends with the test worker that started it
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        conn.settimeout(None)
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            _wait_for(conn, base_path)
        conn.close()


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    head, ancillary, _, _ = conn.recvmsg(8, socket.CMSG_SPACE(1024 * array.array("i").itemsize))
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    size, body = int.from_bytes(head, "big"), b""
    while len(body) < size:
        body += conn.recv(size - len(body))
    return json.loads(body), list(fds)


def _wait_for(conn: socket.socket, base_path: list[str]) -> None:
    """The waiter: forks the child, tells the client its pid and, later, how it ended; kills it if the
    client is killed first (a test's ``proc.kill()``)."""
    import select

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    request, received = _receive(conn)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _become(request, received, base_path)
    for fd in received:
        os.close(fd)
    conn.sendall(f"{pid}\n".encode())
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if select.select([conn], [], [], 0.05)[0] and not conn.recv(1):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os._exit(0)
    if os.WIFSIGNALED(status):
        conn.sendall(f"signal {os.WTERMSIG(status)}\n".encode())
    else:
        conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def _become(request: dict, received: list[int], base_path: list[str]) -> None:
    """The child: the caller's files, folder, environment and signals, then the command as ``__main__``."""
    pids = os.path.join(os.path.dirname(request["launcher"]), "pids", str(request["caller"]))
    with open(pids, "w") as f:  # for process_of(), before the command can say it is ready
        f.write(str(os.getpid()))
    targets, inheritable = request["fds"], request["inheritable"]
    high = [_dup_above(fd, max(targets + [2]) + 1) for fd in received]
    for fd in received:
        os.close(fd)
    for fd in (0, 1, 2):
        if fd not in targets:
            os.close(fd)
    for src, dst, keep in zip(high, targets, inheritable, strict=True):
        os.dup2(src, dst, inheritable=keep)
        os.close(src)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for num in range(1, signal.NSIG):
        try:
            signal.signal(num, signal.SIG_DFL)
        except (OSError, ValueError):
            pass
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name in ("SIGPIPE", "SIGXFSZ"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    for name in request["ignored"]:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, request["blocked"])
    _fresh_interpreter(request, base_path)
    _run(request)


def _dup_above(fd: int, low: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, max(low, 10))


def _fresh_interpreter(request: dict, base_path: list[str]) -> None:
    import random

    import numpy as np
    import torch

    random.seed()
    np.random.seed()
    from lightning_fabric.utilities import rank_zero

    rank_zero.rank_zero_only.rank = rank_zero._get_rank() or 0  # read from RANK etc. when Lightning is imported
    threads = request["env"].get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        torch.set_num_threads(int(threads))
    _fresh_streams("-u" in request["flags"] or bool(request["env"].get("PYTHONUNBUFFERED")))
    kind, target = request["kind"], request["target"]
    first = os.path.dirname(os.path.abspath(target)) if kind == "script" else (
        os.getcwd() if kind == "module" else "")
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [first, *extra, *base_path]
    sys.executable = request["launcher"]
    sys.argv = [target if kind != "code" else "-c", *request["argv"]]


def _fresh_streams(unbuffered: bool) -> None:
    """New ``sys.stdin/stdout/stderr`` on the caller's descriptors, made as the interpreter makes them at start;
    the logging handlers a preloaded library made on the server's streams write to the new ones."""
    import io
    import logging

    old = {id(sys.stdout): "stdout", id(sys.stderr): "stderr"}
    encoding = sys.stdout.encoding
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        try:
            binary = open(fd, "rb" if fd == 0 else "wb", closefd=False)
        except OSError:  # closed in the caller
            setattr(sys, name, None)
            setattr(sys, f"__{name}__", None)
            continue
        text = io.TextIOWrapper(binary, encoding=encoding, errors="backslashreplace" if fd == 2 else "strict",
                                line_buffering=fd == 2 or (fd == 1 and binary.isatty()),
                                write_through=unbuffered and fd != 0)
        setattr(sys, name, text)
        setattr(sys, f"__{name}__", text)
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and id(handler.stream) in old:
                handler.setStream(getattr(sys, old[id(handler.stream)]))


def _run(request: dict) -> None:
    import atexit
    import runpy
    import threading
    import types

    code, by_signal = 0, 0
    try:
        kind, target = request["kind"], request["target"]
        if kind == "script":
            runpy.run_path(target, run_name="__main__")
        elif kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            source = sys.stdin.read() if kind == "stdin" else target
            main = types.ModuleType("__main__")
            main.__dict__["__builtins__"] = __builtins__
            sys.modules["__main__"] = main
            exec(compile(source, "<stdin>" if kind == "stdin" else "<string>", "exec"), main.__dict__)
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        by_signal = signal.SIGINT
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    if by_signal:
        signal.signal(by_signal, signal.SIG_DFL)
        os.kill(os.getpid(), by_signal)
    os._exit(code)


def _exit_code(value) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------------------- for tests

_STARTED: list[str] = []


def launcher() -> str:
    """This process's launcher, its server started at the first call and ended with this process."""
    if not _STARTED:
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="byol-zygote-")
        path, server = start(folder)
        atexit.register(lambda: (server.kill(), server.wait(), shutil.rmtree(folder, ignore_errors=True)))
        _STARTED.append(path)
    return _STARTED[0]


def process_of(pid: int) -> int:
    """The process that runs the command of the launcher with this pid (itself if it is not one)."""
    try:
        with open(os.path.join(os.path.dirname(_STARTED[0]), "pids", str(pid))) as f:
            return int(f.read())
    except (IndexError, OSError, ValueError):
        return pid


def start(folder: str):
    """Start a server for this process (ended with it) and return the launcher to use as ``python``."""
    import subprocess
    import time

    os.makedirs(os.path.join(folder, "pids"), exist_ok=True)
    with open(os.path.join(folder, "env.json"), "w") as f:
        json.dump({k: os.environ.get(k) for k in START_ENV}, f)
    launcher = os.path.join(folder, "python")
    with open(launcher, "w") as f:
        f.write(f'#!/bin/sh\nexec "{sys.executable}" -I -S "{os.path.abspath(__file__)}" run "{folder}" "$@"\n')
    os.chmod(launcher, 0o755)
    log = open(os.path.join(folder, "server.log"), "w")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # a child sets its own count
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", folder],
                              stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
    log.close()  # the server holds its own copy
    deadline = time.monotonic() + 30  # bound before its imports: from then on a client waits for it
    while not os.path.exists(os.path.join(folder, "sock")) and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return launcher, server


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        client(sys.argv[2], sys.argv[3:])
