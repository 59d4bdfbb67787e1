"""The Gram cache format: its name and version, its errors, the reader :class:`GramCache`.

Importing this module does not import torch (only :meth:`GramCache.iter_batches` needs it), so
that the workflow can read the format version cheaply. Built by
:mod:`ckapipe.analyze.gram_build`, merged by :mod:`ckapipe.analyze.gram_merge`.

A Gram cache is a zarr v3 group (format ``ckapipe.gram-cache``, version 3) built on
:mod:`ckapipe.formats`: it is written in a staging folder under a writer lock and renamed into
place when complete (a second writer is refused at once; a killed build leaves nothing at --out,
or the previous cache intact), every array carries a CRC-32C checksum on every chunk and every
chunk is written, and :meth:`GramCache.open` refuses an old format, an incomplete cache and a
deleted chunk. Two modes:

``minibatch``
    Per layer, the U-centered Gram Ũ(K_b) (Székely & Rizzo 2014) of every minibatch b, what
    :func:`ckapipe.analyze.estimators.centered_batch_gram` returns for the batch's rows (formed
    and summed in float64), stored in dtype ``storage_dtype``: float32 by default, each entry
    rounded once to nearest when the finished Ũ is written (minibatch CKA stays within 1e-6 of
    the float64 path, measured in the tests and ``bench/RESULTS.md``), or float64 (exact);
    chosen with ``ckapipe gram --storage``, ``ckapipe extract --gram-storage`` (the fused
    path: :class:`~ckapipe.extract.fused_gram.GramRequest` ``storage``, bit for bit what
    ``ckapipe gram`` stores) and the workflow's ``analysis.gram_storage`` (part of the cache
    key). A cache without the attribute (built before it existed) is float64. Every reader
    (:meth:`GramCache.batch_gram`, :meth:`GramCache.iter_batches`,
    :meth:`GramCache.read_batches_into`) widens to float64 exactly, so the analysis (CKA,
    intervals, permutation null) always computes in float64.
    Epoch 0 cuts the store (already in random order) into contiguous batches of m rows; epoch
    e ≥ 1 re-partitions with ``numpy.random.default_rng(epoch_seeds[e]).permutation(n)``. The
    epoch seeds depend only on (seed, n, m), so every store of a study gets the same batches.
    Every sample is used: the last batch of each epoch holds the r = n mod m remaining rows and
    carries its own 1/(r(r−3)) factor in HSIC₁, exactly as :class:`MinibatchCKA` and
    :func:`ckapipe.compare` treat a short last batch. Only a remainder of 1–3 rows, which the
    unbiased estimator cannot use, is dropped (recorded as ``dropped_rows`` and warned about at
    build time). Grams of full batches are ``grams/<layer>`` (B, m, m); those of short last
    batches ``grams_last/<layer>`` (B', r, r), so no batch is padded.
``full``
    Per layer, the exact n×n linear Gram of the column-centered features (centered and
    multiplied in float64), stored as T×T tiles of its upper triangle (``tile_size`` T,
    :class:`~ckapipe.analyze.tile_grid.TileGrid`): ``grams/<layer>`` (P, T, T), one chunk per
    tile, dtype ``storage_dtype`` (float32 by default, or float64), numbered row-major over the
    tiles (I, J) with I ≤ J; tile (J, I) is the transpose of (I, J); tiles of the last
    row/column are zero-padded to T×T. ``tile_rows`` [a, b) says which tile rows a cache holds
    (all of them, or a job's share: a partial cache, merged by :func:`~ckapipe.analyze.
    gram_merge.merge_gram_caches`). Nothing reads the whole n×n matrix: analysis streams tiles
    (:meth:`GramCache.read_tile`); :func:`read_full_gram` assembles it for small n. With
    ``kernel="rbf"`` the linear Gram is stored too (the RBF Gram is a function of it). Version 2
    caches (one (n, n) float64 array) are refused with a rebuild message.

Identity. The cache records its store's identity, including the dataset spec and the store's
input fingerprint (a hash of every input tensor fed to the model). Caches are compared only when
their sample ids and, where both stores have one, their input fingerprints agree: equal sample
ids only mean the same dataset size, seed and order, not the same data.

Partial caches: ``rows=(start, stop)`` (multiples of m, or stop = n) keeps only the batches whose
positions lie inside those rows in every epoch, so disjoint row ranges (e.g. a SLURM array) hold
disjoint batches; :func:`~ckapipe.analyze.gram_merge.merge_gram_caches` joins them into a cache equal, array for array and
bit for bit, to one full pass. Parts must share ``storage_dtype`` (a mix is refused).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from ckapipe.analyze.partition import batch_locations, batch_rows
from ckapipe.analyze.tile_grid import TileGrid
from ckapipe.errors import (
    DataError,
    FormatError,
    IncompatibleInputsError,
    IncompleteError,
    IntegrityError,
    UsageError,
)
from ckapipe.formats import (
    WriterLock,
    check_chunks,
    check_format,
    create_array,
    sibling_lock_path,
    staged_directory,
)

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from ckapipe.store import ActivationStore

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GramCache",
    "GramCacheError",
    "IncompatibleGramCachesError",
    "IncompleteGramCacheError",
    "RemainderDroppedWarning",
    "UnverifiedDatasetWarning",
    "check_compatible",
    "dataset_mismatch",
    "dataset_unverified",
    "read_full_gram",
    "store_identity",
]

FORMAT_NAME = "ckapipe.gram-cache"
FORMAT_VERSION = 3  # 3: full-mode Grams stored as tiles of the upper triangle
MODES = ("minibatch", "full")
STORAGE_DTYPES = ("float32", "float64")
DEFAULT_TILE = 2048
# read_full_gram refuses to assemble a Gram larger than this (n = 16384 in float64)
FULL_GRAM_MAX_BYTES = 2 * 2**30
KERNELS = ("linear", "rbf")
PRECISIONS = ("float64", "float32")


DEFAULT_STORAGE = "float32"


def default_precision(mode: str) -> str:
    """The product precision a Gram cache of ``mode`` gets unless one is asked for.

    Minibatch mode: float32 products of float64-shifted features with float64 sums (CKA within
    1e-6 of float64, measured in the tests); full mode is the exact estimator: float64.
    """
    return "float64" if mode == "full" else "float32"


RBF_RULE = (
    "per batch: sigma^2 = threshold^2 * median of the batch's m x m squared distances "
    "(diagonal included, numpy median), K = exp(-d^2 / (2 sigma^2)), then U-centered"
)
REBUILD = "rebuild it from its activation store with `ckapipe gram STORE --out GRAMS`"


class GramCacheError(FormatError):
    """A Gram cache cannot be built, opened or merged as asked."""


class GramCacheUsageError(GramCacheError, UsageError):
    """An argument of a Gram cache build or merge is invalid."""


class GramCacheDataError(GramCacheError, DataError):
    """A layer's data cannot give the requested Grams (e.g. an undefined RBF bandwidth)."""


