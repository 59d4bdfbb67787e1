"""The base every ckapipe on-disk format stands on: activation store, Gram cache, study result.

Each format module (:mod:`ckapipe.store`, :mod:`ckapipe.analyze.gram_cache`, the study result)
owns its own layout; this module owns the rules they share, so that each guarantee is written
once:

- **One writer.** :class:`WriterLock` is an advisory ``flock`` on a lock file. A second writer
  is refused at once with :class:`~ckapipe.errors.WriterLockedError` naming the holder's pid; the
  lock dies with its process, so a killed writer never blocks the next one.
- **Nothing half-made at the final path.** :func:`staged_directory` builds a new output in a
  hidden staging folder beside it and renames it into place when it is complete; a replaced
  output is moved aside first and removed only after the new one is in place.
- **Damage is detected.** :func:`create_array` gives every array a CRC-32C checksum codec and
  writes every chunk, even an all-fill one, so a complete array has every chunk file of its grid:
  a deleted chunk is *absent* (checked cheaply by :func:`check_chunks` when a reader opens the
  format) and a truncated or bit-flipped one fails its checksum (checked by :func:`verify_tree`,
  the ``ckapipe verify`` command, and by every read).
- **Identified and versioned.** :func:`check_format` refuses another format or version with a
  message that says how to make a current one; :func:`versions` and :func:`now` are the
  provenance every format records.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ckapipe.errors import FormatError, IntegrityError, WriterLockedError

__all__ = [
    "WriterLock",
    "VerifyReport",
    "check_chunks",
    "check_format",
    "create_array",
    "file_sha256",
    "now",
    "staged_directory",
    "verify_tree",
    "versions",
    "writable",
    "write_attrs",
]

#: Runtime setting of every array ckapipe writes: an all-fill chunk is still written, so an absent
#: chunk file always means damage (zarr's default skips such chunks, and a missing chunk reads as
#: the fill value with no error).
WRITE_CONFIG = {"write_empty_chunks": True}


def now() -> str:
    """The current UTC time, ISO 8601 to the second (every format's timestamps)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    """Versions of what produced a file; installed packages, whether or not imported."""
    import ckapipe

    record = {"ckapipe": ckapipe.__version__, "python": platform.python_version()}
    for package in ("torch", "numpy", "zarr", "transformers", "torchvision", "timm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            record[package] = importlib.metadata.version(package)
    return record


def file_sha256(path: str | os.PathLike[str], *, block_bytes: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def write_attrs(group: zarr.Group | zarr.Array, attrs: Mapping[str, Any]) -> None:
    """Update attributes in one metadata write (``attrs.update`` rewrites ``zarr.json`` per key)."""
    try:
        json.dumps(dict(attrs))
    except (TypeError, ValueError) as error:
        raise FormatError(
            f"attributes must be JSON-serializable (plain str/int/float/bool/list/dict): {error}"
        ) from None
    group.update_attributes(dict(attrs))


def check_format(
    attrs: Mapping[str, Any], path: Path, *, name: str, version: int, what: str, remedy: str
) -> None:
    """Refuse a group that is not ``name`` at ``version``, saying what it is and how to make one.

    ``what`` names the format for people ("activation store"); ``remedy`` says how to make a
    current one ("re-extract it with `ckapipe extract`").
    """
    found = attrs.get("format")
    if found != name:
        raise FormatError(
            f"{path} is not a ckapipe {what} (its format attribute is {found!r}); {remedy}"
        )
    if attrs.get("format_version") != version:
        raise FormatError(
            f"{path} is a {what} of format version {attrs.get('format_version')}, and this ckapipe "
            f"reads version {version}; {remedy}"
        )


# -- one writer ---------------------------------------------------------------------------------


class WriterLock:
    """An exclusive advisory lock on ``path`` (a file), held until :meth:`release` or process death.

    The holder's pid is written into the file so that a refused writer can name it.
    """

    def __init__(self, path: str | os.PathLike[str], *, what: str):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WriterLockedError(
                f"{self.what} is being written by another process (pid {holder}); one writer at "
                "a time: wait for it to finish, or write to another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @staticmethod
    def is_held(path: str | os.PathLike[str]) -> bool:
        """Whether a live process holds the lock on ``path`` (False if the file does not exist)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False


def sibling_lock_path(path: Path) -> Path:
    """The lock file guarding the creation of ``path``: hidden, beside it, outlasting renames."""
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def staged_directory(
    path: str | os.PathLike[str], *, overwrite: bool, what: str, remedy: str
) -> Iterator[Path]:
    """Build a new directory output at ``path`` in a staging folder, then rename it into place.

    Holds the writer lock beside ``path`` (:func:`sibling_lock_path`) from start to end, so two
    processes never build the same output; the loser gets :class:`WriterLockedError` at once.
    Yields the staging folder to write into. On success it becomes ``path`` by one rename; an
    existing ``path`` is refused unless ``overwrite``, and then moved aside first and deleted
    only once the new output is in place, so a writer killed at any point leaves either the old
    output or the new one at ``path`` (plus hidden leftovers that the next writer removes).
    On an exception the staging folder is removed and ``path`` is untouched.

    ``what`` names the output for messages ("Gram cache results/x.zarr"); ``remedy`` says what
    to do when ``path`` exists ("pass --overwrite to replace it").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with WriterLock(sibling_lock_path(path), what=f"{what} {path}"):
        if path.exists() and not overwrite:
            raise FormatError(f"{path} already exists; {remedy}")
        staging = path.parent / f".{path.name}.staging"
        aside = path.parent / f".{path.name}.replaced"
        # leftovers of a writer that died: only ever touched under the lock we now hold
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(aside, ignore_errors=True)
        staging.mkdir()
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if path.exists():
            os.rename(path, aside)
        os.rename(staging, path)
        shutil.rmtree(aside, ignore_errors=True)


# -- arrays with checksums, every chunk written ------------------------------------------------


def create_array(
    group: zarr.Group,
    name: str,
    *,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: Any,
    dimension_names: Sequence[str] | None = None,
    compression: str | None = None,
    fill_value: Any = 0,
    attributes: Mapping[str, Any] | None = None,
) -> zarr.Array:
    """Create an array with a CRC-32C checksum on every chunk, ready to write every chunk.

    ``compression``: ``None``/``"none"`` or ``"zstd"`` (applied before the checksum).
    """
    compressors: list[Any] = []
    if compression == "zstd":
        compressors.append(zarr.codecs.ZstdCodec(level=3))
    elif compression not in (None, "none"):
        raise FormatError(f"compression must be 'none' or 'zstd', got {compression!r}")
    compressors.append(zarr.codecs.Crc32cCodec())
    array = group.create_array(
        name,
        shape=tuple(int(s) for s in shape),
        chunks=tuple(int(c) for c in chunks),
        dtype=dtype,
        dimension_names=tuple(dimension_names) if dimension_names else None,
        compressors=compressors,
        fill_value=fill_value,
        attributes=dict(attributes or {}),
    )
    return writable(array)


def writable(array: zarr.Array) -> zarr.Array:
    """The same array, configured to write every chunk (see :data:`WRITE_CONFIG`)."""
    return array.with_config(WRITE_CONFIG)


def _chunk_files(array_dir: Path) -> set[str]:
    """Keys (``c/0/1``) of the chunk files under an array's ``c`` folder.

    A recursive ``os.scandir`` building keys by concatenation: opening a study lists thousands
    of chunk files, and ``os.walk`` with a ``relpath`` per folder cost several times more.
    Symlinked folders are not followed (as ``os.walk`` does not).
    """
    found: set[str] = set()

    def visit(folder: str, prefix: str) -> None:
        try:
            entries = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return
        with entries:
            for entry in entries:
                key = f"{prefix}/{entry.name}"
                if not entry.is_dir():
                    found.add(key)
                elif not entry.is_symlink():
                    visit(entry.path, key)

    visit(str(array_dir / "c"), "c")
    return found


def _expected_chunk_keys(array: zarr.Array, rows: int | None = None) -> list[str]:
    """Chunk keys of the array's grid; with ``rows``, only chunks holding rows below ``rows``."""
    grid = list(array.cdata_shape)
    if rows is not None and grid:
        grid[0] = min(grid[0], -(-rows // array.chunks[0]))
    encode = array.metadata.chunk_key_encoding.encode_chunk_key
    return [encode(index) for index in np.ndindex(*grid)] if all(grid) else []


def _arrays(group: zarr.Group, prefix: str = "") -> Iterator[tuple[str, zarr.Array]]:
    with warnings.catch_warnings():
        # lock files inside a group are ours, not zarr's: zarr warns about every such file
        warnings.simplefilter("ignore")
        members = sorted(group.members())
    for name, member in members:
        if isinstance(member, zarr.Group):
            yield from _arrays(member, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", member


def check_chunks(
    path: str | os.PathLike[str],
    *,
    arrays: Sequence[str] | None = None,
    rows: Mapping[str, int] | None = None,
) -> None:
    """Refuse a group with an absent chunk file (a deleted chunk would read as zeros).

    Cheap: lists files, reads no data. ``arrays`` limits the check to these array paths (all by
    default); ``rows`` maps an array path to the number of leading rows that must be present
    (a store being written has only its first rows).
    """
    path = Path(path)
    group = zarr.open_group(str(path), mode="r")
    for name, array in _arrays(group):
        if arrays is not None and name not in arrays:
            continue
        expected = _expected_chunk_keys(array, (rows or {}).get(name))
        present = _chunk_files(path / name)
        missing = [key for key in expected if key not in present]
        if missing:
            raise IntegrityError(
                f"{path}: array {name!r} is missing {len(missing)} chunk file(s), e.g. "
                f"{name}/{missing[0]}; the file was deleted or never written. Run `ckapipe verify "
                f"{path}` for a full report, then re-create it (a missing chunk would read as zeros)"
            )


@dataclass
class VerifyReport:
    """What :func:`verify_tree` found: ``problems`` is empty when every chunk is intact."""

    path: Path
    arrays: int = 0
    chunks: int = 0
    bytes_read: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_tree(path: str | os.PathLike[str]) -> VerifyReport:
    """Read and checksum every chunk of every array under ``path`` (a zarr group).

    Finds deleted chunks (absent from the grid), truncated or bit-flipped chunks (checksum
    mismatch) and arrays written without a checksum. Reads everything once, chunk by chunk.
    """
    path = Path(path)
    report = VerifyReport(path)
    try:
        group = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, ValueError, zarr.errors.NodeTypeValidationError) as error:
        report.problems.append(f"{path} is not a readable zarr group: {error}")
        return report
    for name, array in _arrays(group):
        report.arrays += 1
        codecs = [type(codec).__name__ for codec in array.metadata.codecs]
        if "Crc32cCodec" not in codecs:
            report.problems.append(
                f"array {name!r} has no checksum codec (written by an old ckapipe)"
            )
        present = _chunk_files(path / name)
        for index in np.ndindex(*array.cdata_shape):
            key = array.metadata.chunk_key_encoding.encode_chunk_key(index)
            report.chunks += 1
            if key not in present:
                report.problems.append(f"array {name!r}: chunk {key} is missing")
                continue
            selection = tuple(
                slice(i * c, min((i + 1) * c, s))
                for i, c, s in zip(index, array.chunks, array.shape, strict=True)
            )
            try:
                block = array.get_basic_selection(selection)
            except Exception as error:  # noqa: BLE001 - any decoding failure is damage to report
                report.problems.append(f"array {name!r}: chunk {key} is damaged ({error})")
                continue
            report.bytes_read += int(np.asarray(block).nbytes)
    return report
