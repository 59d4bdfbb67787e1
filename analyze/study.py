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
  the n×n squared distances, diagonal included; an exact streamed median). Nothing of size n²
  is held: the Grams are streamed tile by tile (:mod:`~ckapipe.analyze.full_pairs`), one layer
  at a time for the centering statistics, then the same tile of every Gram stacked into one
  product. Debiased intervals: delete-one-block jackknife over random sample blocks, from the
  same tiles (:class:`~ckapipe.analyze.intervals.FullBlockJackknife`); the biased estimator has
  none. No permutation test (refused).

Self-pairs (a model with itself: within-model layer similarity, symmetric with ones on the
diagonal) are included by default (``include_self=True``).

Result format: :mod:`ckapipe.analyze.result` (which also defines :class:`StudyResult`,
:class:`PairResult`, :func:`load_result`, re-exported here); a tidy CSV is written beside it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ckapipe.analyze.full_pairs import full_pairs
from ckapipe.analyze.intervals import DEFAULT_INTERVAL_METHOD, INTERVAL_METHODS
from ckapipe.analyze.measure_pairs import measure_pairs
from ckapipe.analyze.measures import MeasureOptions, parse_measures
from ckapipe.analyze.minibatch_pairs import minibatch_pairs
from ckapipe.analyze.result import (
    CSV_COLUMNS,
    RESULT_FORMAT,
    RESULT_FORMAT_VERSION,
    PairResult,
    StudyResult,
    csv_path_for,
    load_result,
    result_writer,
    write_result,
)
from ckapipe.analyze.study_checks import (
    IncompatibleStudyInputsError,
    StudyError,
    cache_path,
    cache_settings,
    check_compatible,
    check_estimator,
    check_out,
    choice,
    full_kernel,
    minibatch_kernel,
    model_names,
    open_cache,
    resolve_pairs,
)
from ckapipe.formats import now, versions
from ckapipe.utils import jsonable, resolve_device

