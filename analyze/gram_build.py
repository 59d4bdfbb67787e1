"""Building a Gram cache: one read pass over an activation store (format: :mod:`gram_format`).

How a batch's Gram is formed: :func:`~ckapipe.analyze.estimators.add_shifted_products` sums
X'X'ᵀ over column tiles of the store's chunk grid, X' the tile shifted by the batch's first row,
so no batch ever needs its full width in memory; :func:`~ckapipe.analyze.estimators.
centered_batch_gram` then applies the kernel (RBF: the batch's own median bandwidth) and
U-centers. Full mode centers every column over all n rows in float64 and writes the n×n Gram
as tiles (:mod:`~ckapipe.analyze.full_build`), never holding it whole.

Reading: epoch 0 reads row windows of whole batches, about one row chunk high, tile by tile
along the column chunks (host memory independent of n). Epochs ≥ 1 read full-height column
slabs of each layer once per epoch and gather each batch's rows on the device; their Gram
accumulators hold about n/m × m × m float64 per layer, so their memory grows with n.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ckapipe.analyze.estimators import (
    TileWorkspace,
    add_shifted_products,
    add_tile_products,
    centered_batch_gram,
    shifted_tile,
)
from ckapipe.analyze.full_build import write_full_tiles
from ckapipe.analyze.gram_format import (
    DEFAULT_STORAGE,
    DEFAULT_TILE,
    FORMAT_NAME,
    FORMAT_VERSION,
    KERNELS,
    MODES,
    PRECISIONS,
    RBF_RULE,
    STORAGE_DTYPES,
    BatchArrays,
    GramCache,
    GramCacheDataError,
    GramCacheUsageError,
    RemainderDroppedWarning,
    default_precision,
    staged_cache,
    store_identity,
)
from ckapipe.analyze.loader import (
    Block,
    BlockRequest,
    column_ranges,
    iter_blocks,
    resolve_device,
    slab_width,
)
from ckapipe.analyze.partition import (
    MIN_BATCH,
    batch_range,
    batch_span,
    epoch_order,
    make_partition,
)
from ckapipe.analyze.pass_overlap import BatchWriter, free_core, run_ahead
from ckapipe.analyze.tile_grid import TileGrid
from ckapipe.formats import now, versions, write_attrs
from ckapipe.store import ActivationStore, IncompleteStoreError

__all__ = ["build_gram_cache"]


def _open_store(store: ActivationStore | str | os.PathLike[str]) -> ActivationStore:
    if isinstance(store, ActivationStore):
        if not store.is_complete:
            raise IncompleteStoreError(
                f"store {store.path} is incomplete ({store.rows_complete} of {store.n_samples} "
                "rows, no completion flag); finish its extraction first"
            )
        return store
    return ActivationStore.open(store)  # raises IncompleteStoreError with the resume hint


def _check_arguments(
    store: ActivationStore,
    *,
    batch_size: int,
    epochs: int,
    mode: str,
    kernel: str,
    threshold: float,
    rows: tuple[int, int] | None,
    layers: Sequence[str] | None,
) -> tuple[list[str], tuple[int, int]]:
    n = store.n_samples
    bad = GramCacheUsageError
    if mode not in MODES:
        raise bad(f"mode must be one of {MODES}, got {mode!r}")
    if n < 4:
        # checked first: no batch size (nor --mode full) can work, so none may be suggested
        raise GramCacheDataError(
            f"store {store.path} holds only {n} samples, and HSIC₁ needs at least 4 (it divides "
            f"by n(n-3)); delete it (rm -r {store.path}) and re-extract it with at least 4 "
            "samples (a larger --limit or dataset)"
        )
    if kernel not in KERNELS:
        raise bad(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not (isinstance(threshold, int | float) and threshold > 0 and np.isfinite(threshold)):
        raise bad(f"threshold (RBF bandwidth multiple) must be > 0, got {threshold!r}")
    names = list(layers) if layers else store.layer_names
    gram_only = [name for name in names if name in {r.name for r in store.gram_only}]
    if gram_only:
        raise bad(
            f"layer {gram_only[0]} was stored Gram-only in {store.path} (its activations were not "
            f"written, only its fused Gram cache); re-extract without --gram-only {gram_only[0]}"
        )
    unknown = [name for name in names if name not in store.layer_names]
    if unknown:
        raise bad(
            f"store {store.path} has no layer(s) {unknown}; its layers are {store.layer_names}"
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise bad(f"layers selected more than once: {duplicates}")
    if mode == "full":
        if rows is not None:
            raise bad(
                "rows=(start, stop) builds partial minibatch caches; a partial full-mode cache "
                "holds tile rows instead: use tile_job=(k, jobs) (CLI: --tiles K/J)"
            )
        if epochs != 1:
            raise bad(f"full mode has no epochs (got epochs={epochs}); leave it at 1")
        return names, (0, n)
    if not isinstance(batch_size, int | np.integer) or batch_size < MIN_BATCH:
        raise bad(
            f"batch_size must be an integer >= 4 (HSIC₁ divides by m(m-3)), got {batch_size!r}"
        )
    if batch_size > n:
        raise bad(
            f"batch_size {batch_size} is larger than the store's {n} samples; use a batch size "
            f"<= {n} (or --mode full for one exact Gram)"
        )
    if not isinstance(epochs, int | np.integer) or epochs < 1:
        raise bad(f"epochs must be an integer >= 1, got {epochs!r}")
    start, stop = rows if rows is not None else (0, n)
    if not 0 <= start < stop <= n:
        raise bad(f"rows {start}:{stop} must satisfy 0 <= start < stop <= n = {n}")
    if start % batch_size or (stop % batch_size and stop != n):
        raise bad(
            f"rows {start}:{stop} must start and stop on batch boundaries (multiples of "
            f"batch_size {batch_size}, or stop = n = {n}) so that partial caches tile the batches"
        )
    if batch_range(make_partition(n, batch_size, 1, 0), start, stop)[1] <= start // batch_size:
        raise bad(
            f"rows {start}:{stop} hold no batch: the last {n % batch_size} rows of each epoch "
            "are too few for a batch (HSIC₁ needs 4) and are dropped"
        )
    return names, (start, stop)


def _check_tiles(
    mode: str, n: int, tile_size: int, tile_job: tuple[int, int] | None
) -> tuple[int, int]:
    """The tile rows [start, stop) a full-mode build writes (all of them without a job)."""
    bad = GramCacheUsageError
    if mode != "full":
        if tile_job is not None:
            raise bad("tile_job (--tiles) splits full-mode Grams; minibatch caches use rows=")
        return (0, 0)
    if not isinstance(tile_size, int | np.integer) or tile_size < 1:
        raise bad(f"tile_size must be an integer >= 1, got {tile_size!r}")
    grid = TileGrid(n, int(tile_size))
    if tile_job is None:
        return (0, grid.count)
    job, jobs = tile_job
    if not (isinstance(jobs, int | np.integer) and jobs >= 1 and 0 <= job < jobs):
        raise bad(f"tile_job must be (k, jobs) with 0 <= k < jobs, got {tile_job!r}")
    return grid.job_rows(int(job), int(jobs))


def _finisher(kernel: str, threshold: float) -> Callable[[Tensor, str, int], np.ndarray]:
    """Ũ of a batch's kernel Gram from its (shifted) linear Gram, as float64 numpy."""

    def finish(gram: Tensor, layer: str, batch: int) -> np.ndarray:
        try:
            return centered_batch_gram(gram, kernel=kernel, threshold=threshold).cpu().numpy()
        except ValueError as error:
            raise GramCacheDataError(
                f"layer {layer!r}, batch {batch}: {error}; build the cache with kernel='linear'"
            ) from None

    return finish


