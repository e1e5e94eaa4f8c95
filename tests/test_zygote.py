"""The tests' forking ``python`` (tests/zygote.py) behaves as a new interpreter does where the tests rely on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT, process_of, python

pytestmark = pytest.mark.skipif(python() == sys.executable, reason="BYOL_TEST_REAL_PYTHON=1: no launcher")

PROBE = textwrap.dedent("""
    import json, os, sys, random, torch
    from lightning_fabric.utilities.rank_zero import rank_zero_only
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": os.environ.get("PROBE"), "path0": sys.path[0],
                      "rank": rank_zero_only.rank, "threads": torch.get_num_threads(), "random": random.random(),
                      "executable": sys.executable, "pid": os.getpid()}))
    print("to stderr", file=sys.stderr)
    sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
""")


def both(args, **kwargs) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    return tuple(subprocess.run([exe, *args], capture_output=True, text=True, timeout=300, **kwargs)
                 for exe in (python(), sys.executable))


def test_a_command_gets_the_callers_arguments_folder_environment_and_exit_status(tmp_path):
    import json

    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = dict(os.environ, PROBE="yes", RANK="1", OMP_NUM_THREADS="1")
    forked, real = both([str(script), "7"], cwd=tmp_path, env=env)
    assert forked.returncode == real.returncode == 7
    assert forked.stderr == real.stderr == "to stderr\n"
    mine, theirs = json.loads(forked.stdout), json.loads(real.stdout)
    for key in ("argv", "cwd", "env", "path0", "rank", "threads"):
        assert mine[key] == theirs[key], key
    assert mine["executable"] == python()  # the command's own processes are forked too
    assert mine["pid"] != theirs["pid"]
    again = json.loads(subprocess.run([python(), str(script)], capture_output=True, text=True, env=env).stdout)
    assert again["random"] != mine["random"]  # random seeded anew, as in a new process


def test_module_code_and_standard_input_forms_run_as_main():
    assert both(["-c", "import sys; print(sys.argv, __name__)", "a"])[0].stdout == "['-c', 'a'] __main__\n"
    forked, real = both(["-", "x"], input="import sys; print(sys.argv, __name__)\n")
    assert forked.stdout == real.stdout == "['-', 'x'] __main__\n"
    forked, real = both(["-m", "json.tool"], input='{"a": 1}')
    assert forked.stdout == real.stdout and forked.returncode == real.returncode == 0
    forked, real = both(["-c", "raise ValueError('boom')"])
    assert forked.returncode == real.returncode == 1 and forked.stderr.splitlines()[-1] == "ValueError: boom"


def test_an_interpreter_option_gets_a_real_interpreter():
    forked = subprocess.run([python(), "-X", "importtime", "-c", "pass"], capture_output=True, text=True)
    assert forked.returncode == 0 and "import time:" in forked.stderr


def test_signals_reach_the_command_and_the_caller_ends_as_it_ends(tmp_path):
    handled = ("import os, signal, sys, time\n"  # os.write: a print may be inside the print of 'ready' still
               "signal.signal(signal.SIGTERM, lambda *_: (os.write(1, b'got TERM\\n'), sys.exit(143)))\n"
               "print('ready', flush=True)\nwhile True: time.sleep(0.05)\n")
    # short sleeps: a signal that lands between the print and a long sleep is handled only when the sleep ends
    waiting = "import time\nprint('ready', flush=True)\nwhile True: time.sleep(0.05)\n"
    for code, sig, status, out in ((handled, signal.SIGTERM, 143, "ready\ngot TERM\n"),
                                   (waiting, signal.SIGINT, -signal.SIGINT, "ready\n"),
                                   (waiting, signal.SIGUSR1, -signal.SIGUSR1, "ready\n")):
        proc = subprocess.Popen([python(), "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == status and "ready\n" + rest == out


def test_a_killed_caller_takes_its_command_with_it():
    proc = subprocess.Popen([python(), "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "ready\n"
    child = process_of(proc.pid)
    assert child != proc.pid
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{child}") and "Z" not in open(f"/proc/{child}/stat").read().split()[2]:
        assert time.monotonic() < deadline, "the forked command outlived its caller"
        time.sleep(0.05)


def test_passed_descriptors_are_the_commands(tmp_path):
    read, write = os.pipe()
    try:
        proc = subprocess.run([python(), "-c", f"import os; os.write({write}, b'through')"], pass_fds=(write,),
                              cwd=ROOT, timeout=120)
        assert proc.returncode == 0
        os.close(write)
        write = -1
        assert os.read(read, 100) == b"through"
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)
