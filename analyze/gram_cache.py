"""Gram caches: each activation store reduced once to the Gram matrices every comparison needs.

A Gram cache is a zarr v3 group (format ``ckapipe.gram-cache``, version 2) built on
:mod:`ckapipe.formats`: it is written in a staging folder under a writer lock and renamed into
place when complete (a second writer is refused at once; a killed build leaves nothing at --out,
or the previous cache intact), every array carries a CRC-32C checksum on every chunk and every
chunk is written, and :meth:`GramCache.open` refuses an old format, an incomplete cache and a
deleted chunk. Two modes:

``minibatch``
    Per layer, the U-centered Gram Ũ(K_b) (Székely & Rizzo 2014) of every minibatch b, float64,
    what :func:`ckapipe.analyze.estimators.centered_batch_gram` returns for the batch's rows.
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
    Per layer, the exact n×n linear Gram of the column-centered features (float64, O(n²)
    memory), accumulated from full-height column slabs in one read pass. With ``kernel="rbf"``
    the linear Gram is stored too (the RBF Gram is a function of it).

How a batch's Gram is formed: :func:`~ckapipe.analyze.estimators.add_shifted_products` sums
X'X'ᵀ over column tiles of the store's chunk grid, X' the tile shifted by the batch's first row,
so no batch ever needs its full width in memory; :func:`~ckapipe.analyze.estimators.
centered_batch_gram` then applies the kernel (RBF: the batch's own median bandwidth) and
U-centers. Full mode centers every column over all n rows in float64 before its products.

Reading: epoch 0 reads row windows of whole batches, about one row chunk high, tile by tile
along the column chunks (host memory independent of n). Epochs ≥ 1 read full-height column
slabs of each layer once per epoch and gather each batch's rows on the device; their Gram
accumulators hold about n/m × m × m float64 per layer, so their memory grows with n.

Identity. The cache records its store's identity, including the dataset spec and the store's
input fingerprint (a hash of every input tensor fed to the model). Caches are compared only when
their sample ids and, where both stores have one, their input fingerprints agree: equal sample
ids only mean the same dataset size, seed and order, not the same data.

Partial caches: ``rows=(start, stop)`` (multiples of m, or stop = n) keeps only the batches whose
positions lie inside those rows in every epoch, so disjoint row ranges (e.g. a SLURM array) hold
disjoint batches; :func:`merge_gram_caches` joins them into a cache equal, array for array and
bit for bit, to one full pass.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import Tensor

from ckapipe.analyze.estimators import (
    add_centered_products,
    add_shifted_products,
    centered_batch_gram,
)
from ckapipe.analyze.loader import (
    BlockRequest,
    column_ranges,
    iter_blocks,
    resolve_device,
    slab_width,
)
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
    now,
    sibling_lock_path,
    staged_directory,
    versions,
    write_attrs,
)
from ckapipe.store import ActivationStore, IncompleteStoreError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GramCache",
    "GramCacheError",
    "IncompatibleGramCachesError",
    "IncompleteGramCacheError",
    "RemainderDroppedWarning",
    "UnverifiedDatasetWarning",
    "batch_rows",
    "build_gram_cache",
    "check_compatible",
    "dataset_mismatch",
    "dataset_unverified",
    "epoch_seeds",
    "make_partition",
    "merge_gram_caches",
]

FORMAT_NAME = "ckapipe.gram-cache"
FORMAT_VERSION = 2
MODES = ("minibatch", "full")
KERNELS = ("linear", "rbf")
PRECISIONS = ("float64", "float32")
PARTITION_SCHEME = "contiguous-epoch0-then-permuted/v2"
MIN_BATCH = 4  # HSIC₁ divides by m(m−3)
RBF_RULE = (
    "per batch: sigma^2 = threshold^2 * median of the batch's m x m squared distances "
    "(diagonal included, numpy median), K = exp(-d^2 / (2 sigma^2)), then U-centered"
)
REBUILD = "rebuild it from its activation store with `ckapipe gram STORE --out GRAMS`"
# Full mode: a float64 copy of at most this many bytes of a slab exists at once.


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
    import hashlib

    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def make_partition(
    n_samples: int, batch_size: int | None, epochs: int, seed: int, mode: str = "minibatch"
) -> dict[str, Any]:
    """The partition record of a cache; equal partitions ⇔ equal ``sha256``.

    Minibatch: each epoch has ``batches_per_epoch`` batches, all of ``batch_size`` rows except
    the last, which holds the ``last_batch_size`` = n mod m remaining rows when there are at
    least 4 of them; a remainder of 1–3 rows is dropped (``dropped_rows``) in every epoch.
    """
    n = int(n_samples)
    if mode == "full":
        record: dict[str, Any] = {
            "scheme": "full",
            "n_samples": n,
            "batch_size": None,
            "epochs": 1,
            "epoch_seeds": [None],
            "batches_per_epoch": 0,
            "last_batch_size": None,
            "n_batches_total": 0,
            "samples_used": n,
            "dropped_rows": 0,
        }
    else:
        assert batch_size is not None
        m = int(batch_size)
        whole, remainder = divmod(n, m)
        short = remainder >= MIN_BATCH
        per_epoch = whole + int(short)
        dropped = 0 if short else remainder
        record = {
            "scheme": PARTITION_SCHEME,
            "n_samples": n,
            "batch_size": m,
            "epochs": int(epochs),
            "epoch_seeds": epoch_seeds(seed, n, m, epochs),
            "batches_per_epoch": per_epoch,
            "last_batch_size": remainder if short else m,
            "n_batches_total": int(per_epoch * epochs),
            "samples_used": n - dropped,
            "dropped_rows": dropped,
        }
    record["sha256"] = _digest(record)
    return record


def epoch_order(partition: dict[str, Any], epoch: int) -> np.ndarray:
    """(n,) int64 store rows in epoch ``epoch``'s order; batch k is a slice of it (batch_span)."""
    n = partition["n_samples"]
    if epoch == 0:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng(partition["epoch_seeds"][epoch]).permutation(n).astype(np.int64)


