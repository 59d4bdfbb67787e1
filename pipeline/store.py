"""The activation store: one zarr v3 group per model × dataset. Both stages use this module.

Layout (format ``ckapipe.activation-store``, version 2)::

    STORE/                      zarr v3 group
      zarr.json                 attributes (below)
      sample_ids                (n,) int64: dataset index of each stored row
      layers/<layer name>       (n, p) activations, dimension_names ("sample", "feature:<name>")
      offsets/<layer name>      (p,) float32 per-feature offsets (float16 stores only)
      gram_only_grams/grams/<layer name>       (B, m, m) float64 (Gram-only layers, see below)
      gram_only_grams/grams_last/<layer name>  (1, r, r) float64 (short last batch, r = n mod m)
      .writer.lock              advisory lock held by the one writer (not part of the format)

Rows are samples in the order they were written: a seeded random permutation of the dataset by
default, so that contiguous row blocks are random minibatches. Each layer array is chunked in 2-D
(``row_chunk`` × ``column_chunk``, ~16 MB) so that both row blocks (minibatch analysis) and
full-height column slabs (exact analysis) read in one pass. Row chunks are a multiple of the
store's ``row_block``: the writer advances ``rows_complete`` one row block at a time, and resumes
from there after an interruption.

Root attributes: ``format``, ``format_version``, ``n_samples``, ``layers`` (list of layer records,
selection order), ``dtype`` (logical dtype), ``codec``, ``row_block``, ``sample_ids_sha256``,
``rows_complete``, ``complete`` (written last, with ``completed_at``), plus the provenance the
writer passes (model and dataset specs, weights hash, seed, order, input fingerprint, versions,
timestamps). Every array carries a CRC-32C checksum per chunk and every chunk of its grid is
written (see :mod:`ckapipe.formats`), so :meth:`ActivationStore.open` refuses a complete store with
a deleted chunk and a read of a damaged chunk fails instead of returning zeros. bfloat16 is stored
as uint16 bit patterns (zarr 3 has no bfloat16) with the array attribute
``logical_dtype = "bfloat16"``; :meth:`ActivationStore.read` decodes it.

Gram-only layers (root attribute ``gram_only_layers``) are encoded like the others but have no
``layers/<name>`` array: a writer feeds them to a fused Gram cache only. So that an interrupted
extraction can resume, a store created with ``gram_only_grams`` (root attribute: the fused Gram
request, ``{"batch_size": m, "kernel", "threshold", "precision", "seed", "layers"}``) keeps the
U-centered Gram Ũ of every epoch-0 minibatch of every Gram-only layer: batch b (rows
``b*m:(b+1)*m``) is chunk b of ``gram_only_grams/grams/<layer>`` (one chunk per batch); a short
last batch of r = n mod m ≥ 4 rows is ``gram_only_grams/grams_last/<layer>``; a remainder of 1–3
rows has none (HSIC₁ cannot use it). The same float64 values the fused cache holds, bit for bit.
A writer writes batch b's Grams before ``rows_complete`` passes its last row, and in such a store
``rows_complete`` is always a batch boundary (a multiple of m, or n): a batch cut by the resume
point would have lost its earlier rows of the Gram-only layers, which are never stored. So the
Grams of the batches inside ``rows_complete`` are covered by the same guarantees as the rows
(checksummed chunks, every chunk present, one writer). These arrays and the attribute are an
optional addition to version 2: stores without them open as before (a Gram-only store written
before them cannot resume, and says so).

float16 encoding. float16 keeps 11 significant bits of a value's *magnitude*, but CKA only sees
a feature's variation across samples: a post-ReLU feature of mean 100 and spread 1 would keep
~4 bits of its variation, and a layer of magnitude 1e-8 would be flushed to zero. A float16 layer
therefore stores ``(x - offset) / scale``: ``offset`` is a per-feature float32 (the mean of the
layer's first row block, recorded in ``offsets/<layer>`` before any of its rows is written, so a
resume reuses it) and ``scale`` a per-layer power of two (exact) that brings the first block's
residual RMS to ~1; both are listed in the root attribute ``float16_encoding``
(``{layer: {"scale": s}}``; a layer appears there before its first rows are written).
:meth:`ActivationStore.read` and :func:`open_store` return ``offset + scale * stored`` (float64,
exact); the analysis reads the stored residuals directly (CKA, linear and RBF with a median
bandwidth, is unchanged by per-feature shifts and by scaling a layer). Every written block is checked: a layer
whose relative RMS rounding error (against the block's centred residuals) exceeds
:data:`FLOAT16_MAX_REL_ERROR`, or whose residuals overflow float16, is refused with
:class:`DtypeRangeError`, which names the layer and suggests ``--dtype float32``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ckapipe.analyze.partition import MIN_BATCH  # numpy only: the epoch-0 batches
from ckapipe.errors import DataError, FormatError, IncompleteError, WriterLockedError
from ckapipe.formats import (
    WriterLock,
    check_chunks,
    check_format,
    create_array,
    now,
    writable,
    write_attrs,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ActivationStore",
    "FLOAT16_MAX_REL_ERROR",
    "DtypeRangeError",
    "IncompleteStoreError",
    "LAYOUT_ATTRS",
    "LayerRecord",
    "StoreError",
    "StoreLockedError",
    "open_store",
    "sample_ids_digest",
]

FORMAT_NAME = "ckapipe.activation-store"
FORMAT_VERSION = 2
LOGICAL_DTYPES = ("float16", "float32", "bfloat16")
CODECS = ("none", "zstd")
FLOAT16_MAX = 65504.0
#: Largest relative RMS rounding error a float16 layer may have: on each written block,
#: ||E - mean(E)|| / ||R - mean(R)|| with R the block's residuals, E their rounding error and the
#: means per feature (the variation CKA sees, and the part of the error it sees). float16's own
#: rounding of well-scaled values gives ~3e-4; beyond the bound the block's variation is too
#: small against the scale fixed on the first row block (flushed to zero or subnormal) or too
#: small against its distance from the offsets.
FLOAT16_MAX_REL_ERROR = 1e-3
#: float16 residuals are scaled so that their RMS on the first row block is ~1: later values may
#: grow ~2**16-fold before overflow and shrink ~2**14-fold before leaving float16's normal range.
#: If the first block's own peak exceeds this, the scale doubles until it fits (outliers).
_FLOAT16_PEAK_TARGET = 2.0**14
TARGET_CHUNK_BYTES = 16 * 2**20
_LOCK_NAME = ".writer.lock"
#: Root attributes that describe the layout and state of a store; every other one is provenance.
LAYOUT_ATTRS = frozenset(
    {
        "format",
        "format_version",
        "n_samples",
        "layers",
        "dtype",
        "codec",
        "row_block",
        "sample_ids_sha256",
        "rows_complete",
        "complete",
        "float16_encoding",
        "gram_only_layers",
        "gram_only_grams",
    }
)
#: Group of the per-batch Grams of Gram-only layers (see the module docstring).
GRAM_ONLY_GROUP = "gram_only_grams"


class StoreError(FormatError):
    """A store is missing, malformed or used in a way its format does not allow."""


class IncompleteStoreError(StoreError, IncompleteError):
    """The store has no completion flag: its writer was interrupted or is still running."""


class StoreLockedError(StoreError, WriterLockedError):
    """Another process is writing this store (one writer per store)."""


class DtypeRangeError(StoreError, DataError):
    """A layer's activations cannot be stored in the store's dtype within the stated bound.

    Deterministic for given inputs: resuming the same store would fail at the same rows, so a
    writer may remove the store and start over with ``--dtype float32``.
    """


@dataclass(frozen=True)
class LayerRecord:
    """One captured layer.

    Parameters
    ----------
    name:
        Module name as selected (``"layer1.0.conv1"``); also the array name under ``layers/``.
    shape:
        Per-sample output shape before reduction, e.g. ``(64, 8, 8)``.
    reduction:
        How the output became a feature vector: ``flatten``, ``mean``, ``cls`` or ``masked_mean``.
    n_features:
        Number of stored features ``p`` per sample.
    """

    name: str
    shape: tuple[int, ...]
    reduction: str
    n_features: int

    def __post_init__(self) -> None:
        if (
            not self.name
            or "/" in self.name
            or self.name.startswith("__")
            or self.name in (".", "..", "zarr.json")
        ):
            raise StoreError(
                f"layer name {self.name!r} cannot name a zarr array: it must be non-empty, "
                "contain no '/', not start with '__' and not be '.', '..' or 'zarr.json'"
            )
        if self.n_features < 1:
            raise StoreError(f"layer {self.name!r}: n_features must be >= 1, got {self.n_features}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerRecord:
        return cls(
            name=data["name"],
            shape=tuple(data["shape"]),
            reduction=data["reduction"],
            n_features=int(data["n_features"]),
        )

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["shape"] = list(self.shape)
        return record


def sample_ids_digest(sample_ids: np.ndarray) -> str:
    """SHA-256 of the row order: two stores with equal digests hold the same samples in the same rows."""
    return hashlib.sha256(np.ascontiguousarray(sample_ids, dtype="<i8").tobytes()).hexdigest()


def _chunk_shape(n_rows: int, n_features: int, itemsize: int, row_block: int) -> tuple[int, int]:
    """A ~16 MB 2-D chunk whose row count is a multiple of ``row_block``."""
    rows = row_block
    columns = max(1, min(n_features, TARGET_CHUNK_BYTES // (rows * itemsize)))
    if columns == n_features:
        # narrow layer: grow the chunk downwards instead, in whole row blocks
        blocks = max(1, TARGET_CHUNK_BYTES // (row_block * n_features * itemsize))
        rows = row_block * blocks
    rows = min(rows, max(row_block, math.ceil(n_rows / row_block) * row_block))
    return rows, columns


class ActivationStore:
    """A per-layer activation store on disk (zarr v3). Create with :meth:`create`, read with :meth:`open`.

    A reader refuses a store without the completion flag unless ``allow_incomplete=True``.
    A writer holds an exclusive advisory lock; a second writer is refused with
    :class:`StoreLockedError`. The lock dies with its process, so a killed extraction can resume.
    """

    def __init__(
        self, group: zarr.Group, path: Path, *, writable: bool, lock: WriterLock | None = None
    ):
        self._group = group
        self.path = path
        self.writable = writable
        self._lock = lock
        attrs = dict(group.attrs)
        try:
            check_format(
                attrs,
                path,
                name=FORMAT_NAME,
                version=FORMAT_VERSION,
                what="activation store",
                remedy="create one with `ckapipe extract` or `ckapipe import-h5` (a store of an "
                "older format must be re-extracted)",
            )
        except FormatError as error:
            raise StoreError(str(error)) from None
        self.layers = [LayerRecord.from_dict(d) for d in attrs["layers"]]
        self._by_name = {layer.name: layer for layer in self.layers}
        #: layers whose rows were encoded (and fed to a fused Gram cache) but not stored
        self.gram_only = [LayerRecord.from_dict(d) for d in attrs.get("gram_only_layers", [])]
        self._encodable = {**self._by_name, **{layer.name: layer for layer in self.gram_only}}
        self.n_samples = int(attrs["n_samples"])
        self.dtype = attrs["dtype"]
        self.row_block = int(attrs["row_block"])
        self._sample_ids: np.ndarray | None = None
        self._offsets: dict[str, np.ndarray] = {}
        # opened once: each open reads the group's and the array's metadata from disk
        self._arrays: dict[str, zarr.Array] = {}
        self._writable_arrays: dict[str, zarr.Array] = {}
        # per layer, the float16 encoder's working buffer: reused, because faulting in a fresh
        # (k, p) temporary per block costs more than the arithmetic (one writer at a time)
        self._residual_buffers: dict[str, Any] = {}

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        layers: Sequence[LayerRecord],
        sample_ids: np.ndarray,
        dtype: str = "float16",
        codec: str | None = None,
        attrs: Mapping[str, Any] | None = None,
        row_block: int = 256,
        gram_only: Sequence[LayerRecord] = (),
        gram_only_grams: Mapping[str, Any] | None = None,
    ) -> ActivationStore:
        """Create an empty store and return it open for writing (holding the writer lock).

        Parameters
        ----------
        path:
            Directory to create. Refused if it already holds anything.
        layers:
            Layer records in selection order; rows of results always follow this order.
        sample_ids:
            (n,) dataset index of each row, in the order rows will be written.
        dtype:
            Logical storage dtype: ``float16`` (default), ``float32`` or ``bfloat16``.
        codec:
            ``None``/``"none"`` (default; dense activations barely compress) or ``"zstd"``.
        attrs:
            Provenance to record (model and dataset specs, seeds, versions, ...).
        row_block:
            Resume granularity in rows; every row chunk is a multiple of it.
        gram_only:
            Layers that are encoded like the others (float16 offsets and scale recorded) but
            whose rows are not stored: a writer feeds them to a fused Gram cache only. Listed
            in the root attribute ``gram_only_layers``; they have no ``layers/<name>`` array.
        gram_only_grams:
            The fused Gram request whose per-batch Grams of the Gram-only layers the store
            keeps (a JSON-ready dict with at least ``batch_size`` m, 4 ≤ m ≤ n), so that an
            interrupted extraction can resume; ``None``: not kept (the store cannot resume
            once a row is written). See the module docstring.
        """
        path = Path(path)
        if dtype not in LOGICAL_DTYPES:
            raise StoreError(f"dtype must be one of {LOGICAL_DTYPES}, got {dtype!r}")
        codec = codec or "none"
        if codec not in CODECS:
            raise StoreError(f"codec must be one of {CODECS}, got {codec!r}")
        if not layers and not gram_only:
            raise StoreError("no layers to store: select at least one layer")
        names = [layer.name for layer in [*layers, *gram_only]]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise StoreError(f"layers selected more than once: {duplicates}")
        sample_ids = np.asarray(sample_ids, dtype=np.int64)
        if sample_ids.ndim != 1 or sample_ids.size == 0:
            raise StoreError(
                f"sample_ids must be a non-empty 1-D array, got shape {sample_ids.shape}"
            )
        if len(np.unique(sample_ids)) != sample_ids.size:
            raise StoreError("sample_ids contain duplicates: every row must be a distinct sample")
        if row_block < 1:
            raise StoreError(f"row_block must be >= 1, got {row_block}")
        if gram_only_grams is not None:
            if not gram_only:
                raise StoreError("gram_only_grams needs Gram-only layers (gram_only) to keep")
            m = gram_only_grams.get("batch_size")
            if not isinstance(m, int) or isinstance(m, bool) or not 4 <= m <= sample_ids.size:
                raise StoreError(
                    f"gram_only_grams batch_size must be an integer between 4 and the "
                    f"{sample_ids.size} samples, got {m!r}"
                )
        try:
            json.dumps(dict(attrs or {}))
        except (TypeError, ValueError) as error:
            raise StoreError(
                f"store attrs must be JSON-serializable (plain str/int/float/bool/list/dict): {error}"
            ) from None
        if path.exists() and any(path.iterdir()):
            raise StoreError(
                f"{path} already exists and is not empty; remove it, choose another --out, "
                "or resume an interrupted extraction"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        # Build the store in a staging folder and rename it into place, so that a creation killed
        # half-way leaves a staging folder behind, never a half-made store at `path`. The lock
        # file moves with the folder and the lock stays held.
        staging = path.parent / f".{path.name}.creating-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        lock = _writer_lock(staging)
        try:
            n = int(sample_ids.size)
            # mode "a", not "w": "w" would wipe the directory, lock file included
            root = zarr.open_group(str(staging), mode="a", zarr_format=3)
            write_attrs(
                root,
                {
                    **dict(attrs or {}),
                    "format": FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "n_samples": n,
                    "layers": [layer.to_dict() for layer in layers],
                    "dtype": dtype,
                    "codec": codec,
                    "row_block": int(row_block),
                    "sample_ids_sha256": sample_ids_digest(sample_ids),
                    **(
                        {"gram_only_layers": [layer.to_dict() for layer in gram_only]}
                        if gram_only
                        else {}
                    ),
                    **(
                        {GRAM_ONLY_GROUP: dict(gram_only_grams)}
                        if gram_only_grams is not None
                        else {}
                    ),
                    "rows_complete": 0,
                    "complete": False,
                    **({"float16_encoding": {}} if dtype == "float16" else {}),
                    "created_at": now(),
                },
            )
            ids = create_array(
                root,
                "sample_ids",
                shape=(n,),
                chunks=(min(n, 1 << 20),),
                dtype="int64",
                dimension_names=("sample",),
            )
            ids[:] = sample_ids
            storage_dtype = "uint16" if dtype == "bfloat16" else dtype
            itemsize = np.dtype(storage_dtype).itemsize
            layer_group = root.require_group("layers")
            offset_group = root.require_group("offsets") if dtype == "float16" else None
            stored_names = {layer.name for layer in layers}
            for layer in [*layers, *gram_only]:
                chunks = _chunk_shape(n, layer.n_features, itemsize, row_block)
                if offset_group is not None:
                    # written whole now (zeros) so that every chunk exists from the start
                    create_array(
                        offset_group,
                        layer.name,
                        shape=(layer.n_features,),
                        chunks=(chunks[1],),
                        dtype="float32",
                        dimension_names=(f"feature:{layer.name}",),
                    )[:] = 0
                if layer.name not in stored_names:
                    continue
                create_array(
                    layer_group,
                    layer.name,
                    shape=(n, layer.n_features),
                    chunks=chunks,
                    dtype=storage_dtype,
                    dimension_names=("sample", f"feature:{layer.name}"),
                    compression=codec,
                    fill_value=0,
                    attributes={
                        "layer": layer.name,
                        "logical_dtype": dtype,
                        "shape": list(layer.shape),
                    },
                )
            if gram_only_grams is not None:
                _create_gram_only_arrays(
                    root, [layer.name for layer in gram_only], n, int(gram_only_grams["batch_size"])
                )
            try:
                os.rename(staging, path)  # atomic; replaces `path` only if it is an empty folder
            except OSError:
                raise StoreLockedError(
                    f"{path} was created by another process while this one was creating it; "
                    "one writer per store"
                ) from None
            lock.path = path / _LOCK_NAME
            root = zarr.open_group(str(path), mode="r+")
            store = cls(root, path, writable=True, lock=lock)
            store._sample_ids = sample_ids
        except BaseException:
            # a failed create must not keep this process's lock (a retry would be refused)
            lock.release()
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return store

    @classmethod
    def open_for_resume(cls, path: str | os.PathLike[str]) -> ActivationStore:
        """Reopen an interrupted (incomplete) store for writing, from ``rows_complete`` on."""
        path = Path(path)
        _require_store_dir(path)
        lock = _writer_lock(path)
        try:
            store = cls(zarr.open_group(str(path), mode="r+"), path, writable=True, lock=lock)
        except BaseException:
            lock.release()
            raise
        if store.is_complete:
            store.close()
            raise StoreError(f"{path} is already complete; nothing to resume")
        return store

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        allow_incomplete: bool = False,
        check_chunks: bool = True,
    ) -> ActivationStore:
        """Open a store for reading; refuses an incomplete store unless ``allow_incomplete``.

        ``check_chunks=False`` skips the deleted-chunk check (for describing a damaged store;
        call :meth:`check_chunks` to report the damage).
        """
        path = Path(path)
        _require_store_dir(path)
        store = cls(zarr.open_group(str(path), mode="r"), path, writable=False)
        if not store.is_complete and not allow_incomplete:
            raise IncompleteStoreError(
                f"{path} is incomplete ({store.rows_complete} of {store.n_samples} rows written, "
                "no completion flag): its extraction was interrupted or is still running. "
                "Re-run the same `ckapipe extract` command to resume it."
            )
        if check_chunks:
            store.check_chunks()
        return store

    def check_chunks(self) -> None:
        """Refuse a store with a deleted chunk among the rows it claims (cheap: lists files).

        Raises :class:`~ckapipe.errors.IntegrityError` naming the layer and chunk.
        """
        if self.is_complete:
            check_chunks(self.path)
            return
        rows = self.rows_complete
        leading = {f"layers/{name}": rows for name in self.layer_names}
        if self.gram_only_grams is not None:
            full, last = self._gram_only_batches_within(rows)
            for record in self.gram_only:
                leading[f"{GRAM_ONLY_GROUP}/grams/{record.name}"] = full
                leading[f"{GRAM_ONLY_GROUP}/grams_last/{record.name}"] = last
        check_chunks(self.path, rows=leading)

    # -- per-batch Grams of Gram-only layers ------------------------------------------------
    @property
    def gram_only_grams(self) -> dict[str, Any] | None:
        """The fused Gram request whose per-batch Grams of the Gram-only layers this store keeps
        (see the module docstring), or None (no Gram-only layers, or an older store)."""
        record = self._group.attrs.get(GRAM_ONLY_GROUP)
        return dict(record) if record is not None else None

    def gram_only_batches_kept(self, rows: int | None = None) -> int:
        """How many epoch-0 batches' Grams of the Gram-only layers the first ``rows`` rows
        (default: ``rows_complete``, or n when complete) cover: batches 0 … k-1 are kept."""
        if self.gram_only_grams is None:
            return 0
        if rows is None:
            rows = self.n_samples if self.is_complete else self.rows_complete
        full, last = self._gram_only_batches_within(rows)
        return full + last

    def gram_only_batch_count(self) -> int:
        """Epoch-0 batches of the kept Grams (n // m, plus a short last batch of r ≥ 4 rows)."""
        record = self.gram_only_grams
        if record is None:
            return 0
        whole, remainder = divmod(self.n_samples, int(record["batch_size"]))
        return whole + int(remainder >= MIN_BATCH)

    def _gram_only_batches_within(self, rows: int) -> tuple[int, int]:
        """(full batches, short last batches (0 or 1)) whose rows all lie in ``0:rows``."""
        m = int(self.gram_only_grams["batch_size"])  # type: ignore[index]
        whole, remainder = divmod(self.n_samples, m)
        last = int(remainder >= MIN_BATCH and rows >= self.n_samples)
        return min(rows // m, whole), last

    def _gram_only_location(self, name: str, batch: int) -> tuple[str, int]:
        record = self.gram_only_grams
        if record is None or name not in {layer.name for layer in self.gram_only}:
            raise StoreError(
                f"store {self.path} keeps no per-batch Grams of layer {name!r} (its Gram-only "
                f"layers with kept Grams: "
                f"{[r.name for r in self.gram_only] if record is not None else []})"
            )
        whole = self.n_samples // int(record["batch_size"])
        if not 0 <= batch < self.gram_only_batch_count():
            raise StoreError(
                f"store {self.path}: layer {name!r} has Gram batches 0…"
                f"{self.gram_only_batch_count() - 1}, not {batch}"
            )
        if batch < whole:
            return f"{GRAM_ONLY_GROUP}/grams/{name}", batch
        return f"{GRAM_ONLY_GROUP}/grams_last/{name}", 0

    def read_gram_only_gram(self, name: str, batch: int) -> np.ndarray:
        """(m_b, m_b) float64 Ũ Gram of epoch-0 batch ``batch`` of Gram-only layer ``name``.

        Only batches counted by :meth:`gram_only_batches_kept` hold data; a damaged chunk
        fails its checksum.
        """
        where, index = self._gram_only_location(name, batch)
        if batch >= self.gram_only_batches_kept():
            raise StoreError(
                f"store {self.path}: batch {batch} of Gram-only layer {name!r} is not written yet "
                f"({self.gram_only_batches_kept()} batches are, up to row {self.rows_complete})"
            )
        return np.asarray(self._group[where][index], dtype=np.float64)

    def write_gram_only_gram(self, name: str, batch: int, gram: np.ndarray) -> None:
        """Keep the (m_b, m_b) Ũ Gram of epoch-0 batch ``batch`` of Gram-only layer ``name``.

        Must run before ``rows_complete`` passes the batch's last row (see the module docstring).
        """
        self._require_writable()
        where, index = self._gram_only_location(name, batch)
        array = self._writable_arrays.get(where)
        if array is None:
            array = self._writable_arrays[where] = writable(self._group[where])
        gram = np.asarray(gram)
        if gram.shape != tuple(array.shape[1:]) or gram.dtype != np.float64:
            raise StoreError(
                f"layer {name!r}, batch {batch}: a kept Gram must be float64 of shape "
                f"{tuple(array.shape[1:])}, got {gram.dtype} {gram.shape}"
            )
        array[index] = gram

    # -- float16 encoding ------------------------------------------------------------------
    def encoding(self, name: str) -> tuple[np.ndarray, float] | None:
        """``(offsets (p,) float32, scale)`` of a float16 layer; None for other dtypes.

        Stored values are ``(x - offsets) / scale``. A layer with no rows written yet has
        zero offsets and scale 1.
        """
        if name not in self._encodable:
            self.layer(name)  # raises, naming the layers
        if self.dtype != "float16":
            return None
        record = self._group.attrs.get("float16_encoding", {}).get(name)
        if record is None:
            return np.zeros(self._encodable[name].n_features, dtype=np.float32), 1.0
        if name not in self._offsets:
            self._offsets[name] = np.asarray(self._group["offsets"][name][:], dtype=np.float32)
        return self._offsets[name], float(record["scale"])

    # -- reading ----------------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._group.attrs)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def is_complete(self) -> bool:
        return bool(self._group.attrs.get("complete", False))

    @property
    def rows_complete(self) -> int:
        return int(self._group.attrs.get("rows_complete", 0))

    @property
    def sample_ids(self) -> np.ndarray:
        if self._sample_ids is None:
            self._sample_ids = np.asarray(self._group["sample_ids"][:], dtype=np.int64)
        return self._sample_ids

    def layer(self, name: str) -> LayerRecord:
        """The record of layer ``name``; a clear error naming the known layers otherwise."""
        try:
            return self._by_name[name]
        except KeyError:
            if name in self._encodable:
                raise StoreError(
                    f"layer {name!r} of store {self.path} was stored Gram-only (its activations "
                    f"were not written, only its fused Gram cache); re-extract without "
                    f"--gram-only {name} to read it"
                ) from None
            raise StoreError(
                f"store {self.path} has no layer {name!r}; its layers are {self.layer_names}"
            ) from None

    def array(self, name: str) -> zarr.Array:
        """The raw zarr array of layer ``name`` (uint16 bit patterns for bfloat16 stores)."""
        if name not in self._arrays:
            self.layer(name)
            self._arrays[name] = self._group["layers"][name]
        return self._arrays[name]

    def chunk_shape(self, name: str) -> tuple[int, int]:
        """The (rows, columns) chunk of layer ``name``; for a Gram-only layer, the chunk it would
        have had (its fused Grams are formed over the same column tiles as a stored layer's)."""
        if name in self._by_name:
            return tuple(self.array(name).chunks)  # type: ignore[return-value]
        if name not in self._encodable:
            self.layer(name)  # raises, naming the layers
        storage_dtype = "uint16" if self.dtype == "bfloat16" else self.dtype
        return _chunk_shape(
            self.n_samples,
            self._encodable[name].n_features,
            np.dtype(storage_dtype).itemsize,
            self.row_block,
        )

    @property
    def storage_dtype(self) -> str:
        """The dtype of the stored arrays (``uint16`` bit patterns for bfloat16 stores)."""
        return "uint16" if self.dtype == "bfloat16" else self.dtype

    def read(
        self,
        name: str,
        rows: slice = slice(None),
        cols: slice = slice(None),
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Read a rectangle of layer ``name`` in its logical values.

        Returns float32 for float32 and bfloat16 layers (bfloat16 decoded exactly), float64 for
        float16 layers, reconstructed exactly as ``offset + scale * stored`` (see the module
        docstring). ``out``, if given, must have the storage
        dtype and the selection's shape; it receives the raw stored values (reusing it avoids an
        allocation per block).
        """
        array = self.array(name)
        selection = (rows, cols)
        data = array.get_basic_selection(
            selection, out=_as_buffer(out) if out is not None else None
        )
        if out is not None:
            data = out
        if self.dtype == "bfloat16":
            return bfloat16_bits_to_float32(data)
        if self.dtype == "float16":
            offsets, scale = self.encoding(name)  # type: ignore[misc]
            return _float16_decode(np.asarray(data), offsets[cols], scale)
        return data

    def identity(self) -> dict[str, Any]:
        """What makes two stores comparable, and which model/dataset a store came from."""
        attrs = self.attrs
        return {
            "path": str(self.path),
            "model": attrs.get("model"),
            "weights_sha256": attrs.get("weights_sha256"),
            "dataset": attrs.get("dataset"),
            "sample_ids_sha256": attrs["sample_ids_sha256"],
            "n_samples": self.n_samples,
            "layers": self.layer_names,
            "dtype": self.dtype,
        }

    # -- writing ----------------------------------------------------------------------------
    def write_rows(
        self, start: int, activations: Mapping[str, np.ndarray], *, some_layers: bool = False
    ) -> dict[str, np.ndarray]:
        """Write rows ``start:start+k`` of every layer (all layers at once, ``k`` equal for all):
        :meth:`encode_rows`, then :meth:`write_encoded`. Returns what :meth:`encode_rows` returns.
        """
        encoded = self.encode_rows(start, activations, some_layers=some_layers)
        self.write_encoded(start, encoded)
        return encoded

    def encode_rows(
        self, start: int, activations: Mapping[str, np.ndarray], *, some_layers: bool = False
    ) -> dict[str, np.ndarray]:
        """Check and encode rows ``start:start+k`` of every layer, without writing them.

        Returns each given layer's rows as stored (storage dtype: float16 residuals, float32, or
        bfloat16 bit patterns as uint16), Gram-only layers included (encoded, not written): the
        values a reader of the store gets, for a fused Gram cache.

        Values are checked before anything is written: NaN/Inf, or values beyond float16's range in a
        float16 store, raise :class:`StoreError` naming the layer and the sample id.
        ``some_layers=True`` allows writing only some layers, so that a writer can flush each layer
        in whole chunks (a partial-chunk write rewrites the whole chunk); ``rows_complete`` must
        then only advance to rows that every layer holds.
        """
        self._require_writable()
        missing = [name for name in self._encodable if name not in activations]
        unknown = [name for name in activations if name not in self._encodable]
        if (missing and not some_layers) or unknown or not activations:
            raise StoreError(
                f"write_rows needs every layer once; missing {missing}, unknown {unknown}"
            )
        counts = {name: np.shape(values)[0] for name, values in activations.items()}
        if len(set(counts.values())) != 1:
            raise StoreError(f"layers have different row counts in one write: {counts}")
        k = next(iter(counts.values()))
        if start < 0 or start + k > self.n_samples:
            raise StoreError(
                f"rows {start}:{start + k} are outside the store's {self.n_samples} rows"
            )
        encoded = {}
        for layer in self._encodable.values():
            if layer.name not in activations:
                continue
            values = np.asarray(activations[layer.name])
            if values.shape != (k, layer.n_features):
                raise StoreError(
                    f"layer {layer.name!r}: expected rows of shape ({k}, {layer.n_features}), "
                    f"got {values.shape}"
                )
            encoded[layer.name] = self._encode(layer.name, values, start)
        return encoded

    def write_encoded(self, start: int, encoded: Mapping[str, np.ndarray]) -> None:
        """Write rows ``start:start+k`` as :meth:`encode_rows` returned them (Gram-only layers
        are skipped: they have no array). Rows of the same layer may be encoded in several
        calls and written in one, so that each write covers whole chunks."""
        self._require_writable()
        for name, values in encoded.items():
            if name in self._by_name:
                if name not in self._writable_arrays:
                    self._writable_arrays[name] = writable(self.array(name))
                self._writable_arrays[name][start : start + len(values), :] = values

    def set_rows_complete(self, rows: int, **extra_attrs: Any) -> None:
        """Record that rows ``0:rows`` of every layer are durably written (the resume point).

        ``extra_attrs`` (the writer's resume state, e.g. a running input fingerprint) are written
        in the same metadata update, so they always match ``rows_complete``.
        """
        self._require_writable()
        record = self.gram_only_grams
        if record is not None and rows != self.n_samples and rows % int(record["batch_size"]):
            raise StoreError(
                f"{self.path} keeps the Grams of Gram-only layers per batch of "
                f"{record['batch_size']} rows, so its resume point must be a batch boundary; "
                f"got rows_complete {rows}"
            )
        write_attrs(self._group, {**extra_attrs, "rows_complete": int(rows)})

    def mark_complete(self, **extra_attrs: Any) -> None:
        """Write the completion flag, last. Until then readers refuse the store."""
        self._require_writable()
        if self.rows_complete != self.n_samples:
            raise StoreError(
                f"cannot mark {self.path} complete: {self.rows_complete} of {self.n_samples} rows written"
            )
        write_attrs(self._group, {**extra_attrs, "completed_at": now()})
        write_attrs(self._group, {"complete": True})

    def close(self) -> None:
        """Release the writer lock (readers hold none)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_writable(self) -> None:
        if not self.writable or self._lock is None:
            raise StoreError(f"{self.path} is open read-only")

    def _encode(self, name: str, values: np.ndarray, start: int) -> np.ndarray:
        # One reduction finds both NaN/Inf (the peak is then NaN/Inf) and float16 overflow; the
        # element-wise searches below only run to name the first bad sample. torch does the
        # reduction and the float16 cast several times faster than numpy (this is the write path).
        import torch

        tensor = torch.from_numpy(np.ascontiguousarray(values))
        if not tensor.is_floating_point():
            tensor = tensor.to(torch.float64)
        peak = _peak(tensor)
        if not math.isfinite(peak):
            row = int(np.argwhere(~np.isfinite(values))[0][0])
            raise StoreError(
                f"layer {name!r} has a non-finite activation (NaN or Inf) for sample id "
                f"{int(self.sample_ids[start + row])} (row {start + row}); check the model and input"
            )
        if self.dtype == "float16":
            return self._encode_float16(name, tensor, start)
        if self.dtype == "bfloat16":
            encoded = float32_to_bfloat16_bits(values)
            # rounding can carry a finite value into the all-ones exponent (Inf)
            overflow = (encoded & np.uint16(0x7F80)) == np.uint16(0x7F80)
        else:
            with np.errstate(over="ignore"):
                encoded = values.astype(np.float32, copy=False)
            overflow = ~np.isfinite(encoded)  # float64 input beyond float32's range
        if overflow.any():
            row = int(np.argwhere(overflow)[0][0])
            advice = (
                "check the model" if self.dtype == "float32" else "extract with --dtype float32"
            )
            raise (StoreError if self.dtype == "float32" else DtypeRangeError)(
                f"layer {name!r} has values beyond {self.dtype}'s range (first at sample id "
                f"{int(self.sample_ids[start + row])}, row {start + row}); {advice}"
            )
        return encoded

    def _encode_float16(self, name: str, tensor: Any, start: int) -> np.ndarray:
        """``(x - offsets) / scale`` as float16, refused if rounding loses too much (see top)."""
        import torch

        work = tensor if tensor.dtype == torch.float64 else tensor.to(torch.float32)
        offsets, scale = self._float16_encoding_for_write(name, work, start)
        buffer = self._residual_buffers.get(name)
        if buffer is None or buffer.shape != work.shape or buffer.dtype != work.dtype:
            buffer = self._residual_buffers[name] = torch.empty_like(work)
        residual = torch.sub(work, torch.from_numpy(offsets).to(work.dtype), out=buffer)
        residual.mul_(1.0 / scale)
        k = residual.shape[0]
        where = f"rows {start}:{start + k} (first sample id {int(self.sample_ids[start])})"
        advice = (
            "float16 cannot hold this layer: store it as float32 (extract with --dtype float32)"
        )
        peak = _peak(residual)
        if peak > FLOAT16_MAX:
            row = int(torch.nonzero(residual.abs() > FLOAT16_MAX)[0][0])
            raise DtypeRangeError(
                f"layer {name!r}: at sample id {int(self.sample_ids[start + row])} (row "
                f"{start + row}) its values lie up to {peak * scale:.4g} from their per-feature "
                f"offsets, beyond float16's range at the layer's scale {scale:g} fixed on its first "
                f"row block (±65504 × scale = ±{FLOAT16_MAX * scale:.4g}); {advice}"
            )
        encoded = residual.to(torch.float16)
        if _float16_rounding_surely_within_bound(residual):
            return encoded.numpy()
        # both centred per feature over the block: CKA centres, so a rounding error shared by
        # all rows of a feature (e.g. rows that are all equal) costs nothing
        variation = _centred_sum_of_squares(residual)
        if variation > 0:
            lost = _centred_sum_of_squares(encoded.to(work.dtype).sub_(residual))
            relative = math.sqrt(lost / variation)
            if relative > FLOAT16_MAX_REL_ERROR:
                raise DtypeRangeError(
                    f"layer {name!r}: float16 rounding of {where} has a relative RMS error of "
                    f"{relative:.2g} of the layer's variation (bound {FLOAT16_MAX_REL_ERROR:g}); "
                    f"its values are too small or too spread against the scale {scale:g} fixed on "
                    f"its first row block; {advice}"
                )
        return encoded.numpy()

    def _float16_encoding_for_write(
        self, name: str, values: Any, start: int
    ) -> tuple[np.ndarray, float]:
        """The layer's recorded encoding, or a new one from its first row block (then recorded)."""
        import torch

        if "float16_encoding" not in self._group.attrs:
            # a store begun by an older ckapipe: plain float16 (zero offsets, scale 1) throughout
            return self.encoding(name)  # type: ignore[return-value]
        recorded = dict(self._group.attrs["float16_encoding"])
        if name in recorded:
            return self.encoding(name)  # type: ignore[return-value]
        if start != 0:
            raise StoreError(
                f"layer {name!r}: the first rows written to a float16 store must start at row 0 "
                f"(its offsets come from its first row block), got row {start}"
            )
        # in the values' own dtype, without float64 copies of the block (for a wide conv map
        # those cost more than the forward pass that made it): the offsets only need to be near
        # the means, and the scale is a power of two chosen from the residuals' spread, which
        # float32 sums give to far better than the factor of 2 that matters
        first = values[: self.row_block]
        offsets = first.mean(0).to(torch.float32)
        residual = torch.sub(first, offsets.to(first.dtype))
        flat = residual.reshape(-1)
        rms = math.sqrt(float(torch.dot(flat, flat)) / flat.numel()) if flat.numel() else 0.0
        peak = _peak(residual)
        scale = 2.0 ** round(math.log2(rms)) if rms > 0 else 1.0
        while peak / scale > _FLOAT16_PEAK_TARGET:  # a few outliers: keep headroom for them
            scale *= 2.0
        offsets_np = offsets.numpy()
        # recorded before any of the layer's rows are written, so that a resume reuses them
        writable(self._group["offsets"][name])[:] = offsets_np
        write_attrs(self._group, {"float16_encoding": {**recorded, name: {"scale": scale}}})
        self._offsets[name] = offsets_np
        return offsets_np, scale


def _peak(values: Any) -> float:
    """max |x| of a tensor in one pass without a temporary (NaN if it holds a NaN, 0 if empty)."""
    import torch

    if not values.numel():
        return 0.0
    low, high = torch.aminmax(values)
    return max(-float(low), float(high))


# Rounding to float16 moves a value r by at most u·|r| with u = 2^-11 in float16's normal range,
# and by at most 2^-25 (half the subnormal spacing) below it; float64 input is rounded twice
# (through float32), hence the extra 2^-23.
_FLOAT16_UNIT_ROUNDOFF = 2.0**-11 + 2.0**-23
_FLOAT16_SUBNORMAL_HALF_SPACING = 2.0**-25


def _float16_rounding_surely_within_bound(residual: Any) -> bool:
    """Whether the float16 rounding loss of ``residual`` is provably within the bound, from two
    cheap passes, so that the exact check (five more passes and two temporaries) can be skipped.

    Rounding error e per value: e² ≤ u²·r² + s² (u the unit roundoff, s the subnormal half
    spacing), so the centred loss Σ(e − ē)² ≤ Σe² ≤ u²·Σr² + N·s². The centred variation is
    Σr² − Σ_j (Σ_i r_ij)² / k. When the loss bound is under half the allowed loss (a margin for
    the float32 accumulation of Σr²), the block passes; otherwise the exact check decides.
    """
    import torch

    k = residual.shape[0]
    if not residual.numel() or k < 2:
        return False
    flat = residual.reshape(-1)
    total = float(torch.dot(flat, flat))
    # float32 column sums (a float64 reduction converts the whole block first, 15x slower):
    # their relative error ~k·2^-24 is far inside the bound's factor-2 margin
    column_sums = residual.sum(0).to(torch.float64)
    variation = total - float(torch.dot(column_sums, column_sums)) / k
    if not variation > 0:
        return False
    loss_bound = (
        _FLOAT16_UNIT_ROUNDOFF**2 * total + flat.numel() * _FLOAT16_SUBNORMAL_HALF_SPACING**2
    )
    return loss_bound <= 0.5 * FLOAT16_MAX_REL_ERROR**2 * variation


def _centred_sum_of_squares(values: Any) -> float:
    """Σ (x - column mean)² over a (k, p) tensor: one BLAS dot (a bound check, not a statistic)."""
    import torch

    centred = (values - values.mean(0)).reshape(-1)
    return float(torch.dot(centred, centred))


def _float16_decode(stored: np.ndarray, offsets: np.ndarray, scale: float) -> np.ndarray:
    """``offsets + scale * stored`` in float64: exact, so that the values read are exactly a shift
    and a scale of the residuals the analysis computes CKA of (float32 would round the sum and
    move CKA by ~5e-9)."""
    values = stored.astype(np.float64)
    if scale != 1.0:
        values *= scale
    values += offsets
    return values


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (round-to-nearest-even) and return the uint16 bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Decode uint16 bfloat16 bit patterns to float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def open_store(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Open a complete store as ``{layer name: dask array (n, p)}`` in logical values.

    For exploring in notebooks (``da.mean``, rechunking, xarray); the analysis stage reads the zarr
    arrays directly. bfloat16 layers are decoded to float32 lazily, float16 layers reconstructed
    (``offset + scale * stored``) to float64 lazily.
    """
    import dask.array as da

    store = ActivationStore.open(path)
    arrays = {}
    for name in store.layer_names:
        array = da.from_zarr(store.array(name))
        if store.dtype == "bfloat16":
            array = array.map_blocks(bfloat16_bits_to_float32, dtype=np.float32)
        elif store.dtype == "float16":
            offsets, scale = store.encoding(name)  # type: ignore[misc]
            array = array.astype(np.float64) * scale + offsets.astype(np.float64)
        arrays[name] = array
    return arrays


def _as_buffer(out: np.ndarray) -> Any:
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype().nd_buffer.from_numpy_array(out)


def _require_store_dir(path: Path) -> None:
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path} is not a zarr store (no zarr.json); check the path")


def _create_gram_only_arrays(root: zarr.Group, names: list[str], n: int, m: int) -> None:
    """The per-batch Gram arrays of Gram-only layers, one chunk per batch (module docstring)."""
    whole, remainder = divmod(n, m)
    shapes = {"grams": (whole, m)}
    if remainder >= MIN_BATCH:
        shapes["grams_last"] = (1, remainder)
    for where, (count, size) in shapes.items():
        if not count:
            continue
        group = root.require_group(GRAM_ONLY_GROUP).require_group(where)
        for name in names:
            create_array(
                group,
                name,
                shape=(count, size, size),
                chunks=(1, size, size),
                dtype="float64",
                dimension_names=("batch", "sample_i", "sample_j"),
                attributes={"layer": name},
            )


def _writer_lock(store_dir: Path) -> WriterLock:
    """The one-writer lock of a store: a file inside it, so that it moves with a staged store."""
    try:
        return WriterLock(store_dir / _LOCK_NAME, what=f"store {store_dir}").acquire()
    except WriterLockedError as error:
        raise StoreLockedError(str(error)) from None