def build_gram_cache(
    store: ActivationStore | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    batch_size: int = 256,
    epochs: int = 1,
    seed: int = 0,
    mode: str = "minibatch",
    kernel: str = "linear",
    threshold: float = 1.0,
    rows: tuple[int, int] | None = None,
    device: str | torch.device | None = "auto",
    layers: Sequence[str] | None = None,
    prefetch: int = 2,
    threads: int = 4,
    max_slab_bytes: int = 256 * 2**20,
    precision: str | None = None,
    tile_size: int = DEFAULT_TILE,
    storage: str = DEFAULT_STORAGE,
    tile_job: tuple[int, int] | None = None,
    overwrite: bool = False,
) -> GramCache:
    """Read a store once and write its Gram cache.

    Parameters
    ----------
    store:
        A complete activation store (path or open :class:`~ckapipe.store.ActivationStore`).
    out:
        Directory of the new cache. Built beside it in a hidden staging folder under a writer
        lock and renamed into place when complete.
    batch_size:
        m, rows per minibatch (4 ≤ m ≤ n). Each epoch's last batch holds the n mod m remaining
        rows (a remainder of 1–3 rows is dropped, with a :class:`RemainderDroppedWarning`).
        Ignored in full mode.
    epochs:
        Partitions of the rows: epoch 0 is the store order, epochs ≥ 1 seeded permutations.
    seed:
        Derives the epoch seeds (with n and m); use the same for every store of a study.
    mode:
        ``"minibatch"`` (per-batch Ũ Grams) or ``"full"`` (exact n×n linear Gram, stored as
        tiles of its upper triangle).
    kernel, threshold:
        ``"linear"`` or ``"rbf"`` (median bandwidth times ``threshold``, per batch).
    rows:
        ``(start, stop)`` on batch boundaries: a partial cache of the batches inside them.
    device:
        ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``.
    layers:
        Layer names to include (default: all), kept in store order.
    prefetch, threads, max_slab_bytes:
        Loader settings (read-ahead blocks, reader threads, bound of one column slab).
    precision:
        ``"float32"`` (minibatch mode only; its default): the shifted tiles are multiplied in
        float32 and summed in float64, about 2x faster on a CPU; its CKA stays within 1e-6 of
        float64's (``bench/RESULTS.md``, tests/test_gram_cache.py). In full mode, float32
        multiplies the float64-centered features in float32 (sums over column slabs in
        float64), for float32-stored tiles at twice the speed. ``"float64"`` (full mode's
        default): every product in float64. Recorded in the attributes.
    tile_size:
        Full mode: T, rows and columns of the stored Gram tiles (default 2048). Build memory is
        about T² float64 plus two row blocks of at most ``max_slab_bytes``; analysis reads one
        tile per layer at a time.
    storage:
        Dtype of the stored Grams (both modes), ``"float32"`` (default; half the disk, each
        entry rounded once to nearest, 2⁻²⁴ relative, after a float64 computation; minibatch
        CKA within 1e-6 of float64 storage) or ``"float64"`` (exact). Recorded as the
        ``storage_dtype`` attribute; readers always return float64.
    tile_job:
        Full mode: ``(k, jobs)``, 0-based job ``k`` of ``jobs``: a partial cache of a balanced
        share of the tile rows (:meth:`~ckapipe.analyze.tile_grid.TileGrid.job_rows`), e.g. for a
        SLURM array; join the parts with :func:`~ckapipe.analyze.gram_merge.merge_gram_caches`.
    overwrite:
        Replace an existing Gram cache at ``out`` (only once the new one is complete).

    Returns
    -------
    GramCache
        The finished cache, opened for reading.

    Raises
    ------
    WriterLockedError
        Another process is building ``out`` (names its pid).
    GramCacheError
        Bad arguments (also :class:`~ckapipe.errors.UsageError`), an existing ``out``, or a
        layer whose RBF bandwidth is undefined (also :class:`~ckapipe.errors.DataError`).
    """
    source = _open_store(store)
    names, (start, stop) = _check_arguments(
        source,
        batch_size=batch_size,
        epochs=epochs,
        mode=mode,
        kernel=kernel,
        threshold=threshold,
        rows=rows,
        layers=layers,
    )
    if precision is None:
        precision = default_precision(mode)
    if precision not in PRECISIONS:
        raise GramCacheUsageError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    names = [name for name in source.layer_names if name in names]  # store order
    out = Path(out)
    n = source.n_samples
    if storage not in STORAGE_DTYPES:
        raise GramCacheUsageError(f"storage must be one of {STORAGE_DTYPES}, got {storage!r}")
    tile_rows = _check_tiles(mode, n, tile_size, tile_job)
    partition = make_partition(n, batch_size, epochs, seed, mode=mode)
    batches: list[int] = []
    if mode == "minibatch":
        first, last = batch_range(partition, start, stop)
        per_epoch = partition["batches_per_epoch"]
        batches = [e * per_epoch + k for e in range(epochs) for k in range(first, last)]
        if partition["dropped_rows"] and stop == n:
            warnings.warn(
                f"{source.path}: {n} samples do not split into batches of {batch_size}: the last "
                f"{partition['dropped_rows']} of each epoch are too few for a batch (HSIC₁ needs "
                f"4) and are left out ({partition['samples_used']} of {n} used); choose a batch "
                "size whose remainder is 0 or at least 4 to use every sample",
                RemainderDroppedWarning,
                stacklevel=2,
            )
    attrs = _cache_attrs(
        source,
        names,
        partition,
        batches,
        (start, stop),
        mode=mode,
        kernel=kernel,
        threshold=threshold,
        precision=precision,
        storage=storage,
        seed=seed,
    )
    if mode == "full":
        attrs.update(
            {
                "tile_size": int(tile_size),
                "tile_rows": [int(tile_rows[0]), int(tile_rows[1])],
                "tile_job": None if tile_job is None else [int(tile_job[0]), int(tile_job[1])],
            }
        )
    settings = {
        "device": resolve_device(device),
        "prefetch": prefetch,
        "threads": threads,
        "product_dtype": torch.float64 if precision == "float64" else torch.float32,
        "max_slab_bytes": max_slab_bytes,
    }
    with staged_cache(out, overwrite) as group:
        write_attrs(group, attrs)
        if mode == "full":
            write_full_tiles(
                group,
                source,
                names,
                tile=tile_size,
                tile_rows=tile_rows,
                storage=storage,
                max_slab_bytes=max_slab_bytes,
                device=settings["device"],
                product_dtype=settings["product_dtype"],
            )
        else:
            arrays = BatchArrays(group, names, partition, batches, storage=storage)
            finish = _finisher(kernel, threshold)
            _epoch0_grams(source, arrays, partition, first, last, finish, settings)
            for epoch in range(1, epochs):
                _permuted_epoch_grams(
                    source, arrays, partition, epoch, first, last, finish, settings
                )
        write_attrs(group, {"complete": True})  # last: readers refuse the cache until here
    return GramCache.open(out)


