"""Progress output that suits where it goes.

On a terminal (or in a notebook) a tqdm bar redraws in place. When stderr is a file or a pipe
(a log, CI, ``nohup``) redraws would fill it with carriage returns, so a bar prints one plain
line when it finishes (an epoch, an analysis), and one every few minutes while a long one runs.
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

# A bar that is not on a terminal reports at least this often (seconds) while it runs.
LINE_INTERVAL = 120.0


def interactive(stream=None) -> bool:
    """True when ``stream`` (default stderr) is a terminal or we run in a notebook."""
    stream = sys.stderr if stream is None else stream
    if "ipykernel" in sys.modules:
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class LineProgress:
    """The part of tqdm's interface the package uses (``update``, ``set_postfix``, ``close``,
    ``with``), printing plain lines: ``desc: n/total unit in 12.3 s, key value, ...``."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", stream=None,
                 interval: float = LINE_INTERVAL):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.interval = interval
        self.n, self.postfix, self.closed = 0, {}, False
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now, done=False)

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._line(time.perf_counter(), done=True)

    def _line(self, now: float, done: bool) -> None:
        count = f"{self.n}/{self.total}" if self.total is not None else str(self.n)
        unit = self.unit if self.n == 1 else _plural(self.unit)
        when = "in" if done else "after"
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {count} {unit} {when} {now - self.start:.1f} s{extra}", file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def bar(total: int | None, desc: str, *, unit: str = "it", enabled: bool = True, leave: bool = False):
    """A progress bar: tqdm on a terminal, :class:`LineProgress` otherwise, a disabled tqdm
    (which does nothing) when ``enabled`` is False."""
    if not enabled:
        return tqdm(total=total, disable=True)
    if interactive():
        return tqdm(total=total, desc=desc, unit=unit, leave=leave)
    return LineProgress(total, desc, unit)
