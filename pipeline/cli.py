"""The ``ckapipe`` command line: a thin layer over the Python API.

Each stage contributes its commands from its own module (``ckapipe.extract.cli``,
``ckapipe.analyze.cli``, ``ckapipe.run``); this module only assembles the group.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ckapipe import __version__
from ckapipe.errors import CkapipeError


class _Commands(click.Group):
    """The ``ckapipe`` group: a user's mistake is one ``Error: ...`` line and exit status 1.

    Every such error is a :class:`~ckapipe.errors.CkapipeError` whose message says what is wrong
    and what to do; any other exception is a bug and keeps its traceback.
    """

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except CkapipeError as error:
            raise click.ClickException(str(error)) from None


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "CKAPIPE"},
)
@click.version_option(__version__, prog_name="ckapipe")
@click.option("-v", "--verbose", count=True, help="More log output (-v: info, -vv: debug).")
def main(verbose: int) -> None:
    """ckapipe: cache activations once, then compare every layer of every model with CKA.

    \b
    Stages:
      extract / layers / info / import-h5 / export-h5   model x dataset -> activation store
      gram / analyze / plot                             stores -> Gram caches -> CKA results
      run                                               a whole study with Snakemake
      verify                                            check every chunk of a store/cache/result
    Run `ckapipe COMMAND --help` for the options of a command.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


@click.command("verify")
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


def _register() -> None:
    from ckapipe.analyze.cli import commands as analyze_commands
    from ckapipe.extract.cli import commands as extract_commands
    from ckapipe.extract.cli_tools import commands as store_tool_commands
    from ckapipe.run import commands as run_commands

    for command in (
        *extract_commands,
        *store_tool_commands,
        *analyze_commands,
        *run_commands,
        verify,
    ):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