def _cache_attrs(
    source: ActivationStore,
    names: list[str],
    partition: dict[str, Any],
    batches: list[int],
    rows: tuple[int, int],
    *,
    mode: str,
    kernel: str,
    threshold: float,
    precision: str,
    storage: str,
    seed: int,
) -> dict[str, Any]:
    """The root attributes of a new cache (one metadata write), completion flag still False."""
    start, stop = rows
    batch_size, epochs, n = partition["batch_size"], partition["epochs"], partition["n_samples"]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "mode": mode,
        "kernel": kernel,
        "threshold": float(threshold),
        "rbf_bandwidth_rule": RBF_RULE if kernel == "rbf" else None,
        "stored": "u_centered_gram" if mode == "minibatch" else "linear_gram",
        "precision": precision,
        "storage_dtype": storage,
        "batch_size": batch_size,
        "epochs": int(epochs),
        "seed": int(seed),
        "epoch_seeds": partition["epoch_seeds"],
        "n_samples": n,
        "samples_used": partition["samples_used"],
        "store": store_identity(source),
        "layers": names,
        "partition": partition,
        "rows": [int(start), int(stop)],
        "batches": batches,
        "versions": versions(),
        "created": now(),
        "complete": False,
    }


def _loader(settings: dict[str, Any]) -> dict[str, Any]:
    return {key: settings[key] for key in ("device", "prefetch", "threads")}


