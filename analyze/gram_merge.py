"""Merging partial Gram caches (``rows=`` ranges of one store) into one cache, bit for bit."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ckapipe.analyze.gram_format import (
    BatchArrays,
    GramCache,
    GramCacheUsageError,
    IncompatibleGramCachesError,
    dataset_mismatch,
    identity_key,
    open_cache,
    staged_cache,
)
from ckapipe.formats import now, versions, write_attrs

__all__ = ["merge_gram_caches"]


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
    opened = [open_cache(part) for part in parts]
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
    with staged_cache(Path(out), overwrite) as group:
        write_attrs(group, attrs)
        arrays = BatchArrays(group, first.layer_names, first.partition, batches)
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
            ("store", identity_key(first.identity), identity_key(part.identity)),
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
