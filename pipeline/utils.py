"""Small helpers shared by the extract and analyze stages (no torch import until one needs it).

- :func:`resolve_device`: a ``--device`` value to a torch device, one rule everywhere.
- :func:`jsonable` / :func:`json_roundtrip`: two different things a record needs before it is
  stored as JSON attributes: made JSON-safe (numpy values, NaN, paths) vs read back as JSON
  gives it (tuples become lists), so that a record compares equal to its stored copy.
- :func:`same_architecture`: whether two models' layers match one to one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["json_roundtrip", "jsonable", "resolve_device", "same_architecture"]


def resolve_device(
    device: str | torch.device | None, *, error: type[Exception] = ValueError
) -> torch.device:
    """``"auto"``/``None`` → CUDA when torch sees a GPU, else the CPU; anything else as given.

    Raises ``error`` (the caller's error class, e.g. its usage error) for a string that is not
    a torch device, and for a CUDA device when torch sees no CUDA GPU.
    """
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise error(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise error(
            f"device {str(device)!r} requested but torch sees no CUDA GPU (CUDA is not "
            "available); use --device cpu or auto"
        )
    return resolved


def jsonable(value: Any) -> Any:
    """Attributes must be JSON: numpy scalars/arrays to Python, NaN/inf to strings, paths to
    strings; mappings and sequences converted recursively."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def json_roundtrip(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings), so that a
    record compares equal to the copy stored in zarr attributes. Raises for non-JSON values."""
    return json.loads(json.dumps(value))


def same_architecture(
    spec_a: Mapping[str, Any] | None,
    spec_b: Mapping[str, Any] | None,
    layers_a: Sequence[str],
    layers_b: Sequence[str],
) -> bool:
    """Whether two models' layers correspond one to one: the same layer list, and built the
    same way (equal factory and keyword arguments; both unrecorded counts as equal).

    Equal layer names alone are not enough: an MLP and a CNN may both have ``relu1`` … ``relu3``.
    ``spec_*`` is a model spec record (``{"factory": …, "kwargs": …}``) or ``None``.
    """
    if list(layers_a) != list(layers_b):
        return False
    return _build_key(spec_a) == _build_key(spec_b)


def _build_key(spec: Mapping[str, Any] | None) -> tuple[Any, Any] | None:
    if not isinstance(spec, Mapping) or "factory" not in spec:
        return None
    return spec["factory"], json.dumps(spec.get("kwargs") or {}, sort_keys=True, default=str)
