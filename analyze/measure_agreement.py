"""How well a study's similarity measures agree on which layer pairs are most similar.

Each measure gives one value per (model pair, layer a, layer b). Two measures agree on the
ranking of layer pairs when their values over the same entries are rank-correlated: this module
gives the Spearman ρ and Kendall τ-b of every pair of measures over the entries where all of them
are finite. A self-comparison (a model with itself) contributes only its entries above the
diagonal: its diagonal is 1 for every symmetric measure and its lower triangle repeats the upper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MeasureAgreement", "measure_agreement", "measure_table"]


@dataclass(frozen=True)
class MeasureAgreement:
    """names: the measures; spearman, kendall: (M, M) rank correlations between them over
    ``n_values`` layer-pair entries (NaN when fewer than 3 entries or a measure is constant)."""

    names: list[str]
    spearman: np.ndarray
    kendall: np.ndarray
    n_values: int


def measure_table(result: Any) -> tuple[list[str], np.ndarray]:
    """(names, (entries, M) values): every layer-pair entry of every pair (self-pairs: i < j),
    one column per measure, rows with a NaN in any measure dropped."""
    names = list(result.provenance.get("measures") or [])
    rows = []
    for pair in result.pairs.values():
        if not pair.measures:
            continue
        stacked = np.stack([pair.measures[name] for name in names], axis=-1)  # (La, Lb, M)
        if pair.model_a == pair.model_b:
            upper = np.triu_indices(stacked.shape[0], k=1, m=stacked.shape[1])
            rows.append(stacked[upper])
        else:
            rows.append(stacked.reshape(-1, len(names)))
    table = np.concatenate(rows) if rows else np.zeros((0, len(names)))
    return names, table[np.isfinite(table).all(axis=1)]


def measure_agreement(result: Any) -> MeasureAgreement:
    """Spearman ρ and Kendall τ-b between every two measures of a study result
    (:class:`~ckapipe.analyze.result.StudyResult` with ``measures``)."""
    from scipy.stats import kendalltau, spearmanr

    names, table = measure_table(result)
    m = len(names)
    spearman, kendall = np.full((m, m), np.nan), np.full((m, m), np.nan)
    constant = [table.shape[0] < 3 or np.ptp(table[:, k]) == 0 for k in range(m)]
    for i in range(m):
        for j in range(m):
            if constant[i] or constant[j]:
                continue
            spearman[i, j] = spearmanr(table[:, i], table[:, j])[0]
            kendall[i, j] = kendalltau(table[:, i], table[:, j])[0]
    return MeasureAgreement(names, spearman, kendall, int(table.shape[0]))
