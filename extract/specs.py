"""Model and dataset specs: one description shared by the CLI, the Python API and pipeline configs.

A spec is a frozen dataclass that validates itself. Everything a user may pass (a
``module:callable`` string, a dict, a JSON string, ``@file.json`` / ``@file.yaml``, or a spec)
goes through :func:`parse_model_spec` / :func:`parse_dataset_spec` once, at the boundary.

Model spec dict::

    {"factory": "pkg.mod:make_model", "kwargs": {...}, "weights": "w.pt", "strict": true}

``factory`` is ``module:callable``, ``path/to/file.py:callable``, or a constructor of an
optional package: ``torchvision:resnet18`` (``torchvision.models.get_model``), ``timm:resnet18``
(``timm.create_model``), ``transformers:BertModel`` (the class is built from its config class
with ``kwargs`` as the config, no download) or ``transformers:AutoModel`` (``from_pretrained``
with ``kwargs``). ``weights`` is a state_dict file: ``.safetensors``, or anything else is read
with ``torch.load(weights_only=True)``.

Dataset spec dict, either a factory::

    {"factory": "pkg.mod:make_dataset", "kwargs": {...}, "input": 0,
     "keys": null, "transform": "pkg.mod:fn", "transform_kwargs": {}}

or an array file of inputs::

    {"array": "x.npy"}  {"array": "inputs.zarr", "key": "images"}  {"array": "f.h5", "key": "x"}

Items of a factory dataset may be a tensor (the input), a tuple/list (element ``input`` is the
input) or a dict (passed to the model as keyword arguments; ``keys`` restricts which). Array
files are read lazily, one item per row; floating arrays become float32 tensors, integer arrays
keep their dtype. ``transform`` (preprocessing) is applied to each item's input (to the whole
dict for dict items); with ``transform_kwargs`` it is a factory called once with them to make
the transform. Relative paths are relative to the current directory, which is also searched (last) for
``module:callable`` modules.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from ckapipe.errors import UsageError
from ckapipe.formats import file_sha256

if TYPE_CHECKING:
    import torch

__all__ = [
    "DatasetSpec",
    "DatasetSpecLike",
    "ModelSpec",
    "ModelSpecLike",
    "SpecError",
    "file_sha256",
    "load_callable",
    "parse_dataset_spec",
    "parse_model_spec",
]

# packages whose constructors are reachable as "<package>:<name>" without importing a module path
OPTIONAL_CONSTRUCTORS = ("torchvision", "timm", "transformers")
ARRAY_SUFFIXES = (".npy", ".zarr", ".h5", ".hdf5")


class SpecError(UsageError):
    """A model or dataset spec is malformed or names something that cannot be loaded."""


def _frozen_mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(
            f"{what} must be a mapping of keyword arguments, got {type(value).__name__}"
        )
    try:
        # kwargs are recorded in the store: they must survive a JSON round trip unchanged
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as error:
        raise SpecError(
            f"{what} must be JSON-serialisable (numbers, strings, lists, dicts): {error}"
        ) from None


def _check_factory(factory: Any, what: str) -> None:
    if not isinstance(factory, str) or factory.count(":") < 1:
        raise SpecError(
            f"{what} must be a 'module:callable' string (e.g. 'mypkg.models:make_cnn' or "
            f"'models.py:make_cnn'), got {factory!r}"
        )
    module, _, name = factory.rpartition(":")
    if not module or not name:
        raise SpecError(f"{what} {factory!r} needs both a module and a callable name around ':'")


@dataclass(frozen=True)
class ModelSpec:
    """How to build a model: a factory, its keyword arguments and optional weights.

    Parameters
    ----------
    factory:
        ``module:callable``, ``file.py:callable``, ``torchvision:NAME``, ``timm:NAME``,
        ``transformers:ModelClass`` or ``transformers:AutoModel...``.
    kwargs:
        Keyword arguments of the factory (JSON-serialisable; recorded in the store).
    weights:
        Optional state_dict file (``.safetensors`` or a ``torch.save`` file).
    strict:
        Passed to ``load_state_dict``: whether every key must match.
    """

    factory: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights: str | None = None
    strict: bool = True

    def __post_init__(self) -> None:
        _check_factory(self.factory, "model factory")
        object.__setattr__(self, "kwargs", _frozen_mapping(self.kwargs, "model kwargs"))
        if self.weights is not None:
            if not isinstance(self.weights, str) or not self.weights:
                raise SpecError(f"model weights must be a file path, got {self.weights!r}")
        if not isinstance(self.strict, bool):
            raise SpecError(f"model 'strict' must be true or false, got {self.strict!r}")

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        """The spec as a plain dict (what the store records)."""
        return {
            "factory": self.factory,
            "kwargs": dict(self.kwargs),
            "weights": self.weights,
            "strict": self.strict,
        }

    def weights_sha256(self) -> str | None:
        """SHA-256 of the weights file, or None when the spec has no weights."""
        if self.weights is None:
            return None
        return file_sha256(self._weights_path())

    def _weights_path(self) -> Path:
        path = Path(self.weights)  # type: ignore[arg-type]
        if not path.is_file():
            raise SpecError(f"model weights file {self.weights!r} does not exist")
        return path

    def build(self) -> torch.nn.Module:
        """Construct the model and load its weights (if any). Returns the module in eval mode."""
        import torch

        model = _build_model(self.factory, dict(self.kwargs))
        if not isinstance(model, torch.nn.Module):
            raise SpecError(
                f"model factory {self.factory!r} returned {type(model).__name__}, not a torch.nn.Module"
            )
        if self.weights is not None:
            state = load_state_dict(self._weights_path())
            try:
                model.load_state_dict(state, strict=self.strict)
            except RuntimeError as error:
                raise SpecError(
                    f"weights {self.weights!r} do not fit model {self.factory!r}: {error}; "
                    'check the file, or set "strict": false to load a partial state_dict'
                ) from None
        return model.eval()


@dataclass(frozen=True)
class DatasetSpec:
    """How to build a dataset of model inputs: a factory or an array file, plus preprocessing.

    Parameters
    ----------
    factory:
        ``module:callable`` returning a ``torch.utils.data.Dataset`` (map-style, with ``len``).
    kwargs:
        Keyword arguments of the factory.
    input:
        For tuple/list items: index of the element that is the model input (default 0).
    keys:
        For dict items: the keys passed to the model as keyword arguments (default all).
    array:
        Instead of a factory: an array file of inputs (``.npy``, a zarr array or group, or an
        HDF5 file); rows are samples.
    key:
        The array inside a zarr group or an HDF5 file.
    transform:
        Optional ``module:callable`` applied to each item's input (preprocessing).
    transform_kwargs:
        If given, ``transform`` is a factory called once with these to make the transform.
    """

    factory: str | None = None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    input: int = 0
    keys: tuple[str, ...] | None = None
    array: str | None = None
    key: str | None = None
    transform: str | None = None
    transform_kwargs: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if (self.factory is None) == (self.array is None):
            raise SpecError(
                "a dataset spec needs exactly one of 'factory' (module:callable returning a "
                "Dataset) and 'array' (an .npy / zarr / HDF5 file of inputs)"
            )
        if self.factory is not None:
            _check_factory(self.factory, "dataset factory")
            if self.key is not None:
                raise SpecError("dataset 'key' only applies to an 'array' file, not to a factory")
        else:
            if not isinstance(self.array, str) or not self.array:
                raise SpecError(f"dataset 'array' must be a file path, got {self.array!r}")
            suffix = Path(self.array.rstrip("/")).suffix.lower()
            if suffix not in ARRAY_SUFFIXES:
                raise SpecError(
                    f"dataset array {self.array!r}: unknown file type {suffix!r}; "
                    f"use one of {', '.join(ARRAY_SUFFIXES)}"
                )
            if suffix in (".h5", ".hdf5") and not self.key:
                raise SpecError(
                    f"dataset array {self.array!r} is HDF5: name its dataset with 'key'"
                )
            if self.kwargs:
                raise SpecError("dataset 'kwargs' only apply to a factory, not to an 'array' file")
        object.__setattr__(self, "kwargs", _frozen_mapping(self.kwargs, "dataset kwargs"))
        if isinstance(self.input, bool) or not isinstance(self.input, int) or self.input < 0:
            raise SpecError(
                f"dataset 'input' must be a non-negative element index, got {self.input!r}"
            )
        if self.keys is not None:
            keys = [self.keys] if isinstance(self.keys, str) else list(self.keys)
            if not keys or not all(isinstance(k, str) and k for k in keys):
                raise SpecError(
                    f"dataset 'keys' must be a non-empty list of names, got {self.keys!r}"
                )
            object.__setattr__(self, "keys", tuple(keys))
        if self.transform is not None:
            _check_factory(self.transform, "dataset transform")
        if self.transform_kwargs is not None:
            if self.transform is None:
                raise SpecError("dataset 'transform_kwargs' given without a 'transform'")
            object.__setattr__(
                self,
                "transform_kwargs",
                _frozen_mapping(self.transform_kwargs, "dataset transform_kwargs"),
            )

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        """The spec as a plain dict (what the store records); unset optional fields are omitted."""
        record: dict[str, Any] = {}
        if self.factory is not None:
            record.update(factory=self.factory, kwargs=dict(self.kwargs), input=self.input)
            if self.keys is not None:
                record["keys"] = list(self.keys)
        else:
            record["array"] = self.array
            if self.key is not None:
                record["key"] = self.key
        if self.transform is not None:
            record["transform"] = self.transform
            if self.transform_kwargs is not None:
                record["transform_kwargs"] = dict(self.transform_kwargs)
        return record

    def build(self) -> torch.utils.data.Dataset:
        """Construct the dataset, with the transform applied to each item's input."""
        if self.factory is not None:
            factory = load_callable(self.factory, "dataset factory")
            dataset = factory(**_checked_kwargs(factory, self.kwargs, self.factory, "kwargs"))
            if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
                raise SpecError(
                    f"dataset factory {self.factory!r} returned {type(dataset).__name__}, which is "
                    "not a map-style dataset (it needs __len__ and __getitem__)"
                )
        else:
            dataset = ArrayDataset(self.array, self.key)  # type: ignore[arg-type]
            len(dataset)  # opens the file now, so that a bad path fails before any work
        if self.transform is not None:
            transform = load_callable(self.transform, "dataset transform")
            if self.transform_kwargs is not None:
                transform = transform(
                    **_checked_kwargs(
                        transform, self.transform_kwargs, self.transform, "transform_kwargs"
                    )
                )
            dataset = TransformedDataset(dataset, transform, self.input)
        return dataset


