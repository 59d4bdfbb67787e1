"""Fused extract + Gram: build a store's epoch-0 minibatch Gram cache while its rows are written.

A minibatch study reads each store once, to reduce it to per-batch U-centered Grams
(:mod:`ckapipe.analyze.gram_build`). While an extraction holds the rows in memory it can form
those Grams itself, so the study never re-reads the store, and a layer whose raw activations
are dearer to write than to recompute may be kept *Gram-only* (encoded, not stored).

Bit-for-bit the cache ``ckapipe gram`` builds from the finished store (epoch 0 only): every
batch's Gram is formed from the rows *as stored* (the float16 residuals, float32 values, or
bfloat16 bit patterns a reader gets back), split into the same column tiles (the store's
column chunks), with the same functions (:func:`~ckapipe.analyze.estimators.
add_shifted_products`, then the kernel and U-centering of ``gram_build``), rounded to the same
storage dtype (``GramRequest.storage``, as ``ckapipe gram --storage``) and written with the
same format module in a staged directory under its writer lock. The partition is epoch 0:
contiguous blocks of m rows in store order (:mod:`ckapipe.analyze.partition`); further epochs,
other kernels or full mode come from ``ckapipe gram`` on the store.

Resume. The staged cache of an interrupted extraction is discarded with its process; on
resume the batches of the rows already in the store are recomputed from the store (with
``gram_build``'s own reader), and the rows of a batch cut by the resume point are read back
from it. Gram-only layers have no stored rows, so the store keeps their per-batch Ũ Grams
(:meth:`~ckapipe.store.ActivationStore.write_gram_only_gram`, written here as each batch is
formed, before ``rows_complete`` passes it) and the resume copies them into the new cache: the
same float64 bytes. For them the resume point must not cut a batch (its earlier rows are
gone), so a store with Gram-only layers advances ``rows_complete`` only to batch boundaries
(multiples of lcm(extraction batch size, m), or n; see :mod:`ckapipe.extract.extraction`). That
was chosen over a row block that is a multiple of m (which would force ``--row-block`` and
grow the host buffers of the wide layers Gram-only is for) and over storing the cut batch's
rows (raw rows of exactly the layers that should not be written, rewritten in place at every
resume point): a kill costs at most the rows since the last batch boundary, recomputed. The
store records the Gram request (:meth:`GramRequest.kept_record`), and a resume with another
request or another ``--gram-only`` set is refused. A Gram-only store written before this had
no kept Grams and still cannot resume (the error says to delete it and re-run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckapipe.analyze.estimators import TileWorkspace, add_shifted_products
from ckapipe.analyze.gram_format import (
    DEFAULT_STORAGE,
    KERNELS,
    PRECISIONS,
    STORAGE_DTYPES,
    BatchArrays,
    GramCache,
    GramCacheUsageError,
    default_precision,
    staged_cache,
)
from ckapipe.analyze.loader import column_ranges
from ckapipe.analyze.partition import MIN_BATCH, batch_span, make_partition
from ckapipe.formats import write_attrs
from ckapipe.store import ActivationStore

__all__ = ["FusedGramWriter", "GramRequest", "check_fits", "kept_mismatch"]

PRECISION_CHOICES = ("auto", *PRECISIONS)


@dataclass(frozen=True)
class GramRequest:
    """What Gram cache an extraction builds as it writes (see the module docstring).

    Parameters
    ----------
    out:
        Directory of the new Gram cache (must not exist).
    batch_size:
        m, rows per minibatch (4 ≤ m ≤ n); the same as ``ckapipe gram --batch-size``.
    kernel, threshold:
        ``"linear"`` or ``"rbf"`` (per-batch median bandwidth times ``threshold``).
    precision:
        ``"auto"`` (minibatch default, float32 products summed in float64), ``"float32"`` or
        ``"float64"``.
    storage:
        Dtype of the stored Grams, ``"float32"`` (default, half the disk, each finished
        float64 Gram rounded once) or ``"float64"``; the same as ``ckapipe gram --storage``.
    seed:
        Recorded partition seed (epoch 0 does not depend on it; later epochs built by
        ``ckapipe gram`` from the store do).
    epochs:
        Must be 1: the fused path builds epoch 0 only.
    """

    out: str | os.PathLike[str]
    batch_size: int = 256
    kernel: str = "linear"
    threshold: float = 1.0
    precision: str = "auto"
    storage: str = DEFAULT_STORAGE
    seed: int = 0
    epochs: int = 1

    def __post_init__(self) -> None:
        if self.epochs != 1:
            raise GramCacheUsageError(
                f"a fused Gram cache holds epoch 0 only (got epochs={self.epochs}); extract "
                "without a Gram request and build more epochs with `ckapipe gram STORE "
                "--epochs E`"
            )
        m = self.batch_size
        if isinstance(m, bool) or not isinstance(m, int | np.integer) or m < MIN_BATCH:
            raise GramCacheUsageError(
                f"Gram batch_size must be an integer >= 4 (HSIC₁ divides by m(m-3)), got {m!r}"
            )
        if self.kernel not in KERNELS:
            raise GramCacheUsageError(f"Gram kernel must be one of {KERNELS}, got {self.kernel!r}")
        t = self.threshold
        if not (
            isinstance(t, int | float) and not isinstance(t, bool) and t > 0 and np.isfinite(t)
        ):
            raise GramCacheUsageError(f"Gram threshold must be > 0, got {t!r}")
        if self.precision not in PRECISION_CHOICES:
            raise GramCacheUsageError(
                f"Gram precision must be one of {PRECISION_CHOICES}, got {self.precision!r}"
            )
        if self.storage not in STORAGE_DTYPES:
            raise GramCacheUsageError(
                f"Gram storage must be one of {STORAGE_DTYPES}, got {self.storage!r}"
            )

    @property
    def product_precision(self) -> str:
        """The precision recorded in the cache (``auto`` resolved as ``ckapipe gram`` does)."""
        return default_precision("minibatch") if self.precision == "auto" else self.precision

    def kept_record(self, layers: list[str]) -> dict[str, Any]:
        """What a store with Gram-only layers records of this request (root attribute
        ``gram_only_grams``): everything that determines the cache, so that a resume with
        another request is refused, and ``layers``, the cache's layer order (Gram-only layers
        included)."""
        return {
            "batch_size": int(self.batch_size),
            "kernel": self.kernel,
            "threshold": float(self.threshold),
            "precision": self.product_precision,
            "seed": int(self.seed),
            "layers": list(layers),
        }

    def build_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~ckapipe.analyze.gram_build.build_gram_cache` that build
        the same cache from the finished store."""
        return {
            "batch_size": int(self.batch_size),
            "epochs": 1,
            "seed": int(self.seed),
            "kernel": self.kernel,
            "threshold": float(self.threshold),
            "precision": self.product_precision,
            "storage": self.storage,
        }


