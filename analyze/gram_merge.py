"""Merging partial Gram caches into one cache, bit for bit: minibatch caches of disjoint
``rows=`` ranges, or full-mode caches of disjoint tile rows (``tile_job=``) that together cover
every tile row."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ckapipe.analyze.gram_format import (
    BatchArrays,
    GramCache,
    GramCacheUsageError,
    IncompatibleGramCachesError,
    IncompleteGramCacheError,
    dataset_mismatch,
    identity_key,
    open_cache,
    staged_cache,
)
from ckapipe.formats import create_array, now, versions, write_attrs

__all__ = ["merge_gram_caches"]


def merge_gram_caches(
    parts: Sequence[GramCache | str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> GramCache:
    """Join partial caches of one store into one cache.

    Minibatch caches of disjoint ``rows=`` ranges, or full-mode caches of tile jobs
    (``tile_job=``) that together hold every tile row exactly once (a missing tile row raises
    :class:`IncompleteGramCacheError` naming it).

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
    if first.mode == "full":
        return _merge_full(opened, Path(out), overwrite)
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
        arrays = BatchArrays(
            group, first.layer_names, first.partition, batches, storage=first.storage_dtype
        )
        for name in first.layer_names:
            for part in opened:
                for number in part.batches:
                    # widened to float64 and rounded back: float32 -> float64 -> float32 is exact
                    arrays.write(name, int(number), part.batch_gram(name, int(number)))
        write_attrs(group, {"complete": True})  # last
    return GramCache.open(out)


def _merge_full(opened: Sequence[GramCache], out: Path, overwrite: bool) -> GramCache:
    """Concatenate the tiles of full-mode partial caches (copied chunk by chunk, unchanged)."""
    _check_settings(opened, extra=(("tile_size", lambda c: c.attrs["tile_size"]),))
    first = opened[0]
    grid = first.tile_grid
    ordered = sorted(opened, key=lambda part: part.tile_rows)
    covered = 0
    for part in ordered:
        a, b = part.tile_rows
        if a < covered:
            raise IncompatibleGramCachesError(
                f"{part.path} holds tile rows {a}:{b}, overlapping another part (rows up to "
                f"{covered} are covered already); merge parts of disjoint tile jobs"
            )
        if a > covered:
            raise IncompleteGramCacheError(
                f"tile rows {covered}:{a} of {grid.count} (tiles of samples "
                f"{grid.span(covered)[0]}:{grid.span(a - 1)[1]}) are in none of the parts; "
                "build the missing tile job(s) (`ckapipe gram --mode full --tiles K/J`) and "
                "merge all parts"
            )
        covered = b
    if covered < grid.count:
        raise IncompleteGramCacheError(
            f"tile rows {covered}:{grid.count} of {grid.count} (samples "
            f"{grid.span(covered)[0]}:{grid.n}) are in none of the parts; build the missing "
            "tile job(s) (`ckapipe gram --mode full --tiles K/J`) and merge all parts"
        )
    attrs = first.attrs
    attrs.update(
        {
            "tile_rows": [0, grid.count],
            "tile_job": None,
            "merged_from": [
                {"path": str(part.path), "tile_rows": list(part.tile_rows)} for part in ordered
            ],
            "versions": versions(),
            "created": now(),
            "complete": False,
        }
    )
    with staged_cache(out, overwrite) as group:
        write_attrs(group, attrs)
        grams = group.require_group("grams")
        for name in first.layer_names:
            array = create_array(
                grams,
                name,
                shape=(grid.n_tiles, grid.tile, grid.tile),
                chunks=(1, grid.tile, grid.tile),
                dtype=first.attrs["storage_dtype"],
                dimension_names=("tile", "sample_i", "sample_j"),
            )
            for part in ordered:
                source = part.stored_tiles(name)
                offset = grid.first_tile_of_row(part.tile_rows[0])
                for index in range(source.shape[0]):
                    array[offset + index] = source[index]
        write_attrs(group, {"complete": True})  # last
    return GramCache.open(out)


def _check_settings(opened: Sequence[GramCache], extra: tuple = ()) -> None:
    first = opened[0]
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
            ("storage dtype (--storage)", first.storage_dtype, part.storage_dtype),
            *((label, get(first), get(part)) for label, get in extra),
        ):
            if x != y:
                raise IncompatibleGramCachesError(
                    f"cannot merge {part.path} with {first.path}: they differ in {what} "
                    f"({y!r} vs {x!r}); partial caches must come from one store and one "
                    "`ckapipe gram` setting, differing only in --rows or --tiles"
                )


def _check_mergeable(opened: Sequence[GramCache]) -> dict[int, Path]:
    """Refuse parts of different stores, inputs or settings; map each batch to its part."""
    _check_settings(opened, extra=(("partition", lambda c: c.partition["sha256"]),))
    owner: dict[int, Path] = {}
    for part in opened:
        for number in part.batches:
            if int(number) in owner:
                raise IncompatibleGramCachesError(
                    f"batch {int(number)} is in both {owner[int(number)]} and {part.path}: "
                    "their --rows ranges overlap; merge partial caches of disjoint ranges"
                )
            owner[int(number)] = part.path
    return owner
