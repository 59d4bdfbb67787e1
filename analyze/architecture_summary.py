"""Within- vs across-architecture similarity of a study, with delete-one-batch jackknife intervals.

The question a study of several architectures and seeds asks first: are two seeds of one
architecture more alike than two different architectures? This module answers it in one table.

Definitions
-----------
- A model's **architecture** is the one declared for it (``architecture:`` in the study config,
  ``ckapipe plot --architecture``, or recorded in the result by ``ckapipe analyze
  --architecture``), else its factory (:func:`ckapipe.utils.architecture_of`).
- A model pair's **similarity** is the mean CKA of its *depth-aligned* layer pairs: each layer
  of the model with fewer layers (either model when they have as many) is paired with the layer
  of the other model at the nearest relative depth, (i + 1) / L. For two models with the same
  number of layers this is the mean diagonal CKA (layer i with layer i). It is defined for any
  two architectures, and it is a smooth function of the per-batch HSIC₁ sums.
- A **group** (within one architecture, across two, all within, all across) is the mean of its
  model pairs' similarities (each model pair weighs the same); self-comparisons are left out.
  "within − across" is the difference of the two pooled means.

Intervals: the study's models share one minibatch partition, so deleting batch b from every
pair at once gives delete-one values of any group mean (:func:`ckapipe.analyze.intervals.
deleted_cka`), and :func:`~ckapipe.analyze.intervals.jackknife_interval` turns them into a
jackknife-t interval, withheld (with the reason) under the rule every interval of ckapipe follows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ckapipe.analyze.cka_ratio import broadcast_ratio_cka
from ckapipe.analyze.intervals import deleted_cka, jackknife_interval

if TYPE_CHECKING:
    from ckapipe.analyze.result import PairResult, StudyResult

__all__ = [
    "SIMILARITY_DEFINITION",
    "GroupSimilarity",
    "architecture_similarity",
    "architectures_from_provenance",
    "depth_aligned",
    "recorded_architectures",
]

#: one sentence for help texts and the report
SIMILARITY_DEFINITION = (
    "a model pair's similarity is the mean CKA of its depth-aligned layer pairs (each layer of "
    "the shallower model with the layer of the other at the nearest relative depth; layer i "
    "with layer i when both have as many layers); a group is the mean over its model pairs, "
    "self-comparisons left out"
)


def depth_aligned(n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the depth-aligned layer pairs of an (n_a, n_b) CKA matrix.

    Each layer k of the model with fewer layers, at relative depth (k + 1) / n_short, is paired
    with the layer j of the other whose relative depth (j + 1) / n_long is nearest (ties to the
    deeper one). ``depth_aligned(3, 3)`` is the diagonal; ``depth_aligned(2, 4)`` pairs rows
    0, 1 with columns 1, 3.
    """
    if n_a < 1 or n_b < 1:
        raise ValueError(f"depth_aligned needs at least one layer per model, got {n_a}, {n_b}")
    short, long = min(n_a, n_b), max(n_a, n_b)
    k = np.arange(short)
    # nearest j with (j + 1) / long ≈ (k + 1) / short; +0.5 and floor rounds ties up
    j = np.clip(np.floor((k + 1) * long / short + 0.5).astype(np.int64) - 1, 0, long - 1)
    return (k, j) if n_a <= n_b else (j, k)


@dataclass(frozen=True)
class GroupSimilarity:
    """One row of the within/across table.

    Attributes
    ----------
    label : e.g. "within mlp", "across mlp × cnn", "all within", "all across", "within − across".
    kind : "within", "across" or "difference".
    pairs : the model pairs averaged ("a vs b").
    n_layer_pairs : how many layer pairs enter (over all its model pairs).
    value : the group mean (NaN when a CKA it needs is undefined).
    low, high : the jackknife interval (NaN when withheld: see ``reason``).
    reason : why the interval is withheld, or None.
    null_threshold : the largest permutation-null threshold among the layer pairs averaged
        (a conservative yardstick: a mean above it is above every entry's null), or None
        without permutations.
    """

    label: str
    kind: str
    pairs: tuple[str, ...]
    n_layer_pairs: int
    value: float
    low: float
    high: float
    reason: str | None
    null_threshold: float | None


@dataclass
class _Terms:
    """Per-batch terms of the aligned entries of some model pairs, and their weights."""

    cross: list[np.ndarray]  # (B, k) per model pair
    self_a: list[np.ndarray]
    self_b: list[np.ndarray]
    nulls: list[np.ndarray]
    pairs: list[str]
    has_null: bool = True

    def mean_and_deleted(self) -> tuple[float, np.ndarray]:
        """The mean of the pairs' aligned-layer means, and its delete-one-batch values (B,)."""
        values, deleted = [], []
        for cross, a, b in zip(self.cross, self.self_a, self.self_b, strict=True):
            values.append(
                float(np.mean(broadcast_ratio_cka(*(x.sum(axis=0) for x in (cross, a, b)))))
            )
            deleted.append(deleted_cka(cross, a, b).mean(axis=1))  # (B,)
        return float(np.mean(values)), np.mean(deleted, axis=0)


def _pair_terms(pair: PairResult) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    rows, cols = depth_aligned(len(pair.layers_a), len(pair.layers_b))
    hsic = np.asarray(pair.hsic_per_batch, dtype=np.float64)
    self_a = np.asarray(pair.self_a_per_batch, dtype=np.float64)
    self_b = np.asarray(pair.self_b_per_batch, dtype=np.float64)
    null = None if pair.null_threshold is None else np.asarray(pair.null_threshold)[rows, cols]
    return hsic[:, rows, cols], self_a[:, rows], self_b[:, cols], null


