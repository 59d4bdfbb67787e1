"""Checks of a study's inputs: the Gram caches fit together, names, pairs, options, output.

Every refusal is a :class:`StudyError` (a usage error) whose message says what to change;
caches that do not describe the same samples, batched the same way, raise
:class:`IncompatibleStudyInputsError` naming the first mismatch and the two models.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ckapipe.analyze.result import csv_path_for, is_result
from ckapipe.errors import IncompatibleInputsError, UsageError

if TYPE_CHECKING:
    from ckapipe.analyze.gram_format import GramCache

__all__ = [
    "IncompatibleStudyInputsError",
    "StudyError",
    "cache_path",
    "cache_settings",
    "check_compatible",
    "check_estimator",
    "check_out",
    "full_kernel",
    "minibatch_kernel",
    "choice",
    "model_names",
    "open_cache",
    "resolve_pairs",
]


class StudyError(UsageError):
    """The caches or options of a study do not fit together; the message says what to change."""


class IncompatibleStudyInputsError(StudyError, IncompatibleInputsError):
    """The Gram caches of a study do not describe the same samples, batched the same way."""


def open_cache(cache: str | os.PathLike[str] | GramCache) -> GramCache:
    if isinstance(cache, str | os.PathLike):
        from ckapipe.analyze.gram_format import GramCache

        return GramCache.open(cache)
    return cache


def cache_path(cache: GramCache) -> Path:
    path = getattr(cache, "path", None)
    if path is None:
        raise StudyError(f"cannot tell where Gram cache {cache!r} lives (no .path)")
    return Path(path)


def cache_settings(cache: GramCache) -> dict[str, Any]:
    keep = ("mode", "kernel", "threshold", "batch_size", "epochs", "seed", "epoch_seeds", "created")
    settings = {key: cache.attrs.get(key) for key in keep}
    # samples used / n: every sample, unless a 1-3 row remainder had to be left out
    settings["n_samples"] = cache.n_samples
    settings["samples_used"] = cache.samples_used
    settings["dropped_rows"] = cache.dropped_rows
    # how the Grams were computed and kept (a cache from before storage_dtype: float64)
    settings["precision"] = cache.attrs.get("precision")
    settings["storage_dtype"] = cache.storage_dtype
    return settings


def model_names(caches: Sequence[GramCache], names: Sequence[str] | None) -> list[str]:
    if names is None:
        result = [_default_name(cache_path(c)) for c in caches]
        origin = "the Gram cache file names"
    else:
        if isinstance(names, str):
            names = names.split(",")
        result = [str(n) for n in names]
        origin = "names"
        if len(result) != len(caches):
            raise StudyError(
                f"got {len(result)} model names {result} for {len(caches)} Gram caches; give one "
                "name per cache, in the same order"
            )
    for name in result:
        if not name or "/" in name or "--" in name or name.startswith("__"):
            raise StudyError(
                f"model name {name!r} (from {origin}) cannot name a result group: it must be "
                "non-empty, contain no '/' or '--' and not start with '__'; pass --names"
            )
    duplicates = sorted({n for n in result if result.count(n) > 1})
    if duplicates:
        raise StudyError(
            f"model names must be unique, but {duplicates} occur more than once (from {origin}); "
            "pass distinct --names a,b,…"
        )
    return result


def _default_name(path: Path) -> str:
    """``grams/resnet18.grams.zarr`` → ``resnet18``: the file name without cache suffixes."""
    name = path.name
    while Path(name).suffix in (".zarr", ".grams", ".gram") and Path(name).stem:
        name = Path(name).stem
    return name


def check_compatible(caches: Sequence[GramCache], names: Sequence[str]) -> None:
    """Refuse caches that do not hold the same samples, in the same order, batched the same way.

    The first cache is the reference; the message names the first cache that differs from it
    by model name. The Gram cache module's own check runs last, for anything not covered here.
    Raises :class:`IncompatibleStudyInputsError`.
    """
    _check_models_compatible(caches, names)
    from ckapipe.analyze.gram_format import IncompatibleGramCachesError, check_compatible

    try:
        check_compatible(list(caches), warn=False)  # dataset warnings were given by model name
    except IncompatibleGramCachesError as error:
        raise IncompatibleStudyInputsError(str(error)) from error


def _check_same_samples(
    ref: GramCache, ref_name: str, cache: GramCache, name: str, unverified: list[str]
) -> None:
    """Same sample ids (dataset size, seed, order) and, where recorded, the same input data."""
    from ckapipe.analyze.gram_format import dataset_mismatch, dataset_unverified

    ref_identity, identity = ref.identity or {}, cache.identity or {}
    if identity.get("sample_ids_sha256") != ref_identity.get("sample_ids_sha256"):
        raise IncompatibleStudyInputsError(
            f"model {name!r}: sample order differs from model {ref_name!r} (sample ids sha256 "
            f"{_short(identity.get('sample_ids_sha256'))} vs "
            f"{_short(ref_identity.get('sample_ids_sha256'))}); both stores must be extracted "
            "with the same dataset, --seed and --order"
        )
    if identity.get("n_samples") != ref_identity.get("n_samples"):
        raise IncompatibleStudyInputsError(
            f"model {name!r}: {identity.get('n_samples')} samples, model {ref_name!r} has "
            f"{ref_identity.get('n_samples')}; extract both with the same dataset and --limit"
        )
    # equal sample ids only mean equal dataset size, seed and order: compare the inputs too
    mismatch = dataset_mismatch(identity, ref_identity, f"model {name!r}", f"model {ref_name!r}")
    if mismatch:
        raise IncompatibleStudyInputsError(mismatch)
    warning = dataset_unverified(identity, ref_identity, f"model {name!r}", f"model {ref_name!r}")
    if warning:
        unverified.append(warning)


def _check_models_compatible(caches: Sequence[GramCache], names: Sequence[str]) -> None:
    ref, ref_name = caches[0], names[0]
    unverified: list[str] = []
    for cache, name in zip(caches[1:], names[1:], strict=True):
        _check_same_samples(ref, ref_name, cache, name, unverified)
        if cache.mode != ref.mode:
            raise IncompatibleStudyInputsError(
                f"model {name!r}: Gram cache mode {cache.mode!r} differs from model {ref_name!r} "
                f"({ref.mode!r}); build every cache with the same `ckapipe gram --mode`"
            )
        if cache.kernel != ref.kernel or cache.attrs.get("threshold") != ref.attrs.get("threshold"):
            raise IncompatibleStudyInputsError(
                f"model {name!r}: kernel {cache.kernel!r} (threshold "
                f"{cache.attrs.get('threshold')}) differs from model {ref_name!r} ({ref.kernel!r}, "
                f"threshold {ref.attrs.get('threshold')}); build every cache with the same "
                "--kernel and --threshold"
            )
        if ref.mode == "minibatch":
            _check_same_batches(ref, ref_name, cache, name)
    # warned only once every check passed, so a refused study does not warn as well
    from ckapipe.analyze.gram_format import UnverifiedDatasetWarning

    for warning in unverified:
        warnings.warn(warning, UnverifiedDatasetWarning, stacklevel=4)


def _check_same_batches(ref: GramCache, ref_name: str, cache: GramCache, name: str) -> None:
    part, ref_part = cache.partition or {}, ref.partition or {}
    if part.get("sha256") != ref_part.get("sha256"):
        raise IncompatibleStudyInputsError(
            f"model {name!r}: minibatch partition differs from model {ref_name!r} "
            f"(batch size {part.get('batch_size')} vs {ref_part.get('batch_size')}, "
            f"epochs {part.get('epochs')} vs {ref_part.get('epochs')}, partition sha256 "
            f"{_short(part.get('sha256'))} vs {_short(ref_part.get('sha256'))}); build "
            "every cache with the same --batch-size, --epochs and --seed"
        )
    batches, ref_batches = np.asarray(cache.batches), np.asarray(ref.batches)
    if not np.array_equal(batches, ref_batches):
        missing = np.setdiff1d(ref_batches, batches)[:5].tolist()
        extra = np.setdiff1d(batches, ref_batches)[:5].tolist()
        raise IncompatibleStudyInputsError(
            f"model {name!r}: its Gram cache holds other batches than model {ref_name!r}'s "
            f"({batches.size} vs {ref_batches.size}; missing e.g. {missing}, extra e.g. "
            f"{extra}); build or merge both caches over the same rows"
        )


def resolve_pairs(
    pairs: str | Sequence[tuple[str, str]] | Sequence[str], names: list[str], include_self: bool
) -> list[tuple[str, str]]:
    if isinstance(pairs, str):
        if pairs == "all":
            result = [
                (a, b) for i, a in enumerate(names) for b in names[i:] if include_self or a != b
            ]
            if not result:
                raise StudyError(
                    "no pairs to compare: one model and include_self=False; give two or more "
                    "caches or allow self-comparisons"
                )
            return result
        pairs = [p for p in pairs.split(",") if p]
    result = []
    seen: set[frozenset[str]] = set()
    for item in pairs:
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) != 2:
                raise StudyError(f"pair {item!r} is not of the form model_a:model_b")
            item = (parts[0], parts[1])
        a, b = item
        for name in (a, b):
            if name not in names:
                raise StudyError(f"pair {a}:{b}: unknown model {name!r}; the models are {names}")
        key = frozenset((a, b))
        if key in seen:
            raise StudyError(f"pair {a}:{b} is requested twice (a:b and b:a are the same pair)")
        seen.add(key)
        result.append((a, b))
    if not result:
        raise StudyError("no pairs requested; use pairs='all' or a:b,c:d")
    return result


def check_out(out: Path, overwrite: bool) -> None:
    csv_path = csv_path_for(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise StudyError(
                f"{out} already exists; choose another --out or pass --overwrite to replace it"
            )
        if not is_result(out):
            raise StudyError(
                f"{out} exists and is not a ckapipe CKA result; refusing to overwrite it"
            )
    if csv_path.exists() and not overwrite:
        raise StudyError(
            f"{csv_path} already exists; choose another --out or pass --overwrite to replace it"
        )


def choice(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise StudyError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
    return value


def _short(digest: Any) -> str:
    return f"{str(digest)[:12]}…" if digest else "missing"


def check_estimator(estimator: str, mode: str) -> None:
    """The minibatch estimator needs minibatch caches, the full-mode ones full caches."""
    if (estimator == "minibatch") != (mode == "minibatch"):
        need = "minibatch" if estimator == "minibatch" else "full"
        raise StudyError(
            f"estimator {estimator!r} needs {need}-mode Gram caches, but the caches are "
            f"{mode!r}; build them with `ckapipe gram --mode {need}` or choose "
            f"--estimator {'minibatch' if mode == 'minibatch' else 'debiased|biased'}"
        )


def minibatch_kernel(
    cache: GramCache, kernel: str | None, threshold: float | None
) -> tuple[str, Any]:
    """(kernel, threshold) of minibatch caches: fixed by the cached Grams, so a different request
    is refused."""
    cache_kernel = cache.kernel
    if kernel is not None and kernel != cache_kernel:
        raise StudyError(
            f"the minibatch Gram caches hold {cache_kernel!r}-kernel Grams; kernel {kernel!r} "
            f"needs caches built with `ckapipe gram --kernel {kernel}`"
        )
    cache_threshold = cache.attrs.get("threshold")
    if threshold is not None and cache_kernel == "rbf" and threshold != cache_threshold:
        raise StudyError(
            f"the minibatch Gram caches hold RBF Grams with threshold {cache_threshold}; "
            f"threshold {threshold} needs caches built with --threshold {threshold}"
        )
    return cache_kernel, cache_threshold


def full_kernel(
    cache: GramCache, kernel: str | None, threshold: float | None, n_permutations: int
) -> tuple[str, float]:
    """(kernel, threshold) for full caches (default: the caches'); no permutations there."""
    if n_permutations:
        raise StudyError(
            "permutation p-values need minibatch Gram caches (they permute samples within "
            "batches); full-mode caches have no batches. Use --permutations 0 or minibatch caches"
        )
    kernel = choice(kernel or cache.kernel, ("linear", "rbf"), "kernel")
    if threshold is None:
        threshold = float(cache.attrs.get("threshold") or 1.0)
    if kernel == "rbf" and not threshold > 0:
        raise StudyError(f"threshold must be > 0 for the RBF kernel, got {threshold!r}")
    return kernel, float(threshold)