class IncompatibleGramCachesError(GramCacheError, IncompatibleInputsError):
    """Gram caches that must describe the same samples and batches do not."""


class IncompleteGramCacheError(GramCacheError, IncompleteError):
    """A Gram cache without its completion flag, or one still being built."""


class GramCacheIntegrityError(GramCacheError, IntegrityError):
    """A chunk file of a Gram cache is missing."""


class RemainderDroppedWarning(UserWarning):
    """n mod m is 1–3: those rows of each epoch cannot form a batch and are left out."""


class UnverifiedDatasetWarning(UserWarning):
    """A store has no input fingerprint, so equal dataset content cannot be checked."""


# --------------------------------------------------------------------------- identity


def _fingerprint(attrs: dict[str, Any]) -> str | None:
    """A store's input fingerprint (``input_fingerprint``, or ``input_sha256`` before it)."""
    value = attrs.get("input_fingerprint") or attrs.get("input_sha256")
    return str(value) if value else None


def store_identity(store: ActivationStore) -> dict[str, Any]:
    """The store's identity plus what its dataset content is (fingerprint, or that it has none)."""
    identity = store.identity()
    fingerprint = _fingerprint(store.attrs)
    identity["input_fingerprint"] = fingerprint
    if fingerprint is None:
        identity["input_fingerprint_note"] = (
            "the store records no input fingerprint (e.g. imported from HDF5), so its dataset "
            "content cannot be checked against other stores; only its sample ids can"
        )
    return identity


