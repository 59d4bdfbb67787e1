"""The live view of ``ckapipe run``: Snakemake's console output, followed and condensed.

Snakemake prints some 20 lines per job. :class:`SnakemakeProgress` reads that output line by
line (Snakemake 9's format: ``[local]rule X:`` blocks with ``jobid: N``, ``Finished jobid: N
(Rule: X)``, ``Error in rule X:`` blocks with their ``log:`` paths, ``N of M steps (P%) done``,
``Nothing to be done``) and keeps, per rule, how many jobs are planned, done, running and
failed. A view shows that state: :class:`LiveView` redraws a few lines in place on a terminal;
:class:`PlainView` prints, for logs, pipes and CI, at most one line per tick with the jobs that
finished and started since the last one, and one line per failed job. Neither knows where the lines come from: :func:`ckapipe.run.run_study`
feeds them from the Snakemake process and writes every line to the run's log file too.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

__all__ = [
    "FailedJob",
    "Job",
    "LiveView",
    "PlainView",
    "RuleCounts",
    "SnakemakeProgress",
    "failure_report",
    "format_elapsed",
    "log_tail",
]

_RULE = re.compile(r"^(?:local)?rule (\w+):$")
_ERROR = re.compile(r"^Error in rule (\w+):$")
_FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")
_STEPS = re.compile(r"^(\d+) of (\d+) steps \(.*\) done$")
_FIELD = re.compile(r"^    (\w[\w ]*): ?(.*)$")
_LOG_NOTE = " (check log file(s) for error details)"

#: The rule that only collects the study's outputs: not a job a user waits for.
TARGET_RULE = "all"


def format_elapsed(seconds: float) -> str:
    """``75.2`` → ``1:15``; ``3725`` → ``1:02:05``."""
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class Job:
    """One Snakemake job as its console block describes it."""

    jobid: int
    rule: str
    output: list[str] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    wildcards: str = ""
    started: float = 0.0
    """``time.monotonic()`` when its block was read."""
    state: str = "running"
    """``running``, ``done`` or ``failed``."""


@dataclass
class FailedJob:
    """An ``Error in rule X:`` block: the rule, its job id and the rule's ``log:`` files."""

    rule: str
    jobid: int | None = None
    log: list[str] = field(default_factory=list)


@dataclass
class RuleCounts:
    """Jobs of one rule: planned (Snakemake's job stats), done, running, failed, and when the
    first started and the last ended (``time.monotonic()``)."""

    planned: int = 0
    done: int = 0
    running: int = 0
    failed: int = 0
    first_start: float | None = None
    last_end: float | None = None

    def elapsed(self, now: float) -> float:
        """Seconds from the rule's first job start to its last end (now while one runs)."""
        if self.first_start is None:
            return 0.0
        end = now if self.running or self.last_end is None else self.last_end
        return max(0.0, end - self.first_start)


def _split_paths(value: str) -> list[str]:
    value = value.removesuffix(_LOG_NOTE).strip()
    return [part.strip() for part in value.split(", ") if part.strip()]


