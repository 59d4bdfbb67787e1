"""Finishing and writing a Gram cache's batches, on a writer thread when a core is free.

A minibatch Gram pass spends its time in the tile products; each finished batch Gram then
still needs its U-centering and a zarr chunk write (about 3 ms for a 256 × 256 float64 chunk
on a 2-core VM, ~20 % of the products' time at n = 5120, bench/RESULTS.md). With a core free
of torch's threads, :class:`BatchWriter` runs both on one writer thread while the pass goes on
with the next products. The values and the files are the same either way: the same functions
run on the same Grams, each batch into its own chunk.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = ["BatchWriter", "background_writes"]

#: Batches handed over but not yet written, at most: each holds its m × m float64 Gram.
MAX_PENDING = 64


class _Arrays(Protocol):
    def write(self, layer: str, batch: int, gram: np.ndarray) -> None: ...


def background_writes(device: torch.device) -> bool:
    """Whether a writer thread helps: a CPU pass whose torch threads leave a core free (on a
    loaded core, the products' own threads would lose time to it)."""
    return device.type == "cpu" and torch.get_num_threads() < (os.cpu_count() or 1)


class BatchWriter:
    """``write(layer, batch, gram)``: ``arrays.write(layer, batch, finish(gram, layer, batch))``,
    inline or on one writer thread, in order.

    Use as a context manager: leaving it waits for every write, and re-raises the first error a
    write met (the same error, e.g. an undefined RBF bandwidth, that an inline write raises).
    After an error in the ``with`` body, writes not yet started are dropped and the running one
    is waited for, so no write touches the cache once the caller handles the error.
    """

    def __init__(
        self,
        arrays: _Arrays,
        finish: Callable[[Tensor, str, int], np.ndarray],
        *,
        background: bool,
    ):
        self.arrays, self.finish = arrays, finish
        self._pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckapipe-gram-write")
            if background
            else None
        )
        self._pending: deque[Future[None]] = deque()

    @property
    def background(self) -> bool:
        return self._pool is not None

    def _write(self, layer: str, batch: int, gram: Tensor) -> None:
        self.arrays.write(layer, batch, self.finish(gram, layer, batch))

    def write(self, layer: str, batch: int, gram: Tensor) -> None:
        """Finish and store one batch's Gram; ``gram`` must not be modified afterwards."""
        if self._pool is None:
            self._write(layer, batch, gram)
            return
        while self._pending and (self._pending[0].done() or len(self._pending) >= MAX_PENDING):
            self._pending.popleft().result()  # re-raises a failed write here
        self._pending.append(self._pool.submit(self._write, layer, batch, gram))

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self._pool is None:
            return
        if exc_type is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            return
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
