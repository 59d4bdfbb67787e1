"""What a user reads first about a study: per-pair summaries and advice on the batch count.

:func:`summarize_pair` reduces a pair's (La, Lb) CKA matrix, intervals and null thresholds to a
few numbers; :func:`summary_lines` is the text ``ckapipe analyze`` prints and the HTML report
tabulates the same :class:`PairSummary`. :func:`interval_batch_warning` says, from a minibatch
partition, whether the interval method will have enough batches, and which batch size would
give enough for this n.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckapipe.analyze.interval_settings import DEFAULT_INTERVAL_METHOD, MIN_BATCHES_FOR_INTERVAL

__all__ = [
    "PairSummary",
    "batches_per_epoch",
    "interval_batch_warning",
    "largest_batch_size",
    "summarize_pair",
    "summary_lines",
]

_MIN_BATCH = 4  # HSIC₁ divides by m(m − 3); a remainder of 1–3 rows is dropped


def batches_per_epoch(n_samples: int, batch_size: int) -> int:
    """Batches of one epoch of n samples in batches of m: the whole ones, plus the remainder
    when it has at least 4 rows (the Gram cache's partition rule)."""
    whole, remainder = divmod(int(n_samples), int(batch_size))
    return whole + int(remainder >= _MIN_BATCH)


def largest_batch_size(n_samples: int, n_batches: int) -> int | None:
    """The largest m ≥ 4 that splits n samples into at least ``n_batches`` *whole* batches
    (n // n_batches), or None when n is too small for that.

    A larger m could still reach the count with a short last batch of a few rows, but the
    jackknife treats batches as exchangeable, so the advice keeps them of one size.
    """
    m = int(n_samples) // int(n_batches)
    return m if m >= _MIN_BATCH else None


def interval_batch_warning(
    partition: Mapping[str, Any] | None, method: str = DEFAULT_INTERVAL_METHOD
) -> str | None:
    """A sentence when a minibatch partition has fewer batches than ``method`` needs for a
    reported interval (``MIN_BATCHES_FOR_INTERVAL``), naming a batch size that would do;
    None when it has enough, or for a full-mode cache.

    Parameters
    ----------
    partition : a Gram cache's partition record (``GramCache.partition``, also in a result's
        provenance): ``n_samples``, ``batch_size``, ``batches_per_epoch``.
    method : the interval method, one of ``INTERVAL_METHODS``.
    """
    if not partition or not partition.get("batch_size"):
        return None
    n, m = int(partition["n_samples"]), int(partition["batch_size"])
    have = int(partition.get("batches_per_epoch") or batches_per_epoch(n, m))
    need = MIN_BATCHES_FOR_INTERVAL[method]
    if have >= need:
        return None
    advice = largest_batch_size(n, need)
    remedy = (
        f"use --batch-size {advice} or smaller for n = {n}"
        if advice is not None
        else f"n = {n} is too small for that even with the smallest batch size 4; use more samples"
    )
    return (
        f"{n} samples in batches of {m} give {have} batch(es) per epoch, fewer than the "
        f"{need} the {method} interval needs, so confidence intervals will be withheld; {remedy}"
    )


@dataclass(frozen=True)
class PairSummary:
    """A model pair in a few numbers (NaN where undefined).

    Attributes
    ----------
    layers : "LaxLb".
    diagonal : mean CKA of layer i with layer i (square pairs only).
    best : mean over model a's layers of the highest CKA with any layer of model b.
    low, high : smallest and largest CKA.
    interval : how the intervals were computed ("jackknife over 8 batches, ..."), or None when
        they were withheld or not computed (see ``interval_note``).
    interval_note : why there is no interval (starts with "interval withheld:" when withheld).
    ci_level : nominal coverage of the intervals.
    widest : the largest interval half-width over the layer pairs.
    null_threshold : the largest CKA that unrelated representations reach (p ≤ 0.05 under the
        permutation null) over the layer pairs; None without permutations.
    above_null : how many layer pairs have a CKA above their null threshold (None without).
    n_entries : how many layer pairs have a CKA.
    """

    layers: str
    diagonal: float
    best: float
    low: float
    high: float
    interval: str | None
    interval_note: str | None
    ci_level: float | None
    widest: float
    null_threshold: float | None
    above_null: int | None
    n_entries: int


def _nan_reduce(function: Any, values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(function(finite)) if finite.size else float("nan")


def summarize_pair(pair: Any, ci_level: float | None = None) -> PairSummary:
    """The :class:`PairSummary` of a :class:`~ckapipe.analyze.result.PairResult`."""
    cka = np.asarray(pair.cka, dtype=np.float64)
    square = cka.shape[0] == cka.shape[1]
    diagonal = np.diagonal(cka) if square else np.array([np.nan])
    rows = [row[np.isfinite(row)] for row in cka]
    best = [row.max() for row in rows if row.size]
    half = (np.asarray(pair.ci_high) - np.asarray(pair.ci_low)) / 2.0
    reported = bool(np.isfinite(half).any())
    null = pair.null_threshold
    above = None
    if null is not None:
        null = np.asarray(null, dtype=np.float64)
        above = int(np.count_nonzero(np.isfinite(cka) & np.isfinite(null) & (cka > null)))
    return PairSummary(
        layers=f"{cka.shape[0]}x{cka.shape[1]}",
        diagonal=float(np.mean(diagonal)) if np.isfinite(diagonal).all() else float("nan"),
        best=float(np.mean(best)) if best else float("nan"),
        low=_nan_reduce(np.min, cka),
        high=_nan_reduce(np.max, cka),
        interval=(pair.interval_method or "interval") if reported else None,
        interval_note=None if reported else (pair.interval_note or "no interval computed"),
        ci_level=ci_level,
        widest=_nan_reduce(np.max, half),
        null_threshold=None if null is None else _nan_reduce(np.max, null),
        above_null=above,
        n_entries=int(np.count_nonzero(np.isfinite(cka))),
    )


def _number(value: float | None, width: int = 7) -> str:
    if value is None or not np.isfinite(value):
        return f"{'-':>{width}}"
    return f"{value:>{width}.3f}"


def interval_text(summary: PairSummary) -> str:
    """ "95% CI ±0.031 at most (jackknife over 8 batches, ...)" or the reason there is none."""
    if summary.interval is None:
        note = summary.interval_note or "no interval computed"
        return (
            note
            if note.startswith(("interval withheld", "no interval"))
            else f"no interval: {note}"
        )
    level = f"{summary.ci_level:.0%} " if summary.ci_level else ""
    return f"{level}CI half-width ≤ {summary.widest:.3f} ({summary.interval})"


def summary_lines(study: Any) -> list[str]:
    """The summary ``ckapipe analyze`` prints: a row per pair with its interval (or why it was
    withheld) and, with permutations, the null threshold beside the CKA; then the notes."""
    ci_level = study.provenance.get("ci_level")
    pairs = study.pairs
    shared = set.intersection(*(set(pair.diagnostics) for pair in pairs.values()))
    with_null = any(pair.null_threshold is not None for pair in pairs.values())
    null_head = f" {'null':>7} {'>null':>7}" if with_null else ""
    lines = [
        f"{'pair':<32} {'layers':>7} {'diag':>7} {'best':>7} {'min':>7} {'max':>7}{null_head}"
        "  notes"
    ]
    for (a, b), pair in pairs.items():
        summary = summarize_pair(pair, ci_level)
        notes = [m for m in pair.diagnostics if m not in shared and m != pair.interval_note]
        null = ""
        if with_null:
            above = (
                "-" if summary.above_null is None else f"{summary.above_null}/{summary.n_entries}"
            )
            null = f" {_number(summary.null_threshold)} {above:>7}"
        lines.append(
            f"{a + ' : ' + b:<32} {summary.layers:>7} {_number(summary.diagonal)} "
            f"{_number(summary.best)} {_number(summary.low)} {_number(summary.high)}{null}  "
            + (f"{len(notes)} diagnostic(s)" if notes else "")
        )
        lines.append(f"    {interval_text(summary)}")
        lines += [f"    - {message}" for message in notes]
    lines += [f"all pairs: {message}" for message in sorted(shared) if not _is_interval(message)]
    lines.append(
        "diag: mean CKA of layer i with layer i (square pairs); best: mean over model a's layers "
        "of the highest CKA with any layer of model b"
    )
    if with_null:
        lines.append(
            "null: the CKA unrelated representations exceed with probability 0.05 (the largest "
            "over the pair's layer pairs, from the permutations); >null: layer pairs above theirs"
        )
    return lines + measure_lines(study)


def measure_lines(study: Any) -> list[str]:
    """Per pair, each similarity measure's mean over its layer pairs (nothing for a CKA-only
    study); the values are in the result and its CSV."""
    names = list(study.provenance.get("measures") or [])
    if not any(pair.measures for pair in study.pairs.values()):
        return []
    width = max(10, *(len(name) + 1 for name in names))
    lines = [
        "similarity measures, mean over each pair's layer pairs (docs/MEASURES.md):",
        f"{'pair':<32}" + "".join(f"{name:>{width}}" for name in names),
    ]
    for (a, b), pair in study.pairs.items():
        cells = [_nan_reduce(np.nanmean, pair.measures.get(name, np.array([]))) for name in names]
        lines.append(
            f"{a + ' : ' + b:<32}"
            + "".join(f"{'nan' if np.isnan(c) else f'{c:.4f}':>{width}}" for c in cells)
        )
    return lines


def _is_interval(message: str) -> bool:
    # already printed under each pair
    return message.startswith(("interval withheld", "no interval requested"))
