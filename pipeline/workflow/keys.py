"""Content keys for the shared cache: which store / Gram cache a study's model × dataset needs.

A store's key is a short SHA-256 of everything that determines its bytes:

* the model spec without the weights *path* (factory, kwargs, and any other field),
* the source of every user callable the model and dataset specs name (model factory, dataset
  factory, transform, and any other ``module:callable`` field): the SHA-256 of the file that
  defines the module (found with ``importlib.util.find_spec``, which imports a dotted name's
  parent packages but not the module itself), or the installed version for the
  ``torchvision:`` / ``timm:`` / ``transformers:`` constructors, plus the SHA-256 of every file
  or folder listed under the model's or dataset's ``files`` (the modules a callable imports
  are *not* followed: list them there),
* the activation store format version (``ckapipe.store.FORMAT_VERSION``),
* the weights' identity: the SHA-256 of the weights file, or — for a model the workflow trains
  itself — the training recipe (deterministic training: the same recipe gives the same weights),
* the dataset's identity: its spec, with an array file replaced by the SHA-256 of its content,
  plus the SHA-256 of any extra files the dataset entry lists, and the sample limit,
* the selected layers (in order), the reduction, the stored dtype and codec, the row order and
  its seed.

A Gram cache's key adds the partition and kernel (mode, batch size, epochs, seed, kernel,
threshold), the product precision, the storage dtype of the Grams (float32 or float64, both
modes) and the Gram cache format version to its store's key. Two studies asking for the same content get the same path, so the
second one reuses the first one's work; any change to the content gives a new path, so a stale
store is never picked up. File hashes are remembered by (path, size, mtime, inode, ctime) so
that large checkpoints are not re-read on every Snakemake invocation; the ctime (which no user
call can set back) and the inode make an edited or replaced file look new even when its size and
mtime were restored.

Not part of any key: the versions of ckapipe (beyond the two format versions), torch and other
libraries, the extraction batch size, device and worker count, and any file a callable reads or
imports that is not listed under ``files``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckapipe.analyze.gram_format import FORMAT_VERSION as GRAM_FORMAT_VERSION
from ckapipe.analyze.gram_format import default_precision
from ckapipe.extract.specs import OPTIONAL_CONSTRUCTORS
from ckapipe.formats import file_sha256
from ckapipe.store import FORMAT_VERSION as STORE_FORMAT_VERSION

__all__ = [
    "KEY_LENGTH",
    "CodeSourceError",
    "DatasetKeys",
    "FileHasher",
    "ModelKeys",
    "StudyKeys",
    "callable_references",
    "code_identity",
    "content_key",
    "demo_data_dir",
    "gram_key",
    "gram_partition",
    "gram_storage",
    "module_file",
    "store_key",
    "study_keys",
    "trained_model_dir",
]

KEY_LENGTH = 16
"""Hex digits kept from the SHA-256 (64 bits: collisions are not a practical concern here)."""


# `module:callable` or `path/to/file.py:callable` (what ckapipe.extract.specs.load_callable takes)
_CALLABLE = re.compile(r"^(?:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*|[^:\s]+\.py):[A-Za-z_][\w.]*$")


class CodeSourceError(ValueError):
    """A callable named by a spec cannot be located, so its code cannot enter the cache key."""


def content_key(payload: Mapping[str, Any]) -> str:
    """Short SHA-256 of the canonical JSON of ``payload`` (sorted keys, no whitespace)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_LENGTH]


class FileHasher:
    """SHA-256 of files and folders, remembered in ``index_path`` by path, size, mtime, inode and
    ctime (an edited file whose size and mtime were restored still has a new ctime).

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
        fingerprint = {
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "ino": stat.st_ino,
            "ctime_ns": stat.st_ctime_ns,
        }
        if remembered and all(remembered.get(name) == value for name, value in fingerprint.items()):
            return str(remembered["sha256"])
        value = file_sha256(path)
        self._index[resolved] = {**fingerprint, "sha256": value}
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


def callable_references(spec: Mapping[str, Any]) -> dict[str, str]:
    """The spec's fields that name a callable (``module:callable`` strings), by field name."""
    return {
        name: value
        for name, value in spec.items()
        if isinstance(value, str) and _CALLABLE.match(value)
    }