def describe_dataset(identity: dict[str, Any]) -> str:
    """Dataset spec and short input fingerprint of a store identity, for messages."""
    spec = identity.get("dataset")
    if isinstance(spec, dict):
        text = json.dumps(spec, sort_keys=True, default=str)
    elif spec:
        text = str(spec)
    else:
        text = "an unrecorded dataset"
    fingerprint = identity.get("input_fingerprint")
    short = f"input fingerprint {fingerprint[:12]}…" if fingerprint else "no input fingerprint"
    return f"{text} ({short})"


def dataset_mismatch(
    a: dict[str, Any], b: dict[str, Any], label_a: str, label_b: str
) -> str | None:
    """Why two store identities do not hold the same inputs, or None if they may.

    Both fingerprinted: they must be equal. Sample ids are checked separately (they say order).
    """
    fa, fb = a.get("input_fingerprint"), b.get("input_fingerprint")
    if fa and fb and fa != fb:
        return (
            f"{label_a} and {label_b} were extracted from different inputs: {label_a} from "
            f"{describe_dataset(a)}, {label_b} from {describe_dataset(b)}. Equal sample ids only "
            "mean the same dataset size, seed and order, so their CKA would compare unrelated "
            "samples; extract both models from the same dataset with the same preprocessing"
        )
    return None


def dataset_unverified(
    a: dict[str, Any], b: dict[str, Any], label_a: str, label_b: str
) -> str | None:
    """A warning text when two different stores cannot be checked to hold the same inputs.

    That is when one of them records no input fingerprint (e.g. imported from HDF5): then only
    their sample ids could be compared. Caches of one store (same identity) need no warning.
    """
    missing = [label for label, i in ((label_a, a), (label_b, b)) if not i.get("input_fingerprint")]
    if not missing or identity_key(a) == identity_key(b):
        return None
    return (
        f"{' and '.join(missing)}: no input fingerprint in the store (e.g. imported from HDF5), "
        f"so it cannot be checked that {label_a} and {label_b} saw the same data "
        f"({describe_dataset(a)} vs {describe_dataset(b)}); only their sample ids agree. Make "
        "sure both were extracted from the same dataset and preprocessing, or re-extract with "
        "`ckapipe extract` to record a fingerprint"
    )


def identity_key(identity: dict[str, Any]) -> dict[str, Any]:
    """The store identity without its path (the same store may be mounted elsewhere)."""
    return {key: value for key, value in identity.items() if key != "path"}


# --------------------------------------------------------------------------- reading


