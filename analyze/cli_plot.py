"""``ckapipe plot``: PNG figures of a study result (a thin layer over :func:`plot_result`)."""

from __future__ import annotations

from pathlib import Path

import click

from ckapipe import cli_options as opts

__all__ = ["commands", "plot"]


@opts.command("plot")
@opts.existing_path("result", metavar="RESULT.zarr")
@opts.out("Directory for the PNG files (created if missing).", file_okay=False)
@click.option(
    "--annotate/--no-annotate",
    default=None,
    help="Print the CKA value in every heatmap cell. Default: only when both models have at "
    "most 12 layers.",
)
@click.option(
    "--dpi",
    type=click.FloatRange(min=10, max=1200),
    default=150,
    show_default=True,
    help="Resolution of the PNG files.",
)
def plot(result: Path, out: Path, annotate: bool | None, dpi: float) -> None:
    """Draw the figures of a CKA result: a heatmap per model pair, the study grid, and
    layer-correspondence curves for pairs of models with the same layers.

    Writes heatmap_<a>--<b>.png, study_grid.png, correspondence_<a>--<b>.png (and
    correspondence.png overlaying several such pairs) into --out, and prints their paths.
    """
    # matplotlib is imported only when the command runs, so `ckapipe --help` stays fast
    from ckapipe.analyze.plots import plot_result
    from ckapipe.errors import CkapipeError

    try:
        written = plot_result(
            result, out, annotate="auto" if annotate is None else annotate, dpi=dpi
        )
    except (CkapipeError, ValueError, KeyError, FileNotFoundError) as error:
        # the plotting code also raises the standard library's errors for a malformed result
        raise click.ClickException(f"cannot plot {result}: {error}") from error
    for path in written:
        click.echo(str(path))


commands: list[click.Command] = [plot]
