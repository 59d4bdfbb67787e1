"""Exact (full-mode) CKA of every requested model pair from full Gram caches.

Pass 1, one layer at a time (O(n²) memory): the centering statistics
(:class:`~ckapipe.analyze.estimators.FullCentering`) and, for RBF, the bandwidth. Pass 2: row
blocks of every layer's centered kernel matrix stacked into one (ΣL, rows·n) matrix; its
product with itself accumulates ⟨C(K_i), C(K_j)⟩ for every layer of every model at once.
Debiased intervals: the delete-one-block jackknife
(:class:`~ckapipe.analyze.intervals.FullBlockJackknife`) from the same row blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import zarr

from ckapipe.analyze.estimators import FullCentering, hsic_normaliser, ratio_cka
from ckapipe.analyze.intervals import FullBlockJackknife
from ckapipe.analyze.pair_common import WORK_ELEMENTS, degenerate_layers, interval_record
from ckapipe.analyze.result import PairResult
from ckapipe.analyze.study_checks import StudyError, cache_path

if TYPE_CHECKING:
    from ckapipe.analyze.gram_format import GramCache

__all__ = ["full_pairs"]


def full_pairs(
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
    stats = _centering_pass(
        caches, used, layers, n, biased=biased, kernel=kernel, threshold=threshold, device=device
    )
    bandwidths: dict[str, dict[str, float]] = {}
    for (name, layer), centering in stats.items() if kernel == "rbf" else ():
        bandwidths.setdefault(name, {})[layer] = float(centering.sigma2)
    rows_of = list(stats)  # (model, layer), model after model
    # the block jackknife accumulates ⟨·,·⟩ per sample block, so it also yields the exact inner
    # products; HSIC₀ has no interval (its delete-one values would need other terms)
    jackknife = None if biased or ci_level is None else FullBlockJackknife(n, len(rows_of))
    inner = _inner_products(caches, stats, n, jackknife, device) * hsic_normaliser(n, biased=biased)
    position = {key: index for index, key in enumerate(rows_of)}
    results = {}
    for a, b in requested:
        ia = [position[(a, layer)] for layer in layers[a]]
        ib = [position[(b, layer)] for layer in layers[b]]
        results[(a, b)] = _pair_result(
            a, b, layers, inner, ia, ib, jackknife, ci_level=ci_level, biased=biased, n=n
        )
    return results, bandwidths


def _centering_pass(
    caches: Mapping[str, GramCache],
    used: Sequence[str],
    layers: Mapping[str, list[str]],
    n: int,
    *,
    biased: bool,
    kernel: str,
    threshold: float,
    device: torch.device,
) -> dict[tuple[str, str], FullCentering]:
    """Pass 1: each layer's centering statistics, one n×n Gram in memory at a time."""
    stats: dict[tuple[str, str], FullCentering] = {}
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
            del gram
    return stats


def _inner_products(
    caches: Mapping[str, GramCache],
    stats: Mapping[tuple[str, str], FullCentering],
    n: int,
    jackknife: FullBlockJackknife | None,
    device: torch.device,
) -> np.ndarray:
    """Pass 2: (ΣL, ΣL) ⟨C(K_i), C(K_j)⟩ of every layer of every model (unscaled), from row
    blocks of all centered kernel matrices stacked into one matrix (or through ``jackknife``)."""
    rows_of = list(stats)
    total_layers = len(rows_of)
    block = max(1, min(n, max(n // total_layers, WORK_ELEMENTS // (total_layers * n))))
    inner = torch.zeros(total_layers, total_layers, dtype=torch.float64, device=device)
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
    return inner.cpu().numpy() if jackknife is None else jackknife.inner()


def _pair_result(
    a: str,
    b: str,
    layers: Mapping[str, list[str]],
    inner: np.ndarray,
    ia: list[int],
    ib: list[int],
    jackknife: FullBlockJackknife | None,
    *,
    ci_level: float | None,
    biased: bool,
    n: int,
) -> PairResult:
    """One pair's exact CKA and interval from the scaled inner products (rows ``ia``, ``ib``)."""
    hsic = inner[np.ix_(ia, ib)]
    self_a, self_b = np.diag(inner)[ia], np.diag(inner)[ib]
    diagnostics = degenerate_layers(self_a, self_b, layers, a, b)
    ci_low, ci_high = np.full(hsic.shape, np.nan), np.full(hsic.shape, np.nan)
    method, note = "none", None
    if jackknife is not None:
        interval = jackknife.interval(ia, ib, ci_level)
        ci_low, ci_high = interval.low, interval.high
        method, note = interval_record(interval)
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
    return PairResult(
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


def _full_gram_rows(cache: GramCache, layer: str, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a full-mode cached Gram (``grams/<layer>``, chunked in row
    blocks per the Gram cache format), read without loading the whole matrix."""
    group = zarr.open_group(str(cache_path(cache)), mode="r")
    return group["grams"][layer][start:stop, :]
