"""A family of representational similarity measures, all computed exactly from linear Grams.

Every measure here depends on a layer's (n, p) features X only through the (n, n) linear Gram
of its centered features, K = X_c X_cᵀ (X_c = X − 1 x̄ᵀ), so full-mode Gram caches answer
"does it hold under RSA / Procrustes / CCA too?" without touching a model or a store again.
Everything is float64 numpy. To compare feature arrays, pass their Grams
(:func:`features_gram`).

One eigendecomposition per layer (:class:`LayerGeometry`): K_c = H K H = U diag(λ) Uᵀ
(pivoted Cholesky then a thin SVD for low rank, else ``numpy.linalg.eigh``; see
:func:`_spectrum`), eigenvalues in decreasing order, and the **numerical rank** r = the
number of λ_i > ``rank_rtol`` · λ_max (default 1e-10: a float64 Gram of n = 5000 samples carries
eigenvalue round-off of about n·ε·λ_max ≈ 1e-12 λ_max; directions below the tolerance are
treated as absent, like ``numpy.linalg.lstsq``'s ``rcond``). With U_r, λ_r the kept part, the
centered features are X_c = U_r diag(√λ_r) Qᵀ for some orthonormal Q, so every quantity below
that is invariant to orthogonal transforms of the features is a function of U_r and λ_r. A pair
of layers then needs M = U_Kᵀ U_L (r_K × r_L: n·r_K·r_L flops) and small SVDs.

Measures (a: the first layer, X; b: the second, Y):

- ``cka``: linear or RBF CKA, debiased (HSIC₁) or biased (HSIC₀); :func:`cka` calls the
  estimator core (:mod:`ckapipe.analyze.estimators`), nothing is re-derived here.
- ``rsa`` / ``rsa_spearman``: RDMs of squared Euclidean distances d_ij = K_ii + K_jj − 2K_ij,
  compared by the Pearson / Spearman (average ranks for ties: distances within 1e-12 · max d
  of each other, which Gram round-off would split) correlation of their upper triangles (i < j). Pearson is computed in closed form from traces (no n² vector per layer);
  Spearman ranks each layer's n(n−1)/2 distances once and keeps them as uint32 (2·rank).
- ``procrustes``: orthogonal Procrustes similarity ‖X_cᵀY_c‖_* / (‖X_c‖_F ‖Y_c‖_F) ∈ [0, 1],
  the cosine of Williams et al. (2021)'s angular shape distance θ = arccos(similarity);
  Ding et al. (2021)'s Procrustes distance on unit-Frobenius features is 2 − 2·similarity
  (:func:`procrustes_distance`). ‖X_cᵀY_c‖_* = Σ singular values of diag(√λ_K) M diag(√λ_L)
  (a product of the two factors, never a square root of a non-symmetric product's eigenvalues).
- ``cca`` (mean R²_CCA, Yanai's GCD as in Kornblith et al. 2019 Table 1: Σρ²/min(r_K, r_L)),
  ``cca_pillai`` (Pillai's trace Σρ²), ``cca_mean_rho`` (mean ρ): the canonical correlations
  ρ are the singular values of M (principal angles between the centered column spaces).
- ``svcca`` (Raghu et al. 2017): keep each layer's top-k principal directions (k given, or the
  fewest that keep a fraction ``svcca_keep`` of the variance, default 0.99), then the mean
  canonical correlation of the kept subspaces: singular values of M[:k_K, :k_L].
- ``pwcca`` (Morcos et al. 2018): Σ α_i ρ_i / Σ α_i with canonical variates h_i of X weighted by
  how much of X they account for. Morcos et al. weight by Σ_j |⟨h_i, x_j⟩| over X's neurons x_j,
  which is not invariant to rotations of the features and so needs the features; ckapipe uses
  the rotation-invariant ℓ2 version α_i = ‖X_cᵀ h_i‖₂ = √(h_iᵀ K h_i), computable from the Gram.
  Asymmetric: weights come from the first layer.
- ``regression`` (R² of Y from X) and ``regression_reverse`` (X from Y): the fraction of Y's
  variance in the least-squares projection onto X's centered column space,
  R² = tr(P_K L)/tr(L) = ‖M diag(√λ_L)‖²_F / Σλ_L (Kornblith et al. 2019's linear regression fit).
- ``knn``: mutual k-NN alignment (Huh et al. 2024): for each sample, its k nearest other samples
  by cosine similarity of centered features, S_ij = K_ij / √(K_ii K_jj); the measure is the
  mean over samples of |N_K(i) ∩ N_L(i)| / k. Similarities within 1e-12 of each other are ties,
  which go to the lower sample index.

CCA-family caveat: when a layer's rank reaches n − 1 (p ≥ n − 1 and generic data), every
canonical correlation is 1 and CCA/R²_CCA/Pillai/regression are trivially 1; SVCCA's truncation
is the usual remedy. None of these measures has a minibatch form (only CKA does, in
:mod:`ckapipe.analyze.estimators`); none needs more than the Grams.

Degenerate input: NaN/Inf or non-square Grams raise ``DataError``/``ValueError`` naming the
argument; a layer whose centered Gram is zero (rank 0: constant or dead features) gives NaN for
every measure with a :class:`~ckapipe.analyze.estimators.DegenerateLayerWarning` naming it; a
sample whose centered feature vector is zero (squared norm ≤ rank_rtol · the largest) makes ``knn`` NaN for that layer (warned, its
cosine similarity is undefined); k ≥ n raises ``ValueError``. Nothing is clamped.

References
----------
Kriegeskorte, Mur, Bandettini (2008), Representational similarity analysis. Front. Syst. Neurosci.
Raghu, Gilmer, Yosinski, Sohl-Dickstein (2017), SVCCA. NeurIPS.
Morcos, Raghu, Bengio (2018), Insights on representational similarity in neural networks with
canonical correlation. NeurIPS.
Kornblith, Norouzi, Lee, Hinton (2019), Similarity of neural network representations revisited.
ICML.
Williams, Kunz, Kornblith, Linderman (2021), Generalized shape metrics on neural representations.
NeurIPS.
Ding, Denain, Steinhardt (2021), Grounding representation similarity with statistical testing.
NeurIPS.
Huh, Cheung, Wang, Isola (2024), The platonic representation hypothesis. ICML.
"""

