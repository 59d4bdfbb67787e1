"""CKA from HSIC terms, numpy only: the ratio, and the one wording of a degenerate layer.

CKA = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)) (Kornblith et al. 2019). A self term that is
zero (constant or all-zero activations), negative (an unbiased estimate below zero, never
clamped) or NaN gives NaN, never a silent number. Split from
:mod:`ckapipe.analyze.estimators` (which re-exports these names) so that what only reads
results (the plots, the report, the intervals over stored per-batch terms) does not import torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

__all__ = [
    "DegenerateLayerWarning",
    "broadcast_ratio_cka",
    "nonpositive_self_hsic",
    "ratio_cka",
    "self_hsic_problem",
    "warn_degenerate",
]


class DegenerateLayerWarning(UserWarning):
    """A layer's self-HSIC is zero or negative, so its CKA entries are NaN."""


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
    with np.errstate(invalid="ignore", divide="ignore"):
        root_a = np.sqrt(np.where(self_a > 0, self_a, np.nan))
        root_b = np.sqrt(np.where(self_b > 0, self_b, np.nan))
        return hsic / (root_a[..., :, None] * root_b[..., None, :])


def broadcast_ratio_cka(cross: np.ndarray, self_a: np.ndarray, self_b: np.ndarray) -> np.ndarray:
    """CKA = cross / sqrt(self_a · self_b) elementwise (numpy broadcasting), NaN where a self
    term is not positive: the form for resampled terms that are already paired up (bootstrap
    replicates, delete-one values), where :func:`ratio_cka` takes the outer product."""
    with np.errstate(invalid="ignore", divide="ignore"):
        root = np.sqrt(np.where(self_a > 0, self_a, np.nan) * np.where(self_b > 0, self_b, np.nan))
        return cross / root


def self_hsic_problem(value: float) -> str | None:
    """Why a self-HSIC gives no CKA ("is 0 (…)", "is negative (…)", "is NaN"); None if > 0.

    The one wording of a degenerate layer, shared by the warnings here and the diagnostics a
    study stores.
    """
    if value > 0:
        return None
    if np.isnan(value):
        return "is NaN"
    if value == 0:
        return "is 0 (constant or all-zero activations)"
    return f"is negative ({value:.6g}), an unbiased estimate below zero, not clamped"


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
        why = self_hsic_problem(float(value))
        if why is not None:
            messages.append(
                f"model {model!r} layer {name!r}: self-HSIC {why}; its CKA entries are NaN"
            )
    return messages


def warn_degenerate(self_hsic: np.ndarray, names: Sequence[str]) -> None:
    """Warn (:class:`DegenerateLayerWarning`) for every layer, the last axis of ``self_hsic``
    (..., L), whose self term is not positive in some replicate; ``names`` are the L layers."""
    flat = self_hsic.reshape(-1, self_hsic.shape[-1])  # (replicates, L)
    for i, name in enumerate(names):
        values = flat[:, i]
        bad = ~(values > 0)
        if not bad.any():
            continue
        # the worst replicate stands for the layer: a negative value before a zero one
        worst = float(np.nanmin(values)) if not np.isnan(values).all() else float("nan")
        why = self_hsic_problem(worst)
        if worst < 0:
            why += (
                ": a self-HSIC₁ ||Ũ(K)||²/(m(m−3)) is ≥ 0, so this comes from rounding on a "
                "near-constant layer or from corrupted per-batch values"
            )
        where = f" in {int(bad.sum())} of {values.size} replicates" if values.size > 1 else ""
        warnings.warn(
            f"layer {name!r}: self-HSIC {why}{where}; its CKA entries are NaN. Drop the layer "
            "or check the extraction (e.g. a dead ReLU or a wrong hook).",
            DegenerateLayerWarning,
            stacklevel=3,
        )
