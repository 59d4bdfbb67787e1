"""The demo models: a small MLP and a small CNN for 1×16×16 inputs.

Both are ``nn.Sequential`` with named stages, so their layer names are stable and readable
(``relu1``, ``relu2``, ``relu3``, ``logits``) and the same names mean the same depth in both.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["DEMO_LAYERS", "mlp", "small_cnn"]

DEMO_LAYERS = ["relu1", "relu2", "relu3", "logits"]
"""The layers the demo study compares (same names in both architectures)."""


def mlp(n_classes: int = 6, image_size: int = 16, width: int = 128) -> nn.Sequential:
    """Three hidden ReLU layers (width, width/2, width/4) and a linear read-out.

    Input (batch, 1, image_size, image_size); output (batch, n_classes) logits.
    """
    return nn.Sequential(
        OrderedDict(
            [
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(image_size * image_size, width)),
                ("relu1", nn.ReLU()),
                ("fc2", nn.Linear(width, width // 2)),
                ("relu2", nn.ReLU()),
                ("fc3", nn.Linear(width // 2, width // 4)),
                ("relu3", nn.ReLU()),
                ("logits", nn.Linear(width // 4, n_classes)),
            ]
        )
    )


def small_cnn(n_classes: int = 6, image_size: int = 16, width: int = 8) -> nn.Sequential:
    """Three 3×3 conv + ReLU stages (width, 2·width, 4·width channels), pooling, linear read-out.

    Input (batch, 1, image_size, image_size); ``relu1`` is (batch, width, s, s), ``relu2``
    (batch, 2·width, s/2, s/2), ``relu3`` (batch, 4·width, s/4, s/4); output (batch, n_classes).
    """
    if image_size % 4:
        raise ValueError(f"small_cnn needs image_size divisible by 4, got {image_size}")
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(1, width, 3, padding=1)),
                ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(width, 2 * width, 3, padding=1)),
                ("relu2", nn.ReLU()),
                ("pool2", nn.MaxPool2d(2)),
                ("conv3", nn.Conv2d(2 * width, 4 * width, 3, padding=1)),
                ("relu3", nn.ReLU()),
                ("gap", nn.AdaptiveAvgPool2d(1)),
                ("flatten", nn.Flatten()),
                ("logits", nn.Linear(4 * width, n_classes)),
            ]
        )
    )
