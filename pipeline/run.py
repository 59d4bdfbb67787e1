"""Running a whole study through Snakemake (the API of ``ckapipe run``, in :mod:`ckapipe.cli_run`).

The workflow ships inside the package (``ckapipe/workflow/Snakefile``). Snakemake runs as a
subprocess (``python -m snakemake``), not through its Python API, because the API ignores
profiles: run this way, ``--profile``, executor plugins (SLURM) and every other flag behave
exactly as on the command line.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from ckapipe.errors import CkapipeError, UsageError
from ckapipe.run_headline import architecture_table, headline_table
from ckapipe.run_view import (
    TARGET_RULE,
    LiveView,
    PlainView,
    SnakemakeProgress,
    failure_report,
    format_elapsed,
)

__all__ = [
    "DEFAULT_CONFIG",
    "PROFILE_DIR",
    "SNAKEFILE",
    "RunOutcome",
    "WorkdirBusyError",
    "live_snakemake",
    "only_plans",
    "run_study",
    "headline_table",
    "run_summary",
    "snakemake_command",
    "split_config_argument",
]

_PACKAGE_DIR = Path(__file__).resolve().parent
SNAKEFILE = _PACKAGE_DIR / "workflow" / "Snakefile"
"""The packaged workflow."""
DEFAULT_CONFIG = _PACKAGE_DIR / "workflow" / "config.yaml"
"""The demo study: the default when no config is given."""
PROFILE_DIR = _PACKAGE_DIR / "profiles" / "default"
"""The workflow profile applied to every run (resume, show commands and failed logs)."""

_CORES_FLAGS = ("--cores", "-c", "--jobs", "-j")
_TICK = 0.5
"""Seconds between refreshes of the view while Snakemake is silent."""


def _has_flag(args: Sequence[str], flags: Sequence[str]) -> bool:
    return any(arg == flag or arg.startswith(f"{flag}=") for arg in args for flag in flags)


def snakemake_command(
    config: str | os.PathLike[str] | None = None,
    *,
    workdir: str | os.PathLike[str] = ".",
    snakemake_args: Sequence[str] = (),
) -> list[str]:
    """The ``python -m snakemake`` command line that :func:`run_study` runs.

    Parameters
    ----------
    config:
        Study config (YAML); ``None`` runs the demo study.
    workdir:
        Working directory of the study: ``results/<study>/`` and (by default) the cache go there.
    snakemake_args:
        Extra Snakemake arguments, passed last (so they win): ``--dry-run``, ``--profile slurm``,
        ``--cores 4``, targets, …. Without ``--cores``/``--jobs`` every core is used.
    """
    config_path = Path(config) if config is not None else DEFAULT_CONFIG
    if not config_path.is_file():
        raise UsageError(f"study config {config_path} (CONFIG) does not exist")
    extra = list(snakemake_args)
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(SNAKEFILE),
        "--configfile",
        str(config_path.resolve()),
        "--directory",
        str(Path(workdir).resolve()),
    ]
    if not _has_flag(extra, ("--workflow-profile",)):
        command += ["--workflow-profile", str(PROFILE_DIR)]
    if not _has_flag(extra, _CORES_FLAGS):
        command += ["--cores", "all"]
    return command + extra


class WorkdirBusyError(CkapipeError):
    """Another Snakemake is running in the study's working directory."""


def live_snakemake(workdir: str | os.PathLike[str]) -> list[int]:
    """Pids of the live Snakemake processes working in ``workdir`` (by --directory or cwd)."""
    import psutil

    workdir = Path(workdir).resolve()
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "cwd"]):
        cmdline = process.info["cmdline"] or []
        if process.info["pid"] == os.getpid() or not any("snakemake" in a for a in cmdline):
            continue
        directory = process.info["cwd"]
        for flag in ("--directory", "-d"):
            if flag in cmdline[:-1]:
                directory = cmdline[cmdline.index(flag) + 1]
        with_dir = [a.split("=", 1)[1] for a in cmdline if a.startswith("--directory=")]
        directory = with_dir[0] if with_dir else directory
        if directory and Path(directory).resolve() == workdir:
            found.append(process.info["pid"])
    return found