def _epoch0_grams(
    store: ActivationStore,
    arrays: BatchArrays,
    partition: dict[str, Any],
    first_batch: int,
    last_batch: int,
    finish: Callable[[Tensor, str, int], np.ndarray],
    settings: dict[str, Any],
) -> None:
    """Contiguous batches: row windows of whole batches ≈ one row chunk, tiled along columns.

    With a core free of torch's threads (:func:`~ckapipe.analyze.pass_overlap.free_core`), the
    next tile is shifted on a helper thread and finished batches are U-centered and written on
    another while this thread multiplies; the same functions on the same inputs, so the same
    bits (bench/RESULTS.md, GEMM floor section).
    """
    m = partition["batch_size"]
    requests = []
    for name in arrays.layers:
        row_chunk, column_chunk = store.chunk_shape(name)
        per_window = max(1, row_chunk // m)
        columns = column_ranges(store.layer(name).n_features, column_chunk)
        # windows on a global grid of batch numbers, so a batch's tiles do not depend on `rows`
        k = first_batch
        while k < last_batch:
            k_end = min(last_batch, (k // per_window + 1) * per_window)
            span = (k * m, batch_span(partition, k_end - 1)[1])
            for position, (c0, c1) in enumerate(columns):
                last_tile = position == len(columns) - 1
                tag = (name, k, k_end, last_tile)
                requests.append(BlockRequest(span, ((name, c0, c1),), tag=tag))
            k = k_end
    background = free_core(settings["device"])
    blocks = iter_blocks(store, requests, **_loader(settings))
    workspaces = 2 if background else 1  # the tile being multiplied, the one being prepared
    prepared = _shifted_batch_tiles(blocks, partition, settings["product_dtype"], workspaces)
    grams: dict[int, Tensor] | None = None
    with BatchWriter(arrays, finish, background=background) as writer:
        with closing(run_ahead(prepared, background)) as tiles:
            for (name, k, k_end, last_tile), j, x in tiles:
                if grams is None:
                    grams = {}
                    for i in range(k, k_end):
                        a, b = batch_span(partition, i)
                        grams[i] = torch.zeros(b - a, b - a, dtype=torch.float64, device=x.device)
                add_tile_products(grams[j], x)
                if last_tile and j == k_end - 1:
                    for i in range(k, k_end):
                        writer.write(name, i, grams[i])
                    grams = None


def _shifted_batch_tiles(
    blocks: Iterator[Block],
    partition: dict[str, Any],
    product_dtype: torch.dtype,
    workspaces: int,
) -> Iterator[tuple[Any, int, Tensor]]:
    """(block tag, batch number, X') for each batch of each epoch-0 block: the batch's rows of
    the block's column tile, shifted by its first row in the product dtype, in the next of
    ``workspaces`` rotating buffers (each X' is valid until that many more are yielded)."""
    buffers = [TileWorkspace() for _ in range(workspaces)]
    count = 0
    with closing(blocks):
        for block in blocks:
            k, k_end = block.request.tag[1:3]
            tile = block.tensors[0]
            first = block.request.rows[0]  # batch k's first row
            for j in range(k, k_end):
                a, b = batch_span(partition, j)
                x = shifted_tile(
                    tile[a - first : b - first], product_dtype, buffers[count % workspaces]
                )
                count += 1
                yield block.request.tag, j, x


def _permuted_epoch_grams(
    store: ActivationStore,
    arrays: BatchArrays,
    partition: dict[str, Any],
    epoch: int,
    first_batch: int,
    last_batch: int,
    finish: Callable[[Tensor, str, int], np.ndarray],
    settings: dict[str, Any],
) -> None:
    """Re-partitioned batches: full-height column slabs, each batch's rows gathered from them."""
    n = partition["n_samples"]
    per_epoch = partition["batches_per_epoch"]
    order = epoch_order(partition, epoch)
    device = settings["device"]
    numbers = range(first_batch, last_batch)
    members = {  # store rows of each batch, in batch order
        k: torch.from_numpy(order[slice(*batch_span(partition, k))]).to(device) for k in numbers
    }
    for name in arrays.layers:
        width = slab_width(store, name, n, settings["max_slab_bytes"])
        column_chunk = store.chunk_shape(name)[1]
        requests = [
            BlockRequest((0, n), ((name, c0, c1),))
            for c0, c1 in column_ranges(store.layer(name).n_features, column_chunk, width)
        ]
        grams = {
            k: torch.zeros(len(rows), len(rows), dtype=torch.float64, device=device)
            for k, rows in members.items()
        }
        workspace = TileWorkspace()
        for block in iter_blocks(store, requests, **_loader(settings)):
            slab = block.tensors[0]  # (n, w)
            for k, rows in members.items():
                add_shifted_products(
                    grams[k], slab.index_select(0, rows), settings["product_dtype"], workspace
                )
        for k in numbers:
            number = epoch * per_epoch + k
            arrays.write(name, number, finish(grams[k], name, number))
