"""Uncertainty of CKA: intervals over batches (or sample blocks) and permutation p-values.

Numpy functions of the per-batch HSIC₁ values that a :class:`MinibatchCKA` keeps
(``per_batch()``) or a result stores (``hsic_per_batch`` …). Nothing here reads files; only
:class:`FullBlockJackknife` reduces Gram rows where they are (numpy or a torch device).

Which interval
--------------
:func:`batch_interval` is what a study calls. Its default, the delete-one-batch jackknife with
t quantiles on B − 1 degrees of freedom (:func:`jackknife_cka`), is the method whose coverage
bench/coverage.py measured within 5 points of nominal from 2 batches on; the percentile
bootstrap below needs about 128 batches for that (at 4 batches it covers 73–82 % for a
nominal 95 %). Below ``MIN_BATCHES_FOR_INTERVAL`` batches, or with batches of several epochs,
the interval is withheld: NaN bounds and a reason string. Method and numbers:
docs/STATISTICS.md. Full mode: :class:`FullBlockJackknife`.

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

import functools
from dataclasses import dataclass

import numpy as np

# the CKA ratio and the degenerate-layer wording are the estimators'; re-exported here
from ckapipe.analyze.cka_ratio import broadcast_ratio_cka, nonpositive_self_hsic, ratio_cka

__all__ = [
    "DEFAULT_INTERVAL_METHOD",
    "INTERVAL_METHODS",
    "MIN_BATCHES_FOR_INTERVAL",
    "BootstrapInterval",
    "FULL_MODE_BLOCKS",
    "FullBlockJackknife",
    "Interval",
    "batch_interval",
    "deleted_cka",
    "jackknife_interval",
    "jackknife_se_of_values",
    "sample_blocks",
    "bootstrap_counts",
    "bootstrap_cka",
    "jackknife_cka",
    "student_t_quantile",
    "nonpositive_self_hsic",
    "null_threshold",
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
    hsic, self_a, self_b = _check_per_batch(
        hsic_per_batch, self_a_per_batch, self_b_per_batch, "bootstrap_cka: "
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
        replicates = broadcast_ratio_cka(cross, sa, sb)  # (R, chunk)
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


def null_threshold(null: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """The value the statistic must exceed for p ≤ alpha under the permutation null.

    With p = (1 + #{null ≥ T}) / (1 + P), p ≤ alpha holds exactly when at most
    k = ⌊alpha (P + 1)⌋ − 1 null values are ≥ T, i.e. when T is above the (k+1)-th largest null
    value; that order statistic is returned (about the 95th percentile of the null for
    alpha = 0.05), so "CKA > threshold" and "p ≤ alpha" agree. It tells a reader what CKA
    unrelated representations reach with this many samples and this width. +inf where
    P is too small for any p ≤ alpha (k < 0); NaN where the null is NaN.

    Parameters
    ----------
    null : (P, ...) the statistic on P permutations, e.g. (P, La, Lb) CKA.
    alpha : the level, in (0, 1).

    Returns
    -------
    ndarray (...) float64.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"null_threshold: alpha must be in (0, 1), got {alpha!r}")
    null = np.asarray(null, dtype=np.float64)
    if null.ndim < 1 or null.shape[0] < 1:
        raise ValueError(f"null_threshold: null must be (P, ...) with P >= 1, got {null.shape}")
    n_perm = null.shape[0]
    k = int(np.floor(alpha * (n_perm + 1) + 1e-9)) - 1
    if k < 0:
        return np.full(null.shape[1:], np.inf)
    # NaN sorts last in ascending order, so a column with NaN would pick a wrong value: mask it
    ordered = np.sort(null, axis=0)
    value = ordered[n_perm - 1 - k]
    return np.where(np.isnan(null).any(axis=0), np.nan, value)


def _check_level(ci_level: float) -> None:
    if not 0.0 < ci_level < 1.0:
        raise ValueError(f"ci_level must be in (0, 1), e.g. 0.95; got {ci_level!r}")


# --------------------------------------------------------------------------- validated intervals

# the interval methods and their batch floors live in a torch-free module, so that the CLI can
# name them without importing torch (see there for how the floors were chosen)
from ckapipe.analyze.interval_settings import (  # noqa: E402
    DEFAULT_INTERVAL_METHOD,
    INTERVAL_METHODS,
    MIN_BATCHES_FOR_INTERVAL,
)


