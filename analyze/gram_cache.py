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

# A facade: the format and reader live in gram_format, the partition in partition, the builder
# in gram_build and the merge in gram_merge; every public name stays importable from here.
from __future__ import annotations

from ckapipe.analyze.gram_build import build_gram_cache
from ckapipe.analyze.gram_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    KERNELS,
    MODES,
    PRECISIONS,
    RBF_RULE,
    GramCache,
    GramCacheDataError,
    GramCacheError,
    GramCacheIntegrityError,
    GramCacheUsageError,
    IncompatibleGramCachesError,
    IncompleteGramCacheError,
    RemainderDroppedWarning,
    UnverifiedDatasetWarning,
    check_compatible,
    dataset_mismatch,
    dataset_unverified,
    describe_dataset,
    store_identity,
)
from ckapipe.analyze.gram_merge import merge_gram_caches
from ckapipe.analyze.partition import (
    MIN_BATCH,
    PARTITION_SCHEME,
    batch_rows,
    batch_span,
    epoch_order,
    epoch_seeds,
    make_partition,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KERNELS",
    "MIN_BATCH",
    "MODES",
    "PARTITION_SCHEME",
    "PRECISIONS",
    "RBF_RULE",
    "GramCache",
    "GramCacheDataError",
    "GramCacheError",
    "GramCacheIntegrityError",
    "GramCacheUsageError",
    "IncompatibleGramCachesError",
    "IncompleteGramCacheError",
    "RemainderDroppedWarning",
    "UnverifiedDatasetWarning",
    "batch_rows",
    "batch_span",
    "build_gram_cache",
    "check_compatible",
    "dataset_mismatch",
    "dataset_unverified",
    "describe_dataset",
    "epoch_order",
    "epoch_seeds",
    "make_partition",
    "merge_gram_caches",
    "store_identity",
]
