"""Gram caches: each activation store reduced once to the Gram matrices every comparison needs.

A Gram cache is a zarr v3 group (format ``ckapipe.gram-cache``, version 1); see
``docs/CONTRACTS.md`` ("Gram cache") for the layout. Two modes:

``minibatch``
    Per layer, the U-centered Gram Ũ(K_b) (Székely & Rizzo 2014) of every minibatch b, float64,
    exactly what :func:`ckapipe.analyze.estimators.u_centered_gram` returns for the batch's rows.
    Epoch 0 cuts the store (already in random order) into contiguous batches of m rows; epoch
    e ≥ 1 re-partitions with ``numpy.random.default_rng(epoch_seeds[e]).permutation(n)``. The
    epoch seeds depend only on (seed, n, m), so every store of a study gets the same batches.
    The n mod m rows left over in an epoch are dropped (recorded).
``full``
    Per layer, the exact n×n linear Gram of the column-centered features (float64, O(n²)
    memory), accumulated from full-height column slabs in one read pass. With ``kernel="rbf"``
    the linear Gram is stored too (the RBF Gram is a function of it).

How a batch's Gram is formed: the features are upcast to float64 and shifted by the batch's first
row (which removes the large common offset of, e.g., post-ReLU features that makes uncentered
Gram entries cancel; a constant column becomes exactly 0), and K'_b = Σ_tiles X' X'ᵀ is
accumulated over column tiles of the store's chunk grid, so no batch ever needs its full width
in memory at once. Ũ(K'_b) equals Ũ of the column-centered Gram (U-centering removes any row and
column offsets of K, which is all a shift of the features changes) and RBF distances do not
see the shift either. RBF: σ² = threshold² · median of the batch's m×m squared distances (from
its linear Gram; diagonal included, numpy median), then K = exp(−d²/(2σ²)) and Ũ(K). Full mode
centers every column over all n rows in float64 before its products.

Reading: epoch 0 reads row windows of whole batches, about one row chunk high, tile by tile
along the column chunks (host memory independent of n). Epochs ≥ 1 read full-height column
slabs of each layer once per epoch and gather each batch's rows on the device; their Gram
accumulators hold (n // m) × m × m float64 per layer, so their memory grows with n.

Partial caches: ``rows=(start, stop)`` (multiples of m, or stop = n) keeps only the batches whose
positions lie inside those rows in every epoch, so disjoint row ranges (e.g. a SLURM array) hold
disjoint batches; :func:`merge_gram_caches` joins them into a cache equal, array for array and
bit for bit, to one full pass.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import Tensor

from ckapipe.analyze.estimators import gram_rbf, u_center
from ckapipe.analyze.loader import (
    BlockRequest,
    column_ranges,
    iter_blocks,
    resolve_device,
    slab_width,
)
from ckapipe.store import ActivationStore

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GramCache",
    "GramCacheError",
    "IncompatibleGramCachesError",
    "build_gram_cache",
    "check_compatible",
    "epoch_seeds",
    "make_partition",
    "merge_gram_caches",
]

FORMAT_NAME = "ckapipe.gram-cache"
FORMAT_VERSION = 1
MODES = ("minibatch", "full")
KERNELS = ("linear", "rbf")
PRECISIONS = ("float64", "float32")
PARTITION_SCHEME = "contiguous-epoch0-then-permuted/v1"
RBF_RULE = (
    "per batch: sigma^2 = threshold^2 * median of the batch's m x m squared distances "
    "(diagonal included, numpy median), K = exp(-d^2 / (2 sigma^2)), then U-centered"
)
# Full mode: a float64 copy of at most this many bytes of a slab exists at once.
_FULL_BLOCK_BYTES = 64 * 2**20


class GramCacheError(Exception):
    """A Gram cache cannot be built, opened or merged as asked."""


class IncompatibleGramCachesError(GramCacheError):
    """Gram caches that must describe the same samples and batches do not."""


# --------------------------------------------------------------------------- partition


def epoch_seeds(seed: int, n_samples: int, batch_size: int, epochs: int) -> list[int | None]:
    """Per-epoch permutation seeds; ``None`` for epoch 0 (the store's own order).

    They depend only on (seed, n, m, e), so every store of a study (same n, same settings) gets
    identical batches, and a cache with more epochs extends one with fewer.
    """
    seeds: list[int | None] = [None]
    for epoch in range(1, epochs):
        sequence = np.random.SeedSequence([int(seed), int(n_samples), int(batch_size), epoch])
        seeds.append(int(sequence.generate_state(1, dtype=np.uint32)[0]))
    return seeds


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def make_partition(
    n_samples: int, batch_size: int | None, epochs: int, seed: int, mode: str = "minibatch"
) -> dict[str, Any]:
    """The partition record of a cache; equal partitions ⇔ equal ``sha256``."""
    if mode == "full":
        record: dict[str, Any] = {
            "scheme": "full",
            "n_samples": int(n_samples),
            "batch_size": None,
            "epochs": 1,
            "epoch_seeds": [None],
            "n_batches_total": 0,
            "dropped_rows": 0,
        }
    else:
        assert batch_size is not None
        per_epoch = n_samples // batch_size
        record = {
            "scheme": PARTITION_SCHEME,
            "n_samples": int(n_samples),
            "batch_size": int(batch_size),
            "epochs": int(epochs),
            "epoch_seeds": epoch_seeds(seed, n_samples, batch_size, epochs),
            "n_batches_total": int(per_epoch * epochs),
            "dropped_rows": int(n_samples - per_epoch * batch_size),
        }
    record["sha256"] = _digest(record)
    return record


def epoch_order(partition: dict[str, Any], epoch: int) -> np.ndarray:
    """(n,) int64 store rows in epoch ``epoch``'s order: batch k is ``order[k*m:(k+1)*m]``."""
    n = partition["n_samples"]
    if epoch == 0:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng(partition["epoch_seeds"][epoch]).permutation(n).astype(np.int64)


def batch_rows(partition: dict[str, Any], batch: int) -> np.ndarray:
    """(m,) store rows of global batch number ``batch`` (epoch e, batch k ↦ e·(n//m) + k)."""
    m = partition["batch_size"]
    per_epoch = partition["n_samples"] // m
    epoch, k = divmod(int(batch), per_epoch)
    return epoch_order(partition, epoch)[k * m : (k + 1) * m]


# --------------------------------------------------------------------------- reading


@dataclass
class GramCache:
    """A complete Gram cache opened for reading (:meth:`open`).

    Attributes
    ----------
    path, attrs, mode, kernel, threshold, layer_names, batch_size (None in full mode),
    batches (sorted global batch numbers held, int64), identity (the store's identity dict),
    partition (dict), n_samples.
    """

    path: Path
    _group: zarr.Group

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> GramCache:
        """Open a Gram cache; refuses anything that is not a complete ckapipe Gram cache."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise GramCacheError(f"{path} is not a Gram cache (no zarr.json); check the path")
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        if attrs.get("format") != FORMAT_NAME:
            raise GramCacheError(
                f"{path} is not a ckapipe Gram cache (format {attrs.get('format')!r}); "
                "build one with `ckapipe gram STORE --out GRAMS`"
            )
        if attrs.get("format_version") != FORMAT_VERSION:
            raise GramCacheError(
                f"{path} has Gram cache format version {attrs.get('format_version')}, this "
                f"ckapipe reads version {FORMAT_VERSION}; rebuild it with `ckapipe gram`"
            )
        if not attrs.get("complete", False):
            raise GramCacheError(
                f"{path} is incomplete (no completion flag): its `ckapipe gram` run was "
                "interrupted or is still running; run it again"
            )
        return cls(path, group)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._group.attrs)

    @property
    def mode(self) -> str:
        return self._group.attrs["mode"]

    @property
    def kernel(self) -> str:
        return self._group.attrs["kernel"]

    @property
    def threshold(self) -> float:
        return float(self._group.attrs["threshold"])

    @property
    def layer_names(self) -> list[str]:
        return list(self._group.attrs["layers"])

    @property
    def batch_size(self) -> int | None:
        return self._group.attrs["batch_size"]

    @property
    def batches(self) -> np.ndarray:
        return np.asarray(self._group.attrs["batches"], dtype=np.int64)

    @property
    def identity(self) -> dict[str, Any]:
        return dict(self._group.attrs["store"])

    @property
    def partition(self) -> dict[str, Any]:
        return dict(self._group.attrs["partition"])

    @property
    def n_samples(self) -> int:
        return int(self._group.attrs["partition"]["n_samples"])

    def _layers(self, layers: Sequence[str] | None) -> list[str]:
        names = self.layer_names
        if layers is None:
            return names
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise GramCacheError(
                f"Gram cache {self.path} has no layer(s) {unknown}; its layers are {names}"
            )
        return list(layers)

    def _grams(self, name: str) -> zarr.Array:
        return self._group["grams"][name]

    def iter_batches(
        self, device: str | torch.device | None = None, layers: Sequence[str] | None = None
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(global batch number, Ũ Grams (L, m, m) float64)`` in global batch order.

        Parameters
        ----------
        device:
            Where the tensors go (default: CPU).
        layers:
            Subset of layer names, in the order wanted (default: all, store order).

        Yields
        ------
        (int, Tensor)
            A fresh tensor per batch; the next batch is read while this one is used.
        """
        if self.mode != "minibatch":
            raise GramCacheError(
                f"{self.path} is a full-mode cache (one n×n Gram per layer, no batches); "
                "use full_gram(layer)"
            )
        names = self._layers(layers)
        target = resolve_device(device) if device is not None else torch.device("cpu")
        arrays = [self._grams(name) for name in names]
        numbers = self.batches

        def read(index: int) -> np.ndarray:
            return np.stack([array[index] for array in arrays])  # (L, m, m)

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckapipe-grams") as pool:
            ahead: deque = deque()
            for index in range(min(2, len(numbers))):
                ahead.append(pool.submit(read, index))
            for index, number in enumerate(numbers):
                grams = ahead.popleft().result()
                if index + 2 < len(numbers):
                    ahead.append(pool.submit(read, index + 2))
                yield int(number), torch.from_numpy(grams).to(target)

    def full_gram(self, layer: str) -> np.ndarray:
        """(n, n) float64 linear Gram of the column-centered features of ``layer`` (full mode)."""
        if self.mode != "full":
            raise GramCacheError(
                f"{self.path} is a minibatch cache; full_gram needs one built with --mode full"
            )
        self._layers([layer])
        return np.asarray(self._grams(layer)[...])


def _open_cache(cache: GramCache | str | os.PathLike[str]) -> GramCache:
    return cache if isinstance(cache, GramCache) else GramCache.open(cache)


def _identity_key(identity: dict[str, Any]) -> dict[str, Any]:
    """The store identity without its path (the same store may be mounted elsewhere)."""
    return {key: value for key, value in identity.items() if key != "path"}


def check_compatible(caches: Sequence[GramCache | str | os.PathLike[str]]) -> None:
    """Raise :class:`IncompatibleGramCachesError` naming the first mismatch between caches.

    Caches are compatible (comparable model against model) when their stores hold the same
    samples in the same rows, and they share mode, kernel, threshold, partition and batches.
    """
    opened = [_open_cache(cache) for cache in caches]
    if len(opened) < 2:
        return
    first = opened[0]
    for other in opened[1:]:
        a, b = first.identity, other.identity
        if a["sample_ids_sha256"] != b["sample_ids_sha256"]:
            raise IncompatibleGramCachesError(
                f"{first.path} and {other.path} come from stores with different sample ids or "
                f"row order (sample_ids sha256 {a['sample_ids_sha256'][:12]}… vs "
                f"{b['sample_ids_sha256'][:12]}…); extract both models with the same dataset, "
                "--limit and --seed"
            )
        for what, x, y in (
            ("mode", first.mode, other.mode),
            ("kernel", first.kernel, other.kernel),
            ("threshold", first.threshold, other.threshold),
        ):
            if x != y:
                raise IncompatibleGramCachesError(
                    f"{first.path} and {other.path} differ in {what} ({x!r} vs {y!r}); "
                    f"rebuild one with `ckapipe gram --{what} {x}`"
                )
        pa, pb = first.partition, other.partition
        if pa["sha256"] != pb["sha256"]:
            differing = sorted(k for k in pa if k != "sha256" and pa.get(k) != pb.get(k))
            raise IncompatibleGramCachesError(
                f"{first.path} and {other.path} use different partitions (differing: "
                f"{differing}); rebuild them with the same --batch-size, --epochs and --seed"
            )
        if not np.array_equal(first.batches, other.batches):
            raise IncompatibleGramCachesError(
                f"{first.path} holds batches {_ranges(first.batches)} but {other.path} holds "
                f"{_ranges(other.batches)}; merge partial caches first (`ckapipe merge-grams`)"
            )


def _ranges(numbers: np.ndarray) -> str:
    """Compact text of sorted integers: ``0-3,7,9-10``."""
    if len(numbers) == 0:
        return "none"
    parts, start, prev = [], int(numbers[0]), int(numbers[0])
    for value in (*(int(v) for v in numbers[1:]), None):
        if value is not None and value == prev + 1:
            prev = value
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if value is not None:
            start = prev = value
    return ",".join(parts)


# --------------------------------------------------------------------------- writing


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _versions() -> dict[str, str]:
    from ckapipe import __version__

    return {
        "ckapipe": __version__,
        "zarr": zarr.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def _prepare_out(out: Path) -> zarr.Group:
    """Create the output group; an incomplete Gram cache left by an interrupted run is replaced."""
    if out.exists() and any(out.iterdir()):
        leftover = False
        if (out / "zarr.json").is_file():
            try:
                attrs = dict(zarr.open_group(str(out), mode="r").attrs)
                leftover = attrs.get("format") == FORMAT_NAME and not attrs.get("complete")
            except Exception:  # noqa: BLE001 - anything unreadable is not ours to delete
                leftover = False
        if not leftover:
            raise GramCacheError(
                f"{out} already exists and is not an interrupted Gram cache; remove it or "
                "choose another --out"
            )
        shutil.rmtree(out)
    return zarr.open_group(str(out), mode="w", zarr_format=3)


def _create_batch_array(group: zarr.Group, name: str, n_batches: int, m: int) -> zarr.Array:
    return group.create_array(
        name,
        shape=(n_batches, m, m),
        chunks=(1, m, m),
        dtype="float64",
        dimension_names=("batch", "sample_i", "sample_j"),
        compressors=None,
        fill_value=0.0,
    )


def _open_store(store: ActivationStore | str | os.PathLike[str]) -> ActivationStore:
    if isinstance(store, ActivationStore):
        if not store.is_complete:
            raise GramCacheError(
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
    if mode not in MODES:
        raise GramCacheError(f"mode must be one of {MODES}, got {mode!r}")
    if n < 4:
        # checked first: no batch size (nor --mode full) can work, so none may be suggested
        raise GramCacheError(
            f"store {store.path} holds only {n} samples, and HSIC₁ needs at least 4 (it divides "
            f"by n(n-3)); delete it (rm -r {store.path}) and re-extract it with at least 4 "
            "samples (a larger --limit or dataset)"
        )
    if kernel not in KERNELS:
        raise GramCacheError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not (isinstance(threshold, int | float) and threshold > 0 and np.isfinite(threshold)):
        raise GramCacheError(f"threshold (RBF bandwidth multiple) must be > 0, got {threshold!r}")
    names = list(layers) if layers else store.layer_names
    unknown = [name for name in names if name not in store.layer_names]
    if unknown:
        raise GramCacheError(
            f"store {store.path} has no layer(s) {unknown}; its layers are {store.layer_names}"
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise GramCacheError(f"layers selected more than once: {duplicates}")
    if mode == "full":
        if rows is not None:
            raise GramCacheError(
                "rows=(start, stop) builds partial minibatch caches; full mode computes the "
                "exact n×n Gram in one pass over all rows"
            )
        if epochs != 1:
            raise GramCacheError(f"full mode has no epochs (got epochs={epochs}); leave it at 1")
        return names, (0, n)
    if not isinstance(batch_size, int | np.integer) or batch_size < 4:
        raise GramCacheError(
            f"batch_size must be an integer >= 4 (HSIC₁ divides by m(m-3)), got {batch_size!r}"
        )
    if batch_size > n:
        raise GramCacheError(
            f"batch_size {batch_size} is larger than the store's {n} samples; use a batch size "
            f"<= {n} (or --mode full for one exact Gram)"
        )
    if not isinstance(epochs, int | np.integer) or epochs < 1:
        raise GramCacheError(f"epochs must be an integer >= 1, got {epochs!r}")
    start, stop = rows if rows is not None else (0, n)
    if not 0 <= start < stop <= n:
        raise GramCacheError(f"rows {start}:{stop} must satisfy 0 <= start < stop <= n = {n}")
    if start % batch_size or (stop % batch_size and stop != n):
        raise GramCacheError(
            f"rows {start}:{stop} must start and stop on batch boundaries (multiples of "
            f"batch_size {batch_size}, or stop = n = {n}) so that partial caches tile the batches"
        )
    if stop // batch_size <= start // batch_size:
        raise GramCacheError(
            f"rows {start}:{stop} hold no whole batch of {batch_size} rows (the last "
            f"{n % batch_size} rows of each epoch are dropped)"
        )
    return names, (start, stop)


class _BatchGramAccumulator:
    """Σ over column tiles of X' X'ᵀ for a set of batches, accumulated in float64 on the device.

    X' is the batch's tile shifted by the batch's first row. Ũ(K) is unchanged by any shift of
    the features (it removes row and column offsets of K), and so are RBF distances, so the shift
    does the job of centering: it removes the large common offset (post-ReLU means) that makes
    uncentered Gram entries huge and their differences cancel, and a constant column becomes
    exactly 0. float16/bfloat16 values are exact in float32 and float64, so the shift is exact
    for them. ``product_dtype`` float32 runs the tile products in float32 (about 2x faster on a
    CPU) and still sums tiles in float64.
    """

    def __init__(self, n_batches: int, m: int, device: torch.device, product_dtype: torch.dtype):
        self.grams = torch.zeros(n_batches, m, m, dtype=torch.float64, device=device)
        self.product_dtype = product_dtype

    def add(self, j: int, rows: Tensor) -> None:
        """Add the tile ``rows`` (m, w) of batch j."""
        x = rows.to(self.product_dtype)
        if x.data_ptr() == rows.data_ptr():
            x = x.clone()  # same dtype as stored: do not shift the loader's buffer in place
        x -= x[:1].clone()  # in place: one float64 copy of the tile at a time, not two
        if self.product_dtype == torch.float64:
            self.grams[j].addmm_(x, x.T)
        else:
            self.grams[j] += x @ x.T


def _finish_batch(gram: Tensor, kernel: str, threshold: float, layer: str, batch: int) -> Tensor:
    """Ũ of the batch's kernel Gram, given its linear Gram (m, m) float64."""
    if kernel == "rbf":
        try:
            gram = gram_rbf(gram=gram, threshold=threshold)
        except ValueError as error:
            raise GramCacheError(
                f"layer {layer!r}, batch {batch}: {error}; build the cache with kernel='linear'"
            ) from None
    return u_center(gram)


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
    precision: str = "float64",
) -> GramCache:
    """Read a store once and write its Gram cache.

    Parameters
    ----------
    store:
        A complete activation store (path or open :class:`~ckapipe.store.ActivationStore`).
    out:
        Directory of the new cache (must not exist, be empty, or be an interrupted cache).
    batch_size:
        m, rows per minibatch (4 ≤ m ≤ n). Ignored in full mode.
    epochs:
        Partitions of the rows: epoch 0 is the store order, epochs ≥ 1 seeded permutations.
    seed:
        Derives the epoch seeds (with n and m); use the same for every store of a study.
    mode:
        ``"minibatch"`` (per-batch Ũ Grams) or ``"full"`` (exact n×n linear Gram).
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
        ``"float64"`` (default): every product in float64. ``"float32"`` (minibatch mode only):
        the shifted tiles are multiplied in float32 and summed in float64, about 2x faster on
        a CPU; see ``bench/RESULTS.md`` for its measured error. Recorded in the attributes.

    Returns
    -------
    GramCache
        The finished cache, opened for reading.
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
    if precision not in PRECISIONS:
        raise GramCacheError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "float64" and mode == "full":
        raise GramCacheError(
            "full mode is the exact estimator and computes in float64; drop precision="
            f"{precision!r} or use minibatch mode"
        )
    product_dtype = torch.float64 if precision == "float64" else torch.float32
    names = [name for name in source.layer_names if name in names]  # store order
    target = resolve_device(device)
    out = Path(out)
    n = source.n_samples
    partition = make_partition(n, batch_size, epochs, seed, mode=mode)
    loader = {"device": target, "prefetch": prefetch, "threads": threads}

    if mode == "minibatch":
        first_batch, last_batch = start // batch_size, stop // batch_size  # [first, last)
        per_epoch = n // batch_size
        batches = [
            epoch * per_epoch + k for epoch in range(epochs) for k in range(first_batch, last_batch)
        ]
    else:
        batches = []
    group = _prepare_out(out)
    group.attrs.update(
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "mode": mode,
            "kernel": kernel,
            "threshold": float(threshold),
            "rbf_bandwidth_rule": RBF_RULE if kernel == "rbf" else None,
            "stored": "u_centered_gram" if mode == "minibatch" else "linear_gram",
            "precision": precision,
            "batch_size": int(batch_size) if mode == "minibatch" else None,
            "epochs": int(epochs),
            "seed": int(seed),
            "epoch_seeds": partition["epoch_seeds"],
            "store": source.identity(),
            "layers": names,
            "partition": partition,
            "rows": [int(start), int(stop)],
            "batches": batches,
            "versions": _versions(),
            "created": _now(),
            "complete": False,
        }
    )
    grams = group.require_group("grams")
    if mode == "full":
        for name in names:
            gram = _full_gram(source, name, max_slab_bytes=max_slab_bytes, **loader)
            chunk_rows = max(1, min(n, (16 * 2**20) // (8 * n)))
            array = grams.create_array(
                name,
                shape=(n, n),
                chunks=(chunk_rows, n),
                dtype="float64",
                dimension_names=("sample_i", "sample_j"),
                compressors=None,
            )
            array[...] = gram.cpu().numpy()
    else:
        index = group.create_array(
            "batch_index", shape=(len(batches),), dtype="int64", dimension_names=("batch",)
        )
        index[...] = np.asarray(batches, dtype=np.int64)
        arrays = {
            name: _create_batch_array(grams, name, len(batches), batch_size) for name in names
        }
        n_local = last_batch - first_batch
        _epoch0_grams(
            source,
            arrays,
            batch_size,
            first_batch,
            last_batch,
            kernel,
            threshold,
            product_dtype=product_dtype,
            **loader,
        )
        for epoch in range(1, epochs):
            _permuted_epoch_grams(
                source,
                arrays,
                partition,
                epoch,
                first_batch,
                last_batch,
                local_offset=epoch * n_local,
                kernel=kernel,
                threshold=threshold,
                max_slab_bytes=max_slab_bytes,
                product_dtype=product_dtype,
                **loader,
            )
    group.attrs["complete"] = True  # last: readers refuse the cache until here
    return GramCache.open(out)


def _epoch0_grams(
    store: ActivationStore,
    arrays: dict[str, zarr.Array],
    m: int,
    first_batch: int,
    last_batch: int,
    kernel: str,
    threshold: float,
    product_dtype: torch.dtype,
    **loader: Any,
) -> None:
    """Contiguous batches: row windows of whole batches ≈ one row chunk, tiled along columns."""
    requests = []
    for name in arrays:
        row_chunk, column_chunk = store.chunk_shape(name)
        per_window = max(1, row_chunk // m)
        columns = column_ranges(store.layer(name).n_features, column_chunk)
        # windows on a global grid of batch numbers, so a batch's tiles do not depend on `rows`
        k = first_batch
        while k < last_batch:
            k_end = min(last_batch, (k // per_window + 1) * per_window)
            for position, (c0, c1) in enumerate(columns):
                last_tile = position == len(columns) - 1
                requests.append(
                    BlockRequest((k * m, k_end * m), ((name, c0, c1),), tag=(name, k, last_tile))
                )
            k = k_end
    accumulator: _BatchGramAccumulator | None = None
    for block in iter_blocks(store, requests, **loader):
        name, k, last_tile = block.request.tag
        n_batches = block.request.n_rows // m
        if accumulator is None:
            accumulator = _BatchGramAccumulator(
                n_batches, m, block.tensors[0].device, product_dtype
            )
        tile = block.tensors[0]
        for j in range(n_batches):
            accumulator.add(j, tile[j * m : (j + 1) * m])
        if last_tile:
            finished = torch.stack(
                [
                    _finish_batch(accumulator.grams[j], kernel, threshold, name, k + j)
                    for j in range(n_batches)
                ]
            )
            local = k - first_batch
            arrays[name][local : local + n_batches] = finished.cpu().numpy()
            accumulator = None


def _permuted_epoch_grams(
    store: ActivationStore,
    arrays: dict[str, zarr.Array],
    partition: dict[str, Any],
    epoch: int,
    first_batch: int,
    last_batch: int,
    *,
    local_offset: int,
    kernel: str,
    threshold: float,
    max_slab_bytes: int,
    product_dtype: torch.dtype,
    **loader: Any,
) -> None:
    """Re-partitioned batches: full-height column slabs, each batch's rows gathered from them."""
    m = partition["batch_size"]
    n = partition["n_samples"]
    per_epoch = n // m
    order = epoch_order(partition, epoch)
    device = loader["device"]
    batch_rows_ = torch.from_numpy(order[first_batch * m : last_batch * m].reshape(-1, m)).to(
        device
    )  # (B, m) store rows of each batch, in batch order
    for name in arrays:
        width = slab_width(store, name, n, max_slab_bytes)
        column_chunk = store.chunk_shape(name)[1]
        requests = [
            BlockRequest((0, n), ((name, c0, c1),))
            for c0, c1 in column_ranges(store.layer(name).n_features, column_chunk, width)
        ]
        accumulator = _BatchGramAccumulator(len(batch_rows_), m, device, product_dtype)
        for block in iter_blocks(store, requests, **loader):
            slab = block.tensors[0]  # (n, w)
            for j, rows in enumerate(batch_rows_):
                accumulator.add(j, slab.index_select(0, rows))
        finished = torch.stack(
            [
                _finish_batch(
                    accumulator.grams[j],
                    kernel,
                    threshold,
                    name,
                    epoch * per_epoch + first_batch + j,
                )
                for j in range(len(batch_rows_))
            ]
        )
        arrays[name][local_offset : local_offset + len(batch_rows_)] = finished.cpu().numpy()


def _full_gram(store: ActivationStore, name: str, *, max_slab_bytes: int, **loader: Any) -> Tensor:
    """Exact (n, n) float64 Gram of the column-centered features, one pass over column slabs."""
    n = store.n_samples
    gram = torch.zeros(n, n, dtype=torch.float64, device=loader["device"])
    width = slab_width(store, name, n, max_slab_bytes)
    column_chunk = store.chunk_shape(name)[1]
    requests = [
        BlockRequest((0, n), ((name, c0, c1),))
        for c0, c1 in column_ranges(store.layer(name).n_features, column_chunk, width)
    ]
    step = max(1, _FULL_BLOCK_BYTES // (8 * n))
    for block in iter_blocks(store, requests, **loader):
        slab = block.tensors[0]
        for a in range(0, slab.shape[1], step):
            x = slab[:, a : a + step].to(torch.float64)
            x = x - x[:1]
            x = x - x.mean(dim=0, keepdim=True)
            gram.addmm_(x, x.T)
    return gram


# --------------------------------------------------------------------------- merging


def merge_gram_caches(
    parts: Sequence[GramCache | str | os.PathLike[str]], out: str | os.PathLike[str]
) -> GramCache:
    """Join partial minibatch caches of one store into one cache.

    Parameters
    ----------
    parts:
        Complete partial caches built from the same store with the same settings (``rows=``
        ranges that do not overlap).
    out:
        Directory of the merged cache.

    Returns
    -------
    GramCache
        Holding the union of the parts' batches, in global batch order, bit for bit.

    Raises
    ------
    IncompatibleGramCachesError
        Different stores, settings or partitions, or a batch held by two parts.
    """
    opened = [_open_cache(part) for part in parts]
    if not opened:
        raise GramCacheError("merge needs at least one partial Gram cache")
    first = opened[0]
    if first.mode != "minibatch":
        raise GramCacheError(
            f"{first.path} is a full-mode cache; full mode is built in one pass, nothing to merge"
        )
    owner: dict[int, Path] = {}
    for part in opened:
        for what, x, y in (
            ("store", _identity_key(first.identity), _identity_key(part.identity)),
            ("mode", first.mode, part.mode),
            ("kernel", first.kernel, part.kernel),
            ("threshold", first.threshold, part.threshold),
            ("layers", first.layer_names, part.layer_names),
            ("partition", first.partition["sha256"], part.partition["sha256"]),
        ):
            if x != y:
                raise IncompatibleGramCachesError(
                    f"cannot merge {part.path} with {first.path}: they differ in {what} "
                    f"({y!r} vs {x!r}); partial caches must come from one store and one "
                    "`ckapipe gram` setting, differing only in --rows"
                )
        for number in part.batches:
            if int(number) in owner:
                raise IncompatibleGramCachesError(
                    f"batch {int(number)} is in both {owner[int(number)]} and {part.path}: "
                    "their --rows ranges overlap; merge partial caches of disjoint ranges"
                )
            owner[int(number)] = part.path
    batches = sorted(owner)
    m = first.batch_size
    group = _prepare_out(Path(out))
    attrs = first.attrs
    attrs.update(
        {
            "rows": None,
            "batches": batches,
            "merged_from": [
                {"path": str(part.path), "rows": part.attrs.get("rows")} for part in opened
            ],
            "versions": _versions(),
            "created": _now(),
            "complete": False,
        }
    )
    group.attrs.update(attrs)
    index = group.create_array(
        "batch_index", shape=(len(batches),), dtype="int64", dimension_names=("batch",)
    )
    index[...] = np.asarray(batches, dtype=np.int64)
    grams = group.require_group("grams")
    position = {number: i for i, number in enumerate(batches)}
    for name in first.layer_names:
        array = _create_batch_array(grams, name, len(batches), m)
        for part in opened:
            source = part._grams(name)
            for local, number in enumerate(part.batches):
                array[position[int(number)]] = source[local]
    group.attrs["complete"] = True
    return GramCache.open(out)
