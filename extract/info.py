"""Describe an activation store: layout, completeness, size on disk and provenance.

:func:`describe_store` returns plain JSON-ready data (what ``ckapipe info --json`` prints);
:func:`format_store_info` renders it as a text block for people. Both work on incomplete stores
and on damaged ones (a deleted chunk file), which they report instead of failing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ckapipe.errors import IntegrityError
from ckapipe.store import LAYOUT_ATTRS, ActivationStore

__all__ = ["describe_store", "format_store_info"]

# provenance keys shown first, in this order, when present
_PROVENANCE_ORDER = (
    "model",
    "weights_sha256",
    "dataset",
    "seed",
    "order",
    "input_fingerprint",
    "input_sha256",
    "input_block_sha256",
    "imported_from",
    "source_path",
    "source_sha256",
    "versions",
    "created_at",
    "completed_at",
)


def describe_store(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything a store says about itself, as JSON-ready data.

    Parameters
    ----------
    path:
        The store directory. Incomplete stores are described too (``complete`` is False and
        ``rows_complete`` says how far the writer got).

    Returns
    -------
    dict
        ``path``, ``format``, ``format_version``, ``complete``, ``rows_complete``, ``n_samples``,
        ``dtype`` (logical), ``codec``, ``row_block``, ``sample_ids_sha256``, ``size_bytes``
        (all files on disk), ``layers`` (one dict per layer in selection order: ``name``,
        ``stored_shape`` [n, p], ``original_shape`` (per sample, before reduction),
        ``reduction``, ``chunk_shape``, ``storage_dtype``, ``size_bytes``) and ``provenance``
        (every other root attribute, e.g. model and dataset specs, weights SHA-256, seed,
        order, input fingerprint, versions, timestamps), ``gram_only_layers``,
        ``gram_only_grams`` (None, or for a store that keeps the per-batch Grams of its Gram-only
        layers: ``request`` (the Gram settings), ``batches_kept`` and ``batches``), and
        ``damaged``: None, or what is
        missing (a deleted chunk file among the rows the store claims), so that a damaged store
        is still described rather than refused.
    """
    store = ActivationStore.open(path, allow_incomplete=True, check_chunks=False)
    try:
        store.check_chunks()
        damaged = None
    except IntegrityError as error:
        damaged = str(error)
    attrs = store.attrs
    layers = []
    for record in store.layers:
        array = store.array(record.name)
        layers.append(
            {
                "name": record.name,
                "stored_shape": [int(s) for s in array.shape],
                "original_shape": list(record.shape),
                "reduction": record.reduction,
                "n_features": record.n_features,
                "chunk_shape": [int(c) for c in array.chunks],
                "storage_dtype": str(array.dtype),
                "size_bytes": _size_on_disk(Path(store.path) / "layers" / record.name),
            }
        )
    provenance = {key: attrs[key] for key in _PROVENANCE_ORDER if key in attrs}
    provenance.update(
        {
            key: value
            for key, value in attrs.items()
            if key not in LAYOUT_ATTRS and key not in _PROVENANCE_ORDER
        }
    )
    return {
        "path": str(Path(store.path).resolve()),
        "format": attrs.get("format"),
        "format_version": attrs.get("format_version"),
        "complete": store.is_complete,
        "rows_complete": store.rows_complete,
        "n_samples": store.n_samples,
        "dtype": store.dtype,
        "codec": attrs.get("codec", "none"),
        "row_block": store.row_block,
        "sample_ids_sha256": attrs.get("sample_ids_sha256"),
        "size_bytes": _size_on_disk(Path(store.path)),
        "layers": layers,
        # encoded but not stored: only the fused Gram cache of the extraction holds them
        "gram_only_layers": [
            {
                "name": record.name,
                "original_shape": list(record.shape),
                "reduction": record.reduction,
                "n_features": record.n_features,
            }
            for record in store.gram_only
        ],
        "gram_only_grams": None
        if store.gram_only_grams is None
        else {
            "request": store.gram_only_grams,
            "batches_kept": store.gram_only_batches_kept(),
            "batches": store.gram_only_batch_count(),
        },
        "provenance": provenance,
        "damaged": damaged,
    }


def format_store_info(info: dict[str, Any]) -> str:
    """Render :func:`describe_store`'s result as a readable text block.

    Parameters
    ----------
    info:
        The dict returned by :func:`describe_store`.

    Returns
    -------
    str
        Multi-line text: status, layout, one line per layer, then provenance.
    """
    n = info["n_samples"]
    if info["complete"]:
        status = "complete"
    else:
        percent = 100.0 * info["rows_complete"] / n if n else 0.0
        status = (
            f"INCOMPLETE: {info['rows_complete']} of {n} rows written ({percent:.1f}%), no "
            "completion flag (extraction interrupted or still running; re-run it to resume)"
        )
    if info.get("damaged"):
        # first, so that nobody reads "complete" without it: readers refuse this store
        status = (
            f"DAMAGED: {info['damaged']} (its metadata says: {status}). To repair an activation "
            "store, delete it and re-run the `ckapipe extract` command that made it"
        )
    lines = [
        f"store      {info['path']}",
        f"status     {status}",
        f"samples    {n}",
        f"dtype      {info['dtype']}    codec {info['codec']}    row block {info['row_block']}",
        f"size       {_human_bytes(info['size_bytes'])} on disk ({info['size_bytes']} bytes)",
        f"sample ids sha256 {info['sample_ids_sha256']}",
        f"layers     {len(info['layers'])}",
    ]
    header = ("name", "stored (n, p)", "per-sample shape", "reduction", "chunk", "size")
    rows = [
        (
            layer["name"],
            str(tuple(layer["stored_shape"])),
            str(tuple(layer["original_shape"])),
            layer["reduction"],
            "×".join(str(c) for c in layer["chunk_shape"]),
            _human_bytes(layer["size_bytes"]),
        )
        for layer in info["layers"]
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append(
            "  "
            + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    for layer in info.get("gram_only_layers", []):
        lines.append(
            f"  {layer['name']}: Gram-only (p = {layer['n_features']}, per-sample shape "
            f"{tuple(layer['original_shape'])}): activations not stored, only in the fused Gram "
            "cache of its extraction"
        )
    kept = info.get("gram_only_grams")
    if info.get("gram_only_layers"):
        if kept is None:
            lines.append(
                "  per-batch Grams of the Gram-only layers: not kept (an older store; if "
                "interrupted it cannot resume)"
            )
        else:
            request = kept["request"]
            lines.append(
                f"  per-batch Grams of the Gram-only layers kept in the store: "
                f"{kept['batches_kept']} of {kept['batches']} batches (m = "
                f"{request.get('batch_size')}, kernel {request.get('kernel')}, threshold "
                f"{request.get('threshold')}, precision {request.get('precision')}, seed "
                f"{request.get('seed')}); a resume or a rebuilt fused cache copies them"
            )
    lines.append("provenance")
    if not info["provenance"]:
        lines.append("  (none recorded)")
    for key, value in info["provenance"].items():
        if key == "input_block_sha256" and isinstance(value, list):
            # one digest per row block: thousands for a large store, so only counted here
            value = f"{len(value)} row-block digests (see --json)"
        lines.append(f"  {key}: {_compact(value)}")
    return "\n".join(lines)


def _compact(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def _size_on_disk(path: Path) -> int:
    """Bytes of all regular files under ``path`` (the writer's lock file included)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            file_path = os.path.join(root, name)
            if not os.path.islink(file_path):
                total += os.stat(file_path).st_size
    return total


def _human_bytes(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"