def batch_span(partition: dict[str, Any], k: int) -> tuple[int, int]:
    """Positions ``[start, stop)`` of batch k of an epoch in that epoch's order."""
    start = int(k) * partition["batch_size"]
    return start, min(start + partition["batch_size"], partition["samples_used"])


def batch_rows(partition: dict[str, Any], batch: int) -> np.ndarray:
    """Store rows of global batch number ``batch`` (epoch e, batch k ↦ e·batches_per_epoch + k)."""
    epoch, k = divmod(int(batch), partition["batches_per_epoch"])
    start, stop = batch_span(partition, k)
    return epoch_order(partition, epoch)[start:stop]


def _is_short(partition: dict[str, Any], batch: int) -> bool:
    """Whether global batch ``batch`` is an epoch's short last batch (fewer than m rows)."""
    per_epoch = partition["batches_per_epoch"]
    return (
        partition["last_batch_size"] != partition["batch_size"]
        and int(batch) % per_epoch == per_epoch - 1
    )


def _locations(partition: dict[str, Any], batches: Sequence[int]) -> dict[int, tuple[str, int]]:
    """Global batch number -> (array group, index in it): full batches in ``grams``, short last
    batches in ``grams_last``, each in global batch order."""
    where: dict[int, tuple[str, int]] = {}
    counts = {"grams": 0, "grams_last": 0}
    for number in batches:
        group = "grams_last" if _is_short(partition, number) else "grams"
        where[int(number)] = (group, counts[group])
        counts[group] += 1
    return where


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
    if not missing or _identity_key(a) == _identity_key(b):
        return None
    return (
        f"{' and '.join(missing)}: no input fingerprint in the store (e.g. imported from HDF5), "
        f"so it cannot be checked that {label_a} and {label_b} saw the same data "
        f"({describe_dataset(a)} vs {describe_dataset(b)}); only their sample ids agree. Make "
        "sure both were extracted from the same dataset and preprocessing, or re-extract with "
        "`ckapipe extract` to record a fingerprint"
    )


