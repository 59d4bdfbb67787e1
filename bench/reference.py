"""The float64 CKA every benchmark measures against: numpy from the formulas, no ckapipe code.

It is the yardstick for ckapipe's estimators, so it shares none of their code. Linear kernel:
for a batch X of m samples (m × p) the Gram is K = X̃ X̃ᵀ, X̃ the column-centered X, in float64.
Centering first changes neither HSIC below (both are invariant to adding a constant row
vector) and keeps the Gram entries small, so nothing cancels in float64. With H = I − 11ᵀ/m:

    HSIC₀(K, L) = tr(K H L H) / (m − 1)²                        biased
    HSIC₁(K, L) = ⟨K̃, L̃⟩_F / (m (m − 3))                        unbiased (Song et al. 2012)

where K̃ is the U-centered Gram (Székely & Rizzo 2014): K̃_ii = 0 and, for i ≠ j, with the row,
column and total sums of K with its diagonal zeroed,

    K̃_ij = K_ij − K_i· / (m − 2) − K_·j / (m − 2) + K_·· / ((m − 1)(m − 2)).

⟨K̃, L̃⟩ equals Song et al.'s tr(KL) + 1ᵀK1·1ᵀL1 / ((m − 1)(m − 2)) − 2/(m − 2)·1ᵀKL1 for
zero-diagonal K, L. CKA = HSIC(K, L) / √(HSIC(K, K) HSIC(L, L)); minibatch CKA (Nguyen et al.
2021) sums each of the three HSICs over the batches before taking the ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def gram(x: np.ndarray) -> np.ndarray:
    """Linear Gram of the column-centered rows in float64: (..., m, p) → (..., m, m)."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=-2, keepdims=True)
    return x @ np.swapaxes(x, -1, -2)


def u_center(k: np.ndarray) -> np.ndarray:
    """U-centered copy of (..., m, m) Grams, diagonal zero (the HSIC₁ centering)."""
    m = k.shape[-1]
    diagonal = np.arange(m)
    k = np.array(k, dtype=np.float64)
    k[..., diagonal, diagonal] = 0.0
    rows, cols = k.sum(axis=-1), k.sum(axis=-2)
    u = (
        k
        - rows[..., :, None] / (m - 2)
        - cols[..., None, :] / (m - 2)
        + rows.sum(axis=-1)[..., None, None] / ((m - 1) * (m - 2))
    )
    u[..., diagonal, diagonal] = 0.0
    return u


def double_center(k: np.ndarray) -> np.ndarray:
    """H K H of (..., m, m) Grams (the HSIC₀ centering)."""
    k = k - k.mean(axis=-1, keepdims=True)
    return k - k.mean(axis=-2, keepdims=True)


def _centered(k: np.ndarray, unbiased: bool) -> tuple[np.ndarray, int]:
    """The estimator's centering of ``k`` and the divisor of its inner products."""
    m = k.shape[-1]
    if unbiased:
        return u_center(k), m * (m - 3)
    return double_center(k), (m - 1) ** 2


def hsic_terms(kx: np.ndarray, ky: np.ndarray, unbiased: bool = True) -> np.ndarray:
    """(..., 3): HSIC(K, L), HSIC(K, K), HSIC(L, L) of (..., m, m) Grams; HSIC₁ or HSIC₀."""
    cx, divisor = _centered(kx, unbiased)
    cy, _ = _centered(ky, unbiased)
    terms = [(cx * cy).sum(axis=(-2, -1)), (cx * cx).sum((-2, -1)), (cy * cy).sum((-2, -1))]
    return np.stack(terms, axis=-1) / divisor


def minibatch_cka(
    xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray],
    batches: Sequence[slice],
    unbiased: bool = True,
) -> np.ndarray:
    """Minibatch CKA of every layer pair, features (n, p) per layer, over ``batches``: (La, Lb).

    Features may be any float dtype (float16 too): each batch goes to float64 before its Gram.
    """
    cross = np.zeros((len(xs), len(ys)))
    self_x, self_y = np.zeros(len(xs)), np.zeros(len(ys))
    for rows in batches:
        centered_x = [_centered(gram(x[rows]), unbiased) for x in xs]
        centered_y = [_centered(gram(y[rows]), unbiased) for y in ys]
        for i, (cx, divisor) in enumerate(centered_x):
            self_x[i] += (cx * cx).sum() / divisor
            for j, (cy, _) in enumerate(centered_y):
                cross[i, j] += (cx * cy).sum() / divisor
        for j, (cy, divisor) in enumerate(centered_y):
            self_y[j] += (cy * cy).sum() / divisor
    return cross / np.sqrt(np.outer(self_x, self_y))


def cka(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], unbiased: bool = True) -> np.ndarray:
    """CKA of every layer pair over all n samples as one batch: (La, Lb)."""
    return minibatch_cka(xs, ys, [slice(None)], unbiased)
