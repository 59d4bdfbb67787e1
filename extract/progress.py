"""Progress reporting for long extractions: a live line on a terminal, periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


def _duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Samples done, samples/s and ETA on ``stream`` (stderr by default).

    On a terminal the line is redrawn in place (at most 10 times a second); otherwise (logs,
    Snakemake, SLURM) a plain line is written every ``interval`` seconds and at the end.

    Parameters
    ----------
    total:
        Samples to process in all.
    initial:
        Samples already done (a resumed extraction).
    label:
        Prefix of each line (e.g. the output path).
    enabled:
        False silences it.
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        label: str = "extract",
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float = 30.0,
    ):
        self.total = total
        self.done = initial
        self.label = label
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start = time.monotonic()
        self._initial = initial
        self._last_draw = 0.0

    def update(self, samples: int) -> None:
        """Count ``samples`` more as done and redraw if it is time."""
        self.done += samples
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last_draw >= (0.1 if self.is_tty else self.interval):
            self._last_draw = now
            self._draw(final=False)

    def close(self) -> None:
        """Write the final line."""
        if self.enabled:
            self._draw(final=True)

    def _line(self) -> str:
        elapsed = time.monotonic() - self._start
        rate = (self.done - self._initial) / elapsed if elapsed > 0 else 0.0
        remaining = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = _duration(remaining) if remaining == remaining else "--:--"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label}: {self.done}/{self.total} samples ({percent:.0f}%), "
            f"{rate:.1f} samples/s, elapsed {_duration(elapsed)}, ETA {eta}"
        )

    def _draw(self, *, final: bool) -> None:
        if self.is_tty:
            self.stream.write("\r" + self._line() + ("\n" if final else ""))
        else:
            self.stream.write(self._line() + "\n")
        self.stream.flush()