if TYPE_CHECKING:
    import torch

    from ckapipe.analyze.gram_format import GramCache

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
PERMUTATION_SCHEME = (
    "samples of model b permuted within each batch; batch k uses "
    "numpy.random.default_rng([seed, k]); one-sided p = (1 + #{null >= obs}) / (1 + P)"
)
BANDWIDTH_RULE = (
    "sigma^2 = threshold^2 * median of the n x n squared distances (diagonal included, numpy "
    "median), from the linear Gram of the column-centered features; per layer and per batch "
    "(minibatch) or over all n samples (full)"
)


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
    interval_method: str = DEFAULT_INTERVAL_METHOD,
    measures: str | Sequence[str] = ("cka",),
    measure_options: MeasureOptions | None = None,
    architectures: Mapping[str, str] | None = None,
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
    ci_level : nominal coverage of the confidence intervals, in (0, 1).
    n_bootstrap : 0: no intervals; otherwise intervals are computed (and, with
        ``interval_method="bootstrap"``, this many bootstrap replicates R are drawn).
    n_permutations : permutations P for p-values (0: none; minibatch estimator only).
    seed : seeds the bootstrap counts (``default_rng(seed)``) and the permutations of batch k
        (``default_rng([seed, k])``).
    pairs : ``"all"`` (every unordered pair a < b in study order, plus self-pairs when
        ``include_self``) or a list of (model_a, model_b) name pairs (a == b allowed).
    include_self : with ``pairs="all"``, also compare each model with itself.
    device : ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    overwrite : replace an existing ckapipe result at ``out`` (anything else is never deleted).
    interval_method : minibatch intervals over batches: ``"jackknife"`` (delete-one-batch, t
        quantiles; reported from 4 batches) or ``"bootstrap"`` (percentile; reported from 128
        batches, below which its measured coverage falls short). See docs/STATISTICS.md.
    measures : similarity measures to compute, e.g. ``("cka", "rsa", "procrustes", "cca")``
        (names in :data:`ckapipe.analyze.measures.MEASURES`; docs/MEASURES.md). Anything but
        ``cka`` needs full caches; the result then holds them in ``measure_values`` (one column
        each in the CSV) and ``PairResult.measures``. ``cka`` alone (default): CKA only.
    measure_options : their settings (:class:`~ckapipe.analyze.measures.MeasureOptions`:
        rank tolerance, SVCCA variance kept, k of mutual k-NN).
    architectures : model name → declared architecture (e.g. ``{"mlp_s0": "mlp"}``), recorded in
        the result (root attribute ``architectures``) so that ``ckapipe plot`` and the report
        group models by it without being told again. Models not named are of their factory's
        architecture (:data:`ckapipe.utils.ARCHITECTURE_RULE`).

    Returns
    -------
    StudyResult (the same values :func:`load_result` reads back).

    Raises
    ------
    StudyError
        Incompatible caches (naming the first mismatch and the two models), a wrong estimator for
        the caches' mode, bad names or pairs, or an existing ``out``.
    """
    estimator = choice(estimator, ESTIMATORS, "estimator")
    interval_method = choice(interval_method, INTERVAL_METHODS, "interval_method")
    if not 0.0 < ci_level < 1.0:
        raise StudyError(f"ci_level must be in (0, 1), e.g. 0.95; got {ci_level!r}")
    if n_bootstrap < 0 or n_permutations < 0:
        raise StudyError(
            f"n_bootstrap and n_permutations must be >= 0, got {n_bootstrap} and {n_permutations}"
        )
    if seed < 0:
        raise StudyError(f"seed must be >= 0, got {seed}")
    try:
        measures = parse_measures(measures)
    except ValueError as error:
        raise StudyError(str(error)) from None
    out = Path(out)
    check_out(out, overwrite)
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
            interval_method=interval_method,
            measures=measures,
            measure_options=measure_options or MeasureOptions(),
            architectures=architectures,
        )
        # the provenance as stored (JSON-normalised, with the completion flag), as load_result
        # gives it
        study.provenance = write(study)
    return study


def _declared_architectures(
    architectures: Mapping[str, str] | None, models: Sequence[str]
) -> dict[str, str]:
    """``architectures`` checked against the study's models, in study order."""
    declared = dict(architectures or {})
    unknown = sorted(set(declared) - set(models))
    if unknown:
        raise StudyError(
            f"architectures given for model(s) {', '.join(unknown)} that the study does not "
            f"have (its models: {', '.join(models)}); check --architecture MODEL=NAME"
        )
    for name, architecture in declared.items():
        if not isinstance(architecture, str) or not architecture.strip():
            raise StudyError(
                f"architecture of model {name!r} must be a non-empty name, got {architecture!r}"
            )
    return {name: declared[name].strip() for name in models if name in declared}


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
    interval_method: str,
    measures: list[str],
    measure_options: MeasureOptions,
    architectures: Mapping[str, str] | None = None,
) -> StudyResult:
    """Everything :func:`analyze_study` computes, with its arguments checked; nothing written."""
    caches = [open_cache(c) for c in gram_caches]
    if not caches:
        raise StudyError("no Gram caches given: pass one cache per model")
    study_models = model_names(caches, names)
    check_compatible(caches, study_models)
    declared = _declared_architectures(architectures, study_models)
    check_estimator(estimator, caches[0].mode)
    if measures != ["cka"] and caches[0].mode != "full":
        raise StudyError(
            f"measures {', '.join(m for m in measures if m != 'cka')} need the exact n x n Grams "
            "of full-mode caches (they have no minibatch form); build the caches with "
            "`ckapipe gram --mode full` and use --estimator debiased or biased, or ask for cka "
            "only"
        )
    if measures != ["cka"]:
        rounded = [
            name
            for name, cache in zip(study_models, caches, strict=True)
            if cache.attrs.get("storage_dtype") != "float64"
        ]
        if rounded:
            raise StudyError(
                f"measures {', '.join(m for m in measures if m != 'cka')} need Grams stored in "
                f"float64, but the caches of {', '.join(rounded)} hold float32 tiles: their "
                "rounding (about 1e-7 of the largest entry) looks like extra dimensions to CCA, "
                "Procrustes and regression; rebuild each with `ckapipe gram STORE --mode full "
                "--storage float64 --overwrite --out CACHE` (the pipeline does this when "
                "analysis.measures asks for more than cka)"
            )
    requested = resolve_pairs(pairs, study_models, include_self)
    torch_device = resolve_device(device, error=StudyError)
    by_name = dict(zip(study_models, caches, strict=True))
    layers = {name: list(cache.layer_names) for name, cache in by_name.items()}
    options = {
        "estimator": estimator,
        "ci_level": float(ci_level),
        "n_bootstrap": int(n_bootstrap),
        "n_permutations": int(n_permutations),
        "seed": int(seed),
        "interval_method": interval_method if caches[0].mode == "minibatch" else "block-jackknife",
    }
    provenance = _provenance(by_name, layers, requested, torch_device, options)
    provenance["architectures"] = declared
    if caches[0].mode == "minibatch":
        kernel, threshold = minibatch_kernel(caches[0], kernel, threshold)
        provenance.update(kernel=kernel, threshold=threshold)
        if n_permutations > 0:
            provenance["permutation_scheme"] = PERMUTATION_SCHEME
        results = minibatch_pairs(
            by_name,
            layers,
            requested,
            ci_level=ci_level,
            n_bootstrap=n_bootstrap,
            n_permutations=n_permutations,
            seed=seed,
            device=torch_device,
            interval_method=interval_method,
        )
    else:
        kernel, threshold = full_kernel(caches[0], kernel, threshold, n_permutations)
        provenance.update(kernel=kernel, threshold=threshold)
        results, bandwidths = full_pairs(
            by_name,
            layers,
            requested,
            biased=estimator == "biased",
            kernel=kernel,
            threshold=threshold,
            device=torch_device,
            ci_level=ci_level if n_bootstrap > 0 else None,
        )
        for name, sigma2 in bandwidths.items() if kernel == "rbf" else ():
            provenance["models"][name]["rbf_sigma2"] = sigma2
        if measures != ["cka"]:
            _add_measures(results, by_name, layers, requested, measures, measure_options)
            provenance["measures"] = measures
            provenance["measure_options"] = asdict(measure_options)
    if kernel == "rbf":
        provenance["bandwidth_rule"] = BANDWIDTH_RULE
    return StudyResult(models=study_models, pairs=results, provenance=provenance, path=out)


