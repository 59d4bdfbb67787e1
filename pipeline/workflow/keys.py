"""Content keys for the shared cache: which store / Gram cache a study's model × dataset needs.

A store's key is a short SHA-256 of everything that determines its bytes:

* the model spec without the weights *path* (factory, kwargs, and any other field),
* the weights' identity: the SHA-256 of the weights file, or — for a model the workflow trains
  itself — the training recipe (deterministic training: the same recipe gives the same weights),
* the dataset's identity: its spec, with an array file replaced by the SHA-256 of its content,
  plus the SHA-256 of any extra files the dataset entry lists, and the sample limit,
* the selected layers (in order), the reduction, the stored dtype and codec, the row order and
  its seed.

A Gram cache's key adds the partition and kernel (mode, batch size, epochs, seed, kernel,
threshold) to its store's key. Two studies asking for the same content get the same path, so the
second one reuses the first one's work; any change to the content gives a new path, so a stale
store is never picked up. File hashes are remembered by (path, size, mtime) so that large
checkpoints are not re-read on every Snakemake invocation.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["KEY_LENGTH", "FileHasher", "content_key", "gram_key", "store_key"]

KEY_LENGTH = 16
"""Hex digits kept from the SHA-256 (64 bits: collisions are not a practical concern here)."""


def content_key(payload: Mapping[str, Any]) -> str:
    """Short SHA-256 of the canonical JSON of ``payload`` (sorted keys, no whitespace)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_LENGTH]


class FileHasher:
    """SHA-256 of files and folders, remembered in ``index_path`` by (path, size, mtime_ns).

    Parameters
    ----------
    index_path:
        JSON file holding the remembered hashes (created on first use). ``None``: no memory.
    """

    def __init__(self, index_path: str | os.PathLike[str] | None = None) -> None:
        self.index_path = Path(index_path) if index_path is not None else None
        self._index: dict[str, dict[str, Any]] = {}
        if self.index_path is not None and self.index_path.is_file():
            try:
                self._index = json.loads(self.index_path.read_text())
            except (OSError, ValueError):
                self._index = {}  # a damaged index only costs re-hashing
        self._dirty = False

    def sha256(self, path: str | os.PathLike[str]) -> str:
        """Hex SHA-256 of a file, or of a folder (relative paths and contents, sorted)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist (referenced by the study config); fix the path or "
                "create the file before running the study"
            )
        if path.is_dir():
            digest = hashlib.sha256()
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(str(child.relative_to(path)).encode() + b"\0")
                digest.update(self.sha256(child).encode())
            return digest.hexdigest()
        stat = path.stat()
        resolved = str(path.resolve())
        remembered = self._index.get(resolved)
        if (
            remembered
            and remembered["size"] == stat.st_size
            and remembered["mtime_ns"] == stat.st_mtime_ns
        ):
            return str(remembered["sha256"])
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(2**20), b""):
                digest.update(block)
        value = digest.hexdigest()
        self._index[resolved] = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "sha256": value,
        }
        self._dirty = True
        return value

    def save(self) -> None:
        """Write the index atomically (concurrent writers may lose entries, never corrupt it)."""
        if self.index_path is None or not self._dirty:
            return
        self.index_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.index_path.parent, prefix=".sha256-index.")
        with os.fdopen(fd, "w") as handle:
            json.dump(self._index, handle)
        os.replace(tmp, self.index_path)
        self._dirty = False


def store_key(
    *,
    model_spec: Mapping[str, Any],
    weights_identity: Mapping[str, Any],
    dataset_identity: Mapping[str, Any],
    layers: list[str],
    reduction: str,
    dtype: str,
    codec: str,
    order: str,
    order_seed: int,
) -> str:
    """Key of one activation store (see the module docstring for what goes in)."""
    spec = {name: value for name, value in model_spec.items() if name != "weights"}
    return content_key(
        {
            "kind": "activation-store",
            "model": spec,
            "weights": dict(weights_identity),
            "dataset": dict(dataset_identity),
            "layers": list(layers),
            "reduction": reduction,
            "dtype": dtype,
            "codec": codec,
            "order": order,
            "order_seed": order_seed if order == "random" else None,
        }
    )


def gram_key(store: str, partition: Mapping[str, Any]) -> str:
    """Key of one Gram cache: its store's key plus the partition and kernel settings."""
    return content_key({"kind": "gram-cache", "store": store, "partition": dict(partition)})
