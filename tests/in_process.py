"""``python train.py ARGS`` / ``python evaluate.py ARGS`` run inside the test worker.

A new Python process spends ~8 s of a 2-core machine importing torch, torchvision and Lightning before a
smoke run's ~3 s of work; most end-to-end tests only need what the command prints, its exit status and the
files it writes, which this gives in ~3 s. It runs the very entry script (``runpy``, as ``__main__``), with the
command line, environment and working folder a process would have, and hands back a
``subprocess.CompletedProcess`` as ``subprocess.run(..., capture_output=True, text=True)`` would.

What a process would start fresh is made fresh for each run, and what the run changes in this one is put back:
the project's per-process records (claimed run folders, the command's own folders), Hydra's global state,
the warning filters (a fresh interpreter's, so a warning shows once a run, on stderr as a process prints
it), logging's console handlers (onto the captured streams), the signal handlers, torch's thread count,
determinism flag and random states. The project's own exit hooks run as the command ends, as they would at
the process's exit. Tests of what only a real process shows (signals, locks held by another process, DDP
ranks, launchers, what is imported) start one instead.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import random
import runpy
import signal
import subprocess
import sys
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from conftest import ROOT


def _interpreter_warning_filters() -> list:
    """The filters a new interpreter starts with (no ``-W``): deprecations shown from ``__main__`` only."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for category in (ResourceWarning, ImportWarning, PendingDeprecationWarning, DeprecationWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        return list(warnings.filters)


_FRESH_WARNING_FILTERS = _interpreter_warning_filters()
_EARLIER_STDOUTS: list[io.StringIO] = []  # where Hydra's console handler of an earlier run still writes
_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None),
                             getattr(signal, "SIGHUP", None)) if s is not None)


def _fresh_process_state() -> None:
    """The project's module-level records of "this process" emptied, as a new process starts them."""
    from byol.jobs import cli, command_folders, console

    cli._CLAIMED.clear()
    command_folders._kept_record.clear()
    command_folders._new_folders.clear()
    console._WATCHED.clear()


def _console_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers if type(h) is logging.StreamHandler]


def _ours(fn) -> bool:
    """An exit hook of the project's (run as the command ends); a library's stays for the worker's own exit."""
    return getattr(fn, "__module__", "").startswith("byol")


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _exit_status(code) -> int:
    """``sys.exit(code)``'s status as the process would end with it (a message is printed, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


@contextlib.contextmanager
def _kept_as_it_was(env: Mapping[str, str] | None, cwd: Path):
    """The environment, argv, folder, signal handlers, torch settings and random states put back afterwards."""
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    saved_signals = {s: signal.getsignal(s) for s in _SIGNALS}
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    streams = {h: h.stream for h in _console_handlers()}
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        os.chdir(cwd)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        for s, handler in saved_signals.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for handler, stream in streams.items():
            handler.setStream(stream)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()


def run_here(*command: str, env: Mapping[str, str] | None = None, cwd: str | Path = ROOT,
             ) -> subprocess.CompletedProcess:
    """``command`` is ``("train.py", *args)`` or ``("evaluate.py", *args)`` (a path, relative to ``cwd``), as after
    ``python`` on a command line; ``env`` replaces the environment for the run (default: this one)."""
    script, args = str(Path(cwd) / command[0]), list(command[1:])
    out, err = io.StringIO(), io.StringIO()
    exit_hooks: list = []
    status = 0
    with _kept_as_it_was(env, Path(cwd)):
        _fresh_process_state()
        sys.argv = [script, *args]
        for handler in _console_handlers():
            to_stdout = any(handler.stream is s for s in (sys.stdout, sys.__stdout__, *_EARLIER_STDOUTS))
            handler.setStream(out if to_stdout else err)
        _EARLIER_STDOUTS[:] = [out]
        register = atexit.register
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.filters[:] = _FRESH_WARNING_FILTERS
            warnings._filters_mutated()  # each run shows a warning once again, as a new process would
            warnings.showwarning = _print_warning
            atexit.register = lambda fn, *a, **k: (exit_hooks.append((fn, a, k)) if _ours(fn)
                                                   else register(fn, *a, **k)) or fn
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as e:
                status = _exit_status(e.code)
            except Exception:  # a process prints the traceback and ends with status 1
                traceback.print_exc()
                status = 1
            finally:
                atexit.register = register
                for fn, a, k in reversed(exit_hooks):
                    fn(*a, **k)
    return subprocess.CompletedProcess(["python", *command], status, out.getvalue(), err.getvalue())