def _unlock_if_stale(command: list[str], workdir: Path, env: dict[str, str]) -> None:
    """A killed Snakemake leaves its lock files behind, and the next run fails on them until
    ``--unlock``: remove them when no Snakemake of this workdir is alive, else refuse to start."""
    locks = workdir / ".snakemake" / "locks"
    if not locks.is_dir() or not any(locks.iterdir()):
        return
    alive = live_snakemake(workdir)
    if alive:
        raise WorkdirBusyError(
            f"Snakemake (pid {alive[0]}) is already running in {workdir}; wait for it to finish "
            f"or stop it (kill -INT {alive[0]}), or run this study in another --workdir"
        )
    completed = subprocess.run(
        [*command, "--unlock"], check=False, env=env, capture_output=True, text=True
    )
    if completed.returncode:
        raise WorkdirBusyError(
            f"cannot remove the stale Snakemake lock in {locks}: {completed.stderr.strip()[-500:]}"
            "; remove that folder by hand if no Snakemake runs there"
        )
    print(f"ckapipe: removed a stale Snakemake lock in {workdir} (left by an interrupted run)")


def _forwarding_signals(
    child: subprocess.Popen[bytes], received: list[int] | None = None
) -> Callable[[int, Any], None]:
    """A signal handler that forwards SIGINT/SIGTERM to ``child`` (see :func:`run_study`) and
    records each signal it gets in ``received``."""
    escalation = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
    first_interrupt = [True]

    def forward(signum: int, frame: Any) -> None:
        if received is not None:
            received.append(signum)
        if signum == signal.SIGINT and first_interrupt[0]:
            # a terminal's Ctrl-C reaches the whole foreground process group, Snakemake
            # included, so the first one is not sent again; a second one insists
            first_interrupt[0] = False
            return
        # Snakemake stops its jobs and removes its locks on SIGINT; a further signal insists
        if escalation and child.poll() is None:
            child.send_signal(escalation.pop(0))

    return forward


@dataclass
class RunOutcome:
    """What :func:`run_study` returns: Snakemake's exit status and what the run did.

    ``progress`` is ``None`` for a run that only plans or manages (``--dry-run``, ``--unlock``,
    …): its output went straight to the terminal and there is no job to count.
    """

    returncode: int
    wall_seconds: float
    log_path: Path | None = None
    """Snakemake's full output of this run (``results/<study>/logs/snakemake-<UTC time>.log``)."""
    progress: SnakemakeProgress | None = None
    workdir: Path = field(default_factory=Path.cwd)

    def job_counts(self) -> dict[str, tuple[int, int]]:
        """Rule → (jobs finished, of which reused from the cache), in the order they ran,
        the collecting rule ``all`` left out. A cache job's receipt records whether it found
        its entry complete (``"reused": true``) instead of building it."""
        counts: dict[str, tuple[int, int]] = {}
        if self.progress is None:
            return counts
        for job in self.progress.jobs.values():
            if job.state != "done" or job.rule == TARGET_RULE:
                continue
            ran, reused = counts.get(job.rule, (0, 0))
            counts[job.rule] = (
                ran + 1,
                reused + any(_reused(self.workdir / p) for p in job.output),
            )
        return counts

    def jobs_line(self) -> str:
        """``jobs: extract 4 (3 reused from cache), gram 4, …; 1:23 wall time``."""
        wall = f"{format_elapsed(self.wall_seconds)} wall time"
        if self.progress is not None and self.progress.nothing_to_do:
            return f"jobs: none, every output is up to date; {wall}"
        parts = []
        for rule, (ran, reused) in self.job_counts().items():
            parts.append(f"{rule} {ran}" + (f" ({reused} reused from cache)" if reused else ""))
        failed = len(self.progress.failures) if self.progress is not None else 0
        if failed:
            parts.append(f"{failed} failed")
        return f"jobs: {', '.join(parts) if parts else 'none'}; {wall}"


