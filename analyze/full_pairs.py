"""Exact (full-mode) CKA of every requested model pair from tiled full Gram caches.

Nothing of size n² is held: every pass streams the stored tiles (I ≤ J) of the upper triangle
(:class:`~ckapipe.analyze.tile_grid.TileGrid`), an off-diagonal tile standing for itself and its
transpose.

Pass 1, per layer: the diagonal of the linear Gram (from the diagonal tiles), for RBF the exact
median squared distance (:class:`~ckapipe.analyze.estimators.StreamedMedian`, up to 4 more
passes), and the row sums of the kernel matrix, all in float64: the centering statistics
(:meth:`~ckapipe.analyze.estimators.FullCentering.from_sums`). Pass 2, tile position by tile
position: that tile of every layer of every model, kernel applied and centered in float64,
stacked into one (ΣL, a·b) matrix; its product with itself adds ⟨C(K_i), C(K_j)⟩ over the tile
(twice for an off-diagonal tile) for every layer pair at once. Debiased intervals: the
delete-one-block jackknife (:meth:`~ckapipe.analyze.intervals.FullBlockJackknife.update_tile`)
from the same tiles. Memory: ΣL tiles of T² float64 and (ΣL, n, 16) block sums.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ckapipe.analyze.estimators import (
    FullCentering,
    StreamedMedian,
    hsic_normaliser,
    kernel_tile,
    ratio_cka,
    squared_distance_tile,
)
from ckapipe.analyze.intervals import FullBlockJackknife
from ckapipe.analyze.pair_common import degenerate_layers, interval_record
from ckapipe.analyze.result import PairResult
from ckapipe.analyze.study_checks import StudyError

if TYPE_CHECKING:
    from ckapipe.analyze.gram_format import GramCache
    from ckapipe.analyze.tile_grid import TileGrid

__all__ = ["full_pairs"]

_UNDEFINED_BANDWIDTH = (
    "the median squared distance between samples is 0 (constant layer, or more than half of "
    "the sample pairs identical), so the RBF bandwidth is undefined; use kernel='linear' for "
    "this layer"
)


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
    """Exact HSIC₁ (or HSIC₀) of every layer pair of every requested pair from tiled full Grams.

    Pass 1 (per layer, streamed tiles): the centering statistics and, for RBF, the bandwidth.
    Pass 2 (per tile position): that tile of every layer centered and stacked, one product.
    """
    used = [name for name in caches if any(name in pair for pair in requested)]
    n = int(next(iter(caches.values())).identity["n_samples"])
    if not biased and n < 4:
        raise StudyError(f"debiased CKA needs at least 4 samples, the stores hold {n}")
    grid = _common_grid(caches, used, n)
    stats: dict[tuple[str, str], FullCentering] = {}
    for name in used:
        for layer in layers[name]:
            try:
                stats[(name, layer)] = _centering(
                    caches[name],
                    layer,
                    grid,
                    biased=biased,
                    kernel=kernel,
                    threshold=threshold,
                    device=device,
                )
            except ValueError as error:  # an undefined RBF bandwidth: name the layer
                raise StudyError(f"model {name!r} layer {layer!r}: {error}") from error
    bandwidths: dict[str, dict[str, float]] = {}
    for (name, layer), centering in stats.items() if kernel == "rbf" else ():
        bandwidths.setdefault(name, {})[layer] = float(centering.sigma2)
    rows_of = list(stats)  # (model, layer), model after model
    # the block jackknife accumulates ⟨·,·⟩ per sample block, so it also yields the exact inner
    # products; HSIC₀ has no interval (its delete-one values would need other terms)
    jackknife = None if biased or ci_level is None else FullBlockJackknife(n, len(rows_of))
    inner = _inner_products(caches, stats, grid, jackknife, device) * hsic_normaliser(
        n, biased=biased
    )
    position = {key: index for index, key in enumerate(rows_of)}
    results = {}
    for a, b in requested:
        ia = [position[(a, layer)] for layer in layers[a]]
        ib = [position[(b, layer)] for layer in layers[b]]
        results[(a, b)] = _pair_result(
            a, b, layers, inner, ia, ib, jackknife, ci_level=ci_level, biased=biased, n=n
        )
    return results, bandwidths


def _common_grid(caches: Mapping[str, GramCache], used: Sequence[str], n: int) -> TileGrid:
    """The tile grid all caches share; partial or differently tiled caches are refused."""
    grids = {}
    for name in used:
        cache = caches[name]
        if cache.is_partial:
            a, b = cache.tile_rows
            raise StudyError(
                f"model {name!r}: {cache.path} is a partial full-mode cache (tile rows {a}:{b} "
                f"of {cache.tile_grid.count}); merge all tile jobs first (`ckapipe merge-grams`)"
            )
        grids[name] = cache.tile_grid
    first = next(iter(grids.values()))
    for name, grid in grids.items():
        if grid != first or grid.n != n:
            raise StudyError(
                f"model {name!r}: its Gram tiles ({grid.tile} rows, n = {grid.n}) differ from "
                f"the first model's ({first.tile}, n = {first.n}); rebuild the caches with the "
                "same --tile-size"
            )
    return first


def _tiles(cache: GramCache, layer: str, grid: TileGrid, device: torch.device, pairs=None):
    """Yield (row0, col0, weight, linear Gram tile as float64 on ``device``) of stored tiles."""
    for row, col in grid.pairs if pairs is None else pairs:
        tile = torch.from_numpy(cache.read_tile(layer, row, col)).to(device)
        yield grid.span(row)[0], grid.span(col)[0], 1 if row == col else 2, tile


def _centering(
    cache: GramCache,
    layer: str,
    grid: TileGrid,
    *,
    biased: bool,
    kernel: str,
    threshold: float,
    device: torch.device,
) -> FullCentering:
    """Pass 1 for one layer: streamed diagonal, (RBF) median bandwidth and kernel row sums."""
    n = grid.n
    diagonal = torch.zeros(n, dtype=torch.float64, device=device)
    for row0, _, _, tile in _tiles(cache, layer, grid, device, [(i, i) for i in range(grid.count)]):
        diagonal[row0 : row0 + tile.shape[0]] = torch.diagonal(tile)
    sigma2 = float("nan")
    if kernel == "rbf":
        median = StreamedMedian(n * n)  # all n² squared distances, diagonal zeros included
        while not median.done:
            for row0, col0, weight, tile in _tiles(cache, layer, grid, device):
                median.add(squared_distance_tile(tile, row0, col0, diagonal), weight)
            median.next_pass()
        if not median.value > 0:
            raise ValueError(_UNDEFINED_BANDWIDTH)
        sigma2 = threshold**2 * median.value
    row_sums = torch.zeros(n, dtype=torch.float64, device=device)
    kernel_diagonal = torch.zeros(n, dtype=torch.float64, device=device)
    for row0, col0, weight, tile in _tiles(cache, layer, grid, device):
        kmat = kernel_tile(tile, row0, col0, kernel, diagonal, sigma2)
        a, b = kmat.shape
        row_sums[row0 : row0 + a] += kmat.sum(dim=1)
        if weight == 2:  # the transposed tile below the diagonal
            row_sums[col0 : col0 + b] += kmat.sum(dim=0)
        else:
            kernel_diagonal[row0 : row0 + a] = torch.diagonal(kmat)
    return FullCentering.from_sums(
        row_sums, kernel_diagonal, diagonal, biased=biased, kernel=kernel, sigma2=sigma2
    )


def _inner_products(
    caches: Mapping[str, GramCache],
    stats: Mapping[tuple[str, str], FullCentering],
    grid: TileGrid,
    jackknife: FullBlockJackknife | None,
    device: torch.device,
) -> np.ndarray:
    """Pass 2: (ΣL, ΣL) ⟨C(K_i), C(K_j)⟩ of every layer of every model (unscaled), tile
    position by tile position, from that tile of every layer stacked (or through ``jackknife``)."""
    rows_of = list(stats)
    total_layers = len(rows_of)
    inner = torch.zeros(total_layers, total_layers, dtype=torch.float64, device=device)
    for row, col in grid.pairs:
        (r0, r1), (c0, c1) = grid.span(row), grid.span(col)
        centered = torch.empty(total_layers, r1 - r0, c1 - c0, dtype=torch.float64, device=device)
        for index, (name, layer) in enumerate(rows_of):
            tile = torch.from_numpy(caches[name].read_tile(layer, row, col)).to(device)
            centered[index] = stats[(name, layer)].center_tile(tile, r0, c0)
        if jackknife is None:
            flat = centered.reshape(total_layers, -1)  # (ΣL, a·b)
            inner += (1.0 if row == col else 2.0) * (flat @ flat.T)  # (ΣL, ΣL)
        else:
            jackknife.update_tile(centered, r0, c0, mirrored=row != col)
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
