"""CLI commands around stores: ``info``, ``import-h5`` and ``export-h5``.

Thin wrappers over :mod:`ckapipe.extract.info` and :mod:`ckapipe.extract.h5bridge`; registered by
``ckapipe.extract.cli`` (``commands`` below).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ckapipe.store import LOGICAL_DTYPES, StoreError

__all__ = ["commands", "export_h5", "import_h5", "info"]


def _fail(error: Exception) -> click.ClickException:
    return click.ClickException(str(error))


@click.command("info")
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info(store: Path, as_json: bool) -> None:
    """Describe activation store STORE: layers, shapes, dtype, completeness, size, provenance.

    Works on incomplete stores too (an interrupted or running extraction), saying how many rows
    are written. A damaged store (a deleted chunk file) is described with a DAMAGED status line
    and the command exits with status 1.
    """
    from ckapipe.extract.info import describe_store, format_store_info

    try:
        description = describe_store(store)
    except StoreError as error:
        raise _fail(error) from error
    if as_json:
        click.echo(json.dumps(description, indent=2, sort_keys=False, default=str))
    else:
        click.echo(format_store_info(description))
    if description["damaged"]:
        raise click.exceptions.Exit(1)


@click.command("import-h5")
@click.argument("h5_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Activation store to create (a new or empty directory).",
)
@click.option(
    "--layers",
    "layers",
    multiple=True,
    metavar="NAME",
    help="Import only this layer (layer name a.b or HDF5 path a/b); repeat for more. Layers "
    "are stored in the order given. Default: every dataset, in the order described above.",
)
@click.option(
    "--key",
    default=None,
    metavar="PATH",
    help="Import only this HDF5 dataset, or the datasets under this group.",
)
@click.option(
    "--dtype",
    type=click.Choice(LOGICAL_DTYPES),
    default="float32",
    show_default=True,
    help="Storage dtype of the store.",
)
@click.option(
    "--sample-ids",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A .npy file with the dataset index of each row (default: 0..n-1, the file's order).",
)
@click.option(
    "--codec",
    type=click.Choice(["none", "zstd"]),
    default="none",
    show_default=True,
    help="Chunk compression.",
)
def import_h5(
    h5_file: Path,
    out: Path,
    layers: tuple[str, ...],
    key: str | None,
    dtype: str,
    sample_ids: Path | None,
    codec: str,
) -> None:
    """Import activations from HDF5 file H5_FILE into a new activation store.

    \b
    Understands:
      - one dataset per layer, each (n, ...) (flattened to (n, p); '/' in names becomes '.');
      - thingsvision's features.hdf5 (a dataset `features`, or row-split features_01..NN);
      - files written by `ckapipe export-h5` (exact round trip, provenance restored).

    \b
    Layer order (rows of results, axes of plots) is, first match wins:
      - the order of --layers;
      - the exported order, for files written by `ckapipe export-h5`;
      - creation order, where the file tracks it (h5py track_order=True);
      - otherwise natural name order, numbers compared as numbers (layer2 before
        layer10): HDF5 itself keeps names only alphabetically, so pass --layers
        when that is not the depth order.
    """
    import numpy as np

    from ckapipe.extract.h5bridge import import_h5 as run_import

    ids = np.load(sample_ids) if sample_ids is not None else None
    try:
        store = run_import(
            h5_file,
            out,
            layers=list(layers) or None,
            key=key,
            dtype=dtype,
            sample_ids=ids,
            codec=codec,
        )
    except StoreError as error:
        raise _fail(error) from error
    click.echo(
        f"imported {len(store.layer_names)} layer(s), {store.n_samples} samples -> {store.path}"
    )


@click.command("export-h5")
@click.argument("store", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="HDF5 file to create (must not exist).",
)
@click.option(
    "--layers",
    "layers",
    multiple=True,
    metavar="NAME",
    help="Export only this layer; repeat for more. Default: all, in store order.",
)
def export_h5(store: Path, out: Path, layers: tuple[str, ...]) -> None:
    """Export complete activation store STORE to an HDF5 file, one dataset per layer.

    Datasets are layers/<name> in logical values (bfloat16 as float32), plus sample_ids and the
    store's provenance as attributes. `ckapipe import-h5` reads the file back exactly.
    """
    from ckapipe.extract.h5bridge import export_h5 as run_export

    try:
        path = run_export(store, out, layers=list(layers) or None)
    except StoreError as error:
        raise _fail(error) from error
    click.echo(f"exported {store} -> {path}")


commands: list[click.Command] = [info, import_h5, export_h5]
