"""Thin adapters around the peer libraries, so the study benchmarks call every tool the same way.

- pytorch-cka 1.1.3 (import name ``cka``): :func:`pytorch_cka_pair` runs its documented
  ``compute_cka(model1, model2, dataloader, layers=...)``: forward hooks on both models, one
  forward pass of each per batch, and per batch one batched HSIC₁ over all layer pairs, all in
  the features' dtype (float32) from uncentered Grams, clamped to [0, 1] at the end.
  :func:`pytorch_cka_features` is its ``cka_from_features`` (one batch of n, float32).
- ckatorch 1.0.3: its ``CKA`` class hooks modules whose outputs are 3-D ``(bsz, n, d)`` and, per
  batch, computes ``cka_batch`` (float64 HSIC₁ with the Gram over axis 1) for each layer pair,
  *assigning* (not adding) the value, so only the last minibatch of each epoch survives.
  Our models' layers are 4-D/2-D per-sample outputs, which it cannot take; :class:`ThreeDTaps`
  runs the model and feeds each studied layer, flattened to ``(1, B, p)`` (the B samples of the
  batch as the Gram axis), through an ``nn.Identity`` "tap" that ckatorch hooks. That is the
  layout in which ckatorch computes sample-level minibatch CKA; what it returns is then the
  last batch's CKA (:func:`ckatorch_pair`), which ``bench/accuracy.py`` reports next to the correct
  all-batch value. :func:`ckatorch_features` is its ``cka_batch`` on one ``(1, n, p)`` batch.

Nothing here re-implements a peer: each adapter only builds inputs and calls the library.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "ThreeDTaps",
    "ckatorch_features",
    "ckatorch_pair",
    "tuple_batches",
    "pytorch_cka_features",
    "pytorch_cka_pair",
]


@contextlib.contextmanager
def _quiet():
    """Silence the peers' tqdm bars (stderr) and their advisory warnings during a timed call."""
    with (
        contextlib.redirect_stderr(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield


def pytorch_cka_pair(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: torch.utils.data.DataLoader,
    layers: Sequence[str],
    device: str = "cpu",
) -> np.ndarray:
    """pytorch-cka's minibatch CKA of two models over ``loader``: (La, Lb) float64 numpy.

    ``model_a`` and ``model_b`` must be distinct objects (pytorch-cka shares hooks otherwise).
    """
    from cka import compute_cka

    with _quiet():
        (matrix,) = compute_cka(
            model_a, model_b, loader, layers=list(layers), device=device, progress=False
        )
    return matrix.double().cpu().numpy()


def pytorch_cka_features(x: np.ndarray, y: np.ndarray) -> float:
    """pytorch-cka's ``cka_from_features`` on two (n, p) float arrays (one batch): a float."""
    from cka import cka_from_features

    with _quiet():
        value = cka_from_features(torch.from_numpy(x), torch.from_numpy(y))
    return float(value.reshape(-1)[0])


def _tap_key(layer: str) -> str:
    # ModuleDict keys may not contain "."
    return layer.replace(".", "__")


class ThreeDTaps(nn.Module):
    """Runs ``model``; each studied layer's output, as ``(1, B, p)``, passes an Identity tap.

    The taps are the modules ckatorch hooks (``tap_names``). Hooks on ``model`` are removed by
    :meth:`close`; build one wrapper per comparison so ckatorch's never-removed hooks stay on
    throwaway taps, not on the shared models.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        super().__init__()
        self.model = model
        self.taps = nn.ModuleDict({_tap_key(layer): nn.Identity() for layer in layers})
        modules = dict(model.named_modules())
        self._handles = []
        for layer in layers:
            tap = self.taps[_tap_key(layer)]

            def hook(module, args, output, tap=tap):
                tap(output.flatten(1).unsqueeze(0))

            self._handles.append(modules[layer].register_forward_hook(hook))
        self.tap_names = [f"taps.{_tap_key(layer)}" for layer in layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def tuple_batches(items: list[torch.Tensor]) -> tuple[torch.Tensor]:
    """DataLoader ``collate_fn`` giving ``(x,)``: ckatorch needs tuple (or dict) batches.

    A tuple, not a dict: ckatorch moves tuple elements to its device but passes dicts as is.
    """
    return (torch.stack(items),)


def ckatorch_pair(
    model_a: nn.Module,
    model_b: nn.Module,
    loader: torch.utils.data.DataLoader,
    layers: Sequence[str],
    device: str = "cpu",
) -> np.ndarray:
    """What ckatorch's ``CKA`` returns for two models over ``loader`` (one epoch): (La, Lb).

    ``loader`` must yield ``(batch,)`` tuples (:func:`tuple_batches`) without ``drop_last``.
    One epoch and the loader's own order, so the value is exactly the last batch's CKA.
    """
    from ckatorch import CKA

    wrapped_a, wrapped_b = ThreeDTaps(model_a, layers), ThreeDTaps(model_b, layers)
    try:
        with _quiet():
            comparison = CKA(
                wrapped_a,
                wrapped_b,
                layers=wrapped_a.tap_names,
                first_name="model_a",
                second_name="model_b",
                device=device,
            )
            matrix = comparison(loader, epochs=1)
    finally:
        wrapped_a.close()
        wrapped_b.close()
    return matrix.double().cpu().numpy()


def ckatorch_features(x: np.ndarray, y: np.ndarray) -> float:
    """ckatorch's ``cka_batch`` on two (n, p) arrays as one ``(1, n, p)`` batch: a float."""
    from ckatorch import cka_batch

    with _quiet():
        value = cka_batch(torch.from_numpy(x)[None], torch.from_numpy(y)[None])
    return float(value)
