"""Capturing layer outputs with forward hooks, shared by extraction and in-memory comparison.

A :class:`LayerCapture` hooks the selected modules, runs one forward pass per batch and returns
one ``(B, p)`` feature matrix per selected layer, in selection order. It checks what peers get
silently wrong: a selected layer that did not run, a module that ran more often than the
selection allows, an output that is not per-sample, and a per-sample shape that changes between
batches.

Reductions (``reduce=``) turn a layer output ``(B, ...)`` into ``(B, p)``:

- ``flatten``: all non-batch axes, row-major (default);
- ``mean``: mean over the token axis of a ``(B, T, D)`` output, over the spatial axes of a
  channels-first ``(B, C, ...)`` output of 4 or more axes; a ``(B, D)`` output is kept;
- ``cls``: the first token of a ``(B, T, D)`` output;
- ``masked_mean``: the token mean of a ``(B, T, D)`` output over the positions where the batch's
  ``attention_mask`` is non-zero (dict dataset items holding an ``attention_mask``).

Reductions run in float32 whatever the layer's dtype (autocast outputs are upcast first).

Features are copied (or reduced into new memory) inside the hook, before the next operation of
the forward pass runs: models rewrite layer outputs in place (``ReLU(inplace=True)`` after a
batch norm, ``out += identity`` in residual blocks), and a kept view would store the rewritten
values. On CUDA the copy is enqueued on the current stream, ahead of those in-place kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from ckapipe.errors import UsageError
from ckapipe.extract.layers import LayerSelectionError, LayerSelector

__all__ = [
    "REDUCTIONS",
    "CaptureError",
    "LayerCapture",
    "autocast_context",
    "call_model",
    "eval_mode",
    "reduce_output",
    "select_output",
    "split_batch",
]

REDUCTIONS = ("flatten", "mean", "cls", "masked_mean")


class CaptureError(UsageError):
    """A layer output cannot be captured as asked (wrong type, not per-sample, changing shape)."""


def call_model(model: torch.nn.Module, model_input: Any) -> Any:
    """Run ``model`` on one batch: a tensor is passed positionally, a dict as keyword arguments."""
    if isinstance(model_input, Mapping):
        return model(**model_input)
    return model(model_input)


def model_failed(error: BaseException, model_input: Any, advice: str) -> CaptureError:
    """The error for a forward pass that raised: most often the input is not what the model takes.

    Names the input's shapes and dtypes and the model's own error, so the CLI prints one line.
    """
    return CaptureError(
        f"the model failed on the first batch, input {describe_input(model_input)}: "
        f"{type(error).__name__}: {error}; {advice}"
    )


def describe_input(model_input: Any) -> str:
    """Shapes and dtypes of a batch (a tensor, or a dict of tensors) for messages."""
    if isinstance(model_input, torch.Tensor):
        return f"{tuple(model_input.shape)} {model_input.dtype}"
    if isinstance(model_input, Mapping):
        return "{" + ", ".join(f"{k}: {describe_input(v)}" for k, v in model_input.items()) + "}"
    return type(model_input).__name__


def split_batch(
    batch: Any, *, input_index: int = 0, keys: Sequence[str] | None = None
) -> tuple[Any, torch.Tensor | None]:
    """Split a collated batch into the model input and the attention mask (if any).

    Parameters
    ----------
    batch:
        A tensor ``(B, ...)``, a tuple/list whose element ``input_index`` is the input, or a dict
        of keyword tensors (restricted to ``keys`` when given).

    Returns
    -------
    (model_input, attention_mask)
        ``attention_mask`` is the dict's ``attention_mask`` entry ``(B, T)``, else None.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, tuple | list):
        if input_index >= len(batch):
            raise CaptureError(
                f"dataset items have {len(batch)} elements but the spec's input is element "
                f"{input_index}; set the dataset spec's \"input\" to the input's index"
            )
        return split_batch(batch[input_index])
    if isinstance(batch, Mapping):
        # the mask serves masked_mean even when it is not passed to the model
        mask = batch.get("attention_mask")
        if keys is not None:
            missing = [key for key in keys if key not in batch]
            if missing:
                raise CaptureError(
                    f"dataset items have no key(s) {missing}; their keys are {sorted(batch)}"
                )
            batch = {key: batch[key] for key in keys}
        else:
            batch = dict(batch)
        return batch, mask if isinstance(mask, torch.Tensor) else None
    raise CaptureError(
        f"dataset items collate to {type(batch).__name__}; expected a tensor, a tuple whose "
        "element 'input' is the input, or a dict of keyword tensors"
    )


def batch_size_of(model_input: Any) -> int:
    """Number of samples in a model input (a tensor or a dict of tensors)."""
    if isinstance(model_input, torch.Tensor):
        return int(model_input.shape[0])
    for value in model_input.values():
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    raise CaptureError("a dict batch holds no tensor: cannot tell its batch size")


