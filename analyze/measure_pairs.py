"""Every requested similarity measure for every layer pair of every model pair, from full caches.

One pass over the cached Grams: each layer's (n, n) linear Gram is read once
(:func:`read_full_gram`, one Gram in memory at a time) and reduced to its
:class:`~ckapipe.analyze.measures.LayerGeometry` (spectrum, and RDM ranks / k-NN sets when
``rsa_spearman`` / ``knn`` are asked for); every pair's measures are then products of those
(:func:`~ckapipe.analyze.measures.pairwise_measures`). ``cka`` is not recomputed here: it is the
study's own CKA estimate (:mod:`ckapipe.analyze.full_pairs`), copied in by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ckapipe.analyze.gram_format import read_full_gram
from ckapipe.analyze.measures import (
    GRAM_MEASURES,
    LayerGeometry,
    MeasureOptions,
    pairwise_measures,
)
from ckapipe.analyze.study_checks import StudyError

if TYPE_CHECKING:
    from ckapipe.analyze.gram_format import GramCache

__all__ = ["measure_pairs"]


def measure_pairs(
    caches: Mapping[str, GramCache],
    layers: Mapping[str, list[str]],
    requested: Sequence[tuple[str, str]],
    measures: Sequence[str],
    options: MeasureOptions,
) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """{(model_a, model_b): {measure: (La, Lb) float64}} for the Gram measures in ``measures``.

    ``measures`` may include ``cka``; it is skipped here (the caller has it). Each model's layers
    are reduced once, whatever the number of pairs they appear in.
    """
    wanted = [name for name in measures if name in GRAM_MEASURES]
    if not wanted:
        return {pair: {} for pair in requested}
    used = [name for name in caches if any(name in pair for pair in requested)]
    n = int(next(iter(caches.values())).identity["n_samples"])
    if "knn" in wanted and options.knn_k >= n:
        raise StudyError(
            f"knn with k = {options.knn_k} neighbours needs more than {options.knn_k} samples, "
            f"the stores hold {n}; choose a smaller --knn-k"
        )
    geometries: dict[str, list[LayerGeometry]] = {}
    for name in used:
        geometries[name] = []
        for layer in layers[name]:
            gram = read_full_gram(caches[name], layer)
            if gram.shape != (n, n):
                raise StudyError(
                    f"model {name!r} layer {layer!r}: full Gram has shape {gram.shape}, "
                    f"expected ({n}, {n}); rebuild the cache"
                )
            geometries[name].append(
                LayerGeometry.from_gram(
                    gram,
                    f"{name}/{layer}",
                    options=options,
                    spearman="rsa_spearman" in wanted,
                    knn="knn" in wanted,
                )
            )
            del gram
    return {
        (a, b): pairwise_measures(geometries[a], geometries[b], wanted, options)
        for a, b in requested
    }