class SnakemakeProgress:
    """Follows Snakemake's console output (one :meth:`feed` call per line) and counts its jobs.

    The parser is a small state machine: a job block (``rule X:`` / ``localrule X:``) or an
    error block (``Error in rule X:``) collects its indented ``key: value`` lines until the
    first line that is not indented. A job counts as started when its ``jobid`` line is read, as
    done on ``Finished jobid``, as failed on the ``jobid`` of its error block. Lines it does not
    recognise change nothing, so a Snakemake that prints more than this parser knows still works.

    Parameters
    ----------
    clock:
        Monotonic time source (tests pass a fake one).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.rules: dict[str, RuleCounts] = {}
        self.jobs: dict[int, Job] = {}
        self.failures: list[FailedJob] = []
        self.nothing_to_do = False
        self.steps: tuple[int, int] | None = None
        """(done, total) from Snakemake's last ``N of M steps`` line."""
        self._block: Job | FailedJob | None = None
        self._in_stats = False
        self._listeners: list[Callable[[str, Job | FailedJob], None]] = []

    def subscribe(self, listener: Callable[[str, Job | FailedJob], None]) -> None:
        """Call ``listener(event, job)`` on each ``started``, ``finished`` and ``failed`` job."""
        self._listeners.append(listener)

    def _emit(self, event: str, job: Job | FailedJob) -> None:
        for listener in self._listeners:
            listener(event, job)

    def counts(self, rule: str) -> RuleCounts:
        return self.rules.setdefault(rule, RuleCounts())

    def feed(self, line: str) -> None:
        """Read one line of Snakemake's output (trailing newline optional)."""
        line = line.rstrip("\r\n")
        if self._in_stats:
            self._stats_line(line)
            return
        if self._block is not None:
            found = _FIELD.match(line)
            if found:
                self._block_field(found.group(1), found.group(2))
                return
            if line.startswith("    "):
                return  # continuation of a field (a shell command, a message)
            self._end_block()
        if line == "Job stats:":
            self._in_stats = True
        elif found := _RULE.match(line):
            self._block = Job(jobid=-1, rule=found.group(1))
        elif found := _ERROR.match(line):
            self._block = FailedJob(rule=found.group(1))
        elif found := _FINISHED.match(line):
            self._finished(int(found.group(1)), found.group(2))
        elif found := _STEPS.match(line):
            self.steps = (int(found.group(1)), int(found.group(2)))
        elif line.startswith("Nothing to be done"):
            self.nothing_to_do = True

    def close(self) -> None:
        """The output ended: finish any open block."""
        if self._block is not None:
            self._end_block()

    # -- the parts of the state machine ------------------------------------------------------------
    def _stats_line(self, line: str) -> None:
        parts = line.split()
        if not parts or parts[0] == "total":
            self._in_stats = False
        elif len(parts) == 2 and parts[1].isdigit():
            self.counts(parts[0]).planned = int(parts[1])
        # the header ("job count") and the rule ("---- -----") lines are skipped

    def _block_field(self, name: str, value: str) -> None:
        block = self._block
        if isinstance(block, Job):
            if name == "output":
                block.output = _split_paths(value)
            elif name == "log":
                block.log = _split_paths(value)
            elif name == "wildcards":
                block.wildcards = value
            elif name == "jobid" and value.isdigit():
                block.jobid = int(value)
                self._started(block)
        elif isinstance(block, FailedJob):
            if name == "jobid" and value.isdigit():
                block.jobid = int(value)
            elif name == "log":
                block.log = _split_paths(value)

    def _end_block(self) -> None:
        block, self._block = self._block, None
        if isinstance(block, FailedJob):
            self._failed(block)

    def _started(self, job: Job) -> None:
        if job.jobid in self.jobs and self.jobs[job.jobid].state == "running":
            return  # the same block printed twice (Snakemake repeats it for some executors)
        now = self.clock()
        job.started = now
        self.jobs[job.jobid] = job
        counts = self.counts(job.rule)
        counts.running += 1
        if counts.first_start is None:
            counts.first_start = now
        self._emit("started", job)

    def _finished(self, jobid: int, rule: str) -> None:
        job = self.jobs.get(jobid)
        counts = self.counts(rule)
        if job is not None and job.state == "running":
            counts.running -= 1
        if job is None:
            job = Job(jobid=jobid, rule=rule, started=self.clock())
            self.jobs[jobid] = job
        job.state = "done"
        counts.done += 1
        counts.last_end = self.clock()
        self._emit("finished", job)

    def _failed(self, failure: FailedJob) -> None:
        self.failures.append(failure)
        counts = self.counts(failure.rule)
        job = self.jobs.get(failure.jobid) if failure.jobid is not None else None
        if job is not None:
            if job.state == "running":
                counts.running -= 1
            job.state = "failed"
            if not failure.log:
                failure.log = list(job.log)
        counts.failed += 1
        counts.last_end = self.clock()
        self._emit("failed", failure)

    # -- what the views and the summary ask --------------------------------------------------------
    def job_of(self, failure: Job | FailedJob) -> Job | FailedJob:
        """The started job an error block is about (its wildcards name it), else the block."""
        if isinstance(failure, FailedJob) and failure.jobid in self.jobs:
            return self.jobs[failure.jobid]
        return failure

    def shown_rules(self) -> list[str]:
        """The rules with jobs, in the order Snakemake planned or started them, ``all`` left out."""
        return [
            rule
            for rule, counts in self.rules.items()
            if rule != TARGET_RULE
            and (counts.planned or counts.done or counts.running or counts.failed)
        ]

    def rule_line(self, rule: str, now: float) -> str:
        """``extract   2/4 done  1 running  1 failed  0:42`` (the parts that are not zero)."""
        counts = self.rules[rule]
        total = max(counts.planned, counts.done + counts.running + counts.failed)
        parts = [f"{rule:<10} {counts.done}/{total} done"]
        if counts.running:
            parts.append(f"{counts.running} running")
        if counts.failed:
            parts.append(f"{counts.failed} FAILED")
        if counts.first_start is not None:
            parts.append(format_elapsed(counts.elapsed(now)))
        return "  ".join(parts)


def _job_label(job: Job | FailedJob) -> str:
    wildcards = job.wildcards if isinstance(job, Job) else ""
    value = wildcards.split("=", 1)[1] if "=" in wildcards else wildcards
    return f"{job.rule} {value}".strip()