def select_output(output: Any, output_index: int, output_key: str, layer: str) -> torch.Tensor:
    """The tensor a layer output stands for: itself, a tuple's element, or a dict's key."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list):
        if output_index >= len(output):
            raise CaptureError(
                f"layer {layer!r} returns a tuple of {len(output)} elements; "
                f"--output-index {output_index} is out of range"
            )
        chosen = output[output_index]
        if not isinstance(chosen, torch.Tensor):
            raise CaptureError(
                f"layer {layer!r} returns a tuple whose element {output_index} is "
                f"{type(chosen).__name__}, not a tensor; choose another --output-index"
            )
        return chosen
    if isinstance(output, Mapping):
        if output_key not in output or not isinstance(output[output_key], torch.Tensor):
            keys = [k for k, v in output.items() if isinstance(v, torch.Tensor)]
            raise CaptureError(
                f"layer {layer!r} returns {type(output).__name__} without a tensor "
                f"{output_key!r}; choose --output-key from {keys}"
            )
        return output[output_key]
    raise CaptureError(
        f"layer {layer!r} returns {type(output).__name__}, not a tensor, tuple or dict; "
        "select another layer"
    )


def reduce_output(
    tensor: torch.Tensor,
    reduction: str,
    *,
    layer: str,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce one layer output ``(B, ...)`` to features ``(B, p)`` in float32 (see module doc).

    The result never shares memory with ``tensor``: called in a forward hook, it holds the
    layer's output as it was when the layer returned, whatever the model does to that output in
    place afterwards (``ReLU(inplace=True)``, a residual ``out += identity``).
    """
    features = _reduce(tensor, reduction, layer=layer, attention_mask=attention_mask)
    # flatten, cls and mean of a (B, D) output are mostly views of a float32 output; mean and
    # masked_mean of larger outputs and upcasts already wrote new memory and need no second copy
    if features.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
        return features.clone(memory_format=torch.contiguous_format)
    return features


def _reduce(
    tensor: torch.Tensor,
    reduction: str,
    *,
    layer: str,
    attention_mask: torch.Tensor | None,
) -> torch.Tensor:
    values = tensor.detach().float()
    if values.ndim < 2:
        # a (B,) output (a scalar per sample) is one feature
        return values.reshape(values.shape[0], 1)
    if reduction == "flatten":
        return values.reshape(values.shape[0], -1)
    if reduction == "mean":
        if values.ndim == 2:
            return values
        if values.ndim == 3:
            return values.mean(dim=1)
        return values.mean(dim=tuple(range(2, values.ndim)))
    if values.ndim != 3:
        raise CaptureError(
            f"layer {layer!r}: reduction {reduction!r} needs a (batch, tokens, features) output, "
            f"got shape {tuple(values.shape)}; use 'flatten' or 'mean'"
        )
    if reduction == "cls":
        return values[:, 0, :]
    if reduction == "masked_mean":
        if attention_mask is None:
            raise CaptureError(
                f"layer {layer!r}: reduction 'masked_mean' needs an attention mask, but the "
                "batch has none; use dataset items that are dicts with an 'attention_mask', "
                "or --reduce mean"
            )
        if tuple(attention_mask.shape) != tuple(values.shape[:2]):
            raise CaptureError(
                f"layer {layer!r}: attention_mask has shape {tuple(attention_mask.shape)} but the "
                f"output's (batch, tokens) are {tuple(values.shape[:2])}; 'masked_mean' needs them equal"
            )
        weights = (attention_mask != 0).to(values.dtype).unsqueeze(-1)  # (B, T, 1)
        counts = weights.sum(dim=1)  # (B, 1)
        if bool((counts == 0).any()):
            row = int((counts[:, 0] == 0).nonzero()[0, 0])
            raise CaptureError(
                f"layer {layer!r}: batch row {row} has an all-zero attention_mask; "
                "'masked_mean' of no tokens is undefined"
            )
        return (values * weights).sum(dim=1) / counts
    raise CaptureError(f"unknown reduction {reduction!r}; use one of {REDUCTIONS}")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put every module in eval mode and restore each module's own training flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def autocast_context(device: torch.device, autocast: str | bool | None) -> Any:
    """``torch.autocast`` for ``autocast`` = ``float16`` / ``bfloat16`` / True; a no-op for None/False."""
    if autocast is None or autocast is False:
        return contextlib.nullcontext()
    if autocast is True:
        return torch.autocast(device.type)
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    if autocast not in dtypes:
        raise CaptureError(f"autocast must be one of {sorted(dtypes)} or None, got {autocast!r}")
    return torch.autocast(device.type, dtype=dtypes[autocast])