# ruff: noqa: E741 - k and l are the papers' names for the two Gram matrices
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckapipe.analyze.cka_ratio import DegenerateLayerWarning
from ckapipe.errors import DataError

__all__ = [
    "DEFAULT_KNN_K",
    "DEFAULT_RANK_RTOL",
    "DEFAULT_SVCCA_KEEP",
    "GRAM_MEASURES",
    "MEASURES",
    "LayerGeometry",
    "MeasureOptions",
    "canonical_correlations",
    "cca",
    "cka",
    "features_gram",
    "mutual_knn",
    "pairwise_measures",
    "parse_measures",
    "procrustes",
    "procrustes_distance",
    "pwcca",
    "regression_r2",
    "rsa",
    "svcca",
]

DEFAULT_RANK_RTOL = 1e-10
DEFAULT_SVCCA_KEEP = 0.99
DEFAULT_KNN_K = 10

# measure name -> one-line meaning (the order used in results, CSVs and reports)
MEASURES: dict[str, str] = {
    "cka": "CKA with the study's estimator and kernel",
    "rsa": "RSA: Pearson correlation of squared-Euclidean RDMs",
    "rsa_spearman": "RSA: Spearman correlation of squared-Euclidean RDMs",
    "procrustes": "orthogonal Procrustes similarity ‖XᵀY‖_*/(‖X‖_F‖Y‖_F)",
    "cca": "mean squared canonical correlation (R²_CCA, Yanai)",
    "cca_pillai": "Pillai's trace: sum of squared canonical correlations",
    "cca_mean_rho": "mean canonical correlation",
    "svcca": "SVCCA: mean canonical correlation of the top principal subspaces",
    "pwcca": "PWCCA: projection-weighted mean canonical correlation (weights from layer a)",
    "regression": "R² of layer b regressed on layer a",
    "regression_reverse": "R² of layer a regressed on layer b",
    "knn": "mutual k-NN alignment (cosine similarity of centered features)",
}
# every measure but CKA is computed by :func:`pairwise_measures` from :class:`LayerGeometry`
GRAM_MEASURES = tuple(name for name in MEASURES if name != "cka")


@dataclass(frozen=True)
class MeasureOptions:
    """Settings of the measures; validated on construction.

    rank_rtol : eigenvalues ≤ rank_rtol · λ_max count as zero (numerical rank).
    svcca_keep : SVCCA keeps the fewest top directions whose variance is ≥ this fraction, in (0, 1].
    svcca_k : if given, SVCCA keeps exactly this many top directions (capped at the rank).
    knn_k : neighbours per sample for ``knn``, ≥ 1 and < n.
    """

    rank_rtol: float = DEFAULT_RANK_RTOL
    svcca_keep: float = DEFAULT_SVCCA_KEEP
    svcca_k: int | None = None
    knn_k: int = DEFAULT_KNN_K

    def __post_init__(self) -> None:
        if not 0.0 <= self.rank_rtol < 1.0:
            raise ValueError(f"rank_rtol must be in [0, 1), e.g. 1e-10; got {self.rank_rtol!r}")
        if not 0.0 < self.svcca_keep <= 1.0:
            raise ValueError(f"svcca_keep must be in (0, 1], e.g. 0.99; got {self.svcca_keep!r}")
        if self.svcca_k is not None and self.svcca_k < 1:
            raise ValueError(f"svcca_k must be >= 1 (or None); got {self.svcca_k!r}")
        if self.knn_k < 1:
            raise ValueError(f"knn_k must be >= 1, e.g. 10; got {self.knn_k!r}")


