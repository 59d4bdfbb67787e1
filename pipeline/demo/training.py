"""Train one demo model on the demo training split, deterministically, on the CPU.

The weights are a ``state_dict`` saved with ``torch.save`` (loadable with
``torch.load(weights_only=True)``, as ``ckapipe extract`` does); a JSON file beside them records
the accuracy on the held-out probe split, the chance level and the recipe.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["resolve_factory", "train_model"]


def resolve_factory(factory: str) -> Any:
    """Import ``"package.module:callable"`` and return the callable."""
    module_name, sep, attribute = factory.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"factory must look like 'package.module:callable', got {factory!r}")
    return getattr(importlib.import_module(module_name), attribute)


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(512)])
    return float((predictions == labels).double().mean())


def train_model(
    *,
    factory: str,
    kwargs: Mapping[str, Any],
    seed: int,
    data_dir: str | Path,
    weights_out: str | Path,
    metrics_out: str | Path,
    epochs: int = 8,
    batch_size: int = 64,
    learning_rate: float = 0.01,
) -> dict[str, Any]:
    """Train ``factory(**kwargs)`` with Adam and cross-entropy; write weights and metrics.

    Parameters
    ----------
    factory, kwargs:
        The model constructor (``"pkg.mod:fn"``) and its keyword arguments.
    seed:
        Seeds the initialisation and the minibatch order: networks that differ only in ``seed``
        are the "same architecture, different seeds" of the demo study.
    data_dir:
        Folder holding ``train_images.npy`` (n, 1, s, s), ``train_labels.npy`` (n,) and the same
        for ``probe`` (held out; used for the reported accuracy).
    weights_out, metrics_out:
        Output paths (``.pt`` state_dict and ``.json``).

    Returns
    -------
    The metrics dict also written to ``metrics_out``.
    """
    # One thread and deterministic kernels: the same recipe gives the same weights, and
    # parallel demo jobs do not oversubscribe the cores.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    data_dir = Path(data_dir)
    train_x = torch.from_numpy(np.load(data_dir / "train_images.npy"))
    train_y = torch.from_numpy(np.load(data_dir / "train_labels.npy"))
    probe_x = torch.from_numpy(np.load(data_dir / "probe_images.npy"))
    probe_y = torch.from_numpy(np.load(data_dir / "probe_labels.npy"))
    n_classes = int(max(train_y.max(), probe_y.max())) + 1

    model: nn.Module = resolve_factory(factory)(**dict(kwargs))
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    order_rng = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(train_x), generator=order_rng).split(batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(train_x[batch]), train_y[batch])
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started

    metrics = {
        "factory": factory,
        "kwargs": dict(kwargs),
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "n_train": len(train_x),
        "n_probe": len(probe_x),
        "n_classes": n_classes,
        "chance_accuracy": 1.0 / n_classes,
        "train_accuracy": _accuracy(model, train_x, train_y),
        "probe_accuracy": _accuracy(model, probe_x, probe_y),
        "train_seconds": round(seconds, 3),
        "torch_version": torch.__version__,
    }
    weights_out = Path(weights_out)
    weights_out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights_out)
    Path(metrics_out).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