@dataclass(frozen=True)
class Interval:
    """A confidence interval of every layer pair, or the reason there is none.

    Attributes
    ----------
    low, high : (La, Lb) float64 bounds; all NaN when the interval is withheld, and NaN in
        single entries whose CKA (or every delete-one / resampled CKA) is undefined.
    method : "jackknife" or "bootstrap".
    reason : None when the interval is reported; otherwise a sentence that starts with
        ``"interval withheld:"`` and says why and what to change.
    n_batches : B, the number of batches (or sample blocks in full mode) it is computed over.
    ci_level : nominal coverage.
    n_undefined : (La, Lb) int64, delete-one values or bootstrap replicates without a CKA
        (a self-HSIC sum ≤ 0), left out.
    """

    low: np.ndarray
    high: np.ndarray
    method: str
    reason: str | None
    n_batches: int
    ci_level: float
    n_undefined: np.ndarray

    @property
    def withheld(self) -> bool:
        return self.reason is not None


@functools.lru_cache(maxsize=256)  # a study asks for the same (level, B) once per model pair
def student_t_quantile(q: float, df: float) -> float:
    """Quantile of Student's t distribution with ``df`` degrees of freedom (numpy only).

    The CDF is integrated with Simpson's rule after the substitution x = tan(u), which makes
    the integrand bounded and smooth on [0, π/2) for every df ≥ 1 (the Cauchy tail included),
    and inverted by bisection in u. Absolute error below 1e-9 in the quantile for df ≥ 1 and
    q ≤ 0.9995 (tested against scipy).
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"student_t_quantile: q must be in (0, 1), got {q!r}")
    if not df >= 1:
        raise ValueError(f"student_t_quantile: need df >= 1, got {df!r}")
    if q < 0.5:
        return -student_t_quantile(1.0 - q, df)
    if q == 0.5:
        return 0.0
    from math import lgamma, pi

    log_norm = lgamma((df + 1) / 2) - lgamma(df / 2) - 0.5 * np.log(df * pi)

    def half_mass(u_max: float) -> float:  # P(0 ≤ T ≤ tan(u_max))
        u = np.linspace(0.0, u_max, 2001)
        x = np.tan(u)
        f = np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df)) * (1.0 + x * x)
        h = u_max / 2000
        return float(h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum()))

    target = q - 0.5
    lo, hi = 0.0, np.pi / 2 * (1 - 1e-12)
    for _ in range(60):
        mid = (lo + hi) / 2
        if half_mass(mid) < target:
            lo = mid
        else:
            hi = mid
    return float(np.tan((lo + hi) / 2))


def jackknife_cka(
    hsic_per_batch: np.ndarray, self_a_per_batch: np.ndarray, self_b_per_batch: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Delete-one-batch jackknife standard error of minibatch CKA, every layer pair at once.

    With sums S_h = Σ_b h_b, S_a = Σ_b a_b, S_c = Σ_b c_b of the cross and self HSIC₁ terms,
    the estimate is θ = S_h / sqrt(S_a S_c), the delete-one values are

        θ_(b) = (S_h − h_b) / sqrt((S_a − a_b)(S_c − c_b)),    b = 1 … B,

    and the jackknife standard error is se = sqrt((B − 1)/B · Σ_b (θ_(b) − θ̄)²), θ̄ the mean of
    the θ_(b) (Efron & Tibshirani 1993, ch. 11). Delete-one values whose self sum is not
    positive are left out (the others are used, with B their count) and counted.

    Parameters
    ----------
    hsic_per_batch : (B, La, Lb); self_a_per_batch : (B, La); self_b_per_batch : (B, Lb).

    Returns
    -------
    estimate, se : (La, Lb) float64 (se NaN where fewer than 2 delete-one values exist);
    n_undefined : (La, Lb) int64.
    """
    hsic, self_a, self_b = _check_per_batch(hsic_per_batch, self_a_per_batch, self_b_per_batch)
    estimate = ratio_cka(hsic.sum(axis=0), self_a.sum(axis=0), self_b.sum(axis=0))
    # broadcast (B, La, 1) and (B, 1, Lb) self terms against the (B, La, Lb) cross terms
    se, undefined = _jackknife_se(hsic, self_a[:, :, None], self_b[:, None, :])
    return estimate, se, undefined