class TransformedDataset:
    """A dataset whose items have ``transform`` applied to their input element."""

    def __init__(self, dataset: Any, transform: Callable[[Any], Any], input_index: int):
        self.dataset = dataset
        self.transform = transform
        self.input_index = input_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        if isinstance(item, tuple | list):
            item = list(item)
            item[self.input_index] = self.transform(item[self.input_index])
            return tuple(item)
        return self.transform(item)


class ArrayDataset:
    """Rows of an array file as a dataset: ``.npy`` (memory-mapped), zarr, or an HDF5 dataset.

    The file is opened lazily in each process, so the dataset can go to DataLoader workers
    (h5py handles cannot be pickled). Floating rows become float32 tensors; integers keep
    their dtype.
    """

    def __init__(self, path: str, key: str | None = None):
        self.path = path
        self.key = key
        self._array: Any = None
        self._pid: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "key": self.key, "_array": None, "_pid": None}

    def _open(self) -> Any:
        # a forked DataLoader worker must not share the parent's open HDF5 handle
        if self._array is not None and self._pid == os.getpid():
            return self._array
        path = Path(self.path)
        if not path.exists():
            raise SpecError(f"dataset array file {self.path!r} does not exist")
        suffix = Path(self.path.rstrip("/")).suffix.lower()
        try:
            if suffix == ".npy":
                array = np.load(path, mmap_mode="r")
            elif suffix == ".zarr":
                import zarr

                node = zarr.open(str(path), mode="r")
                if isinstance(node, zarr.Group):
                    if not self.key:
                        raise SpecError(
                            f"dataset {self.path!r} is a zarr group: name the array with 'key' "
                            f"(arrays: {sorted(node.array_keys())})"
                        )
                    node = node[self.key]
                array = node
            else:
                import h5py

                handle = h5py.File(path, "r")
                if self.key not in handle:
                    keys = sorted(handle.keys())
                    handle.close()
                    raise SpecError(
                        f"HDF5 file {self.path!r} has no dataset {self.key!r}; it has {keys}"
                    )
                array = handle[self.key]
        except SpecError:
            raise
        except Exception as error:  # any reader's failure to open means a bad file
            raise SpecError(f"cannot open dataset array {self.path!r}: {error}") from None
        if len(array.shape) < 1 or array.shape[0] == 0:
            raise SpecError(f"dataset array {self.path!r} has no rows (shape {array.shape})")
        self._array, self._pid = array, os.getpid()
        return array

    def __len__(self) -> int:
        return int(self._open().shape[0])

    def __getitem__(self, index: int) -> Any:
        import torch

        row = np.asarray(self._open()[int(index)])
        if np.issubdtype(row.dtype, np.floating):
            row = row.astype(np.float32, copy=False)
        return torch.from_numpy(np.array(row))