class PlainView:
    """Compact lines for a log file, a pipe or CI, where redrawing is impossible: what finished
    and what started since the last line, at most one line per tick (``[ 0:37] done extract
    2/4; started gram``), and a line of its own for each failed job. ``all`` (the collecting
    rule) is not shown."""

    def __init__(self, progress: SnakemakeProgress, stream: TextIO, started: float) -> None:
        self.progress = progress
        self.stream = stream
        self.started = started
        self._done: dict[str, int] = {}
        self._starting: dict[str, int] = {}
        progress.subscribe(self._on_event)

    def _stamp(self) -> str:
        return f"[{format_elapsed(self.progress.clock() - self.started):>5}]"

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _on_event(self, event: str, job: Job | FailedJob) -> None:
        if job.rule == TARGET_RULE:
            return
        if event == "started":
            self._starting[job.rule] = self._starting.get(job.rule, 0) + 1
        elif event == "finished":
            self._done[job.rule] = self._done.get(job.rule, 0) + 1
        else:
            self._flush()
            self._write(f"{self._stamp()} FAILED {_job_label(self.progress.job_of(job))}")

    def _flush(self) -> None:
        parts = []
        if self._done:
            done = []
            for rule in self._done:
                counts = self.progress.rules[rule]
                total = max(counts.planned, counts.done + counts.running + counts.failed)
                done.append(f"{rule} {counts.done}/{total}")
            parts.append("done " + ", ".join(done))
        if self._starting:
            starting = [f"{rule} ×{n}" if n > 1 else rule for rule, n in self._starting.items()]
            parts.append("started " + ", ".join(starting))
        self._done, self._starting = {}, {}
        if parts:
            self._write(f"{self._stamp()} " + "; ".join(parts))

    def tick(self) -> None:
        """Called about twice a second: one line for what happened since the last one."""
        self._flush()

    def close(self) -> None:
        self._flush()


class LiveView:
    """A few lines redrawn in place on a terminal (ANSI cursor movement): one per rule with its
    done/running/failed counts and elapsed time, and a total line. Failed jobs are printed
    above it as they happen, so they stay on screen."""

    def __init__(self, progress: SnakemakeProgress, stream: TextIO, started: float) -> None:
        self.progress = progress
        self.stream = stream
        self.started = started
        self._drawn = 0
        self._last: list[str] = []
        progress.subscribe(self._on_event)

    def _lines(self) -> list[str]:
        now = self.progress.clock()
        lines = [f"  {self.progress.rule_line(rule, now)}" for rule in self.progress.shown_rules()]
        steps = self.progress.steps
        done = f"{steps[0]}/{steps[1]} jobs" if steps else "Snakemake starting"
        lines.append(f"  {done}, {format_elapsed(now - self.started)} elapsed")
        return lines

    def _erase(self) -> str:
        # up to the first drawn line, then clear to the end of the screen
        return f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""

    def _on_event(self, event: str, job: Job | FailedJob) -> None:
        if event == "failed":
            self.stream.write(self._erase() + f"FAILED {_job_label(self.progress.job_of(job))}\n")
            self._drawn = 0
        self.draw()

    def draw(self) -> None:
        lines = self._lines()
        if self._drawn and lines == self._last:
            return  # nothing changed (the elapsed times count whole seconds)
        self.stream.write(self._erase() + "\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn, self._last = len(lines), lines

    def tick(self) -> None:
        """Called about twice a second: refreshes the elapsed times."""
        self.draw()

    def close(self) -> None:
        self.draw()


def log_tail(path: Path, lines: int = 15) -> list[str]:
    """The last ``lines`` lines of a text file (empty when it cannot be read)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, 2)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def failure_report(
    progress: SnakemakeProgress, workdir: Path, output_tail: list[str], lines: int = 15
) -> list[str]:
    """What a failed run prints: each failed job's rule and log file with the log's last
    ``lines`` lines; without any failed job (a workflow error before any job ran), the last
    lines of Snakemake's own output, where its error message is."""
    report: list[str] = []
    for failure in progress.failures:
        label = _job_label(progress.job_of(failure))
        if not failure.log:
            report.append(f"FAILED {label} (the rule writes no log; see Snakemake's log below)")
            continue
        for log in failure.log:
            path = workdir / log
            report.append(f"FAILED {label}: last lines of {path}")
            tail = log_tail(path, lines)
            report.extend(f"  | {text}" for text in tail)
            if not tail:
                report.append("  | (empty or missing)")
    if not progress.failures:
        report.append("Snakemake stopped with an error; its last lines:")
        report.extend(f"  | {text}" for text in output_tail[-lines:])
    return report
