"""Estimator core: Gram matrices, HSIC and CKA, in full and as a mergeable minibatch accumulator.

Every function accepts numpy arrays or torch tensors of any float dtype (float16, bfloat16,
float32, float64) on any device, computes in float64 on the input's device, and leaves tensors
where they are. Features are centered (column means taken in float64) before any Gram is
formed: the centered HSIC₀ and HSIC₁ do not change, and low-precision inputs with a large mean
offset (post-ReLU activations) no longer lose their signal to cancellation.

Notation: ``x`` is (n, p) with n samples; K, L are (n, n) Gram matrices; H = I − 11ᵀ/n.

- HSIC₀ (biased, Gretton et al. 2005): tr(K H L H) / (n − 1)².
- HSIC₁ (unbiased, Song et al. 2012): ⟨Ũ(K), Ũ(L)⟩ / (n (n − 3)), with Ũ the U-centering of
  Székely & Rizzo (2014), see :func:`u_center`. Requires n ≥ 4.
- CKA (Kornblith et al. 2019): HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)).
- Minibatch CKA (Nguyen et al. 2021): Σ_b HSIC₁(K_b, L_b) / sqrt(Σ_b HSIC₁(K_b, K_b) ·
  Σ_b HSIC₁(L_b, L_b)) over minibatches b, see :class:`MinibatchCKA`.

Degenerate input is never turned into a silent number: fewer than 4 samples for HSIC₁,
NaN/Inf values, mismatched sample counts and non-array input raise ``ValueError`` naming the
argument (and the first bad sample); a layer whose self-HSIC is zero (constant or all-zero
activations) or negative gives NaN in its CKA entries plus a :class:`DegenerateLayerWarning`
naming the layer and the value. Nothing is clamped.

References
----------
Gretton, Bousquet, Smola, Schölkopf (2005), Measuring statistical dependence with
Hilbert-Schmidt norms. ALT.
Song, Smola, Gretton, Bedo, Borgwardt (2012), Feature selection via dependence maximization.
JMLR 13.
Székely, Rizzo (2014), Partial distance correlation with methods for dissimilarities.
Annals of Statistics 42(6).
Kornblith, Norouzi, Lee, Hinton (2019), Similarity of neural network representations revisited.
ICML.
Nguyen, Raghu, Kornblith (2021), Do wide and deep networks learn the same things? ICLR.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ckapipe.analyze.cka_ratio import (
    DegenerateLayerWarning,
    broadcast_ratio_cka,
    nonpositive_self_hsic,
    ratio_cka,
    self_hsic_problem,
    warn_degenerate,
)
from ckapipe.errors import DataError

__all__ = [
    "DegenerateLayerWarning",
    "MinibatchCKA",
    "add_centered_products",
    "add_shifted_products",
    "add_tile_products",
    "broadcast_ratio_cka",
    "center_gram",
    "centered_batch_gram",
    "cka",
    "cka_from_hsic",
    "gram_linear",
    "gram_rbf",
    "hsic_normaliser",
    "hsic0",
    "hsic1",
    "nonpositive_self_hsic",
    "numpy_median",
    "ratio_cka",
    "rbf_from_gram",
    "self_hsic_problem",
    "shifted_tile",
    "stacked_hsic1",
    "FullCentering",
    "StreamedMedian",
    "TileWorkspace",
    "u_center",
    "u_centered_gram",
]

ArrayLike = np.ndarray | Tensor
Kernel = Literal["linear", "rbf"]

# Column blocks bound the float64 copy of a wide layer (e.g. 64×112×112 features) to ~128 MiB.
_BLOCK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------- input checks


def _as_tensor(x: ArrayLike, name: str) -> Tensor:
    """Return ``x`` as a torch tensor (numpy arrays are wrapped, tensors untouched)."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiub":
            raise TypeError(f"{name}: expected a real numeric array, got dtype {x.dtype}")
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, Tensor):
        if x.is_complex():
            raise TypeError(f"{name}: expected a real tensor, got dtype {x.dtype}")
        return x
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")


def _check_finite(x: Tensor, name: str) -> None:
    """Raise :class:`~ckapipe.errors.DataError` naming the first sample (row) with NaN or Inf."""
    if x.dtype.is_floating_point:
        bad_rows = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)
        if bool(bad_rows.any()):
            first = int(bad_rows.nonzero()[0, 0])
            raise DataError(
                f"{name} contains NaN or Inf (first at sample {first}, "
                f"{int(bad_rows.sum())} bad samples in all); fix the activations "
                "(e.g. float16 overflow) before computing CKA"
            )


def _features(x: ArrayLike, name: str) -> Tensor:
    """Validate activations and flatten (n, ...) to (n, p); the dtype is kept."""
    t = _as_tensor(x, name)
    if t.ndim < 2:
        raise ValueError(
            f"{name}: expected activations of shape (n_samples, ...), got shape {tuple(t.shape)}; "
            "for a single feature pass x[:, None]"
        )
    if t.shape[0] == 0 or t[0].numel() == 0:
        raise ValueError(f"{name}: empty activations of shape {tuple(t.shape)}")
    t = t.reshape(t.shape[0], -1)
    _check_finite(t, name)
    return t


def _gram(k: ArrayLike, name: str) -> Tensor:
    """Validate an (n, n) Gram matrix and return it as float64 on its device."""
    t = _as_tensor(k, name)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(
            f"{name}: expected a square (n, n) Gram matrix, got shape {tuple(t.shape)}"
        )
    _check_finite(t, name)
    return t.to(torch.float64)


def _same_samples(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must hold the same samples: shapes {tuple(a.shape)} and "
            f"{tuple(b.shape)} differ in the first (sample) dimension"
        )


def _need_two(n: int, what: str) -> None:
    if n < 2:
        raise DataError(
            f"{what}: HSIC₀ needs at least 2 samples (its normaliser is (n-1)²), got n = {n}; "
            "use more samples (and with fewer than 4, no unbiased estimate exists at all)"
        )


def _need_four(n: int, what: str) -> None:
    if n < 4:
        raise DataError(
            f"{what}: HSIC₁ needs at least 4 samples (its normaliser is n(n-3)), got n = {n}; "
            "use more samples per batch"
        )


# --------------------------------------------------------------------------- Gram matrices


def _centered_blocks(x: Tensor):
    """Yield float64 column blocks of the column-centered (n, p) features ``x``.

    The first row is subtracted before the mean so that constant columns become exactly zero
    (a − a = 0), which makes a constant layer's self-HSIC exactly 0 instead of rounding noise.
    """
    n, p = x.shape
    width = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, p, width):
        block = x[:, start : start + width].to(torch.float64)
        block = block - block[:1]
        yield block - block.mean(dim=0, keepdim=True)