def _reused(receipt: Path) -> bool:
    try:
        record = json.loads(receipt.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("reused") is True


def run_study(
    config: str | os.PathLike[str] | None = None,
    *,
    workdir: str | os.PathLike[str] = ".",
    snakemake_args: Sequence[str] = (),
    verbose: bool = False,
    stream: TextIO | None = None,
) -> RunOutcome:
    """Run a study (default: the demo) with Snakemake; return its :class:`RunOutcome`.

    Parameters
    ----------
    config, workdir, snakemake_args:
        As for :func:`snakemake_command`.
    verbose:
        Stream Snakemake's own output to ``stream`` instead of the compact view.
    stream:
        Where the view (or the raw output) goes; default ``sys.stdout``. On a terminal the view
        is redrawn in place (:class:`~ckapipe.run_view.LiveView`), elsewhere it is a line
        whenever jobs finish or start (:class:`~ckapipe.run_view.PlainView`).

    Snakemake's full output is written to ``results/<study>/logs/snakemake-<UTC time>.log``,
    named in the view's first line. A failed run prints each failed job's rule, log file and
    the log's last lines. A run that only plans or manages (``--dry-run``, ``--unlock``,
    ``--summary``, ``--list-rules``) prints Snakemake's output as it is and writes no log.

    A stale lock of an interrupted run is removed first (refused while another Snakemake
    runs in ``workdir``: :class:`WorkdirBusyError`). Snakemake runs in this process's group, so a
    terminal's Ctrl-C reaches it directly; SIGTERM (and a second SIGINT) is forwarded to it as
    SIGINT (further signals: SIGTERM, then SIGKILL) and Snakemake is waited for, so that it stops
    its jobs and leaves no lock behind.
    """
    started = time.monotonic()
    stream = stream if stream is not None else sys.stdout
    command = snakemake_command(config, workdir=workdir, snakemake_args=snakemake_args)
    study = _check_config_file(Path(config) if config is not None else None)
    workdir = Path(workdir).resolve()
    # The rules call `ckapipe` and `python`: make them this installation's, also when ckapipe was
    # started from a virtual environment that is not activated (SLURM jobs inherit this PATH).
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    if "--unlock" not in snakemake_args:
        _unlock_if_stale(command, workdir, env)
    if only_plans(snakemake_args):
        # the same process group as this process: whatever stops the group (a terminal's
        # hangup, a scheduler killing the job's group) stops Snakemake and its jobs too
        child = subprocess.Popen(command, env=env)
        returncode = _wait_forwarding_signals(child, lambda: None)
        return RunOutcome(returncode, time.monotonic() - started, workdir=workdir)

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    log_path = _new_log(workdir / "results" / study / "logs", f"snakemake-{stamp}")
    env["PYTHONUNBUFFERED"] = "1"  # Snakemake's lines as they happen, not when a buffer fills
    progress = SnakemakeProgress()
    print(f"ckapipe: Snakemake's full log: {log_path}", file=stream, flush=True)
    view: LiveView | PlainView | None = None
    if not verbose:
        live = stream.isatty() and os.environ.get("TERM", "dumb") != "dumb"
        view = (LiveView if live else PlainView)(progress, stream, started)
    tail: deque[str] = deque(maxlen=40)
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        # the same process group as this process (see above)
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=_read_lines, args=(child, lines), daemon=True)
        reader.start()

        def take(line: str) -> None:
            # one line of Snakemake's: to the log, the parser and (verbose) the screen
            log.write(line)
            tail.append(line.rstrip("\n"))
            progress.feed(line)
            if verbose:
                stream.write(line)
                stream.flush()

        def follow() -> None:
            last_tick = 0.0
            while True:
                try:
                    line = lines.get(timeout=_TICK)
                except queue.Empty:
                    line = ""
                if line is None:
                    break  # Snakemake closed its output: it is exiting
                if line:
                    take(line)
                if time.monotonic() - last_tick >= _TICK:
                    last_tick = time.monotonic()
                    log.flush()
                    if view is not None:
                        view.tick()

        received: list[int] = []
        returncode = _wait_forwarding_signals(child, follow, received)
        progress.close()
        if view is not None:
            view.close()
    outcome = RunOutcome(
        returncode, time.monotonic() - started, log_path, progress, workdir=workdir
    )
    if returncode and received and not progress.failures:
        name = signal.Signals(received[0]).name
        report = [f"ckapipe: stopped on {name}; run the same command again to resume"]
    elif returncode:
        report = failure_report(progress, workdir, list(tail))
    if returncode:
        print("\n".join([*report, f"Snakemake's full log: {log_path}"]), file=stream, flush=True)
    return outcome


def _new_log(folder: Path, stem: str) -> Path:
    """A new, empty log file ``folder/stem.log`` (``stem-2.log``, … if a run of the same second
    has one): created exclusively, so two runs never write one file."""
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 100):
        path = folder / (f"{stem}.log" if attempt == 1 else f"{stem}-{attempt}.log")
        try:
            path.open("x").close()
            return path
        except FileExistsError:
            continue
    raise UsageError(f"too many Snakemake logs named {stem}*.log in {folder}; remove old ones")


def _read_lines(child: subprocess.Popen[bytes], lines: queue.Queue[str | None]) -> None:
    assert child.stdout is not None
    with child.stdout:
        for raw in child.stdout:
            lines.put(raw.decode("utf-8", errors="replace"))
    lines.put(None)


