"""Gram caches: each activation store reduced once to the Gram matrices every comparison needs.

The public names of the Gram cache, gathered from the modules that do the work:

- :mod:`ckapipe.analyze.gram_format`: the format (name, version, layout, errors) and the reader
  :class:`GramCache`, with :func:`check_compatible` (no torch import);
- :mod:`ckapipe.analyze.partition`: which store rows form which minibatch (numpy only);
- :mod:`ckapipe.analyze.gram_build`: :func:`build_gram_cache`, one read pass over a store;
- :mod:`ckapipe.analyze.gram_merge`: :func:`merge_gram_caches` of partial caches.
"""

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
