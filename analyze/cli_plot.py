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
@opts.architectures(
    "Declare MODEL's architecture (repeatable), e.g. --architecture mlp_s0=mlp; wins over the "
    "one the result records (`ckapipe analyze --architecture`). A model named by neither is of "
    "its factory's architecture; constructor arguments (a seed) do not count."
)
def plot(
    result: Path, out: Path, annotate: bool | None, dpi: float, architectures: dict[str, str]
) -> None:
    """Draw the figures of a CKA result: a heatmap per model pair, the study grid, and
    layer-correspondence curves for pairs of two models of one architecture.

    Two models are of one architecture when they have the same NAME: given by --architecture,
    else recorded in the result (`ckapipe analyze --architecture`); a model without one is of
    its factory's architecture (the `pkg.module:callable` the result records), whatever its
    constructor arguments. Curves also need the same layer list.

    Writes heatmap_<a>--<b>.png, study_grid.png and correspondence.png (a panel per
    architecture, all its pairs overlaid with their confidence bands) into --out, and prints
    their paths.
    """
    # matplotlib is imported only when the command runs, so `ckapipe --help` stays fast
    from ckapipe.analyze.plots import plot_result
    from ckapipe.errors import CkapipeError

    try:
        written = plot_result(
            result,
            out,
            annotate="auto" if annotate is None else annotate,
            dpi=dpi,
            architectures=architectures,
        )
    except (CkapipeError, ValueError, KeyError, FileNotFoundError) as error:
        # the plotting code also raises the standard library's errors for a malformed result
        raise click.ClickException(f"cannot plot {result}: {error}") from error
    for path in written:
        click.echo(str(path))


commands: list[click.Command] = [plot]