def _centered_features(x: Tensor) -> Tensor:
    """(n, p) float64 column-centered features."""
    return torch.cat(list(_centered_blocks(x)), dim=1)


def gram_linear(x: ArrayLike) -> Tensor:
    """Linear Gram matrix of the column-centered features.

    K = X_c X_cᵀ with X_c = X − 1 μᵀ, μ the column means (float64). Centering leaves HSIC₁ and
    the centered HSIC₀ unchanged and removes the float cancellation of uncentered Grams.

    Parameters
    ----------
    x : (n, ...) array or tensor, any float dtype and device; flattened to (n, p).

    Returns
    -------
    Tensor (n, n), float64, on ``x``'s device.
    """
    t = _features(x, "x")
    n = t.shape[0]
    gram = torch.zeros(n, n, dtype=torch.float64, device=t.device)
    add_centered_products(gram, t)
    return gram


def add_centered_products(gram: Tensor, x: Tensor) -> None:
    """Add X_c X_cᵀ to the float64 (n, n) ``gram`` in place, X_c = ``x`` (n, w) column-centered
    in float64 column blocks (first row subtracted before the mean, see :func:`gram_linear`).

    Summed over column slabs of a layer, this is :func:`gram_linear` of the whole layer without
    holding its full width at once.
    """
    for block in _centered_blocks(x):
        gram.addmm_(block, block.T)


