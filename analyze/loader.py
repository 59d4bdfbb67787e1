"""Stream rectangles of an activation store onto a device, chunk-aligned, with a read-ahead pool.

The analysis stage reads every store once. This module turns a list of rectangles
(:class:`BlockRequest`: rows ``[a, b)`` of one or more layers, each with a column range) into a
stream of :class:`Block` objects holding torch tensors on the target device:

- Every rectangle is split along the store's chunk grid; each piece is read with
  ``zarr.Array.get_basic_selection(..., out=view)`` straight into a preallocated host buffer
  (measured ~1.5x faster than ``a[i:j]``, and no allocation per block).
- A thread pool does the reads (zarr's I/O and numcodecs' decoders release the GIL) while the
  caller processes the previous block. At most ``prefetch`` blocks are read ahead; host buffers
  are a ring of ``prefetch + 1`` slots sized for the largest request, so memory does not depend
  on the number of rows in the store.
- On CUDA the host slots are pinned and each block is copied with ``non_blocking=True`` on a
  separate copy stream; the consumer's stream waits on the copy, and a slot is only refilled
  after its copy's event has completed. On the CPU the yielded tensors are views of the slot
  (no copy).

A yielded block's tensors are valid until the next block is requested (its slot is then
refilled); copy what must outlive that.

bfloat16 stores hold uint16 bit patterns; their tensors are reinterpreted as ``torch.bfloat16``
without a copy. float16 and float32 stay as stored; the consumer upcasts.

Convenience iterators: :func:`iter_row_blocks` (rows ``[a, b)`` of every selected layer per
step, full width) and :func:`iter_column_slabs` (full-height column slabs of one layer, aligned
to the chunk grid, width capped by ``max_slab_bytes``).

Batches that are not contiguous row ranges (the re-partitioned epochs of a Gram cache) are
*not* read by fancy indexing: a random set of m rows touches nearly every row chunk, so reading
it would read the whole layer once per batch. The Gram cache instead reads full-height column
slabs (each chunk once per epoch) and gathers every batch's rows from the slab on the device.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr
from torch import Tensor
from zarr.core.buffer import default_buffer_prototype

from ckapipe.store import ActivationStore, StoreError
from ckapipe.utils import resolve_device  # re-exported

__all__ = [
    "Block",
    "BlockRequest",
    "column_ranges",
    "iter_blocks",
    "iter_column_slabs",
    "iter_row_blocks",
    "resolve_device",
]

_ALIGN = 64  # bytes; every part of a slot starts on a cache-line boundary
_TORCH_DTYPES = {
    "float16": torch.float16,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,  # uint16 bit patterns reinterpreted, exact
}
_STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}


@dataclass(frozen=True)
class BlockRequest:
    """Rows ``[rows[0], rows[1])`` of one or more layers, each with a column range.

    Parameters
    ----------
    rows:
        (start, stop) row range, 0 ≤ start < stop ≤ n.
    parts:
        ``(layer name, column start, column stop)`` per layer; the block's tensors follow this
        order.
    tag:
        Anything the caller wants back with the block (e.g. which batches it holds).
    """

    rows: tuple[int, int]
    parts: tuple[tuple[str, int, int], ...]
    tag: Any = field(default=None, compare=False)

    @property
    def n_rows(self) -> int:
        return self.rows[1] - self.rows[0]


@dataclass
class Block:
    """One read rectangle on the target device.

    Attributes
    ----------
    request:
        The :class:`BlockRequest` it answers.
    tensors:
        One tensor per part, shape (n_rows, column stop − column start), dtype float16,
        float32 or bfloat16 as stored. Valid until the next block is requested.
    """

    request: BlockRequest
    tensors: list[Tensor]

    @property
    def arrays(self) -> dict[str, Tensor]:
        """``{layer name: tensor}`` (for requests with one part per layer)."""
        return {
            part[0]: tensor for part, tensor in zip(self.request.parts, self.tensors, strict=True)
        }


def column_ranges(
    n_features: int, column_chunk: int, width: int | None = None
) -> list[tuple[int, int]]:
    """Column ranges covering ``[0, n_features)`` along the chunk grid.

    ``width`` (default: the column chunk) smaller than the chunk splits each chunk column into
    pieces of at most ``width`` columns; larger widths are rounded down to whole chunks.
    """
    width = column_chunk if width is None else max(1, int(width))
    if width >= column_chunk:
        width = (width // column_chunk) * column_chunk
        return [(start, min(n_features, start + width)) for start in range(0, n_features, width)]
    ranges = []
    for chunk_start in range(0, n_features, column_chunk):
        chunk_stop = min(n_features, chunk_start + column_chunk)
        ranges += [(a, min(chunk_stop, a + width)) for a in range(chunk_start, chunk_stop, width)]
    return ranges


def _grid_pieces(start: int, stop: int, chunk: int) -> list[tuple[int, int]]:
    """Split ``[start, stop)`` at multiples of ``chunk``."""
    pieces = []
    a = start
    while a < stop:
        b = min(stop, (a // chunk + 1) * chunk)
        pieces.append((a, b))
        a = b
    return pieces


class _Slot:
    """One reusable host buffer (pinned for CUDA) plus, on CUDA, the event of its last copy."""

    def __init__(self, nbytes: int, pinned: bool):
        self.host = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)
        self.host_np = self.host.numpy()
        self.copy_done: torch.cuda.Event | None = None

    def views(
        self, request: BlockRequest, storage: np.dtype, torch_dtype: torch.dtype
    ) -> tuple[list[np.ndarray], list[Tensor]]:
        """numpy (for zarr) and torch (for the consumer) views of each part, sharing memory."""
        numpy_views, torch_views = [], []
        offset = 0
        rows = request.n_rows
        for _, c0, c1 in request.parts:
            nbytes = rows * (c1 - c0) * storage.itemsize
            numpy_views.append(
                self.host_np[offset : offset + nbytes].view(storage).reshape(rows, c1 - c0)
            )
            torch_views.append(
                self.host[offset : offset + nbytes].view(torch_dtype).view(rows, c1 - c0)
            )
            offset += _aligned(nbytes)
        return numpy_views, torch_views


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _request_bytes(request: BlockRequest, itemsize: int) -> int:
    return sum(_aligned(request.n_rows * (c1 - c0) * itemsize) for _, c0, c1 in request.parts)


def _validate(store: ActivationStore, request: BlockRequest) -> None:
    a, b = request.rows
    if not 0 <= a < b <= store.n_samples:
        raise StoreError(
            f"row range {a}:{b} is outside store {store.path} with {store.n_samples} rows"
        )
    if not request.parts:
        raise StoreError(f"block request for rows {a}:{b} names no layer")
    for name, c0, c1 in request.parts:
        p = store.layer(name).n_features
        if not 0 <= c0 < c1 <= p:
            raise StoreError(f"layer {name!r}: column range {c0}:{c1} is outside its {p} features")


def _read_piece(array: zarr.Array, rows: slice, cols: slice, out: np.ndarray) -> None:
    out_buffer = default_buffer_prototype().nd_buffer.from_numpy_array(out)
    array.get_basic_selection((rows, cols), out=out_buffer)


def iter_blocks(
    store: ActivationStore,
    requests: Iterable[BlockRequest],
    *,
    device: str | torch.device | None = "cpu",
    prefetch: int = 2,
    threads: int = 4,
) -> Iterator[Block]:
    """Read ``requests`` in order, ``prefetch`` blocks ahead, into reused (pinned) host buffers.

    Parameters
    ----------
    store:
        An open :class:`~ckapipe.store.ActivationStore`.
    requests:
        The rectangles to read, in the order they are yielded.
    device:
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` or a ``torch.device``.
    prefetch:
        Blocks read ahead of the one being processed (≥ 1). Host memory is
        ``(prefetch + 1) ×`` the largest request.
    threads:
        Reader threads; each reads one chunk-aligned piece at a time.

    Yields
    ------
    Block
        Tensors valid until the next block is requested.
    """
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    requests = list(requests)
    if not requests:
        return
    for request in requests:
        _validate(store, request)
    target = resolve_device(device)
    storage = np.dtype(_STORAGE_DTYPES[store.dtype])
    torch_dtype = _TORCH_DTYPES[store.dtype]
    on_cuda = target.type == "cuda"
    slot_bytes = max(_request_bytes(r, storage.itemsize) for r in requests)
    n_slots = min(prefetch + 1, len(requests))
    slots = [_Slot(slot_bytes, pinned=on_cuda) for _ in range(n_slots)]
    arrays = {name: store.array(name) for r in requests for name, _, _ in r.parts}
    chunks = {name: array.chunks for name, array in arrays.items()}
    copy_stream = torch.cuda.Stream(device=target) if on_cuda else None

    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ckapipe-read")
    pending: deque[tuple[int, list[Future[None]], list[Tensor]]] = deque()

    def submit(index: int) -> None:
        request = requests[index]
        slot = slots[index % n_slots]
        if slot.copy_done is not None:
            # the slot's previous block may still be in flight to the GPU
            slot.copy_done.synchronize()
            slot.copy_done = None
        numpy_views, torch_views = slot.views(request, storage, torch_dtype)
        futures = []
        a, b = request.rows
        for (name, c0, c1), out in zip(request.parts, numpy_views, strict=True):
            row_chunk, col_chunk = chunks[name]
            for r0, r1 in _grid_pieces(a, b, row_chunk):
                for k0, k1 in _grid_pieces(c0, c1, col_chunk):
                    futures.append(
                        pool.submit(
                            _read_piece,
                            arrays[name],
                            slice(r0, r1),
                            slice(k0, k1),
                            out[r0 - a : r1 - a, k0 - c0 : k1 - c0],
                        )
                    )
        pending.append((index, futures, torch_views))

    try:
        next_index = 0
        while next_index < len(requests) and len(pending) < prefetch:
            submit(next_index)
            next_index += 1
        while pending:
            index, futures, host_views = pending.popleft()
            for future in futures:
                future.result()  # re-raises a reader's exception here
            # the slot yielded last time is free again: start the read that reuses it
            if next_index < len(requests):
                submit(next_index)
                next_index += 1
            if on_cuda:
                slot = slots[index % n_slots]
                with torch.cuda.stream(copy_stream):
                    tensors = [view.to(target, non_blocking=True) for view in host_views]
                    done = torch.cuda.Event()
                    done.record(copy_stream)
                consumer = torch.cuda.current_stream(target)
                consumer.wait_event(done)
                for tensor in tensors:
                    # allocated on the copy stream, used on the consumer's: keep the allocator honest
                    tensor.record_stream(consumer)
                slot.copy_done = done
            else:
                tensors = host_views
            yield Block(requests[index], tensors)
    finally:
        for _, futures, _ in pending:
            for future in futures:
                future.cancel()
        pool.shutdown(wait=True)


def _row_bounds(
    n: int, rows: tuple[int, int] | None, block_rows: int | Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    if not isinstance(block_rows, int):
        return [(int(a), int(b)) for a, b in block_rows]
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    start, stop = rows if rows is not None else (0, n)
    return [(a, min(stop, a + block_rows)) for a in range(start, stop, block_rows)]


def iter_row_blocks(
    store: ActivationStore,
    block_rows: int | Sequence[tuple[int, int]],
    *,
    layers: Sequence[str] | None = None,
    rows: tuple[int, int] | None = None,
    device: str | torch.device | None = "cpu",
    prefetch: int = 2,
    threads: int = 4,
) -> Iterator[Block]:
    """Rows ``[a, b)`` of every selected layer per step, full width.

    Parameters
    ----------
    store:
        An open store.
    block_rows:
        Rows per block (the last block may be shorter), or explicit ``(start, stop)`` bounds.
        Multiples of the layers' row chunk read every chunk once.
    layers:
        Layer names (default: all, store order); ``block.arrays[name]`` is (b − a, p).
    rows:
        Restrict to ``(start, stop)`` (with an integer ``block_rows``).

    Yields
    ------
    Block
        With one part per layer; valid until the next block is requested.
    """
    names = list(layers) if layers is not None else store.layer_names
    features = {name: store.layer(name).n_features for name in names}
    parts = tuple((name, 0, features[name]) for name in names)
    requests = [
        BlockRequest((a, b), parts) for a, b in _row_bounds(store.n_samples, rows, block_rows)
    ]
    return iter_blocks(store, requests, device=device, prefetch=prefetch, threads=threads)


def slab_width(store: ActivationStore, layer: str, n_rows: int, max_slab_bytes: int) -> int:
    """Widest chunk-compatible column count whose (n_rows × width) slab fits ``max_slab_bytes``.

    Whole chunk columns when they fit (every chunk read once); otherwise a fraction of one, and
    each chunk is then read once per piece (uncompressed chunks are read whole).
    """
    itemsize = np.dtype(_STORAGE_DTYPES[store.dtype]).itemsize
    column_chunk = store.chunk_shape(layer)[1]
    fit = max(1, max_slab_bytes // max(1, n_rows * itemsize))
    return column_chunk if fit >= column_chunk else fit


def iter_column_slabs(
    store: ActivationStore,
    layer: str,
    *,
    rows: tuple[int, int] | None = None,
    max_slab_bytes: int = 256 * 2**20,
    device: str | torch.device | None = "cpu",
    prefetch: int = 2,
    threads: int = 4,
) -> Iterator[Block]:
    """Full-height column slabs of one layer, aligned to its chunk grid.

    Parameters
    ----------
    store, layer:
        The store and the layer to read.
    rows:
        ``(start, stop)`` rows (default: all n).
    max_slab_bytes:
        Upper bound of one slab's host buffer; see :func:`slab_width`.

    Yields
    ------
    Block
        One part ``(layer, c0, c1)``, tensor (rows, c1 − c0); valid until the next block.
    """
    start, stop = rows if rows is not None else (0, store.n_samples)
    p = store.layer(layer).n_features
    width = slab_width(store, layer, stop - start, max_slab_bytes)
    column_chunk = store.chunk_shape(layer)[1]
    requests = [
        BlockRequest((start, stop), ((layer, c0, c1),))
        for c0, c1 in column_ranges(p, column_chunk, width)
    ]
    return iter_blocks(store, requests, device=device, prefetch=prefetch, threads=threads)
