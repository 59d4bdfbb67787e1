"""Writing a full-mode Gram cache as tiles: memory bounded by the tile, not by n².

For each layer: a first streamed pass over row windows of the store computes the column shift
(the first row) and the column means of the shifted features in float64; then every stored tile
(I, J), I ≤ J, of the upper triangle (:class:`~ckapipe.analyze.tile_grid.TileGrid`) is
G_IJ = X_c[I] X_c[J]ᵀ, X_c the column-centered features in float64, summed in float64 over
column slabs (multiplied in float64, or in float32 with ``precision="float32"``) and written as one chunk (float32 or float64, padded to T×T with zeros).

A tile depends only on its own rows of the store and on the column means, computed the same way
in every job: partial caches of disjoint tile rows (``tile_rows``) hold exactly the tiles one
pass would write, so :func:`~ckapipe.analyze.gram_merge.merge_gram_caches` joins them bit for
bit. Memory: the means (p float64), two row blocks of at most ``max_slab_bytes`` each and one
T×T float64 accumulator, whatever n.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import zarr

from ckapipe.analyze.loader import column_ranges
from ckapipe.analyze.tile_grid import TileGrid
from ckapipe.formats import create_array
from ckapipe.store import ActivationStore

__all__ = ["column_shift_and_means", "stored_block", "write_full_tiles"]


def stored_block(
    store: ActivationStore, layer: str, rows: slice, cols: slice = slice(None)
) -> np.ndarray:
    """A rectangle of the stored values as float64: the float16 residuals without their
    per-column offset and scale (as every Gram of the cache is formed: CKA is invariant to
    both), bfloat16 decoded exactly."""
    raw = np.asarray(store.array(layer).get_basic_selection((rows, cols)))
    if store.dtype == "bfloat16":
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float64)


def column_shift_and_means(
    store: ActivationStore, layer: str, *, max_block_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(shift, mean) float64 (p,): the first row, and the column means of features − shift.

    Centered features are (x − shift) − mean: a constant column is exactly 0 (a − a = 0), and
    subtracting the first row before averaging keeps large column offsets out of the sums.
    """
    n, p = store.n_samples, store.layer(layer).n_features
    shift = stored_block(store, layer, slice(0, 1))[0]
    row_chunk = store.chunk_shape(layer)[0]
    step = max(row_chunk, (max_block_bytes // max(1, 8 * p)) // row_chunk * row_chunk)
    total = np.zeros(p, dtype=np.float64)
    for start in range(0, n, step):
        block = stored_block(store, layer, slice(start, min(n, start + step)))
        total += (block - shift).sum(axis=0)
    return shift, total / n


def write_full_tiles(
    group: zarr.Group,
    store: ActivationStore,
    names: Sequence[str],
    *,
    tile: int,
    tile_rows: tuple[int, int],
    storage: str,
    max_slab_bytes: int,
    device: torch.device,
    product_dtype: torch.dtype = torch.float64,
) -> None:
    """Write ``grams/<layer>`` (tiles of ``tile_rows``, (P, T, T) ``storage`` dtype) per layer."""
    grid = TileGrid(store.n_samples, tile)
    first, stop = grid.tiles_of_rows(tile_rows)
    grams = group.require_group("grams")
    for name in names:
        array = create_array(
            grams,
            name,
            shape=(stop - first, tile, tile),
            chunks=(1, tile, tile),
            dtype=storage,
            dimension_names=("tile", "sample_i", "sample_j"),
        )
        _layer_tiles(
            store, name, grid, tile_rows, array, first, max_slab_bytes, device, product_dtype
        )


def _layer_tiles(
    store: ActivationStore,
    name: str,
    grid: TileGrid,
    tile_rows: tuple[int, int],
    array: zarr.Array,
    first: int,
    max_slab_bytes: int,
    device: torch.device,
    product_dtype: torch.dtype,
) -> None:
    p = store.layer(name).n_features
    shift, mean = column_shift_and_means(store, name, max_block_bytes=max_slab_bytes)
    shift_t = torch.from_numpy(shift).to(device)
    mean_t = torch.from_numpy(mean).to(device)
    column_chunk = store.chunk_shape(name)[1]
    width = max(1, max_slab_bytes // (8 * grid.tile))
    slabs = column_ranges(p, column_chunk, width)

    def centered(index: int, c0: int, c1: int) -> torch.Tensor:
        a, b = grid.span(index)
        x = torch.from_numpy(stored_block(store, name, slice(a, b), slice(c0, c1))).to(device)
        # centered in float64, then (precision float32) rounded for the product
        return ((x - shift_t[c0:c1]) - mean_t[c0:c1]).to(product_dtype)  # (rows, w)

    out = np.zeros((grid.tile, grid.tile), dtype=array.dtype)
    for row in range(*tile_rows):
        whole_row = centered(row, 0, p) if len(slabs) == 1 else None  # reused along the row
        for col in range(row, grid.count):
            (a, b), (c, d) = grid.span(row), grid.span(col)
            acc = torch.zeros(b - a, d - c, dtype=torch.float64, device=device)
            for c0, c1 in slabs:
                xi = whole_row if whole_row is not None else centered(row, c0, c1)
                xj = xi if col == row else centered(col, c0, c1)
                acc += (xi @ xj.T).to(torch.float64)  # each slab's product summed in float64
            out[...] = 0  # padding outside the Gram stays 0
            out[: b - a, : d - c] = acc.cpu().numpy()
            array[grid.number(row, col) - first] = out
