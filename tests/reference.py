"""The one float64 numpy reference of the CKA estimators, shared by every test (never ckapipe code).

Written from the papers' formulas with numpy only; nothing here imports ckapipe. Notation: ``X`` is
(n, p) (trailing axes are flattened), ``K``, ``L`` are (n, n) Gram matrices, ``H = I − 11ᵀ/n``,
``K̃`` is ``K`` with its diagonal set to zero.

- :func:`linear_gram` — ``K = X_c X_cᵀ`` with ``X_c = X − 1 x̄ᵀ`` (column means removed).
- :func:`rbf_gram` — ``K_ij = exp(−‖x_i − x_j‖² / (2σ²))``, ``σ² = threshold² · median(D)`` with
  ``D`` the full n×n squared-distance matrix, zero diagonal included (numpy's median, Kornblith
  et al. 2019).
- :func:`u_centered` — Székely & Rizzo (2014) U-centering, vectorised over leading axes;
  :func:`u_centered_elementwise` is the same definition written entry by entry.
- :func:`hsic0` — Gretton et al. (2005): ``tr(KHLH) / (n − 1)²``.
- :func:`hsic1` — Song et al. (2012) unbiased HSIC as ``⟨Ũ(K), Ũ(L)⟩ / (n(n − 3))``;
  :func:`hsic1_song` is Song et al.'s explicit formula (eq. 5), an independent formulation.
- :func:`cka` — ``h(K, L) / sqrt(h(K, K) h(L, L))`` with ``h`` = HSIC₀ (biased) or HSIC₁
  (debiased); :func:`cka_features` — the biased linear CKA in feature space,
  ``‖Y_cᵀX_c‖²_F / (‖X_cᵀX_c‖_F ‖Y_cᵀY_c‖_F)``.
- :func:`batch_slices`, :func:`minibatch_terms`, :func:`cka_from_terms`, :func:`minibatch_cka`,
  :func:`minibatch_linear_cka` — Nguyen et al. (2021) minibatch CKA
  ``Σ_b HSIC₁(K_b, L_b) / sqrt(Σ_b HSIC₁(K_b, K_b) · Σ_b HSIC₁(L_b, L_b))``, each batch with its
  own ``1/(m_b(m_b − 3))``; a last short batch of ≥ 4 rows is kept, 1–3 leftover rows dropped.

``tests/test_reference.py`` checks the two HSIC₁ formulations, the two U-centerings and the two
biased-CKA forms against each other, so the yardstick itself is verified.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# --------------------------------------------------------------------------- Grams


def _rows(x) -> np.ndarray:
    """(n, ...) array-like → (n, p) float64."""
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def linear_gram(x) -> np.ndarray:
    """Linear Gram of column-centered features: ``K = X_c X_cᵀ``, ``X_c = X − 1 x̄ᵀ``.

    Centering first keeps the products free of cancellation for features with a large offset
    (post-ReLU layers); every centered estimator below is invariant to it.
    """
    x = _rows(x)
    centered = x - x.mean(axis=0)
    return centered @ centered.T


def squared_distances(x) -> np.ndarray:
    """``D_ij = ‖x_i − x_j‖²`` for all n×n pairs (diagonal zero)."""
    x = _rows(x)
    return ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=-1)


def rbf_sigma2(x, threshold: float = 1.0) -> float:
    """Bandwidth rule: ``σ² = threshold² · median(D)``, median over the full n×n matrix ``D``
    of squared distances, the n zeros of its diagonal included (``np.median`` of all n² entries).
    """
    return float(threshold**2 * np.median(squared_distances(x)))


def rbf_gram(x, threshold: float = 1.0) -> np.ndarray:
    """RBF Gram ``K_ij = exp(−D_ij / (2σ²))`` with σ² from :func:`rbf_sigma2`."""
    return np.exp(-squared_distances(x) / (2 * rbf_sigma2(x, threshold)))


# --------------------------------------------------------------------------- centering


def centering_matrix(n: int) -> np.ndarray:
    """``H = I − 11ᵀ/n``."""
    return np.eye(n) - np.ones((n, n)) / n


def u_centered(k: np.ndarray) -> np.ndarray:
    """Székely & Rizzo (2014) U-centering of (..., n, n) Grams (n ≥ 3):

    ``Ũ_ij = K̃_ij − Σ_l K̃_il/(n−2) − Σ_l K̃_lj/(n−2) + Σ_lm K̃_lm/((n−1)(n−2))`` for i ≠ j,
    ``Ũ_ii = 0``, with ``K̃`` = K with zero diagonal. Rows and columns of Ũ sum to zero.
    """
    k = np.array(k, dtype=np.float64)  # a copy
    n = k.shape[-1]
    idx = np.arange(n)
    k[..., idx, idx] = 0.0
    row = k.sum(axis=-1)  # (..., n): Σ_l K̃_il
    column = k.sum(axis=-2)  # (..., n): Σ_l K̃_lj
    total = row.sum(axis=-1)  # (...)
    u = (
        k
        - row[..., :, None] / (n - 2)
        - column[..., None, :] / (n - 2)
        + total[..., None, None] / ((n - 1) * (n - 2))
    )
    u[..., idx, idx] = 0.0
    return u


def u_centered_elementwise(k: np.ndarray) -> np.ndarray:
    """The same U-centering of one (n, n) Gram, written entry by entry with Python loops."""
    n = k.shape[0]
    kt = np.asarray(k, dtype=np.float64) - np.diag(np.diag(k))
    out = np.zeros_like(kt)
    for i in range(n):
        for j in range(n):
            if i != j:
                out[i, j] = (
                    kt[i, j]
                    - kt[i, :].sum() / (n - 2)
                    - kt[:, j].sum() / (n - 2)
                    + kt.sum() / ((n - 1) * (n - 2))
                )
    return out


# --------------------------------------------------------------------------- HSIC


def hsic0(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Biased HSIC₀ (Gretton et al. 2005): ``tr(K H L H) / (n − 1)²``, explicit H matrix."""
    n = k.shape[0]
    h = centering_matrix(n)
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def hsic1(k: np.ndarray, l: np.ndarray):  # noqa: E741
    """Unbiased HSIC₁ (Song et al. 2012) as ``⟨Ũ(K), Ũ(L)⟩ / (n(n − 3))`` (n ≥ 4).

    Vectorised over leading axes: (..., n, n) Grams give (...) values (a numpy scalar for 2-D).
    """
    n = k.shape[-1]
    return (u_centered(k) * u_centered(l)).sum(axis=(-2, -1)) / (n * (n - 3))