def _withheld_by_mode(result: StudyResult) -> str | None:
    if result.provenance.get("mode") == "full":
        return (
            "interval withheld: a full-mode result keeps no per-batch terms for these means; "
            "use analysis mode minibatch (at least 4 batches) for their intervals"
        )
    return None


def architecture_similarity(
    result: StudyResult,
    architectures: Mapping[str, str | None],
    ci_level: float | None = None,
) -> list[GroupSimilarity]:
    """The within/across-architecture table of a study (see the module docstring).

    Parameters
    ----------
    result : a loaded :class:`~ckapipe.analyze.result.StudyResult` (with per-batch terms).
    architectures : each model's architecture name (:func:`ckapipe.utils.architecture_of`);
        models mapped to None (unrecorded) are left out.
    ci_level : interval level; default the result's ``ci_level``, else 0.95.

    Returns
    -------
    list[GroupSimilarity]
        One row per architecture (within, when it has two or more models compared), one per
        pair of architectures (across), then "all within", "all across" and "within − across"
        when both kinds exist. Empty when no two compared models have known architectures.
    """
    level = float(ci_level or result.provenance.get("ci_level") or 0.95)
    partition = result.provenance.get("partition") or {}
    epochs = int(partition.get("epochs") or 1)
    mode_reason = _withheld_by_mode(result)
    groups: dict[tuple[str, ...], _Terms] = {}
    for (a, b), pair in result.pairs.items():
        arch_a, arch_b = architectures.get(a), architectures.get(b)
        if a == b or arch_a is None or arch_b is None or pair.hsic_per_batch is None:
            continue
        key = (arch_a,) if arch_a == arch_b else tuple(sorted((arch_a, arch_b)))
        terms = groups.setdefault(key, _Terms([], [], [], [], []))
        cross, self_a, self_b, null = _pair_terms(pair)
        terms.cross.append(cross)
        terms.self_a.append(self_a)
        terms.self_b.append(self_b)
        terms.pairs.append(f"{a} vs {b}")
        if null is None:
            terms.has_null = False
        else:
            terms.nulls.append(null)

    def row(label: str, kind: str, members: list[_Terms]) -> tuple[GroupSimilarity, np.ndarray]:
        merged = _Terms(
            [c for t in members for c in t.cross],
            [c for t in members for c in t.self_a],
            [c for t in members for c in t.self_b],
            [c for t in members for c in t.nulls],
            [p for t in members for p in t.pairs],
            all(t.has_null for t in members),
        )
        value, deleted = merged.mean_and_deleted()
        return _finish(label, kind, merged, value, deleted), deleted

    def _finish(
        label: str, kind: str, terms: _Terms, value: float, deleted: np.ndarray
    ) -> GroupSimilarity:
        interval = jackknife_interval(value, deleted, level, epochs=epochs)
        null = None
        if terms.has_null and terms.nulls:
            finite = np.concatenate(terms.nulls)
            finite = finite[np.isfinite(finite)]
            null = float(finite.max()) if finite.size else None
        return GroupSimilarity(
            label=label,
            kind=kind,
            pairs=tuple(terms.pairs),
            n_layer_pairs=int(sum(c.shape[1] for c in terms.cross)),
            value=value,
            low=float(interval.low),
            high=float(interval.high),
            reason=mode_reason or interval.reason,
            null_threshold=null,
        )

    rows: list[GroupSimilarity] = []
    within = [key for key in groups if len(key) == 1]
    across = [key for key in groups if len(key) == 2]
    for key in within:
        rows.append(row(f"within {key[0]}", "within", [groups[key]])[0])
    for key in across:
        rows.append(row(f"across {key[0]} × {key[1]}", "across", [groups[key]])[0])
    if within and across:
        pooled_within, deleted_within = row("all within", "within", [groups[k] for k in within])
        pooled_across, deleted_across = row("all across", "across", [groups[k] for k in across])
        rows += [pooled_within, pooled_across]
        difference = pooled_within.value - pooled_across.value
        interval = jackknife_interval(
            difference, deleted_within - deleted_across, level, epochs=epochs
        )
        rows.append(
            GroupSimilarity(
                label="within − across",
                kind="difference",
                pairs=(),
                n_layer_pairs=pooled_within.n_layer_pairs + pooled_across.n_layer_pairs,
                value=difference,
                low=float(interval.low),
                high=float(interval.high),
                reason=mode_reason or interval.reason,
                null_threshold=None,
            )
        )
    return rows


def recorded_architectures(result: StudyResult) -> dict[str, str]:
    """The architectures declared when the result was made (``ckapipe analyze --architecture``,
    the workflow's ``architecture:``), by model; empty for results made without any (or
    before they were recorded)."""
    recorded = result.provenance.get("architectures") or {}
    if not isinstance(recorded, Mapping):
        return {}
    return {str(name): str(arch) for name, arch in recorded.items() if arch}


def architectures_from_provenance(
    result: StudyResult, declared: Mapping[str, str] | None = None
) -> dict[str, str | None]:
    """Every model's architecture: ``declared[name]`` when given, else the one the result
    records as declared (:func:`recorded_architectures`), else the factory the result records
    for it, else None."""
    from ckapipe.utils import architecture_of

    declared = {**recorded_architectures(result), **(declared or {})}
    models: Mapping[str, Any] = result.provenance.get("models") or {}
    out: dict[str, str | None] = {}
    for name in result.models:
        spec = None
        try:
            spec = dict(models[name]["identity"]["model"])
        except (KeyError, TypeError, ValueError):
            spec = None
        out[name] = architecture_of(spec, declared.get(name))
    return out
