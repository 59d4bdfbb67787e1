"""Running a whole study through Snakemake (the API of ``ckapipe run``, in :mod:`ckapipe.cli_run`).

The workflow ships inside the package (``ckapipe/workflow/Snakefile``). Snakemake runs as a
subprocess (``python -m snakemake``), not through its Python API, because the API ignores
profiles: run this way, ``--profile``, executor plugins (SLURM) and every other flag behave
exactly as on the command line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ckapipe.errors import CkapipeError, UsageError

__all__ = [
    "DEFAULT_CONFIG",
    "PROFILE_DIR",
    "SNAKEFILE",
    "WorkdirBusyError",
    "live_snakemake",
    "run_study",
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


def _forwarding_signals(child: subprocess.Popen[bytes]) -> Callable[[int, Any], None]:
    escalation = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]
    first_interrupt = [True]

    def forward(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and first_interrupt[0]:
            # a terminal's Ctrl-C reaches the whole foreground process group, Snakemake
            # included, so the first one is not sent again; a second one insists
            first_interrupt[0] = False
            return
        # Snakemake stops its jobs and removes its locks on SIGINT; a further signal insists
        if escalation and child.poll() is None:
            child.send_signal(escalation.pop(0))

    return forward


def run_study(
    config: str | os.PathLike[str] | None = None,
    *,
    workdir: str | os.PathLike[str] = ".",
    snakemake_args: Sequence[str] = (),
) -> int:
    """Run a study (default: the demo) with Snakemake; return Snakemake's exit status.

    Parameters are those of :func:`snakemake_command`. Output goes to this process's stdout and
    stderr. A stale lock of an interrupted run is removed first (refused while another Snakemake
    runs in ``workdir``: :class:`WorkdirBusyError`). Snakemake runs in this process's group, so a
    terminal's Ctrl-C reaches it directly; SIGTERM (and a second SIGINT) is forwarded to it as
    SIGINT (further signals: SIGTERM, then SIGKILL) and Snakemake is waited for, so that it stops
    its jobs and leaves no lock behind.
    """
    command = snakemake_command(config, workdir=workdir, snakemake_args=snakemake_args)
    if config is not None:
        _check_config_file(Path(config))
    # The rules call `ckapipe` and `python`: make them this installation's, also when ckapipe was
    # started from a virtual environment that is not activated (SLURM jobs inherit this PATH).
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    if "--unlock" not in snakemake_args:
        _unlock_if_stale(command, Path(workdir).resolve(), env)
    # the same process group as this process: whatever stops the group (a terminal's hangup, a
    # scheduler killing the job's group) stops Snakemake and its jobs too
    child = subprocess.Popen(command, env=env)
    forward = _forwarding_signals(child)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # only there can Python catch them
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _check_config_file(path: Path) -> None:
    """Refuse an unreadable or invalid config before Snakemake starts (one error, every field).

    The workflow checks it again (a user may call Snakemake directly); here the user gets the
    list of problems instead of Snakemake's traceback of the workflow.
    """
    import yaml

    from ckapipe.workflow.config_check import check_config

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"cannot read study config {path}: {error}") from None
    if not isinstance(config, dict):
        raise UsageError(f"study config {path} must be a YAML mapping of keys, got {config!r}")
    check_config(config)


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


def _matched(pair: Any) -> tuple[str, float, float | None]:
    """A pair's headline: the mean CKA of its matched layers, and the widest interval half-width
    among them (None when no interval was reported). Layers match by name when both models have
    the same layer names (the diagonal); otherwise each row's best layer is its match."""
    import numpy as np

    cka = np.asarray(pair.cka, dtype=np.float64)
    half = (np.asarray(pair.ci_high) - np.asarray(pair.ci_low)) / 2.0
    if list(pair.layers_a) == list(pair.layers_b):
        how, index = "diagonal", np.arange(cka.shape[0])
    else:
        how = "row best"
        filled = np.where(np.isfinite(cka), cka, -np.inf)
        index = np.argmax(filled, axis=1)
    rows = np.arange(cka.shape[0])
    values, widths = cka[rows, index], half[rows, index]
    finite = np.isfinite(values)
    mean = float(values[finite].mean()) if finite.any() else float("nan")
    reported = np.isfinite(widths[finite])
    width = float(widths[finite][reported].max()) if reported.any() else None
    return how, mean, width


def run_summary(
    config: str | os.PathLike[str] | None = None, *, workdir: str | os.PathLike[str] = "."
) -> list[str]:
    """What ``ckapipe run`` prints after a successful run: the report, the CSVs and, per dataset,
    each model pair's mean matched-layer CKA with its interval."""
    from ckapipe.analyze.result import load_result
    from ckapipe.cache import load_config

    plan = load_config(config)
    results = Path(workdir) / "results" / plan["study"]
    lines = [f"report: {results / 'report.html'}"]
    for dataset in plan["datasets"]:
        lines.append(f"table:  {results / dataset / 'cka.csv'}")
    for dataset in plan["datasets"]:
        path = results / dataset / "cka.zarr"
        if not path.is_dir():
            continue  # a run of chosen targets only
        study = load_result(path)
        level = study.provenance.get("ci_level")
        lines.append(f"{dataset}: mean CKA of matched layers per model pair")
        for (a, b), pair in study.pairs.items():
            how, mean, width = _matched(pair)
            interval = (
                f"±{width:.3f} at most ({level:.0%} CI per layer pair)"
                if width is not None and level
                else f"±{width:.3f} at most"
                if width is not None
                else "no interval"
            )
            lines.append(f"  {a + ' : ' + b:<32} {mean:6.3f}  {interval}  [{how}]")
    return lines