def _identity_key(identity: dict[str, Any]) -> dict[str, Any]:
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
        return _locations(self.partition, self.batches.tolist())

    def batch_gram(self, layer: str, batch: int) -> np.ndarray:
        """(m_b, m_b) float64 Ũ Gram of global batch number ``batch`` of ``layer``."""
        where = self._where
        if int(batch) not in where:
            raise GramCacheUsageError(
                f"Gram cache {self.path} holds batches {_ranges(self.batches)}, not {batch}"
            )
        self._layers([layer])
        group, index = where[int(batch)]
        return np.asarray(self._group[group][layer][index])

    def iter_batches(
        self, device: str | torch.device | None = None, layers: Sequence[str] | None = None
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(global batch number, Ũ Grams (L, m_b, m_b) float64)`` in global batch order.

        m_b is the batch's size: m, or r = n mod m for an epoch's short last batch.

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
                "use full_gram(layer)"
            )
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
            return np.stack([array[index] for array in arrays[group]])  # (L, m_b, m_b)

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ckapipe-grams") as pool:
            ahead: deque = deque()
            for number in numbers[:2]:
                ahead.append(pool.submit(read, int(number)))
            for index, number in enumerate(numbers):
                grams = ahead.popleft().result()
                if index + 2 < len(numbers):
                    ahead.append(pool.submit(read, int(numbers[index + 2])))
                yield int(number), torch.from_numpy(grams).to(target)

    def full_gram(self, layer: str) -> np.ndarray:
        """(n, n) float64 linear Gram of the column-centered features of ``layer`` (full mode)."""
        if self.mode != "full":
            raise GramCacheUsageError(
                f"{self.path} is a minibatch cache; full_gram needs one built with --mode full"
            )
        self._layers([layer])
        return np.asarray(self._grams(layer)[...])


def _open_cache(cache: GramCache | str | os.PathLike[str]) -> GramCache:
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


def _refuse_existing(out: Path, overwrite: bool) -> None:
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
def _staged_cache(out: Path, overwrite: bool) -> Iterator[zarr.Group]:
    """A new cache group built in a staging folder; renamed to ``out`` only once complete."""
    _refuse_existing(out, overwrite)
    with staged_directory(
        out,
        overwrite=overwrite,
        what="Gram cache",
        remedy="pass --overwrite (overwrite=True) to replace it, or choose another --out",
    ) as staging:
        yield zarr.open_group(str(staging), mode="w", zarr_format=3)


class _BatchArrays:
    """The per-batch Gram arrays of a minibatch cache: ``grams/<layer>`` (full batches, (B, m,
    m)) and ``grams_last/<layer>`` (short last batches, (B', r, r)), one chunk per batch."""

    def __init__(
        self, group: zarr.Group, layers: Sequence[str], partition: dict, batches: list[int]
    ):
        self.layers = list(layers)
        self.where = _locations(partition, batches)
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
                    dtype="float64",
                    dimension_names=("batch", "sample_i", "sample_j"),
                )
                for name in layers
            }

    def write(self, layer: str, batch: int, gram: np.ndarray) -> None:
        where, index = self.where[int(batch)]
        self.arrays[where][layer][index] = gram


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
                "rows=(start, stop) builds partial minibatch caches; full mode computes the "
                "exact n×n Gram in one pass over all rows"
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
    if _batch_range(make_partition(n, batch_size, 1, 0), start, stop)[1] <= start // batch_size:
        raise bad(
            f"rows {start}:{stop} hold no batch: the last {n % batch_size} rows of each epoch "
            "are too few for a batch (HSIC₁ needs 4) and are dropped"
        )
    return names, (start, stop)


def _batch_range(partition: dict[str, Any], start: int, stop: int) -> tuple[int, int]:
    """Batches [first, last) of an epoch whose positions lie inside rows ``start:stop``."""
    m = partition["batch_size"]
    last = partition["batches_per_epoch"] if stop == partition["n_samples"] else stop // m
    return start // m, last


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
    precision: str = "float64",
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
    if precision not in PRECISIONS:
        raise GramCacheUsageError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "float64" and mode == "full":
        raise GramCacheUsageError(
            "full mode is the exact estimator and computes in float64; drop precision="
            f"{precision!r} or use minibatch mode"
        )
    names = [name for name in source.layer_names if name in names]  # store order
    out = Path(out)
    n = source.n_samples
    partition = make_partition(n, batch_size, epochs, seed, mode=mode)
    batches: list[int] = []
    if mode == "minibatch":
        first, last = _batch_range(partition, start, stop)
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
        seed=seed,
    )
    settings = {
        "device": resolve_device(device),
        "prefetch": prefetch,
        "threads": threads,
        "product_dtype": torch.float64 if precision == "float64" else torch.float32,
        "max_slab_bytes": max_slab_bytes,
    }
    with _staged_cache(out, overwrite) as group:
        write_attrs(group, attrs)
        if mode == "full":
            _write_full(group, source, names, settings)
        else:
            arrays = _BatchArrays(group, names, partition, batches)
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


