"""What a job prints: Lightning's and Hydra's known noise silenced, the project's own warnings as one line, the
console copied into the job's log file, and a DDP process's loss as one line, not torch's traceback."""

from __future__ import annotations

import codecs
import logging
import os
import re
import shlex
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from byol.core.errors import ByolError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # byol/
# the encoding error handler of everything a job or the report writes: a file name's byte that is not UTF-8
# (Python holds it as a lone surrogate, "e\udcff1") written as "e\xff1", as `ls -b` shows it; any other
# character the stream cannot encode as Python's backslashreplace writes it
ESCAPED_NAMES = "byol.escaped-names"


def _escape_bytes(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeEncodeError):
        raise error
    bad = error.object[error.start:error.end]
    shown = "".join(f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                    else c.encode("ascii", "backslashreplace").decode("ascii") for c in bad)
    return shown, error.end


codecs.register_error(ESCAPED_NAMES, _escape_bytes)
# conf/hydra/launcher/*.yaml extend the launcher plugins' schemas of the same names on purpose; Hydra's
# deprecation warning about it (in the sweep's command and again in each joblib worker) asks nothing of a user.
# Set on import: a worker imports this module (through the entry script's job) before it loads the sweep's config
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")


# Lightning messages with nothing for a user to act on, silenced during a run (and restored after)
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # Lightning-internal deprecation (torch >= 2.10)
    r"`training_step` returned `None`",  # train.on_nonfinite=skip skips steps on purpose, and says so
    r"You.re resuming from a checkpoint that ended before",  # IndexBatches resumes mid-epoch itself
    r"Experiment logs directory .* exists and is not empty",  # metrics.csv beside config.yaml, on purpose
    r"Found \d+ module\(s\) in eval mode",  # a frozen encoder evaluates in eval mode on purpose
    # DDP: rank 0 alone scores kNN, and the probes' accuracy is counted on the gathered global batch;
    # the train/* epoch means are logged with sync_dist=True; Lightning warns anyway under DDP at world size 1
    # (benchmarks/throughput.py's ours_ddp peer)
    r"It is recommended to use `self.log\('(monitor/(knn|probe)|train/)",
    r"torch.distributed.nn.functional.all_gather is deprecated",  # inside Lightning's all_gather (torch >= 2.10)
)
LIGHTNING_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero")


@contextmanager
def quiet_lightning():
    """Lightning's banner, tips and known warnings off for the ``with`` block; the [byol] lines say
    what matters. Warning filters and logger levels are restored afterwards."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels, plain_format = [logger.level for logger in loggers], warnings.formatwarning
    with warnings.catch_warnings():
        for pattern in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        warnings.formatwarning = partial(_one_line_warning, plain_format)
        try:
            yield
        finally:
            warnings.formatwarning = plain_format
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def _one_line_warning(plain_format, message, category, filename, lineno, line=None) -> str:
    """The project's own warnings as one ``warning:`` line (they say what to do; the line of source code
    Python prints under a warning would not); other libraries' warnings as Python formats them."""
    if Path(filename).resolve().is_relative_to(PACKAGE_DIR):
        return f"warning: {message}\n"
    return plain_format(message, category, filename, lineno, line)


REPO = Path(__file__).resolve().parents[2]  # where train.py and evaluate.py are


def script_command(name: str) -> str:
    """How to run the entry script ``name`` (train.py, evaluate.py) from here, for the commands the jobs suggest:
    ``python train.py`` in the repository's folder, its whole path elsewhere (pasted in another folder, the
    suggested command found no train.py there)."""
    script = REPO / name
    try:
        here = Path.cwd().resolve() == REPO
    except OSError:  # the current folder was removed
        here = False
    return f"python {name}" if here or not script.is_file() else f"python {shlex.quote(str(script))}"


# What a terminal acts on instead of showing it, in text that may carry a name read from disk or from a file handed
# in: a class folder named with escape sequences set the window's title and cleared the screen as the note naming it
# was printed (others write the clipboard), and bidirectional overrides show a name reversed. Written escaped, as
# Python writes them ("\x1b"); tab, newline, carriage return and the cursor-up of tqdm's progress bars pass.
_ACTIVE = re.compile(r"\x1b(?!\[A)|[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def neutralized(text: str) -> str:
    """``text`` with the characters a terminal would act on (:data:`_ACTIVE`) shown escaped."""
    return _ACTIVE.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text)


