"""Minibatch partitions of a Gram cache: which store rows form which batch, in every epoch.

Numpy only (no torch, no zarr), so that anything may compute or check a partition cheaply.
Epoch 0 cuts the store (already in random order) into contiguous batches of m rows; epoch
e ≥ 1 re-partitions with ``numpy.random.default_rng(epoch_seeds[e]).permutation(n)``. The
epoch seeds depend only on (seed, n, m), so every store of a study gets the same batches. The
last batch of each epoch holds the r = n mod m remaining rows when r ≥ 4; a remainder of 1–3
rows, which HSIC₁ cannot use, is dropped. Global batch number: e · batches_per_epoch + k.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "MIN_BATCH",
    "PARTITION_SCHEME",
    "batch_locations",
    "batch_range",
    "batch_rows",
    "batch_span",
    "epoch_order",
    "epoch_seeds",
    "is_short_batch",
    "make_partition",
]

PARTITION_SCHEME = "contiguous-epoch0-then-permuted/v2"
MIN_BATCH = 4  # HSIC₁ divides by m(m−3)


def epoch_seeds(seed: int, n_samples: int, batch_size: int, epochs: int) -> list[int | None]:
    """Per-epoch permutation seeds; ``None`` for epoch 0 (the store's own order).

    They depend only on (seed, n, m, e), so every store of a study (same n, same settings) gets
    identical batches, and a cache with more epochs extends one with fewer.
    """
    seeds: list[int | None] = [None]
    for epoch in range(1, epochs):
        sequence = np.random.SeedSequence([int(seed), int(n_samples), int(batch_size), epoch])
        seeds.append(int(sequence.generate_state(1, dtype=np.uint32)[0]))
    return seeds


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def make_partition(
    n_samples: int, batch_size: int | None, epochs: int, seed: int, mode: str = "minibatch"
) -> dict[str, Any]:
    """The partition record of a cache; equal partitions ⇔ equal ``sha256``.

    Minibatch: each epoch has ``batches_per_epoch`` batches, all of ``batch_size`` rows except
    the last, which holds the ``last_batch_size`` = n mod m remaining rows when there are at
    least 4 of them; a remainder of 1–3 rows is dropped (``dropped_rows``) in every epoch.
    """
    n = int(n_samples)
    if mode == "full":
        record: dict[str, Any] = {
            "scheme": "full",
            "n_samples": n,
            "batch_size": None,
            "epochs": 1,
            "epoch_seeds": [None],
            "batches_per_epoch": 0,
            "last_batch_size": None,
            "n_batches_total": 0,
            "samples_used": n,
            "dropped_rows": 0,
        }
    else:
        assert batch_size is not None
        m = int(batch_size)
        whole, remainder = divmod(n, m)
        short = remainder >= MIN_BATCH
        per_epoch = whole + int(short)
        dropped = 0 if short else remainder
        record = {
            "scheme": PARTITION_SCHEME,
            "n_samples": n,
            "batch_size": m,
            "epochs": int(epochs),
            "epoch_seeds": epoch_seeds(seed, n, m, epochs),
            "batches_per_epoch": per_epoch,
            "last_batch_size": remainder if short else m,
            "n_batches_total": int(per_epoch * epochs),
            "samples_used": n - dropped,
            "dropped_rows": dropped,
        }
    record["sha256"] = _digest(record)
    return record


def epoch_order(partition: dict[str, Any], epoch: int) -> np.ndarray:
    """(n,) int64 store rows in epoch ``epoch``'s order; batch k is a slice of it (batch_span)."""
    n = partition["n_samples"]
    if epoch == 0:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng(partition["epoch_seeds"][epoch]).permutation(n).astype(np.int64)


def batch_span(partition: dict[str, Any], k: int) -> tuple[int, int]:
    """Positions ``[start, stop)`` of batch k of an epoch in that epoch's order."""
    start = int(k) * partition["batch_size"]
    return start, min(start + partition["batch_size"], partition["samples_used"])


def batch_rows(partition: dict[str, Any], batch: int) -> np.ndarray:
    """Store rows of global batch number ``batch`` (epoch e, batch k ↦ e·batches_per_epoch + k)."""
    epoch, k = divmod(int(batch), partition["batches_per_epoch"])
    start, stop = batch_span(partition, k)
    return epoch_order(partition, epoch)[start:stop]


def is_short_batch(partition: dict[str, Any], batch: int) -> bool:
    """Whether global batch ``batch`` is an epoch's short last batch (fewer than m rows)."""
    per_epoch = partition["batches_per_epoch"]
    return (
        partition["last_batch_size"] != partition["batch_size"]
        and int(batch) % per_epoch == per_epoch - 1
    )


def batch_locations(
    partition: dict[str, Any], batches: Sequence[int]
) -> dict[int, tuple[str, int]]:
    """Global batch number -> (array group, index in it): full batches in ``grams``, short last
    batches in ``grams_last``, each in global batch order."""
    where: dict[int, tuple[str, int]] = {}
    counts = {"grams": 0, "grams_last": 0}
    for number in batches:
        group = "grams_last" if is_short_batch(partition, number) else "grams"
        where[int(number)] = (group, counts[group])
        counts[group] += 1
    return where


def batch_range(partition: dict[str, Any], start: int, stop: int) -> tuple[int, int]:
    """Batches [first, last) of an epoch whose positions lie inside rows ``start:stop``."""
    m = partition["batch_size"]
    last = partition["batches_per_epoch"] if stop == partition["n_samples"] else stop // m
    return start // m, last
