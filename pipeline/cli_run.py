"""The commands of a whole study: ``run`` (through Snakemake, :mod:`ckapipe.run`) and
``verify`` (every chunk of a store, cache or result, :mod:`ckapipe.verify`)."""

from __future__ import annotations

from pathlib import Path

import click

from ckapipe import cli_options as opts

__all__ = ["commands", "run", "verify"]


@opts.command("run", context_settings={"ignore_unknown_options": True})
@click.option(
    "-d",
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Working directory: results/<study>/ and the default cache root go here.",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[CONFIG] [-- SNAKEMAKE_ARGS]...")
def run(workdir: Path, args: tuple[str, ...]) -> None:
    """Run a whole study with Snakemake (no CONFIG: the demo study).

    Extract every model on every dataset, build Gram caches, compare all pairs, plot, and write
    results/<study>/report.html. Activation stores and Gram caches go to the config's
    storage.cache_root, keyed by content, so studies share them. CONFIG is a YAML file (see the
    demo's config.yaml). Anything after `--` goes to Snakemake, e.g.
    `ckapipe run study.yaml -- --dry-run` or `ckapipe run study.yaml -- --profile slurm`.
    """
    from ckapipe.run import run_study, run_summary, split_config_argument

    config, snakemake_args = split_config_argument(args)
    returncode = run_study(config, workdir=workdir, snakemake_args=snakemake_args)
    if returncode:
        raise SystemExit(returncode)
    if not _only_plans(snakemake_args):
        click.echo("\n".join(run_summary(config, workdir=workdir)))


def _only_plans(snakemake_args: list[str]) -> bool:
    # these runs compute nothing: there is no new result to summarise
    quiet = {"-n", "--dry-run", "--dryrun", "--unlock", "--summary", "-S", "--list-rules"}
    return any(arg in quiet or arg.startswith("--dry-run=") for arg in snakemake_args)


@opts.command("verify")
@click.argument(
    "paths", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="PATH..."
)
def verify(paths: tuple[Path, ...]) -> None:
    """Check that activation stores, Gram caches or results are complete and undamaged.

    Reads every chunk of every array once and checks its CRC-32C checksum, finds deleted chunk
    files, checks the completion flag (and, for a result, that its CSV belongs to it). Prints
    one line per PATH (OK or DAMAGED with the array and chunk) and exits with status 1 if any
    PATH is damaged or incomplete. Opening a file for analysis already refuses deleted chunks;
    this is the thorough check, e.g. after copying a cache between filesystems.
    """
    from ckapipe.verify import verify as verify_path

    damaged = 0
    for path in paths:
        verification = verify_path(path)
        click.echo(verification.summary())
        damaged += not verification.ok
    if damaged:
        raise SystemExit(1)


commands: list[click.Command] = [run, verify]