ModelSpecLike: TypeAlias = "ModelSpec | Mapping[str, Any] | str"
DatasetSpecLike: TypeAlias = "DatasetSpec | Mapping[str, Any] | str"


def parse_model_spec(value: ModelSpecLike) -> ModelSpec:
    """Turn a ``module:callable`` string, dict, JSON string or ``@file`` into a :class:`ModelSpec`."""
    if isinstance(value, ModelSpec):
        return value
    return _from_mapping(ModelSpec, _as_mapping(value, "model"), "model")


def parse_dataset_spec(value: DatasetSpecLike) -> DatasetSpec:
    """Turn a ``module:callable`` string, dict, JSON string or ``@file`` into a :class:`DatasetSpec`.

    A bare string naming an array file (``x.npy``, ``x.zarr``) is read as ``{"array": ...}``.
    """
    if isinstance(value, DatasetSpec):
        return value
    if isinstance(value, str) and Path(value.rstrip("/")).suffix.lower() in ARRAY_SUFFIXES:
        if not value.startswith(("@", "{")):
            return DatasetSpec(array=value)
    return _from_mapping(DatasetSpec, _as_mapping(value, "dataset"), "dataset")


def _as_mapping(value: Any, what: str) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    if not isinstance(value, str):
        raise SpecError(
            f"{what} spec must be a 'module:callable' string, a dict, a JSON object or "
            f"@file.json/@file.yaml, got {type(value).__name__}"
        )
    text = value.strip()
    if text.startswith("@"):
        return _read_spec_file(Path(text[1:]), what)
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(f"{what} spec is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise SpecError(f"{what} spec JSON must be an object")
        return data
    return {"factory": text}


def _read_spec_file(path: Path, what: str) -> Mapping[str, Any]:
    if not path.is_file():
        raise SpecError(f"{what} spec file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as error:  # yaml and json raise different types; both mean a bad file
        raise SpecError(f"{what} spec file {str(path)!r} cannot be parsed: {error}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{what} spec file {str(path)!r} must hold a mapping (a spec dict)")
    return data


def _from_mapping(cls: type, data: Mapping[str, Any], what: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(
            f"{what} spec has unknown field(s) {unknown}; known fields are {sorted(known)}"
        )
    values = dict(data)
    if "keys" in values and isinstance(values["keys"], list):
        values["keys"] = tuple(values["keys"])
    return cls(**values)


# -- loading code and files -------------------------------------------------------------------
def load_callable(reference: str, what: str = "callable") -> Callable[..., Any]:
    """Import ``module:callable`` (or ``path/to/file.py:callable``; dotted attributes allowed)."""
    module_name, _, attribute = reference.rpartition(":")
    if module_name.endswith(".py"):
        module = _import_file(Path(module_name), what)
    else:
        # like `python -m`, find modules in the current directory (console scripts do not)
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise SpecError(
                f"{what} {reference!r}: cannot import module {module_name!r} ({error}); "
                "check the name and that it is on PYTHONPATH"
            ) from None
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise SpecError(
                f"{what} {reference!r}: {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not callable(target):
        raise SpecError(f"{what} {reference!r} is not callable")
    return target


def _import_file(path: Path, what: str) -> Any:
    if not path.is_file():
        raise SpecError(f"{what}: file {str(path)!r} does not exist")
    name = "_ckapipe_spec_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"{what}: cannot import {str(path)!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _checked_kwargs(
    target: Any, kwargs: Mapping[str, Any], name: str, field: str
) -> dict[str, Any]:
    """``kwargs`` if ``target`` accepts them; else a :class:`SpecError` naming the misfit.

    Checked against the signature before the call, so that a TypeError raised inside the user's
    code stays a bug with its traceback instead of being reported as a wrong spec.
    """
    kwargs = dict(kwargs)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return kwargs
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        accepted = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
        raise SpecError(
            f"{name!r} does not accept the spec's {field} {sorted(kwargs)}: {error}; it takes "
            f"{accepted} — fix the spelling in the spec's {field!r}"
        ) from None
    return kwargs


def _build_model(factory: str, kwargs: dict[str, Any]) -> Any:
    package, _, name = factory.partition(":")
    if package not in OPTIONAL_CONSTRUCTORS:
        build = load_callable(factory, "model factory")
        return build(**_checked_kwargs(build, kwargs, factory, "kwargs"))
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise SpecError(
            f"model {factory!r} needs the optional package {package!r}, which is not installed; "
            f"`pip install {package}` or use a 'module:callable' factory"
        ) from None
    if package == "torchvision":
        return module.models.get_model(name, **kwargs)
    if package == "timm":
        return module.create_model(name, **kwargs)
    model_class = getattr(module, name, None)
    if model_class is None:
        raise SpecError(f"model {factory!r}: transformers has no class {name!r}")
    if name.startswith("AutoModel"):
        return model_class.from_pretrained(**kwargs)
    # a randomly initialised model from its config class: no download
    return model_class(model_class.config_class(**kwargs))


def load_state_dict(path: Path) -> Mapping[str, Any]:
    """Read a state_dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``)."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling / format errors of either reader
        raise SpecError(f"cannot read weights {str(path)!r}: {error}") from None
    if not isinstance(state, Mapping):
        raise SpecError(f"weights {str(path)!r} hold a {type(state).__name__}, not a state_dict")
    return state
