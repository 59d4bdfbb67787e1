"""What the minibatch and the full-mode pairs share: the bound on temporaries and the
diagnostics every :class:`~ckapipe.analyze.result.PairResult` carries."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ckapipe.analyze.cka_ratio import DegenerateLayerWarning, nonpositive_self_hsic

__all__ = ["WORK_ELEMENTS", "degenerate_layers", "interval_record", "undefined_replicates"]

# Elements of float64 temporaries the permutation null and the full-mode row blocks may hold.
WORK_ELEMENTS = 1 << 24


def interval_record(interval: Any) -> tuple[str, str | None]:
    """The method and, when withheld, the reason that the result and its CSV carry per pair."""
    units = "sample blocks" if interval.method == "block-jackknife" else "batches"
    described = f"{interval.method} over {interval.n_batches} {units}"
    if interval.method != "bootstrap":
        described += f", t quantile on {interval.n_batches - 1} df"
    return described, interval.reason


def degenerate_layers(
    self_a: np.ndarray, self_b: np.ndarray, layers: Mapping[str, list[str]], a: str, b: str
) -> list[str]:
    """Diagnostics (also warned) for layers whose summed self-HSIC is not positive."""
    messages = nonpositive_self_hsic(self_a, layers[a], a)
    if a != b:
        messages += nonpositive_self_hsic(self_b, layers[b], b)
    for message in messages:
        warnings.warn(f"{a} vs {b}: {message}", DegenerateLayerWarning, stacklevel=4)
    return messages


def undefined_replicates(
    n_undefined: np.ndarray, layers_a: Sequence[str], layers_b: Sequence[str], a: str, b: str
) -> list[str]:
    if not n_undefined.any():
        return []
    rows, cols = np.nonzero(n_undefined)
    worst = int(n_undefined.max())
    examples = ", ".join(
        f"({layers_a[i]!r}, {layers_b[j]!r})" for i, j in zip(rows[:3], cols[:3], strict=True)
    )
    return [
        f"interval: in {rows.size} layer pair(s) of {a} vs {b}, e.g. {examples}, up to {worst} "
        "bootstrap replicates or delete-one values had a non-positive self-HSIC sum; their "
        "intervals use the others only"
    ]