def parse_measures(measures: str | Iterable[str]) -> list[str]:
    """``"cka,rsa"`` or ``["cka", "rsa"]`` → a list of known measure names in the given order,
    without repeats; ``ValueError`` naming an unknown measure and the known ones."""
    items = measures.split(",") if isinstance(measures, str) else list(measures)
    names: list[str] = []
    for item in items:
        name = str(item).strip()
        if name not in MEASURES:
            raise ValueError(
                f"unknown similarity measure {name!r}; known measures: {', '.join(MEASURES)}"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"no similarity measure given; known measures: {', '.join(MEASURES)}")
    return names


# --------------------------------------------------------------------------- inputs


def features_gram(x: Any) -> np.ndarray:
    """float64 (n, n) linear Gram of column-centered features X_c X_cᵀ, from (n, ...) features."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"features: expected shape (n_samples, ...), got {x.shape}")
    x = x.reshape(x.shape[0], -1)
    centered = x - x.mean(axis=0)
    return centered @ centered.T


def _check_gram(k: Any, name: str) -> np.ndarray:
    """A finite, square float64 Gram; ``DataError`` names the first sample with NaN/Inf."""
    g = np.asarray(k.cpu() if hasattr(k, "cpu") else k, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] < 2:
        raise ValueError(f"{name}: expected a square (n, n) Gram with n >= 2, got shape {g.shape}")
    bad = ~np.isfinite(g).all(axis=1)
    if bad.any():
        raise DataError(
            f"{name} contains NaN or Inf (first at sample {int(np.flatnonzero(bad)[0])}); "
            "rebuild the Gram from finite activations"
        )
    return g


def _double_center(g: np.ndarray) -> np.ndarray:
    """H K H, H = I − 11ᵀ/n: the Gram of the centered features (K itself when already centered)."""
    row = g.mean(axis=1, keepdims=True)
    return g - row - row.T + row.mean()


# --------------------------------------------------------------------------- per layer


@dataclass
class LayerGeometry:
    """What every measure needs of one layer, computed once from its Gram.

    Attributes
    ----------
    name : the layer's name, for messages.
    n : number of samples.
    eigvals : (r,) kept eigenvalues of the centered Gram, decreasing (all > rank_rtol·λ_max).
    eigvecs : (n, r) their orthonormal eigenvectors U_r.
    diag : (n,) diagonal of the centered Gram (squared norms of the centered samples).
    trace : Σ eigvals (the kept variance, ‖X_c‖²_F up to the dropped part).
    rank_ranks : (n(n−1)/2,) uint32, 2 × the average rank of each upper-triangle distance
        (only when built with ``spearman=True``).
    neighbours : (n, k) int64 nearest-neighbour indices per sample, or None (``knn_k`` unset or
        a zero-norm sample, see ``knn_problem``).
    """

    name: str
    n: int
    eigvals: np.ndarray
    eigvecs: np.ndarray
    diag: np.ndarray
    trace: float
    rdm_ranks: np.ndarray | None = None
    neighbours: np.ndarray | None = None
    knn_problem: str | None = None
    _scaled: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_gram(
        cls,
        gram: Any,
        name: str = "layer",
        *,
        options: MeasureOptions | None = None,
        spearman: bool = False,
        knn: bool = False,
    ) -> LayerGeometry:
        """Eigendecomposition (and, if asked, RDM ranks and k-NN sets) of one (n, n) Gram.

        ``spearman`` keeps the average ranks of the n(n−1)/2 distances (4 bytes each) for
        ``rsa_spearman``; ``knn`` finds each sample's ``options.knn_k`` neighbours for ``knn``.
        """
        options = options or MeasureOptions()
        g = _double_center(_check_gram(gram, name))
        n = g.shape[0]
        values, vectors = _spectrum(g, options.rank_rtol)
        top = values[0] if values.size else 0.0
        keep = values > options.rank_rtol * top if top > 0 else np.zeros(values.size, dtype=bool)
        eigvals = np.ascontiguousarray(values[keep])
        eigvecs = np.ascontiguousarray(vectors[:, keep])
        diag = np.diagonal(g).copy()
        geometry = cls(name, n, eigvals, eigvecs, diag, float(eigvals.sum()))
        if eigvals.size == 0:
            _warn_degenerate(
                f"layer {name!r}: its centered Gram is zero (constant or all-zero activations); "
                "every similarity measure with it is NaN"
            )
            return geometry
        if spearman:
            geometry.rdm_ranks = _rdm_ranks(g)
        if knn:
            if options.knn_k >= n:
                raise ValueError(
                    f"knn_k = {options.knn_k} neighbours need at least {options.knn_k + 1} "
                    f"samples, layer {name!r} has {n}; choose a smaller k"
                )
            # a squared norm at round-off level of the largest: a zero vector, no direction
            zero = np.flatnonzero(diag <= options.rank_rtol * float(diag.max()))
            if zero.size:
                geometry.knn_problem = (
                    f"layer {name!r}: sample {int(zero[0])} ({zero.size} in all) equals the mean "
                    "of the samples, so its cosine similarity is undefined; knn is NaN"
                )
                _warn_degenerate(geometry.knn_problem)
            else:
                geometry.neighbours = _nearest(g, diag, options.knn_k)
        return geometry

    @property
    def rank(self) -> int:
        """Numerical rank r of the centered Gram."""
        return int(self.eigvals.size)

    @property
    def scaled(self) -> np.ndarray:
        """(n, r) U_r diag(√λ_r): the centered features in their principal axes."""
        if self._scaled is None:
            self._scaled = self.eigvecs * np.sqrt(self.eigvals)
        return self._scaled

    def top_directions(self, options: MeasureOptions) -> int:
        """How many top principal directions SVCCA keeps (by count, or by variance kept)."""
        if options.svcca_k is not None:
            return min(options.svcca_k, self.rank)
        kept = np.cumsum(self.eigvals) / self.trace
        # the fewest directions with kept variance ≥ svcca_keep (1e-12: round-off in the cumsum)
        return int(min(self.rank, np.searchsorted(kept, options.svcca_keep - 1e-12) + 1))


def _warn_degenerate(message: str) -> None:
    """A :class:`~ckapipe.analyze.cka_ratio.DegenerateLayerWarning` for ``message``."""
    warnings.warn(message, DegenerateLayerWarning, stacklevel=3)


def _spectrum(centered: np.ndarray, rank_rtol: float) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (decreasing) and eigenvectors of a centered Gram, cheaply when its rank is low.

    A layer of p < n features has a Gram of rank ≤ p, and ``eigh`` (≈ 9n³ flops: 36 s at
    n = 5000 on one core here) would spend nearly all its time on the zero part. LAPACK's
    pivoted Cholesky (``dpstrf``, ≈ n²r flops) stops once every remaining pivot is below
    rank_rtol · max diag / n, which bounds the dropped part's norm by its trace ≤ rank_rtol ·
    λ_max; the thin SVD of the (n, r) factor then gives the eigenpairs. When the rank found is
    over n/3 the factor saves little, and ``eigh`` of the whole Gram is used instead.
    """
    from scipy.linalg import lapack

    n = centered.shape[0]
    top = float(np.max(np.diagonal(centered)))
    if top <= 0:
        return np.zeros(0), np.zeros((n, 0))
    factor, pivots, rank, info = lapack.dpstrf(centered, tol=rank_rtol * top / n, lower=1)
    if info < 0:  # an illegal argument: a bug here, never the data's fault
        raise RuntimeError(f"LAPACK dpstrf failed with info = {info}")
    if rank <= n // 3:
        rows = np.zeros((n, rank))
        rows[pivots - 1] = np.tril(factor[:, :rank])  # centered = rows @ rows.T
        vectors, singular, _ = np.linalg.svd(rows, full_matrices=False)
        return singular**2, vectors
    values, vectors = np.linalg.eigh(centered)  # ascending
    return values[::-1], vectors[:, ::-1]