def _wait_forwarding_signals(
    child: subprocess.Popen[bytes], follow: Callable[[], None], received: list[int] | None = None
) -> int:
    """Run ``follow()`` (which returns once the child's output ended), then wait for the child;
    SIGINT and SIGTERM meanwhile are forwarded to it (see :func:`run_study`) and recorded in
    ``received``."""
    forward = _forwarding_signals(child, received)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # only there can Python catch them
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        follow()
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def only_plans(snakemake_args: Sequence[str]) -> bool:
    """Whether these Snakemake arguments make a run that computes nothing (a dry run, an
    unlock, a summary, a list of rules): its output is the point, shown as it is."""
    quiet = {"-n", "--dry-run", "--dryrun", "--unlock", "--summary", "-S", "--list-rules"}
    return any(arg in quiet or arg.startswith("--dry-run=") for arg in snakemake_args)


def _check_config_file(path: Path | None) -> str:
    """Refuse an unreadable or invalid config before Snakemake starts (one error, every field);
    return the study's name (``None``: the demo's).

    The workflow checks it again (a user may call Snakemake directly); here the user gets the
    list of problems instead of Snakemake's traceback of the workflow.
    """
    import yaml

    from ckapipe.workflow.config_check import check_config

    try:
        config = yaml.safe_load((path if path is not None else DEFAULT_CONFIG).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"cannot read study config {path}: {error}") from None
    if not isinstance(config, dict):
        raise UsageError(f"study config {path} must be a YAML mapping of keys, got {config!r}")
    if path is not None:
        check_config(config)
    return str(config.get("study", "demo"))  # the schema's default


def split_config_argument(args: Sequence[str]) -> tuple[Path | None, list[str]]:
    """Separate the optional study config from the Snakemake arguments of ``ckapipe run``.

    click drops the ``--`` separator, so ``ckapipe run -- -n`` and ``ckapipe run study.yaml -- -n``
    arrive as ``("-n",)`` and ``("study.yaml", "-n")``: the first argument is the config when it
    is an existing file or ends in .yaml/.yml/.json, else it is Snakemake's (a target, a flag).
    """
    if args and not args[0].startswith("-"):
        candidate = Path(args[0])
        if candidate.is_file() or candidate.suffix.lower() in (".yaml", ".yml", ".json"):
            return candidate, list(args[1:])
    return None, list(args)


def run_summary(
    config: str | os.PathLike[str] | None = None,
    *,
    workdir: str | os.PathLike[str] = ".",
    outcome: RunOutcome | None = None,
) -> list[str]:
    """What ``ckapipe run`` prints after a successful run: the jobs run and reused from the
    cache with the wall time (given the run's ``outcome``), the report, the CSVs and, per
    dataset, last, the study's story: per model pair its depth-aligned mean CKA
    (:func:`~ckapipe.run_headline.headline_table`), then similarity within vs across
    architectures with jackknife intervals (:func:`~ckapipe.run_headline.architecture_table`),
    the same numbers as the report's. Architectures: as the result records them (``ckapipe
    analyze --architecture``), else the config's ``architecture:``, else the factory."""
    from ckapipe.analyze.architecture_summary import (
        architectures_from_provenance,
        recorded_architectures,
    )
    from ckapipe.analyze.result import load_result
    from ckapipe.cache import load_config

    plan = load_config(config)
    results = Path(workdir).resolve() / "results" / plan["study"]
    lines = [outcome.jobs_line()] if outcome is not None else []
    lines.append(f"report: {results / 'report.html'}")
    for dataset in plan["datasets"]:
        lines.append(f"table:  {results / dataset / 'cka.csv'}")
    declared = {
        name: model["architecture"]
        for name, model in plan["models"].items()
        if model.get("architecture")
    }
    for dataset in plan["datasets"]:
        path = results / dataset / "cka.zarr"
        if not path.is_dir():
            continue  # a run of chosen targets only
        study = load_result(path)
        # recorded in the result wins; the config's serve results analysed before they were
        architectures = architectures_from_provenance(
            study, {**declared, **recorded_architectures(study)}
        )
        level = study.provenance.get("ci_level")
        percent = f"{level:.0%} " if level else ""
        lines.append(
            f"{dataset}: per model pair, depth-aligned mean CKA (widest {percent}interval "
            "half-width)"
        )
        lines.extend(headline_table(study, architectures))
        within_across = architecture_table(study, architectures, level)
        if within_across:
            lines.append(
                f"{dataset}: within vs across architectures, mean of the pairs' depth-aligned "
                f"means ({percent}jackknife interval)"
            )
            lines.extend(within_across)
    return lines