@dataclass
class GramCache:
    """A complete Gram cache opened for reading (:meth:`open`).

    Attributes
    ----------
    path, attrs, mode, kernel, threshold, layer_names, batch_size (None in full mode),
    batches (sorted global batch numbers held, int64), batch_sizes (rows of each held batch),
    identity (the store's identity dict, with its dataset spec and input fingerprint),
    partition (dict), n_samples, samples_used, dropped_rows.
    """

    path: Path
    _group: zarr.Group

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> GramCache:
        """Open a Gram cache; refuses anything that is not a complete, undamaged Gram cache.

        Raises :class:`IncompleteGramCacheError` (no completion flag, or being built),
        :class:`GramCacheIntegrityError` (a chunk file missing) or :class:`GramCacheError`.
        """
        path = Path(path)
        if not (path / "zarr.json").is_file():
            if WriterLock.is_held(sibling_lock_path(path)):
                raise IncompleteGramCacheError(
                    f"{path} is being built by another process (`ckapipe gram` or "
                    "`ckapipe merge-grams` holds its lock); wait for it to finish"
                )
            raise GramCacheError(
                f"{path} is not a Gram cache (no zarr.json); check the path, or build one with "
                "`ckapipe gram STORE --out GRAMS`"
            )
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        try:
            check_format(
                attrs,
                path,
                name=FORMAT_NAME,
                version=FORMAT_VERSION,
                what="Gram cache",
                remedy=REBUILD,
            )
        except FormatError as error:
            raise GramCacheError(str(error)) from None
        if not attrs.get("complete", False):
            raise IncompleteGramCacheError(
                f"{path} is incomplete (no completion flag): its build was interrupted or "
                f"damaged; {REBUILD} (with --overwrite)"
            )
        try:
            check_chunks(path)
        except IntegrityError as error:
            raise GramCacheIntegrityError(str(error).replace("re-create it", REBUILD)) from None
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
    def storage_dtype(self) -> str:
        """Dtype of the stored Grams, ``"float32"`` or ``"float64"`` (every reader widens to
        float64). Caches from before the attribute existed hold float64 minibatch Grams."""
        return str(self._group.attrs.get("storage_dtype", "float64"))

    @property
    def batch_size(self) -> int | None:
        return self._group.attrs["batch_size"]

    @property
    def batches(self) -> np.ndarray:
        return np.asarray(self._group.attrs["batches"], dtype=np.int64)

    @property
    def batch_sizes(self) -> np.ndarray:
        """(B,) int64 rows of each held batch (m, or the short last batch's r)."""
        partition = self.partition
        return np.asarray(
            [len(batch_rows(partition, number)) for number in self.batches], dtype=np.int64
        )

    @property
    def identity(self) -> dict[str, Any]:
        return dict(self._group.attrs["store"])

    @property
    def partition(self) -> dict[str, Any]:
        return dict(self._group.attrs["partition"])

    @property
    def n_samples(self) -> int:
        """n, the store's samples."""
        return int(self._group.attrs["partition"]["n_samples"])

    @property
    def samples_used(self) -> int:
        """Samples that enter each epoch's batches (n minus a dropped 1–3 row remainder)."""
        return int(self._group.attrs["samples_used"])

    @property
    def dropped_rows(self) -> int:
        """Rows of each epoch in no batch: n mod m when that is 1–3, else 0."""
        return int(self._group.attrs["partition"]["dropped_rows"])

    def _layers(self, layers: Sequence[str] | None) -> list[str]:
        names = self.layer_names
        if layers is None:
            return names
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise GramCacheUsageError(
                f"Gram cache {self.path} has no layer(s) {unknown}; its layers are {names}"
            )
        return list(layers)

    def _grams(self, name: str) -> zarr.Array:
        return self._group["grams"][name]

    @cached_property
    def _where(self) -> dict[int, tuple[str, int]]:
        return batch_locations(self.partition, self.batches.tolist())

    def batch_gram(self, layer: str, batch: int) -> np.ndarray:
        """(m_b, m_b) float64 Ũ Gram of global batch number ``batch`` of ``layer`` (float32
        storage widened exactly)."""
        where = self._where
        if int(batch) not in where:
            raise GramCacheUsageError(
                f"Gram cache {self.path} holds batches {batch_ranges_text(self.batches)}, not {batch}"
            )
        self._layers([layer])
        group, index = where[int(batch)]
        return np.asarray(self._group[group][layer][index], dtype=np.float64)

    def iter_batches(
        self, device: str | torch.device | None = None, layers: Sequence[str] | None = None
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(global batch number, Ũ Grams (L, m_b, m_b) float64)`` in global batch order.

        m_b is the batch's size: m, or r = n mod m for an epoch's short last batch. Grams stored
        in float32 are widened (exactly) to float64.

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
            raise GramCacheUsageError(
                f"{self.path} is a full-mode cache (one n×n Gram per layer, no batches); "
                "stream its tiles with read_tile(layer, row, col), or read_full_gram(cache, layer)"
            )
        import torch  # here, not at the top: the format constants must not import torch

        from ckapipe.analyze.loader import resolve_device

        names = self._layers(layers)
        target = resolve_device(device) if device is not None else torch.device("cpu")
        numbers = self.batches
        where = self._where
        arrays = {
            group: [self._group[group][name] for name in names]
            for group in {group for group, _ in where.values()}
        }

        def read(number: int) -> np.ndarray:
            group, index = where[number]
            m_b = arrays[group][0].shape[-1]
            grams = np.empty((len(names), m_b, m_b), dtype=np.float64)  # (L, m_b, m_b)
            for l, array in enumerate(arrays[group]):  # noqa: E741 - l indexes layers
                grams[l] = array[index]  # float32 storage: widened here, exactly
            return grams

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckapipe-grams") as pool:
            ahead: deque = deque()
            for number in numbers[:2]:
                ahead.append(pool.submit(read, int(number)))
            for index, number in enumerate(numbers):
                grams = ahead.popleft().result()
                if index + 2 < len(numbers):
                    ahead.append(pool.submit(read, int(numbers[index + 2])))
                yield int(number), torch.from_numpy(grams).to(target)

    def read_batches_into(
        self, numbers: Sequence[int], out: np.ndarray, layers: Sequence[str] | None = None
    ) -> None:
        """Fill ``out[g, l]`` with the Ũ Gram of batch ``numbers[g]`` of layer ``l``.

        ``out`` is float64 (G, L, m_b, m_b), all batches of one size, and may be a view into a
        larger buffer (e.g. the slice of one model in the stacked Grams of a study): the chunk
        files are read straight into it (float32 storage widened exactly), so a study needs no
        copy to stack its models.
        """
        names = self._layers(layers)
        where = self._where
        missing = [int(number) for number in numbers if int(number) not in where]
        if missing:
            raise GramCacheUsageError(
                f"Gram cache {self.path} holds batches {batch_ranges_text(self.batches)}, not "
                f"{missing}"
            )
        for l, name in enumerate(names):  # noqa: E741 - l indexes layers, as in out[g, l]
            for g, number in enumerate(numbers):
                group, index = where[int(number)]
                self._chunk_reader(group, name).read(index, out[g, l])

    @cached_property
    def _readers(self) -> dict[tuple[str, str], _ChunkReader]:
        return {}

    def _chunk_reader(self, group: str, layer: str) -> _ChunkReader:
        key = (group, layer)
        if key not in self._readers:
            self._readers[key] = _ChunkReader(self.path, group, layer, self._group)
        return self._readers[key]

    def _full_only(self, what: str) -> None:
        if self.mode != "full":
            raise GramCacheUsageError(
                f"{self.path} is a minibatch cache; {what} needs one built with --mode full"
            )

    @property
    def tile_grid(self) -> TileGrid:
        """The tile grid of the full-mode Grams (n, tile size)."""
        self._full_only("tile_grid")
        return TileGrid(self.n_samples, int(self._group.attrs["tile_size"]))

    @property
    def tile_rows(self) -> tuple[int, int]:
        """Tile rows [a, b) held: all of them, or a partial cache's share."""
        self._full_only("tile_rows")
        a, b = self._group.attrs["tile_rows"]
        return int(a), int(b)

    @property
    def is_partial(self) -> bool:
        """A full-mode cache holding only some tile rows (merge the parts before analysis)."""
        return self.mode == "full" and self.tile_rows != (0, self.tile_grid.count)

    def read_tile(self, layer: str, row: int, col: int) -> np.ndarray:
        """Tile (row, col) of the (n, n) linear Gram of ``layer`` as float64, unpadded.

        Shape (rows of tile row ``row``, columns of tile column ``col``); below the diagonal
        (row > col) it is the transpose of stored tile (col, row).
        """
        self._full_only("read_tile")
        grid = self.tile_grid
        upper = (row, col) if row <= col else (col, row)
        a, b = self.tile_rows
        if not a <= upper[0] < b:
            raise GramCacheUsageError(
                f"{self.path} is a partial cache of tile rows {a}:{b}, without tile {upper}; "
                "merge the parts first (`ckapipe merge-grams`)"
            )
        self._layers([layer])
        first = grid.first_tile_of_row(a)
        tile = np.asarray(self._grams(layer)[grid.number(*upper) - first], dtype=np.float64)
        r, c = grid.span(upper[0]), grid.span(upper[1])
        tile = tile[: r[1] - r[0], : c[1] - c[0]]
        return tile if row <= col else tile.T

    def stored_tiles(self, layer: str) -> zarr.Array:
        """The raw ``grams/<layer>`` tile array (P, T, T) of a full-mode cache, as stored."""
        self._full_only("stored_tiles")
        self._layers([layer])
        return self._grams(layer)

    def full_gram(self, layer: str) -> np.ndarray:
        """(n, n) float64 linear Gram of ``layer`` (full mode); see :func:`read_full_gram`."""
        return read_full_gram(self, layer)


def read_full_gram(
    cache: GramCache | str | os.PathLike[str], layer: str, *, max_bytes: int | None = None
) -> np.ndarray:
    """The whole (n, n) float64 linear Gram of the column-centered features of ``layer``,
    assembled from the tiles of a full-mode cache (float32 tiles are widened exactly).

    For measures that need the matrix in memory at moderate n. Refuses (with
    :class:`GramCacheUsageError`) a Gram over ``max_bytes`` (default 2 GiB, n ≈ 16 000): stream
    tiles with :meth:`GramCache.read_tile` instead.
    """
    opened = open_cache(cache)
    opened._full_only("read_full_gram")
    n = opened.n_samples
    limit = FULL_GRAM_MAX_BYTES if max_bytes is None else int(max_bytes)
    if 8 * n * n > limit:
        raise GramCacheUsageError(
            f"layer {layer!r} of {opened.path}: the full {n}x{n} float64 Gram takes "
            f"{8 * n * n / 2**30:.1f} GiB, over the {limit / 2**30:.1f} GiB read_full_gram "
            "allows; stream its tiles with GramCache.read_tile(layer, row, col), or pass a "
            "larger max_bytes if the memory is there"
        )
    grid = opened.tile_grid
    gram = np.empty((n, n), dtype=np.float64)
    for row, col in grid.pairs:
        (a, b), (c, d) = grid.span(row), grid.span(col)
        tile = opened.read_tile(layer, row, col)
        gram[a:b, c:d] = tile
        if row != col:
            gram[c:d, a:b] = tile.T
    return gram


class _ChunkReader:
    """Reads one chunk (one batch) of a per-batch Gram array into a given float64 buffer.

    The arrays a cache writes have one chunk per batch, stored as little-endian float32 or
    float64 bytes (``storage_dtype``) followed by their CRC-32C
    (:func:`ckapipe.formats.create_array`). Such a chunk is read with
    one ``read``, its checksum verified and its values copied to the destination: zarr's
    per-chunk machinery, and even opening each array with zarr, cost several times the I/O for
    the many small chunks of a study. The layout is taken from the array's ``zarr.json`` (the
    zarr v3 metadata); any other layout (compressed, other chunking), and a checksum mismatch,
    go through zarr, which reads them as the format says or raises.
    """

    def __init__(self, root: Path, group: str, layer: str, zarr_group: zarr.Group) -> None:
        self.group, self.layer, self.zarr_group = group, layer, zarr_group
        self.directory = root / group / layer / "c"
        try:
            metadata = json.loads((root / group / layer / "zarr.json").read_text())
        except (OSError, ValueError):
            metadata = {}
        self.stored = _plain_per_batch_dtype(metadata) if sys.byteorder == "little" else None

    @cached_property
    def array(self) -> zarr.Array:
        return self.zarr_group[self.group][self.layer]

    def read(self, index: int, dest: np.ndarray) -> None:
        if not (self.stored is not None and self._read_direct(index, dest, self.stored)):
            dest[...] = self.array[index]

    def _read_direct(self, index: int, dest: np.ndarray, stored: np.dtype) -> bool:
        """True when the chunk was read and its checksum matched."""
        import google_crc32c

        nbytes = dest.size * stored.itemsize
        try:
            fd = os.open(self.directory / str(index) / "0" / "0", os.O_RDONLY)
        except FileNotFoundError:
            return False  # zarr decides (GramCache.open refuses caches with absent chunks)
        try:
            # one read into a fresh bytes object, then one copy: measured twice as fast here
            # as reading into the destination (readv/readinto) on this kind of VM
            raw = os.read(fd, nbytes + 5)
        finally:
            os.close(fd)
        if len(raw) != nbytes + 4:
            return False
        data = np.frombuffer(raw, dtype=np.uint8, count=nbytes)
        if google_crc32c.value(data) != int.from_bytes(raw[nbytes:], "little"):
            return False
        dest[...] = data.view(stored).reshape(dest.shape)  # float32: widened exactly
        return True


def _plain_per_batch_dtype(metadata: dict[str, Any]) -> np.dtype | None:
    """The dtype (float32 or float64) when zarr v3 array metadata describes uncompressed
    little-endian chunks of one batch each (shape (B, m, m), chunks (1, m, m)), checksummed with
    CRC-32C, at keys ``c/<batch>/0/0``: the layout :class:`_ChunkReader` reads without zarr;
    else None."""
    shape = metadata.get("shape") or []
    grid = metadata.get("chunk_grid") or {}
    keys = metadata.get("chunk_key_encoding") or {}
    codecs = metadata.get("codecs") or []
    plain = (
        metadata.get("zarr_format") == 3
        and metadata.get("data_type") in STORAGE_DTYPES
        and len(shape) == 3
        and grid.get("name") == "regular"
        and (grid.get("configuration") or {}).get("chunk_shape") == [1, *shape[1:]]
        and keys.get("name") == "default"
        and (keys.get("configuration") or {}).get("separator") == "/"
        and [codec.get("name") for codec in codecs] == ["bytes", "crc32c"]
        and (codecs[0].get("configuration") or {}).get("endian") == "little"
        and not metadata.get("storage_transformers")
    )
    return np.dtype(metadata["data_type"]) if plain else None


def open_cache(cache: GramCache | str | os.PathLike[str]) -> GramCache:
    return cache if isinstance(cache, GramCache) else GramCache.open(cache)


def check_compatible(
    caches: Sequence[GramCache | str | os.PathLike[str]], *, warn: bool = True
) -> None:
    """Raise :class:`IncompatibleGramCachesError` naming the first mismatch between caches.

    Caches are compatible (comparable model against model) when their stores hold the same
    samples in the same rows (equal sample ids and, where both stores record one, equal input
    fingerprints), and they share mode, kernel, threshold, partition and batches. When a store
    has no input fingerprint the data cannot be checked: an :class:`UnverifiedDatasetWarning`
    says so (``warn=False``: the caller warns in its own words).
    """
    opened = [open_cache(cache) for cache in caches]
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
        mismatch = dataset_mismatch(a, b, str(first.path), str(other.path))
        if mismatch:
            raise IncompatibleGramCachesError(mismatch)
        unverified = dataset_unverified(a, b, str(first.path), str(other.path))
        if unverified and warn:
            warnings.warn(unverified, UnverifiedDatasetWarning, stacklevel=2)
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
        if first.mode == "full":
            for cache in (first, other):
                if cache.is_partial:
                    a, b = cache.tile_rows
                    raise IncompatibleGramCachesError(
                        f"{cache.path} is a partial full-mode cache (tile rows {a}:{b} of "
                        f"{cache.tile_grid.count}); merge all tile jobs first (`ckapipe "
                        "merge-grams`)"
                    )
            for what, x, y in (
                ("tile_size", first.attrs.get("tile_size"), other.attrs.get("tile_size")),
                ("tile_rows", first.tile_rows, other.tile_rows),
            ):
                if x != y:
                    raise IncompatibleGramCachesError(
                        f"{first.path} and {other.path} differ in {what} ({x!r} vs {y!r}); "
                        "build every full-mode cache of a study with the same --tile-size, and "
                        "merge partial caches first (`ckapipe merge-grams`)"
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
                f"{first.path} holds batches {batch_ranges_text(first.batches)} but {other.path} holds "
                f"{batch_ranges_text(other.batches)}; merge partial caches first (`ckapipe merge-grams`)"
            )


def batch_ranges_text(numbers: np.ndarray) -> str:
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


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Refuse an existing --out unless ``overwrite``, and never replace anything but a Gram cache.

    Checked before any work (and again under the writer lock by ``staged_directory``).
    """
    if not out.exists():
        return
    if not overwrite:
        raise GramCacheUsageError(
            f"{out} already exists; pass --overwrite (overwrite=True) to replace it, or choose "
            "another --out"
        )
    if out.is_dir() and not any(out.iterdir()):
        return
    try:
        found = zarr.open_group(str(out), mode="r").attrs.get("format")
    except Exception:  # noqa: BLE001 - anything unreadable is not a Gram cache we may delete
        found = None
    if found != FORMAT_NAME:
        raise GramCacheUsageError(
            f"{out} exists and is not a Gram cache (format {found!r}); --overwrite only replaces "
            "a Gram cache. Choose another --out"
        )


@contextmanager
def staged_cache(out: Path, overwrite: bool) -> Iterator[zarr.Group]:
    """A new cache group built in a staging folder; renamed to ``out`` only once complete."""
    refuse_existing(out, overwrite)
    with staged_directory(
        out,
        overwrite=overwrite,
        what="Gram cache",
        remedy="pass --overwrite (overwrite=True) to replace it, or choose another --out",
    ) as staging:
        yield zarr.open_group(str(staging), mode="w", zarr_format=3)


class BatchArrays:
    """The per-batch Gram arrays of a minibatch cache: ``grams/<layer>`` (full batches, (B, m,
    m)) and ``grams_last/<layer>`` (short last batches, (B', r, r)), one chunk per batch, in
    dtype ``storage`` (``"float32"`` or ``"float64"``, the cache's ``storage_dtype``)."""

    def __init__(
        self,
        group: zarr.Group,
        layers: Sequence[str],
        partition: dict,
        batches: list[int],
        *,
        storage: str,
    ):
        if storage not in STORAGE_DTYPES:
            raise GramCacheUsageError(f"storage must be one of {STORAGE_DTYPES}, got {storage!r}")
        self.layers = list(layers)
        self.storage = np.dtype(storage)
        self.where = batch_locations(partition, batches)
        sizes = {"grams": partition["batch_size"], "grams_last": partition["last_batch_size"]}
        counts = {"grams": 0, "grams_last": 0}
        for where, _ in self.where.values():
            counts[where] += 1
        index = create_array(
            group,
            "batch_index",
            shape=(len(batches),),
            chunks=(max(1, len(batches)),),
            dtype="int64",
            dimension_names=("batch",),
        )
        index[...] = np.asarray(batches, dtype=np.int64)
        self.arrays: dict[str, dict[str, zarr.Array]] = {}
        for where, count in counts.items():
            if not count:
                continue
            sub = group.require_group(where)
            size = sizes[where]
            self.arrays[where] = {
                name: create_array(
                    sub,
                    name,
                    shape=(count, size, size),
                    chunks=(1, size, size),
                    dtype=storage,
                    dimension_names=("batch", "sample_i", "sample_j"),
                )
                for name in layers
            }

    def write(self, layer: str, batch: int, gram: np.ndarray) -> None:
        """Store a finished float64 Ũ Gram: the one rounding (to nearest) of float32 storage.

        Raises :class:`GramCacheDataError` when an entry is beyond float32's range (it would be
        stored as ±inf and give NaN CKA).
        """
        where, index = self.where[int(batch)]
        gram = np.asarray(gram)
        with np.errstate(over="ignore"):  # an overflow is refused just below, by name
            stored = gram.astype(self.storage, copy=False)
        if stored is not gram and not np.isfinite(stored).all() and np.isfinite(gram).all():
            raise GramCacheDataError(
                f"layer {layer!r}, batch {batch}: a U-centered Gram entry ({np.abs(gram).max():.3g}"
                f" at most) is beyond float32's range ({np.finfo(np.float32).max:.3g}); build the "
                "cache with --storage float64 (storage='float64'), or rescale the activations"
            )
        self.arrays[where][layer][index] = stored