def _rdm_ranks(centered: np.ndarray) -> np.ndarray:
    """2 × average ranks (1-based) of the upper-triangle squared distances, as uint32."""
    n = centered.shape[0]
    if n * (n - 1) > np.iinfo(np.uint32).max:
        raise ValueError(f"rsa_spearman supports up to 65 536 samples, got n = {n}")
    d = np.diagonal(centered)
    parts = []
    columns = np.arange(n)
    for i in range(0, n - 1, 256):  # row blocks keep the transient at 256·n floats
        stop = min(n - 1, i + 256)
        block = d[i:stop, None] + d[None, :] - 2.0 * centered[i:stop]
        parts.append(block[columns[None, :] > np.arange(i, stop)[:, None]])  # row-major i < j
    values = np.concatenate(parts)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # distances equal in exact arithmetic differ by Gram round-off (~ε·max d): consecutive
    # sorted values closer than 1e-12·max d count as ties; each run of ties shares the mean of
    # its 1-based positions: 2·rank = first + last + 2 (scipy's "average")
    gap = 1e-12 * max(float(ordered[-1]), 0.0)
    starts = np.flatnonzero(np.r_[True, np.diff(ordered) > gap])
    ends = np.r_[starts[1:], ordered.size] - 1
    doubled = np.empty(ordered.size, dtype=np.uint32)
    doubled[order] = np.repeat((starts + ends + 2).astype(np.uint32), ends - starts + 1)
    return doubled


