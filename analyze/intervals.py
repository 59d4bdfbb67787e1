"""Uncertainty of minibatch CKA: bootstrap intervals over batches and permutation p-values.

Pure numpy functions of the per-batch HSIC₁ values that a :class:`MinibatchCKA` keeps
(``per_batch()``) or a result stores (``hsic_per_batch`` …). Nothing here reads files or
touches a device.

Bootstrap over minibatches
--------------------------
The minibatches of one epoch are disjoint random subsets of the samples, so their HSIC₁
values are independent, unbiased estimates. A bootstrap replicate draws B batch indices with
replacement (multinomial counts c, shape (B,)) and recomputes

    CKA*_ij = Σ_b c_b HSIC₁(K_bi, L_bj) / sqrt(Σ_b c_b HSIC₁(K_bi, K_bi) · Σ_b c_b HSIC₁(L_bj, L_bj))

with the cross and the self terms resampled together (the same c). All replicates are one
product ``counts (R, B) @ per_batch (B, …)``, vectorized over layer pairs. The interval is
the percentile interval of the replicates at ``ci_level`` (numpy's linear quantile).
Replicates whose resampled self-HSIC is not positive have no CKA; they are left out of the
quantiles and counted, and the caller reports the count as a diagnostic.

Caveat: with several epochs the batches of different epochs share samples and are no longer
independent, so the intervals come out too narrow; :func:`bootstrap_cka` cannot see that and
the caller reports it.

Permutation p-values
--------------------
Under independence of the two representations, permuting the samples of model b within each
batch leaves the distribution of the statistic unchanged. With P permuted statistics T*_k
and the observed T, the one-sided p-value (dependence makes CKA larger) is
p = (1 + #{k: T*_k ≥ T}) / (1 + P), never 0 (Phipson & Smyth 2010).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BootstrapInterval",
    "bootstrap_counts",
    "bootstrap_cka",
    "nonpositive_self_hsic",
    "percentile_interval",
    "permutation_p_value",
    "ratio_cka",
]

# Bound on the float64 elements of one (R, chunk of layer pairs) block of replicates (~128 MiB).
_REPLICATE_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class BootstrapInterval:
    """Percentile bootstrap interval of every layer pair.

    Attributes
    ----------
    low, high : (La, Lb) float64 interval bounds; NaN where no replicate had a CKA.
    n_undefined : (La, Lb) int64, replicates without a CKA (a resampled self-HSIC ≤ 0),
        left out of the quantiles.
    n_bootstrap : number of replicates R.
    ci_level : nominal coverage, e.g. 0.95.
    """

    low: np.ndarray
    high: np.ndarray
    n_undefined: np.ndarray
    n_bootstrap: int
    ci_level: float


def ratio_cka(hsic: np.ndarray, self_a: np.ndarray, self_b: np.ndarray) -> np.ndarray:
    """CKA = hsic / sqrt(self_a ⊗ self_b), NaN where a self term is not positive (no warning).

    Parameters
    ----------
    hsic : (..., La, Lb) cross HSIC (sums over batches).
    self_a : (..., La) self-HSIC of model a's layers.
    self_b : (..., Lb) self-HSIC of model b's layers.

    Returns
    -------
    ndarray (..., La, Lb) float64. Never clamped: values outside [-1, 1] are possible for an
    unbiased estimate and are returned as they are.
    """
    hsic = np.asarray(hsic, dtype=np.float64)
    root_a = np.sqrt(np.where(self_a > 0, self_a, np.nan))
    root_b = np.sqrt(np.where(self_b > 0, self_b, np.nan))
    return hsic / (root_a[..., :, None] * root_b[..., None, :])


def bootstrap_counts(n_batches: int, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """Multinomial resampling counts: row r says how often replicate r draws each batch.

    Parameters
    ----------
    n_batches : B ≥ 1.
    n_bootstrap : R ≥ 1.
    rng : the generator to draw from.

    Returns
    -------
    ndarray (R, B) float64 of non-negative integers, each row summing to B.
    """
    if n_batches < 1 or n_bootstrap < 1:
        raise ValueError(
            f"bootstrap_counts: need n_batches >= 1 and n_bootstrap >= 1, got {n_batches} and "
            f"{n_bootstrap}"
        )
    draws = rng.integers(0, n_batches, size=(n_bootstrap, n_batches))
    counts = np.zeros((n_bootstrap, n_batches), dtype=np.float64)
    np.add.at(counts, (np.arange(n_bootstrap)[:, None], draws), 1.0)
    return counts


def percentile_interval(replicates: np.ndarray, ci_level: float) -> tuple[np.ndarray, np.ndarray]:
    """Equal-tailed percentile interval over axis 0, ignoring NaN replicates.

    Parameters
    ----------
    replicates : (R, ...) float64.
    ci_level : in (0, 1).

    Returns
    -------
    low, high : (...) float64; NaN where every replicate is NaN.
    """
    _check_level(ci_level)
    alpha = (1.0 - ci_level) / 2.0
    replicates = np.asarray(replicates, dtype=np.float64)
    shape = replicates.shape[1:]
    low = np.full(shape, np.nan)
    high = np.full(shape, np.nan)
    missing = np.isnan(replicates)
    complete = ~missing.any(axis=0)
    partial = missing.any(axis=0) & ~missing.all(axis=0)
    # np.quantile is vectorized; np.nanquantile loops over columns, so only the columns with
    # some NaN go there (and none that are all NaN: it would warn)
    for columns, quantile in ((complete, np.quantile), (partial, np.nanquantile)):
        if columns.any():
            bounds = quantile(replicates[:, columns], [alpha, 1.0 - alpha], axis=0)
            low[columns], high[columns] = bounds[0], bounds[1]
    return low, high


def bootstrap_cka(
    hsic_per_batch: np.ndarray,
    self_a_per_batch: np.ndarray,
    self_b_per_batch: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    ci_level: float = 0.95,
    rng: np.random.Generator | int | None = 0,
    counts: np.ndarray | None = None,
) -> BootstrapInterval:
    """Percentile bootstrap interval of minibatch CKA, resampling whole batches.

    Parameters
    ----------
    hsic_per_batch : (B, La, Lb) HSIC₁ of every layer pair in every batch.
    self_a_per_batch : (B, La) HSIC₁(K, K) of model a's layers per batch.
    self_b_per_batch : (B, Lb) HSIC₁(L, L) of model b's layers per batch.
    n_bootstrap : R, the number of replicates (ignored when ``counts`` is given).
    ci_level : nominal coverage in (0, 1).
    rng : a generator or a seed for :func:`numpy.random.default_rng`.
    counts : optional (R, B) resampling counts (:func:`bootstrap_counts`); pass the same
        counts to every model pair of a study for a joint bootstrap.

    Returns
    -------
    BootstrapInterval

    Raises
    ------
    ValueError
        For fewer than 2 batches (one batch has no spread to resample) or shapes that do not fit.
    """
    _check_level(ci_level)
    hsic = np.asarray(hsic_per_batch, dtype=np.float64)
    self_a = np.asarray(self_a_per_batch, dtype=np.float64)
    self_b = np.asarray(self_b_per_batch, dtype=np.float64)
    if (
        hsic.ndim != 3
        or self_a.shape != hsic.shape[:2]
        or self_b.shape
        != (
            hsic.shape[0],
            hsic.shape[2],
        )
    ):
        raise ValueError(
            f"bootstrap_cka: shapes do not fit: hsic_per_batch {hsic.shape} must be (B, La, Lb), "
            f"self_a_per_batch {self_a.shape} (B, La), self_b_per_batch {self_b.shape} (B, Lb)"
        )
    n_batches, la, lb = hsic.shape
    if n_batches < 2:
        raise ValueError(
            f"bootstrap_cka: {n_batches} batch(es); a bootstrap over batches needs at least 2 "
            "(use a smaller --batch-size when building the Gram cache)"
        )
    if counts is None:
        generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        counts = bootstrap_counts(n_batches, n_bootstrap, generator)
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[1] != n_batches:
        raise ValueError(
            f"bootstrap_cka: counts must be (R, {n_batches}), got shape {counts.shape}"
        )
    replicates_a = counts @ self_a  # (R, La)
    replicates_b = counts @ self_b  # (R, Lb)
    flat = hsic.reshape(n_batches, la * lb)  # (B, La*Lb)
    low = np.empty(la * lb)
    high = np.empty(la * lb)
    undefined = np.empty(la * lb, dtype=np.int64)
    rows, cols = np.divmod(np.arange(la * lb), lb)  # layer indices of each flattened pair
    step = max(1, _REPLICATE_ELEMENTS // counts.shape[0])
    for start in range(0, la * lb, step):
        part = slice(start, start + step)
        cross = counts @ flat[:, part]  # (R, chunk)
        sa = replicates_a[:, rows[part]]  # (R, chunk)
        sb = replicates_b[:, cols[part]]  # (R, chunk)
        with np.errstate(invalid="ignore"):
            denominator = np.sqrt(np.where(sa > 0, sa, np.nan) * np.where(sb > 0, sb, np.nan))
        replicates = cross / denominator  # (R, chunk)
        undefined[part] = np.isnan(replicates).sum(axis=0)
        low[part], high[part] = percentile_interval(replicates, ci_level)
    return BootstrapInterval(
        low=low.reshape(la, lb),
        high=high.reshape(la, lb),
        n_undefined=undefined.reshape(la, lb),
        n_bootstrap=int(counts.shape[0]),
        ci_level=float(ci_level),
    )


def permutation_p_value(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """One-sided permutation p-value p = (1 + #{null ≥ observed}) / (1 + P).

    Parameters
    ----------
    observed : (...) the statistic on the data, e.g. (La, Lb) CKA.
    null : (P, ...) the statistic on P permutations.

    Returns
    -------
    ndarray (...) float64 in [1/(P+1), 1]; NaN where ``observed`` is NaN.
    """
    observed = np.asarray(observed, dtype=np.float64)
    null = np.asarray(null, dtype=np.float64)
    if null.shape[1:] != observed.shape or null.shape[0] < 1:
        raise ValueError(
            f"permutation_p_value: null must be (P, *{observed.shape}) with P >= 1, "
            f"got {null.shape}"
        )
    exceed = (null >= observed[None]).sum(axis=0)
    p = (1.0 + exceed) / (1.0 + null.shape[0])
    return np.where(np.isnan(observed), np.nan, p)


def nonpositive_self_hsic(self_hsic: np.ndarray, layers: Sequence[str], model: str) -> list[str]:
    """Diagnostics for layers whose summed self-HSIC is zero, negative or NaN.

    Parameters
    ----------
    self_hsic : (L,) summed self-HSIC of one model's layers.
    layers : the L layer names.
    model : the model name, for the message.

    Returns
    -------
    list of str, one per degenerate layer (empty when every self-HSIC is positive).
    """
    messages = []
    for name, value in zip(layers, np.asarray(self_hsic, dtype=np.float64), strict=True):
        if value > 0:
            continue
        if np.isnan(value):
            why = "is NaN"
        elif value == 0:
            why = "is 0 (constant or all-zero activations)"
        else:
            why = f"is negative ({value:.6g}; an unbiased estimate below zero, not clamped)"
        messages.append(f"model {model!r} layer {name!r}: self-HSIC {why}; its CKA entries are NaN")
    return messages


def _check_level(ci_level: float) -> None:
    if not 0.0 < ci_level < 1.0:
        raise ValueError(f"ci_level must be in (0, 1), e.g. 0.95; got {ci_level!r}")
