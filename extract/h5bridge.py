"""HDF5 bridge: import activations from HDF5 files into an activation store, and export back.

Accepted inputs to :func:`import_h5`:

- one HDF5 dataset per layer, anywhere in the file, each ``(n, ...)`` (flattened to ``(n, p)``);
  dataset paths may contain ``/`` and are mapped to legal layer names (``/`` → ``.``), the
  original path is kept in the store's ``h5_datasets`` attribute;
- thingsvision's ``features.hdf5``: one dataset ``features``, or the same features split along
  rows into ``features_01`` … ``features_NN`` (concatenated in numeric order, one layer
  ``features``);
- a file written by :func:`export_h5` (layers under ``layers/``, a ``sample_ids`` dataset and
  the store's provenance), which imports back to identical arrays, sample ids and records, with
  the layers in the store's order.

Layer order carries meaning (depth: result rows and plot axes follow it), but HDF5 lists a
group's members alphabetically unless the group tracks creation order. Imported layers follow,
first match wins: the ``layers`` argument (``--layers``); the ``layer_order`` attribute that
:func:`export_h5` writes; a group's creation order where the file tracks it (h5py
``track_order=True``); otherwise natural name order, numbers compared as numbers (``layer2``
before ``layer10``, ``features_2`` before ``features_10``), which is depth order for the usual
numbered names but only a guess for others: pass ``--layers`` then.

Both directions stream in row blocks, so memory does not grow with ``n``. HDF5 has no safe
concurrent writers, so the bridge only imports and exports; extraction always writes zarr.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ckapipe.formats import file_sha256, versions
from ckapipe.store import LAYOUT_ATTRS, ActivationStore, LayerRecord, StoreError

__all__ = ["EXPORT_FORMAT", "H5BridgeError", "export_h5", "import_h5"]

EXPORT_FORMAT = "ckapipe.activation-export"
EXPORT_FORMAT_VERSION = 1
_BLOCK_BYTES = 64 * 2**20  # rows read per step: about this many bytes over all layers
_SPLIT_PATTERN = re.compile(r"^features_(\d+)$")
_DIGITS = re.compile(r"(\d+)")
# layout attributes and timestamps describe one store, not the provenance: never copied over
_NOT_COPIED_ATTRS = LAYOUT_ATTRS | {"created_at", "completed_at"}


class H5BridgeError(StoreError):
    """An HDF5 file cannot be imported (or a store exported) as asked."""


@dataclass(frozen=True)
class _Source:
    """One layer to import: its HDF5 dataset path(s) (several for row-split thingsvision files)."""

    layer: str
    paths: tuple[str, ...]
    sample_shape: tuple[int, ...]  # per-sample shape before reduction (the record's shape)
    n_rows: int
    reduction: str
    n_features: int  # stored width p: the product of the datasets' trailing dimensions


def import_h5(
    h5_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    layers: Sequence[str] | None = None,
    key: str | None = None,
    dtype: str = "float32",
    sample_ids: np.ndarray | Sequence[int] | None = None,
    codec: str | None = None,
    row_block: int = 256,
) -> ActivationStore:
    """Import activations from an HDF5 file into a new activation store.

    Parameters
    ----------
    h5_path:
        The HDF5 file (see the module docstring for the layouts understood).
    out:
        Store directory to create; refused if it exists and is not empty.
    layers:
        Layers to import, by layer name (``a.b``) or HDF5 path (``a/b``), in this order; default
        all, in the order described in the module docstring (the exported order for files
        written by :func:`export_h5`).
    key:
        Import only this dataset, or the datasets under this group.
    dtype:
        Logical store dtype: ``float32`` (default), ``float16`` or ``bfloat16``.
    sample_ids:
        (n,) dataset index of each row. Default: the ``sample_ids`` of an exported file, else
        ``arange(n)`` (the file's row order, recorded as ``order="dataset"``).
    codec, row_block:
        As for :meth:`ActivationStore.create`.

    Returns
    -------
    ActivationStore
        The complete store, open for reading.
    """
    h5_path = Path(h5_path)
    if not h5_path.is_file():
        raise H5BridgeError(f"{h5_path} does not exist or is not a file")
    if not h5py.is_hdf5(h5_path):
        raise H5BridgeError(
            f"{h5_path} is not an HDF5 file (no HDF5 signature); give the .h5/.hdf5 file that "
            "holds the activations"
        )
    source_sha256 = file_sha256(h5_path)
    with h5py.File(h5_path, "r") as h5:
        exported = h5.attrs.get("format") == EXPORT_FORMAT
        sources = _find_sources(h5, h5_path, key=key, exported=exported)
        if exported and "layer_order" in h5.attrs:
            sources = _in_exported_order(sources, json.loads(h5.attrs["layer_order"]))
        sources = _select(sources, layers, h5_path)
        for source in sources:
            _check_source(h5, source, h5_path)
        n = _common_row_count(sources, h5_path)
        provenance: dict[str, Any] = {}
        if exported:
            provenance = json.loads(h5.attrs.get("store_attrs", "{}"))
        if sample_ids is not None:
            ids = np.asarray(sample_ids, dtype=np.int64)
            order = "as given"
        elif exported and "sample_ids" in h5:
            ids = np.asarray(h5["sample_ids"][:], dtype=np.int64)
            order = provenance.get("order", "dataset")
        else:
            ids = np.arange(n, dtype=np.int64)
            order = "dataset"
        if ids.shape != (n,):
            raise H5BridgeError(
                f"sample_ids has shape {ids.shape} but the datasets in {h5_path} have {n} rows"
            )
        attrs = {
            **{k: v for k, v in provenance.items() if k not in _NOT_COPIED_ATTRS},
            "order": order,
            "imported_from": "hdf5",
            "source_path": str(h5_path.resolve()),
            "source_sha256": source_sha256,
            "h5_datasets": {s.layer: list(s.paths) for s in sources},
            "import_versions": _versions(),
        }
        records = [
            LayerRecord(
                name=s.layer,
                shape=s.sample_shape,
                reduction=s.reduction,
                n_features=s.n_features,
            )
            for s in sources
        ]
        store = ActivationStore.create(
            out,
            layers=records,
            sample_ids=ids,
            dtype=dtype,
            codec=codec,
            attrs=attrs,
            row_block=row_block,
        )
        try:
            # whole row chunks per step where memory allows (no chunk is rewritten), else fewer
            # row blocks; 8 bytes per value bounds the HDF5 read for any numeric dtype
            bytes_per_row = sum(s.n_features for s in sources) * 8
            memory_rows = row_block * max(1, _BLOCK_BYTES // (row_block * bytes_per_row))
            chunk_rows = max(store.chunk_shape(s.layer)[0] for s in sources)
            block = min(chunk_rows, memory_rows)
            for start in range(0, n, block):
                stop = min(start + block, n)
                store.write_rows(start, {s.layer: _read_rows(h5, s, start, stop) for s in sources})
                store.set_rows_complete(stop)
            store.mark_complete()
        except StoreError as error:
            raise H5BridgeError(
                f"{error}\n(the partial store {out} is left incomplete: remove it before importing "
                "again)"
            ) from error
        finally:
            store.close()
    return ActivationStore.open(out)


def export_h5(
    store: ActivationStore | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    layers: Sequence[str] | None = None,
) -> Path:
    """Write a complete store's layers to a new HDF5 file, one dataset per layer.

    Datasets are ``layers/<layer name>`` in logical values as float32 (bfloat16 and float32
    exactly; a float16 store's reconstructed values, offset + scale · residual, to float32
    rounding), shaped ``(n, *shape)`` for ``flatten`` layers and ``(n, p)``
    otherwise, with attributes ``reduction``, ``original_shape``, ``n_features`` and
    ``logical_dtype``. ``sample_ids`` (n,) int64 holds the dataset index of each row; the root
    attributes hold the store's provenance (``store_attrs``, JSON), identity and the layer order
    (``layer_order``, a JSON list, which :func:`import_h5` follows). Groups track creation
    order too, so other HDF5 readers that honour it (h5py) list the layers in that order.

    Parameters
    ----------
    store:
        An open store or its path (must be complete).
    out_path:
        File to create; refused if it exists. Written as ``<out_path>.partial`` and renamed at the
        end, so an interrupted export never leaves a file that looks complete.
    layers:
        Layer names to export, in this order; default all, in store order.

    Returns
    -------
    Path
        ``out_path``.
    """
    if not isinstance(store, ActivationStore):
        store = ActivationStore.open(store)
    elif not store.is_complete:
        raise H5BridgeError(f"{store.path} is incomplete; finish (resume) its extraction first")
    out_path = Path(out_path)
    if out_path.exists():
        raise H5BridgeError(f"{out_path} already exists; remove it or choose another output file")
    names = list(layers) if layers is not None else store.layer_names
    records = [store.layer(name) for name in names]  # unknown names fail here, listing known ones
    if len(set(names)) != len(names):
        raise H5BridgeError(f"layers listed more than once: {names}")
    # float16 stores hold offset + scale * float16 residual, which float16 itself cannot hold;
    # float32 keeps those values to ~6e-8 of their magnitude (bfloat16 converts exactly)
    logical = "float32"
    n = store.n_samples
    partial = out_path.with_name(out_path.name + ".partial")
    partial.unlink(missing_ok=True)
    provenance = {k: v for k, v in store.attrs.items() if k not in _NOT_COPIED_ATTRS}
    try:
        with h5py.File(partial, "w", track_order=True) as h5:
            h5.attrs["format"] = EXPORT_FORMAT
            h5.attrs["format_version"] = EXPORT_FORMAT_VERSION
            h5.attrs["store_path"] = str(Path(store.path).resolve())
            h5.attrs["store_dtype"] = store.dtype
            h5.attrs["sample_ids_sha256"] = store.attrs["sample_ids_sha256"]
            h5.attrs["store_attrs"] = json.dumps(provenance, sort_keys=True, default=str)
            h5.attrs["layer_order"] = json.dumps(names)
            h5.create_dataset("sample_ids", data=store.sample_ids)
            group = h5.create_group("layers", track_order=True)
            for record in records:
                natural = (
                    record.reduction == "flatten" and math.prod(record.shape) == record.n_features
                )
                sample_shape = record.shape if natural else (record.n_features,)
                dataset = group.create_dataset(record.name, shape=(n, *sample_shape), dtype=logical)
                dataset.attrs["reduction"] = record.reduction
                dataset.attrs["original_shape"] = np.asarray(record.shape, dtype=np.int64)
                dataset.attrs["n_features"] = record.n_features
                dataset.attrs["logical_dtype"] = store.dtype
                # whole row chunks of the store per step: each chunk is decoded once
                chunk_rows = store.chunk_shape(record.name)[0]
                rows_per_block = chunk_rows * max(
                    1, _BLOCK_BYTES // (record.n_features * 4 * chunk_rows)
                )
                for start in range(0, n, rows_per_block):
                    stop = min(start + rows_per_block, n)
                    values = store.read(record.name, rows=slice(start, stop))
                    dataset[start:stop] = values.astype(logical, copy=False).reshape(
                        stop - start, *sample_shape
                    )
        os.replace(partial, out_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out_path


# -- discovery ---------------------------------------------------------------------------------


def _find_sources(
    h5: h5py.File, h5_path: Path, *, key: str | None, exported: bool
) -> list[_Source]:
    if exported and key is None:
        key = "layers"
    if key is not None:
        if key not in h5:
            raise H5BridgeError(
                f"{h5_path} has no dataset or group {key!r}; its datasets are "
                f"{_dataset_paths(h5) or 'none'}"
            )
        root = h5[key]
        if isinstance(root, h5py.Dataset):
            return [_source_of(_layer_name(key.rsplit("/", 1)[-1]), [root])]
    else:
        root = h5
    datasets = _datasets_under(root)
    if not datasets:
        where = f"under {key!r} " if key is not None else ""
        raise H5BridgeError(f"{h5_path} holds no datasets {where}to import")
    prefix = root.name.rstrip("/") + "/"
    relative = {d.name[len(prefix) :]: d for d in datasets}
    split = {name: d for name, d in relative.items() if _SPLIT_PATTERN.match(name)}
    if split and len(split) == len(relative):
        # thingsvision writes features_01..features_NN when the features did not fit in memory
        ordered = sorted(split.items(), key=lambda item: int(_SPLIT_PATTERN.match(item[0])[1]))
        return [_source_of("features", [d for _, d in ordered])]
    sources = [_source_of(_layer_name(name), [d]) for name, d in relative.items()]
    seen: dict[str, str] = {}
    for source in sources:
        if source.layer in seen:
            raise H5BridgeError(
                f"datasets {seen[source.layer]!r} and {source.paths[0]!r} in {h5_path} map to the "
                f"same layer name {source.layer!r}; import one of them with --key"
            )
        seen[source.layer] = source.paths[0]
    return sources


def _source_of(layer: str, datasets: list[h5py.Dataset]) -> _Source:
    """Describe a layer without reading or checking it (unselected datasets may be anything)."""
    first = datasets[0]
    sample_shape = tuple(int(s) for s in first.shape[1:])
    reduction = "flatten"
    if "reduction" in first.attrs and "original_shape" in first.attrs:
        # written by export_h5: restore the store's own layer record
        reduction = str(first.attrs["reduction"])
        original = tuple(int(s) for s in np.asarray(first.attrs["original_shape"]).ravel())
        if reduction != "flatten" or math.prod(original) == math.prod(sample_shape):
            sample_shape = original
    paths = tuple(d.name.lstrip("/") for d in datasets)
    n_rows = sum(int(d.shape[0]) if d.ndim else 0 for d in datasets)
    n_features = int(math.prod(first.shape[1:]))
    return _Source(layer, paths, sample_shape, n_rows, reduction, n_features)


def _in_exported_order(sources: list[_Source], order: list[str]) -> list[_Source]:
    """Sources in the exported ``layer_order``; any not listed keep their place after those."""
    rank = {name: index for index, name in enumerate(order)}
    return sorted(sources, key=lambda source: rank.get(source.layer, len(rank)))


def _check_source(h5: h5py.File, source: _Source, h5_path: Path) -> None:
    """Refuse a selected layer whose datasets cannot hold activations."""
    first = h5[source.paths[0]]
    for path in source.paths:
        dataset = h5[path]
        if dataset.dtype.kind not in "fiu":
            raise H5BridgeError(
                f"dataset {path!r} in {h5_path} has non-numeric dtype {dataset.dtype}; only "
                "integer and float datasets hold activations (choose others with --layers)"
            )
        if dataset.ndim == 0 or dataset.shape[0] == 0:
            raise H5BridgeError(
                f"dataset {path!r} in {h5_path} has shape {dataset.shape}: no rows to import"
            )
        if dataset.shape[1:] != first.shape[1:]:
            raise H5BridgeError(
                f"split datasets {source.paths[0]!r} {first.shape} and {path!r} {dataset.shape} "
                f"in {h5_path} have different per-sample shapes"
            )


def _select(sources: list[_Source], layers: Sequence[str] | None, h5_path: Path) -> list[_Source]:
    if layers is None:
        return sources
    by_name = {s.layer: s for s in sources}
    by_path = {p: s for s in sources for p in s.paths}
    chosen = []
    for wanted in layers:
        source = by_name.get(wanted) or by_path.get(wanted.lstrip("/"))
        if source is None:
            raise H5BridgeError(
                f"{h5_path} has no layer {wanted!r}; it has {sorted(by_name)} "
                f"(from datasets {sorted(by_path)})"
            )
        if source in chosen:
            raise H5BridgeError(f"layer {wanted!r} selected more than once")
        chosen.append(source)
    return chosen


def _common_row_count(sources: list[_Source], h5_path: Path) -> int:
    first = sources[0]
    for source in sources[1:]:
        if source.n_rows != first.n_rows:
            raise H5BridgeError(
                f"datasets {'+'.join(first.paths)!r} ({first.n_rows} rows) and "
                f"{'+'.join(source.paths)!r} ({source.n_rows} rows) in {h5_path} have different "
                "row counts; every layer needs one row per sample (select layers with --layers)"
            )
    return first.n_rows


def _read_rows(h5: h5py.File, source: _Source, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a layer as ``(rows, p)``, across split datasets if needed."""
    pieces = []
    offset = 0
    for path in source.paths:
        dataset = h5[path]
        rows = int(dataset.shape[0])
        lo, hi = max(start - offset, 0), min(stop - offset, rows)
        if lo < hi:
            pieces.append(dataset[lo:hi])
        offset += rows
    block = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
    return block.reshape(stop - start, source.n_features)


def _datasets_under(group: h5py.Group) -> list[h5py.Dataset]:
    """Datasets under ``group`` depth first, each group's members in creation order when the
    group tracks it, else in natural name order; hard links only, each object once."""
    found: list[h5py.Dataset] = []
    seen: set[Any] = set()

    def visit(group: h5py.Group) -> None:
        # h5py lists a group's members in creation order exactly when the group tracks it;
        # otherwise HDF5's order is alphabetical, which puts layer10 before layer2
        names = list(group)
        if not _tracks_order(group):
            names.sort(key=_natural_key)
        for name in names:
            if not isinstance(group.get(name, getlink=True), h5py.HardLink):
                continue  # like h5py's visititems: soft and external links are not followed
            obj = group[name]
            if obj.id in seen:
                continue
            seen.add(obj.id)
            if isinstance(obj, h5py.Dataset):
                found.append(obj)
            elif isinstance(obj, h5py.Group):
                visit(obj)

    visit(group)
    return found


def _tracks_order(group: h5py.Group) -> bool:
    # a File's own id is the file, not its root group, whose creation properties hold the flag
    gid = group["/"].id if isinstance(group, h5py.File) else group.id
    return bool(gid.get_create_plist().get_link_creation_order() & h5py.h5p.CRT_ORDER_TRACKED)


def _natural_key(name: str) -> list[Any]:
    """``layer2`` before ``layer10``: digit runs compare as numbers (split puts them at odd places)."""
    return [int(part) if index % 2 else part for index, part in enumerate(_DIGITS.split(name))]


def _dataset_paths(h5: h5py.File) -> list[str]:
    return [d.name.lstrip("/") for d in _datasets_under(h5)]


def _layer_name(h5_name: str) -> str:
    """A legal layer name for an HDF5 path: ``/`` → ``.``; a leading ``__`` would be reserved."""
    name = h5_name.strip("/").replace("/", ".")
    if name.startswith("__"):
        name = "h5" + name
    return name


def _versions() -> dict[str, str]:
    """What produced the file, plus the HDF5 side of the bridge."""
    return {**versions(), "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version}
