"""What every figure of the project shares: text drawn as written, and PNGs written without following links.

Labels, legends and titles carry text read from files (a run's loss or label, a folder's name, a class
name, a metrics.csv column): data from whoever wrote them. matplotlib would read ``$...$`` in them as
mathtext (``"$\\foo$"`` stopped the report with a ParseFatalException) and, with ``text.usetex``, hand
them to LaTeX. Inside :func:`literal_text` neither happens: every string is drawn as it is. A figure is
saved by :func:`save_png`: into memory, then atomically beside its path (temporary file + rename), so
that a symbolic link at that path is replaced, never written through, and a reader never sees half a
PNG. A text that is not valid UTF-8 (a folder name of other bytes, a ``\\udcff`` in a JSON file) is
drawn escaped (:func:`escaped`): matplotlib's font code refuses it. matplotlib is imported only when a
figure is drawn.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from byol.core.checkpoint import atomic_write_bytes
from byol.jobs.console import ESCAPED_NAMES

# text.parse_math: "$" is a dollar sign, not mathtext; text.usetex: never LaTeX
LITERAL_TEXT = {"text.parse_math": False, "text.usetex": False}


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display); ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def literal_text() -> Iterator[None]:
    """Draw (create and save) figures inside this: every string in them is drawn literally. The rcParams
    are read when a text is made and when it is drawn, so both happen inside; they are restored after."""
    import matplotlib

    with matplotlib.rc_context(LITERAL_TEXT):
        yield


def escaped(text: str) -> str:
    """``text`` with what UTF-8 cannot encode written as escapes, so that it can be drawn, printed and
    written: a file name's byte that is not UTF-8 (held by Python as a surrogate, ``e\\udcff1``) as
    ``e\\xff1``, as ``ls -b`` shows it; any other lone surrogate as ``\\udXXX``."""
    return text.encode("utf-8", ESCAPED_NAMES).decode("utf-8")


def escape_texts(fig) -> None:
    """Every text in ``fig`` made drawable (:func:`escaped`); call it before a layout or a save measures
    them. Tick labels given as text are made again when drawn: pass those through :func:`escaped` instead."""
    from matplotlib.text import Text

    for text in fig.findobj(Text):
        shown = escaped(text.get_text())
        if shown != text.get_text():
            text.set_text(shown)


def save_png(fig, path: str | Path, **savefig) -> Path:
    """Save ``fig`` as a PNG at ``path`` atomically: a link at ``path`` is replaced, its target untouched.
    A write that fails raises :class:`byol.core.errors.CheckpointError` (one line: the file and why)."""
    escape_texts(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **savefig)
    atomic_write_bytes(buffer.getvalue(), path)
    return Path(path)
