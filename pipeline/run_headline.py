"""The study's story at the end of ``ckapipe run``: per model pair, then within vs across
architectures (the same definitions as the report's, :mod:`ckapipe.analyze.architecture_summary`).

- :func:`headline_table`: one row per model pair, its **depth-aligned mean** CKA (layer i with
  layer i when both models have as many layers; see
  :func:`~ckapipe.analyze.architecture_summary.depth_aligned`) with the widest interval
  half-width among those layer pairs, and the pair's architectures. Two models of different
  architectures are never said to have "matched" layers, even when their layer names agree.
- :func:`architecture_table`: the within/across-architecture rows (mean CKA with its jackknife
  interval, or why it is withheld).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["architecture_table", "depth_aligned_mean", "headline_table", "pair_architectures"]


def depth_aligned_mean(pair: Any) -> tuple[float, float | None]:
    """The mean CKA of a pair's depth-aligned layer pairs, and the widest interval half-width
    among them (None when none was reported). The mean is NaN when no depth-aligned layer pair
    has a finite CKA; only finite ones enter either number."""
    from ckapipe.analyze.architecture_summary import depth_aligned

    cka = np.asarray(pair.cka, dtype=np.float64)
    rows, cols = depth_aligned(*cka.shape)
    values = cka[rows, cols]
    half = ((np.asarray(pair.ci_high) - np.asarray(pair.ci_low)) / 2.0)[rows, cols]
    finite = np.isfinite(values)
    mean = float(values[finite].mean()) if finite.any() else math.nan
    reported = half[finite][np.isfinite(half[finite])]
    return mean, float(reported.max()) if reported.size else None


def pair_architectures(
    architecture_a: str | None, architecture_b: str | None, *, unknown: str = "not recorded"
) -> str:
    """``mlp`` for two models of one architecture, ``cnn × mlp`` (sorted, as the within/across
    table names it) for two."""
    a, b = architecture_a or unknown, architecture_b or unknown
    return a if a == b else " × ".join(sorted((a, b)))


def _aligned(rows: Sequence[tuple[str, ...]], right: Sequence[int]) -> list[str]:
    """Rows of cells as lines: every column as wide as its widest cell, ``right`` columns
    right-aligned, two spaces between columns, trailing spaces dropped."""
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    return [
        "  "
        + "  ".join(
            cell.rjust(widths[k]) if k in right else cell.ljust(widths[k])
            for k, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]


def headline_table(study: Any, architectures: Mapping[str, str | None] | None = None) -> list[str]:
    """A study result's headline, one aligned row per model pair: the depth-aligned mean CKA,
    the widest interval half-width among its layer pairs ("none" when no interval was
    reported) and the pair's architectures.

    ``architectures``: model → architecture; default: as the result records them
    (:func:`~ckapipe.analyze.architecture_summary.architectures_from_provenance`). A pair
    without a finite depth-aligned CKA gets a sentence instead of NaN.
    """
    if architectures is None:
        from ckapipe.analyze.architecture_summary import architectures_from_provenance

        architectures = architectures_from_provenance(study)
    header = ("model A", "model B", "depth-aligned mean", "± CI", "architectures")
    rows: list[tuple[str, ...]] = [header]
    sentences: dict[int, str] = {}
    for (a, b), pair in study.pairs.items():
        mean, width = depth_aligned_mean(pair)
        if math.isnan(mean):
            sentences[len(rows)] = "no depth-aligned layer pair with a finite CKA"
            rows.append((a, b, "", "", ""))
            continue
        kinds = pair_architectures(architectures.get(a), architectures.get(b))
        rows.append((a, b, f"{mean:.3f}", "none" if width is None else f"{width:.3f}", kinds))
    lines = _aligned(rows, right=(2, 3))
    wide_a, wide_b = (max(len(row[k]) for row in rows) for k in (0, 1))
    for k, sentence in sentences.items():  # a sentence where the numbers would be
        lines[k] = f"  {rows[k][0]:<{wide_a}}  {rows[k][1]:<{wide_b}}  {sentence}"
    return lines


def architecture_table(
    study: Any, architectures: Mapping[str, str | None], ci_level: float | None = None
) -> list[str]:
    """The within/across-architecture rows of the report, as aligned lines: label, mean CKA
    (the mean of its model pairs' depth-aligned means), ``[low, high]`` or why the interval is
    withheld. Empty when no two compared models have known architectures."""
    from ckapipe.analyze.architecture_summary import architecture_similarity

    groups = architecture_similarity(study, architectures, ci_level)
    if not groups:
        return []
    rows: list[tuple[str, ...]] = [("group", "mean CKA", "interval")]
    for group in groups:
        interval = (
            f"[{group.low:.3f}, {group.high:.3f}]"
            if group.reason is None and math.isfinite(group.low)
            else group.reason or "no interval"
        )
        value = f"{group.value:+.3f}" if group.kind == "difference" else f"{group.value:.3f}"
        rows.append((group.label, value, interval))
    return _aligned(rows, right=(1,))
