"""Progress lines for long work that draws no bar (decoding a folder, embedding a dataset): at most one line
every 30 s, none for shorter work, and the total time at the end when anything was said."""

from __future__ import annotations

import time


class Progress:
    """``[tag] doing: N of M images (P%), R images/s, about T left`` at most every ``every`` seconds, and
    ``[tag] doing done: ...`` at the end if a line was printed. Counting costs a clock read: no device sync."""

    def __init__(self, total: int, doing: str = "decoding", tag: str = "data", every: float = 30.0, clock=None):
        self.total, self.doing, self.tag, self.every = total, doing, tag, every
        self.clock = clock or time.monotonic
        self.start = self.last = self.clock()
        self.said = False

    def update(self, done: int) -> None:
        now = self.clock()
        elapsed, rate = now - self.start, done / max(now - self.start, 1e-9)
        if done >= self.total:
            if self.said:
                print(f"[{self.tag}] {self.doing} done: {done:,} images in {duration(elapsed)} "
                      f"({rate:,.0f} images/s)", flush=True)
        elif now - self.last >= self.every:
            self.last, self.said = now, True
            print(f"[{self.tag}] {self.doing}: {done:,} of {self.total:,} images ({100 * done / self.total:.0f}%), "
                  f"{rate:,.0f} images/s, about {duration((self.total - done) / max(rate, 1e-9))} left", flush=True)


def duration(seconds: float) -> str:
    """``42 s``, ``13 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