def _add_measures(
    results: dict[tuple[str, str], PairResult],
    by_name: dict[str, GramCache],
    layers: dict[str, list[str]],
    requested: Sequence[tuple[str, str]],
    measures: list[str],
    options: MeasureOptions,
) -> None:
    """Fill every pair's ``measures``: ``cka`` is the pair's CKA estimate, the others come from
    one pass over the cached Grams (:func:`~ckapipe.analyze.measure_pairs.measure_pairs`)."""
    computed = measure_pairs(by_name, layers, requested, measures, options)
    for key, pair in results.items():
        values = computed[key]
        pair.measures = {
            name: np.array(pair.cka, dtype=np.float64) if name == "cka" else values[name]
            for name in measures
        }


def _provenance(
    by_name: dict[str, GramCache],
    layers: dict[str, list[str]],
    requested: Sequence[tuple[str, str]],
    device: torch.device,
    options: dict[str, Any],
) -> dict[str, Any]:
    """The result's record of its inputs and options (kernel and threshold: added by the
    caller once checked against the caches)."""
    first = next(iter(by_name.values()))
    return {
        "format": RESULT_FORMAT,
        "format_version": RESULT_FORMAT_VERSION,
        **options,
        "mode": first.mode,
        "models": {
            name: {
                "store": (cache.identity or {}).get("path"),
                "gram_cache": str(cache_path(cache)),
                "identity": jsonable(cache.identity),
                "layers": layers[name],
                "gram_cache_attrs": jsonable(cache_settings(cache)),
            }
            for name, cache in by_name.items()
        },
        "pairs": [[a, b] for a, b in requested],
        "partition": jsonable(first.partition),
        "batches": [int(b) for b in first.batches] if first.mode == "minibatch" else [],
        "device": str(device),
        "versions": versions(),
        "created": now(),
    }
