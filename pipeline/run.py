"""Running a whole study through Snakemake (the API of ``ckapipe run``, in :mod:`ckapipe.cli_run`).

The workflow ships inside the package (``ckapipe/workflow/Snakefile``). Snakemake runs as a
subprocess (``python -m snakemake``), not through its Python API, because the API ignores
profiles: run this way, ``--profile``, executor plugins (SLURM) and every other flag behave
exactly as on the command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ckapipe.errors import UsageError

__all__ = [
    "DEFAULT_CONFIG",
    "PROFILE_DIR",
    "SNAKEFILE",
    "run_study",
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


def run_study(
    config: str | os.PathLike[str] | None = None,
    *,
    workdir: str | os.PathLike[str] = ".",
    snakemake_args: Sequence[str] = (),
) -> int:
    """Run a study (default: the demo) with Snakemake; return Snakemake's exit status.

    Parameters are those of :func:`snakemake_command`. Output goes to this process's stdout and
    stderr.
    """
    command = snakemake_command(config, workdir=workdir, snakemake_args=snakemake_args)
    if config is not None:
        _check_config_file(Path(config))
    # The rules call `ckapipe` and `python`: make them this installation's, also when ckapipe was
    # started from a virtual environment that is not activated (SLURM jobs inherit this PATH).
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    return subprocess.run(command, check=False, env=env).returncode


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
