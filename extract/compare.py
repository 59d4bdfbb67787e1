"""In-memory minibatch CKA between two models, for notebooks: no store, no disk.

It uses the extraction's capture code (:class:`~ckapipe.extract.capture.LayerCapture`, so the
same layer selection, output and reduction rules and errors) and the estimator core's
:class:`~ckapipe.analyze.estimators.MinibatchCKA` (unbiased HSIC₁ per batch, float64).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ckapipe.extract.capture import LayerCapture, autocast_context, eval_mode, split_batch
from ckapipe.extract.extraction import _to_device, resolve_device
from ckapipe.extract.layers import resolve_layers
from ckapipe.extract.specs import ModelSpecLike, parse_model_spec

__all__ = ["CompareResult", "compare"]

MIN_BATCH = 4  # unbiased HSIC₁ needs m >= 4


@dataclass(frozen=True)
class CompareResult:
    """Minibatch CKA of every layer pair of two models.

    Attributes
    ----------
    cka:
        (La, Lb) float64; row i is ``layers_a[i]``, column j is ``layers_b[j]``.
    layers_a, layers_b:
        Stored layer names in selection order (``name@K`` for a chosen call).
    n_samples, n_batches:
        Samples and batches that entered the estimate.
    dropped_samples:
        Samples of batches smaller than 4, which the unbiased estimator cannot use.
    accumulator:
        The :class:`~ckapipe.analyze.estimators.MinibatchCKA` (per-batch terms for intervals).
    """

    cka: np.ndarray
    layers_a: list[str]
    layers_b: list[str]
    n_samples: int
    n_batches: int
    dropped_samples: int = 0
    accumulator: Any = field(default=None, repr=False, compare=False)

    def value(self, layer_a: str, layer_b: str) -> float:
        """CKA of one named layer pair."""
        for names, name, side in ((self.layers_a, layer_a, "a"), (self.layers_b, layer_b, "b")):
            if name not in names:
                raise KeyError(
                    f"model {side} has no compared layer {name!r}; its layers are {names}"
                )
        return float(self.cka[self.layers_a.index(layer_a), self.layers_b.index(layer_b)])

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, JSON-ready (NaN stays NaN)."""
        return {
            "cka": self.cka.tolist(),
            "layers_a": list(self.layers_a),
            "layers_b": list(self.layers_b),
            "n_samples": self.n_samples,
            "n_batches": self.n_batches,
            "dropped_samples": self.dropped_samples,
        }


def _as_model(model: ModelSpecLike | torch.nn.Module) -> torch.nn.Module:
    if isinstance(model, torch.nn.Module):
        return model
    return parse_model_spec(model).build()


def compare(
    model_a: ModelSpecLike | torch.nn.Module,
    model_b: ModelSpecLike | torch.nn.Module | None,
    dataloader: Iterable[Any],
    *,
    layers_a: str | Iterable[str],
    layers_b: str | Iterable[str] | None = None,
    device: str | torch.device = "auto",
    reduce: str = "flatten",
    output_index: int = 0,
    output_key: str = "last_hidden_state",
    input_index: int = 0,
    keys: Iterable[str] | None = None,
    kernel: str = "linear",
    autocast: str | bool | None = None,
) -> CompareResult:
    """Minibatch CKA between the selected layers of two models on the same batches.

    Parameters
    ----------
    model_a, model_b:
        ``torch.nn.Module`` objects or model specs. ``model_b=None`` (or the same object as
        ``model_a``) compares model a with itself in one forward pass per batch.
    dataloader:
        Iterable of collated batches: a tensor ``(m, ...)``, a tuple whose element
        ``input_index`` is the input, or a dict of keyword tensors (restricted to ``keys``;
        its ``attention_mask`` feeds ``masked_mean``). Use ``shuffle=True`` so that batches are
        random minibatches.
    layers_a, layers_b:
        Layer selections (names, globs, ``type:NAME``, ``name@K``); ``layers_b`` defaults to
        ``layers_a``.
    device, reduce, output_index, output_key, autocast:
        As in :func:`ckapipe.extract.extraction.extract_activations`.
    kernel:
        ``linear`` or ``rbf``.

    Returns
    -------
    CompareResult
        ``.cka`` (La, Lb) float64 with ``.layers_a`` / ``.layers_b`` labels.
    """
    from ckapipe.analyze.estimators import MinibatchCKA

    net_a = _as_model(model_a)
    net_b = net_a if model_b is None else _as_model(model_b)
    selectors_a = resolve_layers(net_a, layers_a)
    selectors_b = resolve_layers(net_b, layers_a if layers_b is None else layers_b)
    same_model = net_b is net_a
    names_a = [s.name for s in selectors_a]
    names_b = [s.name for s in selectors_b]
    accumulator = MinibatchCKA(names_a, names_b, kernel=kernel)  # type: ignore[arg-type]
    torch_device = resolve_device(device)
    key_list = None if keys is None else list(keys)
    options = {"reduce": reduce, "output_index": output_index, "output_key": output_key}

    nets = [net_a] if same_model else [net_a, net_b]
    devices = [next((p.device for p in net.parameters()), None) for net in nets]
    dropped = 0
    try:
        for net in nets:
            net.to(torch_device)
        if same_model:
            union = list(dict.fromkeys([*selectors_a, *selectors_b]))
            captures = [LayerCapture(net_a, union, **options)]
        else:
            captures = [
                LayerCapture(net_a, selectors_a, **options),
                LayerCapture(net_b, selectors_b, **options),
            ]
        with contextlib.ExitStack() as stack:
            for capture in captures:
                stack.enter_context(capture)
            for net in nets:
                stack.enter_context(eval_mode(net))
            stack.enter_context(torch.inference_mode())
            for batch in dataloader:
                model_input, mask = split_batch(batch, input_index=input_index, keys=key_list)
                model_input = _to_device(model_input, torch_device)
                mask = None if mask is None else mask.to(torch_device)
                with autocast_context(torch_device, autocast):
                    outputs = [capture.run(model_input, mask) for capture in captures]
                feats_a = outputs[0]
                feats_b = outputs[-1]
                m = next(iter(feats_a.values())).shape[0]
                if m < MIN_BATCH:
                    dropped += m
                    continue
                accumulator.update(
                    [feats_a[s.name] for s in selectors_a], [feats_b[s.name] for s in selectors_b]
                )
    finally:
        for net, original in zip(nets, devices, strict=True):
            if original is not None:
                net.to(original)
    if dropped:
        warnings.warn(
            f"compare: {dropped} samples in batches smaller than {MIN_BATCH} were left out "
            "(unbiased HSIC needs at least 4 per batch); use drop_last=True or another batch size",
            stacklevel=2,
        )
    if accumulator.n_batches == 0:
        raise ValueError(f"compare: the dataloader gave no batch of at least {MIN_BATCH} samples")
    return CompareResult(
        cka=accumulator.compute(),
        layers_a=names_a,
        layers_b=names_b,
        n_samples=accumulator.n_samples,
        n_batches=accumulator.n_batches,
        dropped_samples=dropped,
        accumulator=accumulator,
    )