class _Neutralizing:
    """A text stream that writes :func:`neutralized` text."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(neutralized(text))
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


class _CopyTo:
    """A text stream that also appends what it writes to ``log`` (progress-bar redraws excepted)."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        if "\r" not in text:  # a progress bar redrawing its line: the console's business only
            self.log.write(neutralized(text))
            self.log.flush()
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def names_printable() -> None:
    """File and folder names that are not valid UTF-8 (Python holds their bytes as lone surrogates) printed
    with their bytes escaped: on a console with strict errors (a UTF-8 locale) the line naming a bad image
    raised UnicodeEncodeError instead, and under LANG=C stderr's backslashreplace wrote ``e\\udcff1``. Raw bytes
    (surrogateescape, stdout under LANG=C) are left as they are: the terminal shows the name itself. Control
    characters are shown escaped (:func:`neutralized`) on both streams."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if getattr(stream, "errors", None) in ("strict", "backslashreplace") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors=ESCAPED_NAMES)
        if not isinstance(stream, _Neutralizing | _CopyTo):
            setattr(sys, name, _Neutralizing(stream))


def name_too_long(e: OSError) -> str:
    """One line for a path the system refuses as too long, shortened: it came from the command line or from a
    file handed in (a run's config.yaml), and it may be thousands of characters long."""
    path = os.fsdecode(e.filename) if isinstance(e.filename, str | bytes) else ""
    shown = path if len(path) <= 120 else f"{path[:80]}...{path[-30:]}"
    return (f"a path is longer than this system allows ({e.strerror}: '{shown}', {len(path):,} characters; a name may "
            f"have 255 bytes, a path 4,096); give a shorter one (data.root, pretrained=, resume=, or the data.root "
            f"in the config.yaml of the run it came from)")


@contextmanager
def console_copied_to(path: Path):
    """The job's console lines (stdout, and stderr's error lines) also in ``path`` (Hydra's job log)."""
    names_printable()
    try:
        log = open(path, "a", encoding="utf-8", errors=ESCAPED_NAMES)
    except OSError:  # an unwritable folder is reported by the job itself
        yield
        return
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _CopyTo(stdout, log), _CopyTo(stderr, log)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        log.close()


# what torch says when a process of the run is gone mid-collective (gloo over TCP; NCCL raises a DistError)
PEER_LOST = re.compile(r"Connection (?:reset|closed) by peer|Broken pipe|NCCL communicator was aborted")


class OtherProcessLost(ByolError):
    """A process of this DDP run is gone: this one stops too; not a failure of the model it was evaluating."""


def lost_message(world_size: int, said: str, kept: str) -> str:
    return (f"another process of this {world_size}-process run stopped ({said}); its own output or the scheduler's "
            f"says why (killed, out of memory, its machine lost), and this one stops too: {kept}")


def how_it_ended(rank: int, status: int) -> str:
    """A child process's end in words: a negative status is the signal that killed it."""
    import signal

    if status >= 0:
        return f"rank {rank} ended with status {status}"
    try:
        return f"rank {rank} was killed by {signal.Signals(-status).name}"
    except ValueError:
        return f"rank {rank} was killed by signal {-status}"


_WATCHED: list[tuple[int, Callable[[], str]]] = []  # the open other_processes_lost's (world size, kept), innermost last
LOST_GRACE_S = 20.0  # how long rank 0 is left to stop on its own once Lightning's observer has found a child dead


@contextmanager
def other_processes_lost(world_size: int, kept: Callable[[], str]):
    """Under DDP a process of the run that died (killed, out of memory, its machine lost) makes the others'
    next collective fail with a long torch traceback: one line instead, with what is kept (``kept()``)."""
    if world_size > 1:
        _let_rank0_say_it()
    _WATCHED.append((world_size, kept))
    try:
        yield
    except RuntimeError as e:
        import torch.distributed as dist

        found = PEER_LOST.search(str(e))
        if world_size <= 1 or not (found or isinstance(e, dist.DistError)):
            raise
        said = found.group(0) if found else f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
        raise OtherProcessLost(lost_message(world_size, said, kept())) from None
    finally:
        _WATCHED.pop()


def _let_rank0_say_it() -> None:
    """Lightning's launcher checks rank 0's child processes every 5 s and, finding one dead, SIGKILLs them and
    rank 0 at once: rank 0 then ended with status -9 and no word of what is kept, whenever its own next
    collective (which fails and says so, above) had not come yet. Now the children are killed as Lightning
    does, rank 0 is left LOST_GRACE_S to stop on its own, and one still running then (stuck in a collective
    that never times out) prints the same line and ends with status 1. Outside other_processes_lost (nothing
    to say), and without that launcher, Lightning's own behaviour stays."""
    try:
        from lightning_fabric.strategies.launchers import subprocess_script
    except ImportError:
        return
    observer = getattr(subprocess_script, "_ChildProcessObserver", None)
    if observer is None or not callable(getattr(observer, "_terminate_all", None)) or \
            getattr(observer, "_byol_says_what_is_kept", False):
        return

    lightnings = observer._terminate_all

    def terminate_all(self) -> None:
        import os
        import time

        if not _WATCHED:
            return lightnings(self)
        world, kept = _WATCHED[-1]  # read now: the main thread leaves the block as it stops
        ended = [(rank, p.returncode) for rank, p in enumerate(self._child_processes, start=1) if p.returncode]
        for p in self._child_processes:
            p.send_signal(self._termination_signal)
        time.sleep(LOST_GRACE_S)
        try:
            said = how_it_ended(*(ended or [(1, 1)])[0])
            print(f"error: {lost_message(world, said, kept())}", file=sys.stderr, flush=True)
            sys.stdout.flush()
        finally:
            os._exit(1)

    observer._terminate_all = terminate_all
    observer._byol_says_what_is_kept = True
