"""The Gram pass's work around its products, moved onto helper threads when a core is free.

A minibatch Gram pass should spend its time in the tile products X'X'ᵀ (its GEMM floor). Around
them it converts and shifts each tile (:func:`~ckapipe.analyze.estimators.shifted_tile`), and
finishes each batch Gram (U-centering) and writes it as a zarr chunk (about 3 ms for a 256 ×
256 float64 chunk on a 2-core VM): together ~40 % of the products' time at n = 5120 in float32
(bench/RESULTS.md, GEMM floor section). With a core free of torch's threads
(:func:`free_core`), :func:`run_ahead` prepares the next shifted tile on one helper thread and
:class:`BatchWriter` finishes and writes batches on another while the products go on. The
values and files are the same either way: the same functions on the same inputs, each batch
into its own chunk; only the thread differs.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["BatchWriter", "free_core", "run_ahead"]

T = TypeVar("T")

#: Bytes of batch Grams handed over but not yet written, at most (one Gram always may be).
MAX_PENDING_BYTES = 64 * 2**20


class _Arrays(Protocol):
    def write(self, layer: str, batch: int, gram: np.ndarray) -> None: ...


def free_core(device: torch.device) -> bool:
    """Whether helper threads help: a CPU pass whose torch threads leave a core free (on a core
    that torch's threads use, the products would lose that time to them)."""
    return device.type == "cpu" and torch.get_num_threads() < (os.cpu_count() or 1)


def run_ahead(items: Iterator[T], background: bool) -> Iterator[T]:
    """Yield ``items``, computing each next one on a helper thread while the caller works on the
    current one (``background``), or inline.

    ``items`` is only ever advanced by one thread at a time; its errors are raised here. When
    the caller stops early (an error, ``close()``), the item in progress is waited for and
    ``items`` is closed, so nothing runs on the helper thread afterwards.
    """
    if not background:
        yield from items
        return
    end = object()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckapipe-gram-prepare")
    future = pool.submit(next, items, end)
    try:
        while (item := future.result()) is not end:
            future = pool.submit(next, items, end)
            yield item  # type: ignore[misc]
    finally:
        wait([future])
        pool.shutdown(wait=True)
        close = getattr(items, "close", None)
        if close is not None:
            close()


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
        self._pending: deque[tuple[Future[None], int]] = deque()  # (write, Gram bytes)
        self._pending_bytes = 0

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
        size = gram.numel() * gram.element_size()
        while self._pending and (
            self._pending[0][0].done() or self._pending_bytes + size > MAX_PENDING_BYTES
        ):
            future, done_size = self._pending.popleft()
            self._pending_bytes -= done_size
            future.result()  # re-raises a failed write here
        self._pending.append((self._pool.submit(self._write, layer, batch, gram), size))
        self._pending_bytes += size

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
                self._pending.popleft()[0].result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