def _write_full(
    group: zarr.Group, source: ActivationStore, names: Sequence[str], settings: dict[str, Any]
) -> None:
    n = source.n_samples
    grams = group.require_group("grams")
    for name in names:
        gram = _full_gram(
            source, name, max_slab_bytes=settings["max_slab_bytes"], **_loader(settings)
        )
        chunk_rows = max(1, min(n, (16 * 2**20) // (8 * n)))
        array = create_array(
            grams,
            name,
            shape=(n, n),
            chunks=(chunk_rows, n),
            dtype="float64",
            dimension_names=("sample_i", "sample_j"),
        )
        array[...] = gram.cpu().numpy()


def _epoch0_grams(
    store: ActivationStore,
    arrays: _BatchArrays,
    partition: dict[str, Any],
    first_batch: int,
    last_batch: int,
    finish: Callable[[Tensor, str, int], np.ndarray],
    settings: dict[str, Any],
) -> None:
    """Contiguous batches: row windows of whole batches ≈ one row chunk, tiled along columns."""
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
    grams: dict[int, Tensor] | None = None
    for block in iter_blocks(store, requests, **_loader(settings)):
        name, k, k_end, last_tile = block.request.tag
        tile = block.tensors[0]
        spans = {j: batch_span(partition, j) for j in range(k, k_end)}
        if grams is None:
            grams = {
                j: torch.zeros(b - a, b - a, dtype=torch.float64, device=tile.device)
                for j, (a, b) in spans.items()
            }
        for j, (a, b) in spans.items():
            add_shifted_products(grams[j], tile[a - k * m : b - k * m], settings["product_dtype"])
        if last_tile:
            for j in range(k, k_end):
                arrays.write(name, j, finish(grams[j], name, j))
            grams = None


def _permuted_epoch_grams(
    store: ActivationStore,
    arrays: _BatchArrays,
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
        for block in iter_blocks(store, requests, **_loader(settings)):
            slab = block.tensors[0]  # (n, w)
            for k, rows in members.items():
                add_shifted_products(
                    grams[k], slab.index_select(0, rows), settings["product_dtype"]
                )
        for k in numbers:
            number = epoch * per_epoch + k
            arrays.write(name, number, finish(grams[k], name, number))


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
    for block in iter_blocks(store, requests, **loader):
        add_centered_products(gram, block.tensors[0])
    return gram


# --------------------------------------------------------------------------- merging


def merge_gram_caches(
    parts: Sequence[GramCache | str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> GramCache:
    """Join partial minibatch caches of one store into one cache.

    Parameters
    ----------
    parts:
        Complete partial caches built from the same store with the same settings (``rows=``
        ranges that do not overlap).
    out:
        Directory of the merged cache (built in a staging folder under a writer lock, like
        :func:`build_gram_cache`).
    overwrite:
        Replace an existing Gram cache at ``out``.

    Returns
    -------
    GramCache
        Holding the union of the parts' batches, in global batch order, bit for bit.

    Raises
    ------
    IncompatibleGramCachesError
        Different stores or inputs, settings or partitions, or a batch held by two parts.
    """
    opened = [_open_cache(part) for part in parts]
    if not opened:
        raise GramCacheUsageError("merge needs at least one partial Gram cache")
    first = opened[0]
    if first.mode != "minibatch":
        raise GramCacheUsageError(
            f"{first.path} is a full-mode cache; full mode is built in one pass, nothing to merge"
        )
    owner = _check_mergeable(opened)
    batches = sorted(owner)
    attrs = first.attrs
    attrs.update(
        {
            "rows": None,
            "batches": batches,
            "merged_from": [
                {"path": str(part.path), "rows": part.attrs.get("rows")} for part in opened
            ],
            "versions": versions(),
            "created": now(),
            "complete": False,
        }
    )
    with _staged_cache(Path(out), overwrite) as group:
        write_attrs(group, attrs)
        arrays = _BatchArrays(group, first.layer_names, first.partition, batches)
        for name in first.layer_names:
            for part in opened:
                for number in part.batches:
                    arrays.write(name, int(number), part.batch_gram(name, int(number)))
        write_attrs(group, {"complete": True})  # last
    return GramCache.open(out)


def _check_mergeable(opened: Sequence[GramCache]) -> dict[int, Path]:
    """Refuse parts of different stores, inputs or settings; map each batch to its part."""
    first = opened[0]
    owner: dict[int, Path] = {}
    for part in opened:
        mismatch = dataset_mismatch(first.identity, part.identity, str(first.path), str(part.path))
        if mismatch:
            raise IncompatibleGramCachesError(f"cannot merge: {mismatch}")
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
    return owner
