"""CLI commands of the analyze stage: a thin layer over :mod:`ckapipe.analyze`.

``commands`` is what ``ckapipe.cli`` registers: ``gram`` and ``merge-grams`` are defined here;
the study commands come from sibling modules (``cli_study``: ``analyze``; ``cli_plot``: ``plot``),
each exporting its own ``commands`` list, appended at the bottom of this file. Heavy imports
(torch, zarr) happen inside the commands so ``ckapipe --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

__all__ = ["commands", "gram", "merge_grams"]

commands: list[click.Command] = []


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (shown as one ``Error: ...`` line), not a bug."""
    from ckapipe.errors import CkapipeError

    return (CkapipeError, ValueError)


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Show each warning of a command as one ``Warning: ...`` line on stderr (no source line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                click.echo(f"Warning: {warning.message}", err=True)


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


@click.command("gram")
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--batch-size",
    "-m",
    type=int,
    default=256,
    show_default=True,
    help="Rows per minibatch m (4 <= m <= n); ignored with --mode full.",
)
@click.option(
    "--epochs",
    type=int,
    default=1,
    show_default=True,
    help="Partitions of the rows: epoch 0 in store order, later epochs seeded permutations.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Derives the epoch permutations; use the same value for every store of a study.",
)
@click.option(
    "--mode",
    type=click.Choice(["minibatch", "full"]),
    default="minibatch",
    show_default=True,
    help="minibatch: U-centered Gram per batch; full: exact n x n linear Gram (O(n^2) memory).",
)
@click.option(
    "--kernel",
    type=click.Choice(["linear", "rbf"]),
    default="linear",
    show_default=True,
    help="Kernel of the cached Grams (rbf: median bandwidth per batch).",
)
@click.option(
    "--threshold",
    type=float,
    default=1.0,
    show_default=True,
    help="RBF bandwidth as a multiple of the median distance.",
)
@click.option(
    "--rows",
    type=RowRange(),
    default=None,
    help="Partial cache of the batches inside START:STOP (batch boundaries), e.g. for a job "
    "array; join the parts with `ckapipe merge-grams`.",
)
@click.option(
    "--layers",
    "layers",
    multiple=True,
    help="Layer to include (repeatable; default: every layer of the store).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA if available), cpu, cuda or cuda:N.",
)
@click.option(
    "--precision",
    type=click.Choice(["float64", "float32"]),
    default="float64",
    show_default=True,
    help="float32: tile products in float32, summed in float64 (~2x faster on a CPU; "
    "minibatch mode only).",
)
@click.option(
    "--threads",
    type=int,
    default=4,
    show_default=True,
    help="Reader threads decoding chunks.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Directory of the new Gram cache.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Replace an existing Gram cache at --out (once the new one is complete).",
)
def gram(
    store: Path,
    batch_size: int,
    epochs: int,
    seed: int,
    mode: str,
    kernel: str,
    threshold: float,
    rows: tuple[int, int | None] | None,
    layers: tuple[str, ...],
    device: str,
    precision: str,
    threads: int,
    out: Path,
    overwrite: bool,
) -> None:
    """Read activation STORE once and write its Gram cache to --out.

    Every sample is used: each epoch's last batch holds the n mod m remaining rows (a remainder
    of 1-3 rows, too few for the unbiased estimator, is left out with a warning).
    """
    from ckapipe.analyze.gram_cache import build_gram_cache
    from ckapipe.store import ActivationStore

    try:
        with _warnings_as_lines():
            source = ActivationStore.open(store)
            if rows is not None and rows[1] is None:
                rows = (rows[0], source.n_samples)
            cache = build_gram_cache(
                source,
                out,
                batch_size=batch_size,
                epochs=epochs,
                seed=seed,
                mode=mode,
                kernel=kernel,
                threshold=threshold,
                rows=rows,  # type: ignore[arg-type]
                device=device,
                layers=list(layers) or None,
                threads=threads,
                precision=precision,
                overwrite=overwrite,
            )
    except _user_errors() as error:
        raise click.ClickException(str(error)) from None
    if cache.mode == "minibatch":
        sizes = sorted(set(cache.batch_sizes.tolist()), reverse=True)
        what = (
            f"{len(cache.batches)} batches of {'/'.join(map(str, sizes))}, "
            f"{cache.samples_used} of {cache.n_samples} samples used per epoch"
        )
    else:
        what = f"exact {cache.n_samples}x{cache.n_samples} Grams"
    click.echo(f"wrote {out}: {len(cache.layer_names)} layers, {what} ({cache.kernel} kernel)")


commands.append(gram)


@click.command("merge-grams")
@click.argument(
    "parts", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="Directory of the merged cache."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing Gram cache at --out.")
def merge_grams(parts: tuple[Path, ...], out: Path, overwrite: bool) -> None:
    """Join partial Gram caches (disjoint --rows of one store) into one cache."""
    from ckapipe.analyze.gram_cache import merge_gram_caches

    try:
        with _warnings_as_lines():
            cache = merge_gram_caches(list(parts), out, overwrite=overwrite)
    except _user_errors() as error:
        raise click.ClickException(str(error)) from None
    total = cache.partition["n_batches_total"]
    click.echo(f"wrote {out}: {len(cache.batches)} of {total} batches from {len(parts)} parts")


commands.append(merge_grams)


# Commands of the study step live in their own modules; each exports `commands`.
for _module in ("ckapipe.analyze.cli_study", "ckapipe.analyze.cli_plot"):
    commands.extend(importlib.import_module(_module).commands)
