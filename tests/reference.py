"""Independent float64 numpy references shared by the end-to-end tests (never ckapipe code)."""

from __future__ import annotations

import numpy as np


def u_centered(gram: np.ndarray) -> np.ndarray:
    """Székely & Rizzo's U-centering of an (n, n) Gram matrix, diagonal zero."""
    n = gram.shape[0]
    gram = gram.copy()
    np.fill_diagonal(gram, 0.0)
    column = gram.sum(0) / (n - 2)
    u = gram - column[:, None] - column[None, :] + gram.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(u, 0.0)
    return u


def minibatch_linear_cka(x: np.ndarray, y: np.ndarray, m: int) -> float:
    """Unbiased minibatch linear CKA over consecutive row blocks of size ``m``.

    ``x`` is (n, p), ``y`` is (n, q) with the same rows; HSIC₁ (Song et al. 2012) of each block's
    U-centered Grams, each with its own 1/(m_b(m_b−3)) factor, summed over blocks before the
    ratio. The last block holds the n mod m remaining rows; it is dropped only when it has fewer
    than 4 (the unbiased estimator needs 4).
    """
    hsic_xy = hsic_xx = hsic_yy = 0.0
    for start in range(0, x.shape[0], m):
        a = x[start : start + m].astype(np.float64)
        b = y[start : start + m].astype(np.float64)
        size = a.shape[0]
        if size < 4:
            continue
        gram_a, gram_b = u_centered(a @ a.T), u_centered(b @ b.T)
        scale = 1.0 / (size * (size - 3))
        hsic_xy += scale * (gram_a * gram_b).sum()
        hsic_xx += scale * (gram_a * gram_a).sum()
        hsic_yy += scale * (gram_b * gram_b).sum()
    return hsic_xy / np.sqrt(hsic_xx * hsic_yy)