class _LayerSubset:
    """The ``layers``/``write`` view of :class:`BatchArrays` that ``gram_build`` recomputes into."""

    def __init__(self, arrays: BatchArrays, layers: list[str]):
        self.arrays, self.layers = arrays, layers

    def write(self, layer: str, batch: int, gram: np.ndarray) -> None:
        self.arrays.write(layer, batch, gram)


class FusedGramWriter:
    """Forms and writes each batch's Ũ Gram as soon as the extraction has stored its rows.

    Use as a context manager around the extraction's write loop: it holds the staged cache
    (and its writer lock); :meth:`finish` records the attributes once the store is complete,
    and the cache is renamed into place when the context exits without an error.
    """

    def __init__(
        self,
        request: GramRequest,
        store: ActivationStore,
        layers: list[str],
        device: torch.device,
    ):
        from ckapipe.analyze.gram_build import _finisher  # the same kernel and U-centering

        n = store.n_samples
        m = int(request.batch_size)
        check_fits(request, n)
        kept = store.gram_only_grams
        if kept is not None and kept != request.kept_record(list(layers)):
            raise GramCacheUsageError(kept_mismatch(store, request.kept_record(list(layers))))
        #: Gram-only layers whose per-batch Grams the store keeps (for a resume)
        self.kept = {r.name for r in store.gram_only} if kept is not None else set()
        self.request = request
        self.store = store
        self.layers = list(layers)
        self.device = device
        self.out = Path(request.out)
        self.partition = make_partition(n, m, 1, request.seed)
        self.n_batches = self.partition["batches_per_epoch"]
        self.product_dtype = (
            torch.float64 if request.product_precision == "float64" else torch.float32
        )
        self.finish_gram = _finisher(request.kernel, request.threshold)
        self.workspace = TileWorkspace()  # one converted tile, reused: no fresh 32 MiB tiles
        self.bfloat16 = store.dtype == "bfloat16"
        self.columns = {
            name: column_ranges(
                store._encodable[name].n_features,  # noqa: SLF001 - stored or Gram-only
                store.chunk_shape(name)[1],
            )
            for name in self.layers
        }
        # per layer: row pieces (start, rows as stored) of the batch being filled, next batch
        self.pieces: dict[str, list[tuple[int, np.ndarray]]] = {name: [] for name in layers}
        self.next_batch = dict.fromkeys(layers, 0)
        self._context: Any = None
        self.arrays: BatchArrays | None = None

    def __enter__(self) -> FusedGramWriter:
        self._context = staged_cache(self.out, overwrite=False)
        group = self._context.__enter__()
        self.group = group
        self.arrays = BatchArrays(
            group,
            self.layers,
            self.partition,
            list(range(self.n_batches)),
            storage=self.request.storage,
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(*exc)

    def resume(self, rows: int) -> None:
        """Complete the batches of the store's first ``rows`` rows (an interrupted extraction,
        or a complete store whose cache is missing): stored layers' Grams recomputed from the
        store, Gram-only layers' copied from the Grams the store keeps."""
        if rows == 0:
            return
        if self.store.gram_only and not self.kept:
            names = [layer.name for layer in self.store.gram_only]
            raise GramCacheUsageError(
                f"{self.store.path} is an extraction with Gram-only layers {names} whose first "
                f"{rows} rows were not stored and whose per-batch Grams were not kept (a store "
                "written by an older ckapipe), so their Grams cannot be completed; delete the "
                f"store (rm -r {self.store.path}) and re-run this command"
            )
        from ckapipe.analyze.gram_build import _epoch0_grams

        m = self.partition["batch_size"]
        if self.kept:
            kept = self.store.gram_only_batches_kept(rows)
            if rows != self.store.n_samples and rows % m:
                raise GramCacheUsageError(
                    f"{self.store.path}: its resume point, row {rows}, cuts Gram batch "
                    f"{rows // m} of its Gram-only layers {sorted(self.kept)}, whose earlier "
                    f"rows were not stored; delete the store (rm -r {self.store.path}) and "
                    "re-run this command"
                )
            for name in sorted(self.kept):
                for k in range(kept):
                    self.arrays.write(  # type: ignore[union-attr]
                        name, k, self.store.read_gram_only_gram(name, k)
                    )
                self.next_batch[name] = kept
        stored = [name for name in self.layers if name not in self.kept]
        whole = min(rows // m, self.n_batches)
        if whole and stored:
            settings = {
                "device": self.device,
                "prefetch": 2,
                "threads": 2,
                "product_dtype": self.product_dtype,
                "max_slab_bytes": 256 * 2**20,
            }
            _epoch0_grams(
                self.store,
                _LayerSubset(self.arrays, stored),  # type: ignore[arg-type]
                self.partition,
                0,
                whole,
                self.finish_gram,
                settings,
            )
        for name in stored:
            self.next_batch[name] = whole
            start = whole * m
            if start < rows and whole < self.n_batches:
                # the batch cut by the resume point: its first rows as stored
                self.pieces[name].append((start, self.store.array(name)[start:rows]))
                self._drain(name)  # rows == n (all rows written): the short last batch

    def add(self, start: int, encoded: dict[str, np.ndarray]) -> None:
        """Rows ``start:start+k`` of some layers, as stored; forms every batch they complete."""
        for name, rows in encoded.items():
            # a copy: the caller's buffer (float32 stores: the write buffer itself) is reused
            self.pieces[name].append((start, np.array(rows, copy=True)))
            self._drain(name)

    def _drain(self, name: str) -> None:
        pieces = self.pieces[name]
        while self.next_batch[name] < self.n_batches and pieces:
            k = self.next_batch[name]
            a, b = batch_span(self.partition, k)
            end = pieces[-1][0] + len(pieces[-1][1])
            if end < b:
                return
            rows = np.concatenate([p[max(0, a - s) : b - s] for s, p in pieces if s < b])
            self._write(name, k, rows)
            self.next_batch[name] = k + 1
            self.pieces[name] = pieces = [(s, p) for s, p in pieces if s + len(p) > b]

    def _write(self, name: str, k: int, rows: np.ndarray) -> None:
        """Batch k's Ũ Gram from its rows as stored, tile by tile as ``gram_build`` forms it."""
        m = rows.shape[0]
        gram = torch.zeros(m, m, dtype=torch.float64, device=self.device)
        for c0, c1 in self.columns[name]:
            tile = torch.from_numpy(np.ascontiguousarray(rows[:, c0:c1]))
            if self.bfloat16:
                tile = tile.view(torch.bfloat16)
            add_shifted_products(gram, tile.to(self.device), self.product_dtype, self.workspace)
        finished = self.finish_gram(gram, name, k)
        if name in self.kept:
            # into the store, before rows_complete passes this batch: a resume copies it back
            self.store.write_gram_only_gram(name, k, finished)
        self.arrays.write(name, k, finished)  # type: ignore[union-attr]

    def finish(self) -> None:
        """Record the attributes (the complete store's identity) and the completion flag."""
        from ckapipe.analyze.gram_build import _cache_attrs

        missing = {n: k for n, k in self.next_batch.items() if k != self.n_batches}
        if missing:
            raise RuntimeError(f"fused Gram cache incomplete (next batch per layer): {missing}")
        source = ActivationStore.open(self.store.path)
        n = self.partition["n_samples"]
        attrs = _cache_attrs(
            source,
            self.layers,
            self.partition,
            list(range(self.n_batches)),
            (0, n),
            mode="minibatch",
            kernel=self.request.kernel,
            threshold=self.request.threshold,
            precision=self.request.product_precision,
            storage=self.request.storage,
            seed=self.request.seed,
        )
        write_attrs(self.group, attrs)
        write_attrs(self.group, {"complete": True})


def check_fits(request: GramRequest, n: int) -> None:
    """Refuse a Gram request that an extraction of ``n`` samples cannot serve (before any work)."""
    if n < MIN_BATCH:
        raise GramCacheUsageError(
            f"the extraction has {n} samples, and HSIC₁ needs at least 4; drop the Gram "
            "request or extract more samples"
        )
    if int(request.batch_size) > n:
        raise GramCacheUsageError(
            f"Gram batch_size {request.batch_size} is larger than the extraction's {n} samples; "
            f"use --gram-batch-size <= {n}"
        )


_OPTION_OF = {
    "batch_size": "--gram-batch-size",
    "kernel": "--gram-kernel",
    "threshold": "--gram-threshold",
    "precision": "--gram-precision",
    "seed": "--gram-seed",
    "layers": "--layers",
}


def kept_mismatch(store: ActivationStore, wanted: dict[str, Any] | None) -> str:
    """Why a Gram request cannot continue ``store``'s kept Grams of its Gram-only layers, naming
    the differing settings, with their stored values, and what to do."""
    kept = store.gram_only_grams or {}
    if wanted is None:
        return (
            f"{store.path} keeps the Grams of Gram-only layers "
            f"{[r.name for r in store.gram_only]} for a Gram request ({kept}), and this run "
            "has none; re-run with the original --gram-out and --gram-only options"
        )
    differ = [key for key in sorted(set(kept) | set(wanted)) if kept.get(key) != wanted.get(key)]
    original = ", ".join(
        f"{_OPTION_OF.get(key, key)} {kept.get(key)!r} (this run: {wanted.get(key)!r})"
        for key in differ
    )
    state = "complete" if store.is_complete else "interrupted"
    return (
        f"{store.path} is an {state} extraction whose Gram-only layers "
        f"{[r.name for r in store.gram_only]} were reduced to Grams with other settings: "
        f"{original}; their activations were not stored, so Grams of other settings cannot "
        "be made from it. Re-run with the original settings, or delete the store "
        f"(rm -r {store.path}) and re-extract"
    )


def reuse_or_build(request: GramRequest, store: ActivationStore, device: torch.device) -> None:
    """The Gram cache of a store an extraction found complete: reuse a matching one at
    ``request.out``, or build it from the store (Gram-only layers: from the per-batch Grams it
    keeps; a store that keeps none cannot give them)."""
    from ckapipe.analyze.gram_build import build_gram_cache
    from ckapipe.analyze.gram_format import identity_key, store_identity

    out = Path(request.out)
    if out.exists():
        cache = GramCache.open(out)
        expected = make_partition(store.n_samples, request.batch_size, 1, request.seed)
        same = (
            cache.partition["sha256"] == expected["sha256"]
            and cache.kernel == request.kernel
            and cache.threshold == float(request.threshold)
            and cache.attrs.get("precision") == request.product_precision
            and cache.storage_dtype == request.storage
            and identity_key(cache.identity) == identity_key(store_identity(store))
        )
        if not same:
            raise GramCacheUsageError(
                f"{out} already exists and is not this extraction's Gram cache (other store, "
                "partition, kernel, precision or storage); remove it or choose another --gram-out"
            )
        return
    if store.gram_only:
        kept = store.gram_only_grams
        if kept is None:
            raise GramCacheUsageError(
                f"{store.path} is complete but its fused Gram cache {out} is missing, and its "
                f"Gram-only layers {[r.name for r in store.gram_only]} were never stored; "
                f"delete the store (rm -r {store.path}) and re-run this command"
            )
        # e.g. killed between the store's completion flag and the cache's rename into place
        with FusedGramWriter(request, store, list(kept["layers"]), device) as writer:
            writer.resume(store.n_samples)
            writer.finish()
        return
    build_gram_cache(store, out, device=device, **request.build_options())