def _nearest(centered: np.ndarray, diag: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of each sample's k most cosine-similar other samples (ties: lower index)."""
    norms = np.sqrt(diag)
    similarity = centered / norms[:, None] / norms[None, :]
    np.fill_diagonal(similarity, -np.inf)
    n = similarity.shape[0]
    # the k-th largest value per row; all above it are in, then the lowest-index ties fill up
    kth = np.partition(similarity, n - k, axis=1)[:, n - k, None]
    # similarities within 1e-12 of the k-th count as ties (exact ties differ by Gram round-off)
    above = similarity > kth + 1e-12
    ties = ~above & (similarity >= kth - 1e-12)
    room = k - above.sum(axis=1)
    chosen = above | (ties & (np.cumsum(ties, axis=1) <= room[:, None]))
    return np.nonzero(chosen)[1].reshape(n, k)


# --------------------------------------------------------------------------- pairs


def _pair_values(
    a: LayerGeometry, b: LayerGeometry, wanted: Sequence[str], options: MeasureOptions
) -> dict[str, float]:
    """Every requested Gram measure but ``rsa_spearman`` for one pair of layers."""
    if a.rank == 0 or b.rank == 0:
        return {name: float("nan") for name in wanted}
    m = a.eigvecs.T @ b.eigvecs  # (r_a, r_b)
    out: dict[str, float] = {}
    need_scaled = {"procrustes", "rsa"} & set(wanted)
    if need_scaled:
        scaled = np.sqrt(a.eigvals)[:, None] * m * np.sqrt(b.eigvals)[None, :]
    if "procrustes" in wanted:
        nuclear = np.linalg.svd(scaled, compute_uv=False).sum()
        out["procrustes"] = float(nuclear / np.sqrt(a.trace * b.trace))
    if "rsa" in wanted:
        out["rsa"] = _rsa_pearson(a, b, float(np.sum(scaled * scaled)))
    cca_names = {"cca", "cca_pillai", "cca_mean_rho", "pwcca"} & set(wanted)
    if cca_names:
        left, rho, _ = np.linalg.svd(m, full_matrices=False)
        count = min(a.rank, b.rank)
        rho = rho[:count]
        out["cca"] = float(np.sum(rho**2) / count)
        out["cca_pillai"] = float(np.sum(rho**2))
        out["cca_mean_rho"] = float(np.mean(rho))
        # α_i = ‖X_cᵀ h_i‖ with h_i = U_K p_i: α_i² = Σ_j λ_j p_ji²
        weights = np.sqrt((a.eigvals[:, None] * left[:, :count] ** 2).sum(axis=0))
        out["pwcca"] = float(np.sum(weights * rho) / np.sum(weights))
    if "svcca" in wanted:
        ka, kb = a.top_directions(options), b.top_directions(options)
        out["svcca"] = float(np.mean(np.linalg.svd(m[:ka, :kb], compute_uv=False)))
    if "regression" in wanted:
        out["regression"] = float(np.sum(m**2 * b.eigvals[None, :]) / b.trace)
    if "regression_reverse" in wanted:
        out["regression_reverse"] = float(np.sum(m**2 * a.eigvals[:, None]) / a.trace)
    if "knn" in wanted:
        out["knn"] = _knn_overlap(a, b)
    return {name: out[name] for name in wanted}


def _rsa_pearson(a: LayerGeometry, b: LayerGeometry, inner_kl: float) -> float:
    """Pearson correlation of the upper-triangle RDMs in closed form.

    With centered Grams (zero row sums), diagonals k, l, traces t_K, t_L and N = n(n−1)
    ordered pairs i ≠ j: Σ d = 2n·t_K, Σ d·e = 2n⟨k, l⟩ + 2 t_K t_L + 4⟨K, L⟩_F (the sum over
    i ≠ j is twice the upper triangle, which leaves the correlation unchanged).
    """
    n = a.n

    def moments(x: LayerGeometry, y: LayerGeometry, inner: float) -> float:
        tx, ty = float(x.diag.sum()), float(y.diag.sum())
        cross = 2 * n * float(x.diag @ y.diag) + 2 * tx * ty + 4 * inner
        pairs = n * (n - 1)
        return cross / pairs - (2 * n * tx / pairs) * (2 * n * ty / pairs)

    cov = moments(a, b, inner_kl)
    var_a = moments(a, a, float(np.sum(a.eigvals**2)))
    var_b = moments(b, b, float(np.sum(b.eigvals**2)))
    if var_a <= 0 or var_b <= 0:  # every distance equal: the correlation is undefined
        return float("nan")
    return cov / np.sqrt(var_a * var_b)


def _knn_overlap(a: LayerGeometry, b: LayerGeometry) -> float:
    """Mean fraction of shared neighbours; NaN when either layer has no neighbour sets."""
    if a.neighbours is None or b.neighbours is None:
        return float("nan")
    n, k = a.neighbours.shape
    member = np.zeros((n, n), dtype=bool)
    member[np.arange(n)[:, None], b.neighbours] = True
    return float(member[np.arange(n)[:, None], a.neighbours].sum() / (n * k))


def _spearman_matrix(
    geoms_a: Sequence[LayerGeometry], geoms_b: Sequence[LayerGeometry]
) -> np.ndarray:
    """(La, Lb) Spearman correlations of RDM ranks, accumulated over chunks of distances."""
    out = np.full((len(geoms_a), len(geoms_b)), np.nan)
    ia = [i for i, g in enumerate(geoms_a) if g.rdm_ranks is not None]
    ib = [j for j, g in enumerate(geoms_b) if g.rdm_ranks is not None]
    if not ia or not ib:
        return out
    size = geoms_a[ia[0]].rdm_ranks.size  # type: ignore[union-attr]
    mean = float(size + 1)  # of the doubled ranks
    cross = np.zeros((len(ia), len(ib)))
    sq_a, sq_b = np.zeros(len(ia)), np.zeros(len(ib))
    for start in range(0, size, 1 << 20):
        stop = min(size, start + (1 << 20))
        ra = np.stack([geoms_a[i].rdm_ranks[start:stop] for i in ia]).astype(np.float64) - mean  # type: ignore[index]
        rb = np.stack([geoms_b[j].rdm_ranks[start:stop] for j in ib]).astype(np.float64) - mean  # type: ignore[index]
        cross += ra @ rb.T  # (la, lb)
        sq_a += np.einsum("ij,ij->i", ra, ra)
        sq_b += np.einsum("ij,ij->i", rb, rb)
    with np.errstate(invalid="ignore", divide="ignore"):
        out[np.ix_(ia, ib)] = cross / np.sqrt(sq_a[:, None] * sq_b[None, :])
    return out


def pairwise_measures(
    geoms_a: Sequence[LayerGeometry],
    geoms_b: Sequence[LayerGeometry],
    measures: Sequence[str],
    options: MeasureOptions | None = None,
) -> dict[str, np.ndarray]:
    """Every requested Gram measure for every layer pair: measure → (La, Lb) float64.

    ``measures`` are names of :data:`GRAM_MEASURES` (``cka`` comes from the estimator core).
    ``rsa_spearman`` needs geometries built with ``spearman=True``, ``knn`` with ``knn=True``.
    Entry [i, j] compares ``geoms_a[i]`` (X) with ``geoms_b[j]`` (Y).
    """
    options = options or MeasureOptions()
    wanted = [name for name in measures if name != "rsa_spearman"]
    unknown = [name for name in measures if name not in GRAM_MEASURES]
    if unknown:
        raise ValueError(
            f"pairwise_measures computes {', '.join(GRAM_MEASURES)}; got {unknown} (CKA: use "
            "ckapipe.analyze.measures.cka or the study's estimator)"
        )
    _check_built(geoms_a, geoms_b, measures)
    shape = (len(geoms_a), len(geoms_b))
    out = {name: np.full(shape, np.nan) for name in measures}
    for i, a in enumerate(geoms_a):
        for j, b in enumerate(geoms_b):
            for name, value in _pair_values(a, b, wanted, options).items():
                out[name][i, j] = value
    if "rsa_spearman" in measures:
        out["rsa_spearman"] = _spearman_matrix(geoms_a, geoms_b)
    return out


def _check_built(
    geoms_a: Sequence[LayerGeometry], geoms_b: Sequence[LayerGeometry], measures: Sequence[str]
) -> None:
    """Refuse geometries of different sample counts or without the parts a measure needs."""
    counts = {g.n for g in [*geoms_a, *geoms_b]}
    if len(counts) > 1:
        raise ValueError(f"the layers hold different numbers of samples: {sorted(counts)}")
    for g in [*geoms_a, *geoms_b]:
        if g.rank == 0:
            continue
        if "rsa_spearman" in measures and g.rdm_ranks is None:
            raise ValueError(f"layer {g.name!r}: rsa_spearman needs LayerGeometry(spearman=True)")
        if "knn" in measures and g.neighbours is None and g.knn_problem is None:
            raise ValueError(f"layer {g.name!r}: knn needs LayerGeometry.from_gram(knn=True)")


# --------------------------------------------------------------------------- pure functions


def _one(
    k: Any,
    l: Any,
    measure: str,
    options: MeasureOptions,
) -> float:
    kw: dict[str, bool] = {
        "spearman": measure == "rsa_spearman",
        "knn": measure == "knn",
    }
    a = LayerGeometry.from_gram(k, "k", options=options, **kw)
    b = LayerGeometry.from_gram(l, "l", options=options, **kw)
    if a.n != b.n:
        raise ValueError(f"k and l must hold the same samples: n = {a.n} and {b.n}")
    return float(pairwise_measures([a], [b], [measure], options)[measure][0, 0])


def rsa(k: Any, l: Any, *, method: str = "pearson") -> float:
    """RSA: correlation of the upper triangles of the squared-Euclidean RDMs of two Grams.

    d_ij = K_ii + K_jj − 2K_ij (Kriegeskorte et al. 2008, with squared Euclidean rather than
    correlation distance so that it is a function of the Gram; see docs/MEASURES.md).
    ``method``: ``"pearson"`` or ``"spearman"`` (average ranks for ties, as scipy's rankdata).
    """
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be 'pearson' or 'spearman', got {method!r}")
    return _one(k, l, "rsa" if method == "pearson" else "rsa_spearman", MeasureOptions())


def procrustes(k: Any, l: Any, *, rank_rtol: float = DEFAULT_RANK_RTOL) -> float:
    """Orthogonal Procrustes similarity ‖X_cᵀY_c‖_* / (‖X_c‖_F ‖Y_c‖_F) ∈ [0, 1].

    = max over orthogonal Q of ⟨X_c Q, Y_c⟩ for unit-Frobenius X_c, Y_c; its arccos is the
    angular shape distance of Williams et al. (2021). Features of different widths are
    compared as if zero-padded (the Gram does not see the padding).
    """
    return _one(k, l, "procrustes", MeasureOptions(rank_rtol=rank_rtol))


def procrustes_distance(
    k: Any,
    l: Any,
    *,
    kind: str = "angular",
    rank_rtol: float = DEFAULT_RANK_RTOL,
) -> float:
    """Procrustes distance from :func:`procrustes` similarity s.

    ``kind="angular"``: arccos(s) (Williams et al. 2021, a metric, in [0, π/2]);
    ``kind="euclidean"``: min_Q ‖X_c Q − Y_c‖²_F on unit-Frobenius features = 2 − 2s
    (Ding et al. 2021).
    """
    s = procrustes(k, l, rank_rtol=rank_rtol)
    if kind == "angular":
        return float(np.arccos(s)) if s <= 1.0 else float("nan")  # s > 1: round-off, refused
    if kind == "euclidean":
        return 2.0 - 2.0 * s
    raise ValueError(f"kind must be 'angular' or 'euclidean', got {kind!r}")


def canonical_correlations(
    k: Any,
    l: Any,
    *,
    rank_rtol: float = DEFAULT_RANK_RTOL,
) -> np.ndarray:
    """Canonical correlations ρ₁ ≥ … ≥ ρ_min(r_K, r_L) of the centered features behind two Grams:
    the singular values of U_Kᵀ U_L (cosines of the principal angles between column spaces)."""
    options = MeasureOptions(rank_rtol=rank_rtol)
    a = LayerGeometry.from_gram(k, "k", options=options)
    b = LayerGeometry.from_gram(l, "l", options=options)
    if a.rank == 0 or b.rank == 0:
        return np.array([])
    rho = np.linalg.svd(a.eigvecs.T @ b.eigvecs, compute_uv=False)
    return rho[: min(a.rank, b.rank)]


def cca(
    k: Any,
    l: Any,
    *,
    summary: str = "mean_r2",
    rank_rtol: float = DEFAULT_RANK_RTOL,
) -> float:
    """A CCA summary: ``"mean_r2"`` (R²_CCA = Σρ²/min(r_K, r_L), Yanai's GCD),
    ``"pillai"`` (Σρ²) or ``"mean_rho"`` (mean ρ)."""
    names = {"mean_r2": "cca", "pillai": "cca_pillai", "mean_rho": "cca_mean_rho"}
    if summary not in names:
        raise ValueError(f"summary must be one of {sorted(names)}, got {summary!r}")
    return _one(k, l, names[summary], MeasureOptions(rank_rtol=rank_rtol))


def svcca(
    k: Any,
    l: Any,
    *,
    keep: float = DEFAULT_SVCCA_KEEP,
    n_directions: int | None = None,
    rank_rtol: float = DEFAULT_RANK_RTOL,
) -> float:
    """SVCCA (Raghu et al. 2017): mean canonical correlation between each layer's top principal
    directions: ``n_directions`` of them, or the fewest keeping a fraction ``keep`` of the variance."""
    options = MeasureOptions(rank_rtol=rank_rtol, svcca_keep=keep, svcca_k=n_directions)
    return _one(k, l, "svcca", options)


def pwcca(k: Any, l: Any, *, rank_rtol: float = DEFAULT_RANK_RTOL) -> float:
    """PWCCA (Morcos et al. 2018) with rotation-invariant weights: Σα_iρ_i/Σα_i,
    α_i = ‖X_cᵀh_i‖₂ for the canonical variates h_i of X (the first Gram). Morcos et al. use
    Σ_j|⟨h_i, x_j⟩| over neurons instead, which needs the features (docs/MEASURES.md)."""
    return _one(k, l, "pwcca", MeasureOptions(rank_rtol=rank_rtol))


def regression_r2(k: Any, l: Any, *, rank_rtol: float = DEFAULT_RANK_RTOL) -> float:
    """R² of the least-squares fit of Y from X (Grams K of X, L of Y): tr(P_K L) / tr(L), with
    P_K the projection onto X's centered column space. Swap the arguments for X from Y."""
    return _one(k, l, "regression", MeasureOptions(rank_rtol=rank_rtol))


def mutual_knn(k: Any, l: Any, *, n_neighbors: int = DEFAULT_KNN_K) -> float:
    """Mutual k-NN alignment (Huh et al. 2024): mean over samples of the fraction of its
    ``n_neighbors`` cosine-nearest other samples (centered features) shared by both layers."""
    return _one(k, l, "knn", MeasureOptions(knn_k=n_neighbors))


def cka(
    k: Any,
    l: Any,
    *,
    biased: bool = False,
    kernel: str = "linear",
    threshold: float = 1.0,
) -> float:
    """Linear or RBF CKA from two linear Grams, debiased (HSIC₁) or biased (HSIC₀), by the
    estimator core (:func:`~ckapipe.analyze.estimators.hsic1` / ``hsic0``; the RBF kernel
    matrix by :func:`~ckapipe.analyze.estimators.rbf_from_gram`). NaN (with a warning) for a
    layer with non-positive self-HSIC."""
    import torch

    from ckapipe.analyze.estimators import cka_from_hsic, hsic0, hsic1, rbf_from_gram

    grams = [torch.from_numpy(_check_gram(g, name)) for g, name in ((k, "k"), (l, "l"))]
    if grams[0].shape != grams[1].shape:
        raise ValueError(f"k and l must hold the same samples: shapes {[g.shape for g in grams]}")
    if kernel == "rbf":
        grams = [rbf_from_gram(g, threshold)[0] for g in grams]
    elif kernel != "linear":
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    hsic: Callable[[Any, Any], float] = hsic0 if biased else hsic1
    kk, ll = grams
    value = cka_from_hsic(
        np.array([[hsic(kk, ll)]]),
        np.array([hsic(kk, kk)]),
        np.array([hsic(ll, ll)]),
        layers_a=["k"],
        layers_b=["l"],
    )
    return float(value[0, 0])


def measure_geometries(
    grams: Mapping[str, Any],
    measures: Sequence[str],
    options: MeasureOptions | None = None,
) -> dict[str, LayerGeometry]:
    """:class:`LayerGeometry` of each named Gram, with the parts ``measures`` need."""
    options = options or MeasureOptions()
    return {
        name: LayerGeometry.from_gram(
            gram,
            name,
            options=options,
            spearman="rsa_spearman" in measures,
            knn="knn" in measures,
        )
        for name, gram in grams.items()
    }
