"""The ``ckapipe`` command line: a thin layer over the Python API.

Each stage contributes its commands from its own module (``ckapipe.extract.cli``,
``ckapipe.analyze.cli``, ``ckapipe.run``); this module only assembles the group.
"""

from __future__ import annotations

import logging

import click

from ckapipe import __version__


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "CKAPIPE"}
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
    Run `ckapipe COMMAND --help` for the options of a command.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def _register() -> None:
    from ckapipe.analyze.cli import commands as analyze_commands
    from ckapipe.extract.cli import commands as extract_commands
    from ckapipe.extract.cli_tools import commands as store_tool_commands
    from ckapipe.run import commands as run_commands

    for command in (*extract_commands, *store_tool_commands, *analyze_commands, *run_commands):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