class LayerCapture:
    """Forward hooks on selected layers; use as a context manager (hooks are removed on exit).

    Parameters
    ----------
    model:
        The model; hooks go on ``model.get_submodule(selector.module_name)``.
    selectors:
        Selected layers (see :func:`ckapipe.extract.layers.resolve_layers`); results follow
        their order.
    reduce:
        One of :data:`REDUCTIONS`, for every layer.
    output_index, output_key:
        Which element of a tuple output / key of a dict output is captured.

    After each :meth:`run`, ``shapes`` maps layer name → per-sample output shape before
    reduction (as first seen; a later change is an error).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        selectors: Sequence[LayerSelector],
        *,
        reduce: str = "flatten",
        output_index: int = 0,
        output_key: str = "last_hidden_state",
    ):
        if reduce not in REDUCTIONS:
            raise CaptureError(f"unknown reduction {reduce!r}; use one of {REDUCTIONS}")
        self.model = model
        self.selectors = list(selectors)
        self.reduce = reduce
        self.output_index = output_index
        self.output_key = output_key
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._by_module: dict[str, list[LayerSelector]] = {}
        for selector in self.selectors:
            self._by_module.setdefault(selector.module_name, []).append(selector)
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}
        self._results: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._out: Mapping[str, torch.Tensor] | None = None
        self._batch_size = 0
        self._error: BaseException | None = None

    def __enter__(self) -> LayerCapture:
        try:
            for module_name in self._by_module:
                module = self.model.get_submodule(module_name)
                self._handles.append(module.register_forward_hook(self._make_hook(module_name)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, module_name: str) -> Any:
        def hook(module: Any, args: Any, output: Any) -> None:
            call = self._calls.get(module_name, 0)
            self._calls[module_name] = call + 1
            if self._error is not None:
                return
            try:
                for selector in self._by_module[module_name]:
                    if selector.call is None and call > 0:
                        continue  # reported after the forward pass, with the call count
                    if selector.call is not None and selector.call != call:
                        continue
                    self._results[selector.name] = self._capture(selector.name, output)
            except BaseException as error:  # raised after the forward, outside the model's code
                self._error = error

        return hook

    def _capture(self, name: str, output: Any) -> torch.Tensor:
        tensor = select_output(output, self.output_index, self.output_key, name)
        if tensor.ndim == 0 or tensor.shape[0] != self._batch_size:
            raise CaptureError(
                f"layer {name!r} output has shape {tuple(tensor.shape)}, whose first axis is not "
                f"the batch ({self._batch_size} samples): it is not a per-sample output; "
                "select another layer"
            )
        shape = tuple(int(s) for s in tensor.shape[1:])
        seen = self.shapes.setdefault(name, shape)
        if seen != shape and self.reduce in ("flatten", "cls"):
            raise CaptureError(
                f"layer {name!r} output per sample changed shape from {seen} to {shape} between "
                "batches; pad inputs to one length or use --reduce mean / masked_mean"
            )
        if self._out is None:
            return reduce_output(tensor, self.reduce, layer=name, attention_mask=self._mask)
        # copying straight into the caller's buffer is the one copy the hook must make anyway
        destination = self._out[name]
        features = _reduce(tensor, self.reduce, layer=name, attention_mask=self._mask)
        if features.shape != destination.shape:
            raise CaptureError(
                f"layer {name!r} gives features of shape {tuple(features.shape)} in this batch, "
                f"but its destination has shape {tuple(destination.shape)} (batch rows, features "
                "found on the first batch); the layer's output changed between batches"
            )
        destination.copy_(features, non_blocking=True)
        return destination

    def run(
        self,
        model_input: Any,
        attention_mask: torch.Tensor | None = None,
        out: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One forward pass; returns ``{layer name: (B, p) float32 tensor}`` in selection order.

        Call inside :func:`eval_mode` / ``torch.inference_mode`` as needed; the caller moves the
        input to the model's device.

        ``out`` maps every layer name to a float32 ``(B, p)`` destination (e.g. a slice of a
        pinned host buffer); each layer's features are copied into it inside its hook, with
        ``non_blocking=True`` (synchronize the device before reading a host destination), and
        the destinations are returned. Without ``out``, the features are new tensors on the
        model's device.

        Raises
        ------
        LayerSelectionError
            A selected layer did not run, or ran more often than the selection allows.
        CaptureError
            An output could not be captured (see :func:`select_output`, :func:`reduce_output`).
        """
        self._calls = {}
        self._results = {}
        self._error = None
        self._mask = attention_mask
        self._out = out
        self._batch_size = batch_size_of(model_input)
        try:
            call_model(self.model, model_input)
        finally:
            self._mask = None
            self._out = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        self._check_calls()
        return {selector.name: self._results[selector.name] for selector in self.selectors}

    def _check_calls(self) -> None:
        for selector in self.selectors:
            calls = self._calls.get(selector.module_name, 0)
            if calls == 0:
                raise LayerSelectionError(
                    f"selected layer {selector.module_name!r} did not run in this batch (the "
                    "forward pass never called it); select a module that the forward pass uses"
                )
            if selector.call is None and calls > 1:
                choices = ", ".join(f"'{selector.module_name}@{k}'" for k in range(calls))
                raise LayerSelectionError(
                    f"module {selector.module_name!r} ran {calls} times in one forward pass, so "
                    f"which output to capture is ambiguous; select one call: {choices}"
                )
            if selector.call is not None and selector.call >= calls:
                raise LayerSelectionError(
                    f"layer {selector.name!r}: module {selector.module_name!r} ran only {calls} "
                    f"time(s) in this forward pass; calls are numbered 0 to {calls - 1}"
                )