def _jackknife_se(
    hsic: np.ndarray, self_a: np.ndarray, self_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Jackknife se over axis 0 of broadcastable per-batch arrays (see :func:`jackknife_cka`)."""
    left_a = self_a.sum(axis=0, keepdims=True) - self_a
    left_b = self_b.sum(axis=0, keepdims=True) - self_b
    return _jackknife_se_of_deleted(hsic.sum(axis=0, keepdims=True) - hsic, left_a, left_b)


def _jackknife_se_of_deleted(
    cross: np.ndarray, self_a: np.ndarray, self_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """se = sqrt((G − 1)/G · Σ_g (θ_(g) − θ̄)²) from the delete-one terms (G, ...), broadcast;
    θ_(g) = cross_g / sqrt(self_a_g · self_b_g), left out (and counted) where undefined."""
    return jackknife_se_of_values(broadcast_ratio_cka(cross, self_a, self_b))


def jackknife_se_of_values(deleted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Jackknife standard error from delete-one values θ_(g), shape (G, ...):
    se = sqrt((G − 1)/G · Σ_g (θ_(g) − θ̄)²), with NaN values left out (G their count) and
    counted; se is NaN where fewer than 2 are defined. Returns (se, n_undefined)."""
    deleted = np.asarray(deleted, dtype=np.float64)
    defined = ~np.isnan(deleted)
    count = defined.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(defined, deleted, 0.0).sum(axis=0) / count
        spread = np.where(defined, (deleted - mean) ** 2, 0.0).sum(axis=0)
        se = np.sqrt((count - 1) / count * spread)
    se = np.where(count >= 2, se, np.nan)
    return se, (deleted.shape[0] - count).astype(np.int64)


def batch_interval(
    hsic_per_batch: np.ndarray,
    self_a_per_batch: np.ndarray,
    self_b_per_batch: np.ndarray,
    ci_level: float = 0.95,
    *,
    method: str = DEFAULT_INTERVAL_METHOD,
    min_batches: int | None = None,
    n_bootstrap: int = 1000,
    rng: np.random.Generator | int | None = 0,
    counts: np.ndarray | None = None,
    epochs: int = 1,
) -> Interval:
    """Confidence interval of minibatch CKA over batches, withheld below the validated B.

    Methods
    -------
    ``"jackknife"`` (default): θ ± t_{B−1, (1+ci_level)/2} · se_jack, with θ the reported
    estimate and se_jack the delete-one-batch jackknife standard error (:func:`jackknife_cka`).
    The t quantile on B − 1 degrees of freedom widens the interval where the variance itself is
    estimated from few batches; the estimate is the interval's centre by construction.
    ``"bootstrap"``: the percentile bootstrap over batches (:func:`bootstrap_cka`).

    Validity rule: with B < ``min_batches`` (default ``MIN_BATCHES_FOR_INTERVAL[method]``,
    the smallest B at which bench/coverage.py measured coverage within 5 points of 95 %), or
    with several epochs (their batches share samples, so they are not independent and every
    interval over batches is too narrow), the bounds are NaN and ``reason`` says why.

    Parameters
    ----------
    hsic_per_batch : (B, La, Lb); self_a_per_batch : (B, La); self_b_per_batch : (B, Lb).
    ci_level : nominal coverage in (0, 1).
    method : one of ``INTERVAL_METHODS``.
    min_batches : override of the validity threshold (≥ 2).
    n_bootstrap, rng, counts : bootstrap only, see :func:`bootstrap_cka`.
    epochs : how many epochs the batches come from.

    Returns
    -------
    Interval
    """
    _check_level(ci_level)
    if method not in INTERVAL_METHODS:
        raise ValueError(f"unknown interval method {method!r}; use one of {INTERVAL_METHODS}")
    hsic, self_a, self_b = _check_per_batch(hsic_per_batch, self_a_per_batch, self_b_per_batch)
    n_batches, la, lb = hsic.shape
    need = MIN_BATCHES_FOR_INTERVAL[method] if min_batches is None else int(min_batches)
    if need < 2:
        raise ValueError(f"min_batches must be >= 2, got {need}")
    reason = _withheld_reason(n_batches, need, epochs, method, ci_level)
    if reason is not None:
        nan = np.full((la, lb), np.nan)
        return Interval(
            nan,
            nan.copy(),
            method,
            reason,
            n_batches,
            float(ci_level),
            np.zeros((la, lb), np.int64),
        )
    if method == "bootstrap":
        boot = bootstrap_cka(
            hsic,
            self_a,
            self_b,
            n_bootstrap=n_bootstrap,
            ci_level=ci_level,
            rng=rng,
            counts=counts,
        )
        return Interval(
            boot.low, boot.high, method, None, n_batches, float(ci_level), boot.n_undefined
        )
    estimate, se, undefined = jackknife_cka(hsic, self_a, self_b)
    half = student_t_quantile((1.0 + ci_level) / 2.0, n_batches - 1) * se
    return Interval(
        estimate - half, estimate + half, method, None, n_batches, float(ci_level), undefined
    )


def _withheld_reason(
    n_batches: int, need: int, epochs: int, method: str, ci_level: float
) -> str | None:
    """Why an interval over ``n_batches`` batches is withheld (None: it is reported)."""
    if n_batches < need:
        return (
            f"interval withheld: {n_batches} batches < {need} needed for validated "
            f"{ci_level:.0%} coverage ({method}); use a smaller batch size or more samples"
        )
    if epochs > 1:
        return (
            f"interval withheld: the {n_batches} batches come from {epochs} epochs that reuse "
            "the same samples, so they are not independent and an interval over batches would "
            "be too narrow; build the Gram cache with 1 epoch"
        )
    return None


def deleted_cka(
    hsic_per_batch: np.ndarray, self_a_per_batch: np.ndarray, self_b_per_batch: np.ndarray
) -> np.ndarray:
    """Delete-one-batch CKA values θ_(b) = (S_h − h_b) / sqrt((S_a − a_b)(S_c − c_b)) of
    entries whose per-batch terms are given side by side: each argument (B, ...) with the same
    shape (the cross term of an entry and the self terms of its two layers). NaN where a
    delete-one self sum is not positive. Returns (B, ...) float64."""
    terms = [
        np.asarray(x, dtype=np.float64)
        for x in (hsic_per_batch, self_a_per_batch, self_b_per_batch)
    ]
    if len({x.shape for x in terms}) != 1 or terms[0].ndim < 1:
        raise ValueError(
            "deleted_cka: the cross and self terms must have one shape (B, ...), got "
            + ", ".join(str(x.shape) for x in terms)
        )
    cross, self_a, self_b = (x.sum(axis=0, keepdims=True) - x for x in terms)
    return broadcast_ratio_cka(cross, self_a, self_b)


def jackknife_interval(
    estimate: float,
    deleted: np.ndarray,
    ci_level: float = 0.95,
    *,
    epochs: int = 1,
    min_batches: int | None = None,
) -> Interval:
    """Delete-one-batch jackknife-t interval of any smooth statistic of the per-batch sums.

    ``deleted`` (B,) holds the statistic recomputed without batch b (e.g. a mean over several
    model and layer pairs of :func:`deleted_cka` values, every pair without the same batch:
    the study's models share one partition). The interval is estimate ± t_{B−1} · se_jack, the
    rule of :func:`batch_interval`, and it is withheld (NaN bounds, ``reason``) under the same
    conditions: fewer than ``MIN_BATCHES_FOR_INTERVAL["jackknife"]`` batches, or several epochs.
    Returns an :class:`Interval` with 0-d bounds.
    """
    _check_level(ci_level)
    deleted = np.asarray(deleted, dtype=np.float64)
    if deleted.ndim != 1:
        raise ValueError(f"jackknife_interval: deleted must be (B,), got shape {deleted.shape}")
    n_batches = deleted.shape[0]
    need = MIN_BATCHES_FOR_INTERVAL["jackknife"] if min_batches is None else int(min_batches)
    reason = _withheld_reason(n_batches, need, epochs, "jackknife", ci_level)
    se, undefined = jackknife_se_of_values(deleted)
    if reason is not None or not np.isfinite(estimate):
        nan = np.array(np.nan)
        return Interval(nan, nan.copy(), "jackknife", reason, n_batches, float(ci_level), undefined)
    half = student_t_quantile((1.0 + ci_level) / 2.0, n_batches - 1) * se
    return Interval(
        np.asarray(estimate - half),
        np.asarray(estimate + half),
        "jackknife",
        None,
        n_batches,
        float(ci_level),
        undefined,
    )


def _check_per_batch(
    hsic: np.ndarray, self_a: np.ndarray, self_b: np.ndarray, prefix: str = ""
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The per-batch arrays as float64, with shapes (B, La, Lb), (B, La), (B, Lb) checked."""
    hsic = np.asarray(hsic, dtype=np.float64)
    self_a = np.asarray(self_a, dtype=np.float64)
    self_b = np.asarray(self_b, dtype=np.float64)
    if (
        hsic.ndim != 3
        or self_a.shape != hsic.shape[:2]
        or self_b.shape != (hsic.shape[0], hsic.shape[2])
    ):
        raise ValueError(
            f"{prefix}shapes do not fit: hsic_per_batch {hsic.shape} must be (B, La, Lb), "
            f"self_a_per_batch {self_a.shape} (B, La), self_b_per_batch {self_b.shape} (B, Lb)"
        )
    return hsic, self_a, self_b


# --------------------------------------------------------------------------- full mode

# Sample blocks of the full-mode jackknife (see bench/coverage.py and docs/STATISTICS.md).
FULL_MODE_BLOCKS = 16
# Fewest samples per block: each delete-one HSIC₁ needs n − n_g ≥ 4, and tiny blocks make the
# delete-one values nearly equal, so their spread says little.
_MIN_BLOCK_SIZE = 4


def sample_blocks(n: int, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random balanced assignment of n samples to ``n_blocks`` blocks (sizes differ by ≤ 1).

    Random rather than contiguous: caches keep the dataset order, which may be sorted by class,
    and a jackknife over contiguous blocks would then delete whole classes.
    """
    if n_blocks < 2 or n < n_blocks:
        raise ValueError(f"sample_blocks: need 2 <= n_blocks <= n, got {n_blocks} and n = {n}")
    return (np.random.default_rng(seed).permutation(n) % n_blocks).astype(np.int64)


class FullBlockJackknife:
    """Delete-one-block jackknife of exact (full-mode) HSIC₁ CKA, streamed over Gram rows.

    Let U, V be the U-centered n×n Grams of two layers over all n samples (zero diagonal, zero
    row sums), g a block of samples, T its complement with n' = n − |g| samples. U-centering
    removes additive row/column effects, so the HSIC₁ of the samples T equals the HSIC₁ formula
    (Song et al. 2012) applied to the submatrices U_T, V_T; with zero row sums the terms of that
    formula reduce to block sums of U, V:

        Σ_{i,j∈T} U_ij V_ij = ⟨U, V⟩ − 2 D_g + E_g,
            D_g = Σ_{i∈g, j} U_ij V_ij,  E_g = Σ_{i,j∈g} U_ij V_ij
        Σ_{i,j∈T} U_ij       = s_g(U) = Σ_{i,j∈g} U_ij
        Σ_{i∈T} (U_T 1)_i (V_T 1)_i = F_g = Σ_{i∈T} c_ig(U) c_ig(V),  c_ig(U) = Σ_{j∈g} U_ij

        HSIC₁^(−g) = [⟨U,V⟩ − 2 D_g + E_g + s_g(U) s_g(V) / ((n'−1)(n'−2)) − 2 F_g / (n'−2)]
                     / (n'(n'−3)).

    All of them accumulate row block by row block (O(n) memory per layer pair and block), from
    the same centered rows the exact HSIC₁ is computed from; Σ_g D_g = ⟨U, V⟩, so the exact
    inner products come out of the same pass at no extra cost. The jackknife interval is
    θ ± t_{G−1,(1+level)/2} · sqrt((G−1)/G Σ_g (θ_(−g) − θ̄)²) (:meth:`interval`).

    The RBF bandwidth is held at its full-sample value in the delete-one values (the bandwidth
    is treated as fixed, not re-estimated).

    Parameters
    ----------
    n : samples.
    n_layers : L, the rows of the stacked centered Grams passed to :meth:`update`.
    n_blocks : G.
    seed : seeds :func:`sample_blocks`.
    """

    def __init__(self, n: int, n_layers: int, *, n_blocks: int = FULL_MODE_BLOCKS, seed: int = 0):
        self.n = int(n)
        self.n_layers = int(n_layers)
        self.n_blocks = int(n_blocks)
        self.reason: str | None = None
        if self.n < _MIN_BLOCK_SIZE * self.n_blocks:
            self.reason = (
                f"interval withheld: full mode has {self.n} samples, fewer than "
                f"{_MIN_BLOCK_SIZE * self.n_blocks} needed for a {self.n_blocks}-block jackknife "
                f"({_MIN_BLOCK_SIZE} samples per block)"
            )
        self.labels = sample_blocks(self.n, min(self.n_blocks, self.n), seed)
        self._members = [np.flatnonzero(self.labels == g) for g in range(self.n_blocks)]
        shape = (self.n_blocks, self.n_layers, self.n_layers)
        self._d = np.zeros(shape)
        self._e = np.zeros(shape)
        self._f = np.zeros(shape)
        self._s = np.zeros((self.n_blocks, self.n_layers))
        # update_tile only: (L, n, G) sums c_ig over the columns j in block g, F_g formed later
        self._c: np.ndarray | None = None
        self._f_pending = False

    def update(self, rows, start: int) -> None:
        """Add rows ``start:start+k`` of every layer's U-centered Gram, (L, k, n).

        ``rows`` may be a numpy array or a torch tensor on any device; the reductions run where
        the rows are, and only (L, L) results are copied to the host.
        """
        n_layers, k, n = rows.shape
        if n_layers != self.n_layers or n != self.n or start < 0 or start + k > self.n:
            raise ValueError(
                f"FullBlockJackknife.update: rows {tuple(rows.shape)} at {start} do not fit "
                f"({self.n_layers}, k, {self.n})"
            )
        local = self.labels[start : start + k]
        for g in range(self.n_blocks):
            cols = _index(rows, self._members[g])
            mine = np.flatnonzero(local == g)
            others = _index(rows, np.flatnonzero(local != g))
            if mine.size:
                block_rows = rows[:, _index(rows, mine), :]  # (L, k_g, n)
                flat = block_rows.reshape(n_layers, -1)
                self._d[g] += _to_numpy(flat @ flat.T)
                corner = block_rows[:, :, cols]  # (L, k_g, n_g)
                flat = corner.reshape(n_layers, -1)
                self._e[g] += _to_numpy(flat @ flat.T)
                self._s[g] += _to_numpy(flat.sum(-1))
            # c_ig for the rows i of T in this block; gather n_g columns first, then rows
            c = rows[:, :, cols].sum(-1)[:, others]  # (L, rows of T here)
            self._f[g] += _to_numpy(c @ c.T)

    def update_tile(self, tile, row0: int, col0: int, *, mirrored: bool) -> None:
        """Add one tile of every layer's U-centered Gram, (L, a, b) at rows ``row0:row0+a``,
        columns ``col0:col0+b``; ``mirrored``: the tile stands for itself and its transpose
        (an off-diagonal tile of a symmetric matrix stored once).

        The terms of :meth:`update` split over tiles: D_g and E_g, s_g are sums over the rows
        (and, mirrored, the columns) in block g; F_g needs c_ig = Σ_{j∈g} U_ij, so the (L, n, G)
        column-block sums c are accumulated here and F_g formed once at the end. Do not mix
        with :meth:`update` in one accumulator.
        """
        n_layers, a, b = tile.shape
        if (
            n_layers != self.n_layers
            or row0 < 0
            or col0 < 0
            or row0 + a > self.n
            or col0 + b > self.n
        ):
            raise ValueError(
                f"FullBlockJackknife.update_tile: tile {tuple(tile.shape)} at ({row0}, {col0}) "
                f"does not fit ({self.n_layers}, ≤{self.n}, ≤{self.n})"
            )
        if self._c is None:
            self._c = np.zeros((self.n_layers, self.n, self.n_blocks))
        weight = 2.0 if mirrored else 1.0
        row_labels = self.labels[row0 : row0 + a]
        col_labels = self.labels[col0 : col0 + b]
        for g in range(self.n_blocks):
            rows = np.flatnonzero(row_labels == g)
            cols = np.flatnonzero(col_labels == g)
            if rows.size:
                block_rows = tile[:, _index(tile, rows), :]  # (L, a_g, b)
                flat = block_rows.reshape(n_layers, -1)
                self._d[g] += _to_numpy(flat @ flat.T)
                if mirrored:
                    self._c[:, col0 : col0 + b, g] += _to_numpy(block_rows.sum(1))
            if cols.size:
                block_cols = tile[:, :, _index(tile, cols)]  # (L, a, b_g)
                self._c[:, row0 : row0 + a, g] += _to_numpy(block_cols.sum(-1))
                if mirrored:
                    flat = block_cols.reshape(n_layers, -1)
                    self._d[g] += _to_numpy(flat @ flat.T)
                if rows.size:
                    corner = block_cols[:, _index(tile, rows), :].reshape(n_layers, -1)
                    self._e[g] += weight * _to_numpy(corner @ corner.T)
                    self._s[g] += weight * _to_numpy(corner.sum(-1))
        self._f_pending = True

    def _finish_tiles(self) -> None:
        """F_g = Σ_{i∉g} c_ig(U) c_ig(V) from the column-block sums of :meth:`update_tile`."""
        if not self._f_pending or self._c is None:
            return
        for g in range(self.n_blocks):
            c = self._c[:, self.labels != g, g]  # (L, n − n_g)
            self._f[g] = c @ c.T
        self._f_pending = False

    def inner(self) -> np.ndarray:
        """(L, L) ⟨U_i, U_j⟩ over all n samples (unscaled: HSIC₁ · n(n−3))."""
        return self._d.sum(axis=0)

    def deleted_hsic(self) -> np.ndarray:
        """(G, L, L) HSIC₁ of every layer pair with sample block g left out."""
        self._finish_tiles()
        sizes = np.bincount(self.labels, minlength=self.n_blocks).astype(np.float64)
        rest = (self.n - sizes)[:, None, None]  # n'
        total = self.inner()[None]
        with np.errstate(invalid="ignore", divide="ignore"):
            value = (
                total
                - 2 * self._d
                + self._e
                + self._s[:, :, None] * self._s[:, None, :] / ((rest - 1) * (rest - 2))
                - 2 * self._f / (rest - 2)
            ) / (rest * (rest - 3))
        return value

    def interval(self, rows: np.ndarray, cols: np.ndarray, ci_level: float = 0.95) -> Interval:
        """Jackknife interval of the CKA of layers ``rows`` × ``cols`` (indices into L)."""
        _check_level(ci_level)
        rows, cols = np.asarray(rows), np.asarray(cols)
        inner = self.inner()
        diag = np.diagonal(inner)
        estimate = ratio_cka(inner[np.ix_(rows, cols)], diag[rows], diag[cols])
        shape = estimate.shape
        if self.reason is not None:
            nan = np.full(shape, np.nan)
            return Interval(
                nan,
                nan.copy(),
                "block-jackknife",
                self.reason,
                self.n_blocks,
                float(ci_level),
                np.zeros(shape, np.int64),
            )
        deleted = self.deleted_hsic()
        deleted_diag = np.diagonal(deleted, axis1=1, axis2=2)  # (G, L)
        se, undefined = _jackknife_se_of_deleted(
            deleted[:, rows][:, :, cols],
            deleted_diag[:, rows][:, :, None],
            deleted_diag[:, cols][:, None, :],
        )
        half = student_t_quantile((1.0 + ci_level) / 2.0, self.n_blocks - 1) * se
        return Interval(
            estimate - half,
            estimate + half,
            "block-jackknife",
            None,
            self.n_blocks,
            float(ci_level),
            undefined,
        )


def _index(like, index: np.ndarray):
    """``index`` as an index for ``like``: a numpy array, or a torch tensor on its device."""
    if isinstance(like, np.ndarray):
        return index
    import torch

    return torch.as_tensor(index, device=like.device)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.astype(np.float64, copy=False)
    return x.detach().to("cpu").double().numpy()