def hsic1_u(u: np.ndarray, v: np.ndarray):
    """HSIC₁ of Grams that are already U-centered: ``⟨U, V⟩ / (n(n − 3))``, over leading axes."""
    n = u.shape[-1]
    return (u * v).sum(axis=(-2, -1)) / (n * (n - 3))


def hsic1_song(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. (2012), eq. 5, for one pair of (n, n) Grams (n ≥ 4):

    ``[tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3))``.
    """
    n = k.shape[0]
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    value = (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ kt @ lt @ one)
    )
    return float(value) / (n * (n - 3))


# --------------------------------------------------------------------------- CKA


HsicFn = Callable[[np.ndarray, np.ndarray], float]


def cka_from_grams(
    k: np.ndarray,
    l: np.ndarray,  # noqa: E741
    *,
    unbiased: bool = False,
    unbiased_hsic: HsicFn = hsic1,
) -> float:
    """``h(K, L) / sqrt(h(K, K) · h(L, L))``; h = HSIC₁ if ``unbiased`` else :func:`hsic0`.

    ``unbiased_hsic`` picks the HSIC₁ formulation: :func:`hsic1` (U-centered inner product) or
    :func:`hsic1_song` (Song et al.'s explicit formula, for tests of code that U-centers).
    """
    h = unbiased_hsic if unbiased else hsic0
    return float(h(k, l) / np.sqrt(h(k, k) * h(l, l)))


def cka(
    x,
    y,
    *,
    kernel: str = "linear",
    unbiased: bool = False,
    threshold: float = 1.0,
    unbiased_hsic: HsicFn = hsic1,
) -> float:
    """Full-data CKA of (n, ...) features: biased (HSIC₀) or debiased (HSIC₁), linear or RBF.

    Features are column-centered first (both estimators are translation invariant; it keeps the
    reference free of cancellation for inputs with a large offset). ``unbiased_hsic``: see
    :func:`cka_from_grams`.
    """
    x, y = _rows(x), _rows(y)
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    if kernel == "linear":
        k, l = linear_gram(x), linear_gram(y)  # noqa: E741
    elif kernel == "rbf":
        k, l = rbf_gram(x, threshold), rbf_gram(y, threshold)  # noqa: E741
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return cka_from_grams(k, l, unbiased=unbiased, unbiased_hsic=unbiased_hsic)


def cka_features(x, y) -> float:
    """Biased linear CKA in feature space: ``‖Y_cᵀX_c‖²_F / (‖X_cᵀX_c‖_F · ‖Y_cᵀY_c‖_F)``."""
    x, y = _rows(x), _rows(y)
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


# --------------------------------------------------------------------------- minibatch CKA


def batch_slices(n: int, m: int) -> list[slice]:
    """Consecutive row blocks of size m; the last holds the n mod m remaining rows and is kept
    when it has at least 4 rows, dropped when it has 1–3 (HSIC₁ needs n ≥ 4)."""
    blocks = [slice(start, min(start + m, n)) for start in range(0, n, m)]
    return [b for b in blocks if b.stop - b.start >= 4]


def minibatch_terms(
    batches_a: Sequence[Sequence[np.ndarray]],
    batches_b: Sequence[Sequence[np.ndarray]],
    gram: Callable[[np.ndarray], np.ndarray] = linear_gram,
    hsic: HsicFn = hsic1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-batch HSIC₁ terms over a given partition, pair by pair.

    ``batches_a[b][i]`` is layer i's (m_b, ...) features in batch b (same for ``batches_b``).
    Returns ``hsic`` (B, La, Lb) with ``HSIC₁(K_bi, L_bj)``, ``self_a`` (B, La) with
    ``HSIC₁(K_bi, K_bi)`` and ``self_b`` (B, Lb), each batch with its own 1/(m_b(m_b − 3)).
    ``gram`` maps features to a Gram (per batch, so an RBF bandwidth is per batch); ``hsic`` is
    the HSIC₁ formulation (:func:`hsic1` or :func:`hsic1_song`).
    """
    n_batches, la, lb = len(batches_a), len(batches_a[0]), len(batches_b[0])
    cross = np.zeros((n_batches, la, lb))
    self_a, self_b = np.zeros((n_batches, la)), np.zeros((n_batches, lb))
    for b, (acts_a, acts_b) in enumerate(zip(batches_a, batches_b, strict=True)):
        grams_a = [gram(x) for x in acts_a]
        grams_b = [gram(y) for y in acts_b]
        for i, k in enumerate(grams_a):
            self_a[b, i] = hsic(k, k)
            for j, l in enumerate(grams_b):  # noqa: E741
                cross[b, i, j] = hsic(k, l)
        for j, l in enumerate(grams_b):  # noqa: E741
            self_b[b, j] = hsic(l, l)
    return cross, self_a, self_b


def cka_from_terms(cross: np.ndarray, self_a: np.ndarray, self_b: np.ndarray) -> np.ndarray:
    """``Σ_b cross_b / sqrt(Σ_b self_a,b · Σ_b self_b,b)`` from :func:`minibatch_terms`."""
    return cross.sum(0) / np.sqrt(np.outer(self_a.sum(0), self_b.sum(0)))


def minibatch_cka(
    batches_a: Sequence[Sequence[np.ndarray]],
    batches_b: Sequence[Sequence[np.ndarray]],
    gram: Callable[[np.ndarray], np.ndarray] = linear_gram,
    hsic: HsicFn = hsic1,
) -> np.ndarray:
    """Minibatch CKA matrix (La, Lb) over a given partition (Nguyen et al. 2021):

    ``CKA_ij = Σ_b HSIC₁(K_bi, L_bj) / sqrt(Σ_b HSIC₁(K_bi, K_bi) · Σ_b HSIC₁(L_bj, L_bj))``; the
    arguments are those of :func:`minibatch_terms`.
    """
    return cka_from_terms(*minibatch_terms(batches_a, batches_b, gram, hsic))


def minibatch_linear_cka(x: np.ndarray, y: np.ndarray, m: int) -> float:
    """Unbiased minibatch linear CKA of (n, p) ``x`` and (n, q) ``y`` over consecutive row blocks
    of size ``m`` (:func:`batch_slices`: a short last block of ≥ 4 rows is kept, 1–3 dropped)."""
    blocks = batch_slices(x.shape[0], m)
    return float(minibatch_cka([[x[b]] for b in blocks], [[y[b]] for b in blocks])[0, 0])
