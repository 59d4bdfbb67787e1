"""Which layers to capture: listing a model's modules and resolving a layer selection.

Selection syntax (each entry of ``--layers`` / ``layers=``):

- an exact module name as in ``model.named_modules()``: ``layer1.0.conv1``;
- a glob over module names: ``layer*.relu``, ``encoder.layer.?``;
- a module type: ``type:Conv2d`` (class name) or ``type:torch.nn.Conv2d`` (qualified name);
- any of these followed by ``@K`` picks the K-th call (0-based) of a module that runs more than
  once per forward pass; it is stored as layer ``name@K``. Without ``@K`` such a module is an
  error, because which call is meant is ambiguous.

Globs and types expand in registration order; the selection as a whole keeps the order in
which the entries are given, and a module selected twice (same call) is kept once, at its first
position. The stored rows of a result always follow this order, never the order hooks fire in.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from ckapipe.errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "LayerInfo",
    "LayerSelectionError",
    "LayerSelector",
    "EXAMPLE_DTYPES",
    "example_input",
    "list_layers",
    "model_layers",
    "resolve_layers",
]

_CALL_SUFFIX = re.compile(r"^(?P<pattern>.*)@(?P<call>\d+)$")


class LayerSelectionError(UsageError):
    """A layer selection names no module, an ambiguous module call, or a layer that did not run."""


@dataclass(frozen=True)
class LayerSelector:
    """One selected layer: a module, and which of its calls per forward pass (None: the only one)."""

    module_name: str
    call: int | None = None

    @property
    def name(self) -> str:
        """The stored layer name: the module name, with ``@K`` when a call was chosen."""
        return self.module_name if self.call is None else f"{self.module_name}@{self.call}"


class LayerInfo(NamedTuple):
    """One row of :func:`list_layers`.

    ``shape`` is the full output shape, batch axis included, of what extraction would capture
    (after the tuple element / dict key choice), or None when the module did not run or returned
    no tensor there; ``calls`` is how often it ran in the forward pass; ``output`` describes the
    raw output (e.g. ``tuple[(2, 10, 32), None]``).
    """

    name: str
    type: str
    shape: tuple[int, ...] | None
    calls: int
    output: str


def _module_names(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _type_names(module: Any) -> tuple[str, str]:
    cls = type(module)
    return cls.__name__, f"{cls.__module__}.{cls.__qualname__}"


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
    if close:
        return f"closest valid names: {close}"
    return (
        f"the model has {len(candidates)} modules, e.g. {list(candidates[:8])}; "
        "run `ckapipe layers MODEL` to list them all"
    )


def resolve_layers(model: torch.nn.Module, selection: str | Iterable[str]) -> list[LayerSelector]:
    """Resolve a layer selection against ``model``'s modules.

    Parameters
    ----------
    model:
        The model whose ``named_modules()`` are selected from.
    selection:
        Entries as described in the module docstring; a single string may hold several entries
        separated by commas.

    Returns
    -------
    list of LayerSelector
        In selection order, without duplicates.

    Raises
    ------
    LayerSelectionError
        For an entry that matches nothing, naming the closest valid names.
    """
    entries = _split_entries(selection)
    if not entries:
        raise LayerSelectionError("no layers selected: give at least one name, glob or type:NAME")
    modules = dict((name, module) for name, module in model.named_modules() if name)
    names = list(modules)
    selected: list[LayerSelector] = []
    for entry in entries:
        match = _CALL_SUFFIX.match(entry)
        pattern, call = (match["pattern"], int(match["call"])) if match else (entry, None)
        if pattern.startswith("type:"):
            wanted = pattern[len("type:") :]
            hits = [n for n in names if wanted in _type_names(modules[n])]
            if not hits:
                types = sorted({_type_names(m)[0] for m in modules.values()})
                close = difflib.get_close_matches(wanted, types, n=5, cutoff=0.5)
                raise LayerSelectionError(
                    f"layer selection {entry!r}: no module of type {wanted!r}; "
                    + (f"closest types: {close}" if close else f"the model's types are {types}")
                )
        elif any(ch in pattern for ch in "*?["):
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise LayerSelectionError(
                    f"layer pattern {entry!r} matches no module; {_suggest(pattern, names)}"
                )
        elif pattern in modules:
            hits = [pattern]
        else:
            raise LayerSelectionError(f"unknown layer {entry!r}; {_suggest(pattern, names)}")
        for name in hits:
            selector = LayerSelector(name, call)
            if selector not in selected:
                selected.append(selector)
    return selected


def _split_entries(selection: str | Iterable[str]) -> list[str]:
    if isinstance(selection, str):
        selection = [selection]
    entries: list[str] = []
    for item in selection:
        if not isinstance(item, str):
            raise LayerSelectionError(f"layer selections are strings, got {item!r}")
        entries.extend(part.strip() for part in item.split(",") if part.strip())
    return entries


def list_layers(
    model: torch.nn.Module,
    example_input: Any,
    *,
    output_index: int = 0,
    output_key: str = "last_hidden_state",
) -> list[LayerInfo]:
    """List every module of ``model`` with its type and output shape, from one dry forward pass.

    Parameters
    ----------
    model:
        Any ``torch.nn.Module``; it runs once in eval mode under ``torch.inference_mode`` and its
        training flags are restored afterwards.
    example_input:
        A batch as the model takes it: a tensor ``(B, ...)`` or a dict of keyword tensors.
    output_index, output_key:
        Which element of a tuple output / which key of a dict output counts as the layer output
        (as in extraction).

    Returns
    -------
    list of LayerInfo
        ``(name, type, shape, calls, output)`` in registration order; the root module is omitted.
    """
    import torch

    from ckapipe.extract.capture import call_model, eval_mode, model_failed, select_output

    records: dict[str, dict[str, Any]] = {
        name: {"calls": 0, "output": None, "shape": None} for name in _module_names(model)
    }

    def make_hook(name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            record = records[name]
            record["calls"] += 1
            if record["calls"] == 1:
                record["output"] = _describe(output)
                try:
                    tensor = select_output(output, output_index, output_key, name)
                    record["shape"] = tuple(int(s) for s in tensor.shape)
                except ValueError:
                    record["shape"] = None

        return hook

    handles = [
        module.register_forward_hook(make_hook(name))
        for name, module in model.named_modules()
        if name
    ]
    try:
        with eval_mode(model), torch.inference_mode():
            try:
                call_model(model, example_input)
            except Exception as error:  # the model's own code failed: most often a wrong input
                raise model_failed(
                    error, example_input, "check --input-shape / --input-dtype (or --dataset)"
                ) from error
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    return [
        LayerInfo(
            name=name,
            type=type(modules[name]).__name__,
            shape=record["shape"],
            calls=record["calls"],
            output=record["output"] or "(did not run)",
        )
        for name, record in records.items()
    ]


def _describe(output: Any) -> str:
    import torch

    if isinstance(output, torch.Tensor):
        return str(tuple(output.shape))
    if isinstance(output, tuple | list):
        return "tuple[" + ", ".join(_describe(item) for item in output) + "]"
    if isinstance(output, dict):
        inner = ", ".join(f"{key}: {_describe(value)}" for key, value in output.items())
        return f"{type(output).__name__}{{{inner}}}"
    if output is None:
        return "None"
    return type(output).__name__


EXAMPLE_DTYPES = ("float32", "float16", "int64")
"""dtypes of a random example input (int64: token ids 0..9, for models that embed tokens)."""


def example_input(
    dataset: Any = None, input_shape: Sequence[int] | None = None, input_dtype: str = "float32"
) -> Any:
    """A batch of one example input for a dry forward pass: the first item of ``dataset`` (a
    parsed dataset spec), or a random tensor of per-sample shape ``input_shape``.

    Exactly one of ``dataset`` and ``input_shape`` is given.
    """
    if (dataset is None) == (input_shape is None):
        raise UsageError("give exactly one of --dataset and --input-shape")
    import torch

    if dataset is not None:
        from ckapipe.extract.capture import split_batch

        batch = torch.utils.data.default_collate([dataset.build()[0]])
        return split_batch(batch, input_index=dataset.input, keys=dataset.keys)[0]
    if input_dtype not in EXAMPLE_DTYPES:
        raise UsageError(f"input dtype must be one of {EXAMPLE_DTYPES}, got {input_dtype!r}")
    shape = (1, *input_shape)  # type: ignore[misc]
    if input_dtype == "int64":
        return torch.randint(0, 10, shape)
    return torch.randn(shape, dtype=getattr(torch, input_dtype))


def model_layers(
    model: Any,
    *,
    dataset: Any = None,
    input_shape: Sequence[int] | None = None,
    input_dtype: str = "float32",
    output_index: int = 0,
    output_key: str = "last_hidden_state",
) -> list[LayerInfo]:
    """:func:`list_layers` of a model spec, with an example input from ``dataset`` or
    ``input_shape`` (see :func:`example_input`): what ``ckapipe layers`` prints."""
    if (dataset is None) == (input_shape is None):
        raise UsageError("give exactly one of --dataset and --input-shape")
    net = model.build()
    example = example_input(dataset, input_shape, input_dtype)
    return list_layers(net, example, output_index=output_index, output_key=output_key)