def module_file(module: str) -> Path | None:
    """The file defining ``module``, found the way ``ckapipe extract`` imports it (the current
    directory searched last) without executing the module itself; ``None`` for a built-in."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        importlib.invalidate_caches()  # a module written since this process started
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as error:
        raise CodeSourceError(
            f"cannot locate module {module!r} ({type(error).__name__}: {error}); install it or "
            "add its folder to PYTHONPATH"
        ) from None
    finally:
        if added:
            sys.path.remove(cwd)
    if spec is None:
        raise CodeSourceError(
            f"cannot locate module {module!r} (searched sys.path, PYTHONPATH and {cwd}); install "
            "it or add its folder to PYTHONPATH, so that its source can be part of the cache key"
        )
    if spec.origin is None or not Path(spec.origin).is_file():
        return None  # built-in, frozen or namespace package: no source file of its own
    return Path(spec.origin)


def code_identity(
    spec: Mapping[str, Any], files: list[str], hasher: FileHasher, what: str
) -> dict[str, Any]:
    """What identifies the code a spec runs: each callable's module source (or, for an optional
    package's constructor, its version) and the listed ``files``. ``what`` names the spec in
    errors (``models.cnn.spec``)."""
    sources: dict[str, Any] = {}
    for name, reference in sorted(callable_references(spec).items()):
        module = reference.rpartition(":")[0]
        if module.endswith(".py"):
            path: Path | None = Path(module)
        elif module in OPTIONAL_CONSTRUCTORS:
            try:
                sources[name] = {"package": module, "version": importlib.metadata.version(module)}
            except importlib.metadata.PackageNotFoundError:
                sources[name] = {"package": module, "version": None}
            continue
        else:
            try:
                path = module_file(module)
            except CodeSourceError as error:
                raise CodeSourceError(f"{what}.{name} = {reference!r}: {error}") from None
        # the content, not the path: moving a project keeps its caches
        sources[name] = {"sha256": hasher.sha256(path) if path is not None else None}
    return {"sources": sources, "files": {path: hasher.sha256(path) for path in files}}


def store_key(
    *,
    model_spec: Mapping[str, Any],
    code: Mapping[str, Any],
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
            "format_version": STORE_FORMAT_VERSION,
            "model": spec,
            "code": dict(code),
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


#: The analysis settings that decide a Gram cache's content.
PARTITION_SETTINGS = ("mode", "batch_size", "epochs", "seed", "kernel", "threshold")


def gram_storage(analysis: Mapping[str, Any]) -> str:
    """The dtype a study's Gram caches are stored in (``analysis.gram_storage``, ``auto``
    resolved): float32 for a study of CKA only, in either mode (each finished float64 Gram
    rounded once; CKA within 1e-6 of float64 storage), else float64. Float32 tiles round each
    Gram entry by ~1e-7 of the largest: harmless for CKA, but the measures that use a layer's
    spectrum (CCA, Procrustes, regression) would read that rounding as extra dimensions."""
    storage = analysis.get("gram_storage", "auto")
    if storage != "auto":
        return str(storage)
    measures = list(analysis.get("measures") or ["cka"])
    return "float32" if measures == ["cka"] else "float64"


def gram_partition(analysis: Mapping[str, Any]) -> dict[str, Any]:
    """What of a study's ``analysis`` settings a Gram cache depends on, with the product
    precision resolved (``auto`` is the precision ``ckapipe gram`` picks for the mode) and the
    storage dtype (:func:`gram_storage`): a float64 cache is never taken for a float32 one.

    Minibatch caches of studies before ``storage`` entered this key (float64, keyed without
    it) are not found under the new keys: the workflow rebuilds them (from their stores, which
    keep their keys) rather than mistake them for float32 caches."""
    partition = {name: analysis[name] for name in PARTITION_SETTINGS}
    precision = analysis.get("precision", "auto")
    partition["precision"] = (
        default_precision(analysis["mode"]) if precision == "auto" else precision
    )
    partition["storage"] = gram_storage(analysis)
    return partition


def gram_key(store: str, partition: Mapping[str, Any]) -> str:
    """Key of one Gram cache: its store's key plus the partition, kernel and format version."""
    return content_key(
        {
            "kind": "gram-cache",
            "format_version": GRAM_FORMAT_VERSION,
            "store": store,
            "partition": dict(partition),
        }
    )


# --------------------------------------------------------------------------- a whole study's keys


@dataclass(frozen=True)
class ModelKeys:
    """One model of a study, resolved: what its stores' keys are made of."""

    spec: dict[str, Any]
    """The model spec; for a demo-trained model, ``weights`` is the trained weights' cache path."""
    weights_identity: dict[str, Any]
    code: dict[str, Any]
    train_key: str | None = None
    """Key of the demo training job that makes its weights (``None``: not trained by the demo)."""
    train_recipe: dict[str, Any] | None = None


@dataclass(frozen=True)
class DatasetKeys:
    """One dataset of a study, resolved: what its stores' keys are made of."""

    spec: dict[str, Any]
    """The dataset spec; a demo split is its images file in the cache."""
    identity: dict[str, Any]
    code: dict[str, Any]


