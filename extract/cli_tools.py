"""CLI commands around stores: ``info``, ``import-h5`` and ``export-h5``.

Thin wrappers over :mod:`ckapipe.extract.info` and :mod:`ckapipe.extract.h5bridge`; :mod:`ckapipe.cli`
registers ``commands`` (below).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ckapipe import cli_options as opts

__all__ = ["commands", "export_h5", "import_h5", "info"]


@opts.command("info")
@opts.existing_path("store", file_okay=False)
@opts.json_flag("Print the description as JSON.")
def info(store: Path, as_json: bool) -> None:
    """Describe activation store STORE: layers, shapes, dtype, completeness, size, provenance.

    Works on incomplete stores too (an interrupted or running extraction), saying how many rows
    are written. A damaged store (a deleted chunk file) is described with a DAMAGED status line
    and the command exits with status 1.
    """
    from ckapipe.extract.info import describe_store, format_store_info

    description = describe_store(store)
    if as_json:
        click.echo(json.dumps(description, indent=2, sort_keys=False, default=str))
    else:
        click.echo(format_store_info(description))
    if description["damaged"]:
        raise click.exceptions.Exit(1)


@opts.command("import-h5")
@opts.existing_path("h5_file", dir_okay=False)
@opts.out("Activation store to create (a new or empty directory).")
@opts.layers(
    "Import only this layer (layer name a.b or HDF5 path a/b); repeat or comma-separate for "
    "more. Layers are stored in the order given. Default: every dataset, in the order "
    "described above."
)
@click.option(
    "--key",
    metavar="PATH",
    help="Import only this HDF5 dataset, or the datasets under this group.",
)
@opts.dtype("Storage dtype of the store.", default="float32")
@click.option(
    "--sample-ids",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A .npy file with the dataset index of each row (default: 0..n-1, the file's order).",
)
@opts.codec()
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
    store = run_import(
        h5_file, out, layers=list(layers) or None, key=key, dtype=dtype, sample_ids=ids, codec=codec
    )
    click.echo(
        f"imported {len(store.layer_names)} layer(s), {store.n_samples} samples -> {store.path}"
    )


@opts.command("export-h5")
@opts.existing_path("store", file_okay=False)
@opts.out("HDF5 file to create (must not exist).", dir_okay=False)
@opts.layers(
    "Export only this layer; repeat or comma-separate for more. Default: all, in store order."
)
def export_h5(store: Path, out: Path, layers: tuple[str, ...]) -> None:
    """Export complete activation store STORE to an HDF5 file, one dataset per layer.

    Datasets are layers/<name> in logical values (bfloat16 as float32), plus sample_ids and the
    store's provenance as attributes. `ckapipe import-h5` reads the file back exactly.
    """
    from ckapipe.extract.h5bridge import export_h5 as run_export

    path = run_export(store, out, layers=list(layers) or None)
    click.echo(f"exported {store} -> {path}")


commands: list[click.Command] = [info, import_h5, export_h5]
