"""The ``ckapipe`` command line: a thin layer over the Python API.

Each stage contributes its commands from its own modules (``COMMAND_MODULES`` in
:mod:`ckapipe.cli_options`, each ending with a ``commands`` list); this module only assembles
the group.
"""

from __future__ import annotations

import importlib
import logging

import click

from ckapipe import __version__
from ckapipe.cli_options import COMMAND_MODULES
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
      cache ls / du / verify / gc                       inspect and prune the shared cache
    Run `ckapipe COMMAND --help` for the options of a command.
    """
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def _register() -> None:
    # the one way commands join the group: each module of COMMAND_MODULES lists its `commands`
    for module in COMMAND_MODULES:
        for command in importlib.import_module(module).commands:
            main.add_command(command)


_register()

if __name__ == "__main__":
    main()
