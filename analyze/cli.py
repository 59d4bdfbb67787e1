"""CLI commands of the Gram step, ``gram`` and ``merge-grams``: a thin layer over
:mod:`ckapipe.analyze.gram_cache`.

Heavy imports (torch, zarr) happen inside the commands so ``ckapipe --help`` stays fast. Options
shared with other commands come from :mod:`ckapipe.cli_options`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import click

from ckapipe import cli_options as opts

__all__ = ["RowRange", "TileJob", "commands", "gram", "merge_grams"]


class RowRange(click.ParamType):
    """``START:STOP`` row range (``:STOP`` and ``START:`` allowed; resolved against n later)."""

    name = "START:STOP"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        text = str(value)
        start_text, sep, stop_text = text.partition(":")
        if not sep:
            self.fail(f"expected START:STOP (e.g. 0:4096), got {text!r}", param, ctx)
        try:
            start = int(start_text) if start_text else 0
            stop = int(stop_text) if stop_text else None
        except ValueError:
            self.fail(f"START and STOP must be integers, got {text!r}", param, ctx)
        if start < 0 or (stop is not None and stop <= start):
            self.fail(f"need 0 <= START < STOP, got {text!r}", param, ctx)
        return (start, stop)


_MODE_HELP = (
    "minibatch: U-centered Gram per batch; full: exact n x n linear Gram, stored on disk as "
    "tiles (memory bounded by the tile size, disk n^2/2 x 4 bytes per layer in float32)."
)


class TileJob(click.ParamType):
    """``K/J``: job K of J (1-based, as ``$SLURM_ARRAY_TASK_ID`` of ``--array=1-J``)."""

    name = "K/J"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        from ckapipe.analyze.tile_grid import parse_tile_job

        try:
            return parse_tile_job(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


_EPOCHS_HELP = (
    "Partitions of the rows: epoch 0 in store order, later epochs seeded permutations. "
    "Intervals are withheld for more than 1 epoch (their batches share samples)."
)


@opts.command("gram")
@opts.existing_path("store", file_okay=False)
@opts.minibatch_size()
@opts.count("--epochs", default=1, minimum=1, help=_EPOCHS_HELP)
@opts.seed("Derives the epoch permutations; use the same value for every store of a study.")
@opts.choice(
    "--mode", source="ckapipe.analyze.gram_cache:MODES", default="minibatch", help=_MODE_HELP
)
@opts.kernel("Kernel of the cached Grams (rbf: median bandwidth per batch).", default="linear")
@opts.threshold("RBF bandwidth as a multiple of the median distance.", default=1.0)
@click.option(
    "--rows",
    type=RowRange(),
    help="Partial cache of the batches inside START:STOP (batch boundaries), e.g. for a job "
    "array; join the parts with `ckapipe merge-grams`.",
)
@opts.layers(
    "Layer to include (repeatable, or comma-separated; default: every layer of the store)."
)
@opts.device()
@opts.choice(
    "--precision",
    source="ckapipe.analyze.gram_cache:PRECISIONS",
    default=None,
    help="float32 (minibatch mode's default): tile products in float32, summed in float64 "
    "(~2x faster on a CPU; CKA within 1e-6 of float64's). float64 (full mode's default): every "
    "product in float64.",
)
@click.option(
    "--tile-size",
    type=click.IntRange(min=1),
    default=2048,
    show_default=True,
    help="Full mode: rows and columns of a stored Gram tile. Build and analysis memory grow as "
    "its square (2048: 32 MiB per float64 tile), not as n^2.",
)
@click.option(
    "--storage",
    type=click.Choice(["float32", "float64"]),
    default="float32",
    show_default=True,
    help="Dtype of the stored Grams, both modes (computed in float64 either way). float32 "
    "halves the disk (minibatch CKA within 1e-6 of float64); float64 keeps the Grams exact.",
)
@click.option(
    "--tiles",
    "tile_job",
    type=TileJob(),
    help="Full mode: build only job K of J (balanced tile rows), e.g. --tiles "
    "$SLURM_ARRAY_TASK_ID/8 in a job array; join the J parts with `ckapipe merge-grams`.",
)
@opts.count("--threads", default=4, minimum=1, help="Reader threads decoding chunks.")
@opts.out("Directory of the new Gram cache.")
@opts.overwrite("Replace an existing Gram cache at --out (once the new one is complete).")
def gram(store: Path, layers: tuple[str, ...], **options: Any) -> None:
    """Read activation STORE once and write its Gram cache to --out.

    Every sample is used: each epoch's last batch holds the n mod m remaining rows (a remainder
    of 1-3 rows, too few for the unbiased estimator, is left out with a warning). Warns when the
    partition has too few batches for confidence intervals, naming a batch size that has enough.
    """
    from ckapipe.analyze.gram_cache import build_gram_cache
    from ckapipe.analyze.summary import interval_batch_warning
    from ckapipe.store import ActivationStore

    source = ActivationStore.open(store)
    rows = options.pop("rows")
    if rows is not None and rows[1] is None:  # START: runs to the end of the store
        rows = (rows[0], source.n_samples)
    cache = build_gram_cache(source, rows=rows, layers=list(layers) or None, **options)
    advice = interval_batch_warning(cache.partition) if cache.mode == "minibatch" else None
    if advice:
        warnings.warn(advice, stacklevel=1)
    click.echo(f"wrote {options['out']}: {_describe_cache(cache)}")


def _describe_cache(cache: Any) -> str:
    if cache.mode == "minibatch":
        sizes = sorted(set(cache.batch_sizes.tolist()), reverse=True)
        what = (
            f"{len(cache.batches)} batches of {'/'.join(map(str, sizes))}, "
            f"{cache.samples_used} of {cache.n_samples} samples used per epoch"
        )
    else:
        grid, (a, b) = cache.tile_grid, cache.tile_rows
        what = f"exact {cache.n_samples}x{cache.n_samples} Grams in {grid.tile}-row tiles"
        if cache.is_partial:
            what += f", tile rows {a}:{b} of {grid.count} (a partial cache: merge-grams the parts)"
    return (
        f"{len(cache.layer_names)} layers, {what} ({cache.kernel} kernel, stored in "
        f"{cache.storage_dtype})"
    )


@opts.command("merge-grams")
@opts.existing_path("parts", file_okay=False, nargs=-1)
@opts.out("Directory of the merged cache.")
@opts.overwrite("Replace an existing Gram cache at --out.")
def merge_grams(parts: tuple[Path, ...], out: Path, overwrite: bool) -> None:
    """Join partial Gram caches (disjoint --rows, or all --tiles jobs, of one store) into one
    cache, bit for bit the same as one pass."""
    from ckapipe.analyze.gram_cache import merge_gram_caches

    cache = merge_gram_caches(list(parts), out, overwrite=overwrite)
    if cache.mode == "full":
        grid = cache.tile_grid
        click.echo(f"wrote {out}: {grid.n_tiles} Gram tiles per layer from {len(parts)} parts")
        return
    total = cache.partition["n_batches_total"]
    click.echo(f"wrote {out}: {len(cache.batches)} of {total} batches from {len(parts)} parts")


commands: list[click.Command] = [gram, merge_grams]