def numpy_median(values: Tensor) -> Tensor:
    """Median of a 1-D tensor as numpy computes it: the mean of the two middle values if the
    count is even (``torch.median`` returns the lower one)."""
    count = values.numel()
    upper = torch.kthvalue(values, count // 2 + 1).values
    if count % 2:
        return upper
    lower = torch.kthvalue(values, count // 2).values
    return (lower + upper) / 2


def gram_rbf(
    x: ArrayLike | None = None, *, gram: ArrayLike | None = None, threshold: float = 1.0
) -> Tensor:
    """RBF (Gaussian) Gram matrix with the median bandwidth of Kornblith et al. (2019).

    K_ij = exp(−d²_ij / (2σ²)), d²_ij = G_ii + G_jj − 2 G_ij from the linear Gram G, and
    σ² = threshold² · median(d²) over the full n×n matrix, diagonal zeros included, with
    numpy's median convention (mean of the two middle values for an even count).

    Parameters
    ----------
    x : (n, ...) features; give either ``x`` or ``gram``.
    gram : (n, n) linear Gram matrix (e.g. from :func:`gram_linear`).
    threshold : bandwidth as a multiple of the median distance; must be > 0.

    Returns
    -------
    Tensor (n, n), float64, on the input's device.

    Raises
    ------
    ValueError
        If the median squared distance is 0 (a constant layer, or most samples identical):
        the bandwidth is undefined. Use the linear kernel for such a layer.
    """
    if (x is None) == (gram is None):
        raise ValueError("gram_rbf: pass exactly one of x (features) or gram (linear Gram)")
    if not threshold > 0:
        raise ValueError(f"gram_rbf: threshold must be > 0, got {threshold!r}")
    g = gram_linear(x) if x is not None else _gram(gram, "gram")
    kernel, _ = rbf_from_gram(g, threshold)
    return kernel


def rbf_from_gram(gram: Tensor, threshold: float) -> tuple[Tensor, float]:
    """(K, σ²): the RBF kernel matrix of a float64 (n, n) linear Gram G and its bandwidth.

    d²_ij = G_ii + G_jj − 2 G_ij, σ² = threshold² · numpy-median(d²) over all n² entries
    (diagonal zeros included), K_ij = exp(−d²_ij / (2σ²)). Off-diagonal d² may round to a tiny
    negative for duplicate samples; it is left as is.

    Raises ``ValueError`` when the median squared distance is 0 (the bandwidth is undefined).
    """
    norms = torch.diagonal(gram)
    sq_dist = norms[:, None] + norms[None, :] - 2 * gram
    median = float(numpy_median(sq_dist.reshape(-1)))
    if not median > 0:
        raise ValueError(
            "the median squared distance between samples is 0 (constant layer, or "
            "more than half of the sample pairs identical), so the RBF bandwidth is undefined; "
            "use kernel='linear' for this layer"
        )
    sigma2 = threshold**2 * median
    return torch.exp(-sq_dist / (2 * sigma2)), sigma2


# --------------------------------------------------------------------------- centering, HSIC


def center_gram(k: ArrayLike) -> Tensor:
    """Double-centered Gram H K H, H = I − 11ᵀ/n.

    (HKH)_ij = K_ij − mean_l K_il − mean_l K_lj + mean_kl K_kl.

    Parameters
    ----------
    k : (n, n) Gram matrix.

    Returns
    -------
    Tensor (n, n), float64.
    """
    g = _gram(k, "k")
    return g - g.mean(dim=0, keepdim=True) - g.mean(dim=1, keepdim=True) + g.mean()


def _u_center(g: Tensor) -> Tensor:
    """U-centering of float64 (..., n, n) Grams; see :func:`u_center`."""
    n = g.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=g.device)
    g = g.masked_fill(eye, 0.0)
    row = g.sum(dim=-1, keepdim=True) / (n - 2)  # (..., n, 1)
    col = g.sum(dim=-2, keepdim=True) / (n - 2)  # (..., 1, n)
    total = g.sum(dim=(-2, -1), keepdim=True) / ((n - 1) * (n - 2))
    return (g - row - col + total).masked_fill(eye, 0.0)


def u_center(k: ArrayLike) -> Tensor:
    """U-centered Gram matrix Ũ(K) of Székely & Rizzo (2014).

    With K̃ = K with its diagonal set to 0::

        Ũ_ij = K̃_ij − Σ_l K̃_il / (n−2) − Σ_l K̃_lj / (n−2) + Σ_kl K̃_kl / ((n−1)(n−2)),  i ≠ j
        Ũ_ii = 0

    so that ⟨Ũ(K), Ũ(L)⟩ / (n(n−3)) is the unbiased HSIC₁ of Song et al. (2012). Ũ has zero row
    sums, so it is unchanged when a constant vector is added to every feature row.

    Parameters
    ----------
    k : (n, n) Gram matrix, n ≥ 4.

    Returns
    -------
    Tensor (n, n), float64.
    """
    g = _gram(k, "k")
    _need_four(g.shape[0], "u_center")
    return _u_center(g)


def hsic0(k: ArrayLike, l: ArrayLike) -> float:  # noqa: E741 - the paper's name for the Gram
    """Biased HSIC₀ (Gretton et al. 2005): tr(K H L H) / (n − 1)².

    Parameters
    ----------
    k, l : (n, n) Gram matrices of the same samples.

    Returns
    -------
    float
    """
    kc, lg = center_gram(k), _gram(l, "l")
    _same_samples(kc, lg, "k", "l")
    n = kc.shape[0]
    _need_two(n, "hsic0")
    # tr(KHLH) = ⟨HKH, L⟩ because H is symmetric and idempotent.
    return float((kc * lg).sum()) / (n - 1) ** 2


def hsic1(k: ArrayLike, l: ArrayLike) -> float:  # noqa: E741
    """Unbiased HSIC₁ (Song et al. 2012) as ⟨Ũ(K), Ũ(L)⟩ / (n (n − 3)).

    Equal to (1 / (n(n−3))) [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] with
    K̃, L̃ the Grams with zeroed diagonals; Ũ is the U-centering of :func:`u_center`.

    Parameters
    ----------
    k, l : (n, n) Gram matrices of the same samples, n ≥ 4.

    Returns
    -------
    float (may be negative: it is an unbiased estimate)
    """
    kg, lg = _gram(k, "k"), _gram(l, "l")
    _same_samples(kg, lg, "k", "l")
    n = kg.shape[0]
    _need_four(n, "hsic1")
    return float((_u_center(kg) * _u_center(lg)).sum()) / (n * (n - 3))


# --------------------------------------------------------------------------- CKA


def cka_from_hsic(
    hsic: ArrayLike,
    self_a: ArrayLike,
    self_b: ArrayLike,
    *,
    layers_a: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
) -> np.ndarray:
    """CKA = hsic / sqrt(self_a ⊗ self_b), NaN where a self term is not positive.

    Parameters
    ----------
    hsic : (..., La, Lb) cross HSIC values (sums over batches, or resampled sums).
    self_a : (..., La) self-HSIC of the layers of model a.
    self_b : (..., Lb) self-HSIC of the layers of model b.
    layers_a, layers_b : layer names for the warning (default ``a[i]`` / ``b[j]``).

    Returns
    -------
    ndarray (..., La, Lb), float64.

    Warns
    -----
    DegenerateLayerWarning
        For every layer whose self term is zero (constant or all-zero activations), negative
        (reported with its value, never clamped) or NaN. Its row (column) of the result is NaN.
    """
    h = np.asarray(hsic.cpu() if isinstance(hsic, Tensor) else hsic, dtype=np.float64)
    sa = np.asarray(self_a.cpu() if isinstance(self_a, Tensor) else self_a, dtype=np.float64)
    sb = np.asarray(self_b.cpu() if isinstance(self_b, Tensor) else self_b, dtype=np.float64)
    if h.ndim < 2 or sa.shape[-1:] != h.shape[-2:-1] or sb.shape[-1:] != h.shape[-1:]:
        raise ValueError(
            f"cka_from_hsic: shapes do not fit: hsic {h.shape} must be (..., La, Lb) with "
            f"self_a {sa.shape} (..., La) and self_b {sb.shape} (..., Lb)"
        )
    names_a = list(layers_a) if layers_a is not None else [f"a[{i}]" for i in range(sa.shape[-1])]
    names_b = list(layers_b) if layers_b is not None else [f"b[{j}]" for j in range(sb.shape[-1])]
    if len(names_a) != sa.shape[-1] or len(names_b) != sb.shape[-1]:
        raise ValueError(
            f"cka_from_hsic: {len(names_a)} layers_a and {len(names_b)} layers_b names for "
            f"hsic of shape {h.shape}"
        )
    warn_degenerate(sa, names_a)
    warn_degenerate(sb, names_b)
    return ratio_cka(h, sa, sb)


def _hsic_triplet_grams(k: Tensor, l: Tensor, unbiased: bool) -> tuple[float, float, float]:  # noqa: E741
    """(HSIC(K,L), HSIC(K,K), HSIC(L,L)) from float64 (n, n) Grams, centering each Gram once.

    HSIC₁ = ⟨Ũ(K), Ũ(L)⟩ / (n(n−3)); HSIC₀ = ⟨HKH, HLH⟩ / (n−1)² = tr(KHLH) / (n−1)².
    """
    n = k.shape[0]
    if unbiased:
        kc, lc, norm = _u_center(k), _u_center(l), n * (n - 3)
    else:
        kc, lc, norm = center_gram(k), center_gram(l), (n - 1) ** 2
    xy, xx, yy = (float((a * b).sum()) / norm for a, b in ((kc, lc), (kc, kc), (lc, lc)))
    return xy, xx, yy


def _hsic_triplet_linear_features(
    x: Tensor, y: Tensor, *, unbiased: bool
) -> tuple[float, float, float]:
    """(HSIC(K,L), HSIC(K,K), HSIC(L,L)) for K = XXᵀ, L = YYᵀ without forming n×n Grams.

    With column-centered X, Y (so K1 = 0), d_x = row norms² of X, s_x = ||X||_F²:
    tr(KL) = ||XᵀY||_F²; tr(K̃L̃) = ||XᵀY||_F² − d_x·d_y; 1ᵀK̃1 = −s_x; K̃1 = −d_x; hence
    n(n−3)·HSIC₁ = ||XᵀY||_F² − d_x·d_y + s_x s_y/((n−1)(n−2)) − 2 d_x·d_y/(n−2) and
    (n−1)²·HSIC₀ = ||XᵀY||_F².
    """
    xc, yc = _centered_features(x), _centered_features(y)
    n = xc.shape[0]

    def pair(a: Tensor, b: Tensor) -> float:
        cross = float(torch.linalg.matrix_norm(a.T @ b) ** 2)
        if not unbiased:
            return cross / (n - 1) ** 2
        da, db = (a * a).sum(dim=1), (b * b).sum(dim=1)
        dd = float(da @ db)
        total = float(da.sum()) * float(db.sum()) / ((n - 1) * (n - 2))
        return (cross - dd + total - 2 * dd / (n - 2)) / (n * (n - 3))

    return pair(xc, yc), pair(xc, xc), pair(yc, yc)


def cka(
    x: ArrayLike,
    y: ArrayLike,
    *,
    kernel: Kernel = "linear",
    threshold: float = 1.0,
    unbiased: bool = False,
) -> float:
    """Centered Kernel Alignment between two representations of the same n samples.

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)) with HSIC₀ (``unbiased=False``, Kornblith
    et al. 2019) or HSIC₁ (``unbiased=True``, Song et al. 2012; needs n ≥ 4). For the linear
    kernel with fewer features than samples in both inputs the feature-space form is used
    (||YᵀX||_F² etc., O(n p q) instead of O(n² (p + q))); it equals the Gram form.

    Parameters
    ----------
    x : (n, p) or (n, ...) activations, flattened to (n, p); numpy or torch, any float dtype.
    y : (n, q) or (n, ...) activations of the same samples.
    kernel : "linear" or "rbf" (median bandwidth, see :func:`gram_rbf`).
    threshold : RBF bandwidth multiple (ignored for the linear kernel).
    unbiased : use the debiased estimator (HSIC₁) instead of the biased HSIC₀.

    Returns
    -------
    float. NaN, with a :class:`DegenerateLayerWarning` naming ``x`` or ``y``, when a self-HSIC
    is zero (constant or all-zero input) or negative; never clamped.

    Raises
    ------
    ValueError
        Different sample counts, NaN/Inf values (names the first bad sample), n < 4 with
        ``unbiased=True``, an unknown kernel, or an RBF bandwidth of 0.
    """
    xt, yt = _features(x, "x"), _features(y, "y")
    _same_samples(xt, yt, "x", "y")
    n = xt.shape[0]
    _need_two(n, "cka")
    if unbiased:
        _need_four(n, "cka(unbiased=True)")
    if kernel == "linear" and xt.shape[1] < n and yt.shape[1] < n:
        xy, xx, yy = _hsic_triplet_linear_features(xt, yt, unbiased=unbiased)
    else:
        xy, xx, yy = _hsic_triplet_grams(
            _kernel_gram(xt, kernel, threshold), _kernel_gram(yt, kernel, threshold), unbiased
        )
    ratio = cka_from_hsic(
        np.array([[xy]]), np.array([xx]), np.array([yy]), layers_a=["x"], layers_b=["y"]
    )
    return float(ratio[0, 0])


def _kernel_gram(x: ArrayLike, kernel: str, threshold: float) -> Tensor:
    if kernel == "linear":
        return gram_linear(x)
    if kernel == "rbf":
        return gram_rbf(x, threshold=threshold)
    raise ValueError(f"unknown kernel {kernel!r}; use 'linear' or 'rbf'")


def u_centered_gram(x: ArrayLike, *, kernel: Kernel = "linear", threshold: float = 1.0) -> Tensor:
    """U-centered Gram Ũ(K) of one batch of one layer: what a Gram cache stores.

    Parameters
    ----------
    x : (m, ...) activations, flattened to (m, p); m ≥ 4.
    kernel : "linear" or "rbf".
    threshold : RBF bandwidth multiple.

    Returns
    -------
    Tensor (m, m), float64, on ``x``'s device; zero diagonal and zero row sums.
    """
    g = gram_linear(x)
    _need_four(g.shape[0], "u_centered_gram")
    return centered_batch_gram(g, kernel=kernel, threshold=threshold)


class TileWorkspace:
    """A reusable buffer for the converted, shifted tile of :func:`add_shifted_products`.

    A fresh tile of 32 MiB or more (256 × 16384 float64, 256 × 32768 float32) is above glibc's
    largest mmap threshold, so each one is mapped and page-faulted anew: measured 25 ms for the
    256 × 16384 float16 → float64 conversion against 6 ms into a reused buffer, next to 53 ms
    for its product (bench/RESULTS.md, GEMM floor section). One workspace per loop of products;
    it grows to the largest tile and is not thread-safe.
    """

    def __init__(self) -> None:
        self._flat: Tensor | None = None

    def tensor(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> Tensor:
        """An uninitialised ``shape`` tensor in the buffer, valid until the next call."""
        count = shape[0] * shape[1]
        flat = self._flat
        if flat is None or flat.numel() < count or flat.dtype != dtype or flat.device != device:
            flat = self._flat = torch.empty(count, dtype=dtype, device=device)
        return flat[:count].view(shape)


def shifted_tile(
    tile: Tensor, product_dtype: torch.dtype = torch.float64, workspace: TileWorkspace | None = None
) -> Tensor:
    """X' = ``tile`` (m, w) minus its first row, in ``product_dtype``: the operand of
    :func:`add_tile_products`. A new tensor, or the ``workspace``'s buffer (valid until its next
    use); ``tile`` is never modified."""
    if workspace is None:
        x = tile.to(product_dtype)
        if x.data_ptr() == tile.data_ptr():
            x = x.clone()  # same dtype as given: do not shift the caller's buffer in place
    else:
        x = workspace.tensor((tile.shape[0], tile.shape[1]), product_dtype, tile.device)
        x.copy_(tile)  # the same cast as ``tile.to``
    x -= x[:1].clone()  # in place: one copy of the tile at a time, not two
    return x


def add_tile_products(gram: Tensor, x: Tensor) -> None:
    """Add X'X'ᵀ to ``gram`` (m, m) float64 in place: float64 ``x`` in one ``addmm_``, float32
    ``x`` multiplied in float32 and the product added in float64."""
    if x.dtype == torch.float64:
        gram.addmm_(x, x.T)
    else:
        gram += x @ x.T


def add_shifted_products(
    gram: Tensor,
    tile: Tensor,
    product_dtype: torch.dtype = torch.float64,
    workspace: TileWorkspace | None = None,
) -> None:
    """Add X'X'ᵀ to ``gram`` (m, m) float64 in place, X' = ``tile`` (m, w) minus its first row.

    Summed over column tiles of a batch, this is the linear Gram of the batch's features shifted
    by its first row: the Gram a cache builds without holding a batch's full width at once. The
    shift does the job of centering for everything computed from it (Ũ(K) removes any row and
    column offsets of K, and RBF distances do not see a shift), while it removes the large
    common offset (post-ReLU means) that makes uncentered entries huge and their differences
    cancel; a constant column becomes exactly 0. ``product_dtype`` float32 multiplies in float32
    (about 2x faster on a CPU) and still sums in float64. ``tile`` is never modified.
    ``workspace`` (a :class:`TileWorkspace`) holds X' instead of a fresh tensor per call: the
    same values, without mapping new memory for every wide tile. The two halves,
    :func:`shifted_tile` and :func:`add_tile_products`, may run on different threads.
    """
    add_tile_products(gram, shifted_tile(tile, product_dtype, workspace))


def centered_batch_gram(
    gram: ArrayLike, *, kernel: Kernel = "linear", threshold: float = 1.0
) -> Tensor:
    """Ũ(K) of one batch from its linear Gram: what a Gram cache stores per batch and layer.

    Parameters
    ----------
    gram : (m, m) linear Gram of the batch's features, column-centered or shifted by any
        constant row (e.g. from :func:`gram_linear` or :func:`add_shifted_products`); m ≥ 4.
    kernel : "linear" (K = gram) or "rbf" (K from :func:`gram_rbf` with the batch's own median
        bandwidth).
    threshold : RBF bandwidth multiple.

    Returns
    -------
    Tensor (m, m), float64; zero diagonal and zero row sums.

    Raises
    ------
    ValueError
        An unknown kernel, m < 4, or an undefined RBF bandwidth (see :func:`gram_rbf`).
    """
    g = _gram(gram, "gram")
    _need_four(g.shape[0], "centered_batch_gram")
    if kernel == "rbf":
        g = gram_rbf(gram=g, threshold=threshold)
    elif kernel != "linear":
        raise ValueError(f"unknown kernel {kernel!r}; use 'linear' or 'rbf'")
    return _u_center(g)


def stacked_hsic1(flat_a: Tensor, flat_b: Tensor, m: int) -> Tensor:
    """HSIC₁ of every row pair of two stacks of flattened U-centered Grams of one batch.

    HSIC₁(K_i, L_j) = ⟨Ũ(K_i), Ũ(L_j)⟩ / (m(m−3)), for all i, j at once as one product:
    (La, m²) @ (m², Lb) / (m(m−3)). Rows are Ũ(K) flattened (float64, same device).

    Returns
    -------
    Tensor (La, Lb), float64.
    """
    scale = 1.0 / (m * (m - 3))
    if flat_a is flat_b and flat_a.device.type == "cpu" and not flat_a.requires_grad:
        # numpy hands A·Aᵀ to BLAS syrk: half the multiplications of a general product (torch
        # has no syrk), and an exactly symmetric result
        rows = flat_a.numpy()
        return torch.from_numpy(rows @ rows.T) * scale
    return flat_a @ flat_b.T * scale


def hsic_normaliser(n: int, *, biased: bool) -> float:
    """The factor that turns ⟨centered K, centered L⟩ into HSIC: 1/(n−1)² for HSIC₀, 1/(n(n−3))
    for HSIC₁."""
    return 1.0 / (n - 1) ** 2 if biased else 1.0 / (n * (n - 3))


@dataclass
class FullCentering:
    """What it takes to center any row block of one layer's n×n kernel matrix (full mode).

    Built from the layer's (n, n) linear Gram (:meth:`from_gram`), so that the centered kernel
    matrix is never held whole; :meth:`center_rows` gives rows of it from rows of the Gram.

    - HSIC₁ (U-centering, Székely & Rizzo 2014), with K̃ = K with a zero diagonal and r its row
      sums: Ũ_ij = K̃_ij − r_i/(n−2) − r_j/(n−2) + Σr/((n−1)(n−2)), Ũ_ii = 0;
      HSIC₁ = ⟨Ũ(K), Ũ(L)⟩ / (n(n−3)).
    - HSIC₀ (double centering) with μ the row means: (HKH)_ij = K_ij − μ_i − μ_j + mean(μ);
      HSIC₀ = ⟨HKH, HLH⟩ / (n−1)².
    - RBF: K from the Gram with σ² = threshold² · median of all n² squared distances
      (:func:`rbf_from_gram`); rows of K are rebuilt from rows of the Gram and its diagonal.
    """

    biased: bool
    kernel: str
    row_stat: Tensor  # (n,): r (HSIC₁) or μ (HSIC₀)
    total: float
    diagonal: Tensor  # (n,) diagonal of the linear Gram (RBF distances)
    sigma2: float

    @classmethod
    def from_gram(
        cls, gram: Tensor, *, biased: bool, kernel: Kernel, threshold: float
    ) -> FullCentering:
        """Statistics of float64 (n, n) linear Gram ``gram``; ``ValueError`` for an undefined
        RBF bandwidth."""
        n = gram.shape[0]
        diagonal = torch.diagonal(gram).clone()
        sigma2 = float("nan")
        kmat = gram
        if kernel == "rbf":
            kmat, sigma2 = rbf_from_gram(gram, threshold)
        if biased:
            row_stat = kmat.mean(dim=1)
            total = float(row_stat.mean())
        else:
            row_stat = kmat.sum(dim=1) - torch.diagonal(kmat)
            total = float(row_stat.sum()) / ((n - 1) * (n - 2))
        return cls(biased, kernel, row_stat, total, diagonal, sigma2)

    @classmethod
    def from_sums(
        cls,
        row_sums: Tensor,
        kernel_diagonal: Tensor,
        gram_diagonal: Tensor,
        *,
        biased: bool,
        kernel: Kernel,
        sigma2: float = float("nan"),
    ) -> FullCentering:
        """Statistics from streamed sums: the (n,) row sums and diagonal of the kernel matrix K
        (float64, e.g. summed tile by tile), the diagonal of the linear Gram, and (RBF) σ².

        Equal to :meth:`from_gram` of the assembled matrix, up to the order of summation."""
        n = row_sums.shape[0]
        if biased:
            row_stat = row_sums / n
            total = float(row_stat.mean())
        else:
            row_stat = row_sums - kernel_diagonal
            total = float(row_stat.sum()) / ((n - 1) * (n - 2))
        return cls(biased, kernel, row_stat, total, gram_diagonal, float(sigma2))

    def kernel_tile(self, tile: Tensor, row0: int, col0: int) -> Tensor:
        """Block [row0:row0+a, col0:col0+b] of the kernel matrix K from the same block of the
        linear Gram (a new tensor; RBF rebuilt from the Gram and its diagonal)."""
        return kernel_tile(tile, row0, col0, self.kernel, self.diagonal, self.sigma2)

    def center_tile(self, tile: Tensor, row0: int, col0: int) -> Tensor:
        """Block [row0:row0+a, col0:col0+b] of the centered kernel matrix (Ũ(K) or HKH) from
        the same block of the linear Gram. Entries on the matrix diagonal (i == j) of Ũ are 0."""
        a, b = tile.shape
        kmat = self.kernel_tile(tile, row0, col0)
        r = self.row_stat
        if self.biased:
            return kmat - r[row0 : row0 + a, None] - r[None, col0 : col0 + b] + self.total
        n = r.shape[0]
        diagonal = _diagonal_index(a, b, row0, col0, tile.device)
        kmat[diagonal] = 0.0
        centered = (
            kmat - r[row0 : row0 + a, None] / (n - 2) - r[None, col0 : col0 + b] / (n - 2)
        ) + self.total
        centered[diagonal] = 0.0
        return centered

    def center_rows(self, rows: Tensor, start: int) -> Tensor:
        """Rows ``start:start+k`` of the centered kernel matrix, from the same rows of the Gram."""
        return self.center_tile(rows, start, 0)


def kernel_tile(
    tile: Tensor, row0: int, col0: int, kernel: str, diagonal: Tensor, sigma2: float
) -> Tensor:
    """Block [row0:row0+a, col0:col0+b] of K (a new float64 tensor) from the same block of the
    linear Gram G: G itself (linear), or exp(−d²/(2σ²)) with d²_ij = G_ii + G_jj − 2 G_ij (RBF,
    the same expression as :func:`rbf_from_gram`)."""
    a, b = tile.shape
    if kernel == "rbf":
        return torch.exp(-squared_distance_tile(tile, row0, col0, diagonal) / (2 * sigma2))
    return tile.to(torch.float64, copy=True)


def squared_distance_tile(tile: Tensor, row0: int, col0: int, diagonal: Tensor) -> Tensor:
    """d²_ij = G_ii + G_jj − 2 G_ij of a block of the linear Gram (as in :func:`rbf_from_gram`)."""
    a, b = tile.shape
    return diagonal[row0 : row0 + a, None] + diagonal[None, col0 : col0 + b] - 2 * tile


def _diagonal_index(a: int, b: int, row0: int, col0: int, device: Any) -> tuple[Tensor, Tensor]:
    """(rows, cols) of the block entries that lie on the matrix diagonal (global i == j)."""
    first, last = max(row0, col0), min(row0 + a, col0 + b)
    index = torch.arange(first, max(first, last), device=device)
    return index - row0, index - col0


class StreamedMedian:
    """Exact median (numpy's convention) of values seen in chunks, over a few passes.

    For n×n matrices too big to hold (the RBF bandwidth of a full-mode Gram): a radix selection
    on the float64 bit patterns, 16 bits per pass, so at most 4 passes over the values give the
    exact middle value(s), with 65 536 counters of memory. Usage::

        median = StreamedMedian(count)
        while not median.done:
            for values, weight in chunks():  # the same values every pass
                median.add(values, weight)
            median.next_pass()
        median.value

    ``weight`` counts each value that many times (a symmetric matrix's off-diagonal tile once
    for both halves). NaN values are not allowed.
    """

    _BITS = 16

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError(f"StreamedMedian: count must be >= 1, got {count}")
        self.count = int(count)
        # 0-based ranks of the middle value(s): numpy averages the two middle ones if even
        ranks = [(count - 1) // 2, count // 2]
        self._ranks = sorted(set(ranks))
        self._remaining = {rank: rank for rank in self._ranks}  # rank within the prefix
        self._prefix = {rank: 0 for rank in self._ranks}
        self._shift = 64 - self._BITS  # bits below the digit of this pass
        self._counts = {rank: np.zeros(1 << self._BITS, np.int64) for rank in self._ranks}
        self._seen = 0

    @property
    def done(self) -> bool:
        return self._shift < 0

    def add(self, values: Tensor | np.ndarray, weight: int = 1) -> None:
        """Count a chunk of the values in this pass."""
        data = values.detach().cpu().numpy() if isinstance(values, Tensor) else values
        keys = _sortable_keys(np.asarray(data, dtype=np.float64).reshape(-1))
        self._seen += keys.size * int(weight)
        digit_mask = np.uint64((1 << self._BITS) - 1)
        digits = ((keys >> np.uint64(self._shift)) & digit_mask).astype(np.int64)
        high = self._shift + self._BITS
        done_prefixes: dict[int, np.ndarray] = {}
        for rank in self._ranks:
            prefix = self._prefix[rank]
            if prefix not in done_prefixes:
                if high >= 64:
                    selected = digits
                else:
                    selected = digits[(keys >> np.uint64(high)) == np.uint64(prefix)]
                done_prefixes[prefix] = np.bincount(selected, minlength=1 << self._BITS)
            self._counts[rank] += done_prefixes[prefix] * int(weight)

    def next_pass(self) -> None:
        """Fix one more 16-bit digit of each middle value from this pass's counts."""
        if self._seen != self.count and self._shift == 64 - self._BITS:
            raise ValueError(
                f"StreamedMedian: {self._seen} values were added in the first pass, expected "
                f"{self.count}"
            )
        for rank in self._ranks:
            cumulative = np.cumsum(self._counts[rank])
            digit = int(np.searchsorted(cumulative, self._remaining[rank], side="right"))
            before = int(cumulative[digit - 1]) if digit else 0
            self._remaining[rank] -= before
            self._prefix[rank] = (self._prefix[rank] << self._BITS) | digit
            self._counts[rank][:] = 0
        self._shift -= self._BITS
        self._seen = 0

    @property
    def value(self) -> float:
        """The median: the middle value, or the mean of the two middle values (even count)."""
        if not self.done:
            raise ValueError("StreamedMedian: passes are not finished (see done)")
        middle = [_float_of_key(self._prefix[rank]) for rank in self._ranks]
        return middle[0] if len(middle) == 1 else (middle[0] + middle[1]) / 2


def _sortable_keys(values: np.ndarray) -> np.ndarray:
    """uint64 keys whose unsigned order is the float64 order (sign bit flipped for positives,
    all bits flipped for negatives)."""
    bits = values.view(np.uint64)
    sign = np.uint64(1 << 63)
    return np.where(bits & sign, ~bits, bits | sign)


def _float_of_key(key: int) -> float:
    sign = 1 << 63
    bits = key ^ sign if key & sign else ~key & ((1 << 64) - 1)
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


# --------------------------------------------------------------------------- minibatch CKA


class MinibatchCKA:
    """Minibatch CKA accumulator (Nguyen et al. 2021) for every layer pair of two models.

    CKA_ij = Σ_b HSIC₁(K_bi, L_bj) / sqrt(Σ_b HSIC₁(K_bi, K_bi) · Σ_b HSIC₁(L_bj, L_bj)),
    summed over minibatches b of m_b ≥ 4 samples, HSIC₁ = ⟨Ũ(K), Ũ(L)⟩ / (m_b (m_b − 3)).
    Each batch carries its own 1/(m_b(m_b − 3)) factor, so batches of different sizes (a short
    last batch) are weighted correctly. Per batch, each layer's Ũ(K) is flattened into a row;
    all cross terms come from one product (La, m²) @ (m², Lb), the self terms from row-wise
    dot products. Grams are formed in float64 from column-centered features.

    State (torchmetrics ``Metric`` style): the per-batch values, reduced by concatenation on
    :meth:`merge`; the sums are derived from them, so a merge of accumulators over disjoint
    batches equals one accumulator that saw all of them.

    Parameters
    ----------
    layers_a : layer names of model a (La).
    layers_b : layer names of model b (Lb); ``None`` for a self-comparison (a vs a), where
        ``update`` takes only ``acts_a`` and ``self_b`` equals ``self_a``.
    kernel : "linear" or "rbf", used by :meth:`update` (ignored by :meth:`update_grams`).
    threshold : RBF bandwidth multiple.
    """

    def __init__(
        self,
        layers_a: Sequence[str],
        layers_b: Sequence[str] | None = None,
        *,
        kernel: Kernel = "linear",
        threshold: float = 1.0,
    ) -> None:
        self.layers_a = _layer_names(layers_a, "layers_a")
        self.layers_b = None if layers_b is None else _layer_names(layers_b, "layers_b")
        if kernel not in ("linear", "rbf"):
            raise ValueError(f"MinibatchCKA: unknown kernel {kernel!r}; use 'linear' or 'rbf'")
        self.kernel = kernel
        self.threshold = float(threshold)
        self.reset()

    # ---- state
    def reset(self) -> None:
        """Forget every batch."""
        self._hsic: list[np.ndarray] = []  # B × (La, Lb)
        self._self_a: list[np.ndarray] = []  # B × (La,)
        self._self_b: list[np.ndarray] = []  # B × (Lb,)
        self._batch_sizes: list[int] = []

    @property
    def is_self_comparison(self) -> bool:
        return self.layers_b is None

    @property
    def n_batches(self) -> int:
        return len(self._batch_sizes)

    @property
    def n_samples(self) -> int:
        return sum(self._batch_sizes)

    @property
    def hsic(self) -> np.ndarray:
        """(La, Lb) float64: Σ_b HSIC₁ of every layer pair."""
        return self.per_batch()[0].sum(axis=0)

    @property
    def self_a(self) -> np.ndarray:
        """(La,) float64: Σ_b HSIC₁(K, K) of model a's layers."""
        return self.per_batch()[1].sum(axis=0)

    @property
    def self_b(self) -> np.ndarray:
        """(Lb,) float64: Σ_b HSIC₁(L, L) of model b's layers."""
        return self.per_batch()[2].sum(axis=0)

    def per_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per-batch values, for intervals over batches.

        Returns
        -------
        hsic (B, La, Lb), self_a (B, La), self_b (B, Lb) float64, batch_sizes (B,) int64.
        """
        la = len(self.layers_a)
        lb = la if self.layers_b is None else len(self.layers_b)
        if not self._batch_sizes:
            return (
                np.zeros((0, la, lb)),
                np.zeros((0, la)),
                np.zeros((0, lb)),
                np.zeros(0, np.int64),
            )
        return (
            np.stack(self._hsic),
            np.stack(self._self_a),
            np.stack(self._self_b),
            np.asarray(self._batch_sizes, dtype=np.int64),
        )

    # ---- update
    def update(
        self,
        acts_a: Mapping[str, ArrayLike] | Sequence[ArrayLike],
        acts_b: Mapping[str, ArrayLike] | Sequence[ArrayLike] | None = None,
    ) -> None:
        """Add one batch of raw activations.

        Parameters
        ----------
        acts_a : model a's activations, a mapping layer name → (m, ...) array (any float dtype,
            flattened to (m, p)) or a sequence in ``layers_a`` order.
        acts_b : the same for model b; must be ``None`` for a self-comparison.
        """
        grams_a = self._grams(acts_a, self.layers_a, "acts_a")
        grams_b = None
        if self.layers_b is None:
            if acts_b is not None:
                raise ValueError("self-comparison (layers_b=None): pass only acts_a")
        else:
            if acts_b is None:
                raise ValueError("acts_b is required: this accumulator compares two models")
            grams_b = self._grams(acts_b, self.layers_b, "acts_b")
            if grams_a.shape[1] != grams_b.shape[1]:
                raise ValueError(
                    f"acts_a and acts_b must hold the same samples: batches of "
                    f"{grams_a.shape[1]} and {grams_b.shape[1]} samples"
                )
        self._add(grams_a, grams_b)

    def update_grams(self, grams_a: ArrayLike, grams_b: ArrayLike | None = None) -> None:
        """Add one batch of already U-centered Grams (see :func:`u_centered_gram`).

        Parameters
        ----------
        grams_a : (La, m, m) Ũ(K) of model a's layers, any float dtype.
        grams_b : (Lb, m, m) Ũ(L) of model b's layers; ``None`` for a self-comparison.
        """
        ga = self._check_grams(grams_a, self.layers_a, "grams_a")
        gb = None
        if self.layers_b is None:
            if grams_b is not None:
                raise ValueError("self-comparison (layers_b=None): pass only grams_a")
        else:
            if grams_b is None:
                raise ValueError("grams_b is required: this accumulator compares two models")
            gb = self._check_grams(grams_b, self.layers_b, "grams_b")
            if ga.shape[1:] != gb.shape[1:]:
                raise ValueError(
                    f"grams_a {tuple(ga.shape)} and grams_b {tuple(gb.shape)} must be Grams of "
                    "the same batch (same m)"
                )
        self._add(ga, gb, value_check=("grams_a", "grams_b"))

    def _grams(
        self, acts: Mapping[str, ArrayLike] | Sequence[ArrayLike], names: list[str], arg: str
    ) -> Tensor:
        """(L, m, m) float64 U-centered Grams of one batch, in layer order."""
        if isinstance(acts, Mapping):
            missing = [n for n in names if n not in acts]
            extra = [k for k in acts if k not in names]
            if missing or extra:
                raise ValueError(
                    f"{arg}: layer names do not match the accumulator: missing {missing}, "
                    f"unexpected {extra}; expected {names}"
                )
            items = [(n, acts[n]) for n in names]
        else:
            if len(acts) != len(names):
                raise ValueError(f"{arg}: got {len(acts)} layers, expected {len(names)}: {names}")
            items = list(zip(names, acts, strict=True))
        feats = [_features(a, f"{arg}[{n!r}]") for n, a in items]
        m = feats[0].shape[0]
        for (n, _), f in zip(items, feats, strict=True):
            if f.shape[0] != m:
                raise ValueError(
                    f"{arg}[{n!r}] has {f.shape[0]} samples but {arg}[{items[0][0]!r}] has {m}; "
                    "every layer of a batch must hold the same samples"
                )
        _need_four(m, f"{arg}: batch")
        return torch.stack(
            [u_centered_gram(f, kernel=self.kernel, threshold=self.threshold) for f in feats]
        )

    @staticmethod
    def _check_grams(grams: ArrayLike, names: list[str], arg: str) -> Tensor:
        """(L, m, m) float64 Grams with their shape checked; their values are checked by
        :meth:`_check_values` once the products are formed."""
        g = _as_tensor(grams, arg)
        if g.ndim != 3 or g.shape[1] != g.shape[2] or g.shape[0] != len(names):
            raise ValueError(
                f"{arg}: expected ({len(names)}, m, m) U-centered Grams for layers {names}, "
                f"got shape {tuple(g.shape)}"
            )
        _need_four(g.shape[1], f"{arg}: batch")
        return g.to(torch.float64)

    @staticmethod
    def _check_values(g: Tensor, self_hsic: Tensor, names: list[str], arg: str) -> None:
        """Refuse NaN/Inf values and a nonzero diagonal (a Gram that is not U-centered).

        A NaN or Inf anywhere in a layer's Gram makes its self product ⟨Ũ, Ũ⟩ NaN or Inf, so
        the elementwise pass over all Grams (as slow as the product itself) runs only when a
        self term is not finite or a diagonal is not zero, and names the first bad layer.
        """
        zero_diagonal = torch.diagonal(g, dim1=1, dim2=2).eq(0).all(dim=1)  # (L,)
        fine = torch.stack([zero_diagonal, torch.isfinite(self_hsic)]).all()
        if bool(fine):  # one device sync per batch
            return
        finite = torch.isfinite(g).flatten(1).all(dim=1)  # (L,)
        ok = torch.stack([finite, zero_diagonal]).cpu()
        for i, name in enumerate(names):
            if not ok[0, i]:
                raise ValueError(f"{arg}: the Gram of layer {name!r} contains NaN or Inf")
            if not ok[1, i]:
                raise ValueError(
                    f"{arg}: the Gram of layer {name!r} has a nonzero diagonal, so it is not "
                    "U-centered; pass u_center(K) or u_centered_gram(x)"
                )

    def _add(
        self, grams_a: Tensor, grams_b: Tensor | None, value_check: tuple[str, str] | None = None
    ) -> None:
        la, m = grams_a.shape[0], grams_a.shape[1]
        scale = 1.0 / (m * (m - 3))
        flat_a = grams_a.reshape(la, m * m)  # (La, m*m)
        if grams_b is None:
            cross = stacked_hsic1(flat_a, flat_a, m)  # (La, La)
            self_a = torch.diagonal(cross)
            self_b = self_a
        else:
            flat_b = grams_b.reshape(grams_b.shape[0], m * m)  # (Lb, m*m)
            cross = stacked_hsic1(flat_a, flat_b, m)  # (La, Lb)
            self_a = torch.einsum("ij,ij->i", flat_a, flat_a) * scale  # (La,)
            self_b = torch.einsum("ij,ij->i", flat_b, flat_b) * scale  # (Lb,)
        if value_check is not None:  # Grams from update_grams (argument names for messages)
            names_a, names_b = value_check
            self._check_values(grams_a, self_a, self.layers_a, names_a)
            if grams_b is not None:
                self._check_values(grams_b, self_b, self.layers_b, names_b)
        self._hsic.append(cross.cpu().numpy().copy())
        self._self_a.append(self_a.cpu().numpy().copy())
        self._self_b.append(self_b.cpu().numpy().copy())
        self._batch_sizes.append(int(m))

    # ---- reduce
    def merge(self, other: MinibatchCKA) -> MinibatchCKA:
        """Add the batches of ``other`` (disjoint batches of the same study) to this one.

        Returns ``self``. Raises ``TypeError`` for another class and ``ValueError`` when the
        layer names or the kernel differ.
        """
        if type(other) is not type(self):
            raise TypeError(f"can only merge a {type(self).__name__}, got {type(other).__name__}")
        mine = (self.layers_a, self.layers_b, self.kernel, self.threshold)
        theirs = (other.layers_a, other.layers_b, other.kernel, other.threshold)
        if mine != theirs:
            raise ValueError(
                "cannot merge accumulators of different comparisons: (layers_a, layers_b, "
                f"kernel, threshold) = {mine} vs {theirs}"
            )
        self._hsic += [h.copy() for h in other._hsic]
        self._self_a += [s.copy() for s in other._self_a]
        self._self_b += [s.copy() for s in other._self_b]
        self._batch_sizes += other._batch_sizes
        return self

    def compute(self) -> np.ndarray:
        """CKA of every layer pair, (La, Lb) float64 (see :func:`cka_from_hsic` for NaN rows).

        Raises ``RuntimeError`` before the first batch.
        """
        if not self._batch_sizes:
            raise RuntimeError("MinibatchCKA.compute(): no batches yet; call update() first")
        hsic, self_a, self_b, _ = self.per_batch()
        return cka_from_hsic(
            hsic.sum(axis=0),
            self_a.sum(axis=0),
            self_b.sum(axis=0),
            layers_a=self.layers_a,
            layers_b=self.layers_a if self.layers_b is None else self.layers_b,
        )

    # ---- serialisation
    def state_dict(self) -> dict[str, Any]:
        """Plain-python/numpy state: layer names, kernel, per-batch arrays."""
        hsic, self_a, self_b, sizes = self.per_batch()
        return {
            "layers_a": list(self.layers_a),
            "layers_b": None if self.layers_b is None else list(self.layers_b),
            "kernel": self.kernel,
            "threshold": self.threshold,
            "hsic_per_batch": hsic,
            "self_a_per_batch": self_a,
            "self_b_per_batch": self_b,
            "batch_sizes": sizes,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> MinibatchCKA:
        """Rebuild an accumulator from :meth:`state_dict` output (shapes are checked)."""
        acc = cls(
            state["layers_a"],
            state["layers_b"],
            kernel=state["kernel"],
            threshold=state["threshold"],
        )
        hsic = np.asarray(state["hsic_per_batch"], dtype=np.float64)
        self_a = np.asarray(state["self_a_per_batch"], dtype=np.float64)
        self_b = np.asarray(state["self_b_per_batch"], dtype=np.float64)
        sizes = np.asarray(state["batch_sizes"], dtype=np.int64)
        la = len(acc.layers_a)
        lb = la if acc.layers_b is None else len(acc.layers_b)
        b = sizes.shape[0]
        for key, arr, shape in (
            ("hsic_per_batch", hsic, (b, la, lb)),
            ("self_a_per_batch", self_a, (b, la)),
            ("self_b_per_batch", self_b, (b, lb)),
        ):
            if arr.shape != shape:
                raise ValueError(f"state {key}: expected shape {shape}, got {arr.shape}")
        acc._hsic = list(hsic)
        acc._self_a = list(self_a)
        acc._self_b = list(self_b)
        acc._batch_sizes = [int(s) for s in sizes]
        return acc

    def __repr__(self) -> str:
        lb = "self" if self.layers_b is None else len(self.layers_b)
        return (
            f"MinibatchCKA(layers_a={len(self.layers_a)}, layers_b={lb}, kernel={self.kernel!r}, "
            f"n_batches={self.n_batches}, n_samples={self.n_samples})"
        )


def _layer_names(names: Sequence[str], arg: str) -> list[str]:
    if isinstance(names, str):
        raise TypeError(f"{arg}: expected a sequence of layer names, got the string {names!r}")
    out = [str(n) for n in names]
    if not out:
        raise ValueError(f"{arg}: at least one layer name is needed")
    dupes = sorted({n for n in out if out.count(n) > 1})
    if dupes:
        raise ValueError(f"{arg}: duplicate layer names {dupes}")
    return out
