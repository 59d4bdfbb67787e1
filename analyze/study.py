"""The pairs step: CKA of every layer pair of every model pair of a study, from Gram caches.

``analyze_study`` reads each model's Gram cache once and computes, for every requested model
pair, the (La, Lb) matrix of CKA values with confidence intervals and, optionally, permutation
p-values; ``load_result`` reads the written result back.

Estimators
----------
- ``"minibatch"`` (default; minibatch caches): Σ_b HSIC₁ / sqrt(Σ_b HSIC₁ · Σ_b HSIC₁) over the
  cached batches (Nguyen et al. 2021), one :class:`MinibatchCKA` per model pair fed with the
  cached U-centered Grams of all caches in lockstep: all layer pairs in one product per batch,
  on the GPU when there is one. Intervals: delete-one-batch jackknife with t quantiles
  (:func:`~ckapipe.analyze.intervals.batch_interval`), withheld (NaN, reason in the pair's
  diagnostics) below the batch count at which its coverage was validated.
  p-values: permutations of the samples of model b within each batch (PŨP ᵀ of its cached
  Grams), the same permutations for every pair.
- ``"debiased"`` / ``"biased"`` (full caches): exact HSIC₁ / HSIC₀ CKA over all n samples from
  the cached n×n linear Grams, optionally turned into RBF Grams (σ² = threshold² · median of
  the n×n squared distances, diagonal included). Memory stays O(n²): one layer at a time for
  the centering statistics, then row blocks of every Gram stacked into one product. Debiased
  intervals: delete-one-block jackknife over random sample blocks, from the same row blocks
  (:class:`~ckapipe.analyze.intervals.FullBlockJackknife`); the biased estimator has none. No
  permutation test (refused).

Self-pairs (a model with itself: within-model layer similarity, symmetric with ones on the
diagonal) are included by default (``include_self=True``).

Result format: :mod:`ckapipe.analyze.result` (which also defines :class:`StudyResult`,
:class:`PairResult`, :func:`load_result`, re-exported here); a tidy CSV is written beside it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import zarr

from ckapipe.analyze.estimators import (
    DegenerateLayerWarning,
    FullCentering,
    MinibatchCKA,
    hsic_normaliser,
    stacked_hsic1,
)
from ckapipe.analyze.intervals import (
    DEFAULT_INTERVAL_METHOD,
    FullBlockJackknife,
    batch_interval,
    bootstrap_counts,
    nonpositive_self_hsic,
    null_threshold,
    permutation_p_value,
    ratio_cka,
)
from ckapipe.analyze.result import (
    CSV_COLUMNS,
    RESULT_FORMAT,
    RESULT_FORMAT_VERSION,
    PairResult,
    StudyResult,
    csv_path_for,
    is_result,
    load_result,
    result_writer,
    write_result,
)
from ckapipe.analyze.result import jsonable as _jsonable
from ckapipe.errors import IncompatibleInputsError, UsageError
from ckapipe.formats import now, versions

if TYPE_CHECKING:
    from ckapipe.analyze.gram_cache import GramCache

__all__ = [
    "RESULT_FORMAT",
    "RESULT_FORMAT_VERSION",
    "CSV_COLUMNS",
    "PairResult",
    "IncompatibleStudyInputsError",
    "StudyError",
    "StudyResult",
    "analyze_study",
    "csv_path_for",
    "load_result",
    "write_result",
]

Estimator = Literal["minibatch", "debiased", "biased"]
ESTIMATORS = ("minibatch", "debiased", "biased")
BANDWIDTH_RULE = (
    "sigma^2 = threshold^2 * median of the n x n squared distances (diagonal included, numpy "
    "median), from the linear Gram of the column-centered features; per layer and per batch "
    "(minibatch) or over all n samples (full)"
)
# Elements of float64 temporaries the permutation null and the full-mode row blocks may hold.
_WORK_ELEMENTS = 1 << 24


class StudyError(UsageError):
    """The caches or options of a study do not fit together; the message says what to change."""


class IncompatibleStudyInputsError(StudyError, IncompatibleInputsError):
    """The Gram caches of a study do not describe the same samples, batched the same way."""


# ------------------------------------------------------------------------------ public API


def analyze_study(
    gram_caches: Sequence[str | os.PathLike[str] | GramCache],
    out: str | os.PathLike[str],
    *,
    names: Sequence[str] | None = None,
    estimator: Estimator = "minibatch",
    kernel: str | None = None,
    threshold: float | None = None,
    ci_level: float = 0.95,
    n_bootstrap: int = 1000,
    n_permutations: int = 0,
    seed: int = 0,
    pairs: str | Sequence[tuple[str, str]] = "all",
    include_self: bool = True,
    device: str = "auto",
    overwrite: bool = False,
) -> StudyResult:
    """CKA of every layer pair of every requested model pair, written to a result group.

    Parameters
    ----------
    gram_caches : one Gram cache per model (paths or open :class:`GramCache`), all built from
        stores with the same samples in the same order, with the same partition and kernel.
    out : the result group to write (``RESULT.zarr``); ``RESULT.csv`` is written beside it.
    names : model names, one per cache (unique; no ``/`` and no ``--``). Default: each cache's
        file name without ``.zarr`` / ``.grams`` suffixes (``grams/resnet18.grams.zarr`` →
        ``resnet18``).
    estimator : ``"minibatch"`` (minibatch caches) or ``"debiased"`` / ``"biased"`` (full caches).
    kernel : full mode only: ``"linear"`` or ``"rbf"`` applied to the cached linear Gram
        (default: the caches' kernel). Minibatch caches hold Grams of a fixed kernel; a different
        ``kernel`` is refused.
    threshold : RBF bandwidth multiple in full mode (default: the caches' threshold).
    ci_level : nominal coverage of the bootstrap intervals, in (0, 1).
    n_bootstrap : bootstrap replicates R (0: no intervals).
    n_permutations : permutations P for p-values (0: none; minibatch estimator only).
    seed : seeds the bootstrap counts (``default_rng(seed)``) and the permutations of batch k
        (``default_rng([seed, k])``).
    pairs : ``"all"`` (every unordered pair a < b in study order, plus self-pairs when
        ``include_self``) or a list of (model_a, model_b) name pairs (a == b allowed).
    include_self : with ``pairs="all"``, also compare each model with itself.
    device : ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    overwrite : replace an existing ckapipe result at ``out`` (anything else is never deleted).

    Returns
    -------
    StudyResult (the same values :func:`load_result` reads back).

    Raises
    ------
    StudyError
        Incompatible caches (naming the first mismatch and the two models), a wrong estimator for
        the caches' mode, bad names or pairs, or an existing ``out``.
    """
    estimator = _choice(estimator, ESTIMATORS, "estimator")
    if not 0.0 < ci_level < 1.0:
        raise StudyError(f"ci_level must be in (0, 1), e.g. 0.95; got {ci_level!r}")
    if n_bootstrap < 0 or n_permutations < 0:
        raise StudyError(
            f"n_bootstrap and n_permutations must be >= 0, got {n_bootstrap} and {n_permutations}"
        )
    if seed < 0:
        raise StudyError(f"seed must be >= 0, got {seed}")
    out = Path(out)
    _check_out(out, overwrite)
    # the writer lock is held from here to the end: a second writer of `out` is refused at once
    with result_writer(out, overwrite=overwrite) as write:
        study = _compute_study(
            gram_caches,
            out,
            names=names,
            estimator=estimator,
            kernel=kernel,
            threshold=threshold,
            ci_level=ci_level,
            n_bootstrap=n_bootstrap,
            n_permutations=n_permutations,
            seed=seed,
            pairs=pairs,
            include_self=include_self,
            device=device,
        )
        # the provenance as stored (JSON-normalised, with the completion flag), as load_result
        # gives it
        study.provenance = write(study)
    return study


def _compute_study(
    gram_caches: Sequence[str | os.PathLike[str] | GramCache],
    out: Path,
    *,
    names: Sequence[str] | None,
    estimator: Estimator,
    kernel: str | None,
    threshold: float | None,
    ci_level: float,
    n_bootstrap: int,
    n_permutations: int,
    seed: int,
    pairs: str | Sequence[tuple[str, str]],
    include_self: bool,
    device: str,
) -> StudyResult:
    """Everything :func:`analyze_study` computes, with its arguments checked; nothing written."""
    caches = [_open_cache(c) for c in gram_caches]
    if not caches:
        raise StudyError("no Gram caches given: pass one cache per model")
    model_names = _model_names(caches, names)
    _check_compatible(caches, model_names)
    mode = caches[0].mode
    if (estimator == "minibatch") != (mode == "minibatch"):
        need = "minibatch" if estimator == "minibatch" else "full"
        raise StudyError(
            f"estimator {estimator!r} needs {need}-mode Gram caches, but the caches are "
            f"{mode!r}; build them with `ckapipe gram --mode {need}` or choose "
            f"--estimator {'minibatch' if mode == 'minibatch' else 'debiased|biased'}"
        )
    requested = _resolve_pairs(pairs, model_names, include_self)
    torch_device = _resolve_device(device)
    by_name = dict(zip(model_names, caches, strict=True))
    layers = {name: list(cache.layer_names) for name, cache in by_name.items()}

    provenance: dict[str, Any] = {
        "format": RESULT_FORMAT,
        "format_version": RESULT_FORMAT_VERSION,
        "estimator": estimator,
        "ci_level": float(ci_level),
        "n_bootstrap": int(n_bootstrap),
        "n_permutations": int(n_permutations),
        "seed": int(seed),
        "mode": mode,
        "models": {
            name: {
                "store": (cache.identity or {}).get("path"),
                "gram_cache": str(_cache_path(cache)),
                "identity": _jsonable(cache.identity),
                "layers": layers[name],
                "gram_cache_attrs": _jsonable(_cache_settings(cache)),
            }
            for name, cache in by_name.items()
        },
        "pairs": [[a, b] for a, b in requested],
        "partition": _jsonable(caches[0].partition),
        "batches": [int(b) for b in caches[0].batches] if mode == "minibatch" else [],
        "device": str(torch_device),
        "versions": versions(),
        "created": now(),
    }

    if mode == "minibatch":
        cache_kernel = caches[0].kernel
        if kernel is not None and kernel != cache_kernel:
            raise StudyError(
                f"the minibatch Gram caches hold {cache_kernel!r}-kernel Grams; kernel {kernel!r} "
                f"needs caches built with `ckapipe gram --kernel {kernel}`"
            )
        cache_threshold = caches[0].attrs.get("threshold")
        if threshold is not None and cache_kernel == "rbf" and threshold != cache_threshold:
            raise StudyError(
                f"the minibatch Gram caches hold RBF Grams with threshold {cache_threshold}; "
                f"threshold {threshold} needs caches built with --threshold {threshold}"
            )
        provenance["kernel"] = cache_kernel
        provenance["threshold"] = cache_threshold
        if n_permutations and n_permutations > 0:
            provenance["permutation_scheme"] = (
                "samples of model b permuted within each batch; batch k uses "
                "numpy.random.default_rng([seed, k]); one-sided p = (1 + #{null >= obs}) / (1 + P)"
            )
        results = _minibatch_pairs(
            by_name,
            layers,
            requested,
            ci_level=ci_level,
            n_bootstrap=n_bootstrap,
            n_permutations=n_permutations,
            seed=seed,
            device=torch_device,
        )
    else:
        if n_permutations:
            raise StudyError(
                "permutation p-values need minibatch Gram caches (they permute samples within "
                "batches); full-mode caches have no batches. Use --permutations 0 or minibatch caches"
            )
        kernel = kernel or caches[0].kernel
        kernel = _choice(kernel, ("linear", "rbf"), "kernel")
        if threshold is None:
            threshold = float(caches[0].attrs.get("threshold") or 1.0)
        if kernel == "rbf" and not threshold > 0:
            raise StudyError(f"threshold must be > 0 for the RBF kernel, got {threshold!r}")
        provenance["kernel"] = kernel
        provenance["threshold"] = float(threshold)
        results, bandwidths = _full_pairs(
            by_name,
            layers,
            requested,
            biased=estimator == "biased",
            kernel=kernel,
            threshold=float(threshold),
            device=torch_device,
            ci_level=ci_level if n_bootstrap > 0 else None,
        )
        if kernel == "rbf":
            for name, sigma2 in bandwidths.items():
                provenance["models"][name]["rbf_sigma2"] = sigma2
    if provenance["kernel"] == "rbf":
        provenance["bandwidth_rule"] = BANDWIDTH_RULE

    return StudyResult(models=model_names, pairs=results, provenance=provenance, path=out)


# ------------------------------------------------------------------------------ inputs


def _open_cache(cache: str | os.PathLike[str] | GramCache) -> GramCache:
    if isinstance(cache, str | os.PathLike):
        from ckapipe.analyze.gram_cache import GramCache

        return GramCache.open(cache)
    return cache


def _cache_path(cache: GramCache) -> Path:
    path = getattr(cache, "path", None)
    if path is None:
        raise StudyError(f"cannot tell where Gram cache {cache!r} lives (no .path)")
    return Path(path)


def _cache_settings(cache: GramCache) -> dict[str, Any]:
    keep = ("mode", "kernel", "threshold", "batch_size", "epochs", "seed", "epoch_seeds", "created")
    settings = {key: cache.attrs.get(key) for key in keep}
    # samples used / n: every sample, unless a 1-3 row remainder had to be left out
    settings["n_samples"] = cache.n_samples
    settings["samples_used"] = cache.samples_used
    settings["dropped_rows"] = cache.dropped_rows
    return settings


def _model_names(caches: Sequence[GramCache], names: Sequence[str] | None) -> list[str]:
    if names is None:
        result = [_default_name(_cache_path(c)) for c in caches]
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


def _check_compatible(caches: Sequence[GramCache], names: Sequence[str]) -> None:
    """Refuse caches that do not hold the same samples, in the same order, batched the same way.

    The first cache is the reference; the message names the first cache that differs from it
    by model name. The Gram cache module's own check runs last, for anything not covered here.
    Raises :class:`IncompatibleStudyInputsError`.
    """
    _check_models_compatible(caches, names)
    from ckapipe.analyze.gram_cache import IncompatibleGramCachesError, check_compatible

    try:
        check_compatible(list(caches), warn=False)  # dataset warnings were given by model name
    except IncompatibleGramCachesError as error:
        raise IncompatibleStudyInputsError(str(error)) from error


def _check_same_samples(
    ref: GramCache, ref_name: str, cache: GramCache, name: str, unverified: list[str]
) -> None:
    """Same sample ids (dataset size, seed, order) and, where recorded, the same input data."""
    from ckapipe.analyze.gram_cache import dataset_mismatch, dataset_unverified

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
    from ckapipe.analyze.gram_cache import UnverifiedDatasetWarning

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


def _resolve_pairs(
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


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise StudyError(
            f"device {device!r} is not a torch device; use auto, cpu or cuda"
        ) from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise StudyError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return resolved


def _check_out(out: Path, overwrite: bool) -> None:
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


def _choice(value: str, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise StudyError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
    return value


# ------------------------------------------------------------------------------ minibatch mode


def _minibatch_pairs(
    caches: Mapping[str, GramCache],
    layers: Mapping[str, list[str]],
    requested: Sequence[tuple[str, str]],
    *,
    ci_level: float,
    n_bootstrap: int,
    n_permutations: int,
    seed: int,
    device: torch.device,
) -> dict[tuple[str, str], PairResult]:
    """Minibatch CKA of the requested pairs.

    One self-comparison :class:`MinibatchCKA` over the layers of every model involved
    (qualified ``model/layer``): per batch, the Grams of all models are concatenated into
    (ΣL, m, m) and one (ΣL, m²) @ (m², ΣL) product gives the HSIC₁ of every layer pair of every
    model pair, each model's Grams checked once. Each pair's per-batch values are blocks of it.
    """
    used = [name for name in caches if any(name in pair for pair in requested)]
    accumulator = MinibatchCKA([f"{name}/{layer}" for name in used for layer in layers[name]])
    offsets, start = {}, 0
    for name in used:
        offsets[name], start = start, start + len(layers[name])
    null = _PermutationNull(requested, layers, n_permutations, seed, device)
    for batch_number, grams in _lockstep(caches, used, device):
        accumulator.update_grams(torch.cat([grams[name] for name in used]))  # (ΣL, m, m)
        null.update(batch_number, grams)
    hsic_all, self_all, _, _ = accumulator.per_batch()  # (B, ΣL, ΣL), (B, ΣL)

    some = next(iter(caches.values()))
    epochs = int((some.partition or {}).get("epochs") or 1)
    n_batches = accumulator.n_batches
    counts = None
    if n_bootstrap > 0 and n_batches >= 2:
        counts = bootstrap_counts(n_batches, n_bootstrap, np.random.default_rng(seed))

    results = {}
    for a, b in requested:
        rows = slice(offsets[a], offsets[a] + len(layers[a]))
        cols = slice(offsets[b], offsets[b] + len(layers[b]))
        hsic = np.ascontiguousarray(hsic_all[:, rows, cols])  # (B, La, Lb)
        self_a = np.ascontiguousarray(self_all[:, rows])  # (B, La)
        self_b = np.ascontiguousarray(self_all[:, cols])  # (B, Lb)
        sum_a, sum_b = self_a.sum(axis=0), self_b.sum(axis=0)
        cka = ratio_cka(hsic.sum(axis=0), sum_a, sum_b)
        diagnostics = _degenerate_layers(sum_a, sum_b, layers, a, b)
        la, lb = cka.shape
        ci_low = np.full((la, lb), np.nan)
        ci_high = np.full((la, lb), np.nan)
        method, note = "none", None
        if n_bootstrap == 0:
            note = "no interval requested (n_bootstrap = 0): ci_low/ci_high are NaN"
            diagnostics.append(note)
        else:
            # batch_interval withholds (NaN plus a reason) below the batch count at which its
            # coverage was validated, and for batches of several epochs
            interval = batch_interval(
                hsic,
                self_a,
                self_b,
                ci_level,
                method=DEFAULT_INTERVAL_METHOD,
                counts=counts,
                epochs=epochs,
            )
            ci_low, ci_high = interval.low, interval.high
            method, note = _interval_record(interval)
            if interval.reason is not None:
                diagnostics.append(interval.reason)
            diagnostics += _undefined_replicates(interval.n_undefined, layers[a], layers[b], a, b)
        p_value = threshold = None
        if n_permutations > 0:
            null_cka = ratio_cka(null.cross[(a, b)].cpu().numpy(), sum_a, sum_b)
            p_value = permutation_p_value(cka, null_cka)
            threshold = null_threshold(null_cka)
        results[(a, b)] = PairResult(
            model_a=a,
            model_b=b,
            layers_a=list(layers[a]),
            layers_b=list(layers[b]),
            cka=cka,
            ci_low=ci_low,
            ci_high=ci_high,
            p_value=p_value,
            diagnostics=diagnostics,
            null_threshold=threshold,
            interval_method=method,
            interval_note=note,
            hsic_per_batch=hsic,
            self_a_per_batch=self_a,
            self_b_per_batch=self_b,
        )
    return results


def _lockstep(
    caches: Mapping[str, GramCache], used: Sequence[str], device: torch.device
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield (batch number, {model: (L, m, m) U-centered Grams}) with every cache at the same batch."""
    iterators = [caches[name].iter_batches(device=device) for name in used]
    for items in zip(*iterators, strict=True):
        numbers = [int(number) for number, _ in items]
        if len(set(numbers)) != 1:
            raise StudyError(
                f"Gram caches went out of step: batch numbers {dict(zip(used, numbers, strict=True))}; "
                "rebuild the caches with the same partition"
            )
        yield numbers[0], {name: grams for name, (_, grams) in zip(used, items, strict=True)}


def _interval_record(interval: Any) -> tuple[str, str | None]:
    """The method and, when withheld, the reason that the result and its CSV carry per pair."""
    units = "sample blocks" if interval.method == "block-jackknife" else "batches"
    described = f"{interval.method} over {interval.n_batches} {units}"
    if interval.method != "bootstrap":
        described += f", t quantile on {interval.n_batches - 1} df"
    return described, interval.reason


def _degenerate_layers(
    self_a: np.ndarray, self_b: np.ndarray, layers: Mapping[str, list[str]], a: str, b: str
) -> list[str]:
    """Diagnostics (also warned) for layers whose summed self-HSIC is not positive."""
    messages = nonpositive_self_hsic(self_a, layers[a], a)
    if a != b:
        messages += nonpositive_self_hsic(self_b, layers[b], b)
    for message in messages:
        warnings.warn(f"{a} vs {b}: {message}", DegenerateLayerWarning, stacklevel=4)
    return messages


def _undefined_replicates(
    n_undefined: np.ndarray, layers_a: Sequence[str], layers_b: Sequence[str], a: str, b: str
) -> list[str]:
    if not n_undefined.any():
        return []
    rows, cols = np.nonzero(n_undefined)
    worst = int(n_undefined.max())
    examples = ", ".join(
        f"({layers_a[i]!r}, {layers_b[j]!r})" for i, j in zip(rows[:3], cols[:3], strict=True)
    )
    return [
        f"interval: in {rows.size} layer pair(s) of {a} vs {b}, e.g. {examples}, up to {worst} "
        "bootstrap replicates or delete-one values had a non-positive self-HSIC sum; their "
        "intervals use the others only"
    ]


class _PermutationNull:
    """Σ_b HSIC₁(K_b, P_b L_b P_bᵀ) for P permutations of model b's samples within each batch.

    Permuting samples permutes the rows and columns of a U-centered Gram (Ũ(PLPᵀ) = PŨ(L)Pᵀ),
    so the null is computed from the cached Grams. The self terms do not change under a
    permutation, so only the cross sums are kept: (P, La, Lb) per pair.
    """

    def __init__(
        self,
        requested: Sequence[tuple[str, str]],
        layers: Mapping[str, list[str]],
        n_permutations: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.n_permutations = n_permutations
        self.seed = seed
        self.requested = list(requested)
        self.cross = {
            (a, b): torch.zeros(
                n_permutations, len(layers[a]), len(layers[b]), dtype=torch.float64, device=device
            )
            for a, b in requested
        }

    def update(self, batch_number: int, grams: Mapping[str, torch.Tensor]) -> None:
        if self.n_permutations == 0:
            return
        any_grams = next(iter(grams.values()))
        m = any_grams.shape[-1]
        device = any_grams.device
        rng = np.random.default_rng([self.seed, batch_number])
        perms = torch.from_numpy(np.argsort(rng.random((self.n_permutations, m)), axis=1)).to(
            device
        )
        for model_b in dict.fromkeys(b for _, b in self.requested):
            gb = grams[model_b].to(torch.float64)  # (Lb, m, m)
            lb = gb.shape[0]
            step = max(1, _WORK_ELEMENTS // (lb * m * m))
            for start in range(0, self.n_permutations, step):
                p = perms[start : start + step]  # (pc, m)
                pc = p.shape[0]
                # element [l, k, i, j] = Ũ_l[p_k(i), p_k(j)]
                permuted = gb[:, p[:, :, None], p[:, None, :]]  # (Lb, pc, m, m)
                permuted = permuted.transpose(0, 1).reshape(pc * lb, m * m)  # (pc*Lb, m*m)
                for a, b in self.requested:
                    if b != model_b:
                        continue
                    flat_a = grams[a].to(torch.float64).reshape(-1, m * m)  # (La, m*m)
                    cross = stacked_hsic1(flat_a, permuted, m)  # (La, pc*Lb)
                    cross = cross.reshape(-1, pc, lb).transpose(0, 1)  # (pc, La, Lb)
                    self.cross[(a, b)][start : start + pc] += cross


# ------------------------------------------------------------------------------ full mode


def _full_pairs(
    caches: Mapping[str, GramCache],
    layers: Mapping[str, list[str]],
    requested: Sequence[tuple[str, str]],
    *,
    biased: bool,
    kernel: str,
    threshold: float,
    device: torch.device,
    ci_level: float | None = None,
) -> tuple[dict[tuple[str, str], PairResult], dict[str, dict[str, float]]]:
    """Exact HSIC₁ (or HSIC₀) of every layer pair of every requested pair from full Grams.

    Pass 1, one layer at a time (O(n²) memory): the centering statistics (row sums of the
    zero-diagonal kernel matrix, or row means for HSIC₀) and, for RBF, the bandwidth. Pass 2:
    row blocks of every layer's centered kernel matrix stacked into one (ΣL, rows·n) matrix; its
    product with itself accumulates ⟨C(K_i), C(K_j)⟩ for every layer of every model at once.
    """
    used = [name for name in caches if any(name in pair for pair in requested)]
    n = int(next(iter(caches.values())).identity["n_samples"])
    if not biased and n < 4:
        raise StudyError(f"debiased CKA needs at least 4 samples, the stores hold {n}")
    stats: dict[tuple[str, str], FullCentering] = {}
    bandwidths: dict[str, dict[str, float]] = {}
    for name in used:
        for layer in layers[name]:
            gram = torch.as_tensor(caches[name].full_gram(layer), device=device).to(torch.float64)
            if gram.shape != (n, n):
                raise StudyError(
                    f"model {name!r} layer {layer!r}: full Gram has shape {tuple(gram.shape)}, "
                    f"expected ({n}, {n}); rebuild the cache"
                )
            try:
                stats[(name, layer)] = FullCentering.from_gram(
                    gram, biased=biased, kernel=kernel, threshold=threshold
                )
            except ValueError as error:  # an undefined RBF bandwidth: name the layer
                raise StudyError(f"model {name!r} layer {layer!r}: {error}") from error
            if kernel == "rbf":
                bandwidths.setdefault(name, {})[layer] = float(stats[(name, layer)].sigma2)
            del gram

    rows_of = [(name, layer) for name in used for layer in layers[name]]
    total_layers = len(rows_of)
    block = max(1, min(n, max(n // total_layers, _WORK_ELEMENTS // (total_layers * n))))
    inner = torch.zeros(total_layers, total_layers, dtype=torch.float64, device=device)
    # the block jackknife accumulates ⟨·,·⟩ per sample block, so it also yields the exact inner
    # products; HSIC₀ has no interval (its delete-one values would need other terms)
    jackknife = None if biased or ci_level is None else FullBlockJackknife(n, total_layers)
    for start in range(0, n, block):
        stop = min(n, start + block)
        centered = torch.empty(total_layers, (stop - start) * n, dtype=torch.float64, device=device)
        for index, (name, layer) in enumerate(rows_of):
            rows = torch.as_tensor(
                _full_gram_rows(caches[name], layer, start, stop), device=device
            ).to(torch.float64)  # (rows, n)
            centered[index] = stats[(name, layer)].center_rows(rows, start).reshape(-1)
        if jackknife is None:
            inner += centered @ centered.T  # (ΣL, ΣL)
        else:
            jackknife.update(centered.reshape(total_layers, stop - start, n), start)
    scale = hsic_normaliser(n, biased=biased)
    inner = (inner * scale).cpu().numpy() if jackknife is None else jackknife.inner() * scale
    position = {key: index for index, key in enumerate(rows_of)}

    results = {}
    for a, b in requested:
        ia = [position[(a, layer)] for layer in layers[a]]
        ib = [position[(b, layer)] for layer in layers[b]]
        hsic = inner[np.ix_(ia, ib)]
        self_a, self_b = np.diag(inner)[ia], np.diag(inner)[ib]
        diagnostics = _degenerate_layers(self_a, self_b, layers, a, b)
        la, lb = hsic.shape
        ci_low, ci_high = np.full((la, lb), np.nan), np.full((la, lb), np.nan)
        method, note = "none", None
        if jackknife is not None:
            interval = jackknife.interval(ia, ib, ci_level)
            ci_low, ci_high = interval.low, interval.high
            method, note = _interval_record(interval)
            if interval.reason is not None:
                diagnostics.append(interval.reason)
        elif biased:
            note = (
                f"full mode: exact biased HSIC₀ CKA over all {n} samples; no interval is "
                "computed for the biased estimator, so ci_low/ci_high are NaN"
            )
            diagnostics.append(note)
        else:
            note = "no interval requested (n_bootstrap = 0): ci_low/ci_high are NaN"
            diagnostics.append(note)
        results[(a, b)] = PairResult(
            model_a=a,
            model_b=b,
            layers_a=list(layers[a]),
            layers_b=list(layers[b]),
            cka=ratio_cka(hsic, self_a, self_b),
            ci_low=ci_low,
            ci_high=ci_high,
            p_value=None,
            diagnostics=diagnostics,
            interval_method=method,
            interval_note=note,
            hsic_per_batch=hsic[None],
            self_a_per_batch=self_a[None],
            self_b_per_batch=self_b[None],
        )
    return results, bandwidths


def _full_gram_rows(cache: GramCache, layer: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a full-mode cached Gram (``grams/<layer>``, chunked in row
    blocks per the Gram cache format), read without loading the whole matrix."""
    group = zarr.open_group(str(_cache_path(cache)), mode="r")
    return group["grams"][layer][start:stop, :]


def _short(digest: Any) -> str:
    return f"{str(digest)[:12]}…" if digest else "missing"
