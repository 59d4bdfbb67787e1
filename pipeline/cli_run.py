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
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Stream Snakemake's own output (about 20 lines per job) instead of the compact view; "
    "it is written to the log file either way.",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[CONFIG] [-- SNAKEMAKE_ARGS]...")
def run(workdir: Path, verbose: bool, args: tuple[str, ...]) -> None:
    """Run a whole study with Snakemake (no CONFIG: the demo study).

    Extract every model on every dataset, build Gram caches, compare all pairs, plot, and write
    results/<study>/report.html. Activation stores and Gram caches go to the config's
    storage.cache_root, keyed by content, so studies share them. CONFIG is a YAML file (see the
    demo's config.yaml). Anything after `--` goes to Snakemake, e.g.
    `ckapipe run study.yaml -- --dry-run` or `ckapipe run study.yaml -- --profile slurm`.

    \b
    What it prints:
    - first, the log file that gets Snakemake's full output:
      results/<study>/logs/snakemake-<UTC time>.log
    - while it runs, a compact view: on a terminal, one line per step (extract,
      gram, ...) with its jobs done/running/failed and elapsed time, redrawn in place;
      in a pipe or CI, a line whenever jobs finish or start, and one per failed job.
      --verbose shows Snakemake's own output instead.
    - at the end: the jobs run (and how many found their result in the cache), the wall
      time, the report's path, each dataset's CSV (results/<study>/<dataset>/cka.csv) and
      the study's story: per model pair, the depth-aligned mean CKA (layer i with layer i
      when both have as many layers) with the widest interval half-width and the pair's
      architectures; then similarity within vs across architectures with jackknife
      intervals, as in the report.
    - if a job fails: the failed step, its log file and that log's last lines.
    A dry run (`-- -n`), --unlock, --summary and --list-rules print Snakemake's output as it is.

    The exit status is Snakemake's. Ctrl-C or SIGTERM stops Snakemake and its jobs cleanly; a
    lock left by a killed run is removed on the next run when no Snakemake works in WORKDIR.
    """
    from ckapipe.run import only_plans, run_study, run_summary, split_config_argument

    config, snakemake_args = split_config_argument(args)
    outcome = run_study(config, workdir=workdir, snakemake_args=snakemake_args, verbose=verbose)
    if outcome.returncode:
        raise SystemExit(outcome.returncode)
    if not only_plans(snakemake_args):
        click.echo("\n".join(run_summary(config, workdir=workdir, outcome=outcome)))


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
