"""Small helpers shared by the extract and analyze stages (no torch import until one needs it).

- :func:`resolve_device`: a ``--device`` value to a torch device, one rule everywhere.
- :func:`jsonable` / :func:`json_roundtrip`: two different things a record needs before it is
  stored as JSON attributes: made JSON-safe (numpy values, NaN, paths) vs read back as JSON
  gives it (tuples become lists), so that a record compares equal to its stored copy.
- :func:`architecture_of` / :func:`same_architecture`: a model's declared architecture (default:
  its factory) and whether two models' layers match one to one (:data:`ARCHITECTURE_RULE`).
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

__all__ = [
    "ARCHITECTURE_RULE",
    "architecture_of",
    "json_roundtrip",
    "jsonable",
    "resolve_device",
    "same_architecture",
]


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


#: the rule, as the help text and the report state it
ARCHITECTURE_RULE = (
    "two models are of one architecture when their declared architecture is the same "
    "(`architecture:` in the study config, `ckapipe plot --architecture MODEL=NAME`), and a model "
    "without one is of its factory's architecture (`pkg.module:callable`; constructor arguments "
    "such as a seed do not count); matched-layer curves also need the same layer list"
)


def architecture_of(spec: Mapping[str, Any] | None, declared: str | None = None) -> str | None:
    """A model's architecture: ``declared`` when given, else the factory of its spec record
    (``{"factory": …, "kwargs": …}``; kwargs are ignored, so two seeds passed as a constructor
    argument share one architecture), else None (unrecorded)."""
    if declared:
        return str(declared)
    if isinstance(spec, Mapping) and spec.get("factory"):
        return str(spec["factory"])
    return None


def same_architecture(
    architecture_a: str | None,
    architecture_b: str | None,
    layers_a: Sequence[str],
    layers_b: Sequence[str],
) -> bool:
    """Whether two models' layers correspond one to one: the same architecture (see
    :func:`architecture_of`; two unrecorded ones count as equal) and the same layer list.

    Equal layer names alone are not enough: an MLP and a CNN may both have ``relu1`` … ``relu3``.
    """
    return list(layers_a) == list(layers_b) and architecture_a == architecture_b