@dataclass(frozen=True)
class StudyKeys:
    """Every content key of one study config (see :func:`study_keys`)."""

    demo_data: str
    """Key of the demo dataset (computed for every study: it is cheap and keeps one code path)."""
    models: dict[str, ModelKeys]
    datasets: dict[str, DatasetKeys]
    partition: dict[str, Any]
    stores: dict[tuple[str, str], str]
    """(dataset, model) → store key, datasets then models in config order."""
    grams: dict[tuple[str, str], str]
    """(dataset, model) → Gram cache key."""


def demo_data_dir(cache_root: str, key: str) -> str:
    """Folder of the generated demo dataset with this key under the cache root."""
    return f"{cache_root}/demo/data/{key}"


def trained_model_dir(cache_root: str, key: str) -> str:
    """Folder of the demo-trained model with this training key under the cache root."""
    return f"{cache_root}/demo/models/{key}"


def study_keys(config: Mapping[str, Any], hasher: FileHasher, cache_root: str) -> StudyKeys:
    """The content keys of every store and Gram cache a validated study ``config`` asks for.

    The one computation behind both the workflow's plan (``workflow/rules/common.smk``) and
    ``ckapipe cache`` (:func:`ckapipe.cache.config_keys`). Relative paths in the config (weights,
    arrays, ``files``, ``cache_root``) and user modules resolve against the current directory:
    call it from the study's working directory, as Snakemake does.

    Raises
    ------
    CodeSourceError
        A callable the config names cannot be located (the message names the field).
    FileNotFoundError
        A weights, array or listed file does not exist (the message names the field).
    """

    def sha256(path: str, what: str) -> str:
        try:
            return hasher.sha256(path)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{what}: {error}") from None

    def code_file(module: str) -> str:
        return hasher.sha256(module_file(module))  # type: ignore[arg-type]  # ckapipe's own

    demo_data = content_key(
        {"kind": "demo-data", **config["demo"], "code": code_file("ckapipe.demo.data")}
    )
    models = {}
    for name, model in config["models"].items():
        what = f"models.{name}.spec"
        spec = dict(model["spec"])
        train_key, recipe = None, None
        if "train" in model:
            recipe = {
                "factory": spec["factory"],
                "kwargs": spec.get("kwargs", {}),
                "train": model["train"],
                "data": demo_data,
                "code": {
                    **code_identity({"factory": spec["factory"]}, [], hasher, what),
                    "training": code_file("ckapipe.demo.training"),
                },
            }
            train_key = content_key({"kind": "demo-training", **recipe})
            spec["weights"] = f"{trained_model_dir(cache_root, train_key)}/weights.pt"
            identity: dict[str, Any] = {"trained": recipe}
        elif "weights" in spec:
            identity = {"sha256": sha256(spec["weights"], f"{what}.weights")}
        else:
            identity = {"weights": None}
        code = code_identity(spec, list(model.get("files", [])), hasher, what)
        models[name] = ModelKeys(spec, identity, code, train_key, recipe)
    datasets = {}
    for name, dataset in config["datasets"].items():
        what = f"datasets.{name}.spec"
        if "demo" in dataset:
            spec = {"array": f"{demo_data_dir(cache_root, demo_data)}/{dataset['demo']}_images.npy"}
            identity = {"demo": dataset["demo"], "data": demo_data}
        else:
            spec = dict(dataset["spec"])
            identity = {key: value for key, value in spec.items() if key != "array"}
            if "array" in spec:
                # the file's content identifies the data, not its path
                identity["array_sha256"] = sha256(spec["array"], f"{what}.array")
        identity["limit"] = dataset.get("limit")
        code = code_identity(spec, list(dataset.get("files", [])), hasher, what)
        datasets[name] = DatasetKeys(spec, identity, code)

    storage = config["storage"]
    partition = gram_partition(config["analysis"])
    stores, grams = {}, {}
    for dataset_name, dataset_keys in datasets.items():
        for model_name, model_keys in models.items():
            store = store_key(
                model_spec=model_keys.spec,
                code={"model": model_keys.code, "dataset": dataset_keys.code},
                weights_identity=model_keys.weights_identity,
                dataset_identity=dataset_keys.identity,
                layers=config["models"][model_name]["layers"],
                reduction=config["models"][model_name]["reduction"],
                dtype=storage["dtype"],
                codec=storage["codec"],
                order=storage["order"],
                order_seed=storage["order_seed"],
            )
            stores[dataset_name, model_name] = store
            grams[dataset_name, model_name] = gram_key(store, partition)
    return StudyKeys(demo_data, models, datasets, partition, stores, grams)
